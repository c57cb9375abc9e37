"""torch.compile(fullgraph=True) of clip-then-update on CUDA, for every fused backend: bitwise the eager step's.
Last of scripts/gpu_check.sh's gpu-checks step: Inductor's compile time is the least predictable there, and the
deadline-aware conftest skips (and names) what would not fit after it.
"""
import pytest
import torch

import fusedclip
from fusedclip.testing import assert_bit_identical, clone_params, device_grads, params_with

from .test_checks import backend_params, gpu_backend  # noqa: F401 (the fixture)


@pytest.mark.gpu_seconds(40)
@pytest.mark.parametrize("gpu_backend", backend_params(), indirect=True)
def test_compile_fullgraph(gpu_backend):
    """torch.compile(fullgraph=True) of clip then an update: bitwise the eager step's, twice with new gradients."""
    torch._dynamo.reset()

    def step(params):
        n = fusedclip.clip_(params, 1.0, backend=gpu_backend)
        with torch.no_grad():
            for q in params:
                q.sub_(0.01 * q.grad)
        return n

    shapes = [(256, 128), (128,), (10, 256)]
    params = params_with(device_grads(shapes, seed=13))
    eager = clone_params(params)
    compiled = torch.compile(step, fullgraph=True)
    for t in range(2):
        for q, e, g in zip(params, eager, device_grads(shapes, seed=30 + t, scale=10.0)):
            q.grad, e.grad = g, g.clone()
        assert_bit_identical(compiled(params), step(eager))
        for q, e in zip(params, eager):
            assert_bit_identical(q.detach(), e.detach())
