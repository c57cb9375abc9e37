"""The compiled operators (torch.ops.fusedclip.*, declared in csrc/ops.cpp): the
shape-and-dtype ("fake") implementations torch.compile traces with, and the
"native" backend that calls them."""
import functools

import torch

from . import _ext


_REAL = {torch.complex32: torch.float16, torch.complex64: torch.float32, torch.complex128: torch.float64}


def result_dtype(tensors):
    """What torch's clip_grad_norm_ returns: the promotion of the tensors' dtypes (a norm is real: a complex
    promotion gives its real dtype, as torch's does, for norm_type 0 which counts complex tensors too)."""
    dtype = functools.reduce(torch.promote_types, {t.dtype for t in tensors})
    return _REAL.get(dtype, dtype)


def acc_dtype(tensors):
    """The accumulation dtype: fp64 when any tensor is fp64, else fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


if _ext.LOADED:

    @torch.library.register_fake("fusedclip::total_norm")
    def _total_norm_fake(tensors, norm_type, per_tensor=None, out_dtype=None):
        return tensors[0].new_empty((), dtype=out_dtype or acc_dtype(tensors))

    @torch.library.register_fake("fusedclip::clip_")
    def _clip_fake(grads, max_norm, norm_type, per_tensor=None, inv_scale=None, found_inf=None):
        return grads[0].new_empty((), dtype=result_dtype(grads))

    @torch.library.register_fake("fusedclip::scale_")
    def _scale_fake(grads, max_norm, total_norm):
        return None

    @torch.library.register_fake("fusedclip::zclip_")
    def _zclip_fake(grads, state, config, norm=None, inv_scale=None, found_inf=None, coef_out=None):
        return grads[0].new_empty((), dtype=acc_dtype(grads))

    @torch.library.register_fake("fusedclip::clamp_")
    def _clamp_fake(grads, clip_value):
        return None

    @torch.library.register_fake("fusedclip::scale_each_")
    def _scale_each_fake(grads, coefs):
        return None

    @torch.library.register_fake("fusedclip::agc_")
    def _agc_fake(weights, grads, clip_factor, eps, norm_type):
        return None


class NativeBackend:
    """The compiled kernels: the CPU kernel for CPU tensors, the one-launch CUDA kernel for CUDA tensors.
    Every method takes a non-empty list of tensors on one device."""

    name = "native"

    @staticmethod
    def available(device_type):
        if not _ext.LOADED:
            return False, f"the fusedclip extension did not load ({_ext.LOAD_ERROR}): {_ext.HOW_TO_BUILD}"
        if device_type == "cpu":
            return True, ""
        if device_type == "cuda":
            if not _ext.HAS_CUDA_KERNELS:
                return False, f"the extension was built without CUDA kernels: {_ext.HOW_TO_BUILD_CUDA}"
            if not torch.cuda.is_available():
                return False, "no CUDA GPU is visible"
            return True, ""
        return False, f"there is no native kernel for {device_type} tensors"

    # The fused extras (per-tensor norms, AMP unscale) run in the same pass.
    fused_extras = True

    @staticmethod
    def total_norm(tensors, norm_type, per_tensor=None, out_dtype=None):
        """0-dim norm in the accumulation dtype (fp32, fp64 when any tensor is fp64), or with
        out_dtype=torch.float64 unrounded; each tensor's norm into per_tensor (a 1-D tensor of the accumulation
        dtype) when given."""
        return torch.ops.fusedclip.total_norm(tensors, norm_type, per_tensor, out_dtype)

    @staticmethod
    def clip(grads, max_norm, norm_type, per_tensor=None, inv_scale=None, found_inf=None):
        """The fused clip; returns the norm in the promoted dtype of the grads. With inv_scale (AMP), the
        grads are unscaled in the same pass and found_inf set when an unscaled value is inf/NaN."""
        return torch.ops.fusedclip.clip_(grads, max_norm, norm_type, per_tensor, inv_scale, found_inf)

    @staticmethod
    def scale(grads, max_norm, total_norm):
        torch.ops.fusedclip.scale_(grads, max_norm, total_norm)

    @staticmethod
    def scale_each(grads, coefs):
        """grads[i] *= coefs[i] in place (coefs: 1-D float32/float64 on the grads' device, one per tensor), in each
        tensor's opmath type (float; double for fp64) as torch's mul_ on the CPU; coefficient 1: not written."""
        torch.ops.fusedclip.scale_each_(grads, coefs)

    @staticmethod
    def clamp(grads, clip_value):
        torch.ops.fusedclip.clamp_(grads, clip_value)

    @staticmethod
    def zclip(grads, state, config, norm=None, inv_scale=None, found_inf=None, coef_out=None):
        """ZClip's step (csrc/zclip_rule.h) in the fused pass: the norm (or the given one), the coefficient from
        the float64 state, the scaling unless it is 1 (or, with coef_out, the factor written there instead),
        the state's update; found_inf set also on a skipped step. Returns the norm in the accumulation dtype."""
        return torch.ops.fusedclip.zclip_(grads, state, config, norm, inv_scale, found_inf, coef_out)

    @staticmethod
    def agc(weights, grads, clip_factor, eps, norm_type):
        """Adaptive gradient clipping (fusedclip/agc.py): weights[i] and grads[i] of one shape and dtype, none
        empty; norm_type not 0."""
        torch.ops.fusedclip.agc_(weights, grads, clip_factor, eps, norm_type)
