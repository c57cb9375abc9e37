"""backend="triton": the TritonBackend class over the operators of clip.py, zclip.py and agc.py. Importing this
module imports all three, so the backend is registered whole or not at all (fusedclip/backends/__init__.py,
load_triton)."""
import torch

from ... import _ext
from ..protocol import Backend
# Imported for their operators (defined on import), so this module loads only when all three do: the backend is
# registered whole or not at all.
from . import agc as _agc_ops, clip as _clip_ops, zclip as _zclip_ops  # noqa: F401
from .kernels import CHUNK
from .launcher import INTERPRET


def _chunk_mismatch():
    chunk = _ext.build_info().get("chunk_elems")
    if chunk is not None and int(chunk) != CHUNK:
        return f"the extension's chunk size ({chunk}) differs from the Triton kernels' ({CHUNK}): rebuild it"
    return None


# Once, at import: available() may first run inside torch.compile, which cannot trace build_info (it returns a str).
_CHUNK_MISMATCH = _chunk_mismatch() if _ext.LOADED else None


class TritonBackend(Backend):
    """backend="triton": the Triton kernels (clip.py, zclip.py, agc.py), on CUDA tensors (or on CPU tensors under
    TRITON_INTERPRET=1).
    Every method takes a non-empty list of tensors on one device."""

    name = "triton"
    fused_extras = fused_zclip = fused_agc = True

    @staticmethod
    def available(device_type):
        if not _ext.LOADED:
            return False, (f"it needs the fusedclip extension's table op, and the extension did not load "
                           f"({_ext.LOAD_ERROR}): {_ext.HOW_TO_BUILD}")
        if _CHUNK_MISMATCH:
            return False, _CHUNK_MISMATCH
        if device_type == "cpu":
            if not INTERPRET:
                return False, ("Triton kernels run on CPU tensors only in Triton's interpreter: set "
                               "TRITON_INTERPRET=1 before importing fusedclip")
            return True, ""
        if device_type == "cuda":
            if INTERPRET:
                return False, ("TRITON_INTERPRET=1 is set: the interpreter runs the kernels on host memory, so the "
                               "Triton backend takes CPU tensors only; unset it for CUDA tensors")
            if not _ext.HAS_CUDA_KERNELS:
                return False, f"the extension was built without CUDA (the table op needs it): {_ext.HOW_TO_BUILD_CUDA}"
            if not torch.cuda.is_available():
                return False, "no CUDA GPU is visible"
            return True, ""
        return False, f"there are no Triton kernels for {device_type} tensors"

    @staticmethod
    def total_norm(tensors, norm_type, per_tensor=None, out_dtype=None):
        return torch.ops.fusedclip_triton.total_norm(tensors, norm_type, per_tensor, out_dtype)

    @staticmethod
    def clip(grads, max_norm, norm_type, per_tensor=None, inv_scale=None, found_inf=None):
        return torch.ops.fusedclip_triton.clip_(grads, max_norm, norm_type, per_tensor, inv_scale, found_inf)

    @staticmethod
    def scale(grads, max_norm, total_norm):
        torch.ops.fusedclip_triton.scale_(grads, max_norm, total_norm)

    @staticmethod
    def clamp(grads, clip_value):
        torch.ops.fusedclip_triton.clamp_(grads, clip_value)

    @staticmethod
    def zclip(grads, state, config, norm=None, inv_scale=None, found_inf=None, coef_out=None):
        return torch.ops.fusedclip_triton.zclip_(grads, state, config, norm, inv_scale, found_inf, coef_out)

    @staticmethod
    def agc(weights, grads, clip_factor, eps, norm_type):
        torch.ops.fusedclip_triton.agc_(weights, grads, clip_factor, eps, norm_type)
