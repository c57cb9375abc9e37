"""Parity on the GPU at sizes the CPU suite does not reach, for every fused backend on CUDA: a set larger than L2
(1.25 GiB), 20,000 tensors, Transformer-shaped sets (GPT-2 small fp32, two Llama-7B layers bf16, a mixed bag),
repeated calls bitwise, non-finite gradients, AMP with per-tensor norms in a training step, gradients on two
devices. Each against the float64 reference and torch.nn.utils. scripts/gpu_check.sh runs these after the
benchmark, with the rest of the suite's GPU tests (tests/test_triton.py's one launch against two included).
"""
import math

import pytest
import torch

import fusedclip
from fusedclip.bench.sets import gpt2_shapes, llama_shapes
from fusedclip.testing import (TOL, assert_bit_identical, clone_params, device_grads, grads_of, params_with,
                               ref_coef, ref_norm, rel_err)


@pytest.fixture(params=["native", "triton"])
def gpu_backend(request):  # not "backend": tests/conftest.py's autouse fixture would judge that one on the CPU
    if torch.cuda.is_available() and request.param not in [b for b in fusedclip.available_backends("cuda")
                                                            if b != "torch"]:
        pytest.skip(f"backend {request.param!r} does not run on CUDA here (python -m fusedclip info says why)")
    return request.param


def parity(params, max_norm, backend, p=2.0, rel=2e-6):
    """clip_ on params against the float64 reference (computed on the GPU) and torch: the norm within `rel` of the
    reference (plus the rounding to a 16-bit result) and no further from it than torch's own; every gradient
    equal to its original times the reference coefficient to its dtype's tolerance, and to torch's result."""
    orig = clone_params(params)
    ref = float(ref_norm(grads_of(orig), p, device="cuda"))
    theirs = clone_params(orig)
    norm = fusedclip.clip_(params, max_norm, p, backend=backend)
    torch_norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm, p)
    rounding = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}.get(norm.dtype, 0.0)
    assert rel_err(norm, ref) <= rel + rounding, (float(norm), ref)
    # torch's own error can be large (fp32 sums over 300M elements, bf16 per-tensor norms): ours must not be worse
    torch_err = rel_err(torch_norm, ref)
    assert rel_err(norm, ref) <= max(2 * torch_err, rel + rounding), (float(norm), float(torch_norm), ref)
    coef = ref_coef(max_norm, ref)
    for q, q0, t in zip(params, orig, theirs):
        rtol, atol = TOL[q0.grad.dtype]
        torch.testing.assert_close(q.grad, (q0.grad.double() * coef).to(q0.grad.dtype), rtol=rtol, atol=atol)
        torch.testing.assert_close(q.grad.double(), t.grad.double(), rtol=2 * rtol + 2 * torch_err, atol=atol)


@pytest.mark.gpu_seconds(20)
def test_larger_than_l2(gpu_backend):
    params = params_with(device_grads([(64 * 2**20,)] * 5 + [(77, 1001)], seed=10, scale="mixed"))  # 1.25 GiB fp32
    parity(params, 1.0, gpu_backend, rel=5e-6)


@pytest.mark.gpu_seconds(15)
def test_many_tensors(gpu_backend):
    g = torch.Generator().manual_seed(7)
    shapes = [(int(n),) for n in torch.randint(1, 700, (20000,), generator=g)]
    parity(params_with(device_grads(shapes, seed=8, scale="mixed")), 1.0, gpu_backend)


@pytest.mark.gpu_seconds(15)
def test_transformer_sets(gpu_backend):
    parity(params_with(device_grads(gpt2_shapes(12, 768), seed=1, scale="mixed")), 1.0, gpu_backend)
    parity(params_with(device_grads(llama_shapes(n_layer=2), torch.bfloat16, seed=2)), 1.0, gpu_backend)
    mixed = params_with(device_grads([(1000, 37), (513,), (7,)] * 20, torch.bfloat16, seed=3, scale="mixed") +
                        device_grads([(4096,), (77,)] * 20, seed=4, scale="mixed") +
                        device_grads([(999,)] * 5, torch.float16, seed=5))
    parity(mixed, 1.0, gpu_backend)
    parity(mixed, 1e9, gpu_backend, p=math.inf)


@pytest.mark.gpu_seconds(10)
def test_repeatable(gpu_backend):
    """Identical calls give identical bits (a result that changes between them is a race)."""
    params = params_with(device_grads([(3_000_000,), (1000, 999), (5,)] * 2, torch.bfloat16, seed=9, scale="mixed"))
    runs = []
    for _ in range(5):
        q = clone_params(params)
        runs.append((fusedclip.clip_(q, 0.5, backend=gpu_backend), grads_of(q)))
    for n, g in runs[1:]:
        assert_bit_identical(n, runs[0][0])
        for a, b in zip(g, runs[0][1]):
            assert_bit_identical(a, b)


@pytest.mark.gpu_seconds(5)
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_nonfinite(gpu_backend, bad):
    """error_if_nonfinite raises and writes nothing; without it, norm and gradients as torch's (NaN where it has
    NaN)."""
    params = params_with(device_grads([(10000,), (33, 7)], seed=6))
    params[1].grad[3, 3] = bad
    before = [q.grad.clone() for q in params]
    with pytest.raises(RuntimeError, match="non-finite"):
        fusedclip.clip_(params, 1.0, error_if_nonfinite=True, backend=gpu_backend)
    for q, b in zip(params, before):
        assert_bit_identical(q.grad, b)
    theirs = clone_params(params)
    n = fusedclip.clip_(params, 1.0, backend=gpu_backend)
    t = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    torch.testing.assert_close(n, t, equal_nan=True)
    for q, r in zip(params, theirs):
        torch.testing.assert_close(q.grad, r.grad, equal_nan=True)


@pytest.mark.gpu_seconds(10)
def test_amp_and_per_tensor_training_step(gpu_backend):
    """A fp16 autocast step with GradScaler: per-tensor norms, then unscale_clip_, then the fused AdamW step, against
    scaler.unscale_ + clip_grad_norm_ on a twin model: the same norm, scale and parameters."""
    torch.manual_seed(18)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 10)).cuda()
    twin = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 10)).cuda()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(64, 256, device="cuda")
    results = []
    for m, fused in ((model, True), (twin, False)):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**14)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = m(x).float().square().mean()
        scaler.scale(loss).backward()
        if fused:
            total, norms = fusedclip.clip_(list(m.parameters()), 1e30, per_tensor=True, backend=gpu_backend)
            want = [float(ref_norm([q.grad], 2.0)) for q in m.parameters()]
            assert norms.numel() == 4 and all(rel_err(a, b) <= 2e-6 for a, b in zip(norms.tolist(), want))
            n = fusedclip.unscale_clip_(scaler, opt, 0.5, backend=gpu_backend)
        else:
            scaler.unscale_(opt)
            n = torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
        scaler.step(opt)
        scaler.update()
        results.append((n, scaler.get_scale()))
    assert rel_err(results[0][0], results[1][0]) <= 1e-5 and results[0][1] == results[1][1]
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu_seconds(5)
def test_gradients_on_two_devices():
    """CPU and CUDA gradients in one call (the native backend: the only one that takes both here): the norm on the
    CPU (the first gradient's device, as torch's), each device's gradients clipped by the one coefficient."""
    if "native" not in fusedclip.available_backends("cpu") or "native" not in fusedclip.available_backends("cuda"):
        pytest.skip("the native backend does not run on both the CPU and CUDA here")
    params = params_with(device_grads([(1000,), (77, 3)], device="cpu", seed=16) +
                         device_grads([(5000,), (9, 9)], torch.bfloat16, seed=17))
    orig = clone_params(params)
    ref = ref_norm(grads_of(orig), 2.0)
    n = fusedclip.clip_(params, 1.0, backend="native")
    assert n.device.type == "cpu" and rel_err(n, ref) <= 2e-6
    coef = ref_coef(1.0, ref)
    for q, q0 in zip(params, orig):
        rtol, atol = TOL[q0.grad.dtype]
        torch.testing.assert_close(q.grad, (q0.grad.double() * coef).to(q0.grad.dtype), rtol=rtol, atol=atol)
