"""Properties over every input (issue 22, part 3), with hypothesis: random lists of gradients (every float dtype
and mixes; 0-dim, empty, odd and > 64K-element shapes; permuted, strided, expanded (stride 0) and overlapping
views; None gradients, gradients on the meta device, sparse, complex and integer ones), every norm type and every
form of max_norm, for each public entry point. The property: fusedclip's result is torch's (within the documented
accuracy, both judged against a float64 reference where torch rounds), or fusedclip raises a clear Python exception
(naming fusedclip or the offending argument) and then no gradient's bits, identity or version counter changed.
Where torch raises, fusedclip raises; where torch succeeds, fusedclip succeeds, except for these deliberate,
documented differences (docs/usage.md "Semantics" and the docstrings), which the properties rely on:

D1 empty tensors work with every norm type (torch raises for inf, -inf and p < 0 on them);
D2 sparse gradients raise NotImplementedError and complex ones TypeError on the fused backends (docs/usage.md),
   for every norm type (norm_type 0 runs no kernel, and checked nothing until a fresh seed found it);
D3 the norm is accumulated in fp32 (fp64 with an fp64 gradient) and the coefficient computed in fp32, so a
   low-precision torch norm that rounds (or overflows) is not the reference: the float64 one is;
D4 with a coefficient of 1 nothing is written: the gradients keep their bits;
D5 overlapping views of one storage give undefined gradients (the norm is still defined);
D6 norm_type NaN raises ValueError (torch returns a NaN norm and makes every gradient NaN);
D7 backend="native" asked for tensors it has no kernel for (meta) raises RuntimeError saying so;
D8 clip_grads_with_norm_ also takes a number as total_norm (torch's clamp fails on a float);
T1 (torch's defect, not a difference to keep) torch.nn.utils.clip_grad_value_ fails on a list without gradients
   with an internal assertion ("Expected !nested_tensorlist[0].empty()"); fusedclip does nothing and returns None.
T2 (torch's defect) torch's fused CPU optimizers (fused=True) step non-contiguous gradients wrongly (torch 2.14),
   with or without grad_scale: clip_into_ is compared with clip-then-step on gradients of the same layout.
D9 clip_agc_ accepts norm_type 'fro' (= 2) for any shape (timm's tensor.norm takes it for 1-D and 2-D units only),
   and computes norms in fp32 for fp16/bf16 (timm in the low dtype), so near-threshold units may decide differently.
D10 clip_value_ with a bound beyond a gradient's dtype (1e30 for float16) clamps nothing there (the float64 clamp,
   rounded back); torch raises "value cannot be converted to type c10::Half without overflow";
D11 clip_value_ leaves a NaN element's bits as they were (torch's bfloat16 clamp on the CPU writes the NaN 0xFFFF):
   NaN equals NaN in the comparison, every other element is compared bit for bit.

K1 (a limitation, not fixed here: it is in the kernels) a huge finite norm_type (|p| >= 1e3, e.g. 1e30) overflows
   |x|^p in the fused kernels as in torch's multi-element norm, so the norm may be inf (or 0) where the float64
   reference (or torch, for a single element) is finite: for those p the norm must be the reference, torch's, or
   the overflow value, and the gradients follow the returned norm.

Every @settings has derandomize=True (reproducible in CI) and database=None (nothing written to the tree).
"""
import copy
import math
import os

import pytest

hypothesis = pytest.importorskip("hypothesis")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch.amp.grad_scaler import OptState  # noqa: E402

import fusedclip  # noqa: E402
from fusedclip.testing import TOL, bits, ref_norm, rel_err  # noqa: E402

try:
    from timm.utils.agc import adaptive_clip_grad as timm_agc
except ImportError:
    timm_agc = None
try:
    import zclip as zclip_pkg
except ImportError:
    zclip_pkg = None


# CI draws the same examples every run (derandomize: the seed comes from each test's source). To look further,
# FUSEDCLIP_PROPERTY_SEEDS=1 draws anew: pytest tests/test_properties.py --hypothesis-seed=N.
_DERANDOMIZE = not os.environ.get("FUSEDCLIP_PROPERTY_SEEDS")


def props(n):
    return settings(max_examples=n, deadline=None, derandomize=_DERANDOMIZE, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LOW = (torch.float16, torch.bfloat16)
# 0-dim, empty, odd, 2-D, > 64K elements (one shape of eight, so a few examples have one)
SHAPES = [(), (0,), (1,), (7,), (3, 5), (0, 4), (33, 129), (70001,)]
KINDS = ["dense"] * 6 + ["none", "transposed", "strided", "expanded", "overlap", "meta", "sparse", "complex", "int"]
PLAIN_KINDS = ["dense"] * 4 + ["none", "transposed", "strided"]
SPECIALS = [None] * 6 + ["zero", "nan", "inf", "-inf"]

grad_spec = st.tuples(st.sampled_from(KINDS), st.sampled_from(FLOATS), st.sampled_from(SHAPES),
                      st.sampled_from([0, -3, 3]), st.sampled_from(SPECIALS))
plain_spec = st.tuples(st.sampled_from(PLAIN_KINDS), st.sampled_from(FLOATS), st.sampled_from(SHAPES),
                       st.sampled_from([0, -3, 3]), st.sampled_from(SPECIALS))
grad_lists = st.lists(grad_spec, max_size=5)
plain_lists = st.lists(plain_spec, max_size=4)

NORM_TYPES = [2.0, 2, math.inf, -math.inf, 0, 0.0, 1.0, 3.0, 0.5, -2.0, math.nan, 1e30, -1e30,
              "inf", "-inf", "fro", "nuc", "bogus", None]
norm_types = st.sampled_from(NORM_TYPES)


def _max_norms():
    return st.sampled_from([1.0, 0.5, 0, 0.0, -1.0, math.nan, math.inf, -math.inf, 1e-30, 1e30, 3, True, False,
                            np.float32(0.25), np.float64(2.0), "x", None, "meta-tensor", "cpu-tensor",
                            "cpu-tensor64", "vector-tensor"])


max_norm_forms = _max_norms()


def make_max_norm(form):
    """The value behind a drawn max_norm form (tensors made fresh: hypothesis examples must be immutable)."""
    if form == "meta-tensor":
        return torch.tensor(0.5, device="meta")
    if form == "cpu-tensor":
        return torch.tensor(0.5)
    if form == "cpu-tensor64":
        return torch.tensor(0.75, dtype=torch.float64)
    if form == "vector-tensor":
        return torch.tensor([0.5, 0.5])
    return form


def build(specs, seed, as_param=False):
    """Leaf tensors with gradients as `specs` say; deterministic in (specs, seed), so two calls give two
    identical, independent lists (one for torch, one for fusedclip)."""
    g = torch.Generator().manual_seed(seed)
    out = []

    def leaf(value, grad):
        t = value.detach().clone()
        if as_param and (t.is_floating_point() or t.is_complex()):
            t = torch.nn.Parameter(t)
        if grad is not None:
            t.grad = grad
        out.append(t)

    for kind, dtype, shape, scale_exp, special in specs:
        v = torch.randn(shape, generator=g, dtype=torch.float64) * 10.0**scale_exp
        if v.numel():
            if special == "zero":
                v.zero_()
            elif special is not None:
                v.view(-1)[int(torch.randint(v.numel(), (), generator=g))] = float(special)
        v = v.to(dtype)
        w = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        if kind == "none":
            leaf(w, None)
        elif kind == "transposed" and v.dim() == 2:
            leaf(w, v.t().contiguous().t())
        elif kind == "strided" and v.dim() >= 1:
            wide = torch.zeros(shape[:-1] + (2 * shape[-1],), dtype=dtype)
            wide[..., ::2] = v
            leaf(w, wide[..., ::2])
        elif kind == "expanded" and v.dim() >= 1 and shape[0] > 1:
            leaf(w, v[:1].expand(shape))
        elif kind == "overlap":
            n = max(v.numel(), 1) + 2
            base = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
            leaf(w.reshape(-1)[:0].new_zeros(n - 1), base[: n - 1])
            leaf(w.reshape(-1)[:0].new_zeros(n - 1), base[1:])
        elif kind == "meta":
            leaf(torch.empty(shape, dtype=dtype, device="meta"), torch.empty(shape, dtype=dtype, device="meta"))
        elif kind == "sparse":
            leaf(w, v.to_sparse())
        elif kind == "complex":
            leaf(w.to(torch.complex64), torch.complex(v.float(), v.float().flip(0) if v.dim() else v.float()))
        elif kind == "int":
            leaf(w.to(torch.int32), (v.double().nan_to_num(0, 0, 0) * 10).to(torch.int32))
        else:
            leaf(w, v)
    return out


def kinds_of(specs):
    return {k for k, *_ in specs}


# ---- raw state: what "nothing changed" means ----

def raw(t):
    if t is None or t.device.type == "meta":
        return None
    if t.layout != torch.strided:
        t = t.coalesce()
        return (raw(t._indices()), raw(t._values()))
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.is_floating_point():
        return bits(t.clone())
    return t.clone()


def same_raw(a, b):
    if a is None or b is None:
        return a is b
    if isinstance(a, tuple):
        return all(same_raw(x, y) for x, y in zip(a, b))
    return a.shape == b.shape and torch.equal(a, b)


def snapshot(params):
    return [(p.grad, None if p.grad is None else p.grad._version, raw(p.grad), raw(p)) for p in params]


def assert_unchanged(params, snap, what="gradient"):
    for i, (p, (g, version, r, w)) in enumerate(zip(params, snap)):
        assert p.grad is g, f"{what} {i} was replaced"
        if g is not None:
            assert g._version == version, f"{what} {i}'s version counter moved from {version} to {g._version}"
            assert same_raw(raw(g), r), f"{what} {i} changed"
        assert same_raw(raw(p), w), f"parameter {i} changed"


def run(fn):
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001  (the property sorts them)
        return None, e


CLEAR = (TypeError, ValueError, RuntimeError, NotImplementedError)


def assert_clear(err, *names, torch_err=None):
    """A clear exception: one of the Python types callers catch, whose message names fusedclip or the offending
    argument (or is torch's own, word for word, where fusedclip hands the call to torch)."""
    assert isinstance(err, CLEAR), f"unclear exception {type(err).__name__}: {err}"
    msg = str(err)
    if torch_err is not None and type(err) is type(torch_err) and msg == str(torch_err):
        return
    assert "fusedclip" in msg or any(n in msg for n in names), f"the message names no culprit: {msg!r}"


def float_or_none(x):
    try:
        v = float(x)
    except Exception:  # noqa: BLE001
        return None
    return v


def norm_or_none(norm_type):
    if isinstance(norm_type, str) and norm_type not in ("inf", "-inf"):
        return None
    return float_or_none(norm_type)


def dense_real(t):
    return t.layout == torch.strided and t.dtype in FLOATS and t.device.type == "cpu"


def torch_delegated(backend, grads):
    """The call runs torch's own function: backend="torch", or "auto" on a device the native kernels do not
    cover (the first gradient's decides)."""
    return backend == "torch" or (backend == "auto" and bool(grads) and grads[0].device.type not in ("cpu", "cuda"))


# ---- the norm and the clipped gradients against the float64 reference ----

def acc_tol(grads):
    """The relative accuracy of fusedclip's norm: fp32 accumulation, fp64 with an fp64 gradient (D3)."""
    return 1e-10 if any(g.dtype == torch.float64 for g in grads) else 4e-6


def norm_tol(grads, p):
    tol = acc_tol(grads)
    if abs(p) > 1e3 and not math.isinf(p):  # |x|^p then its p-th root: every rounding of |x| counts p times
        tol = max(tol, 1e-3)
    return tol


def huge_p(p):
    return p is not None and math.isfinite(p) and abs(p) >= 1e3


def torch_overflowed(grads, p):
    """D3: torch computes each tensor's norm in the tensor's dtype and the total in their promoted dtype, so a
    float16/bfloat16 norm beyond the dtype's range is inf for torch (which then raises with error_if_nonfinite)
    where fusedclip's fp32 norm is finite."""
    if p is None or math.isnan(p) or p == 0 or not grads or not all(dense_real(g) for g in grads):
        return False
    total = ref_norm(grads, p)
    if not math.isfinite(float(total)):
        return False
    promoted = grads[0].dtype
    for g in grads:
        promoted = torch.promote_types(promoted, g.dtype)
        if g.numel() and float(ref_norm([g], p)) > torch.finfo(g.dtype).max:
            return True
    return float(total) > torch.finfo(promoted).max


def check_norm(norm, grads, p, tol, torch_norm=None):
    ref = ref_norm(grads, p)
    if huge_p(p):  # K1
        n = float(norm)
        assert (n in (0.0, math.inf) or rel_err(n, ref) <= tol
                or (torch_norm is not None and rel_err(n, torch_norm) <= tol)), (n, float(ref), torch_norm)
        return torch.tensor(n, dtype=torch.float64)
    rounding = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}.get(norm.dtype, 0.0)
    r = float(ref.to(norm.dtype)) if math.isfinite(float(ref)) else float(ref)
    if math.isnan(r) or math.isinf(r):
        assert (math.isnan(float(norm)) and math.isnan(r)) or float(norm) == r, (float(norm), float(ref))
    else:
        assert rel_err(norm, ref) <= tol + rounding or abs(float(norm) - r) <= 1e-300, (float(norm), float(ref))
    return ref


def expected_grad(g0, coef64, rel):
    """g0 * coef rounded to g0's dtype, and the tolerance: the coefficient's relative error plus one rounding."""
    exp = (g0.double() * coef64).to(g0.dtype)
    rtol = rel + TOL[g0.dtype][0]
    atol = float(torch.finfo(g0.dtype).smallest_normal)
    return exp, rtol, atol


def check_clipped(ours, orig, max_norm, ref, tol, skip_ids=()):
    """Each dense gradient is orig * clamp(max_norm / (ref + 1e-6), max=1); bit-identical when that is clearly
    1 (D4)."""
    coef = torch.clamp(torch.tensor(max_norm, dtype=torch.float64) / (ref + 1e-6), max=1.0)
    c = float(coef)
    for i, (q, q0) in enumerate(zip(ours, orig)):
        if q0.grad is None or i in skip_ids or not dense_real(q0.grad):
            continue
        if max_norm / (float(ref) + 1e-6) > 1 + 1e-5 or (math.isinf(max_norm) and max_norm > 0 and
                                                       math.isfinite(float(ref))):
            assert torch.equal(bits(q.grad), bits(q0.grad)), f"gradient {i} written although the coefficient is 1"
            continue
        if math.isnan(c):
            assert torch.isnan(q.grad).all(), i
            continue
        exp, rtol, atol = expected_grad(q0.grad, c, 2 * tol)
        torch.testing.assert_close(q.grad, exp, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"grad {i}: {m}")


def overlap_ids(specs):
    ids, i = set(), 0
    for kind, *_ in specs:
        if kind == "overlap":
            ids |= {i, i + 1}
            i += 2
        else:
            i += 1
    return ids


def grads_of(params):
    return [p.grad for p in params if p.grad is not None]


# ============================== clip_ ==============================

# Regression examples (defects the properties found, fixed in fusedclip/):
# an expanded gradient between dense ones: the kernels scaled the dense ones, then failed on the write-back
_EXPANDED_MID = [("dense", torch.float32, (7,), 0, None), ("expanded", torch.float32, (3, 5), 0, None),
                 ("dense", torch.float32, (1,), 0, None)]

BACKENDS = ["auto", "native", "torch"]


def _clip_property(specs, seed, max_norm_form, norm_type, error_if_nonfinite, backend, as_param):
    theirs, ours, orig = (build(specs, seed, as_param) for _ in range(3))
    max_norm = make_max_norm(max_norm_form)
    t_norm, t_err = run(lambda: torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type, error_if_nonfinite))
    snap = snapshot(ours)
    norm, err = run(lambda: fusedclip.clip_(ours, make_max_norm(max_norm_form), norm_type, error_if_nonfinite,
                                            backend=backend))
    grads0 = grads_of(orig)
    kinds = kinds_of(specs)
    p = norm_or_none(norm_type)
    if torch_delegated(backend, grads0):  # torch's own call: torch's outcome exactly (norm_type checked first, D6)
        assert (err is None) == (t_err is None) or (p is not None and math.isnan(p)), (err, t_err)
        if err is not None:
            assert type(err) is type(t_err) and str(err) == str(t_err) or isinstance(err, CLEAR)
        if norm is not None and t_norm is not None and norm.device.type != "meta":
            assert torch.equal(bits(norm), bits(t_norm))
        return
    if err is not None:
        assert_clear(err, "max_norm", "norm_type", "gradient", "non-finite", "backend", torch_err=t_err)
        assert_unchanged(ours, snap)
        documented = (("sparse" in kinds or "complex" in kinds)  # D2
                      or (p is not None and math.isnan(p))  # D6
                      or (huge_p(p) and "non-finite" in str(err))  # K1
                      or (backend == "native" and "meta" in kinds))  # D7
        assert t_err is not None or documented, f"torch succeeded where fusedclip raised {err!r}"
        return
    # fusedclip succeeded
    assert norm.shape == () and not norm.requires_grad
    if t_err is not None:  # D1, or D3: torch's norm overflowed its low-precision dtype (then error_if_nonfinite)
        assert "empty tensor" in str(t_err) or ("non-finite" in str(t_err) and torch_overflowed(grads0, p)), \
            f"torch raised {t_err!r}, fusedclip not"
    if any(g.device.type == "meta" for g in grads0):
        assert norm.device.type == "meta"
        return
    if not grads0:
        assert norm.dtype == torch.float32 and float(norm) == 0.0
        return
    assert norm.dtype == fusedclip.ops.result_dtype(grads0)
    if t_norm is not None:
        assert norm.dtype == t_norm.dtype and norm.device == t_norm.device
    tol = norm_tol(grads0, p)
    ref = check_norm(norm, grads0, p, tol, t_norm)
    if t_norm is not None and math.isfinite(float(ref)) and not huge_p(p) and rel_err(t_norm, ref) <= tol:
        # torch's norm is accurate too: the two agree (otherwise torch rounded, D3)
        rtol = max(tol, max(TOL[g.dtype][0] for g in grads0)) + rel_err(t_norm, ref)
        torch.testing.assert_close(norm.double(), t_norm.double(), rtol=rtol, atol=0)
    check_clipped(ours, orig, float(max_norm), ref, tol, skip_ids=overlap_ids(specs))


clip_args = dict(specs=grad_lists, seed=st.integers(0, 2**16), max_norm_form=max_norm_forms, norm_type=norm_types,
                 error_if_nonfinite=st.booleans(), backend=st.sampled_from(BACKENDS), as_param=st.booleans())


@props(400)
@given(**clip_args)
@example(specs=[("dense", torch.float32, (7,), 0, None), ("meta", torch.float32, (3,), 0, None)], seed=0,
         max_norm_form=1.0, norm_type=2.0, error_if_nonfinite=False, backend="auto", as_param=False)
@example(specs=[("dense", torch.float32, (7,), 0, None)], seed=0, max_norm_form="meta-tensor", norm_type=2.0,
         error_if_nonfinite=False, backend="native", as_param=False)
@example(specs=_EXPANDED_MID, seed=0, max_norm_form=1e-30, norm_type=2.0, error_if_nonfinite=False, backend="auto",
         as_param=True)
def test_clip_(specs, seed, max_norm_form, norm_type, error_if_nonfinite, backend, as_param):
    _clip_property(specs, seed, max_norm_form, norm_type, error_if_nonfinite, backend, as_param)


# ============================== get_total_norm ==============================

@props(200)
@given(specs=grad_lists, seed=st.integers(0, 2**16), norm_type=norm_types, error_if_nonfinite=st.booleans(),
       backend=st.sampled_from(BACKENDS), junk=st.sampled_from([None, None, None, "none", "str"]))
@example(specs=[("dense", torch.float32, (), 0, None)], seed=0, norm_type=0, error_if_nonfinite=False, backend="auto",
         junk="none")  # an AttributeError for a None among the tensors with norm_type 0
def test_get_total_norm(specs, seed, norm_type, error_if_nonfinite, backend, junk):
    """Read only, whatever happens: no tensor changes. The norm is torch's (within D1/D3), or a clear error."""
    tensors = grads_of(build(specs, seed))
    if junk is not None and tensors:
        tensors.insert(len(tensors) // 2, None if junk == "none" else "x")
    theirs = [t.clone() if isinstance(t, torch.Tensor) else t for t in tensors]
    t_norm, t_err = run(lambda: torch.nn.utils.get_total_norm(theirs, norm_type, error_if_nonfinite))
    before = [(t._version, raw(t)) if isinstance(t, torch.Tensor) else None for t in tensors]
    norm, err = run(lambda: fusedclip.get_total_norm(tensors, norm_type, error_if_nonfinite, backend=backend))
    for t, b in zip(tensors, before):
        if b is not None:
            assert t._version == b[0] and same_raw(raw(t), b[1]), "get_total_norm wrote a tensor"
    kinds = kinds_of(specs)
    p = norm_or_none(norm_type)
    real = [t for t in tensors if isinstance(t, torch.Tensor)]
    if torch_delegated(backend, real):  # torch's own call: torch's outcome (norm_type is checked first, D6)
        assert (err is None) == (t_err is None) or (p is not None and math.isnan(p)), (err, t_err)
        assert err is None or type(err) is type(t_err) or isinstance(err, CLEAR), (err, t_err)
        return
    if err is not None:
        assert_clear(err, "norm_type", "tensors", "non-finite", "backend", torch_err=t_err)
        documented = ("sparse" in kinds or "complex" in kinds or (p is not None and math.isnan(p))
                      or (backend == "native" and "meta" in kinds) or (huge_p(p) and "non-finite" in str(err)))
        assert t_err is not None or documented, f"torch succeeded where fusedclip raised {err!r}"
        return
    if t_err is not None:  # D1, or D3 (as in test_clip_)
        assert "empty tensor" in str(t_err) or ("non-finite" in str(t_err) and torch_overflowed(real, p)), \
            f"torch raised {t_err!r}, fusedclip not"
    if any(t.device.type == "meta" for t in real):
        assert norm.device.type == "meta"
        return
    if not real:
        assert norm.dtype == torch.float32 and float(norm) == 0.0
        return
    tol = norm_tol(real, p)
    ref = check_norm(norm, real, p, tol)
    if t_norm is not None:
        assert norm.dtype == t_norm.dtype
        if math.isfinite(float(ref)) and rel_err(t_norm, ref) <= tol:
            rtol = max(tol, max(TOL[g.dtype][0] for g in real)) + rel_err(t_norm, ref)
            torch.testing.assert_close(norm.double(), t_norm.double(), rtol=rtol, atol=0)


# ============================== clip_grads_with_norm_ ==============================

total_norm_forms = st.sampled_from(["ref32", "ref64", "ref16", "refbf16", "half", 0.0, -2.0, math.nan, math.inf,
                                    5, "meta", "vector", "str", None])


def make_total_norm(form, grads):
    ref = float(ref_norm([g for g in grads if dense_real(g)], 2.0)) if grads else 1.0
    if form in ("ref32", "ref64", "ref16", "refbf16"):
        dtype = {"ref32": torch.float32, "ref64": torch.float64, "ref16": torch.float16,
                 "refbf16": torch.bfloat16}[form]
        return torch.tensor(ref * 1.7, dtype=dtype)
    if form == "half":
        return torch.tensor(ref * 0.5)
    if form == "meta":
        return torch.tensor(1.0, device="meta")
    if form == "vector":
        return torch.tensor([1.0, 2.0])
    if form == "str":
        return "big"
    return form


@props(120)
@given(specs=grad_lists, seed=st.integers(0, 2**16), max_norm_form=max_norm_forms, total_form=total_norm_forms,
       backend=st.sampled_from(BACKENDS))
@example(specs=_EXPANDED_MID, seed=0, max_norm_form=1.0, total_form="ref32", backend="native")
def test_clip_grads_with_norm_(specs, seed, max_norm_form, total_form, backend):
    theirs, ours, orig = (build(specs, seed) for _ in range(3))
    grads0 = grads_of(orig)
    total = make_total_norm(total_form, grads0)
    t_res, t_err = run(lambda: torch.nn.utils.clip_grads_with_norm_(theirs, make_max_norm(max_norm_form), total))
    snap = snapshot(ours)
    res, err = run(lambda: fusedclip.clip_grads_with_norm_(ours, make_max_norm(max_norm_form),
                                                           make_total_norm(total_form, grads0), backend=backend))
    kinds = kinds_of(specs)
    if torch_delegated(backend, grads0):
        assert (err is None) == (t_err is None), (err, t_err)
        return
    if err is not None:
        assert_clear(err, "max_norm", "total_norm", "gradient", "backend", torch_err=t_err)
        assert_unchanged(ours, snap)
        documented = "sparse" in kinds or "complex" in kinds or (backend == "native" and "meta" in kinds)
        assert t_err is not None or documented, f"torch succeeded where fusedclip raised {err!r}"
        return
    assert res is None
    if t_err is not None:  # D8 (a number as total_norm), D4 (coef 1: nothing written), D1
        msg = str(t_err)
        assert not isinstance(total, torch.Tensor) or "empty" in msg, f"torch raised {t_err!r}, fusedclip not"
    if any(g.device.type == "meta" for g in grads0) or not grads0:
        return
    tot = float(total)
    acc = torch.float64 if any(g.dtype == torch.float64 for g in grads0) else torch.float32
    # the coefficient from the total as given (rounded to the accumulation dtype), D3
    ref = torch.tensor(tot, dtype=torch.float64).to(acc).double() if isinstance(total, torch.Tensor) else \
        torch.tensor(tot, dtype=torch.float64)
    check_clipped(ours, orig, float(make_max_norm(max_norm_form)), ref, acc_tol(grads0), overlap_ids(specs))


# ============================== clip_value_ ==============================

@props(120)
@given(specs=grad_lists, seed=st.integers(0, 2**16), clip_value=max_norm_forms, backend=st.sampled_from(BACKENDS))
@example(specs=[("dense", torch.float32, (7,), 0, "nan")], seed=0, clip_value=math.nan, backend="auto")
@example(specs=_EXPANDED_MID, seed=0, clip_value=0.1, backend="auto")
@example(specs=[("dense", torch.float32, (7,), 0, None), ("meta", torch.float32, (3,), 0, None)], seed=0,
         clip_value=0.1, backend="auto")  # a meta gradient has nothing to clamp, as in torch
def test_clip_value_(specs, seed, clip_value, backend):
    """Bit for bit torch's clip_grad_value_ (NaN and inf gradients and bounds included), or a clear error."""
    theirs, ours = build(specs, seed), build(specs, seed)
    t_res, t_err = run(lambda: torch.nn.utils.clip_grad_value_(theirs, make_max_norm(clip_value)))
    snap = snapshot(ours)
    res, err = run(lambda: fusedclip.clip_value_(ours, make_max_norm(clip_value), backend=backend))
    kinds = kinds_of(specs)
    grads0 = grads_of(theirs)
    if torch_delegated(backend, grads0):
        assert (err is None) == (t_err is None), (err, t_err)
        return
    if err is not None:
        assert_clear(err, "clip_value", "gradient", "backend", torch_err=t_err)
        assert_unchanged(ours, snap)
        documented = "sparse" in kinds or "complex" in kinds or (backend == "native" and "meta" in kinds)
        assert t_err is not None or documented, f"torch succeeded where fusedclip raised {err!r}"
        return
    assert res is None
    if t_err is not None and "without overflow" in str(t_err):
        # D10: a bound beyond a gradient's dtype (1e30 for float16) clamps nothing there; torch raises instead.
        # The reference: the clamp in float64, rounded back (bit for bit, NaN as NaN).
        c = float(make_max_norm(clip_value))
        for i, (a, b) in enumerate(zip(ours, build(specs, seed))):
            if b.grad is not None and dense_real(b.grad) and i not in overlap_ids(specs):
                exp = b.grad.double().clamp(-c, c).to(b.grad.dtype)
                assert same_bits_or_nan(a.grad, exp), f"gradient {i} is not the float64 clamp"
        return
    # T1: torch's clip_grad_value_ fails on a list without gradients (an internal assertion of _foreach_clamp)
    assert t_err is None or "nested_tensorlist[0].empty()" in str(t_err), t_err
    if t_err is not None:
        assert not grads0
        return
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if b.grad is not None and dense_real(b.grad) and i not in overlap_ids(specs):
            assert same_bits_or_nan(a.grad, b.grad), f"gradient {i} differs from torch's"


def same_bits_or_nan(a, b):
    """Bit for bit, except that a NaN equals any NaN (D11: torch's bfloat16 clamp on the CPU turns a NaN into the
    NaN 0xFFFF; fusedclip leaves a NaN element as it was)."""
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(bits(a)[~nan], bits(b)[~nan])


# ============================== unscale_clip_ ==============================

def _scaled_setup(specs, seed, scale):
    params = build(specs, seed, as_param=True)
    params = [p for p in params if isinstance(p, torch.nn.Parameter)]
    opt = torch.optim.SGD(params, lr=0.1) if params else None
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1)
    scaler.scale(torch.ones(()))  # creates the scale tensor, as scaling a loss does
    return params, opt, scaler


@props(150)
@given(specs=plain_lists, seed=st.integers(0, 2**16), max_norm_form=max_norm_forms, norm_type=norm_types,
       error_if_nonfinite=st.booleans(), backend=st.sampled_from(BACKENDS),
       scale=st.sampled_from([2.0**12, 1.0, 2.0**-3]))
def test_unscale_clip_(specs, seed, max_norm_form, norm_type, error_if_nonfinite, backend, scale):
    """= scaler.unscale_(optimizer) then torch's clip_grad_norm_; the scaler then counts the optimizer as unscaled
    (a second unscale_ raises) and records inf/NaN as torch's would. On an error nothing changed, the scaler's
    stage included."""
    params_t, opt_t, scaler_t = _scaled_setup(specs, seed, scale)
    params, opt, scaler = _scaled_setup(specs, seed, scale)
    orig, _, _ = _scaled_setup(specs, seed, scale)
    if opt is None:
        return

    def theirs():
        scaler_t.unscale_(opt_t)
        return torch.nn.utils.clip_grad_norm_(params_t, make_max_norm(max_norm_form), norm_type, error_if_nonfinite)

    t_norm, t_err = run(theirs)
    snap = snapshot(params)
    norm, err = run(lambda: fusedclip.unscale_clip_(scaler, opt, make_max_norm(max_norm_form), norm_type,
                                                    error_if_nonfinite=error_if_nonfinite, backend=backend))
    p = norm_or_none(norm_type)
    if err is not None:
        assert_clear(err, "max_norm", "norm_type", "FP16", "non-finite", "backend", torch_err=t_err)
        assert t_err is not None or (p is not None and math.isnan(p)) or (huge_p(p) and "non-finite" in str(err)), \
            f"torch succeeded, fusedclip raised {err!r}"  # the last: K1
        if "non-finite" in str(err) or backend == "torch":
            return  # torch's own sequence: unscaled, then the norm found non-finite (torch's state too)
        assert_unchanged(params, snap)
        # still READY: the optimizer was not marked unscaled
        assert scaler._per_optimizer_states[id(opt)]["stage"] is OptState.READY
        return
    assert t_err is None or "empty tensor" in str(t_err), f"torch raised {t_err!r}, fusedclip not"
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.unscale_(opt)
    if backend == "torch":  # the two calls, torch's: torch's results exactly
        assert torch.equal(bits(norm), bits(t_norm))
        for a, b in zip(params, params_t):
            if b.grad is not None:
                assert torch.equal(bits(a.grad), bits(b.grad))
        return
    unscaled = [(g0.double() * (1.0 / scale)).to(g0.dtype) for g0 in grads_of(orig)]
    if not unscaled:
        return
    for q0, u in zip([q for q in orig if q.grad is not None], unscaled):
        q0.grad = u
    tol = norm_tol(unscaled, p)
    ref = check_norm(norm, unscaled, p, tol)
    check_clipped(params, orig, float(make_max_norm(max_norm_form)), ref, tol)
    if t_norm is not None:
        found_t = sum(float(v) for v in scaler_t._per_optimizer_states[id(opt_t)]["found_inf_per_device"].values())
        found = sum(float(v) for v in scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values())
        assert (found > 0) == (found_t > 0)


# ============================== clip_into_ ==============================

@props(200)
@given(specs=st.lists(st.tuples(st.sampled_from(["dense", "dense", "none", "transposed", "strided"]),
                                st.sampled_from(FLOATS), st.sampled_from([(1,), (7,), (3, 5), (33, 129)]),
                                st.sampled_from([0, -3, 3]), st.sampled_from(SPECIALS)), min_size=1, max_size=4),
       seed=st.integers(0, 2**16), max_norm_form=max_norm_forms, norm_type=norm_types,
       kind=st.sampled_from(["sgd", "adam"]), backend=st.sampled_from(BACKENDS))
@example(specs=[("none", torch.float32, (1,), 0, None)], seed=0, max_norm_form=1.0, norm_type="fro", kind="sgd",
         backend="auto")  # no gradients: the norm_type was not checked
def test_clip_into_(specs, seed, max_norm_form, norm_type, kind, backend):
    """With torch's fused CPU optimizers: clip_into_ then step() = torch's clip_grad_norm_ then step(); the
    gradients are not written. On an error: nothing changed and the next step is a plain one."""
    dtype = specs[0][1]
    specs = [(k, dtype, s, e, sp) for k, _, s, e, sp in specs]  # a fused optimizer takes one dtype per step

    def setup():
        params = build(specs, seed, as_param=True)
        opt = {"sgd": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True),
               "adam": lambda: torch.optim.Adam(params, lr=0.01, fused=True)}[kind]()
        return params, opt

    (params_t, opt_t), (params, opt), (orig, _) = setup(), setup(), setup()
    t_norm, t_err = run(lambda: torch.nn.utils.clip_grad_norm_(params_t, make_max_norm(max_norm_form), norm_type))
    snap = snapshot(params)
    norm, err = run(lambda: fusedclip.clip_into_(opt, make_max_norm(max_norm_form), norm_type, backend=backend))
    p = norm_or_none(norm_type)
    if err is not None:
        assert_clear(err, "max_norm", "norm_type", "backend", torch_err=t_err)
        assert_unchanged(params, snap)
        assert getattr(opt, "grad_scale", None) is None
        assert t_err is not None or (p is not None and math.isnan(p)), f"torch succeeded, fusedclip raised {err!r}"
        return
    assert t_err is None, f"torch raised {t_err!r}, fusedclip not"
    assert_unchanged(params, snap)  # the coefficient travels with the optimizer
    grads0 = grads_of(orig)
    tol = norm_tol(grads0, p)
    if backend == "torch":  # torch's norm (in the gradients' dtype), handed to the optimizer as the coefficient
        torch.testing.assert_close(norm, t_norm, rtol=0, atol=0, equal_nan=True)
        ref = t_norm.double()
    else:
        ref = check_norm(norm, grads0, p, tol)
    if not math.isfinite(float(ref)) or not math.isfinite(float(make_max_norm(max_norm_form))):
        return  # an inf/NaN coefficient: grad / (1 / coef) and grad * coef differ (documented in clip_into_)
    opt.step()
    # torch's clip with the accurate coefficient, then the step (D3: torch's rounded norm is not the reference)
    coef = min(float(make_max_norm(max_norm_form)) / (float(ref) + 1e-6), 1.0)
    for q in orig:
        if q.grad is not None:  # in place: the layout kept (torch's fused CPU optimizers mis-step non-contiguous
            q.grad.copy_((q.grad.double() * coef).to(q.grad.dtype))  # gradients, T2: the same on both sides)
    ref_opt = {"sgd": lambda: torch.optim.SGD(orig, lr=0.1, momentum=0.9, fused=True),
               "adam": lambda: torch.optim.Adam(orig, lr=0.01, fused=True)}[kind]()
    ref_opt.step()
    # the step in float64 (torch's single-tensor loop), from float64 gradients scaled by the float64 coefficient:
    # what both sides approximate. The clip-then-step reference rounds grad * coef to the gradient's dtype first,
    # which in float16 can cost more than clip_into_'s unscale inside the step (seen: 100+ ulps of a parameter
    # near 0, where clip_into_ was within 0.5 ulp), so clip_into_ is held to the reference's distance from it.
    ideal = [torch.nn.Parameter(q.detach().double()) for q in build(specs, seed, as_param=True)]
    for q, q0 in zip(ideal, build(specs, seed, as_param=True)):
        if q0.grad is not None:
            q.grad = q0.grad.double() * coef
    {"sgd": lambda: torch.optim.SGD(ideal, lr=0.1, momentum=0.9, foreach=False),
     "adam": lambda: torch.optim.Adam(ideal, lr=0.01, foreach=False)}[kind]().step()
    for i, (a, b, x) in enumerate(zip(params, orig, ideal)):
        a, b, x = a.detach(), b.detach(), x.detach()
        rtol, atol = TOL[a.dtype]
        # Adam divides by sqrt(v): a gradient near 0 amplifies the rounding of grad * coef (up to lr)
        atol = max(atol, 2e-2 * 0.01 if kind == "adam" else 2 * atol)
        finite = torch.isfinite(x)  # a non-finite float64 step (inf/NaN gradients): the two sides must agree
        torch.testing.assert_close(a[~finite], b[~finite], rtol=4 * rtol, atol=atol, equal_nan=True,
                                   msg=lambda m: f"param {i} (non-finite step): {m}")
        ours_err = (a[finite].double() - x[finite]).abs()
        ref_err = (b[finite].double() - x[finite]).abs()
        agree = torch.isnan(a[finite]) & torch.isnan(b[finite]) | (a[finite] == b[finite])  # both overflowed alike
        ref_err = ref_err.nan_to_num(nan=0.0)  # the reference overflowed to NaN: ours is held to the tolerance
        bad = ~(ours_err <= 2 * ref_err + atol + 4 * rtol * x[finite].abs()) & ~agree
        assert not bad.any(), (f"param {i}: {int(bad.sum())} elements farther from the float64 step than twice "
                               f"the clip-then-step reference: ours {ours_err[bad][:4].tolist()}, "
                               f"reference {ref_err[bad][:4].tolist()}")


# ============================== ZClip.step ==============================

_ZCLIP_GOOD = {"alpha": [0.97, 0.5, 0.0, 1.0], "z_thresh": [2.5, 1.0, 0.5], "max_grad_norm": [1.0, None, 0.05],
               "warmup_steps": [0, 1, 3], "mode": ["zscore", "percentile", "ZScore"],
               "clip_option": ["adaptive_scaling", "mean"], "skip_update_on_spike": [False, True]}
_ZCLIP_BAD = {"alpha": [1.5, -0.1, math.nan], "z_thresh": [0.0, -1.0, math.inf, math.nan],
              "max_grad_norm": [0.0, -1.0, math.nan], "warmup_steps": [-1, 2.0, True], "mode": ["bogus", 3, None],
              "clip_option": ["bogus", None, 3], "skip_update_on_spike": [1, None]}
# valid arguments, and in a third of the examples one bad one
zclip_kwargs = st.fixed_dictionaries({k: st.sampled_from(v) for k, v in _ZCLIP_GOOD.items()}).flatmap(
    lambda good: st.one_of(st.just(good), st.just(good), st.sampled_from(sorted(_ZCLIP_BAD)).flatmap(
        lambda k: st.sampled_from(_ZCLIP_BAD[k]).map(lambda v: {**good, k: v}))))


def _zclip_ref_run(kwargs, norms):
    """zclip 1.0.0's rule in Python floats, fed float64 reference norms; returns the coefficient per step."""
    alpha, z, cap, eps = kwargs["alpha"], kwargs["z_thresh"], kwargs["max_grad_norm"], 1e-6
    n_warm = max(kwargs["warmup_steps"], 1)
    mode = kwargs["mode"].lower()
    opt = (kwargs["clip_option"] or "").lower()
    buf, mean, var, coefs = [], None, None, []
    for x in norms:
        if mean is None:
            buf.append(x)
            limit = cap if cap is not None else math.inf
            coefs.append(min(limit / (x + 1e-6), 1.0) if cap is not None else 1.0)
            if len(buf) >= n_warm:
                mean = sum(buf) / len(buf)
                var = sum((b - mean) ** 2 for b in buf) / len(buf)
            continue
        std = math.sqrt(var)
        if mode == "percentile":
            thr = mean + z * std
            spike = x > thr
        else:
            zs = (x - mean) / (std + eps)
            spike = zs > z
            thr = ((mean + (z * std) / (zs / z)) * 1.0 if opt == "adaptive_scaling" else mean) if spike else None
        target = thr if spike else x
        limit = min(target, cap) if cap is not None else target
        coefs.append(limit / (x + 1e-6) if x > limit else 1.0)
        if not (kwargs["skip_update_on_spike"] and spike):
            mean = alpha * mean + (1 - alpha) * target
            var = alpha * var + (1 - alpha) * (target - mean) ** 2
    return coefs


_ZCLIP_FIRST = {k: v[0] for k, v in _ZCLIP_GOOD.items()} | {"warmup_steps": 1, "max_grad_norm": 1e-3}


@props(150)
@given(kwargs=zclip_kwargs, specs=grad_lists, seed=st.integers(0, 2**16), steps=st.integers(1, 5),
       backend=st.sampled_from(BACKENDS))
@example(kwargs=dict(_ZCLIP_FIRST), specs=_EXPANDED_MID, seed=0, steps=2, backend="auto")
@example(kwargs=dict(_ZCLIP_FIRST), specs=[("meta", torch.float32, (3,), 0, None)], seed=0, steps=1,
         backend="auto")  # torch's "Tensor.item() cannot be called on meta tensors" from the torch rule
def test_zclip_step(kwargs, specs, seed, steps, backend):
    """Bad arguments: a ValueError at construction. Then, step after step on fresh gradients, the norm is the
    float64 one to fp32 accuracy and the gradients are scaled by zclip's coefficient for the reference norms;
    or a clear error, with the gradients and ZClip's state unchanged."""
    clipper, err = run(lambda: fusedclip.ZClip(**kwargs, backend=backend))
    if err is not None:
        assert isinstance(err, ValueError) and "fusedclip.ZClip" in str(err), err
        return
    valid = (0 <= kwargs["alpha"] <= 1 and 0 < kwargs["z_thresh"] < math.inf and isinstance(kwargs["warmup_steps"], int)
             and not isinstance(kwargs["warmup_steps"], bool) and kwargs["warmup_steps"] >= 0
             and (kwargs["max_grad_norm"] is None or kwargs["max_grad_norm"] > 0)
             and isinstance(kwargs["mode"], str) and kwargs["mode"].lower() in ("zscore", "percentile")
             and isinstance(kwargs["skip_update_on_spike"], bool)
             and (kwargs["mode"].lower() == "percentile" or kwargs["clip_option"] in ("adaptive_scaling", "mean")))
    assert valid, f"ZClip took bad arguments {kwargs}"
    kinds = kinds_of(specs)
    norms, coefs_seen = [], []
    for t in range(steps):
        params = build(specs, seed + t)
        orig = build(specs, seed + t)
        snap = snapshot(params)
        state = None if clipper._state is None else clipper._state.clone()
        norm, err = run(lambda: clipper.step(params))
        if err is not None:
            if backend == "torch":  # torch's get_total_norm runs: its own errors, in its words
                assert isinstance(err, CLEAR), err
            else:
                assert_clear(err, "gradient", "backend")
            assert_unchanged(params, snap)
            if state is not None:
                assert torch.equal(clipper._state, state), "ZClip's state changed by a failed step"
            bad = kinds & {"sparse", "complex", "int", "meta", "expanded"}
            assert bad or (backend == "native" and "meta" in kinds), f"ZClip.step raised {err!r} on plain input"
            return
        grads0 = grads_of(orig)
        assert not (kinds & {"int"}) or not any(g.dtype == torch.int32 for g in grads0), "an int gradient was taken"
        if (kinds & {"meta", "sparse", "complex", "overlap", "expanded"}) or not grads0:
            return  # the torch rule (meta) or no arithmetic to check
        ref = float(ref_norm(grads0, 2.0))
        if not math.isfinite(ref):
            return
        if backend == "torch" and torch_overflowed(grads0, 2.0):
            # D3: torch's norm in float16/bfloat16 overflowed; ZClip's torch rule runs on it, as zclip does
            assert not math.isfinite(float(norm)), float(norm)
            return
        # backend="torch": torch's norm, in the gradients' dtype (fusedclip/zclip.py's docstring)
        tol = acc_tol(grads0) if backend != "torch" else 2 * max(TOL[g.dtype][0] for g in grads0)
        assert rel_err(norm, ref) <= tol, (float(norm), ref)
        norms.append(ref)
        coef = _zclip_ref_run(kwargs, norms)[-1]
        for i, (q, q0) in enumerate(zip(params, orig)):
            if q0.grad is None:
                continue
            if coef >= 1.0:
                assert torch.equal(bits(q.grad), bits(q0.grad)), f"step {t}: gradient {i} written at coefficient 1"
            else:
                exp, rtol, atol = expected_grad(q0.grad, coef, 1e-4 + 2 * tol)
                torch.testing.assert_close(q.grad, exp, rtol=rtol, atol=atol, equal_nan=True)


# ============================== clip_agc_ ==============================

def agc_reference(w, g, clip_factor, eps, p):
    """The rule in float64 (tests/test_agc.py), scaled values rounded once to g's dtype."""
    dims = tuple(range(1, g.ndim)) if g.ndim > 1 else None
    wn = torch.linalg.vector_norm(w.double(), p, dim=dims, keepdim=g.ndim > 1)
    gn = torch.linalg.vector_norm(g.double(), p, dim=dims, keepdim=g.ndim > 1)
    max_norm = wn.clamp(min=eps) * clip_factor
    return torch.where(gn < max_norm, g, (g.double() * (max_norm / gn.clamp(min=1e-6))).to(g.dtype)), gn, max_norm


agc_factor_forms = st.sampled_from([0.01, 0.1, 0, -0.01, math.nan, math.inf, 1e-30, 1e30, 1, True,
                                    np.float32(0.05), "cpu-tensor", "meta-tensor", None, "x"])


@props(120)
@given(specs=grad_lists, seed=st.integers(0, 2**16), clip_factor=agc_factor_forms,
       eps=st.sampled_from([1e-3, 0.0, 1.0, math.nan, -1.0, 1e-30]), norm_type=norm_types,
       backend=st.sampled_from(BACKENDS))
@example(specs=[("dense", torch.float32, (3, 5), 0, None)], seed=0, clip_factor=0.01, eps=1e-3, norm_type="fro",
         backend="auto")
@example(specs=_EXPANDED_MID, seed=0, clip_factor=1e-30, eps=1e-3, norm_type=2.0, backend="auto")
def test_clip_agc_(specs, seed, clip_factor, eps, norm_type, backend):
    """timm's adaptive_clip_grad (fp32/fp64; D9 for fp16/bf16 and 'fro') or the float64 rule, or a clear error
    with nothing changed (parameters included)."""
    ours, orig = build(specs, seed, as_param=True), build(specs, seed, as_param=True)
    snap = snapshot(ours)
    res, err = run(lambda: fusedclip.clip_agc_(ours, make_max_norm(clip_factor), eps, norm_type, backend=backend))
    kinds = kinds_of(specs)
    p = norm_or_none(norm_type if norm_type != "fro" else 2.0)
    t_err, theirs = None, None
    if timm_agc is not None:
        theirs = build(specs, seed, as_param=True)
        _, t_err = run(lambda: timm_agc(theirs, make_max_norm(clip_factor), eps, norm_type))
    if err is not None:
        assert_clear(err, "clip_factor", "eps", "norm_type", "parameter", "gradient", "backend")
        assert_unchanged(ours, snap)
        cf = float_or_none(make_max_norm(clip_factor)) if clip_factor != "meta-tensor" else None
        documented = (kinds & {"sparse", "complex", "int", "meta", "expanded"} or p is None or math.isnan(p)
                      or cf is None or math.isnan(cf) or math.isnan(eps))
        assert documented or (timm_agc is not None and t_err is not None), f"clip_agc_ raised {err!r}"
        return
    assert res is None
    assert not (kinds & {"sparse", "complex", "int"}), "clip_agc_ took a gradient the kernels cannot"
    cf = float(make_max_norm(clip_factor))
    for i, (q, q0) in enumerate(zip(ours, orig)):
        assert same_raw(raw(q), raw(q0)), f"parameter {i} written"
        if q0.grad is None or not dense_real(q0.grad) or q0.grad.numel() == 0 or i in overlap_ids(specs):
            continue
        if q0.grad.stride() and 0 in q0.grad.stride():
            continue
        exp, gn, max_norm = agc_reference(q0.detach(), q0.grad, cf, eps, p)
        if not (torch.isfinite(gn).all() and torch.isfinite(max_norm).all()):
            continue  # NaN norms: timm's torch.where rule, checked by tests/test_agc.py
        if huge_p(p):
            # K1: |x|^p overflows (or underflows) in the kernels, as in torch's vector_norm (timm's rule), so a
            # unit's norm may be inf or 0 instead of the reference's: the unit is the reference, kept (its norm
            # 0), 0 (its norm inf) or NaN (both norms inf: inf / inf, as timm gives too)
            dims = tuple(range(1, q0.grad.ndim))
            close = torch.isclose(q.grad.double(), exp.double(), rtol=1e-3, atol=1e-30)
            outcomes = (close, bits(q.grad) == bits(q0.grad), q.grad == 0, torch.isnan(q.grad))
            per_unit = [m.all(dim=dims) if dims else m for m in outcomes]
            assert (per_unit[0] | per_unit[1] | per_unit[2] | per_unit[3]).all(), \
                f"grad {i}: not the reference, kept, 0 or NaN (K1)"
            continue
        # units within the fp32 norm's rounding of their threshold may decide either way
        near = ((gn - max_norm).abs() <= 1e-5 * max_norm.abs()).expand(q0.grad.shape)
        # one rounding to the gradient's dtype, and for other p the pow's error in the fp32 norms
        rtol = max(TOL[q0.grad.dtype][0], 4e-6 if p == 2.0 or math.isinf(p) else 1e-4)
        atol = float(torch.finfo(q0.grad.dtype).smallest_normal)
        torch.testing.assert_close(q.grad[~near], exp[~near], rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m: f"grad {i}: {m}")
        if theirs is not None and t_err is None and q0.grad.dtype in (torch.float32, torch.float64):
            # timm's (fp32/fp64 norms, as ours; D9 for fp16/bf16), away from the thresholds
            torch.testing.assert_close(q.grad[~near], theirs[i].grad[~near], rtol=rtol, atol=atol, equal_nan=True,
                                       msg=lambda m: f"grad {i} against timm: {m}")
