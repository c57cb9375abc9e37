"""Threads racing on the same gradients (issue 22): one thread replaces parameters' .grad with new tensors (of the
same and of other sizes and dtypes) while others run clip_, get_total_norm, clip_value_ and ZClip.step on them.
The results are racy; the memory must stay sound. The fast path (csrc/python_module.cpp) releases the GIL while
its kernel runs, so it must own every tensor it uses until it returns: before it did, this crashed the process
within seconds (glibc's heap checks, or a freed TensorImpl read as an inference tensor).

The workload (tests/thread_race.py) runs in a child process, a few seconds a case, so a crash fails the test with
the child's stderr instead of killing pytest."""
import os
import subprocess
import sys

import pytest

from fusedclip import _ext

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SECONDS = float(os.environ.get("FUSEDCLIP_RACE_SECONDS", "3"))


def race(*args, env=None, timeout=240):
    """Runs tests/thread_race.py with these arguments in a child; fails with its output unless it exited 0."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, os.path.join(HERE, "thread_race.py"), "--seconds", str(SECONDS), *args]
    try:
        out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:  # a deadlock is a failure too
        pytest.fail(f"{' '.join(cmd)} did not end in {timeout} s (a deadlock?)\nstdout:\n{e.stdout}\nstderr:\n{e.stderr}")
    why = f"signal {-out.returncode}" if out.returncode < 0 else f"exit status {out.returncode}"
    err = out.stderr if len(out.stderr) <= 12000 else out.stderr[:8000] + "\n[...]\n" + out.stderr[-4000:]
    assert out.returncode == 0, (f"{' '.join(args)}: the racing child died ({why})\nstdout:\n{out.stdout[-4000:]}\n"
                                 f"stderr (a sanitizer report's head is where it happened):\n{err}")
    assert os.path.join(ROOT, "fusedclip") in out.stdout, out.stdout  # this tree's package ran
    return out.stdout


@pytest.mark.skipif(not _ext.LOADED, reason="the extension did not load")
def test_native_survives_grads_replaced_by_other_threads():
    race("--backend", "native")


@pytest.mark.skipif(not _ext.LOADED, reason="the extension did not load")
def test_dtensor_fast_path_survives_grads_and_storages_replaced_by_other_threads():
    """DTensor gradients read in C++ (distributed/dtensor.py fast_norm): it owns each local tensor through its Python
    object, and its storage, while the kernels run without the GIL; writers replace gradients (new local tensors,
    new specs) and swap local tensors' storages."""
    race("--dtensor", "--params", "500")


@pytest.mark.skipif(not _ext.LOADED, reason="the extension did not load")
def test_native_fast_path_survives_storages_swapped_by_other_threads():
    """p.grad.data = new frees the storage of a gradient the fast path holds: it holds the storages too. (torch's
    own clip_grad_norm_ does not survive this race: its ops hold the tensors only.)"""
    race("--backend", "native", "--data-swaps")


def test_triton_interpreted_survives_grads_replaced_by_other_threads():
    """The Triton backend in Triton's interpreter on CPU tensors (a child with TRITON_INTERPRET=1: the interpreter is
    slow, so fewer and smaller parameters)."""
    pytest.importorskip("triton")
    race("--backend", "triton", "--params", "64", "--numel", "300", env=dict(os.environ, TRITON_INTERPRET="1"))


_BUSY_POOL = r"""
import time, torch, fusedclip
from fusedclip.testing import ref_norm
torch.set_num_interop_threads(1)
torch.set_num_threads(2)

@torch.jit.script
def busy(x: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        x = torch.sin(x)
    return x

@torch.jit.script
def start(x: torch.Tensor, n: int) -> torch.jit.Future[torch.Tensor]:
    return torch.jit.fork(busy, x, n)  # from TorchScript: a task on the inter-op pool (from Python: inline)


g = torch.Generator().manual_seed(0)
grads = [torch.randn(4_000_000, generator=g) * s for s in (1e-3, 1.0, 10.0, 3e2)]
fusedclip.get_total_norm(grads, 2.0)  # warm: the pool and the helper path
params = [torch.nn.Parameter(torch.zeros_like(x)) for x in grads]
for p, x in zip(params, grads):
    p.grad = x.clone()
future = start(torch.randn(1000), 30_000)  # the only inter-op thread, for a second or more
time.sleep(0.05)
start = time.perf_counter()
norm = fusedclip.get_total_norm(grads, 2.0)
fusedclip.clip_(params, 1.0)
elapsed = time.perf_counter() - start
pool_was_busy = not future.done()
future.wait()  # then our helper tasks queued behind it run (and find nothing left to do); exiting first crashes
ref = float(ref_norm(grads, 2.0))
scaled = float(ref_norm([p.grad for p in params], 2.0))
print(f"elapsed {elapsed:.3f} s, pool busy {pool_was_busy}, norm {float(norm)!r} ref {ref!r}, after {scaled!r}")
assert pool_was_busy, "inconclusive: the busy task ended first"
assert abs(float(norm) - ref) <= 2 * abs(float(torch.tensor(ref, dtype=torch.float32).nextafter(torch.tensor(0.0))) - ref)
assert abs(scaled - 1.0) < 1e-5, scaled
assert elapsed < 1.0, f"waited for the busy inter-op pool: {elapsed:.3f} s"
"""


@pytest.mark.skipif(not _ext.LOADED, reason="the extension did not load")
def test_cpu_kernel_never_waits_for_a_helper_that_has_not_started(tmp_path):
    """The CPU kernel's helpers come from torch's inter-op pool (csrc/cpu/clip_cpu.cpp, for_each_chunk) and the caller
    waits only for chunk ranges a helper claimed: with the pool's only thread busy for seconds (a forked
    TorchScript task), a 64 MB norm and clip still finish at once, and exact. (With at::parallel_for, a helper
    not yet scheduled on a busy machine held the call a time slice: 8 ms for a 16 MB norm.)"""
    script = tmp_path / "busy_pool.py"  # a file: torch.jit.script reads the function's source
    script.write_text(_BUSY_POOL)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    out = subprocess.run([sys.executable, "-W", "ignore::FutureWarning", str(script)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr[-4000:]
