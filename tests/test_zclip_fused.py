"""ZClip's fused step (csrc/common/zclip_rule.h, fusedclip/backends/triton/zclip.py) on every backend: parity with zclip 1.0.0,
the spike guard (on_spike / on_nonfinite "skip") with fused and unfused optimizers, AMP in the same pass,
torch.compile, the no-write path, and (GPU) CUDA-graph replay. tests/test_zclip.py covers the rules in depth
on the default backend."""
import copy
import math

import pytest
import torch

import fusedclip
import zclip  # the published implementation (`make setup` installs zclip 1.0.0)
from conftest import BACKENDS, DEVICES
from test_zclip import CONFIGS, SPIKES, _compare, _grad_sequence, _lockstep, _mixed_scale_grads, _model, _run

WARMUP = 5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_backend_matches_zclip(device, backend, dtype, config):
    kw = dict(config, warmup_steps=WARMUP, max_grad_norm=1.0, skip_update_on_spike=config.get("mode") == "percentile")
    model = _model(dtype).to(device)
    seq = [[g.to(device) for g in gs] for gs in _grad_sequence(model, dtype, steps=24)]
    theirs = _run(zclip.ZClip(**kw), copy.deepcopy(model), seq)
    ours = _run(fusedclip.ZClip(**kw, backend=backend), copy.deepcopy(model), seq)
    _compare(ours, theirs, dtype, f"{backend} {kw}")
    assert [c for _, _, c in ours] == [c for _, _, c in theirs]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_public_state_and_apply_in_place_clipping(backend, dtype):
    """zclip's public attributes, seeded then stepped, bit for bit with zclip (one-element gradients: the same
    norm on both sides; see tests/test_zclip.py), and apply_in_place_clipping's gradients, on every backend."""
    kw = dict(warmup_steps=WARMUP, max_grad_norm=2.0)
    p, q = torch.nn.Parameter(torch.zeros(1, dtype=dtype)), torch.nn.Parameter(torch.zeros(1, dtype=dtype))
    seq = _mixed_scale_grads([(1,)], dtype, 16, seed=6)
    _lockstep(fusedclip.ZClip(**kw, backend=backend), zclip.ZClip(**kw), [p], [q], seq,
              exact=dtype != torch.bfloat16, seed_at={3: (0.5, 0.04)}, where=backend)
    model = _model(dtype)
    ref_model = copy.deepcopy(model)
    for m, clipper in ((model, fusedclip.ZClip(backend=backend)), (ref_model, zclip.ZClip())):
        for i, prm in enumerate(m.parameters()):
            prm.grad = torch.linspace(-1, 1, prm.numel(), dtype=torch.float64).reshape(prm.shape).to(dtype) * (i + 1)
        clipper.apply_in_place_clipping(m, 3.7, 0.123)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(model.parameters(), ref_model.parameters()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_grads_match_the_fp32_rule(device, backend):
    """bf16/fp16 gradients: the norm is accumulated in fp32 (zclip would take it in bf16), so the same decisions
    as on an fp32 copy of the gradients, and the grads scaled by the fp32 coefficient."""
    model = _model(torch.float32).to(device)
    seq = _grad_sequence(model, torch.float32, steps=20)
    for dtype in (torch.bfloat16, torch.float16):
        low = [[g.to(device, dtype) for g in gs] for gs in seq]
        ref = _run(fusedclip.ZClip(warmup_steps=WARMUP, backend=backend), copy.deepcopy(model),
                   [[g.float() for g in gs] for gs in low])
        mine = _run(fusedclip.ZClip(warmup_steps=WARMUP, backend=backend), copy.deepcopy(model).to(dtype), low)
        for t, ((n1, g1, c1), (n2, g2, c2)) in enumerate(zip(mine, ref)):
            assert n1.dtype == torch.float32 and c1 == c2, (dtype, t)
            torch.testing.assert_close(n1, n2, rtol=1e-6, atol=0)
            for a, b in zip(g1, g2):
                torch.testing.assert_close(a, b.to(dtype), rtol=0, atol=0) if not c1 else \
                    torch.testing.assert_close(a.float(), b, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_write_when_nothing_is_clipped(backend):
    """After the warm-up a step that clips nothing leaves the gradients' bits alone; the CPU kernel does not even
    write them (their version counters stay; CUDA and Triton ops declare the mutation, so theirs move)."""
    counts_writes = backend == "native"
    model = _model(torch.float32)
    clipper = fusedclip.ZClip(warmup_steps=2, max_grad_norm=None, backend=backend)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    clipper.step(model)
    clipper.step(model)  # the warm-up: the same norm twice, so the EMA's variance is 0
    for p in model.parameters():
        p.grad.mul_(0.5)  # a norm below the mean: no spike
    before = [(p.grad._version, p.grad.clone()) for p in model.parameters()]
    clipper.step(model)
    for (v, g), p in zip(before, model.parameters()):
        assert torch.equal(p.grad, g) and (p.grad._version == v or not counts_writes)
    for p in model.parameters():
        p.grad.mul_(40.0)  # a spike: clipped
    v2 = [(p.grad._version, p.grad.clone()) for p in model.parameters()]
    clipper.step(model)
    assert all(p.grad._version > v and not torch.equal(p.grad, g) for p, (v, g) in zip(model.parameters(), v2))


def _train(model, seq, clipper, optimizer, skipped_by=None):
    """Sets each step's gradients, clips and steps; with skipped_by (a list of booleans) the optimizer step is
    left out where True instead. Returns per step (params, skipped count)."""
    out = []
    for t, grads in enumerate(seq):
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        if skipped_by is None:
            clipper.step(model, optimizer)
            optimizer.step()
            count = int(clipper.skipped_steps)
        else:
            clipper.step(model)
            if not skipped_by[t]:
                optimizer.step()
            count = None
        out.append(([p.detach().clone() for p in model.parameters()], count))
    return out


OPTIMIZERS = {
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "sgd-fused": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, fused=True),
    "adam-foreach": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True),
    "adamw-forloop": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False),
}


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_on_spike_skip_leaves_the_step_out(backend, opt):
    """A spike's optimizer step is skipped: the parameters (and moments, step counts, weight decay) are exactly
    those of a run that did not call optimizer.step() on those steps."""
    model = _model(torch.float32)
    seq = _grad_sequence(model, torch.float32, steps=26)
    guarded = copy.deepcopy(model)
    a = _train(guarded, seq, fusedclip.ZClip(warmup_steps=WARMUP, on_spike="skip", backend=backend),
               OPTIMIZERS[opt](guarded.parameters()))
    counts = [0] + [c for _, c in a]
    skipped = [counts[t + 1] > counts[t] for t in range(len(seq))]
    assert any(skipped) and not all(skipped[WARMUP:]), skipped
    assert all(skipped[t] for t in SPIKES if WARMUP <= t < len(seq)), skipped  # the injected spikes are among them
    plain = copy.deepcopy(model)
    b = _train(plain, seq, fusedclip.ZClip(warmup_steps=WARMUP, backend=backend),
               OPTIMIZERS[opt](plain.parameters()), skipped_by=skipped)
    for t, ((pa, _), (pb, _)) in enumerate(zip(a, b)):
        assert all(torch.equal(x, y) for x, y in zip(pa, pb)), (opt, t)
    for p in guarded.parameters():  # the gradients are back after a hidden (unfused) step
        assert p.grad is not None


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
@pytest.mark.parametrize("opt", ["adamw-fused", "adam-foreach"])
def test_on_nonfinite_skip_keeps_everything_finite(backend, opt):
    """A NaN gradient (and an inf one): zclip's EMA would be NaN for good; with on_nonfinite="skip" the step
    is skipped, the statistics do not take it in, and the training goes on finite."""
    model = _model(torch.float32)
    seq = _grad_sequence(model, torch.float32, steps=20, bad={3: math.nan, 12: math.inf})
    clipper = fusedclip.ZClip(warmup_steps=WARMUP, on_nonfinite="skip", backend=backend)
    a = _train(model, seq, clipper, OPTIMIZERS[opt](model.parameters()))
    counts = [c for _, c in a]
    assert counts[2] == 0 and counts[3] == 1 and counts[12] >= 2, counts
    assert all(torch.equal(x, y) for x, y in zip(a[2][0], a[3][0]))  # step 3 changed nothing
    assert all(torch.isfinite(x).all() for x in a[-1][0])
    sd = clipper.state_dict()
    assert math.isfinite(sd["mean"].item()) and math.isfinite(sd["var"].item())
    assert sd["steps"] == 20 - 2 and sd["skipped"] == counts[-1]


def test_skip_needs_the_optimizer_and_changes_nothing_without():
    model = _model(torch.float32)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 100
    before = [p.grad.clone() for p in model.parameters()]
    clipper = fusedclip.ZClip(warmup_steps=1, on_spike="skip")
    with pytest.raises(ValueError, match="pass the optimizer"):
        clipper.step(model)
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))
    assert clipper.steps == 0
    with pytest.raises(ValueError, match="on_spike"):
        fusedclip.ZClip(on_spike="drop")
    with pytest.raises(ValueError, match="on_nonfinite"):
        fusedclip.ZClip(on_nonfinite=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_amp_unscale_in_the_same_pass(backend):
    """step(model, optimizer, scaler=): as scaler.unscale_(optimizer) then step(model), in one pass; the
    scaler then skips and lowers its scale on inf exactly as after unscale_."""
    model = _model(torch.float32)
    seq = _grad_sequence(model, torch.float32, steps=12, bad={8: math.inf})
    runs = []
    for fused in (True, False):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        clipper = fusedclip.ZClip(warmup_steps=3, backend=backend)
        out = []
        for grads in seq:
            scale = scaler.scale(torch.ones(()))  # what scaler.scale(loss) would have done: the scale's set-up
            for p, g in zip(m.parameters(), grads):
                p.grad = g * scale
            if fused:
                norm = clipper.step(m, opt, scaler=scaler)
            else:
                scaler.unscale_(opt)
                norm = clipper.step(m)
            out.append((norm.clone(), [p.grad.clone() for p in m.parameters()]))
            scaler.step(opt)
            scaler.update()
        runs.append((out, [p.detach().clone() for p in m.parameters()], scaler.get_scale()))
    (a, pa, sa), (b, pb, sb) = runs
    assert sa == sb == 512.0  # one overflow
    for t, ((n1, g1), (n2, g2)) in enumerate(zip(a, b)):
        torch.testing.assert_close(n1, n2, rtol=1e-6, atol=0, equal_nan=True, msg=f"step {t}")
        for x, y in zip(g1, g2):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9, equal_nan=True, msg=f"step {t}")
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_amp_with_skip_is_refused():
    model = _model(torch.float32)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NotImplementedError, match="GradScaler"):
        fusedclip.ZClip(on_spike="skip").step(model, opt, scaler=torch.amp.GradScaler("cpu"))


def test_compile_fullgraph_matches_eager():
    """torch.compile(fullgraph=True) traces the step (the state is an op argument marked as mutated): the same
    norms and gradients, bit for bit, as eager steps, through the warm-up and after it."""
    model = _model(torch.float32)
    seq = _grad_sequence(model, torch.float32, steps=14)
    eager_model, compiled_model = copy.deepcopy(model), copy.deepcopy(model)
    eager, comp = fusedclip.ZClip(warmup_steps=WARMUP), fusedclip.ZClip(warmup_steps=WARMUP)
    params = list(compiled_model.parameters())
    step = torch.compile(lambda: comp.step(params), fullgraph=True)  # Inductor
    a = _run(eager, eager_model, seq)
    b = []
    for grads in seq:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        b.append((step(), [p.grad.clone() for p in params]))
    for t, ((n1, g1, _), (n2, g2)) in enumerate(zip(a, b)):
        assert torch.equal(n1, n2), t
        assert all(torch.equal(x, y) for x, y in zip(g1, g2)), t
    assert torch.equal(eager._state, comp._state)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in fusedclip.available_backends("cuda")] or ["native"])
def test_gpu_cuda_graph_replay(backend):
    """After one eager step, a captured step replays with the state advancing on the device: the same norms,
    gradients and state as eager steps, bit for bit (the same kernel)."""
    model = _model(torch.float32).cuda()
    seq = [[g.cuda() for g in gs] for gs in _grad_sequence(model, torch.float32, steps=16)]
    eager_model, graph_model = copy.deepcopy(model), copy.deepcopy(model)
    eager, graphed = fusedclip.ZClip(warmup_steps=WARMUP, backend=backend), \
        fusedclip.ZClip(warmup_steps=WARMUP, backend=backend)
    a = _run(eager, eager_model, seq)
    params = list(graph_model.parameters())
    for p, g in zip(params, seq[0]):
        p.grad = g.clone()
    first = graphed.step(params)  # warm-up call: table, compiled kernels, state on the device
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(graph, stream=s):
        out = graphed.step(params)
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(first, a[0][0])
    for t, grads in enumerate(seq[1:], start=1):
        for p, g in zip(params, grads):
            p.grad.copy_(g)
        graph.replay()
        assert torch.equal(out, a[t][0]), t
        assert all(torch.equal(p.grad, x) for p, x in zip(params, a[t][1])), t
    torch.testing.assert_close(graphed._state, eager._state, rtol=0, atol=0)


def test_fast_path_is_taken_and_equals_the_op_path(monkeypatch):
    """Eager steps after the first go through the C++ fast path (csrc/python_module.cpp) and give the op path's
    bits."""
    import fusedclip.zclip as zc

    model = _model(torch.float32)
    seq = _grad_sequence(model, torch.float32, steps=16)
    calls = []
    real = fusedclip._ext._C.zclip_grads
    monkeypatch.setattr(fusedclip._ext._C, "zclip_grads", lambda *a: calls.append(1) or real(*a))
    m_fast = copy.deepcopy(model)
    opt = torch.optim.SGD(m_fast.parameters(), lr=0.0)
    clipper = fusedclip.ZClip(warmup_steps=WARMUP, on_spike="skip")
    fast = []
    for grads in seq:
        for p, g in zip(m_fast.parameters(), grads):
            p.grad = g.clone()
        fast.append((clipper.step(m_fast, opt), [p.grad.clone() for p in m_fast.parameters()]))
    assert len(calls) == len(seq) - 1  # every step but the first (which creates the state)
    monkeypatch.setattr(fusedclip.backends, "fast_path_allowed", lambda backend: False)
    m_op = copy.deepcopy(model)
    opt2 = torch.optim.SGD(m_op.parameters(), lr=0.0)
    clipper2 = fusedclip.ZClip(warmup_steps=WARMUP, on_spike="skip")
    for t, grads in enumerate(seq):
        for p, g in zip(m_op.parameters(), grads):
            p.grad = g.clone()
        n = clipper2.step(m_op, opt2)
        assert torch.equal(n, fast[t][0]), t
        assert all(torch.equal(p.grad, g) for p, g in zip(m_op.parameters(), fast[t][1])), t
    assert torch.equal(clipper._state, clipper2._state) and clipper2.skipped_steps.item() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("on_spike", ["clip", "skip"])
def test_step_into_a_fused_optimizer(backend, on_spike):
    """step_into(optimizer): the coefficient goes to the fused optimizer's grad_scale; the gradients are only
    read; the parameters follow step() + optimizer.step() up to the rounding of grad / (1 / coef). With
    on_spike="skip" the spikes' steps are skipped there too."""
    model = _model(torch.float32)
    seq = _grad_sequence(model, torch.float32, steps=20)
    runs = []
    for into in (True, False):
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
        clipper = fusedclip.ZClip(warmup_steps=WARMUP, on_spike=on_spike, backend=backend)
        out = []
        for grads in seq:
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
            if into:
                norm = clipper.step_into(opt)
                assert all(torch.equal(p.grad, g) for p, g in zip(m.parameters(), grads))  # not written
            else:
                norm = clipper.step(m, opt if on_spike == "skip" else None)
            opt.step()
            assert getattr(opt, "grad_scale", None) is None  # for one step only
            out.append((norm, [p.detach().clone() for p in m.parameters()], clipper.skipped_steps.item()))
        runs.append(out)
    for t, ((n1, p1, s1), (n2, p2, s2)) in enumerate(zip(*runs)):
        assert torch.equal(n1, n2) and s1 == s2, t
        for a, b in zip(p1, p2):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {t}: {m}")
    assert (runs[0][-1][2] > 0) == (on_spike == "skip")


@pytest.mark.skipif("triton" not in fusedclip.available_backends("cpu") and not torch.cuda.is_available(),
                    reason="no Triton backend here (the interpreter child of tests/test_triton.py runs it)")
def test_triton_one_launch_equals_two_launches(monkeypatch):
    """Triton's two variants (state read before the grid barrier and written by program 0; or written by the
    last program to take a ticket) give the same norms, gradients and state, bit for bit."""
    from fusedclip.backends.triton import launcher as tlauncher

    device = "cpu" if tlauncher.INTERPRET else "cuda"
    model = _model(torch.float32).to(device)
    seq = [[g.to(device) for g in gs] for gs in _grad_sequence(model, torch.float32, steps=14)]
    runs = []
    for launch in ("one", "two"):
        monkeypatch.setattr(tlauncher, "LAUNCH", launch)
        clipper = fusedclip.ZClip(warmup_steps=WARMUP, on_spike="skip", backend="triton")
        m = copy.deepcopy(model)
        runs.append((_run_with(clipper, m, seq, torch.optim.SGD(m.parameters(), lr=0.0)), clipper._state.clone()))
    (a, sa), (b, sb) = runs
    assert torch.equal(sa, sb) and sa[3] > 0  # some steps skipped
    for t, ((n1, g1), (n2, g2)) in enumerate(zip(a, b)):
        assert torch.equal(n1, n2) and all(torch.equal(x, y) for x, y in zip(g1, g2)), t


def _run_with(clipper, model, seq, optimizer):
    out = []
    for grads in seq:
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        out.append((clipper.step(model, optimizer), [p.grad.clone() for p in model.parameters()]))
    return out
