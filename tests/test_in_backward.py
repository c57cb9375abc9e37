"""fusedclip.ClipInBackward: the norm recorded by post-accumulate-grad hooks during backward, applied after it, against
fusedclip.clip_ (and clip_into_) then the same optimizer step, bit for bit: the norm, the clipped gradients, the
parameters after the step; with gradient accumulation, frozen and excluded parameters, a parameter without a gradient,
and no host read of a tensor."""
import warnings

import pytest
import torch

import fusedclip
from fusedclip import _ext
from fusedclip.testing import NoHostRead, assert_bit_identical, exact_norm, mixed_tensors

from conftest import BACKENDS, HAS_GPU


def leaves(tensors):
    return [torch.nn.Parameter(torch.zeros_like(t)) for t in tensors]


@pytest.fixture(params=["compiled", "python"])
def hooks(request, monkeypatch):
    """Which hooks a native-backend CPU clipper gets: the C++ ones (csrc/in_backward.cpp), or the Python ones (the
    module's record_hooks hidden: what CUDA and the other backends take)."""
    if request.param == "compiled" and not _ext.LOADED:
        pytest.skip("the native extension is not built")
    if request.param == "python" and _ext.LOADED:
        module = _ext._C

        class WithoutCompiledHooks:
            def __getattr__(self, name):
                return getattr(module, name)

            @staticmethod
            def record_hooks(*args):
                return None

        monkeypatch.setattr(_ext, "_C", WithoutCompiledHooks())
    return request.param


def compiled(clipper, hooks, backend="native"):
    """Asserts the clipper took the hooks the fixture asked for; whether they are the C++ ones."""
    expect = hooks == "compiled" and backend == "native"
    assert (clipper._compiled is not None) == expect
    return expect


class Reads:
    """Per bucket, how often its gradients were read by its hooks and by clip_() since the last take(): the compiled
    hooks' counters, or the Python hooks' calls of _record."""

    def __init__(self, clipper):
        self.clipper = clipper
        n = len(clipper._buckets)
        if clipper._compiled is None:
            self.counts, self.in_clip = ([0] * n, [0] * n), False
            record, clip = clipper._record, clipper.clip_

            def counted_record(k):
                self.counts[1 if self.in_clip else 0][k] += 1
                return record(k)

            def counted_clip():
                self.in_clip = True
                try:
                    return clip()
                finally:
                    self.in_clip = False
            clipper._record, clipper.clip_ = counted_record, counted_clip
        self.last = self.totals()

    def totals(self):
        if self.clipper._compiled is not None:
            return tuple(map(list, _ext._C.record_hooks_reads(self.clipper._compiled)))
        return tuple(map(list, self.counts))

    def take(self):
        """(reads by hooks, reads by clip_()) per bucket since the last take."""
        now = self.totals()
        out = tuple([a - b for a, b in zip(x, y)] for x, y in zip(now, self.last))
        self.last = now
        return out


def backward_with(params, targets, factor=1.0):
    """A backward whose gradient for params[i] is factor * targets[i] exactly (added to any gradient already there)."""
    sum((p * (t * factor)).sum() for p, t in zip(params, targets)).backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float32, torch.bfloat16, torch.float16)],
                         ids=["fp32", "mixed"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_norm_and_gradients_are_clip_s(backend, dtypes, seed, hooks):
    """60 tensors of sizes 1 to 20,000 and scales 1e-3 to 1e3: the norm and every clipped gradient equal clip_'s, bit
    for bit (clipping active), with the compiled and the Python hooks."""
    targets = mixed_tensors(60, 20_000, seed, dtypes=dtypes)
    a, b = leaves(targets), leaves(targets)
    clipper = fusedclip.ClipInBackward(a, 1.0, backend=backend)
    compiled(clipper, hooks, backend)
    backward_with(a, targets)
    backward_with(b, targets)
    norm = clipper.clip_()
    want = fusedclip.clip_(b, 1.0, backend=backend)
    assert float(want) > 10.0
    assert_bit_identical(norm, want)
    for pa, pb in zip(a, b):
        assert_bit_identical(pa.grad, pb.grad)
    assert bool((clipper.partials == 0).all())  # cleared for the next step


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_torch_backend_is_the_correctly_rounded_norm(seed):
    """backend="torch" records float64 norms (torch.linalg.vector_norm with dtype=float64): the norm is the exact norm
    correctly rounded to fp32, and the gradients are torch.nn.utils.clip_grads_with_norm_ by it, bit for bit."""
    targets = mixed_tensors(60, 20_000, seed, dtypes=(torch.float32, torch.bfloat16))
    a, b = leaves(targets), leaves(targets)
    clipper = fusedclip.ClipInBackward(a, 1.0, backend="torch")
    backward_with(a, targets)
    backward_with(b, targets)
    norm = clipper.clip_()
    exact = torch.tensor(exact_norm(targets, 2.0), dtype=torch.float64).float()
    assert_bit_identical(norm, exact)
    torch.nn.utils.clip_grads_with_norm_(b, 1.0, exact)
    for pa, pb in zip(a, b):
        assert_bit_identical(pa.grad, pb.grad)


def mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.Tanh(), torch.nn.Linear(48, 48), torch.nn.Tanh(),
                               torch.nn.Linear(48, 3))


def batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 24, generator=g) * (10.0 if i % 3 == 2 else 1.0), torch.randn(8, 3, generator=g))
            for i in range(n)]


@pytest.mark.parametrize("fused", [False, True], ids=["scaling-pass", "into-fused-AdamW"])
@pytest.mark.parametrize("max_norm", [0.5, 1e4], ids=["clipping", "not-clipping"])
def test_training_steps_are_clip_then_step(fused, max_norm, hooks):
    """Six AdamW steps on an MLP: ClipInBackward (the coefficient into the fused step's grad_scale, or a scaling pass)
    gives the parameters of clip_into_ (fused) / clip_ (not fused) then step, bit for bit, each step, with the compiled
    hooks (whose clip_() computes the norm and the grad_scale in C++) and the Python ones; with clipping active, and
    with none (where the compiled path hands the fused step no grad_scale: a division by 1 it skips)."""
    a, b = mlp(0), mlp(0)
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2, fused=fused)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, fused=fused)
    clipper = fusedclip.ClipInBackward(a, max_norm, optimizer=opt_a)
    is_compiled = compiled(clipper, hooks)
    assert clipper._into == fused
    for x, y in batches(6, 1):
        torch.nn.functional.mse_loss(a(x), y).backward()
        torch.nn.functional.mse_loss(b(x), y).backward()
        norm = clipper.clip_()
        if fused:
            assert (getattr(opt_a, "grad_scale", None) is None) == (is_compiled and max_norm > 1.0)
        want = fusedclip.clip_into_(opt_b, max_norm) if fused else fusedclip.clip_(b.parameters(), max_norm)
        assert_bit_identical(norm, want)
        opt_a.step()
        opt_b.step()
        opt_a.zero_grad()
        opt_b.zero_grad()
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert_bit_identical(pa, pb)
    assert (float(want) > max_norm) == (max_norm < 1.0)  # clipping was active, or not


def test_gradient_accumulation(hooks):
    """Three micro-batches: recording only the last (no_record on the first two) and recording all (each overwrites)
    both give clip_ of the accumulated gradients."""
    targets = mixed_tensors(20, 5000, seed=3)
    a, b, c = leaves(targets), leaves(targets), leaves(targets)
    skip = fusedclip.ClipInBackward(a, 1.0)
    every = fusedclip.ClipInBackward(c, 1.0)
    compiled(skip, hooks)
    for k, factor in enumerate((1.0, -0.3, 2.5)):
        if k < 2:
            with skip.no_record():
                backward_with(a, targets, factor)
            assert bool((skip.partials == 0).all())
        else:
            backward_with(a, targets, factor)
        backward_with(b, targets, factor)
        backward_with(c, targets, factor)
    want = fusedclip.clip_(b, 1.0)
    for clipper, params in ((skip, a), (every, c)):
        assert_bit_identical(clipper.clip_(), want)
        for p, q in zip(params, b):
            assert_bit_identical(p.grad, q.grad)


def test_frozen_excluded_and_missing_parameters(hooks):
    """A frozen parameter gets no hook; an excluded one (left out of params, as a Muon group would be) is neither
    measured nor scaled; a parameter without a gradient in a step counts 0, also after a step where it had one."""
    targets = mixed_tensors(8, 3000, seed=4)
    a, b = leaves(targets), leaves(targets)
    a[1].requires_grad_(False)
    b[1].requires_grad_(False)
    included = [p for i, p in enumerate(a) if i != 5]
    clipper = fusedclip.ClipInBackward(included, 1.0)
    compiled(clipper, hooks)
    assert len(clipper.params) == 6  # 8 minus the frozen one minus the excluded one
    for step, used in enumerate((range(8), [0, 2, 3, 4, 5, 6])):  # step 2: parameter 7 gets no gradient
        for p, q in zip(a, b):
            p.grad = q.grad = None
        backward_with([a[i] for i in used if i != 1], [targets[i] for i in used if i != 1])
        backward_with([b[i] for i in used if i != 1], [targets[i] for i in used if i != 1])
        excluded = a[5].grad.clone()
        norm = clipper.clip_()
        want = fusedclip.clip_([q for i, q in enumerate(b) if i != 5], 1.0)
        assert_bit_identical(norm, want)
        assert_bit_identical(a[5].grad, excluded)
        for i in used:
            if i not in (1, 5):
                assert_bit_identical(a[i].grad, b[i].grad)
    assert a[7].grad is None


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
@pytest.mark.parametrize("bucket_bytes", [4096, 1 << 40], ids=["4KiB-buckets", "one-bucket"])
def test_buckets(backend, bucket_bytes, hooks):
    """bucket_bytes (CUDA's default: one read per bucket once its last gradient lands): the buckets are consecutive
    parameters of at least that many bytes; the norm and the clipped gradients equal clip_'s bit for bit (the torch
    backend: the correctly rounded norm), whatever order the gradients arrive in; with gradient accumulation (a
    micro-batch under no_record, then two recorded ones); with a parameter that gets no gradient in a step (its bucket
    is read by clip_()); and the hooks read each bucket once per recorded backward, after its last gradient."""
    if hooks == "compiled" and backend != "native":
        pytest.skip("the compiled hooks are the native backend's")
    targets = mixed_tensors(30, 3000, seed=7, dtypes=(torch.float32, torch.bfloat16))
    a, b = leaves(targets), leaves(targets)
    clipper = fusedclip.ClipInBackward(a, 1.0, backend=backend, bucket_bytes=bucket_bytes)
    compiled(clipper, hooks, backend)
    sizes = [len(bk) for bk in clipper._buckets]
    assert sum(sizes) == 30 and (len(sizes) == 1) == (bucket_bytes == 1 << 40) and len(clipper.partials) == len(sizes)
    assert [p for bk in clipper._buckets for p in bk] == a  # consecutive, in order
    reads = Reads(clipper)
    order = list(range(30))[::-1] if bucket_bytes == 4096 else [3, 17, 0, 29] + [i for i in range(30)
                                                                                   if i not in (3, 17, 0, 29)]
    for step, used in enumerate((order, [i for i in order if i != 12])):  # step 1: parameter 12 gets no gradient
        for p, q in zip(a, b):
            p.grad = q.grad = None
        with clipper.no_record():
            backward_with([a[i] for i in used], [targets[i] for i in used], 0.5)
        backward_with([a[i] for i in used], [targets[i] for i in used], -1.5)
        backward_with([a[i] for i in used], [targets[i] for i in used], 3.0)
        for f in (0.5, -1.5, 3.0):
            backward_with([b[i] for i in used], [targets[i] for i in used], f)
        norm = clipper.clip_()
        by_hooks, by_clip = reads.take()
        k12 = next(k for k, bk in enumerate(clipper._buckets) if any(p is a[12] for p in bk))
        if step == 0:
            assert by_hooks == [2] * len(sizes)  # each bucket once per recorded backward, none under no_record
            assert by_clip == [0] * len(sizes)  # every bucket already read by its hooks
        else:  # parameter 12's bucket is read by clip_(), unless it is a bucket of its own (its slot then counts 0)
            assert by_clip == [int(k == k12 and sizes[k12] > 1) for k in range(len(sizes))], (by_clip, k12, sizes)
        if backend == "torch":
            exact = torch.tensor(exact_norm([q.grad for q in b if q.grad is not None], 2.0), dtype=torch.float64)
            assert_bit_identical(norm, exact.float())
            continue
        want = fusedclip.clip_(b, 1.0, backend=backend)
        assert float(want) > 10.0
        assert_bit_identical(norm, want)
        for p, q in zip(a, b):
            if q.grad is not None:
                assert_bit_identical(p.grad, q.grad)
    with pytest.raises(ValueError, match="bucket_bytes"):
        fusedclip.ClipInBackward(a, 1.0, bucket_bytes=-1)


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_no_host_read(backend):
    """Backward with the recording hooks and clip_() read no tensor on the host (the mode catches a read: checked
    first); the fused-optimizer path too."""
    with pytest.raises(AssertionError, match="host read"), NoHostRead():
        bool(torch.ones(()) > 0)
    model = mlp(1)
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    for optimizer in (None, opt):
        clipper = fusedclip.ClipInBackward(model, 0.1, optimizer=optimizer, backend=backend)
        x, y = batches(1, 2)[0]
        loss = torch.nn.functional.mse_loss(model(x), y)
        with NoHostRead():
            loss.backward()
            clipper.clip_()
        clipper.remove()
        model.zero_grad()


def test_remove_and_arguments():
    p = torch.nn.Parameter(torch.randn(3))
    clipper = fusedclip.ClipInBackward([p], 1.0)
    clipper.remove()
    (p * torch.randn(3)).sum().backward()
    assert bool((clipper.partials == 0).all())
    with pytest.raises(ValueError, match="twice"):
        fusedclip.ClipInBackward([p, p], 1.0)
    with pytest.raises(TypeError, match="max_norm"):
        fusedclip.ClipInBackward([p], None)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="no GPU")
def test_cuda_twin_without_sync():
    """test_norm_and_gradients_are_clip_s on CUDA, backward and clip_() under torch.cuda.set_sync_debug_mode('error')
    (compiled, run only where a GPU is)."""
    targets = [t.cuda() for t in mixed_tensors(60, 20_000, 0, dtypes=(torch.float32, torch.bfloat16))]
    a, b = leaves(targets), leaves(targets)
    clipper = fusedclip.ClipInBackward(a, 1.0)
    loss = sum((p * t).sum() for p, t in zip(a, targets))
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss.backward()
        norm = clipper.clip_()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    backward_with(b, targets)
    assert_bit_identical(norm, fusedclip.clip_(b, 1.0))
    for pa, pb in zip(a, b):
        assert_bit_identical(pa.grad, pb.grad)


class Producing(torch.autograd.Function):
    """x -> x; backward hands its input the gradient `grad` (a fresh tensor), recording where its data lives."""

    @staticmethod
    def forward(ctx, x, grad, where):
        ctx.grad, ctx.where = grad, where
        return x.view_as(x)

    @staticmethod
    def backward(ctx, _):
        g = ctx.grad.clone()
        ctx.where.append(g.data_ptr())
        ctx.grad = None
        return g, None, None


def test_compiled_hooks_keep_torch_s_gradient_handling(hooks):
    """The hooks sit on the AccumulateGrad nodes (compiled) or in the tensors' post-accumulate-grad slots (Python):
    the gradient backward produced is still taken over without a copy; users' own post-accumulate-grad hooks,
    registered before and after the clipper, still run, after the gradient is final, and the clipper still records."""
    targets = mixed_tensors(6, 2000, seed=11)
    a, b = leaves(targets), leaves(targets)
    seen = []
    a[2].register_post_accumulate_grad_hook(lambda p: seen.append(("before", float(p.grad.double().norm()))))
    clipper = fusedclip.ClipInBackward(a, 1.0)
    compiled(clipper, hooks)
    a[2].register_post_accumulate_grad_hook(lambda p: seen.append(("after", float(p.grad.double().norm()))))
    where = []
    loss = sum((Producing.apply(p, t, where) * 1.0).sum() for p, t in zip(a, targets))
    loss.backward()
    assert sorted(where) == sorted(p.grad.data_ptr() for p in a)  # taken over, not copied
    g2 = float(targets[2].double().norm())
    assert seen == [("before", g2), ("after", g2)]
    backward_with(b, targets)
    assert_bit_identical(clipper.clip_(), fusedclip.clip_(b, 1.0))


def test_released_clipper_removes_its_hooks(hooks):
    """A clipper that is garbage-collected (no remove()) records nothing afterwards: the compiled hooks leave the nodes
    with their handle (the Python ones stay, as torch's hooks do, until removed)."""
    import gc

    p = torch.nn.Parameter(torch.randn(50))
    clipper = fusedclip.ClipInBackward([p], 1.0)
    if not compiled(clipper, hooks):
        pytest.skip("the Python hooks stay registered until remove(), as torch's own")
    partials = clipper.partials
    (p * 2.0).sum().backward()
    assert float(partials[0]) == pytest.approx(4.0 * 50)
    partials.zero_()
    del clipper
    gc.collect()
    (p * 2.0).sum().backward()
    assert float(partials[0]) == 0.0


def test_gradients_the_compiled_hooks_cannot_read(hooks):
    """Backward under a dispatch mode (the hooks' reads would bypass it) and a bucket holding an fp64 and a bf16
    gradient: the compiled hooks leave what they cannot take to clip_(), which reads it the Python way; the norm and
    the gradients are clip_'s, bit for bit."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passing(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    targets = mixed_tensors(12, 3000, seed=12, dtypes=(torch.float32, torch.bfloat16, torch.float64))
    a, b = leaves(targets), leaves(targets)
    clipper = fusedclip.ClipInBackward(a, 1.0, bucket_bytes=20_000)
    compiled(clipper, hooks)
    reads = Reads(clipper)
    python_reads = []
    record = clipper._record
    clipper._record = lambda k: (python_reads.append(k), record(k))[1]
    for mode in (Passing, None):
        python_reads.clear()
        for p, q in zip(a, b):
            p.grad = q.grad = None
        if mode is not None:
            with mode():
                backward_with(a, targets)
        else:
            backward_with(a, targets)
        backward_with(b, targets)
        norm = clipper.clip_()
        by_hooks, by_clip = reads.take()
        if hooks == "compiled":  # under the mode every bucket is left to Python; without it, none
            assert python_reads == (list(range(len(clipper._buckets))) if mode else [])
        assert_bit_identical(norm, fusedclip.clip_(b, 1.0))
        for p, q in zip(a, b):
            assert_bit_identical(p.grad, q.grad)


def test_compiled_autograd(hooks):
    """Under compiled autograd the engine does not run the compiled hooks: a warning says so and clip_() reads every
    gradient after backward; the Python hooks are traced and run. Either way the norm and the gradients are clip_'s."""
    compiled_autograd = pytest.importorskip("torch._dynamo.compiled_autograd")
    torch._dynamo.reset()
    a, b = mlp(0), mlp(0)
    clipper = fusedclip.ClipInBackward(a, 0.1)
    is_compiled = compiled(clipper, hooks)
    x, y = batches(1, 5)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with compiled_autograd._enable(torch.compile(backend="eager")):
            torch.nn.functional.mse_loss(a(x), y).backward()
    torch.nn.functional.mse_loss(b(x), y).backward()
    if is_compiled:
        assert any("compiled autograd" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert_bit_identical(clipper.clip_(), fusedclip.clip_(b.parameters(), 0.1))
    for p, q in zip(a.parameters(), b.parameters()):
        assert_bit_identical(p.grad, q.grad)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_model(compiler, hooks):
    """torch.compile of the model (forward and backward traced by AOTAutograd, one node in the eager engine): the
    parameters' AccumulateGrad nodes still run eagerly, so the hooks record during backward; norm and gradients are
    clip_'s."""
    torch._dynamo.reset()
    a, b = mlp(0), mlp(0)
    clipper = fusedclip.ClipInBackward(a, 0.1)
    compiled(clipper, hooks)
    reads = Reads(clipper)
    step_a = torch.compile(lambda x, y: torch.nn.functional.mse_loss(a(x), y), backend=compiler)
    step_b = torch.compile(lambda x, y: torch.nn.functional.mse_loss(b(x), y), backend=compiler)
    for x, y in batches(2, 6):
        step_a(x, y).backward()
        step_b(x, y).backward()  # the same compiled gradients (eager ones may differ in the last bits)
        norm = clipper.clip_()
        by_hooks, by_clip = reads.take()
        assert by_hooks == [1] * len(by_hooks) and by_clip == [0] * len(by_clip)  # recorded inside backward
        assert_bit_identical(norm, fusedclip.clip_(b.parameters(), 0.1))
        for p, q in zip(a.parameters(), b.parameters()):
            assert_bit_identical(p.grad, q.grad)
            p.grad = q.grad = None


def test_gradient_left_from_an_earlier_step_counts(hooks):
    """A gradient that no recording backward reached since the last clip_() (left from the step before: no zero_grad,
    and this step's backward does not reach the parameter) is read by clip_(): every gradient present counts, as in
    clip_, per parameter and in a bucket."""
    targets = mixed_tensors(10, 3000, seed=13)
    big = max(range(10), key=lambda i: float(targets[i].double().norm()))  # its gradient counts in the fp32 norm
    for bucket_bytes in (0, 1 << 40):
        a, b = leaves(targets), leaves(targets)
        clipper = fusedclip.ClipInBackward(a, 1e3, bucket_bytes=bucket_bytes)
        compiled(clipper, hooks)
        for used in (range(10), [i for i in range(10) if i != big]):  # step 2: `big` keeps step 1's gradient
            backward_with([a[i] for i in used], [targets[i] for i in used])
            backward_with([b[i] for i in used], [targets[i] for i in used])
            assert_bit_identical(clipper.clip_(), fusedclip.clip_(b, 1e3))
            for p, q in zip(a, b):
                assert_bit_identical(p.grad, q.grad)


def test_remove_then_clip_and_clip_twice(hooks):
    """remove() between backward and clip_(): clip_() reads every gradient (the record is dropped with the hooks);
    clip_() twice before a step, the second finding no clipping to do (max_norm raised): the step applies no
    coefficient, not the first call's. Both equal clip_into_ then the same fused step, bit for bit."""
    a, b = mlp(0), mlp(0)
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2, fused=True)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, fused=True)
    clipper = fusedclip.ClipInBackward(a, 0.1, optimizer=opt_a)
    compiled(clipper, hooks)
    (x, y), (x2, y2) = batches(2, 8)
    torch.nn.functional.mse_loss(a(x), y).backward()
    torch.nn.functional.mse_loss(b(x), y).backward()
    assert float(clipper.clip_()) > 0.1  # clipping: a grad_scale handed over
    clipper.max_norm = 1e9
    assert_bit_identical(clipper.clip_(), fusedclip.clip_into_(opt_b, 1e9))
    for opt in (opt_a, opt_b):
        opt.step()
        opt.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        assert_bit_identical(p, q)
    clipper.max_norm = 0.1
    torch.nn.functional.mse_loss(a(x2), y2).backward()
    torch.nn.functional.mse_loss(b(x2), y2).backward()
    clipper.remove()
    assert_bit_identical(clipper.clip_(), fusedclip.clip_into_(opt_b, 0.1))
    for opt in (opt_a, opt_b):
        opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert_bit_identical(p, q)
