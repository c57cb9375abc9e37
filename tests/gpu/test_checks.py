"""What only a GPU can tell, for every fused backend on CUDA (native; Triton in the launch variant the run uses):
CUDA-graph capture and replay with new gradients, two streams at once, no host sync under
torch.cuda.set_sync_debug_mode('error') (torch.compile: test_compile_gpu.py, last of the step: Inductor's compile
time). Every result bit for bit against eager calls of the same backend, and those against the float64 reference.
scripts/gpu_check.sh runs the native graph replay in its smoke step (marked `smoke`: the cooperative launch
captured), the rest in its gpu-checks step.
"""
import math

import pytest
import torch

import fusedclip
from fusedclip.testing import (assert_bit_identical, clone_params, device_grads, grads_of, params_with, ref_norm,
                               rel_err)

CHUNK = 16384  # csrc/common/clip_math.h kChunkElems


def cuda_backends():
    return [b for b in fusedclip.available_backends("cuda") if b != "torch"] if torch.cuda.is_available() else []


def backend_params(smoke=()):
    """"native" and "triton" as parameters; one that does not run on CUDA here skips with the reason."""
    return [pytest.param(b, marks=[pytest.mark.smoke] if b in smoke else []) for b in ("native", "triton")]


@pytest.fixture
def gpu_backend(request):  # not "backend": tests/conftest.py's autouse fixture would judge that one on the CPU
    name = request.param
    if torch.cuda.is_available() and name not in cuda_backends():
        pytest.skip(f"backend {name!r} does not run on CUDA here (python -m fusedclip info says why)")
    return name


def sm_count():
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def assert_same(params, others):
    for a, b in zip(grads_of(params), grads_of(others)):
        assert_bit_identical(a, b)


@pytest.mark.gpu_seconds(15)
@pytest.mark.parametrize("gpu_backend", backend_params(smoke=("native",)), indirect=True)
def test_cuda_graph_replay(gpu_backend):
    """Captured after a warm-up on a side stream (as torch recommends), replayed 3 times with new gradients copied
    in: norm and gradients bitwise equal to eager calls, the norm to the float64 reference. More chunks than the
    grid holds at once (the persistent blocks loop), mixed dtypes, an odd tail, an empty and a tiny tensor."""
    n = 6 * sm_count() * CHUNK + 12345
    shapes = [(n,), (4096, 1024), (333, 77), (0,), (5,), (2048, 512), (999,)]
    dtypes = [torch.float32] * 5 + [torch.bfloat16] * 2
    static = params_with(device_grads(shapes, dtypes, seed=11))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # tables cached on the device, Triton kernels compiled: nothing new in capture
        fusedclip.clip_(clone_params(static), 1.0, backend=gpu_backend)
        fusedclip.clip_(static, 1e30, backend=gpu_backend)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        norm = fusedclip.clip_(static, 1.0, backend=gpu_backend)
    for step in range(3):
        fresh = device_grads(shapes, dtypes, seed=100 + step, scale=10.0 ** (step - 1))
        for q, f in zip(static, fresh):
            q.grad.copy_(f)
        eager = clone_params(static)
        ref = ref_norm(grads_of(eager), 2.0)
        graph.replay()
        eager_norm = fusedclip.clip_(eager, 1.0, backend=gpu_backend)
        torch.cuda.synchronize()
        assert_bit_identical(norm, eager_norm)
        assert_same(static, eager)
        assert rel_err(eager_norm, ref) <= 2e-6, (step, float(eager_norm), float(ref))


@pytest.mark.gpu_seconds(10)
@pytest.mark.parametrize("gpu_backend", backend_params(), indirect=True)
def test_two_streams_at_once(gpu_backend):
    """Two streams clipping different sets at once (each set's table, barrier slot and partials its own), 20
    times: bitwise equal to sequential calls."""
    sets = [params_with(device_grads([(8 * 2**20,), (1000, 17), (5,)], torch.float32, seed=14)),
            params_with(device_grads([(6 * 2**20,), (999,), (3000, 77)], [torch.bfloat16, torch.float32], seed=15))]
    expected = []
    for s, max_norm in zip(sets, (1.0, 2.0)):
        e = clone_params(s)
        expected.append((fusedclip.clip_(e, max_norm, backend=gpu_backend), e))
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for _ in range(20):
        work = [clone_params(s) for s in sets]
        torch.cuda.synchronize()
        norms = []
        for stream, w, max_norm in zip(streams, work, (1.0, 2.0)):
            with torch.cuda.stream(stream):
                norms.append(fusedclip.clip_(w, max_norm, backend=gpu_backend))
        torch.cuda.synchronize()
        for (en, e), n, w in zip(expected, norms, work):
            assert_bit_identical(n, en)
            assert_same(w, e)


SYNC_CALLS = ["clip_", "clip_inf", "get_total_norm", "per_tensor", "clip_grads_with_norm_", "clip_value_",
              "clip_agc_", "ZClip.step", "unscale_clip_"]


@pytest.mark.gpu_seconds(2)
@pytest.mark.parametrize("call", SYNC_CALLS)
@pytest.mark.parametrize("gpu_backend", backend_params(), indirect=True)
def test_no_host_sync(gpu_backend, call):
    """The default paths never wait for the GPU: each public call (after a warm-up call, which may compile and copy
    tables) under torch.cuda.set_sync_debug_mode('error'), which raises on any synchronizing CUDA call. One result
    per call, so that one that syncs names itself and hides nothing of the others."""
    shapes = [(4096, 1024), (1024,), (333, 77), (5,)]
    params = params_with(device_grads(shapes, [torch.float32, torch.bfloat16], seed=20))
    if call == "clip_agc_":
        params = [torch.nn.Parameter(torch.randn(s, device="cuda").to(q.dtype)) for s, q in zip(shapes, params)]
        for q, g in zip(params, device_grads(shapes, [torch.float32, torch.bfloat16], seed=21, scale=0.01)):
            q.grad = g
    total = torch.tensor(3.0, device="cuda")
    zclip = fusedclip.ZClip(warmup_steps=2, backend=gpu_backend)
    model = torch.nn.Linear(64, 32).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)

    def backward():  # outside the checked section: GradScaler.step reads found_inf on the host
        model.zero_grad()
        scaler.scale(model(torch.randn(8, 64, device="cuda")).square().mean()).backward()

    run = {
        "clip_": lambda: fusedclip.clip_(params, 1.0, backend=gpu_backend),
        "clip_inf": lambda: fusedclip.clip_(params, 1.0, math.inf, backend=gpu_backend),
        "get_total_norm": lambda: fusedclip.get_total_norm(grads_of(params), backend=gpu_backend),
        "per_tensor": lambda: fusedclip.clip_(params, 1.0, per_tensor=True, backend=gpu_backend),
        "clip_grads_with_norm_": lambda: fusedclip.clip_grads_with_norm_(params, 1.0, total, backend=gpu_backend),
        "clip_value_": lambda: fusedclip.clip_value_(params, 0.1, backend=gpu_backend),
        "clip_agc_": lambda: fusedclip.clip_agc_(params, 0.01, backend=gpu_backend),
        "ZClip.step": lambda: [zclip.step(params) for _ in range(3)],  # through the warm-up into the rule
        "unscale_clip_": lambda: fusedclip.unscale_clip_(scaler, opt, 0.5, backend=gpu_backend),
    }[call]
    if call == "unscale_clip_":
        backward()
    run()  # the warm-up (ZClip's state made on its first step)
    if call == "unscale_clip_":
        scaler.step(opt)
        scaler.update()
        backward()
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
