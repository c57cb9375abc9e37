"""What can be proven about the Triton backend on GPU without a GPU (runs on CPU, in CI).

- The kernels compiled for sm_90 (H100/H200) with the installed Triton and with the GPU machine's Triton 3.6
  (in .venv/triton36, installed by `make setup`): 128-bit global loads on the full blocks of every dtype path,
  no spills, the registers reported, and the one-launch programs per SM that follow (tools/triton_static.py).
- No CUDA-graph capture compiles: the specialization key Triton computes for a launch is the same for every
  barrier slot and for the arguments that may differ between a warm-up and a capture.
- The one-launch sizing: half of an SM per call, whatever the registers; the variant choice by spills.
- tests/test_triton.py's GPU-only tests request no fixture that does not exist (the skip hides it here).
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

triton = pytest.importorskip("triton")
if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 6):
    pytest.skip(f"written for the compile internals of Triton 3.6 (the GPU machine's) and 3.8 "
                f"(tools/triton_static.py); this is Triton {triton.__version__}", allow_module_level=True)

from fusedclip import _ext  # noqa: E402
from fusedclip.backends.triton import clip as tclip, kernels as tk, launcher as tlauncher  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import triton_static as ts  # noqa: E402

pytestmark = [
    pytest.mark.skipif(tlauncher.INTERPRET, reason="TRITON_INTERPRET=1: the kernels are interpreted, not compiled"),
    pytest.mark.skipif(not _ext.LOADED, reason="the launchers need the extension's table op"),
]

TRITON36 = os.environ.get("FUSEDCLIP_TRITON36", os.path.join(ROOT, ".venv", "triton36"))
# compiled with Triton 3.6 and for the AMP variants only: ptxas keeps 5 values in local memory (24 bytes), stored
# at entry and reloaded at the start of each phase, not in the element loops, even with all 255 registers free
AMP_SPILL_36 = 32


@pytest.fixture(scope="module")
def triton36():
    """The same report from Triton 3.6 in a child (PYTHONPATH puts it first), started at once so that it
    compiles while this process compiles with the installed Triton."""
    if not os.path.isdir(os.path.join(TRITON36, "triton")):
        yield None
        return
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TRITON36, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.pop("TRITON_INTERPRET", None)
    child = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "triton_static.py"), "--json"],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield child
    if child.poll() is None:
        child.kill()
        child.communicate()


def _check(rows, version):
    print(f"\nTriton {version}, sm_90:")
    for r in rows:
        print("  " + ", ".join(f"{k}={v}" for k, v in r.items()))
    assert {r["variant"] for r in rows} == set(ts.variants())
    for r in rows:
        name = r["variant"]
        # every dtype path's full blocks: 128-bit loads (before defect 6 was fixed there were none at all)
        assert r["v128_data_loads"] >= r["expected_v128_data_loads"], r
        spill = r["stack_bytes"] + r["local_bytes"]
        if version.startswith("3.6") and "AMP" in name:
            assert spill <= AMP_SPILL_36, r
        else:
            assert spill == 0, r
        assert r["registers"] <= 255
        if r["kernel"] == "_zclip_kernel":  # ZClip's rule: no float64 a * b + c contracted (zclip's rounding)
            assert r["f64_fma"] == 0, r
        # a grid barrier's arrival or two-launch ZClip's ticket: taken after an explicit barrier of the program
        # (issue 25, defect 7: the ticket relied on a barrier Triton happened to insert)
        assert r["barrier_before_atomic"] is not False, r
        if "one_launch_per_sm" in r:
            # half of an SM at most: two calls at once are all resident (the grid barrier's condition)
            assert 1 <= r["one_launch_per_sm"] and 2 * r["one_launch_per_sm"] <= r["resident_per_sm"], r
            if "fp32-acc" in name and not (version.startswith("3.6") and "AMP" in name):
                # two programs per SM: 32 KB in flight per SM for fp32 and (two blocks a step) 16-bit grads
                assert r["one_launch_per_sm"] >= 2, r
                assert r["maxnreg"] == tk.ONE_LAUNCH_MAXNREG, r
    by_name = {r["variant"]: r for r in rows}
    assert by_name["zclip finish fp32-acc"]["barrier_before_atomic"] is True
    assert by_name["one-launch L2 fp32-acc"]["barrier_before_atomic"] is True
    assert by_name["partials L2 fp32-acc"]["barrier_before_atomic"] is None  # no atomics: nothing to ask
    # issue 25, defect 4: the scaling's load and store share one layout (a [BLOCK // W, W] tile), so no block
    # goes through shared memory (with Triton 3.6: 66 barriers and 126 registers before, 2 and 95 after; 3.8:
    # 128 registers before, 80 after)
    finish, clamp, zfinish = (by_name[n] for n in ("finish L2 fp32-acc", "clamp", "zclip finish fp32-acc"))
    assert finish["bar_syncs"] <= 4, finish
    # the clamp too (88 barriers and 16 KB of shared memory a program before it took the tiles)
    assert clamp["bar_syncs"] == 0 and clamp["shared"] == 0, clamp
    # The kernels launched TWO_LAUNCH_PROGRAMS_PER_SM programs per SM: at most TWO_LAUNCH_MAXNREG registers, so the
    # grid is resident at once, without spills (left free, ptxas took 168 for the finish kernel with 3.6 once the
    # partials were reduced in float64 (issue 22), 168 for the clamp with 3.8: 3 programs per SM, 1.33 waves).
    # Two-launch ZClip with 3.6 spills 8 bytes at 128 even with its rule recomputed after the scaling, so the
    # launchers' rule (the first candidate without spills) takes it free: 168 registers, 3 of 4 programs at once.
    for r in (finish, clamp) + ((zfinish,) if not version.startswith("3.6") else ()):
        assert r["maxnreg"] == tk.TWO_LAUNCH_MAXNREG and r["registers"] <= tk.TWO_LAUNCH_MAXNREG, r
    assert tlauncher.resident_per_sm(tk.TWO_LAUNCH_MAXNREG, finish["shared"]) >= tk.TWO_LAUNCH_PROGRAMS_PER_SM
    if version.startswith("3.6"):
        assert zfinish["maxnreg"] is None and zfinish["registers"] <= 168, zfinish
    # issue 25, defect 10: the low-occupancy variants as documented (fusedclip/backends/triton/kernels.py and
    # agc.py docstrings); a change either way shows here and the documentation follows it
    amp, wide, agc = (by_name[n] for n in ("one-launch inf fp32-acc AMP per-tensor", "one-launch L2 fp64-acc",
                                           "agc L2 fp32"))
    if version.startswith("3.6"):
        assert amp["maxnreg"] is None and amp["one_launch_per_sm"] == 1, amp  # the free variant: 1 per SM
        assert wide["registers"] <= 246 and wide["one_launch_per_sm"] == 1, wide
        assert agc["registers"] <= 168, agc
    else:
        assert amp["one_launch_per_sm"] >= 2, amp
        assert wide["registers"] <= 168 and wide["one_launch_per_sm"] >= 1, wide
        assert agc["registers"] <= 96, agc
    assert agc["v128_data_loads"] == 0 and agc["stack_bytes"] == 0, agc  # no 128-bit loads (no alignment hint)


def test_kernels_compiled_for_sm90(triton36):
    import triton
    _check(ts.report(), triton.__version__)


def test_kernels_compiled_for_sm90_with_triton_36(triton36):
    if triton36 is None:
        pytest.skip(f"no Triton 3.6 in {TRITON36} (make setup installs it: pip install --target "
                    f"{TRITON36} --no-deps triton==3.6.0)")
    out, err = triton36.communicate(timeout=600)
    assert triton36.returncode == 0, err[-4000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert report["triton"].startswith("3.6"), report["triton"]
    _check(report["rows"], report["triton"])


# ---- defect 2: nothing a capture does differently from its warm-up makes a new specialization ----

def _one_launch_call(grads, max_norm=1.0, **extras):
    """(kernel, args, constexprs) of the one-launch clip the launcher would make."""
    (launch,) = ts.record_launches(lambda: tclip.clip(grads, max_norm, 2.0, launch="one", **extras))
    return launch


def _key(kernel, args, constexprs):
    return str(ts.specialization(kernel, args, constexprs)[1])


def _with(kernel, args, **changes):
    args = list(args)
    for name, value in changes.items():
        args[kernel.arg_names.index(name)] = value
    return tuple(args)


def _unaligned(like):
    """A tensor like `like`, viewed 4 bytes past a 16-byte boundary."""
    buf = torch.zeros(like.numel() + 4, dtype=like.dtype)
    view = buf[4 // like.element_size():][:like.numel()].reshape(like.shape)
    assert view.data_ptr() % 16
    return view


def test_every_barrier_slot_is_aligned_and_gives_the_same_kernel():
    ws = tlauncher._Workspaces()
    device = torch.device("cpu")
    slots = [ws.get(device)] + list(ws._free[device])
    assert len(slots) == ws.ARENA
    assert all(s.data_ptr() % 16 == 0 and s.numel() == 2 and s.dtype == torch.int32 for s in slots)
    assert len({s.data_ptr() for s in slots}) == len(slots)
    # at least a cache line apart: two streams' counters never share one
    ptrs = sorted(s.data_ptr() for s in slots)
    assert min(b - a for a, b in zip(ptrs, ptrs[1:])) >= 128
    grads = ts._grads(ts.MIXED)
    kernel, args, constexprs = _one_launch_call(grads)
    keys = {_key(kernel, _with(kernel, args, ws=s), constexprs) for s in slots}
    assert len(keys) == 1, keys


def test_no_argument_that_may_change_between_warm_up_and_capture_changes_the_key():
    """Integers equal to 1 or divisible by 16, a max_norm of 0.0 (its bits are the integer 0), pointers at any
    alignment (a user's per_tensor or found_inf view): one key. The check is sensitive: the partials, which are
    specialized on alignment on purpose (always fresh, aligned allocations), do change it."""
    grads = ts._grads(ts.MIXED)
    kernel, args, constexprs = _one_launch_call(grads)
    base = _key(kernel, args, constexprs)
    for changes in (dict(n=1), dict(n=16), dict(n_chunks=1), dict(n_chunks=32), dict(n_chunks=33),
                    dict(max_norm_bits=0), dict(max_norm_bits=1), dict(p_bits=tlauncher._bits(-1.0)),
                    dict(ws=_unaligned(args[kernel.arg_names.index("ws")])),
                    dict(norm_out=_unaligned(args[kernel.arg_names.index("norm_out")])),
                    dict(table=torch.zeros(9, dtype=torch.int64)[1:])):
        assert _key(kernel, _with(kernel, args, **changes), constexprs) == base, changes
    # AMP and per-tensor: their tensors at any alignment
    kernel, args, constexprs = _one_launch_call(grads, per_tensor=torch.empty(4), inv_scale=torch.ones(()),
                                                found_inf=torch.zeros(()))
    base = _key(kernel, args, constexprs)
    pt = torch.zeros(5)[1:]
    assert pt.data_ptr() % 16
    _, args_u, _ = _one_launch_call(grads, per_tensor=pt, inv_scale=_unaligned(torch.ones(())),
                                    found_inf=_unaligned(torch.zeros(())), max_norm=0.0)
    assert _key(kernel, args_u, constexprs) == base
    partials = args[kernel.arg_names.index("partials")]
    misaligned = torch.zeros(partials.numel() + 1, dtype=partials.dtype)[1:]
    assert _key(kernel, _with(kernel, args, partials=misaligned), constexprs) != base


def test_clip_grads_with_norm_and_clip_value_keys_do_not_depend_on_their_scalars():
    """scale(): the given norm also stands in for the partials (specialized on alignment): an unaligned one is
    copied, so a norm taken from a stacked tensor gives the same kernel as a fresh one."""
    grads = ts._grads(ts.MIXED)
    (k, a, c), = ts.record_launches(lambda: tclip.scale(grads, 1.0, torch.tensor(3.0)))
    stacked = torch.tensor([1.0, 3.0, 2.0])[1]
    assert stacked.data_ptr() % 16
    (_, a2, _), = ts.record_launches(lambda: tclip.scale(grads, 0.0, stacked))
    assert _key(k, a, c) == _key(k, a2, c)
    (k, a, c), = ts.record_launches(lambda: tclip.clamp(grads, 0.5))
    (_, a2, _), = ts.record_launches(lambda: tclip.clamp(grads[:1], 0.0))
    assert _key(k, a, c) == _key(k, a2, c)


# ---- defect 7: programs per SM ----

def test_one_launch_takes_at_most_half_an_sm_whatever_the_registers():
    for regs in range(16, 256):
        for shared in (0, 4096, 16384, 60000):
            resident = tlauncher.resident_per_sm(regs, shared)
            per_sm = tlauncher.one_launch_per_sm(regs, shared)
            assert resident >= 2, (regs, shared)  # 4 warps: even 255 registers leave room for two programs
            assert 1 <= per_sm <= tk.ONE_LAUNCH_PROGRAMS_PER_SM and 2 * per_sm <= resident, (regs, shared)
    # the numbers sm_90 gives: 65536 registers, 2048 threads, 228 KB shared memory per SM
    assert [tlauncher.resident_per_sm(r, 4096) for r in (64, 80, 96, 128, 168, 255)] == [8, 6, 5, 4, 3, 2]
    assert [tlauncher.one_launch_per_sm(r, 4096) for r in (64, 80, 96, 128, 168, 255)] == [4, 3, 2, 2, 1, 1]
    assert tlauncher.resident_per_sm(32, 100_000) == 2  # shared memory can be the limit too


class _FakeKernel:
    def __init__(self, n_regs, n_spills):
        self.n_regs, self.n_spills = n_regs, n_spills
        self.metadata = type("M", (), {"shared": 4096})()

    def _init_handles(self):
        pass


@pytest.mark.parametrize("spills, picked", [((0, 0), 0), ((200, 24), 1), ((8, 24), 0)],
                         ids=["capped-clean", "capped-spills-more", "both-spill-capped-less"])
def test_one_launch_variant_choice(monkeypatch, spills, picked):
    """The first candidate without spills, else the one that spills least; found once, then looked up (a
    CUDA-graph capture only looks up)."""
    compiled = []
    regs = (128, 168)

    def warmup(*args, grid, **kwargs):
        i = len(compiled)
        compiled.append(kwargs.get("maxnreg"))
        return _FakeKernel(regs[i], spills[i])

    props = type("P", (), {"multi_processor_count": 132, "max_threads_per_multi_processor": 2048,
                           "shared_memory_per_multiprocessor": 233472, "regs_per_multiprocessor": 65536})()
    monkeypatch.setattr(tk._one_launch_kernel, "warmup", warmup)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(tlauncher, "_variants", {})
    monkeypatch.setattr(tlauncher, "_sm_counts", {})
    device = torch.device("cuda", 0)
    constexprs = dict(CLIP=True, AMP=False, PER_TENSOR=False, NORM=0, ACC=tk.tl.float32, BLOCK=tk.BLOCK_GPU,
                      PBLOCK=tk.PBLOCK, EXACT_POW=True)
    options, programs = tlauncher._one_launch_variant(device, 10**6, (), constexprs)
    assert compiled == [tk.ONE_LAUNCH_MAXNREG, None][:1 if spills[0] == 0 else 2]
    assert options == tlauncher.one_launch_options(constexprs)[picked]
    assert programs == 132 * tlauncher.one_launch_per_sm(regs[picked], 4096)
    assert tlauncher._one_launch_variant(device, 7, (), constexprs) == (options, 7)  # cached: no compile
    assert len(compiled) == (1 if spills[0] == 0 else 2)
    # fp64 accumulation: one candidate, not capped
    assert tlauncher.one_launch_options(dict(constexprs, ACC=tk.tl.float64)) == [dict(num_warps=tk.NUM_WARPS)]
    # a variant first met inside a capture: a clear error, not a compile that breaks the capture
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="warm-up"):
        tlauncher._one_launch_variant(device, 7, (), dict(constexprs, AMP=True))
    assert tlauncher._one_launch_variant(device, 7, (), constexprs) == (options, 7)  # known variants still work


@pytest.mark.parametrize("spills, picked", [((0, 0), 0), ((48, 0), 1), ((8, 24), 0)],
                         ids=["capped-clean", "capped-spills", "both-spill-capped-less"])
def test_two_launch_options_choice(monkeypatch, spills, picked):
    """The kernels of the two-launch grid (finish, clamp, two-launch ZClip): capped at TWO_LAUNCH_MAXNREG unless
    that spills and the free compile does not (two-launch ZClip with Triton 3.6); found once, then looked up."""
    compiled = []

    def warmup(*args, grid, **kwargs):
        compiled.append(kwargs.get("maxnreg"))
        return _FakeKernel((128, 168)[len(compiled) - 1], spills[len(compiled) - 1])

    monkeypatch.setattr(tk._finish_kernel, "warmup", warmup)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(tlauncher, "_variants", {})
    device = torch.device("cuda", 0)
    constexprs = dict(FROM_PARTIALS=True, WRITE_NORM=True, CLIP=True, AMP=False, PER_TENSOR=False, NORM=0,
                      ACC=tk.tl.float32, BLOCK=tk.BLOCK_GPU, PBLOCK=tk.PBLOCK, EXACT_POW=True)
    options = tlauncher._two_launch_options(device, (), constexprs, tk._finish_kernel)
    assert options == tlauncher.two_launch_options(constexprs)[picked]
    assert compiled == [tk.TWO_LAUNCH_MAXNREG, None][:1 if spills[0] == 0 else 2]
    assert tlauncher._two_launch_options(device, (), constexprs, tk._finish_kernel) == options  # cached: no compile
    assert len(compiled) == (1 if spills[0] == 0 else 2)
    assert tlauncher.two_launch_options(dict(constexprs, ACC=tk.tl.float64)) == [dict(num_warps=tk.NUM_WARPS)]
    assert tlauncher.two_launch_options(dict(BLOCK=tk.BLOCK_GPU))[0]["maxnreg"] == tk.TWO_LAUNCH_MAXNREG  # the clamp
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="warm-up"):
        tlauncher._two_launch_options(device, (), dict(constexprs, AMP=True), tk._finish_kernel)


# ---- defect 3: fixtures ----

_FIXTURE_CHECK = textwrap.dedent("""
    def pytest_collection_finish(session):
        for item in session.items:
            info = item._fixtureinfo
            params = getattr(getattr(item, "callspec", None), "params", {})
            unknown = [n for n in info.names_closure
                       if n not in info.name2fixturedefs and n not in params and n != "request"]
            if unknown:
                print(f"UNKNOWN-FIXTURE {item.nodeid} {unknown}")
        print(f"COLLECTED-ITEMS {len(session.items)}")
""")


def unknown_fixtures(tmp_path, test_file):
    """Collect test_file (with the interpreter on, so that every test of tests/test_triton.py is collected,
    the GPU ones too) and list the tests that request a fixture nobody defines: pytest reports that only at
    setup, which a skip mark prevents."""
    (tmp_path / "fixture_check.py").write_text(_FIXTURE_CHECK)
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "-p", "fixture_check", test_file], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    collected = [line for line in out.stdout.splitlines() if line.startswith("COLLECTED-ITEMS")]
    assert collected and int(collected[0].split()[1]) > 0, out.stdout[-3000:]
    return [line for line in out.stdout.splitlines() if line.startswith("UNKNOWN-FIXTURE")]


def test_no_test_requests_an_unknown_fixture(tmp_path):
    assert unknown_fixtures(tmp_path, "tests/test_triton.py") == []


def test_unknown_fixture_check_finds_one(tmp_path):
    """The check itself: a GPU-skipped test taking a parameter that is no fixture (defect 3's shape)."""
    bad = tmp_path / "test_bad_fixture.py"
    bad.write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.skipif(True, reason="needs a GPU")
        def test_gpu_thing(marks):
            pass

        @pytest.mark.parametrize("x", [1])
        def test_fine(x, tmp_path):
            pass
    """))
    found = unknown_fixtures(tmp_path, str(bad))
    assert len(found) == 1 and "test_gpu_thing" in found[0] and "marks" in found[0], found
