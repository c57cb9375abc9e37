"""The backends: which implementations exist, which work for a device type, and what "auto" picks.

protocol.py says what a backend implements and declares; native.py is the compiled extension's, triton/ the
Triton kernels' (registered whole, by load_triton, or not at all); TorchBackend below hands every call to
torch.nn.utils unchanged.
"""
import torch

from .. import _ext
from .native import NativeBackend
from .protocol import Backend


class TorchBackend(Backend):
    """backend="torch": the public functions call torch.nn.utils themselves (a reference, and the fallback where
    no kernel runs)."""

    name = "torch"
    delegates_to_torch = True

    @staticmethod
    def available(device_type):
        if device_type == "cuda" and not torch.cuda.is_available():
            return False, "no CUDA GPU is visible"
        return True, ""


# In the order "auto" prefers them (fastest first).
BACKENDS = {"native": NativeBackend, "torch": TorchBackend}
AUTO_ORDER = ["native", "torch"]
# Backends that could not be set up in this environment, with the reason (e.g. "triton": Triton too old):
# asking for one by name raises with that reason; `python -m fusedclip info` lists them.
UNAVAILABLE = {}
_resolved = {}  # (requested, device type) -> backend; availability does not change within a process


def register(backend, before="torch"):
    """Adds a backend (the Triton one registers itself here); "auto" tries it just before `before`."""
    BACKENDS[backend.name] = backend
    _resolved.clear()  # "auto" may now pick the new one
    if backend.name not in AUTO_ORDER:
        AUTO_ORDER.insert(AUTO_ORDER.index(before), backend.name)


def load_triton():
    """backend="triton": registered whole (clip, ZClip and AGC kernels) or not at all, with the reason kept for
    `python -m fusedclip info` and for the error a call asking for it gets. Never an import error: every CUDA
    build of torch installs some Triton, and an old or broken one must not stop `import fusedclip`."""
    try:
        import triton
    except ImportError:
        mark_unavailable("triton", "Triton is not installed")
        return
    try:
        from .triton.backend import TritonBackend
    except Exception as e:  # noqa: BLE001  (any failure of an old or broken Triton disables this backend only)
        mark_unavailable("triton", f"its kernels failed to load with Triton {triton.__version__} "
                                   f"({type(e).__name__}: {e})")
        return
    register(TritonBackend)


def mark_unavailable(name, why):
    """Records that backend `name` cannot run in this environment at all, and why."""
    UNAVAILABLE[name] = why
    _resolved.clear()


def check_name(backend, fn):
    """For entry points that take a backend name now and resolve it later: a ValueError for an unknown name, a
    RuntimeError with the reason for a known one that cannot run here."""
    if backend == "auto" or backend in BACKENDS:
        return
    if backend in UNAVAILABLE:
        raise RuntimeError(f"fusedclip.{fn}: backend {backend!r} is not available here: {UNAVAILABLE[backend]}")
    raise ValueError(f"fusedclip.{fn}: unknown backend {backend!r}; the backends are {sorted(BACKENDS)} or 'auto'")


def _device_type(device):
    return torch.device(device).type


def fast_path_allowed(backend):
    """Whether a call may try the compiled fast path (csrc/python_module.cpp): eager, and the native backend is
    the one to run. The fast path itself declines (returns None) whatever the operator path must handle."""
    return (_ext.LOADED and not torch.compiler.is_compiling()
            and (backend == "native" or (backend == "auto" and AUTO_ORDER[0] == "native")))


def available_backends(device="cpu"):
    """Names of the backends that work for tensors of this device type, "auto"'s preference first.

    Args:
        device (str or torch.device): a device or device type, e.g. "cpu", "cuda", "cuda:1". Default "cpu".

    Returns:
        list[str]: e.g. ["native", "triton", "torch"].
    """
    dt = _device_type(device)
    return [name for name in AUTO_ORDER if BACKENDS[name].available(dt)[0]]


def resolve(backend, device_type):
    """The backend object for a name ("auto" included) and a device type; a clear error if it cannot run."""
    if torch.compiler.is_compiling():
        # Not through the cache: dynamo would guard on the dict's contents, so the call that fills it would
        # make the next one recompile. Resolving afresh guards only on BACKENDS and AUTO_ORDER, which stay put.
        return _resolve(backend, device_type)
    key = (backend, device_type)
    hit = _resolved.get(key)
    if hit is None:
        hit = _resolved[key] = _resolve(backend, device_type)
    return hit


def _resolve(backend, device_type):
    if backend == "auto":
        for name in AUTO_ORDER:
            if BACKENDS[name].available(device_type)[0]:
                return BACKENDS[name]
        raise RuntimeError(f"fusedclip: no backend can run on {device_type} tensors")
    if backend not in BACKENDS and backend in UNAVAILABLE:
        raise RuntimeError(f"fusedclip: backend {backend!r} is not available here: {UNAVAILABLE[backend]}. "
                           f"Available for {device_type}: {available_backends(device_type)}")
    if backend not in BACKENDS:
        raise ValueError(f"fusedclip: unknown backend {backend!r}; the backends are {sorted(BACKENDS)} or 'auto' "
                         f"(available for {device_type}: {available_backends(device_type)})")
    ok, why = BACKENDS[backend].available(device_type)
    if not ok:
        raise RuntimeError(f"fusedclip: backend {backend!r} is not available for {device_type} tensors: {why}. "
                           f"Available for {device_type}: {available_backends(device_type)}")
    return BACKENDS[backend]
