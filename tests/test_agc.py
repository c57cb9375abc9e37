"""fusedclip.clip_agc_ (adaptive gradient clipping) against timm's adaptive_clip_grad and a float64 reference of
the same rule: every unit (a row for 2-D and up, else the whole tensor) is built on purpose well below or well
above its threshold, from fresh random data; unclipped units must keep their exact bits."""
import math
import os
import sys

import pytest
import torch

import fusedclip
from conftest import HAS_GPU
from fusedclip.testing import TOL, assert_bit_identical, bits
from fusedclip.testing import clone_params as clone

try:  # timm's agc module needs only torch; without timm (the GPU machines) the float64 reference still runs
    import timm.utils.agc as agc_module
    timm_agc = agc_module.adaptive_clip_grad
except ImportError:
    agc_module = timm_agc = None
needs_timm = pytest.mark.skipif(timm_agc is None, reason="timm is not installed")

INF = math.inf
# conv, linear, embedding, bias, norm weight, 0-dim, odd shapes; rows longer than a CPU chunk (16384), a 1-D
# unit of several chunks, a single-row 2-D tensor
SHAPES = [(8, 3, 3, 3), (33, 129), (300, 48), (7,), (64,), (), (5, 1), (1, 1), (3, 20000), (70001,), (1, 40000),
          (2, 16389), (17, 1, 5)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def unit_dims(t):
    return tuple(range(1, t.ndim)) if t.ndim > 1 else None


def unit_norm64(t, p):
    """Each unit's norm in float64, shaped to broadcast against t."""
    return torch.linalg.vector_norm(t.double(), p, dim=unit_dims(t), keepdim=t.ndim > 1)


def make_pairs(shapes, dtype, p, seed, clip_factor=0.01, eps=1e-3, device="cpu"):
    """Parameters with weights and gradients from fresh random data; each unit's gradient norm is set to 0.3x or
    3x (chosen at random) its threshold clip_factor * max(||w||, eps); some weight units are below eps."""
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        w = torch.randn(shape, generator=g, dtype=torch.float64)
        rows = shape[0] if len(shape) > 1 else 1
        bshape = (rows,) + (1,) * (len(shape) - 1) if len(shape) > 1 else ()
        tiny = (torch.rand(rows, generator=g) < 0.2).double().reshape(bshape)
        w = w * (1 - tiny) + w * tiny * 1e-7  # a fifth of the units under eps: the clamp decides
        w = w.to(dtype).double()  # the weight as stored, so the threshold is that of what the kernel reads
        gr = torch.randn(shape, generator=g, dtype=torch.float64) + 0.1
        threshold = clip_factor * unit_norm64(w, p).clamp(min=eps)
        side = torch.where(torch.rand(rows, generator=g) < 0.5, 0.3, 3.0).double().reshape(bshape)
        gr = gr / unit_norm64(gr, p) * threshold * side
        param = torch.nn.Parameter(w.to(device=device, dtype=dtype))
        param.grad = gr.to(device=device, dtype=dtype)
        params.append(param)
    return params


def reference(w, g, clip_factor, eps, p):
    """(expected gradient, clipped-unit mask broadcastable to g): the rule in float64, scaled values rounded once
    to g's dtype."""
    max_norm = unit_norm64(w, p).clamp(min=eps) * clip_factor
    g_norm = unit_norm64(g, p)
    clipped = ~(g_norm < max_norm)
    expected = torch.where(clipped, (g.double() * (max_norm / g_norm.clamp(min=1e-6))).to(g.dtype), g)
    return expected, clipped


def check_against_reference(params, orig, clip_factor, eps, p):
    n_clipped = n_kept = 0
    for q, q0 in zip(params, orig):
        assert_bit_identical(q.detach(), q0.detach())  # weights never written
        if q0.grad is None:
            assert q.grad is None
            continue
        if q0.grad.numel() == 0:
            assert_bit_identical(q.grad, q0.grad)
            continue
        expected, clipped = reference(q0.detach().cpu(), q0.grad.cpu(), clip_factor, eps, p)
        clipped = clipped.expand(q0.grad.shape)
        got = q.grad.cpu()
        assert q.grad.stride() == q0.grad.stride()
        # units left alone keep their bits; scaled ones are the float64 rule rounded once (fp32 norms)
        assert torch.equal(bits(got[~clipped]), bits(q0.grad.cpu()[~clipped]))
        rtol, atol = TOL[q0.grad.dtype]
        torch.testing.assert_close(got[clipped], expected[clipped], rtol=max(rtol, 4e-6), atol=0)
        n_clipped += int(clipped.any())
        n_kept += int((~clipped).any())
    assert n_clipped and n_kept  # both sides of the threshold were exercised


def check_against_timm(params, orig, clip_factor, eps, p):
    """timm on a copy: fp32/fp64 agree to rounding; fp16/bf16 units (timm's norms are in the low dtype) where
    timm's decision equals ours. Nothing to do without timm."""
    if timm_agc is None:
        return
    theirs = clone(orig)
    timm_agc(theirs, clip_factor, eps, p)
    for q, t, q0 in zip(params, theirs, orig):
        if q0.grad is None or q0.grad.numel() == 0:
            continue
        ours_changed = (q.grad != q0.grad).reshape(q.grad.shape[0] if q.grad.ndim > 1 else 1, -1).any(1)
        timm_changed = (t.grad != q0.grad).reshape(ours_changed.shape[0], -1).any(1)
        same = ours_changed == timm_changed
        if q0.grad.dtype in (torch.float32, torch.float64):
            assert same.all()
            rtol = 2e-5 if q0.grad.dtype == torch.float32 else 1e-12
            torch.testing.assert_close(q.grad, t.grad, rtol=rtol, atol=0)
        else:
            assert same.float().mean() > 0.9
            rows = q.grad.reshape(same.shape[0], -1)[same]
            torch.testing.assert_close(rows, t.grad.reshape(same.shape[0], -1)[same], rtol=3e-2, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [2.0, INF], ids=str)
def test_parity_with_timm_and_reference(dtype, p):
    params = make_pairs(SHAPES, dtype, p, seed=DTYPES.index(dtype) * 2 + (p == INF))
    orig = clone(params)
    assert fusedclip.clip_agc_(params, 0.01, 1e-3, p) is None
    check_against_reference(params, orig, 0.01, 1e-3, p)
    check_against_timm(params, orig, 0.01, 1e-3, p)


@pytest.mark.parametrize("p", [1.0, 3.0, -INF, 0.0], ids=str)
def test_other_norm_types(p):
    shapes = [(9, 4, 3), (20, 21), (50,), ()]
    build_p = 2.0 if p == 0.0 else p  # p=0 counts nonzeros: the units are built for 2, decided by the count
    params = make_pairs(shapes, torch.float64, build_p, seed=11, clip_factor=0.05)
    orig = clone(params)
    fusedclip.clip_agc_(params, 0.05, 1e-3, p)
    if p != 0.0:
        check_against_reference(params, orig, 0.05, 1e-3, p)
    if timm_agc is None:
        return
    theirs = clone(orig)
    timm_agc(theirs, 0.05, 1e-3, p)
    for q, t in zip(params, theirs):
        torch.testing.assert_close(q.grad, t.grad, rtol=1e-12, atol=0)


@pytest.mark.parametrize("clip_factor, eps", [(0.01, 1e-3), (0.1, 1e-2), (1e-4, 1.0)])
def test_clip_factor_and_eps(clip_factor, eps):
    params = make_pairs(SHAPES[:6], torch.float32, 2.0, seed=21, clip_factor=clip_factor, eps=eps)
    orig = clone(params)
    fusedclip.clip_agc_(params, clip_factor=clip_factor, eps=eps)
    check_against_reference(params, orig, clip_factor, eps, 2.0)
    check_against_timm(params, orig, clip_factor, eps, 2.0)


def test_layouts_generators_no_grad_and_empty():
    """Permuted and strided gradients (through dense copies), a channels_last conv weight and gradient (used in
    place), parameters without gradients, empty ones (left alone with every norm type), a generator."""
    params = make_pairs([(16, 24), (6, 5, 3, 3), (10, 40), (12,)], torch.float32, 2.0, seed=31)
    params[0].grad = params[0].grad.t().contiguous().t()  # permuted, dense: rows are not blocks
    wide = torch.zeros(10, 80)
    wide[:, ::2] = params[2].grad
    params[2].grad = wide[:, ::2]  # strided view
    conv = params[1]
    conv.data = conv.data.contiguous(memory_format=torch.channels_last)
    conv.grad = conv.grad.contiguous(memory_format=torch.channels_last)
    params += [torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(0, 3)),
               torch.nn.Parameter(torch.randn(3, 0)), torch.nn.Parameter(torch.randn(0))]
    for q in params[-3:]:
        q.grad = torch.randn(q.shape)
    orig = clone(params)
    fusedclip.clip_agc_((q for q in params), 0.01)
    check_against_reference(params, orig, 0.01, 1e-3, 2.0)
    assert params[4].grad is None
    for p in (INF, -INF, 1.0):
        fusedclip.clip_agc_(params[-3:], 0.01, norm_type=p)  # torch's inf norm raises on these; nothing to do
    fusedclip.clip_agc_([], 0.01)
    fusedclip.clip_agc_([params[4]], 0.01)
    one = make_pairs([(5, 6)], torch.float32, 2.0, seed=32)[0]
    one0 = clone([one])
    fusedclip.clip_agc_(one, 0.01)  # a bare tensor
    check_against_reference([one], one0, 0.01, 1e-3, 2.0)


@needs_timm
def test_nonfinite_matches_timm():
    params = make_pairs([(6, 10), (8,), (5, 7)], torch.float32, 2.0, seed=41)
    params[0].grad[1, 3] = INF
    params[0].grad[2, 0] = float("nan")
    params[1].grad[0] = -INF
    params[2].data[3, 1] = float("nan")  # a NaN weight: its unit's threshold is NaN, so it is scaled (to NaN)
    params[2].data[4, 2] = INF
    orig = clone(params)
    fusedclip.clip_agc_(params, 0.01)
    theirs = clone(orig)
    timm_agc(theirs, 0.01)
    for q, t in zip(params, theirs):
        torch.testing.assert_close(q.grad, t.grad, rtol=2e-5, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_thread_count_and_isa_do_not_change_bits(backend):
    """Above the threads' threshold (8 MB in all) the items are shared out; the result must not move."""
    params = make_pairs([(600, 1024), (2, 300000), (512,), (256, 2048)], torch.float32, 2.0, seed=51)
    orig = clone(params)
    results = []
    threads = torch.get_num_threads()
    isas = fusedclip._ext._C.cpu_isa()[1].split(",") if backend == "native" else ["-"]
    try:
        for n, isa in [(1, isas[0]), (max(2, threads), isas[-1])]:
            if backend == "native":
                fusedclip._ext._C.set_cpu_isa(isa)
            torch.set_num_threads(n)
            run = clone(orig)
            fusedclip.clip_agc_(run, 0.01, backend=backend)
            results.append(run)
    finally:
        torch.set_num_threads(threads)
        if backend == "native":
            fusedclip._ext._C.set_cpu_isa(fusedclip._ext._C.cpu_isa()[0])
    for a, b in zip(*results):
        assert_bit_identical(a.grad, b.grad)
    check_against_reference(results[0], orig, 0.01, 1e-3, 2.0)


def test_version_counters():
    """A gradient with a clipped unit gets a new version (as an in-place op gives it); the others keep theirs."""
    params = make_pairs([(4, 8), (4, 8)], torch.float32, 2.0, seed=61)
    params[1].grad.mul_(1e-6)  # every unit far under its threshold
    before = [q.grad._version for q in params]
    fusedclip.clip_agc_(params, 0.01)
    assert params[0].grad._version > before[0] and params[1].grad._version == before[1]


def test_bad_input_raises_and_changes_nothing():
    params = make_pairs([(4, 8), (6,)], torch.float32, 2.0, seed=71)
    orig = clone(params)
    cases = [
        (TypeError, "must be Tensors", dict(parameters=params + [3])),
        (TypeError, "clip_factor must be a number", dict(parameters=params, clip_factor="x")),
        (ValueError, "must not be NaN", dict(parameters=params, clip_factor=float("nan"))),
        (ValueError, "norm_type must not be NaN", dict(parameters=params, norm_type=float("nan"))),
        (ValueError, "unknown backend", dict(parameters=params, backend="nope")),
    ]
    sparse = torch.nn.Parameter(torch.zeros(3, 3))
    sparse.grad = torch.eye(3).to_sparse()
    cases.append((NotImplementedError, "only dense", dict(parameters=params + [sparse])))
    for exc, match, kwargs in cases:
        with pytest.raises(exc, match=match):
            fusedclip.clip_agc_(**kwargs)
        for q, q0 in zip(params, orig):
            assert_bit_identical(q.grad, q0.grad)
    w, g = [q.detach() for q in params], [q.grad for q in params]
    with pytest.raises(ValueError, match="shape"):  # the op's own checks (the Python layer makes these first)
        torch.ops.fusedclip.agc_(w, [g[0], g[1][:5]], 0.01, 1e-3, 2.0)
    with pytest.raises(TypeError, match="dtype|Float|Double"):
        torch.ops.fusedclip.agc_(w, [g[0], g[1].double()], 0.01, 1e-3, 2.0)
    with pytest.raises(ValueError, match="empty"):
        torch.ops.fusedclip.agc_([torch.zeros(0)], [torch.zeros(0)], 0.01, 1e-3, 2.0)
    for q, q0 in zip(params, orig):
        assert_bit_identical(q.grad, q0.grad)


def test_opcheck():
    """The op's schema (grads mutated, weights not), its fake implementation and AOT dispatch."""
    params = make_pairs([(4, 8), (6,), (2, 16390)], torch.float32, 2.0, seed=82)
    torch.library.opcheck(torch.ops.fusedclip.agc_.default,
                          ([p.detach() for p in params], [p.grad for p in params], 0.01, 1e-3, 2.0))


def test_torch_compile_traces_it():
    params = make_pairs([(8, 16), (16,)], torch.float32, 2.0, seed=81)
    orig = clone(params)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(ps):
        fusedclip.clip_agc_(ps, 0.01)

    step(params)
    check_against_reference(params, orig, 0.01, 1e-3, 2.0)


@needs_timm
def test_patch_routes_timm():
    timm_utils = pytest.importorskip("timm.utils")
    import timm.utils.clip_grad

    originals = (agc_module.adaptive_clip_grad, timm_utils.adaptive_clip_grad, timm.utils.clip_grad.adaptive_clip_grad)
    params = make_pairs([(6, 9), (9,)], torch.float32, 2.0, seed=91)
    calls = []
    real = fusedclip.agc.clip_agc_

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    orig = clone(params)
    mp = pytest.MonkeyPatch()
    mp.setattr(fusedclip.agc, "clip_agc_", spy)
    try:
        with fusedclip.patched():
            timm_utils.dispatch_clip_grad(params, 0.01, mode="agc")
            timm_utils.adaptive_clip_grad(params, 0.01)  # a second call: units already clipped stay put
            agc_module.adaptive_clip_grad(iter(params), clip_factor=0.01, eps=1e-3, norm_type=2.0)
    finally:
        mp.undo()
    assert len(calls) == 3
    assert (agc_module.adaptive_clip_grad, timm_utils.adaptive_clip_grad,
            timm.utils.clip_grad.adaptive_clip_grad) == originals
    check_against_reference(params, orig, 0.01, 1e-3, 2.0)


# ---- the Triton backend's own AGC kernel on CPU tensors: under TRITON_INTERPRET=1 (`make test-triton-interpret`,
# part of `make test`; the variable must be set before Triton is imported, so a pytest process of its own) ----

@pytest.mark.skipif("triton" not in fusedclip.available_backends("cpu"),
                    reason="the Triton backend runs CPU tensors under TRITON_INTERPRET=1 only (`make test-triton-interpret`)")
def test_triton_backend_agc_kernel_in_the_interpreter(monkeypatch):
    from fusedclip.backends.triton import agc as triton_agc
    assert fusedclip.backends.BACKENDS["triton"].agc is not None  # its own kernel, not the torch fallback
    calls = []
    real = triton_agc._launch_group
    monkeypatch.setattr(triton_agc, "_launch_group", lambda *a: (calls.append(1), real(*a))[1])
    for dtype, p in [(torch.float32, 2.0), (torch.bfloat16, INF), (torch.float64, 2.0), (torch.float16, 1.0)]:
        params = make_pairs(SHAPES, dtype, p, seed=100 + DTYPES.index(dtype))
        orig = clone(params)
        fusedclip.clip_agc_(params, 0.01, 1e-3, p, backend="triton")
        check_against_reference(params, orig, 0.01, 1e-3, p)
    assert len(calls) == 4, calls


def test_triton_kernel_compiles_for_sm90():
    """Without a GPU: the kernel the launcher would launch on CUDA tensors, compiled for sm_90 by the installed
    Triton (tools/triton_static.py's binder path), for fp32 and fp64 accumulation: no spills."""
    triton = pytest.importorskip("triton")
    from fusedclip.backends.triton import kernels as tk, launcher as tlauncher

    if tlauncher.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1: interpreted, not compiled")
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 6):
        pytest.skip(f"tools/triton_static.py is written for the compile internals of Triton 3.6 and 3.8; this "
                    f"is Triton {triton.__version__}")
    from fusedclip.backends.triton import agc as triton_agc

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import triton_static as ts

    mp = pytest.MonkeyPatch()
    mp.setattr(tlauncher, "_sm_count", lambda device: 132)
    try:
        for dtype in (torch.float32, torch.float64):
            params = make_pairs([(6, 50), (3000,), (4, 2000)], dtype, 2.0, seed=1)
            (launch,) = ts.record_launches(lambda: triton_agc.agc([q.detach() for q in params],
                                                                  [q.grad for q in params], 0.01, 1e-3, 2.0))
            kernel, args, constexprs = launch
            regs, stack, local = ts.resources(ts.compile_for(kernel, args, constexprs, dict(num_warps=tk.NUM_WARPS)))
            assert stack == local == 0 and regs <= 255, (dtype, regs, stack, local)
    finally:
        mp.undo()


# ---- CUDA ----

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="no GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [2.0, INF, 1.0], ids=str)
def test_cuda_parity(dtype, p):
    # warps (cached, streamed: 8 and 1000 elements a unit), blocks (cached, streamed: 3000 and 200000), many units
    shapes = SHAPES + [(50000, 8), (700, 1000), (5, 3000), (3, 200000), (4096, 4096)]
    params = make_pairs(shapes, dtype, p, seed=200 + DTYPES.index(dtype), device="cuda")
    orig = clone(params)
    fusedclip.clip_agc_(params, 0.01, 1e-3, p, backend="native")
    torch.cuda.synchronize()
    check_against_reference(params, orig, 0.01, 1e-3, p)
    check_against_timm(params, orig, 0.01, 1e-3, p)
    again = clone(orig)
    fusedclip.clip_agc_(again, 0.01, 1e-3, p, backend="native")
    for a, b in zip(params, again):
        assert_bit_identical(a.grad, b.grad)  # deterministic


def test_triton_agc_refuses_a_cuda_graph_capture(monkeypatch):
    """backend='triton' copies its table from the host on every call: under a CUDA-graph capture it raises a
    clear error before anything is done (it used to fail inside the capture with CUDA's own error). The capture
    is simulated (no GPU here): the check is the launcher's own."""
    triton_agc = pytest.importorskip("fusedclip.backends.triton.agc")
    w = [torch.randn(64, 32), torch.randn(7)]
    g = [torch.randn(64, 32) * 10, torch.randn(7) * 10]
    before = [x.clone() for x in g]
    launched = []
    monkeypatch.setattr(triton_agc.launcher, "_launch", lambda *a, **k: launched.append(a))
    monkeypatch.setattr(triton_agc.launcher, "INTERPRET", True)  # CPU tensors: the interpreter's sizing, no device query
    monkeypatch.setattr(triton_agc, "_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        triton_agc.agc(w, g, 0.01, 1e-3, 2.0)
    assert not launched and all(torch.equal(a, b) for a, b in zip(g, before))
    monkeypatch.setattr(triton_agc, "_capturing", lambda device: False)
    triton_agc.agc(w, g, 0.01, 1e-3, 2.0)
    assert launched, "outside a capture the launcher runs"
