"""Shared test helpers: random gradient lists, the float64 reference, tolerances, backends."""
import math

import pytest
import torch

import fusedclip

HAS_GPU = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="no GPU")])]


def fused_backends(device_type="cpu"):
    """Every non-torch backend that can run here: the parity tests run on each."""
    return [b for b in fusedclip.available_backends(device_type) if b != "torch"]


BACKENDS = fused_backends("cpu") + [b for b in fused_backends("cuda") if b not in fused_backends("cpu")]

@pytest.fixture(autouse=True)
def _only_backends_that_run_on_the_device(request):
    """BACKENDS spans devices (Triton may run on CUDA but not on CPU): drop the pairs that cannot run."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    device, backend = params.get("device", "cpu"), params.get("backend")
    if backend is not None and backend != "torch" and backend not in fusedclip.available_backends(device):
        pytest.skip(f"backend {backend!r} does not run on {device} here")


# assert_close defaults per dtype (rtol, atol)
TOL = {
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
}

# Odd shapes on purpose: 0-dim, empty, not a multiple of any vector width, > 64K elements, several chunks.
SHAPES = [(), (0,), (7,), (3, 5), (33, 129), (70001,), (2, 16384 + 5), (16,)]


def make_params(shapes, dtypes, device="cpu", seed=0, scale=1.0, none_every=0, noncontig=True):
    """Parameters with fresh random grads. dtypes cycles over the shapes. With noncontig, some grads are
    transposed (dense, permuted) or strided slices (not dense); with none_every=k every k-th grad is None."""
    g = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(shapes):
        dtype = dtypes[i % len(dtypes)]
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        if none_every and i % none_every == none_every - 1:
            params.append(p)
            continue
        base = (torch.randn(shape, generator=g, dtype=torch.float64) * scale)
        if noncontig and len(shape) == 2 and i % 3 == 0:
            grad = base.t().contiguous().t()  # permuted, dense
        elif noncontig and len(shape) == 2 and i % 3 == 1:
            wide = torch.randn(shape[0], shape[1] * 2, generator=g, dtype=torch.float64) * scale
            wide[:, ::2] = base
            grad = wide[:, ::2]  # strided slice: not dense
        else:
            grad = base
        p.grad = grad.to(device=device, dtype=dtype)
        params.append(p)
    return params


def grads_of(params):
    return [p.grad for p in params if p.grad is not None]


def clone_params(params):
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        if p.grad is not None:
            # keep the layout (strides) of the original grad
            q.grad = torch.empty_strided(p.grad.size(), p.grad.stride(), dtype=p.grad.dtype, device=p.grad.device)
            q.grad.copy_(p.grad)
        out.append(q)
    return out


def ref_norm(grads, p):
    """float64 reference: the norm of all elements as one vector (torch's norm of per-tensor norms, which is
    the same thing except for p=0, where torch counts the tensors with a nonzero element)."""
    p = float(p)
    if not grads:
        return torch.tensor(0.0, dtype=torch.float64)
    if p == 0:
        return torch.tensor(float(sum(bool((g != 0).any()) for g in grads)), dtype=torch.float64)
    flat = torch.cat([g.detach().double().reshape(-1).cpu() for g in grads])
    if flat.numel() == 0:
        return torch.tensor(0.0, dtype=torch.float64)
    return torch.linalg.vector_norm(flat, p)


def ref_coef(max_norm, norm64):
    return min(max_norm / (float(norm64) + 1e-6), 1.0)


def bits(t):
    """The raw bits of a tensor, for bit-for-bit comparisons (NaN payloads included)."""
    t = t.detach().contiguous()
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_bit_identical(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a), bits(b))


def rel_err(x, ref):
    x, ref = float(x), float(ref)
    if math.isnan(ref):
        return 0.0 if math.isnan(x) else math.inf
    return abs(x - ref) / max(abs(ref), 1e-30)
