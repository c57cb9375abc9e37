"""Providers: the clipping implementations a user could pick instead of fusedclip. Each make(device) returns
fn(params) -> total norm, called with max_norm = MAX_NORM. Adding one is a Provider line in PROVIDERS (and,
when it needs a check of its own, its functions here)."""
import shutil
from dataclasses import dataclass

import torch

import fusedclip

from .workload import MAX_NORM


def _torch_foreach(device):
    return lambda ps: torch.nn.utils.clip_grad_norm_(ps, MAX_NORM)


def _torch_loop(device):
    return lambda ps: torch.nn.utils.clip_grad_norm_(ps, MAX_NORM, foreach=False)


def _torch_compile(device):
    import warnings

    import torch._inductor.config

    if device.type == "cpu":
        # No pool of compile workers: they start in the background after the first compile and would share
        # the cores with the calls being timed (100x slower calls on a 2-core machine).
        torch._inductor.config.compile_threads = 1
    torch._inductor.config.force_disable_caches = True  # the compile row is a cold compile, as on a first run
    warnings.filterwarnings("ignore", message=".*force_disable_caches.*")
    torch._dynamo.reset()  # a fresh cache per set: the recompile limit would otherwise fall back to eager
    compiled = torch.compile(torch.nn.utils.clip_grad_norm_)
    return lambda ps: compiled(ps, MAX_NORM)


def _fused(backend):
    def make(device):
        clip = fusedclip.clip_
        return lambda ps: clip(ps, MAX_NORM, backend=backend)
    return make


def _triton(launch):
    """fusedclip.clip_(backend="triton") with the launch mode forced for the call: "one" (the persistent
    kernel with a grid barrier) or "two" (partials, then finish). fusedclip/backends/triton/ reads its
    module-level LAUNCH (FUSEDCLIP_TRITON_LAUNCH) at each call."""
    def make(device):
        from fusedclip.backends.triton import launcher as tlauncher

        clip = fusedclip.clip_

        def call(ps):
            saved, tlauncher.LAUNCH = tlauncher.LAUNCH, launch
            try:
                return clip(ps, MAX_NORM, backend="triton")
            finally:
                tlauncher.LAUNCH = saved
        return call
    return make


def _apex(device):
    """apex's multi-tensor kernels as Megatron uses them: l2norm per dtype group, then one scale launch per
    group when the coefficient is below 1 (that test reads the norm on the host, as apex users do)."""
    import amp_C
    from apex.multi_tensor_apply import multi_tensor_applier

    flag = torch.zeros(1, dtype=torch.int, device=device)

    def clip(ps):
        groups = {}
        for p in ps:
            if p.grad is not None:
                groups.setdefault(p.grad.dtype, []).append(p.grad)
        norms = [multi_tensor_applier(amp_C.multi_tensor_l2norm, flag, [g], False)[0] for g in groups.values()]
        total = torch.linalg.vector_norm(torch.stack([n.float().reshape(()) for n in norms]))
        coef = MAX_NORM / (float(total) + 1e-6)
        if coef < 1.0:
            for g in groups.values():
                multi_tensor_applier(amp_C.multi_tensor_scale, flag, [g, g], coef)
        return total
    return clip


def _has_backend(name):
    def check(device):
        if name in fusedclip.available_backends(device):
            return True, ""
        return False, f"fusedclip backend {name!r} is not available for {device.type}"
    return check


def _apex_available(device):
    if device.type != "cuda":
        return False, "apex's kernels are CUDA only"
    try:
        import amp_C  # noqa: F401
        from apex.multi_tensor_apply import multi_tensor_applier  # noqa: F401
    except ImportError:
        return False, "apex (with its CUDA extensions) is not importable"
    return True, ""


def always(device):
    return True, ""


def _compile_available(device):
    if device.type == "cpu" and not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        return False, "torch.compile needs a C++ compiler on the CPU"
    return True, ""


@dataclass
class Provider:
    key: str
    label: str
    make: object
    available: object
    compiles: bool = False
    busy: bool = False  # also timed in the busy regimes (torch and fusedclip: what a user chooses between)
    bytes_moved: object = None  # nbytes -> {"bytes_moved": ..., ...} for the row (default: 2N clip, N noclip)
    check: object = None  # (fn, workload) -> '' or what is wrong (default: workload.check_call)


PROVIDERS = {p.key: p for p in [
    Provider("torch", "torch foreach", _torch_foreach, always, busy=True),
    Provider("torch-loop", "torch foreach=False", _torch_loop, always),
    Provider("compile", "torch.compile", _torch_compile, _compile_available, compiles=True),
    Provider("native", "fusedclip native", _fused("native"), _has_backend("native"), busy=True),
    Provider("triton", "fusedclip triton 1-launch", _triton("one"), _has_backend("triton"), busy=True),
    Provider("triton-2", "fusedclip triton 2-launch", _triton("two"), _has_backend("triton"), busy=True),
    Provider("apex", "apex multi_tensor", _apex, _apex_available),
]}
BASELINE = "torch"
FUSED = ("native", "triton", "triton-2")  # fusedclip's own: compared with the memory floor
SCALING_SKIP = {"compile"}  # a recompile per point; its cost is on the compile rows instead
