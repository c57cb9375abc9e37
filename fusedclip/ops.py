"""The compiled operators (torch.ops.fusedclip.*, declared in csrc/ops.cpp): the
shape-and-dtype ("fake") implementations torch.compile traces with, and the dtype
rules they share with the backends (fusedclip/backends/native.py calls the ops)."""
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


# ZClip's kernels (csrc/common/zclip_rule.h, fusedclip/backends/triton/zclip.py) take the rule's settings as a list of
# floats in this order (ZConfigSlot) and keep the state in a float64 tensor: these slots, then the warm-up buffer
# (ZSlot). fusedclip/zclip.py builds both from these names; zclip_layout_mismatch checks the built module's.
ZCLIP_CONFIG = ("alpha", "z_thresh", "cap", "has_cap", "eps", "warmup", "percentile", "clip_to_mean",
                "clip_factor", "skip_update_on_spike", "skip_spikes", "skip_nonfinite")
ZCLIP_STATE = ("steps", "mean", "var", "skipped")  # then the buffer, from slot len(ZCLIP_STATE)


def zclip_layout_mismatch():
    """Why the built extension's ZClip layouts differ from ZCLIP_CONFIG / ZCLIP_STATE (a stale build), or None."""
    info = _ext.build_info() if _ext.LOADED else {}
    built = (info.get("zclip_config_len"), info.get("zclip_buffer"))
    if built == (str(len(ZCLIP_CONFIG)), str(len(ZCLIP_STATE))):
        return None
    return (f"the extension's ZClip layout (config of {built[0]} values, buffer at slot {built[1]}) differs from "
            f"fusedclip's ({len(ZCLIP_CONFIG)}, {len(ZCLIP_STATE)}): rebuild it ({_ext.HOW_TO_BUILD})")


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
