"""backend="native": the compiled operators of the extension (torch.ops.fusedclip.*, csrc/), CPU and CUDA."""
import torch

from .. import _ext
from .protocol import Backend


class NativeBackend(Backend):
    """The compiled kernels: the CPU kernel for CPU tensors, the one-launch CUDA kernel for CUDA tensors.
    Every method takes a non-empty list of tensors on one device."""

    name = "native"
    fused_extras = fused_zclip = fused_agc = fused_scale_each = True

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
        """ZClip's step (csrc/common/zclip_rule.h) in the fused pass: the norm (or the given one), the coefficient from
        the float64 state, the scaling unless it is 1 (or, with coef_out, the factor written there instead),
        the state's update; found_inf set also on a skipped step. Returns the norm in the accumulation dtype."""
        return torch.ops.fusedclip.zclip_(grads, state, config, norm, inv_scale, found_inf, coef_out)

    @staticmethod
    def agc(weights, grads, clip_factor, eps, norm_type):
        """Adaptive gradient clipping (fusedclip/agc.py): weights[i] and grads[i] of one shape and dtype, none
        empty; norm_type not 0."""
        torch.ops.fusedclip.agc_(weights, grads, clip_factor, eps, norm_type)
