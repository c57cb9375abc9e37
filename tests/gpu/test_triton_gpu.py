"""The compiled Triton kernels on the GPU, what tests/test_triton.py (one launch against two, bit for bit; every dtype
set, norm and clipping or not) and test_checks.py (graph replay, two streams, sync, compile) do not already do:
the grid barrier's counters back at zero, every one-launch variant resident twice over (two calls at once), and the
fused extras (per-tensor norms, AMP's unscale) in both launch variants against each other, the native backend, a
float64 reference and torch. The residency rule itself runs on the CPU too (`cpu_logic`).
"""
import math
import types

import pytest
import torch

import fusedclip
from fusedclip.testing import assert_bit_identical, device_grads, ref_norm, rel_err, same_bits

SHAPES = [(4096, 1024), (1024,), (3000, 77), (5,), (0,), (50257, 64), (16385,), (7,)]


@pytest.fixture(scope="module")
def tb():
    pytest.importorskip("triton")
    if "triton" not in fusedclip.available_backends("cuda"):
        pytest.skip("the triton backend does not run on CUDA here (python -m fusedclip info says why)")
    from fusedclip.backends.triton import clip, kernels, launcher
    return types.SimpleNamespace(clip=clip, kernels=kernels, launcher=launcher)  # the modules: tests patch them


def grads(seed, dtypes, scale=0.1):
    return device_grads(SHAPES, dtypes, seed=seed, scale=scale)


@pytest.mark.gpu_seconds(5)
def test_barrier_counters_back_at_zero(tb):
    tb.clip.clip(grads(7, [torch.float32]), 0.5, 2.0, launch="one")
    ws = tb.launcher._WORKSPACES.get(torch.device("cuda", torch.cuda.current_device()))
    torch.cuda.synchronize()
    assert ws is not None and all(v == 0 for v in ws.flatten().tolist()), ws


def residency_problems(launches, sms, **limits):
    """Grid-barrier launches whose programs two calls at once could not all hold on the SMs: for each launch
    (kernel name, programs, the compiled kernel's registers a thread, shared bytes), the programs per SM it uses,
    doubled (a second call at once: two streams, a graph beside an eager call), must fit in what an SM holds of
    that compiled kernel (launcher.resident_per_sm, limits: the device's)."""
    from fusedclip.backends.triton import launcher
    problems = []
    for name, programs, regs, shared in launches:
        fit = launcher.resident_per_sm(regs, shared, **limits)
        used = -(-programs // sms)
        if 2 * used > fit:
            problems.append(f"{name}: {programs} programs on {sms} SMs ({used} per SM), twice that does not fit in "
                            f"{fit} per SM ({regs} registers, {shared} B shared)")
    return problems


def record_barrier_launches(tb, call):
    """[(kernel name, programs, registers, shared)] of the grid-barrier (one-launch) kernels call() launched, read
    from the launches themselves (launcher._launch), not from bookkeeping that may change."""
    launches, launch = [], tb.launcher._launch

    def recording(kernel, programs, *args, options=None, **constexprs):
        launch(kernel, programs, *args, options=options, **constexprs)
        if constexprs.get("ONE_LAUNCH", kernel is tb.kernels._one_launch_kernel):
            compiled = tb.launcher._compiled[kernel.__name__]
            launches.append((kernel.__name__, programs, compiled.n_regs, compiled.metadata.shared))
    tb.launcher._launch = recording
    try:
        call()
    finally:
        tb.launcher._launch = launch
    return launches


@pytest.mark.gpu_seconds(20)
def test_one_launch_variants_resident_twice_over(tb, record_property):
    """Two one-launch calls at once (two streams, a graph beside an eager call) must all be resident, or a grid
    barrier never opens: the compiled kernel's registers and shared memory decide how many programs an SM holds.
    Every one-launch variant the public calls use (L2, inf with AMP and per-tensor norms, fp64, ZClip), on a set
    with more chunks than the grid has programs."""
    from fusedclip.backends.triton import zclip as tz
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    limits = {name: getattr(props, attr) for name, attr in
              (("regs_per_sm", "regs_per_multiprocessor"), ("threads_per_sm", "max_threads_per_multi_processor"),
               ("shared_per_sm", "shared_memory_per_multiprocessor")) if getattr(props, attr, None)}
    mixed = [torch.float32, torch.bfloat16]
    calls = {
        "L2": lambda: tb.clip.clip(grads(8, mixed), 0.5, 2.0, launch="one"),
        "inf AMP per-tensor": lambda: tb.clip.clip(grads(9, mixed), 0.5, math.inf, launch="one",
                                                   per_tensor=torch.empty(len(SHAPES), device="cuda"),
                                                   inv_scale=torch.full((), 0.5, device="cuda"),
                                                   found_inf=torch.zeros((), device="cuda")),
        "fp64": lambda: tb.clip.clip(grads(10, [torch.float64, torch.float32]), 0.5, 2.0, launch="one"),
        "zclip": lambda: tz.zclip(grads(11, mixed), torch.zeros(tz.BUFFER + 2, dtype=torch.float64, device="cuda"),
                                  [0.97, 2.5, 1.0, 1.0, 1e-6, 2.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0], launch="one"),
    }
    problems, notes = [], []
    for what, call in calls.items():
        launches = record_barrier_launches(tb, call)
        assert launches, f"{what}: no one-launch kernel was launched"
        for name, programs, regs, shared in launches:
            notes.append(f"{what}: {name} {regs} regs, {shared} B shared, {programs} programs on "
                         f"{props.multi_processor_count} SMs, "
                         f"{tb.launcher.resident_per_sm(regs, shared, **limits)} fit per SM")
        problems += [f"{what}: {p}" for p in residency_problems(launches, props.multi_processor_count, **limits)]
    record_property("note", "residency " + "; ".join(notes))
    assert not problems, problems


@pytest.mark.cpu_logic
def test_residency_rule():
    """The rule above (issue 25, defect 9: the old residency check read an attribute that no longer existed and
    checked nothing): a grid-barrier launch whose programs per SM, doubled, do not fit is reported."""
    pytest.importorskip("triton")
    sms = 132
    assert residency_problems([("_one_launch_kernel", 2 * sms, 128, 8192)], sms) == []  # 4 fit an SM
    (problem,) = residency_problems([("_one_launch_kernel", 2 * sms, 168, 8192)], sms)  # 2 fit: 2 x 2 > 2
    assert "2 per SM" in problem and "168 registers" in problem
    assert residency_problems([("_zclip_kernel", sms, 255, 0)], sms) == []  # 2 fit: one each
    assert residency_problems([("_zclip_kernel", sms + 1, 255, 0)], sms) != []  # 2 on one SM: 4 > 2


@pytest.mark.gpu_seconds(15)
@pytest.mark.parametrize("dtypes", ["mixed", "mixed64"])
def test_per_tensor_norms_both_variants(tb, dtypes):
    """Per-tensor norms in the kernels' own pass: one launch and two bit for bit, the norms against float64 and
    the native backend."""
    dtypes, acc = ({"mixed": ([torch.float32, torch.bfloat16], torch.float32),
                    "mixed64": ([torch.float32, torch.float64], torch.float64)})[dtypes]
    grads0 = grads(5, dtypes)
    runs = []
    for launch in ("one", "two"):
        norms = torch.randn(len(grads0), dtype=acc, device="cuda")  # overwritten: garbage in must not leak out
        g = [x.clone() for x in grads0]
        runs.append((tb.clip.clip(g, 0.5, 2.0, per_tensor=norms, launch=launch), norms, g))
    (na, pa, ga), (nb, pb, gb) = runs
    assert_bit_identical(na, nb)
    assert_bit_identical(pa, pb)
    for x, y in zip(ga, gb):
        assert_bit_identical(x, y)
    tol = 1e-12 if acc == torch.float64 else 2e-6
    for got, x in zip(pa.tolist(), grads0):
        want = float(ref_norm([x], 2.0))
        assert (got == want == 0.0) or rel_err(got, want) <= tol, (tuple(x.shape), got, want)
    _, native = fusedclip.get_total_norm(grads0, 2.0, per_tensor=True, backend="native")
    torch.testing.assert_close(pa, native.to(pa.dtype), rtol=1e-5, atol=0)


@pytest.mark.gpu_seconds(15)
@pytest.mark.parametrize("bad", [None, math.inf, math.nan], ids=["finite", "inf", "nan"])
def test_amp_unscale_both_variants(tb, bad):
    """AMP's unscale (inv_scale, found_inf) in the kernels' own pass: one launch and two bit for bit; found_inf
    as torch's; norm and gradients as torch's unscale + clip; finite, against float64 and written once as
    grad * (inv_scale * coef)."""
    base = [x * 3000 for x in grads(6, [torch.float32, torch.bfloat16])]
    if bad is not None:
        base[0][1, 2] = bad
    inv = torch.tensor(1 / 3000.0, device="cuda")
    ref = float(ref_norm([x.double() * float(inv) for x in base if x.numel()], 2.0)) if bad is None else 1.0
    runs = []
    for launch in ("one", "two"):
        g, found = [x.clone() for x in base], torch.zeros((), device="cuda")
        runs.append((tb.clip.clip(g, 0.5 * ref, 2.0, inv_scale=inv, found_inf=found, launch=launch), g, found))
    (na, ga, fa), (nb, gb, fb) = runs
    assert same_bits(na, nb) and same_bits(fa, fb) and all(same_bits(x, y) for x, y in zip(ga, gb))
    theirs, their_found = [x.clone() for x in base], torch.zeros((), device="cuda")
    torch._amp_foreach_non_finite_check_and_unscale_(theirs, their_found, inv)
    params = [torch.nn.Parameter(torch.empty_like(x)) for x in theirs]
    for q, x in zip(params, theirs):
        q.grad = x
    their_norm = torch.nn.utils.clip_grad_norm_(params, 0.5 * ref)
    assert float(fa) == float(their_found) == (0.0 if bad is None else 1.0)
    torch.testing.assert_close(na, their_norm, rtol=1.6e-2, atol=0, equal_nan=True)
    for x, y in zip(ga, theirs):
        torch.testing.assert_close(x.double(), y.double(), rtol=3.2e-2, atol=1e-5, equal_nan=True)
    if bad is None:
        assert rel_err(na, ref) <= 2e-6, (float(na), ref)
        # fp32 division, as in the kernel (a Python float over a tensor would multiply by a reciprocal)
        coef = torch.clamp(torch.tensor(0.5 * ref, device="cuda") / (na + 1e-6), max=1.0)
        for x, y in zip(ga, base):
            assert_bit_identical(x, (y.float() * (inv * coef)).to(y.dtype))


@pytest.mark.gpu_seconds(10)
def test_unscale_clip_with_grad_scaler(tb):
    """The public path: GradScaler("cuda") + unscale_clip_(backend="triton") against scaler.unscale_ +
    clip_grad_norm_: an inf skips the step and lowers the scale as torch does; finite, the same update."""
    def amp_model(inf):
        torch.manual_seed(7)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 8)).cuda()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cuda", init_scale=3000.0, growth_interval=1)
        scaler.scale(model(torch.randn(32, 64, device="cuda")).square().mean()).backward()
        if inf:
            model[2].weight.grad[0, 0] = float("inf")
        return model, opt, scaler

    for inf in (True, False):
        (ma, oa, sa), (mb, ob, sb) = amp_model(inf), amp_model(inf)
        before = [p.detach().clone() for p in ma.parameters()]
        na = fusedclip.unscale_clip_(sa, oa, 0.5, backend="triton")
        sb.unscale_(ob)
        nb = torch.nn.utils.clip_grad_norm_(mb.parameters(), 0.5)
        for s, o in ((sa, oa), (sb, ob)):
            s.step(o)
            s.update()
        assert sa.get_scale() == sb.get_scale()
        if inf:
            assert sa.get_scale() < 3000.0 and all(torch.equal(p, b) for p, b in zip(ma.parameters(), before))
        else:
            torch.testing.assert_close(na, nb, rtol=1e-5, atol=0)
            for a, b in zip(ma.parameters(), mb.parameters()):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
