"""fusedclip.ClipInBackward: the norm recorded by post-accumulate-grad hooks during backward, applied after it, against
fusedclip.clip_ (and clip_into_) then the same optimizer step, bit for bit: the norm, the clipped gradients, the
parameters after the step; with gradient accumulation, frozen and excluded parameters, a parameter without a gradient,
and no host read of a tensor."""
import pytest
import torch

import fusedclip
from fusedclip.testing import NoHostRead, assert_bit_identical, exact_norm, mixed_tensors

from conftest import BACKENDS, HAS_GPU


def leaves(tensors):
    return [torch.nn.Parameter(torch.zeros_like(t)) for t in tensors]


def backward_with(params, targets, factor=1.0):
    """A backward whose gradient for params[i] is factor * targets[i] exactly (added to any gradient already there)."""
    sum((p * (t * factor)).sum() for p, t in zip(params, targets)).backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float32, torch.bfloat16, torch.float16)],
                         ids=["fp32", "mixed"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_norm_and_gradients_are_clip_s(backend, dtypes, seed):
    """60 tensors of sizes 1 to 20,000 and scales 1e-3 to 1e3: the norm and every clipped gradient equal clip_'s, bit
    for bit (clipping active)."""
    targets = mixed_tensors(60, 20_000, seed, dtypes=dtypes)
    a, b = leaves(targets), leaves(targets)
    clipper = fusedclip.ClipInBackward(a, 1.0, backend=backend)
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
def test_training_steps_are_clip_then_step(fused):
    """Six AdamW steps on an MLP, clipping active: ClipInBackward (the coefficient into the fused step's grad_scale, or
    a scaling pass) gives the parameters of clip_into_ (fused) / clip_ (not fused) then step, bit for bit, each step."""
    a, b = mlp(0), mlp(0)
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2, fused=fused)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, fused=fused)
    clipper = fusedclip.ClipInBackward(a, 0.5, optimizer=opt_a)
    assert clipper._into == fused
    for x, y in batches(6, 1):
        torch.nn.functional.mse_loss(a(x), y).backward()
        torch.nn.functional.mse_loss(b(x), y).backward()
        norm = clipper.clip_()
        want = fusedclip.clip_into_(opt_b, 0.5) if fused else fusedclip.clip_(b.parameters(), 0.5)
        assert_bit_identical(norm, want)
        opt_a.step()
        opt_b.step()
        opt_a.zero_grad()
        opt_b.zero_grad()
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert_bit_identical(pa, pb)
    assert float(want) > 0.5  # clipping was active


def test_gradient_accumulation():
    """Three micro-batches: recording only the last (no_record on the first two) and recording all (each overwrites)
    both give clip_ of the accumulated gradients."""
    targets = mixed_tensors(20, 5000, seed=3)
    a, b, c = leaves(targets), leaves(targets), leaves(targets)
    skip = fusedclip.ClipInBackward(a, 1.0)
    every = fusedclip.ClipInBackward(c, 1.0)
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


def test_frozen_excluded_and_missing_parameters():
    """A frozen parameter gets no hook; an excluded one (left out of params, as a Muon group would be) is neither
    measured nor scaled; a parameter without a gradient in a step counts 0, also after a step where it had one."""
    targets = mixed_tensors(8, 3000, seed=4)
    a, b = leaves(targets), leaves(targets)
    a[1].requires_grad_(False)
    b[1].requires_grad_(False)
    included = [p for i, p in enumerate(a) if i != 5]
    clipper = fusedclip.ClipInBackward(included, 1.0)
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
def test_buckets(backend, bucket_bytes):
    """bucket_bytes (CUDA's default: one read per bucket once its last gradient lands): the buckets are consecutive
    parameters of at least that many bytes; the norm and the clipped gradients equal clip_'s bit for bit (the torch
    backend: the correctly rounded norm), whatever order the gradients arrive in; with gradient accumulation (a
    micro-batch under no_record, then two recorded ones); with a parameter that gets no gradient in a step (its bucket
    is read by clip_()); and the hooks read each bucket once, after its last gradient."""
    targets = mixed_tensors(30, 3000, seed=7, dtypes=(torch.float32, torch.bfloat16))
    a, b = leaves(targets), leaves(targets)
    clipper = fusedclip.ClipInBackward(a, 1.0, backend=backend, bucket_bytes=bucket_bytes)
    sizes = [len(bk) for bk in clipper._buckets]
    assert sum(sizes) == 30 and (len(sizes) == 1) == (bucket_bytes == 1 << 40) and len(clipper.partials) == len(sizes)
    assert [p for bk in clipper._buckets for p in bk] == a  # consecutive, in order
    reads = []
    real = clipper._record
    clipper._record = lambda k: (reads.append(k), real(k))[1]
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
        reads.clear()
        norm = clipper.clip_()
        if step == 0:
            assert reads == []  # every bucket already read by its hooks
        else:  # parameter 12's bucket is read by clip_(), unless it is a bucket of its own (its slot then counts 0)
            k12 = next(k for k, bk in enumerate(clipper._buckets) if any(p is a[12] for p in bk))
            assert reads == ([] if sizes[k12] == 1 else [k12]), (reads, k12, sizes)
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


def test_cpu_hook_fast_path_is_the_python_hook(monkeypatch):
    """The compiled CPU hook (csrc/python_module.cpp record_sq_norm) records the Python hook's float64 partials bit
    for bit, on gradients of mixed dtypes and scales, and is the path taken (counted)."""
    from fusedclip import _ext

    if not _ext.LOADED:
        pytest.skip("the native extension is not built")
    module = _ext._C
    taken = []

    class Counting:
        def __getattr__(self, name):
            return getattr(module, name)

        @staticmethod
        def record_sq_norm(*args):
            out = module.record_sq_norm(*args)
            taken.append(out is True)
            return out

    parts = []
    for fast in (True, False):
        torch.manual_seed(3)
        model = torch.nn.Sequential(torch.nn.Linear(33, 20), torch.nn.Linear(20, 7).to(torch.bfloat16).float(),
                                    torch.nn.Linear(7, 5).double())
        model[2].weight.data.mul_(300.0)  # mixed scales
        monkeypatch.setattr(_ext, "_C", Counting())  # the hooks bind the compiled call when they are made
        clipper = fusedclip.ClipInBackward(model, 0.01, backend="native")
        if not fast:
            clipper._fast = False  # the Python hook: the compiled call is not made (counted)
        x = torch.randn(9, 33, generator=torch.Generator().manual_seed(4))
        model[2](model[1](model[0](x)).double()).pow(2).sum().backward()
        parts.append(clipper.partials.clone())
        assert bool((clipper.partials > 0).all())
        monkeypatch.undo()
        assert taken == [True] * 6  # 6 parameters, each once, in the fast run only
    assert_bit_identical(parts[0], parts[1])
