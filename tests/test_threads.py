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
def test_native_fast_path_survives_storages_swapped_by_other_threads():
    """p.grad.data = new frees the storage of a gradient the fast path holds: it holds the storages too. (torch's
    own clip_grad_norm_ does not survive this race: its ops hold the tensors only.)"""
    race("--backend", "native", "--data-swaps")


def test_triton_interpreted_survives_grads_replaced_by_other_threads():
    """The Triton backend in Triton's interpreter on CPU tensors (a child with TRITON_INTERPRET=1: the interpreter is
    slow, so fewer and smaller parameters)."""
    pytest.importorskip("triton")
    race("--backend", "triton", "--params", "64", "--numel", "300", env=dict(os.environ, TRITON_INTERPRET="1"))
