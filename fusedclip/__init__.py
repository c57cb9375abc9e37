"""fusedclip: fast, exact gradient clipping for PyTorch.

    import fusedclip
    total_norm = fusedclip.clip_(model.parameters(), max_norm=1.0)

A drop-in for torch.nn.utils.clip_grad_norm_ (and friends): on CUDA one kernel
launch computes the norm of all gradients and scales them in place; on CPU one
fused C++ kernel does the same.
"""
from . import _ext  # noqa: F401  (loads the compiled operators first)
from .adagc import AdaGC
from .agc import clip_agc_
from .in_backward import ClipInBackward
from .amp import clip_into_, unscale_clip_
from .backends import available_backends
from .distributed import DDPNormState, ddp_norm_hook
from .patch import is_patched, patch_torch, patched, unpatch_torch
from .clip import (clip_, clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, clip_value_,
                   get_total_norm)
from .zclip import ZClip

from . import backends as _backends

_backends.load_triton()

__version__ = "0.1.0"

__all__ = ["clip_", "clip_agc_", "clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_", "clip_value_",
           "clip_grad_value_", "available_backends", "unscale_clip_", "clip_into_",
           "patch_torch", "unpatch_torch", "patched", "is_patched", "DDPNormState", "ddp_norm_hook", "ZClip", "AdaGC", "ClipInBackward"]
