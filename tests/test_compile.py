"""The operators' registration: opcheck (schema, fake tensors, AOT dispatch) and torch.compile(fullgraph=True)."""
import pytest
import torch

import fusedclip
from conftest import DEVICES, assert_bit_identical, clone_params, grads_of, make_params

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
