"""The Triton backend (fusedclip/backends/triton/) on the native backend's parity cases.

Without a GPU the kernels run in Triton's interpreter on CPU tensors. TRITON_INTERPRET=1 must be set before
Triton is imported, so the interpreted run is a pytest process of its own: `make test-triton-interpret` (part of
`make test`) runs this module and the "triton" cases of the other modules under it. A process with neither a GPU
nor the interpreter skips this module, saying so. With a GPU the cases run the compiled kernels on CUDA tensors,
and the gpu-marked tests check one launch against two, CUDA-graph replay, two streams and that the first launch
ends.
"""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

import fusedclip  # noqa: E402
from fusedclip.backends.triton import backend as tbackend, clip as tclip, launcher as tlauncher  # noqa: E402

from fusedclip.testing import (DTYPE_SETS, NORMS, SHAPES, assert_bit_identical,  # noqa: E402
                               check_against_reference, clip_parity_case, clone_params, grads_of, low_precision_tol,
                               make_params, no_write_case, ref_norm, rel_err)
from fusedclip.testing import params_with as _params_with  # noqa: E402

pytestmark = pytest.mark.skipif(not (tlauncher.INTERPRET or torch.cuda.is_available()),
                                reason="the Triton kernels run on a GPU or under TRITON_INTERPRET=1 (on CPU: "
                                       "`make test-triton-interpret`, part of `make test`)")

DEVICE = "cpu" if tlauncher.INTERPRET else "cuda"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or tlauncher.INTERPRET,
                               reason="needs a CUDA GPU and the compiled Triton kernels")

LAUNCHES = ["one", "two"]


def test_availability_here():
    if tlauncher.INTERPRET:
        assert tbackend.TritonBackend.available("cpu") == (True, "")
        ok, why = tbackend.TritonBackend.available("cuda")
        assert not ok and "TRITON_INTERPRET" in why
        assert "triton" in fusedclip.available_backends("cpu")
        assert not tlauncher.one_launch()  # the interpreter's default: two launches
    else:
        assert tbackend.TritonBackend.available("cuda") == (True, "")
        assert tlauncher.one_launch()
    assert fusedclip.backends.AUTO_ORDER.index("triton") < fusedclip.backends.AUTO_ORDER.index("torch")
    with pytest.raises(ValueError, match="'auto', 'one' or 'two'"):
        tlauncher.one_launch("three")


def test_unavailable_for_cpu_without_the_interpreter():
    """In a fresh process without TRITON_INTERPRET, CPU is not offered, and asking for it says why."""
    code = textwrap.dedent("""
        import torch, fusedclip
        assert "triton" not in fusedclip.available_backends("cpu")
        try:
            fusedclip.clip_([torch.nn.Parameter(torch.ones(3))], 1.0, backend="triton")
        except RuntimeError as e:
            print(e)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "'triton' is not available for cpu tensors" in out.stdout
    assert "TRITON_INTERPRET=1" in out.stdout


@pytest.mark.parametrize("how", ["schema-error", "module-missing"])
def test_a_triton_that_fails_to_load_disables_the_backend_whole(how):
    """A Triton the kernels cannot use never breaks `import fusedclip` (torch 2.6 raised a ValueError from
    custom_op's schema inference, which no ImportError guard caught): the backend is not registered at all (no
    half-built one whose ZClip or AGC fails later), asking for it names the reason, the rest works."""
    breakage = {
        # what torch 2.6 did with a list[Tensor] annotation (only for the Triton backend's ops: torch has some too)
        "schema-error": "orig = torch.library.custom_op; torch.library.custom_op = lambda name, *a, **k: "
                        "(_ for _ in ()).throw(ValueError('infer_schema')) if name.startswith('fusedclip_triton') "
                        "else orig(name, *a, **k)",
        # one of the three modules missing
        "module-missing": "sys.modules['fusedclip.backends.triton.agc'] = None",
    }[how]
    code = textwrap.dedent(f"""
        import sys, torch
        {breakage}
        import fusedclip
        from fusedclip import backends
        assert "triton" not in backends.BACKENDS and "triton" not in backends.AUTO_ORDER
        print("reason:", backends.UNAVAILABLE["triton"])
        for call in (lambda: fusedclip.clip_([torch.nn.Parameter(torch.ones(3))], 1.0, backend="triton"),
                     lambda: fusedclip.ZClip(backend="triton")):
            try:
                call()
                raise SystemExit("no error")
            except RuntimeError as e:
                print("error:", e)
        p = torch.nn.Parameter(torch.ones(4)); p.grad = torch.full((4,), 3.0)
        print("norm:", float(fusedclip.clip_([p], 1.0)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "reason: its kernels failed to load with Triton" in out.stdout, out.stdout
    assert out.stdout.count("error: fusedclip") == 2 and "is not available here" in out.stdout, out.stdout
    assert "norm: 6.0" in out.stdout


@pytest.mark.parametrize("dtypes", list(DTYPE_SETS), ids=str)
@pytest.mark.parametrize("p", NORMS, ids=str)
@pytest.mark.parametrize("clipping", [True, False], ids=["clipping", "not-clipping"])
def test_clip_parity(dtypes, p, clipping):
    clip_parity_case(DEVICE, "triton", dtypes, p, clipping)


@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize("p", [2.0, math.inf, -math.inf, 1.0, 3.0, 0.5, -2.0], ids=str)
def test_total_norm(launch, p):
    tensors = grads_of(make_params(SHAPES, [torch.float32, torch.float64], device=DEVICE, seed=3))
    norm = tclip.total_norm(tensors, p, launch=launch)
    assert norm.dtype == torch.float64 and norm.shape == ()
    assert rel_err(norm, ref_norm(tensors, p)) <= 1e-12
    public = fusedclip.get_total_norm(tensors, p, backend="triton")
    nonempty = [t for t in tensors if t.numel() > 0]
    torch.testing.assert_close(public, torch.nn.utils.get_total_norm(nonempty, p), rtol=1e-5, atol=0)
    # fp32 tensors only: fp32 accumulation
    fp32 = [t.float() for t in tensors]
    assert tclip.total_norm(fp32, p, launch=launch).dtype == torch.float32
    assert rel_err(tclip.total_norm(fp32, p, launch=launch), ref_norm(fp32, p)) <= 2e-6


@pytest.mark.parametrize("dtypes", [[torch.float32, torch.bfloat16, torch.float16], [torch.bfloat16]], ids=str)
def test_norm_accumulated_in_fp32_across_low_precision_tensors(dtypes):
    tensors = grads_of(make_params([(1000 + 37 * i,) for i in range(60)], dtypes, device=DEVICE, seed=5,
                                   noncontig=False))
    ref = ref_norm(tensors, 2)
    ours = tclip.total_norm(tensors, 2.0)
    assert ours.dtype == torch.float32 and rel_err(ours, ref) < 2e-6
    torch_err = rel_err(torch.nn.utils.get_total_norm(tensors), ref)
    assert rel_err(fusedclip.get_total_norm(tensors, backend="triton").float(), ref) <= max(torch_err, 2e-6)


def test_bf16_grads_scaled_by_fp32_coef():
    params = make_params([(50000,), (333, 77)], [torch.bfloat16], device=DEVICE, seed=8, noncontig=False)
    orig = clone_params(params)
    fusedclip.clip_(params, 0.7, backend="triton")
    norm32 = ref_norm(grads_of(orig), 2).float()
    coef32 = torch.clamp(torch.tensor(0.7, dtype=torch.float32) / (norm32 + 1e-6), max=1.0)
    for q, q0 in zip(params, orig):
        expected = (q0.grad.float().cpu() * coef32).to(torch.bfloat16)
        assert (q.grad.cpu() != expected).float().mean().item() < 1e-3
        torch.testing.assert_close(q.grad.cpu(), expected, rtol=8e-3, atol=0)


@pytest.mark.parametrize("p", [2.0, math.inf, -math.inf, 1.0, 3.0], ids=str)
def test_empty_tensors(p):
    params = make_params([(0,), (0, 3)], [torch.float32], device=DEVICE)
    norm = fusedclip.clip_(params, 1.0, p, backend="triton")
    assert float(norm) == 0.0 and norm.dtype == torch.float32
    params = make_params([(0,), (9, 4), (0, 3), (11,)], [torch.float32], device=DEVICE, seed=2)
    orig = clone_params(params)
    norm = fusedclip.clip_(params, 0.5, p, backend="triton")
    check_against_reference(params, orig, norm, 0.5, p)


@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize("p", [2.0, math.inf, 1.0], ids=str)
def test_no_write_when_coef_is_one(launch, p):
    no_write_case(DEVICE, lambda params, max_norm, q: tclip.clip(grads_of(params), max_norm, q, launch=launch), p)


@pytest.mark.parametrize("p", [2.0, math.inf, -math.inf, 3.0], ids=str)
@pytest.mark.parametrize("clipping", [True, False], ids=["clipping", "not-clipping"])
def test_one_launch_equals_two_launches_bitwise(p, clipping):
    """Partials are per chunk and combined in a fixed order, so the number of programs and launches does not
    change a bit; repeated runs are identical too (determinism). The barrier counters end at zero."""
    params = make_params([(40000,), (1234, 77), (5,), (0,), (3, 16390)], [torch.float32, torch.bfloat16,
                                                                            torch.float16], device=DEVICE, seed=9)
    max_norm = float(ref_norm(grads_of(params), p)) * (0.5 if clipping else 2.0)
    results = []
    for launch in ("one", "two", "one", "two"):
        q = clone_params(params)
        results.append((tclip.clip(grads_of(q), max_norm, p, launch=launch), grads_of(q)))
    for norm, grads in results[1:]:
        assert_bit_identical(norm, results[0][0])
        for a, b in zip(grads, results[0][1]):
            assert_bit_identical(a, b)
    if clipping:
        assert not torch.equal(results[0][1][0], grads_of(params)[0])
    ws = tlauncher._WORKSPACES.get(torch.device(DEVICE) if DEVICE == "cpu" else torch.device("cuda", 0))
    assert ws.tolist() == [0, 0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=str)
@pytest.mark.parametrize("p", [2.0, math.inf, -math.inf, 1.0], ids=str)
def test_nonfinite_scales_like_torch(bad, p):
    params = make_params([(50,), (6, 7), (20000,)], [torch.float32, torch.bfloat16], device=DEVICE, seed=6)
    params[1].grad[2, 3] = bad
    theirs = clone_params(params)
    norm = fusedclip.clip_(params, 1.0, p, backend="triton")
    torch_norm = torch.nn.utils.clip_grad_norm_(theirs, 1.0, p)
    torch.testing.assert_close(norm, torch_norm, equal_nan=True)
    for a, b in zip(params, theirs):
        torch.testing.assert_close(a.grad, b.grad, equal_nan=True, rtol=1.6e-2, atol=1e-5)


def test_nan_anywhere_gives_nan_for_inf_norms():
    """max|x| and min|x| propagate a NaN wherever it sits (first, middle or last lane of a block or chunk)."""
    for pos in (0, 1, 4095, 4096, 16383, 16384, 20000 - 1):
        g = torch.randn(20000, device=DEVICE)
        g[pos] = float("nan")
        for p in (math.inf, -math.inf):
            assert math.isnan(float(tclip.total_norm([g], p))), (pos, p)


def test_max_norm_zero_and_negative():
    for max_norm in (0.0, -1.0):
        params = make_params([(100,), (7, 3)], [torch.float32], device=DEVICE, seed=4)
        theirs = clone_params(params)
        norm = fusedclip.clip_(params, max_norm, backend="triton")
        torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(theirs, max_norm))
        for a, b in zip(params, theirs):
            torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("norm_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_clip_grads_with_norm(norm_dtype):
    params = make_params(SHAPES, [torch.float32, torch.float16], device=DEVICE, seed=15)
    theirs = clone_params(params)
    total = (ref_norm(grads_of(params), 2) * 1.7).to(device=DEVICE, dtype=norm_dtype)
    assert fusedclip.clip_grads_with_norm_(params, 1.0, total, backend="triton") is None
    torch.nn.utils.clip_grads_with_norm_(theirs, 1.0, total)
    for a, b in zip(params, theirs):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=2e-3, atol=1e-5)
    orig = clone_params(params)
    fusedclip.clip_grads_with_norm_(params, 1e9, total, backend="triton")
    for a, b in zip(params, orig):
        if b.grad is not None:
            assert_bit_identical(a.grad, b.grad)
    with pytest.raises(ValueError, match="one-element tensor"):
        tclip.scale(grads_of(params), 1.0, torch.ones(2, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("clip_value", [0.5, 0.0, -0.3])
def test_clip_value_bitwise_like_torch(dtype, clip_value):
    params = make_params(SHAPES, [dtype], device=DEVICE, seed=16)
    params[3].grad[1, 1] = float("nan")
    params[4].grad[0, 0] = -float("inf")
    theirs = clone_params(params)
    assert fusedclip.clip_value_(params, clip_value, backend="triton") is None
    torch.nn.utils.clip_grad_value_(theirs, clip_value)
    for a, b in zip(params, theirs):
        if b.grad is not None:
            assert_bit_identical(a.grad, b.grad)


def test_many_tensors_and_unaligned_views():
    """A hundred-odd tensors in one launch, some of them views at odd offsets (no 16-byte alignment)."""
    g = torch.Generator().manual_seed(11)
    shapes = [(int(n),) for n in torch.randint(1, 3000, (120,), generator=g)]
    params = make_params(shapes, [torch.float32, torch.bfloat16, torch.float16], device=DEVICE, seed=12)
    flat = torch.randn(40001, device=DEVICE)
    odd = torch.nn.Parameter(torch.zeros(20000, device=DEVICE))
    odd.grad = flat[1:20001]  # a view 4 bytes past an aligned start
    params.append(odd)
    orig = clone_params(params)
    norm = fusedclip.clip_(params, 1.0, backend="triton")
    check_against_reference(params, orig, norm, 1.0, 2.0)
    assert torch.equal(flat[1:20001], odd.grad)  # scaled in place in the view


def test_bad_input_raises_before_writing():
    params = make_params([(10,), (4, 4)], [torch.float32], device=DEVICE, seed=19)
    orig = clone_params(params)
    sparse = torch.nn.Parameter(torch.zeros(5, 3, device=DEVICE))
    sparse.grad = torch.randn(5, 3, device=DEVICE).to_sparse()
    with pytest.raises(NotImplementedError, match="sparse|only dense"):
        fusedclip.clip_(params + [sparse], 1e-3, backend="triton")
    cplx = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64, device=DEVICE))
    cplx.grad = torch.randn(3, dtype=torch.complex64, device=DEVICE)
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        fusedclip.clip_(params + [cplx], 1e-3, backend="triton")
    with pytest.raises(ValueError, match="NaN"):
        tclip.clip(grads_of(params), 1.0, float("nan"))
    for a, b in zip(params, orig):
        assert_bit_identical(a.grad, b.grad)


def test_opcheck():
    ops = torch.ops.fusedclip_triton

    def sample():
        return grads_of(make_params([(7,), (33, 5), (0,), (20000,)], [torch.float32, torch.bfloat16],
                                    device=DEVICE, seed=30, noncontig=False))

    # The optional tensors are passed as None: the Triton ops declare no defaults (fusedclip/backends/triton/clip.py).
    torch.library.opcheck(ops.total_norm.default, (sample(), 2.0, None))
    torch.library.opcheck(ops.clip_.default, (sample(), 0.5, 2.0, None, None, None))
    torch.library.opcheck(ops.clip_.default, (sample(), 0.5, float("inf"), None, None, None))
    # the extras: per_tensor and found_inf written, inv_scale read
    torch.library.opcheck(ops.total_norm.default, (sample(), 2.0, torch.randn(4, device=DEVICE)))
    torch.library.opcheck(ops.clip_.default, (sample(), 0.5, 2.0, torch.randn(4, device=DEVICE),
                                              torch.tensor(0.37, device=DEVICE), torch.zeros((), device=DEVICE)))
    torch.library.opcheck(ops.scale_.default, (sample(), 1.0, torch.tensor(123.0, device=DEVICE)))
    torch.library.opcheck(ops.clamp_.default, (sample(), 0.1))


def _train_step(params, lr, per_tensor=False):
    result = fusedclip.clip_(params, 1.0, backend="triton", per_tensor=per_tensor)
    with torch.no_grad():
        for p in params:
            p.sub_(lr * p.grad)
    return result


@pytest.mark.parametrize("per_tensor", [False, True], ids=["total", "per-tensor"])
def test_compile_fullgraph_matches_eager(per_tensor):
    torch._dynamo.reset()
    params = make_params([(64, 32), (32,), (10, 64), (10,)], [torch.float32], device=DEVICE, seed=31,
                         noncontig=False)
    for p in params:
        p.data.normal_()
    eager = clone_params(params)
    compiled = torch.compile(_train_step, fullgraph=True)
    for step in range(2):
        for a, b in zip(params, eager):
            a.grad = torch.randn_like(a) * (step + 1)
            b.grad = a.grad.clone()
        ours, ref = compiled(params, 0.1, per_tensor), _train_step(eager, 0.1, per_tensor)
        if per_tensor:
            assert_bit_identical(ours[1], ref[1])
            assert ref[1].shape == (4,) and rel_err(torch.linalg.vector_norm(ref[1]), ref[0]) < 2e-6
            ours, ref = ours[0], ref[0]
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
        for a, b in zip(params, eager):
            assert_bit_identical(a.detach(), b.detach())
            assert_bit_identical(a.grad, b.grad)


# ---- the fused extras: per-tensor norms and AMP's unscale in the kernels' own pass ----

# several chunks per tensor, chunk tails, empty tensors between non-empty ones, a 0-dim one
EXTRAS_SHAPES = [(40000,), (0,), (33, 129), (7,), (), (2, 16384 + 5), (0, 3), (300,)]


def _acc(grads):
    return torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32


@pytest.mark.parametrize("dtypes, p", [("mixed", 2.0), ("mixed64", 2.0), ("mixed", math.inf),
                                       ("mixed64", -math.inf), ("mixed", 3.0), ("mixed64", 1.0)], ids=str)
def test_per_tensor_norms(dtypes, p):
    """Each tensor's norm from its own chunks' partials: against the float64 reference, torch and the native
    backend; the same bits from one launch and from two; asking for them changes neither the total nor the
    grads."""
    grads0 = grads_of(make_params(EXTRAS_SHAPES, DTYPE_SETS[dtypes], device=DEVICE, seed=70))
    acc = _acc(grads0)
    max_norm = 0.5 * float(ref_norm(grads0, p))
    runs = []
    for launch in LAUNCHES:
        grads = [g.clone() for g in grads0]
        norms = torch.randn(len(grads), dtype=acc, device=DEVICE)  # every entry must be written
        runs.append((tclip.clip(grads, max_norm, p, per_tensor=norms, launch=launch), norms, grads))
    for total, norms, grads in runs[1:]:
        assert_bit_identical(total, runs[0][0])
        assert_bit_identical(norms, runs[0][1])
    plain = [g.clone() for g in grads0]
    assert_bit_identical(tclip.clip(plain, max_norm, p), runs[0][0])
    for a, b in zip(runs[0][2], plain):
        assert_bit_identical(a, b)

    norms = runs[0][1]
    tol = 1e-12 if acc == torch.float64 else 2e-6
    for n, g in zip(norms.tolist(), grads0):
        ref = float(torch.linalg.vector_norm(g.double().cpu(), p)) if g.numel() else 0.0
        assert (n == 0.0) if ref == 0.0 else rel_err(n, ref) <= tol, (n, ref, g.shape)
    nonempty = [i for i, g in enumerate(grads0) if g.numel()]
    theirs = torch.stack([torch.linalg.vector_norm(grads0[i], p, dtype=acc) for i in nonempty])
    torch.testing.assert_close(norms[nonempty], theirs, rtol=1e-5, atol=0)
    _, native = fusedclip.get_total_norm(grads0, p, per_tensor=True, backend="native")
    torch.testing.assert_close(norms, native, rtol=tol, atol=0)


@pytest.mark.parametrize("launch", LAUNCHES)
def test_per_tensor_empty_and_single(launch):
    """Only empty tensors: every norm 0 (whatever the norm type; -inf's identity is inf). One tensor: its norm
    is the total, bit for bit (the same reduction over the same partials)."""
    empty = [torch.randn(0, device=DEVICE), torch.randn(0, 3, device=DEVICE, dtype=torch.float64)]
    for p in (2.0, -math.inf):
        norms = torch.randn(2, dtype=torch.float64, device=DEVICE)
        assert float(tclip.clip(empty, 1.0, p, per_tensor=norms, launch=launch)) == 0.0
        assert norms.tolist() == [0.0, 0.0]
    g = [torch.randn(50000, device=DEVICE) * 3]
    for p in (2.0, -math.inf):
        norms = torch.randn(1, device=DEVICE)
        total = tclip.total_norm(g, p, per_tensor=norms, launch=launch)
        assert_bit_identical(norms[0], total)
        assert rel_err(total, ref_norm(g, p)) <= 2e-6


def _unscaled_clip_expected(grads0, inv, max_norm, norm):
    """What the fused pass writes: grad * (inv_scale * coef), the factor in the accumulation dtype from the
    returned norm (in that dtype for these grads), rounded once to the grad's dtype."""
    acc = _acc(grads0)
    coef = torch.clamp(torch.tensor(max_norm, dtype=acc, device=DEVICE) / (norm + 1e-6), max=1.0)
    factor = inv.to(acc) * coef
    return [(g.to(acc) * factor).to(g.dtype) for g in grads0]


@pytest.mark.parametrize("dtypes", [[torch.float32], [torch.bfloat16, torch.float32],
                                    [torch.float32, torch.float64, torch.bfloat16]], ids=str)
@pytest.mark.parametrize("clipping", [True, False], ids=["clipping", "not-clipping"])
def test_amp_unscale_in_the_same_pass(dtypes, clipping):
    """With inv_scale: the norm is the unscaled grads' (float64 reference, torch's unscale + clip), the grads
    are written once as grad * (inv_scale * coef), found_inf stays 0 on finite grads; one launch = two."""
    grads0 = grads_of(make_params(EXTRAS_SHAPES, dtypes, device=DEVICE, seed=71, scale=3000.0))
    inv = torch.tensor(1 / 3000.0, device=DEVICE)  # not a power of two: rounding matters
    ref = float(ref_norm([g.double() * float(inv) for g in grads0], 2))
    max_norm = ref * (0.5 if clipping else 2.0)
    runs = []
    for launch in LAUNCHES:
        grads, found = [g.clone() for g in grads0], torch.zeros((), device=DEVICE)
        runs.append((tclip.clip(grads, max_norm, 2.0, inv_scale=inv, found_inf=found, launch=launch), grads, found))
    for norm, grads, found in runs[1:]:
        assert_bit_identical(norm, runs[0][0])
        for a, b in zip(grads, runs[0][1]):
            assert_bit_identical(a, b)
    norm, grads, found = runs[0]
    assert float(found) == 0.0 and norm.dtype == _acc(grads0)
    assert rel_err(norm, ref) <= (1e-12 if norm.dtype == torch.float64 else 2e-6)
    for a, e in zip(grads, _unscaled_clip_expected(grads0, inv, max_norm, norm)):
        assert_bit_identical(a, e)
    # torch: unscale in place, then clip (two roundings: compare at the dtype's tolerance)
    theirs, their_found = [g.clone() for g in grads0], torch.zeros((), device=DEVICE)
    torch._amp_foreach_non_finite_check_and_unscale_(theirs, their_found, inv)
    torch_norm = torch.nn.utils.clip_grad_norm_(_params_with(theirs), max_norm)
    assert float(their_found) == 0.0
    # torch rounds unscaled bf16 grads to bf16 before its norm (the fused pass keeps them in fp32), and its coef
    # carries that error into every grad: compare at the loosest dtype's tolerance
    rtol, atol = low_precision_tol(dtypes)
    torch.testing.assert_close(norm, torch_norm.to(norm.dtype), rtol=max(rtol, 1e-5), atol=0)
    for a, b in zip(grads, theirs):
        torch.testing.assert_close(a, b, rtol=2 * max(rtol, 1e-5), atol=atol)
    # coef 1 and inv_scale 1: nothing written
    same = [g.clone() for g in grads0]
    tclip.clip(same, 1e30, 2.0, inv_scale=torch.ones((), device=DEVICE), found_inf=torch.zeros((), device=DEVICE))
    for a, b in zip(same, grads0):
        assert_bit_identical(a, b)


@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan")], ids=str)
@pytest.mark.parametrize("p, where", [(2.0, 0), (-math.inf, 0), (-math.inf, -1)],
                         ids=["2.0-full-block", "-inf-full-block", "-inf-chunk-tail"])
def test_amp_found_inf(bad, p, where):
    """An inf/NaN in an unmasked block or in a chunk's masked tail sets found_inf, also for -inf, whose norm
    stays finite; norm and grads as after torch's unscale + clip."""
    grads0 = grads_of(make_params([(40000,), (300,), (5, 7)], [torch.float32, torch.bfloat16], device=DEVICE,
                                  seed=72, scale=500.0))
    grads0[0][where] = bad
    inv = torch.tensor(1 / 500.0, device=DEVICE)
    theirs, their_found = [g.clone() for g in grads0], torch.zeros((), device=DEVICE)
    torch._amp_foreach_non_finite_check_and_unscale_(theirs, their_found, inv)
    torch_norm = torch.nn.utils.clip_grad_norm_(_params_with(theirs), 1.0, p)
    assert float(their_found) == 1.0
    for launch in LAUNCHES:
        grads, found = [g.clone() for g in grads0], torch.zeros((), device=DEVICE)
        norm = tclip.clip(grads, 1.0, p, inv_scale=inv, found_inf=found, launch=launch)
        assert float(found) == 1.0, launch
        torch.testing.assert_close(norm, torch_norm, rtol=1e-5, atol=0, equal_nan=True)
        for a, b in zip(grads, theirs):
            torch.testing.assert_close(a, b, rtol=1.6e-2, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("launch", LAUNCHES)
def test_amp_found_inf_is_only_ever_set(launch):
    """Finite values whose norm overflows do not count as inf (torch's check does not either); a found_inf
    already 1 (from another device or optimizer) stays 1: the kernel never clears it."""
    huge = [torch.randn(20000, device=DEVICE) * 1e30, torch.randn(70, device=DEVICE)]
    found = torch.zeros((), device=DEVICE)
    norm = tclip.clip([g.clone() for g in huge], 1.0, 2.0, inv_scale=torch.ones((), device=DEVICE), found_inf=found,
                      launch=launch)
    their_found = torch.zeros((), device=DEVICE)
    torch._amp_foreach_non_finite_check_and_unscale_([g.clone() for g in huge], their_found,
                                                     torch.ones((), device=DEVICE))
    assert math.isinf(float(norm)) and float(found) == 0.0 == float(their_found)
    found = torch.ones((), device=DEVICE)
    tclip.clip([torch.randn(300, device=DEVICE)], 1.0, 2.0, inv_scale=torch.tensor(0.5, device=DEVICE),
               found_inf=found, launch=launch)
    assert float(found) == 1.0


@pytest.mark.parametrize("bad", [None, float("inf")], ids=["finite", "inf"])
def test_unscale_clip_is_one_fused_pass(monkeypatch, bad):
    """fusedclip.unscale_clip_ on this backend: the fused kernels only (one launch, or the two-launch pair),
    never torch's separate unscale; the scaler then skips the step on inf and lowers the scale, as after
    scaler.unscale_ + clip_grad_norm_."""
    def setup():
        torch.manual_seed(73)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8)).to(DEVICE)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler(DEVICE, init_scale=3000.0, growth_interval=1)
        x = torch.randn(16, 32, device=DEVICE)
        scaler.scale(model(x).square().mean() * 100).backward()
        if bad is not None:
            model[2].weight.grad[3, 4] = bad
        return model, opt, scaler

    (model_a, opt_a, scaler_a), (model_b, opt_b, scaler_b) = setup(), setup()
    scaler_b.unscale_(opt_b)
    norm_b = torch.nn.utils.clip_grad_norm_(model_b.parameters(), 0.5)

    launched = []
    real_launch = tlauncher._launch
    monkeypatch.setattr(tlauncher, "_launch", lambda kernel, *a, **k: (launched.append(kernel.__name__),
                                                                       real_launch(kernel, *a, **k))[1])

    def unfused(*args, **kwargs):
        raise AssertionError("torch's separate unscale ran")

    monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_", unfused)
    norm_a = fusedclip.unscale_clip_(scaler_a, opt_a, 0.5, backend="triton")
    assert launched == (["_one_launch_kernel"] if tlauncher.one_launch() else ["_partials_kernel", "_finish_kernel"])
    monkeypatch.undo()

    torch.testing.assert_close(norm_a, norm_b, rtol=1e-5, atol=0, equal_nan=True)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, equal_nan=True)
    before = [p.detach().clone() for p in model_a.parameters()]
    for scaler, opt in ((scaler_a, opt_a), (scaler_b, opt_b)):
        scaler.step(opt)
        scaler.update()
    assert scaler_a.get_scale() == scaler_b.get_scale()
    assert (scaler_a.get_scale() < 3000.0) == (bad is not None)
    for p, q, b in zip(model_a.parameters(), model_b.parameters(), before):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
        assert torch.equal(p, b) == (bad is not None)  # skipped exactly when inf was seen


# ---- GPU only: the compiled one-launch kernel (graph replay, two streams, the first launch's guard: tests/gpu) ----

# every dtype set and norm kind scripts/triton_gpu_check.py's parity section had (now here once; tests/gpu has the rest)
@pytest.mark.parametrize("p", [2.0, math.inf, -math.inf, 1.0, 3.0], ids=str)
@pytest.mark.parametrize("dtypes", ["mixed", "mixed64", "fp16", "fp32", "bf16"])
@pytest.mark.parametrize("clipping", [True, False], ids=["clipping", "not-clipping"])
@pytest.mark.gpu
@needs_gpu
def test_gpu_one_launch_equals_two_launches(p, dtypes, clipping):
    params = make_params([(4096, 1024), (1024,), (3000, 77), (5,), (0,), (16385,)], DTYPE_SETS[dtypes],
                         device="cuda", seed=40)
    max_norm = float(ref_norm(grads_of(params), p)) * (0.5 if clipping else 2.0)
    a, b = clone_params(params), clone_params(params)
    na = tclip.clip(grads_of(a), max_norm, p, launch="one")
    nb = tclip.clip(grads_of(b), max_norm, p, launch="two")
    assert_bit_identical(na, nb)
    for x, y in zip(grads_of(a), grads_of(b)):
        assert_bit_identical(x, y)
    check_against_reference(a, params, na, max_norm, p)
    native = clone_params(params)
    torch.testing.assert_close(na, fusedclip.clip_(native, max_norm, p, backend="native"), rtol=1e-5, atol=0)
