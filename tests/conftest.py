"""Markers, fixtures and parametrization only: the devices and backends the tests run on. The helpers (float64
references, gradient makers, bit equality, tolerances, the shared parity cases, multi-process runs) are in
fusedclip.testing, which the tests import directly."""
import pytest
import torch

import fusedclip

HAS_GPU = torch.cuda.is_available()
# (major, minor) of the torch under test: the suite also runs on torch 2.6 and 2.11 (make test-compat), where some
# of torch's own behaviour that a test compares with differs.
TORCH = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="no GPU")])]


def fused_backends(device_type="cpu"):
    """Every non-torch backend that can run here: the parity tests run on each."""
    return [b for b in fusedclip.available_backends(device_type) if b != "torch"]


BACKENDS = fused_backends("cpu") + [b for b in fused_backends("cuda") if b not in fused_backends("cpu")]

@pytest.fixture(autouse=True)
def _only_backends_that_run_on_the_device(request):
    """BACKENDS spans devices (Triton may run on CUDA but not on CPU): drop the pairs that cannot run."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    # a GPU test without a device parameter runs on CUDA: judged on "cpu", its Triton case was skipped on a GPU
    default = "cuda" if request.node.get_closest_marker("gpu") else "cpu"
    device, backend = params.get("device", default), params.get("backend")
    if backend is not None and backend != "torch" and backend not in fusedclip.available_backends(device):
        pytest.skip(f"backend {backend!r} does not run on {device} here")
