"""fusedclip.ZClip against zclip 1.0.0 (the published implementation), step by step, on CPU."""
import copy
import io
import math

import pytest
import torch

import fusedclip
from fusedclip.testing import mixed_scales

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
    (dict(clip_option="max"), "clip_option"),
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


# ---- zclip's public surface: initialized, buffer, mean, var, apply_in_place_clipping, argument errors ----

def _public(clipper):
    return clipper.initialized, clipper.buffer, clipper.mean, clipper.var


def _mixed_scale_grads(shapes, dtype, steps, seed):
    """Per step one gradient per shape, each of its own scale (1e-3 to 10, log-uniform, redrawn every step), with
    spikes of 50x on some steps."""
    g = torch.Generator().manual_seed(seed)
    seq = []
    for t in range(steps):
        scales = mixed_scales(len(shapes), g)  # 1e-3 to 10, log-uniform
        spike = 50.0 if t % 7 == 6 else 1.0
        seq.append([(torch.randn(s, generator=g, dtype=torch.float64) * float(k) * spike).to(dtype)
                    for s, k in zip(shapes, scales)])
    return seq


def _lockstep(ours, ref, params_ours, params_ref, seq, exact, seed_at=None, unseed_at=None, where=""):
    """Steps both clippers through seq, comparing zclip's public attributes (and the norm and the clipped
    gradients) after every step. seed_at: {step: (mean, var)} assigned to both (then initialized = True) before
    that step; unseed_at: steps before which both get initialized = False."""
    for t, grads in enumerate(seq):
        if seed_at and t in seed_at:
            for c in (ours, ref):
                c.mean, c.var = seed_at[t]
                c.initialized = True
        if unseed_at and t in unseed_at:
            ours.initialized = ref.initialized = False
        for p, q, gr in zip(params_ours, params_ref, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        norm = ours.step(params_ours)
        ref_norm = ref.step(torch.nn.ParameterList(params_ref))
        mine, theirs = _public(ours), _public(ref)
        msg = f"{where}, step {t}: ours {mine}, zclip {theirs}"
        assert mine[0] is theirs[0] and len(mine[1]) == len(theirs[1]), msg
        assert (mine[2] is None) == (theirs[2] is None) and (mine[3] is None) == (theirs[3] is None), msg
        assert all(type(v) is float for v in mine[1]) and all(type(v) in (float, type(None)) for v in mine[2:]), msg
        if exact:
            assert mine == theirs, msg
            assert norm.item() == ref_norm, msg
            assert all(torch.equal(p.grad, q.grad) for p, q in zip(params_ours, params_ref)), msg
        else:
            assert mine[1] == pytest.approx(theirs[1], rel=1e-12), msg
            assert [v for v in mine[2:] if v is not None] == pytest.approx(
                [v for v in theirs[2:] if v is not None], rel=1e-12), msg


PUBLIC_CONFIGS = [dict(mode="zscore"), dict(mode="zscore", clip_option="mean", skip_update_on_spike=True),
                  dict(mode="percentile", max_grad_norm=None)]


@pytest.mark.parametrize("seeded", [False, True], ids=["warmup", "seeded"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("config", PUBLIC_CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_public_state_matches_zclip_bit_for_bit(config, dtype, seeded):
    """One gradient of one element (of mixed scales from step to step): its norm is |g| exactly on both sides
    (sqrt(fl(g * g)) == |g| in binary floating point), so zclip's Python floats and the device state must agree
    to the bit at every step: initialized, buffer, mean, var, the norm and the clipped gradient. Seeded: the
    EMA assigned before the first step, as zclip's own tests do."""
    kw = dict(dict(warmup_steps=WARMUP, max_grad_norm=2.0), **config)
    p, q = torch.nn.Parameter(torch.zeros(1, dtype=dtype)), torch.nn.Parameter(torch.zeros(1, dtype=dtype))
    ours, ref = fusedclip.ZClip(**kw), zclip.ZClip(**kw)
    assert _public(ours) == _public(ref) == (False, [], None, None)
    seq = _mixed_scale_grads([(1,)], dtype, 40, seed=3)
    _lockstep(ours, ref, [p], [q], seq, exact=True, seed_at={0: (0.5, 0.04)} if seeded else None, where=kw)


@pytest.mark.parametrize("config", PUBLIC_CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_public_state_matches_zclip_on_a_model(config):
    """Several fp64 gradients of mixed scales: the norms agree to ~1e-16 (accumulated in other orders), the
    public state to 1e-12; seeded mid warm-up (zclip then keeps the two norms of its buffer, unread) and sent
    back to a warm-up (from those norms) later."""
    kw = dict(dict(warmup_steps=WARMUP), **config)
    shapes = [(16, 8), (16,), (4, 16), (4,)]
    ps = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in shapes]
    qs = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in shapes]
    seq = _mixed_scale_grads(shapes, torch.float64, 40, seed=4)
    _lockstep(fusedclip.ZClip(**kw), zclip.ZClip(**kw), ps, qs, seq, exact=False, seed_at={2: (3.0, 4.0)},
              unseed_at={20}, where=kw)


def test_seeding_in_any_order_and_the_steps_it_implies():
    a, ref = fusedclip.ZClip(warmup_steps=3, z_thresh=2.0), zclip.ZClip(warmup_steps=3, z_thresh=2.0)
    a.initialized = True  # before mean and var: step() must wait for them (zclip's would fail on None)
    assert a.initialized and a.mean is None and a.var is None and a.steps == 3
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 0.0])
    with pytest.raises(RuntimeError, match="mean and var are None"):
        a.step([p])
    a.var = 0.25
    with pytest.raises(RuntimeError, match="mean is None"):
        a.step([p])
    a.mean = torch.tensor(1.0)  # a tensor is taken too
    ref.mean, ref.var, ref.initialized = 1.0, 0.25, True
    q = torch.nn.Parameter(torch.zeros(2))
    q.grad = torch.tensor([3.0, 0.0])
    assert a.step([p]).item() == ref.step(torch.nn.ParameterList([q])) == 3.0  # z = 4: a spike, clipped to 1.5
    assert torch.equal(p.grad, q.grad) and p.grad[0].item() < 3.0
    assert _public(a) == _public(ref) and a.steps == 4
    # resumes: the state_dict carries what was seeded
    b = fusedclip.ZClip(warmup_steps=3, z_thresh=2.0)
    b.load_state_dict(a.state_dict())
    assert _public(b) == _public(a)
    # None again once initialized: refused until assigned (or sent back to a warm-up)
    a.mean = None
    with pytest.raises(RuntimeError, match="mean is None"):
        a.step([p])
    a.initialized = False
    assert a.mean is None and a.buffer == [] and a.steps == 0
    p.grad = torch.tensor([3.0, 0.0])
    a.step([p])
    assert a.buffer == [3.0] and not a.initialized


def test_buffer_assignment():
    ours, ref = fusedclip.ZClip(warmup_steps=4), zclip.ZClip(warmup_steps=4)
    ours.buffer = ref.buffer = [0.5, torch.tensor(0.25, dtype=torch.float64), 2.0]
    assert ours.buffer == [0.5, 0.25, 2.0] and ours.steps == 3
    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    p.grad, q.grad = torch.tensor([0.75]), torch.tensor([0.75])
    ours.step([p]), ref.step(torch.nn.ParameterList([q]))
    assert _public(ours) == _public(ref) and ours.initialized  # the 4th norm ended the warm-up
    with pytest.raises(ValueError, match="at most 3 norms"):
        ours.buffer = [1.0] * 4
    ours.buffer = [1.0]  # while initialized: kept aside, as zclip's, until initialized = False
    assert ours.buffer == [1.0] and ours.initialized
    ours.initialized = False
    assert ours.buffer == [1.0] and ours.steps == 1


@pytest.mark.parametrize("be", ["auto", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_apply_in_place_clipping_is_zclips(dtype, be):
    """zclip's coefficient (float64) applied as zclip applies it (mul_ by a Python float): bit for bit."""
    g = torch.Generator().manual_seed(5)
    model = _model(dtype)
    ref_model = copy.deepcopy(model)
    ours, ref = fusedclip.ZClip(backend=be), zclip.ZClip()
    for norm, cap in [(2.0, 1.0), (1.0, 1.0), (1.0 + 1e-7, 1.0), (3.7, 0.123), (1e3, 7.0), (0.5, 1.0),
                      (torch.tensor(5.0), 1.0), (math.inf, 1.0), (math.nan, 1.0)]:
        grads = [torch.randn(p.shape, generator=g).to(dtype) for p in model.parameters()]
        for p, q, gr in zip(model.parameters(), ref_model.parameters(), grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        ours.apply_in_place_clipping(model, norm, cap)
        ref.apply_in_place_clipping(ref_model, float(norm), cap)
        for p, q, gr in zip(model.parameters(), ref_model.parameters(), grads):
            assert torch.equal(p.grad, q.grad), (norm, cap)
            if not float(norm) > cap:  # zclip's coefficient is 1: nothing written
                assert torch.equal(p.grad, gr), (norm, cap)
    ours.apply_in_place_clipping(torch.nn.Linear(2, 2), 2.0, 1.0)  # no gradients: nothing to do


def test_arguments_as_zclip_takes_them():
    # percentile mode: clip_option is ignored and stored as None, whatever it is (an unknown one warns)
    assert fusedclip.ZClip(mode="percentile").clip_option is None
    assert fusedclip.ZClip(mode="percentile", clip_option="mean").clip_option is None
    with pytest.warns(UserWarning, match="ignored in percentile mode"):
        assert fusedclip.ZClip(mode="percentile", clip_option="max").clip_option is None
    # zclip's exception classes and wording (zclip's own tests match these messages)
    with pytest.raises(ValueError, match="mode must be either 'zscore' or 'percentile'"):
        fusedclip.ZClip(mode="invalid_mode")
    for catch in (AssertionError, ValueError):
        with pytest.raises(catch, match="For zscore mode, clip_option must be either 'mean' or 'adaptive_scaling'"):
            fusedclip.ZClip(mode="zscore", clip_option="invalid_option")
    assert issubclass(fusedclip.zclip.ZClipArgumentError, (ValueError, AssertionError))
    assert fusedclip.ZClip(clip_option="MEAN").clip_option == "mean"


@pytest.mark.parametrize("be", ["native", "torch"])
def test_hyper_parameters_changed_between_steps_as_zclip(be):
    """zclip reads alpha, z_thresh, max_grad_norm, eps and clip_factor at every step: changed between steps (a
    schedule), they reach fusedclip's next step too (its kernels take them as a config); the ones that decide the
    state's layout or the kind of rule raise instead of being ignored."""
    dtype = torch.float64
    model = _model(dtype)
    seq = _grad_sequence(model, dtype)
    ours, theirs = fusedclip.ZClip(warmup_steps=5, backend=be), zclip.ZClip(warmup_steps=5)
    half = len(seq) // 2
    out_a, out_b = _run(ours, model, seq[:half]), _run(theirs, model, seq[:half])
    for c in (ours, theirs):
        c.alpha, c.z_thresh, c.max_grad_norm, c.eps, c.clip_factor = 0.6, 1.2, 0.5, 1e-3, 0.8
    out_a += _run(ours, model, seq[half:])
    out_b += _run(theirs, model, seq[half:])
    _compare(out_a, out_b, dtype, f"changed at step {half}")
    assert any(changed for _, _, changed in out_a[half:])  # the new cap binds
    with pytest.raises(ValueError, match="alpha must be"):
        ours.alpha = 1.5
    assert ours.alpha == 0.6
    for name, value in [("mode", "percentile"), ("warmup_steps", 3), ("on_spike", "skip")]:
        with pytest.raises(AttributeError, match=f"{name} is fixed"):
            setattr(ours, name, value)
    ours.mode = "zscore"  # the same value: no change, no error
