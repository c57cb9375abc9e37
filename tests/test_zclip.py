"""fusedclip.ZClip against zclip 1.0.0 (the published implementation), step by step, on CPU."""
import copy
import io
import math

import pytest
import torch

import fusedclip

import zclip  # the published implementation (`make setup` installs zclip 1.0.0)

WARMUP = 5
STEPS = 40
SPIKES = (9, 17, 18, 30)  # 15x the norm; 17 and 18 back to back


def _model(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(dtype)


def _grad_sequence(model, dtype, steps=STEPS, bad=()):
    """Per step, one gradient per parameter: a norm drifting between about 0.2 and 1.2 (so that a cap of 1
    binds on some steps only), with injected spikes; `bad`: {step: value} puts an inf or NaN in a gradient."""
    g = torch.Generator().manual_seed(1)
    seq = []
    for t in range(steps):
        scale = 0.03 * (1 + 0.5 * math.sin(t / 4)) * (1 + t / 40) * (15 if t in SPIKES else 1)
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) * scale for p in model.parameters()]
        if t in bad:
            grads[1].view(-1)[3] = bad[t]
        seq.append(grads)
    return seq


def _run(clipper, model, seq, start=0):
    """Feeds seq[start:] to clipper.step(model); returns [(norm, clipped grads, changed?)] per step."""
    out = []
    for grads in seq[start:]:
        for p, gr in zip(model.parameters(), grads):
            p.grad = gr.clone()
        norm = clipper.step(model)
        after = [p.grad.clone() for p in model.parameters()]
        changed = not all(torch.equal(a, b) for a, b in zip(after, grads))
        out.append((norm, after, changed))
    return out


CONFIGS = [dict(mode="zscore", clip_option="adaptive_scaling"),
           dict(mode="zscore", clip_option="adaptive_scaling", clip_factor=0.7),
           dict(mode="zscore", clip_option="mean"),
           dict(mode="percentile")]

# fp64 gradients: the norms agree to ~1e-16, so this checks the rules and the order of the arithmetic;
# fp32: both accumulate the norm in fp32, in different orders.
TOLS = {torch.float64: dict(rtol=1e-12, atol=1e-15), torch.float32: dict(rtol=1e-5, atol=1e-9)}


def _compare(ours, theirs, dtype, where):
    tol = TOLS[dtype]
    for t, ((n1, g1, _), (n2, g2, _)) in enumerate(zip(ours, theirs)):
        assert n1.dim() == 0 and n1.dtype == dtype, where
        torch.testing.assert_close(n1, torch.tensor(n2, dtype=dtype), equal_nan=True, **tol,
                                   msg=lambda m: f"{where}, step {t}, norm: {m}")
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, equal_nan=True, **tol, msg=lambda m: f"{where}, step {t}, grads: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("skip", [False, True], ids=["update", "skip_update_on_spike"])
@pytest.mark.parametrize("cap", [1.0, None], ids=["cap1", "nocap"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_parity_with_zclip(config, cap, skip, dtype):
    kw = dict(config, max_grad_norm=cap, warmup_steps=WARMUP, skip_update_on_spike=skip)
    model = _model(dtype)
    seq = _grad_sequence(model, dtype)
    ref = zclip.ZClip(**kw)
    ours = fusedclip.ZClip(**kw)
    model2 = copy.deepcopy(model)
    theirs = []
    for t in range(STEPS):  # step by step, so the EMA state can be compared too
        theirs += _run(ref, model, seq[t:t + 1])
        mine = _run(ours, model2, seq[t:t + 1])
        _compare(mine, theirs[-1:], dtype, f"{kw}, step {t}")
        if ref.initialized:
            sd = ours.state_dict()
            torch.testing.assert_close(sd["mean"], torch.tensor(ref.mean, dtype=torch.float64), **TOLS[dtype])
            torch.testing.assert_close(sd["var"], torch.tensor(ref.var, dtype=torch.float64), **TOLS[dtype])
    # the sequence exercises both outcomes after the warm-up
    changed = [c for _, _, c in theirs[WARMUP:]]
    assert any(changed) and not all(changed), changed


@pytest.mark.parametrize("be", ["auto", "torch"])
@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_parity_warmup_lengths_and_backends(warmup, be):
    model = _model(torch.float32)
    seq = _grad_sequence(model, torch.float32, steps=20)
    kw = dict(warmup_steps=warmup, max_grad_norm=0.8)
    _compare(_run(fusedclip.ZClip(**kw, backend=be), copy.deepcopy(model), seq),
             _run(zclip.ZClip(**kw), model, seq), torch.float32, kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_norm_exactly_at_the_cap(dtype):
    """A norm of exactly max_grad_norm: scaled by 5 / (5 + 1e-6) in the warm-up (torch's clip_grad_norm_,
    which zclip calls there), left alone after it (zclip's own rule clips only norm > limit)."""
    p = torch.nn.Parameter(torch.zeros(2, dtype=dtype))
    q = copy.deepcopy(p)
    ours, ref = fusedclip.ZClip(warmup_steps=2, max_grad_norm=5.0), zclip.ZClip(warmup_steps=2, max_grad_norm=5.0)
    for t in range(4):
        p.grad, q.grad = torch.tensor([3.0, 4.0], dtype=dtype), torch.tensor([3.0, 4.0], dtype=dtype)
        assert ours.step([p]).item() == ref.step(torch.nn.ParameterList([q])) == 5.0
        assert torch.equal(p.grad, q.grad), t
        assert torch.equal(p.grad, torch.tensor([3.0, 4.0], dtype=dtype)) == (t >= 2), t


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_parity_nonfinite(config):
    """An inf gradient (clipped to 0 * inf = NaN where it was, 0 elsewhere) and then a NaN one (which makes the
    EMA NaN for good, in zclip too): the same on both sides."""
    model = _model(torch.float64)
    seq = _grad_sequence(model, torch.float64, steps=20, bad={7: math.inf, 12: math.nan})
    kw = dict(config, warmup_steps=WARMUP)
    _compare(_run(fusedclip.ZClip(**kw), copy.deepcopy(model), seq), _run(zclip.ZClip(**kw), model, seq),
             torch.float64, kw)


@pytest.mark.parametrize("stop", [3, WARMUP, 13, 18])  # mid warm-up, at its end, after, mid spike
@pytest.mark.parametrize("config", CONFIGS[:1] + CONFIGS[2:], ids=lambda c: "-".join(str(v) for v in c.values()))
def test_state_dict_resumes_exactly(config, stop):
    kw = dict(config, warmup_steps=WARMUP, skip_update_on_spike=True)
    model = _model(torch.float32)
    seq = _grad_sequence(model, torch.float32)
    whole = _run(fusedclip.ZClip(**kw), copy.deepcopy(model), seq)

    first = fusedclip.ZClip(**kw)
    head = _run(first, copy.deepcopy(model), seq[:stop])
    saved = io.BytesIO()
    torch.save(first.state_dict(), saved)
    _run(first, copy.deepcopy(model), seq[stop:stop + 2])  # the saved state must not follow the clipper
    saved.seek(0)
    resumed = fusedclip.ZClip(**kw)
    resumed.load_state_dict(torch.load(saved))
    tail = _run(resumed, copy.deepcopy(model), seq, start=stop)

    for t, ((n1, g1, _), (n2, g2, _)) in enumerate(zip(whole, head + tail)):
        assert torch.equal(n1, n2), t
        assert all(torch.equal(a, b) for a, b in zip(g1, g2)), t


def test_step_takes_parameters_and_counts_gradless_steps():
    model = _model(torch.float32)
    seq = _grad_sequence(model, torch.float32, steps=8)
    a, b = fusedclip.ZClip(warmup_steps=WARMUP), fusedclip.ZClip(warmup_steps=WARMUP)
    m2 = copy.deepcopy(model)
    for grads in seq:
        for p, q, gr in zip(model.parameters(), m2.parameters(), grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        assert torch.equal(a.step(model), b.step(iter(list(m2.parameters()))))
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), m2.parameters()))
    # zclip counts a step without gradients as a norm of 0
    empty, ref = fusedclip.ZClip(warmup_steps=2), zclip.ZClip(warmup_steps=2)
    bare = torch.nn.Linear(2, 2)
    for _ in range(3):
        assert empty.step(bare).item() == ref.step(bare) == 0.0
    assert empty.steps == 3 and empty.state_dict()["mean"].item() == ref.mean == 0.0


@pytest.mark.parametrize("kw, match", [
    (dict(alpha=1.5), "alpha"), (dict(alpha=math.nan), "alpha"), (dict(alpha="0.9"), "alpha"),
    (dict(z_thresh=0.0), "z_thresh"), (dict(z_thresh=-1), "z_thresh"), (dict(z_thresh=math.inf), "z_thresh"),
    (dict(max_grad_norm=0.0), "max_grad_norm"), (dict(max_grad_norm=-1.0), "max_grad_norm"),
    (dict(max_grad_norm=math.nan), "max_grad_norm"), (dict(eps=0.0), "eps"), (dict(eps=None), "eps"),
    (dict(warmup_steps=-1), "warmup_steps"), (dict(warmup_steps=2.5), "warmup_steps"),
    (dict(warmup_steps=True), "warmup_steps"), (dict(mode="median"), "mode"), (dict(mode=None), "mode"),
    (dict(clip_option="max"), "clip_option"), (dict(mode="percentile", clip_option="max"), "clip_option"),
    (dict(clip_factor=0.0), "clip_factor"), (dict(clip_factor=-0.5), "clip_factor"),
    (dict(skip_update_on_spike="yes"), "skip_update_on_spike"), (dict(backend="cuda"), "backend"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        fusedclip.ZClip(**kw)


def test_accepted_arguments_and_bad_state():
    fusedclip.ZClip(mode="Percentile", clip_option=None, max_grad_norm=None, warmup_steps=0, alpha=1, z_thresh=3)
    fusedclip.ZClip(clip_option="MEAN", max_grad_norm=math.inf)
    sd = fusedclip.ZClip(warmup_steps=4).state_dict()
    with pytest.raises(ValueError, match="warmup_steps"):
        fusedclip.ZClip(warmup_steps=5).load_state_dict(sd)
    with pytest.raises(ValueError, match="steps"):
        fusedclip.ZClip(warmup_steps=4).load_state_dict(dict(sd, steps=-1))
