"""The eager fast path of clip_ / get_total_norm (csrc/python_module.cpp): it gives the operator path's results
bit for bit, bumps version counters as torch's in-place ops do, and declines (returns None, touching nothing)
every call the operator path must handle."""
import contextlib
import math

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import fusedclip
from fusedclip import _ext
from conftest import DEVICES
from fusedclip.testing import (SHAPES, assert_bit_identical, check_against_reference, clone_params, grads_of,
                              make_params, ref_norm)

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="the extension did not load")

MIXED = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def dense_params(device="cpu", seed=0, dtypes=MIXED):
    return make_params(SHAPES + [(300, 7)], dtypes, device=device, seed=seed, none_every=3, noncontig=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("clipping", [True, False], ids=["clipping", "not-clipping"])
@pytest.mark.parametrize("p", [2.0, math.inf, -math.inf, 1.0, 3.0, 5])
def test_fast_path_equals_op_path_bitwise(device, clipping, p):
    params = dense_params(device, seed=3)
    orig = clone_params(params)
    max_norm = float(ref_norm(grads_of(orig), p)) * (0.5 if clipping else 2.0)
    via_op = clone_params(orig)
    norm = _ext._C.clip_grads(tuple(params), max_norm, p)
    assert norm is not None
    check_against_reference(params, orig, norm, max_norm, p)
    op_norm = torch.ops.fusedclip.clip_(grads_of(via_op), max_norm, float(p))
    assert_bit_identical(norm, op_norm)
    for a, b in zip(grads_of(params), grads_of(via_op)):
        assert_bit_identical(a, b)
    if not clipping:
        for a, b in zip(grads_of(params), grads_of(orig)):
            assert_bit_identical(a, b)

    tensors = grads_of(orig)
    total = _ext._C.total_norm(tensors, p)
    assert total is not None and total.dtype == norm.dtype
    assert_bit_identical(total, torch.ops.fusedclip.total_norm(tensors, float(p)).to(total.dtype))


def test_public_functions_take_the_fast_path(monkeypatch):
    """clip_ and get_total_norm on plain grads never reach the operators."""
    def no_op(*args, **kwargs):
        raise AssertionError("the operator path ran")

    params = dense_params()
    orig = clone_params(params)
    monkeypatch.setattr(fusedclip.backends.native.NativeBackend, "clip", no_op)
    monkeypatch.setattr(fusedclip.backends.native.NativeBackend, "total_norm", no_op)
    norm = fusedclip.clip_((q for q in params), 0.5)
    check_against_reference(params, orig, norm, 0.5, 2.0)
    total = fusedclip.get_total_norm(grads_of(orig), math.inf)
    torch.testing.assert_close(total.double(), ref_norm(grads_of(orig), math.inf).to(total.dtype).double())


class Sub(torch.Tensor):
    pass


class Recorder(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class FunctionRecorder(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _with_grad(grad, param=None):
    p = torch.nn.Parameter(torch.zeros(grad.shape, dtype=grad.dtype)) if param is None else param
    p.grad = grad
    return p


def _declined_cases():
    """(name, params, max_norm, norm_type, context) that the fast path must decline."""
    g = torch.Generator().manual_seed(5)

    def plain(n=10):
        return _with_grad(torch.randn(n, generator=g))

    with torch.inference_mode():
        inference_grad = torch.randn(10, generator=g)
    sub = torch.zeros(10).as_subclass(Sub)
    sub.grad = torch.randn(10, generator=g)
    meta = torch.nn.Parameter(torch.zeros(10, device="meta"))
    meta.grad = torch.zeros(10, device="meta")
    sparse = torch.nn.Parameter(torch.zeros(10))
    sparse.grad = torch.randn(10, generator=g).to_sparse()
    none = contextlib.nullcontext()
    return [
        ("strided slice grad", [plain(), _with_grad(torch.randn(20, generator=g)[::2])], 0.1, 2.0, none),
        ("tensor subclass param", [plain(), sub], 0.1, 2.0, none),
        ("a grad on another device", [plain(), meta], 0.1, 2.0, none),
        ("sparse grad", [plain(), sparse], 0.1, 2.0, none),
        ("inference-tensor grad", [plain(), _with_grad(inference_grad)], 0.1, 2.0, none),
        ("norm_type 0", [plain()], 0.1, 0.0, none),
        ("norm_type string", [plain()], 0.1, "inf", none),
        ("NaN norm_type", [plain()], 0.1, float("nan"), none),
        ("tensor max_norm", [plain()], torch.tensor(0.1), 2.0, none),
        ("no grads", [torch.nn.Parameter(torch.zeros(3))], 0.1, 2.0, none),
        ("a non-tensor item", [plain(), 3], 0.1, 2.0, none),
        ("dispatch mode", [plain()], 0.1, 2.0, Recorder()),
        ("torch function mode", [plain()], 0.1, 2.0, FunctionRecorder()),
    ]


@pytest.mark.parametrize("case", range(len(_declined_cases())), ids=[c[0] for c in _declined_cases()])
def test_fast_path_declines_and_touches_nothing(case):
    name, params, max_norm, p, context = _declined_cases()[case]
    grads = [q.grad for q in params if isinstance(q, torch.Tensor) and q.grad is not None and q.grad.device.type == "cpu"]
    grads = [g._values() if g.is_sparse else g for g in grads]  # a sparse grad's values, in place
    before = [g.clone() for g in grads]
    versions = [g._version for g in grads if not g.is_inference()]
    with context:
        assert _ext._C.clip_grads(params, max_norm, p) is None, name
    for a, b in zip(grads, before):
        assert_bit_identical(a, b)
    assert [g._version for g in grads if not g.is_inference()] == versions


def test_total_norm_fast_path_declines_integer_tensors():
    assert _ext._C.total_norm([torch.arange(5)], 2.0) is None
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        fusedclip.get_total_norm([torch.arange(5)])


@pytest.mark.parametrize("path", ["fast", "op"])
def test_clip_bumps_versions_like_torch(path):
    """An in-place clip bumps each grad's version counter once, as torch's does, so autograd notices when a
    tensor saved for backward was clipped."""
    params = dense_params(dtypes=[torch.float32])
    grads = grads_of(params)
    before = [g._version for g in grads]
    theirs = [q for q in clone_params(params) if q.grad is not None]
    theirs_before = [q.grad._version for q in theirs]
    torch.nn.utils.clip_grad_norm_(theirs, 0.1)
    if path == "fast":
        fusedclip.clip_(params, 0.1)
    else:
        torch.ops.fusedclip.clip_(grads, 0.1, 2.0)
    assert [g._version - v for g, v in zip(grads, before)] == [q.grad._version - v for q, v in zip(theirs, theirs_before)]

    w = torch.randn(129, 16, requires_grad=True)
    saved = next(g for g in grads if g.shape == (33, 129))  # the matmul saves it for w's gradient
    loss = (saved @ w).sum()
    fusedclip.clip_(params, 1e-3) if path == "fast" else torch.ops.fusedclip.clip_(grads, 1e-3, 2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_fast_path_is_named_in_the_profiler():
    params = dense_params()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fusedclip.clip_(params, 0.1)
    # one top-level operator, as on the operator path (mixed dtypes: no operator call to promote them either)
    assert [e.name for e in prof.events() if e.cpu_parent is None] == ["fusedclip::clip_"]


@pytest.mark.parametrize("device", DEVICES)
def test_zclip_fast_path_bumps_versions_once_or_declines_touching_nothing(device):
    """ZClip's fast path (zclip_grads) builds its table as read-only and marks it as written only once ZClip's
    checks pass: a declined call bumps no version counter (the op path then bumps them itself; before, a CUDA
    table was bumped when built and again by the op path: issue 25, defect 11), and an accepted one bumps each
    scaled gradient once (on CPU when the kernel writes)."""
    config = fusedclip.ZClip(warmup_steps=1, max_grad_norm=1e-3)._config
    params = dense_params(device, seed=5, dtypes=[torch.float32])
    grads = [q.grad for q in params if q.grad is not None]
    versions = [g._version for g in grads]
    bad_state = torch.zeros(3, dtype=torch.float64, device=device)  # too short for warmup_steps=1: declined
    assert _ext._C.zclip_grads(params, bad_state, config, None) is None
    assert [g._version for g in grads] == versions
    state = torch.zeros(5, dtype=torch.float64, device=device)
    norm = _ext._C.zclip_grads(params, state, config, None)  # warm-up step: clipped to max_grad_norm 1e-3
    assert norm is not None and float(norm) > 1e-3 and state[0].item() == 1.0
    assert [g._version for g in grads] == [v + 1 for v in versions]
