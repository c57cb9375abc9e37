"""Beyond torch's clip: per-tensor norms from the same pass, AMP unscale+clip in one pass, clipping folded
into the optimizer step. Each is compared with the unfused sequence it replaces."""
import math

import pytest
import torch

import fusedclip
from conftest import BACKENDS, DEVICES
from fusedclip.testing import SHAPES, assert_bit_identical, clone_params, grads_of, make_params, ref_norm, rel_err


# ---- per-tensor norms ----

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
@pytest.mark.parametrize("p", [2.0, math.inf, 1.0, 0.0], ids=str)
def test_per_tensor_norms(device, backend, p):
    params = make_params(SHAPES, [torch.float32, torch.bfloat16], device=device, seed=40, none_every=3)
    if backend == "torch" and p == math.inf:  # torch cannot take the inf norm of an empty tensor
        params = [q for q in params if q.numel() > 0]
    orig = clone_params(params)
    total, norms = fusedclip.clip_(params, 0.5, p, per_tensor=True, backend=backend)
    grads0 = grads_of(orig)
    assert norms.shape == (len(grads0),) and norms.dtype == torch.float32 and norms.device == total.device
    for n, g in zip(norms.tolist(), grads0):  # each tensor's own norm (for p=0: its count of nonzeros)
        assert rel_err(n, torch.linalg.vector_norm(g.double(), p) if g.numel() else 0.0) < 2e-6
    plain = fusedclip.clip_(clone_params(orig), 0.5, p, backend=backend)
    assert_bit_identical(total, plain)  # per_tensor changes nothing else
    total2, norms2 = fusedclip.get_total_norm(grads0, p, per_tensor=True, backend=backend)
    torch.testing.assert_close(norms2, norms, rtol=0, atol=0)
    torch.testing.assert_close(total2.float(), total.float(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_tensor_with_error_if_nonfinite_and_no_grads(backend):
    params = make_params([(100,), (3, 3)], [torch.float32], seed=41)
    total, norms = fusedclip.clip_(params, 1.0, error_if_nonfinite=True, per_tensor=True, backend=backend)
    assert norms.shape == (2,) and rel_err(total, torch.linalg.vector_norm(norms)) < 1e-6
    total, norms = fusedclip.clip_([torch.nn.Parameter(torch.ones(3))], 1.0, per_tensor=True, backend=backend)
    assert float(total) == 0.0 and norms.numel() == 0


# ---- AMP: unscale_clip_ against scaler.unscale_ + clip_grad_norm_ ----

def _amp_setup(seed, bad=None):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1)
    x, y = torch.randn(16, 32), torch.randn(16, 8)
    scaler.scale(torch.nn.functional.mse_loss(model(x), y) * 100).backward()
    if bad is not None:
        model[0].weight.grad[1, 2] = bad
    return model, opt, scaler


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [None, float("inf"), float("nan")], ids=["finite", "inf", "nan"])
@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clipping", "not-clipping"])
def test_unscale_clip_matches_unscale_then_clip(backend, bad, max_norm):
    model_a, opt_a, scaler_a = _amp_setup(50, bad)
    model_b, opt_b, scaler_b = _amp_setup(50, bad)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert_bit_identical(p.grad, q.grad)

    norm_a = fusedclip.unscale_clip_(scaler_a, opt_a, max_norm, backend=backend)
    scaler_b.unscale_(opt_b)
    norm_b = torch.nn.utils.clip_grad_norm_(model_b.parameters(), max_norm)
    torch.testing.assert_close(norm_a, norm_b, rtol=1e-5, atol=0, equal_nan=True)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, equal_nan=True)
    with pytest.raises(RuntimeError, match="unscale_\\(\\) has already been called"):
        scaler_a.unscale_(opt_a)

    before = [p.detach().clone() for p in model_a.parameters()]
    scaler_a.step(opt_a)
    scaler_b.step(opt_b)
    scaler_a.update()
    scaler_b.update()
    assert scaler_a.get_scale() == scaler_b.get_scale()
    if bad is not None:
        assert scaler_a.get_scale() < 2.0**12  # lowered
        for p, b in zip(model_a.parameters(), before):
            assert_bit_identical(p.detach(), b)  # step skipped
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unscale_clip_disabled_scaler_and_double_call(backend):
    model, opt, scaler = _amp_setup(51)
    off = torch.amp.GradScaler("cpu", enabled=False)
    grads = [p.grad.clone() for p in model.parameters()]
    ref = ref_norm(grads, 2)
    assert rel_err(fusedclip.unscale_clip_(off, opt, 1e9, backend=backend), ref) < 2e-6
    fusedclip.unscale_clip_(scaler, opt, 1.0, backend=backend)
    with pytest.raises(RuntimeError, match="already been called"):
        fusedclip.unscale_clip_(scaler, opt, 1.0, backend=backend)


# ---- clip_into_: the coefficient handed to a fused optimizer ----

def _opt_setup(seed, kind, fused):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(64, 33), (33,), (5, 64)]]
    for p in params:
        p.grad = torch.randn_like(p) * 3
    opt = {"adam": lambda: torch.optim.Adam(params, lr=1e-2, fused=fused),
           "adamw": lambda: torch.optim.AdamW(params, lr=1e-2, fused=fused),
           "sgd": lambda: torch.optim.SGD(params, lr=1e-2, momentum=0.9, fused=fused)}[kind]()
    return params, opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize("fused", [True, None], ids=["fused", "not-fused"])
@pytest.mark.parametrize("max_norm", [1.0, 1e6], ids=["clipping", "not-clipping"])
def test_clip_into_matches_clip_then_step(backend, kind, fused, max_norm):
    params_a, opt_a = _opt_setup(60, kind, fused)
    params_b, opt_b = _opt_setup(60, kind, fused)
    grads_before = [p.grad.clone() for p in params_a]
    norm_a = fusedclip.clip_into_(opt_a, max_norm, backend=backend)
    norm_b = fusedclip.clip_(params_b, max_norm, backend=backend)
    torch.testing.assert_close(norm_a, norm_b, rtol=1e-6, atol=0)
    if fused:  # no write: the coefficient travels with the optimizer
        for p, g in zip(params_a, grads_before):
            assert_bit_identical(p.grad, g)
    opt_a.step()
    opt_b.step()
    for p, q in zip(params_a, params_b):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # one step only: a later plain step is not clipped
    for p, q in zip(params_a, params_b):
        p.grad = torch.full_like(p, 7.0)
        q.grad = torch.full_like(q, 7.0)
    opt_a.step()
    opt_b.step()
    for p, q in zip(params_a, params_b):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unscale_first", [True, False])
@pytest.mark.parametrize("bad", [None, float("inf")], ids=["finite", "inf"])
def test_clip_into_with_grad_scaler(backend, unscale_first, bad):
    def setup():
        torch.manual_seed(61)
        model = torch.nn.Linear(16, 4)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        scaler.scale(model(torch.randn(8, 16)).square().sum()).backward()
        if bad is not None:
            model.weight.grad[0, 0] = bad
        return model, opt, scaler

    model_a, opt_a, scaler_a = setup()
    model_b, opt_b, scaler_b = setup()
    before = [p.detach().clone() for p in model_a.parameters()]
    if unscale_first:
        scaler_a.unscale_(opt_a)
        norm_a = fusedclip.clip_into_(opt_a, 0.5, backend=backend)
    else:
        norm_a = fusedclip.clip_into_(opt_a, 0.5, scaler=scaler_a, backend=backend)
    scaler_b.unscale_(opt_b)
    norm_b = torch.nn.utils.clip_grad_norm_(model_b.parameters(), 0.5)
    torch.testing.assert_close(norm_a, norm_b, rtol=1e-5, atol=0, equal_nan=True)
    for s, o in ((scaler_a, opt_a), (scaler_b, opt_b)):
        s.step(o)
        s.update()
    assert scaler_a.get_scale() == scaler_b.get_scale()
    for p, q, b in zip(model_a.parameters(), model_b.parameters(), before):
        if bad is None:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        else:
            assert_bit_identical(p.detach(), b)


# ---- the spike guard for plain clip_ (on_nonfinite="skip") ----

@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused-adamw", "forloop-adamw"])
def test_clip_on_nonfinite_skip(backend, fused):
    """A NaN gradient: the gradients stay as they are, the optimizer's step is skipped (parameters and its
    state as if step() had not been called); finite steps are clip_ then step(), bit for bit."""
    g = torch.Generator().manual_seed(50)
    w0 = torch.randn(40, 30, generator=g)
    seq = [torch.randn(40, 30, generator=g) * (3.0 if t % 2 else 0.1) for t in range(6)]
    seq[3][5, 7] = math.nan
    runs = []
    for guarded in (True, False):
        w = torch.nn.Parameter(w0.clone())
        opt = torch.optim.AdamW([w], lr=1e-2, weight_decay=0.1, fused=fused, foreach=None if fused else False)
        out = []
        for t, grad in enumerate(seq):
            w.grad = grad.clone()
            if guarded:
                fusedclip.clip_([w], 1.0, on_nonfinite="skip", optimizer=opt, backend=backend)
                if t == 3:  # left alone
                    torch.testing.assert_close(w.grad, seq[3], rtol=0, atol=0, equal_nan=True)
                opt.step()
            else:
                if t != 3:
                    fusedclip.clip_([w], 1.0, backend=backend)
                    opt.step()
            out.append(w.detach().clone())
        runs.append(out)
    for t, (a, b) in enumerate(zip(*runs)):
        assert torch.equal(a, b), t
    assert torch.isfinite(runs[0][-1]).all()


def test_clip_on_nonfinite_bad_arguments():
    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.full((3,), 2.0)
    opt = torch.optim.SGD([w], lr=0.1)
    with pytest.raises(ValueError, match="optimizer="):
        fusedclip.clip_([w], 1.0, on_nonfinite="skip")
    with pytest.raises(ValueError, match="'clip' or 'skip'"):
        fusedclip.clip_([w], 1.0, on_nonfinite="zero", optimizer=opt)
    with pytest.raises(ValueError, match="error_if_nonfinite"):
        fusedclip.clip_([w], 1.0, error_if_nonfinite=True, on_nonfinite="skip", optimizer=opt)
    assert torch.equal(w.grad, torch.full((3,), 2.0))
