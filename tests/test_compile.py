"""The operators' registration: opcheck (schema, fake tensors, AOT dispatch) and torch.compile(fullgraph=True)."""
import pytest
import torch

import fusedclip
from conftest import DEVICES
from fusedclip.testing import assert_bit_identical, clone_params, grads_of, make_params

pytestmark = pytest.mark.skipif("native" not in fusedclip.available_backends("cpu"), reason="extension not built")


def sample_grads(device):
    return grads_of(make_params([(7,), (33, 5), (0,), (20000,)], [torch.float32, torch.bfloat16], device=device,
                                seed=30, noncontig=False))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    ops = torch.ops.fusedclip
    g = sample_grads(device)
    torch.library.opcheck(ops.total_norm.default, (g, 2.0))
    torch.library.opcheck(ops.clip_.default, (sample_grads(device), 0.5, 2.0))
    torch.library.opcheck(ops.clip_.default, (sample_grads(device), 0.5, float("inf")))
    norm = torch.tensor(123.0, device=device)
    torch.library.opcheck(ops.scale_.default, (sample_grads(device), 1.0, norm))
    torch.library.opcheck(ops.clamp_.default, (sample_grads(device), 0.1))


def train_step(params, lr):
    norm = fusedclip.clip_(params, 1.0)
    with torch.no_grad():
        for p in params:
            p.sub_(lr * p.grad)
    return norm


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    params = make_params([(64, 32), (32,), (10, 64), (10,)], [torch.float32], device=device, seed=31,
                         noncontig=False)
    for p in params:
        p.data.normal_()
    eager = clone_params(params)
    compiled = torch.compile(train_step, fullgraph=True)
    for step in range(3):
        for a, b in zip(params, eager):  # fresh gradients each step
            a.grad = torch.randn_like(a) * (step + 1)
            b.grad = a.grad.clone()
        n_c = compiled(params, 0.1)
        n_e = train_step(eager, 0.1)
        torch.testing.assert_close(n_c, n_e, rtol=0, atol=0)
        for a, b in zip(params, eager):
            assert_bit_identical(a.detach(), b.detach())
            assert_bit_identical(a.grad, b.grad)


# ---- the default backend (Inductor) on get_total_norm, the patched torch names, and recompiles ----

class CountingInductor:
    """A torch.compile backend that counts compiles (graphs) and hands each one to Inductor, the default."""

    def __init__(self):
        self.compiles = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return torch._inductor.compile(gm, example_inputs)


def fp32_grads(seed):
    # fp32 only: torch's own norm is then accumulated in the same dtype as fusedclip's, so the two agree closely
    return grads_of(make_params([(7,), (33, 5), (0,), (20000,)], [torch.float32], seed=seed, noncontig=False))


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("p", [2.0, float("inf")])
def test_get_total_norm_under_inductor(p, per_tensor):
    """Inductor used to fail here ("getitem is not an OpOverload"): total_norm is the one op whose only
    mutable argument (per_tensor) may be absent. Same result as eager, bit for bit, and as torch's."""
    torch._dynamo.reset()
    grads = fp32_grads(seed=40)
    compiled = torch.compile(lambda ts: fusedclip.get_total_norm(ts, p, per_tensor=per_tensor), fullgraph=True)
    got, want = compiled(grads), fusedclip.get_total_norm(grads, p, per_tensor=per_tensor)
    if per_tensor:
        (got, got_norms), (want, want_norms) = got, want
        assert_bit_identical(got_norms, want_norms)
        torch.testing.assert_close(got_norms, torch.stack([torch.linalg.vector_norm(g, p) if g.numel()
                                                           else torch.tensor(0.0) for g in grads]))
    assert_bit_identical(got, want)
    # torch's inf norm raises on an empty tensor (its norm is 0 in fusedclip): leave that one out of torch's
    torch.testing.assert_close(got, torch.nn.utils.get_total_norm([g for g in grads if g.numel()], p))


def test_patched_torch_names_under_inductor():
    """After patch_torch(), torch.nn.utils.get_total_norm and clip_grad_norm_ compile to fusedclip's kernels:
    bit-identical to fusedclip in eager (so it is fusedclip that ran), close to torch's own."""
    torch._dynamo.reset()
    grads = fp32_grads(seed=41)
    torch_norm = torch.nn.utils.get_total_norm(grads)
    params = make_params([(64, 32), (32,), (10, 64)], [torch.float32], seed=42, noncontig=False)
    theirs = clone_params(params)
    with fusedclip.patched():
        norm = torch.compile(lambda ts: torch.nn.utils.get_total_norm(ts), fullgraph=True)(grads)
        clipped = torch.compile(lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.5), fullgraph=True)(params)
    assert_bit_identical(norm, fusedclip.get_total_norm(grads))
    torch.testing.assert_close(norm, torch_norm)
    torch.testing.assert_close(clipped, torch.nn.utils.clip_grad_norm_(theirs, 0.5))
    for a, b in zip(params, theirs):
        torch.testing.assert_close(a.grad, b.grad)


def test_compiled_step_compiles_once():
    """A compiled clip-then-step runs 3 times on one compile, as torch's clip does: the backend-resolution cache
    (filled by the first call, compiled or eager) is no guard. Norms and updates match torch's clip."""
    from fusedclip import backends
    torch._dynamo.reset()
    backends._resolved.clear()  # as in a fresh process: the compiled call is the first to resolve "auto"
    counter = CountingInductor()
    params = make_params([(64, 32), (32,), (10, 64), (10,)], [torch.float32], seed=43, noncontig=False)
    theirs = clone_params(params)
    compiled = torch.compile(train_step, fullgraph=True, backend=counter)
    for step in range(3):
        for a, b in zip(params, theirs):
            a.grad = torch.randn_like(a) * (step + 1)
            b.grad = a.grad.clone()
        norm = compiled(params, 0.1)
        fusedclip.get_total_norm([torch.ones(3)])  # an eager call in between (fills the cache too)
        torch_norm = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        with torch.no_grad():
            for q in theirs:
                q.sub_(0.1 * q.grad)
        torch.testing.assert_close(norm, torch_norm)
        for a, b in zip(params, theirs):
            torch.testing.assert_close(a.detach(), b.detach())
    assert counter.compiles == 1
