"""fusedclip.AdaGC against a float64 reference of the paper's rule (fusedclip.testing.AdaGCReference), its warm-up
against clip_, its state_dict, its freedom from host syncs, and its use inside backward (examples/adagc_in_backward.py)
against running it after backward. The authors' code is a Megatron-LM patch (needs apex and CUDA), not installable
here: the reference is written from the paper."""
import copy
import importlib.util
import math
import pathlib

import pytest
import torch

import fusedclip
from fusedclip.testing import AdaGCReference, NoHostRead, assert_bit_identical

from conftest import BACKENDS, HAS_GPU

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHAPES = [(33, 17), (1,), (257,), (8, 8, 3), (1000,), (5, 129)]
SCALES = [3e-3, 2.0, 0.05, 40.0, 1e-2, 0.7]  # each tensor's typical scale: a model's gradients span decades


def stream(steps, seed, spikes=((5, 3), (8, 0), (8, 4)), missing=((6, 2),), dtype=torch.float32):
    """Per step, fresh gradients: each tensor at its own scale times a factor in [0.8, 1.25) (the noise of training),
    x40 for (step, tensor) in spikes; None for (step, tensor) in missing. Steps count from 1."""
    g = torch.Generator().manual_seed(seed)
    for t in range(1, steps + 1):
        grads = []
        for i, (shape, scale) in enumerate(zip(SHAPES, SCALES)):
            factor = 0.8 + 0.45 * torch.rand((), generator=g, dtype=torch.float64).item()
            v = torch.randn(shape, generator=g, dtype=torch.float64) * scale * factor
            if (t, i) in spikes:
                v = v * 40
            grads.append(None if (t, i) in missing else v.to(dtype))
        yield t, grads


def as_params(grads):
    params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()
    return params


def load(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_matches_the_papers_rule(backend):
    """Every step's clipped gradients and every threshold agree with the float64 reference: through the warm-up
    (global clipping), the per-tensor rule, spikes, and a tensor without a gradient for one step."""
    steps, warmup = 10, 3
    params = as_params([None] * len(SHAPES))
    # lambda_abs near the usual total norm (450 to 700): the warm-up clips some steps, a little
    clipper = fusedclip.AdaGC(params, lambda_abs=500.0, warmup_steps=warmup, backend=backend)
    ref = AdaGCReference(len(SHAPES), lambda_abs=500.0, warmup_steps=warmup)
    warm_clipped = 0
    clipped_hard = clipped_soft = untouched = 0
    for t, grads in stream(steps, seed=1):
        load(params, grads)
        norm = clipper.step()
        want, coefs = ref.step(grads)
        present = [g for g in grads if g is not None]
        torch.testing.assert_close(norm.double(), torch.tensor(math.sqrt(sum(float(g.double().pow(2).sum())
                                                                              for g in present)), dtype=torch.float64),
                                   rtol=2e-6, atol=0)
        for p, w in zip(params, want):
            if w is None:
                continue
            torch.testing.assert_close(p.grad.double(), w, rtol=4e-6, atol=1e-30)
        torch.testing.assert_close(clipper.gamma, torch.tensor(ref.gamma, dtype=torch.float64), rtol=4e-6, atol=0)
        warm_clipped += t <= warmup and coefs[0] < 1.0
        if t > warmup:
            clipped_hard += sum(c is not None and c < 0.1 for c in coefs)
            clipped_soft += sum(c is not None and 0.1 <= c < 1.0 for c in coefs)
            untouched += sum(c == 1.0 for c in coefs)
    # the case covers each branch: the warm-up clipping, spikes clipped hard, noise clipped a little (the thresholds
    # start at the smallest warm-up norm), tensors left alone
    assert warm_clipped >= 1 and clipped_hard >= 3 and clipped_soft >= 1 and untouched >= 5
    assert clipper.steps == steps


@pytest.mark.parametrize("backend", BACKENDS)
def test_warmup_step_is_clip_(backend):
    """A warm-up step is fusedclip.clip_(params, lambda_abs): the same gradients, bit for bit, and the same norm."""
    _, grads = next(stream(1, seed=2))
    a, b = as_params(grads), as_params(grads)
    norm = fusedclip.AdaGC(a, lambda_abs=0.5, backend=backend).step()
    want = fusedclip.clip_(b, 0.5, backend=backend)
    assert float(want) > 5.0  # clipping is active
    assert_bit_identical(norm, want)
    for pa, pb in zip(a, b):
        assert_bit_identical(pa.grad, pb.grad)


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_no_host_read_of_the_state(backend):
    """No step reads a device value on the host (the op every sync goes through on CPU as on CUDA), in the warm-up,
    after it, with a gradient missing, and from a hook. The mode does catch a read (checked first)."""
    with pytest.raises(AssertionError, match="host read"), NoHostRead():
        torch.ones(2).sum().item()
    params = as_params([None] * len(SHAPES))
    clipper = fusedclip.AdaGC(params, warmup_steps=2, backend=backend)
    for _, grads in stream(7, seed=3, missing=((4, 1),)):
        load(params, grads)
        with NoHostRead():
            clipper.step()
    w = torch.nn.Parameter(torch.randn(4, 3))
    hooked = fusedclip.AdaGC([w], warmup_steps=0, backend=backend)
    w.register_post_accumulate_grad_hook(hooked.clip_param_)
    with NoHostRead():
        (w * torch.randn(4, 3)).sum().backward()
    assert hooked.steps == 1


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="no GPU")
def test_no_sync_on_cuda():
    """compiled, run only where a GPU is: step() and clip_param_ under torch.cuda.set_sync_debug_mode('error')."""
    params = as_params([None] * len(SHAPES))
    for p in params:
        p.data = p.data.cuda()
    clipper = fusedclip.AdaGC(params, warmup_steps=2)
    for _, grads in stream(6, seed=4, missing=((4, 1),)):
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.cuda()
        torch.cuda.set_sync_debug_mode("error")
        try:
            clipper.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)


def test_state_dict_resumes_exactly():
    """A clipper loaded from another's state_dict mid-run (after the warm-up) clips the next steps bit for bit as the
    original does; a state of the wrong length is refused."""
    steps = list(stream(9, seed=5))
    a = as_params([None] * len(SHAPES))
    clip_a = fusedclip.AdaGC(a, warmup_steps=3)
    for _, grads in steps[:5]:
        load(a, grads)
        clip_a.step()
    saved = clip_a.state_dict()
    b = as_params([None] * len(SHAPES))
    clip_b = fusedclip.AdaGC(b, warmup_steps=3)
    clip_b.load_state_dict(copy.deepcopy(saved))
    assert clip_b.steps == 5 and not clip_b.in_warmup
    for _, grads in steps[5:]:
        load(a, grads)
        load(b, grads)
        clip_a.step()
        clip_b.step()
        for pa, pb in zip(a, b):
            if pa.grad is not None:
                assert_bit_identical(pa.grad, pb.grad)
    assert_bit_identical(clip_a.gamma, clip_b.gamma)
    with pytest.raises(ValueError, match="one per parameter"):
        fusedclip.AdaGC(b[:2]).load_state_dict(saved)


def test_nonfinite_norm_leaves_the_threshold():
    """An inf gradient scales as torch's clip would (NaN where inf) but does not change its tensor's threshold; the
    other tensors go on as usual."""
    params = as_params([None] * len(SHAPES))
    clipper = fusedclip.AdaGC(params, warmup_steps=1)
    it = stream(3, seed=6, spikes=(), missing=())
    _, grads = next(it)
    load(params, grads)
    clipper.step()
    before = clipper.gamma.clone()
    _, grads = next(it)
    grads[3][0, 0, 0] = math.inf
    load(params, grads)
    clipper.step()
    assert before[3] == clipper.gamma[3] and math.isfinite(float(before[3]))
    assert bool((before[[0, 1, 2, 4, 5]] != clipper.gamma[[0, 1, 2, 4, 5]]).all())


def test_clip_param_refuses_the_warmup_and_outside_backward():
    w = torch.nn.Parameter(torch.randn(3))
    w.grad = torch.randn(3)
    with pytest.raises(RuntimeError, match="warm-up"):
        fusedclip.AdaGC([w], warmup_steps=1).clip_param_(w)
    with pytest.raises(RuntimeError, match="inside a backward"):
        fusedclip.AdaGC([w], warmup_steps=0).clip_param_(w)


@pytest.mark.parametrize("kwargs", [{"lambda_rel": 0.0}, {"beta": 1.0}, {"beta": -0.1}, {"lambda_abs": math.nan},
                                    {"warmup_steps": 1.5}, {"eps": 0.0}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="fusedclip.AdaGC"):
        fusedclip.AdaGC([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_in_backward_matches_after_backward():
    """examples/adagc_in_backward.py: the optimizer stepped from each parameter's post-accumulate-grad hook, AdaGC
    clipping the parameter first, gives the parameters of AdaGC then the same steps after backward, step by step
    (bit for bit), through the warm-up, the switch and the batches that spike."""
    spec = importlib.util.spec_from_file_location("adagc_in_backward", ROOT / "examples" / "adagc_in_backward.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    diffs = example.run(steps=16, warmup=4, seed=0, log=lambda line: None)
    assert diffs == [0.0] * 16
    # and the run is one where clipping matters: without it the spiking batches move the parameters elsewhere
    model = example.make_model(0)
    plain = copy.deepcopy(model)
    clipper = fusedclip.AdaGC(model, warmup_steps=4)
    opts = {p: torch.optim.AdamW([p], lr=1e-3, foreach=False) for p in model.parameters()}
    popts = {p: torch.optim.AdamW([p], lr=1e-3, foreach=False) for p in plain.parameters()}
    spread = []
    for x, y in example.batches(16, 1):
        example.train_step_after_backward(model, clipper, opts, x, y)
        torch.nn.functional.mse_loss(plain(x), y).backward()
        for opt in popts.values():
            opt.step()
            opt.zero_grad()
        spread.append(max((a - b).abs().max().item() for a, b in zip(model.parameters(), plain.parameters())))
    assert spread[-1] > 1e-4


def test_bench_rows_baseline_is_the_same_rule():
    """fusedclip/bench/adagc_rows.py: its unfused torch baseline clips as fusedclip.AdaGC does (the benchmark compares
    the same thing), and its rows run (smallest sizes)."""
    from fusedclip.bench import adagc_rows

    params = as_params([None] * len(SHAPES))
    fused = fusedclip.AdaGC(params, warmup_steps=0)
    plain = adagc_rows.torch_adagc(len(SHAPES))
    for _, grads in stream(6, seed=7, missing=()):
        load(params, grads)
        fused.step()
        copies = [g.clone() for g in grads]
        plain.step(copies)
        for p, c in zip(params, copies):
            torch.testing.assert_close(p.grad, c, rtol=2e-6, atol=0)
    torch.testing.assert_close(fused.gamma, plain.gamma, rtol=1e-6, atol=0)
    rows = adagc_rows.step_rows(width=16, depth=2, batch=2, rounds=1) + adagc_rows.adagc_rows(width=16, depth=2,
                                                                                                rounds=1)
    assert [r["variant"] for r in rows] == list(adagc_rows.VARIANTS) + ["adagc-fused", "adagc-torch", "clip_"]
    assert all(r["cpu"] and (r.get("whole") or r.get("time"))["n"] == 1 for r in rows)


# ---- the fused scaling pass (torch.ops.fusedclip.scale_each_) ----------------------------------------------------

NATIVE = "native" in fusedclip.available_backends("cpu")
EACH_SHAPES = [(33, 17), (7,), (0,), (20000,), (3, 4, 5), (2_500_003,), (1,)]  # empty; > a chunk; > 8 MB (threads)


def each_coefs(n, seed, dtype):
    """log-uniform in [1e-4, 1), every third exactly 1 (a tensor left unwritten), one above 1 (not a clip)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.pow(10.0, -4.0 * torch.rand(n, generator=g, dtype=torch.float64))
    c[::3] = 1.0
    c[-1] = 1.7
    return c.to(dtype)


@pytest.mark.skipif(not NATIVE, reason="the native extension is not built")
@pytest.mark.parametrize("dtypes", [[torch.float32], [torch.bfloat16], [torch.float16], [torch.float64],
                                    [torch.float32, torch.bfloat16, torch.float16, torch.float64]],
                         ids=["fp32", "bf16", "fp16", "fp64", "mixed"])
def test_scale_each_is_mul_per_tensor(dtypes):
    """scale_each_(grads, coefs) is `for g, c: g.mul_(c)` bit for bit (torch's CPU mul of a tensor by a 0-dim
    coefficient of the accumulation dtype: the coefficient in the tensor's opmath type), on every dtype, a mixed
    list (fp64 coefficients with fp32/bf16/fp16 tensors), a non-dense tensor, a tensor big enough for threads."""
    from fusedclip.testing import make_grads
    acc = torch.float64 if torch.float64 in dtypes else torch.float32
    a = make_grads(EACH_SHAPES, dtypes, seed=11, scale="mixed")
    a[0] = a[0].t()  # permuted (dense)
    strided = make_grads([(40, 30)], dtypes[0], seed=12, scale="mixed")[0]
    a.append(strided[:, ::3])  # not dense: through a copy written back
    c = each_coefs(len(a), 13, acc)
    want = [t.clone() for t in a]
    for t, k in zip(want, c.unbind()):
        t.mul_(k)
    from fusedclip import _ext
    current, supported = _ext._C.cpu_isa()
    try:
        for isa in supported.split(","):  # every instruction-set variant of the CPU loops (csrc/cpu/cpu_simd.h)
            _ext._C.set_cpu_isa(isa)
            b = [t.clone() for t in a]
            b[-1] = strided.clone()[:, ::3]
            torch.ops.fusedclip.scale_each_(b, c)
            for x, y in zip(b, want):
                assert_bit_identical(x, y)
    finally:
        _ext._C.set_cpu_isa(current)


@pytest.mark.skipif(not NATIVE, reason="the native extension is not built")
def test_scale_each_special_coefficients():
    """A NaN coefficient makes its tensor NaN (as mul_ does), an inf one makes it +-inf, 0 makes it 0; the others
    are untouched by them."""
    from fusedclip.testing import make_grads
    a = make_grads([(50,), (60,), (70,), (80,)], torch.float32, seed=14, scale="mixed")
    b = [t.clone() for t in a]
    c = torch.tensor([math.nan, math.inf, 0.0, 0.25])
    torch.ops.fusedclip.scale_each_(a, c)
    assert bool(a[0].isnan().all())
    assert_bit_identical(a[1], b[1] * math.inf)
    assert_bit_identical(a[2], b[2] * 0.0)
    assert_bit_identical(a[3], b[3] * 0.25)


@pytest.mark.skipif(not NATIVE, reason="the native extension is not built")
@pytest.mark.parametrize("bad, match", [(torch.ones(3), "one value per tensor"),
                                        (torch.ones(4, dtype=torch.int64), "float32 or float64"),
                                        (torch.ones(2, 2), "one value per tensor"),
                                        (torch.full((4,), 0.5, dtype=torch.float16), "float32 or float64")])
def test_scale_each_bad_coefs(bad, match):
    """Wrong coefficients raise a ValueError before any gradient is written."""
    from fusedclip.testing import make_grads
    a = make_grads([(5,), (6,), (7,), (8,)], torch.float32, seed=15, scale="mixed")
    before = [t.clone() for t in a]
    with pytest.raises(ValueError, match=match):
        torch.ops.fusedclip.scale_each_(a, bad)
    for x, y in zip(a, before):
        assert_bit_identical(x, y)


@pytest.mark.skipif(not NATIVE, reason="the native extension is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fused_step_is_the_unfused_step(dtype, monkeypatch):
    """AdaGC with the fused scaling pass clips bit for bit as with the unfused one it replaced (torch._foreach_mul_
    with one coefficient per gradient), and keeps the same thresholds, through the warm-up, spikes and a missing
    gradient."""
    from fusedclip import adagc

    def unfused(grads, coefs, be, fn):
        torch._foreach_mul_(grads, list(coefs.unbind()))

    runs = []
    for patch in (False, True):
        if patch:
            monkeypatch.setattr(adagc, "_scale_each", unfused)
        params = [torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in SHAPES]
        clipper = fusedclip.AdaGC(params, lambda_abs=500.0, warmup_steps=3, backend="native")
        grads_seen = []
        for _, grads in stream(10, seed=16, dtype=dtype):
            load(params, grads)
            clipper.step()
            grads_seen.append([None if p.grad is None else p.grad.clone() for p in params])
        runs.append((grads_seen, clipper.gamma.clone()))
    (fused, gamma_f), (plain, gamma_p) = runs
    for step_f, step_p in zip(fused, plain):
        for x, y in zip(step_f, step_p):
            assert (x is None) == (y is None)
            if x is not None:
                assert_bit_identical(x, y)
    assert_bit_identical(gamma_f, gamma_p)


@pytest.mark.skipif(not NATIVE, reason="the native extension is not built")
@pytest.mark.parametrize("dtypes", [[torch.float32], [torch.float32, torch.bfloat16, torch.float16],
                                    [torch.float64, torch.float32, torch.bfloat16]], ids=["fp32", "half", "with-fp64"])
def test_cpu_fast_path_is_the_python_path(dtypes, monkeypatch):
    """The compiled CPU step (csrc/python_module.cpp adagc_grads: norms, the rule in double, the scaling, in one
    call) gives the Python path's gradients, thresholds and norms bit for bit, step by step, with a gradient missing
    and spikes; and it is the path taken after the warm-up (counted)."""
    from fusedclip import _ext, adagc

    module = _ext._C
    taken = []

    class Counting:
        def __getattr__(self, name):
            return getattr(module, name)

        @staticmethod
        def adagc_grads(*args):
            out = module.adagc_grads(*args)
            taken.append(out is not None)
            return out

    runs = []
    for fast in (True, False):
        if fast:
            monkeypatch.setattr(_ext, "_C", Counting())
        else:
            monkeypatch.undo()
            monkeypatch.setattr(fusedclip.backends, "fast_path_allowed", lambda backend: False)
        params = [torch.nn.Parameter(torch.zeros(s, dtype=dtypes[i % len(dtypes)])) for i, s in enumerate(SHAPES)]
        clipper = fusedclip.AdaGC(params, lambda_abs=500.0, warmup_steps=3, backend="native")
        seen = []
        for _, grads in stream(10, seed=17, dtype=torch.float64):
            for i, (p, g) in enumerate(zip(params, grads)):
                p.grad = None if g is None else g.to(p.dtype)
            norm = clipper.step()
            seen.append((norm, [None if p.grad is None else p.grad.clone() for p in params], clipper.gamma.clone()))
        runs.append(seen)
    assert taken == [True] * 7  # the 7 steps after the 3 of the warm-up
    for (nf, gf, cf), (np_, gp, cp) in zip(*runs):
        assert_bit_identical(nf, np_)
        assert_bit_identical(cf, cp)
        for x, y in zip(gf, gp):
            assert (x is None) == (y is None)
            if x is not None:
                assert_bit_identical(x, y)
