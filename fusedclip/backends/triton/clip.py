"""The Triton clip: the norm, clip, scale and clamp launchers and their torch.library operators
(fusedclip_triton::total_norm, clip_, scale_, clamp_)."""
from typing import List, Optional

import torch

from ...ops import acc_dtype, result_dtype
from . import launcher
from .kernels import L2, PBLOCK, _clamp_kernel, _finish_kernel, _one_launch_kernel, _partials_kernel


def _norm_and_maybe_clip(tensors, max_norm, norm_type, clip, out_dtype, per_tensor=None, inv_scale=None,
                         found_inf=None, launch=None):
    kind = launcher._norm_kind(norm_type)
    table, n_chunks, any_double, copies = launcher._table(tensors)
    device = tensors[0].device
    n = len(tensors)
    acc_torch = torch.float64 if any_double else torch.float32
    launcher._check_extras(n, device, acc_torch, per_tensor, inv_scale, found_inf)
    if n_chunks == 0:  # only empty tensors: norm 0, nothing to scale, nothing non-finite
        if per_tensor is not None:
            per_tensor.zero_()
        return torch.zeros((), dtype=out_dtype, device=device)
    acc = launcher._tl_acc(any_double)
    out = torch.empty((), dtype=out_dtype, device=device)
    partials = torch.empty(n_chunks, dtype=torch.float64, device=device)  # see _norm_from_partials
    amp = inv_scale is not None
    nonfinite = torch.empty(n_chunks, dtype=acc_torch, device=device) if amp else partials
    if amp and found_inf is None:
        found_inf = torch.zeros((), dtype=torch.float32, device=device)
    # pointers a variant does not use (its constexpr switch is off) get any tensor of the right device
    per_tensor_ = per_tensor if per_tensor is not None else partials
    inv_scale_ = inv_scale.reshape(()) if amp else partials
    found_inf_ = found_inf.reshape(()) if amp else partials
    flags = dict(AMP=amp, NORM=kind, ACC=acc, BLOCK=launcher.BLOCK, EXACT_POW=launcher.EXACT_POW)
    p_bits, max_norm_bits = launcher._bits(norm_type), launcher._bits(max_norm)
    if launcher.one_launch(launch):
        args = (table, n, n_chunks, partials, nonfinite, launcher._WORKSPACES.get(device), out, per_tensor_, inv_scale_,
                found_inf_, p_bits, max_norm_bits)
        constexprs = dict(CLIP=clip, PER_TENSOR=per_tensor is not None, PBLOCK=PBLOCK, **flags)
        if launcher.INTERPRET:  # programs run one after another there: a barrier across several would never open
            options, programs = None, 1
        else:
            options, programs = launcher._one_launch_variant(device, n_chunks, args, constexprs)
        launcher._launch(_one_launch_kernel, programs, *args, options=options, **constexprs)
    else:
        programs = launcher._programs(device, n_chunks)
        launcher._launch(_partials_kernel, programs, table, n, n_chunks, partials, nonfinite, inv_scale_, p_bits,
                         **flags)
        args = (table, n, n_chunks, partials, nonfinite, partials, out, per_tensor_, inv_scale_, found_inf_, p_bits,
                max_norm_bits)
        constexprs = dict(FROM_PARTIALS=True, WRITE_NORM=True, CLIP=clip, PER_TENSOR=per_tensor is not None,
                          PBLOCK=PBLOCK, **flags)
        launcher._launch(_finish_kernel, programs if clip or per_tensor is not None else 1, *args,
                         options=launcher._two_launch_options(device, args, constexprs, _finish_kernel), **constexprs)
    if clip:
        launcher._write_back(copies)
    return out


def total_norm(tensors, norm_type, per_tensor=None, out_dtype=None, launch=None):
    """The norm of all tensors as one vector, 0-dim, in fp32 (fp64 when any tensor is fp64), or with
    out_dtype=torch.float64 unrounded (the sharded paths' partials); each tensor's own norm into per_tensor (1-D,
    the accumulation dtype) when given, from the same partials."""
    acc = acc_dtype(tensors)
    if out_dtype not in (None, acc, torch.float64):
        raise ValueError(f"fusedclip.total_norm: out_dtype must be None, {acc} or torch.float64, got {out_dtype}")
    return _norm_and_maybe_clip(tensors, 0.0, norm_type, False, out_dtype or acc, per_tensor, launch=launch)


def clip(grads, max_norm, norm_type, per_tensor=None, inv_scale=None, found_inf=None, launch=None):
    """The fused clip: norm, then (only if the factor is not 1) in-place scaling. Returns the norm in the
    promoted dtype. per_tensor: as in total_norm (norms before clipping). AMP: with inv_scale (and found_inf),
    every element is multiplied by inv_scale before it counts, found_inf is set to 1 when an unscaled value is
    inf/NaN, and the grads are written once, as grad * (inv_scale * coef)."""
    return _norm_and_maybe_clip(grads, max_norm, norm_type, True, result_dtype(grads), per_tensor, inv_scale,
                                found_inf, launch)


def scale(grads, max_norm, norm):
    """grads *= max_norm / (norm + 1e-6) when that is < 1; norm: a one-element tensor on the grads' device."""
    table, n_chunks, any_double, copies = launcher._table(grads)
    device = grads[0].device
    if not isinstance(norm, torch.Tensor) or norm.device != device or norm.numel() != 1:
        raise ValueError(f"fusedclip.clip_grads_with_norm_: total_norm must be a one-element tensor on {device}")
    if norm.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"fusedclip: total_norm must be float32, float64, float16 or bfloat16, got {norm.dtype}")
    if n_chunks == 0:
        return
    norm = norm.reshape(()).contiguous()
    if norm.data_ptr() % 16:  # it also stands in for the partials, whose alignment the kernel specializes on
        norm = norm.clone()
    acc = launcher._tl_acc(any_double or norm.dtype == torch.float64)
    args = (table, len(grads), n_chunks, norm, norm, norm, norm, norm, norm, norm, 0, launcher._bits(max_norm))
    constexprs = dict(FROM_PARTIALS=False, WRITE_NORM=False, CLIP=True, AMP=False, PER_TENSOR=False, NORM=L2, ACC=acc,
                      BLOCK=launcher.BLOCK, PBLOCK=PBLOCK, EXACT_POW=launcher.EXACT_POW)
    launcher._launch(_finish_kernel, launcher._programs(device, n_chunks), *args,
                     options=launcher._two_launch_options(device, args, constexprs, _finish_kernel), **constexprs)
    launcher._write_back(copies)


def clamp(grads, clip_value):
    """clamp(-clip_value, clip_value) in place, NaN passing through."""
    table, n_chunks, _, copies = launcher._table(grads)
    if n_chunks == 0:
        return
    args = (table, len(grads), n_chunks, launcher._bits(clip_value))
    options = launcher._two_launch_options(grads[0].device, args, dict(BLOCK=launcher.BLOCK), _clamp_kernel)
    launcher._launch(_clamp_kernel, launcher._programs(grads[0].device, n_chunks), *args, options=options,
                     BLOCK=launcher.BLOCK)
    launcher._write_back(copies)


# ---------------------------------------------------------------------------------------------------------------
# Operators (torch.library, so torch.compile(fullgraph=True) traces through them) and the backend
# ---------------------------------------------------------------------------------------------------------------

def _define_ops():
    # Opaque custom ops (not triton_op): the kernels write through pointers from the table, which no tracer can
    # see, so the mutation is declared in the schema instead. The bodies look the launchers up at call time.
    # The same signatures as the native ops (csrc/ops.cpp), extras included, so the two backends are
    # interchangeable in clip.py and amp.py.
    # The optional tensors have no default: torch 2.6's custom_op wrapper indexes mutated arguments by position in
    # the arguments as the dispatcher hands them over, and the dispatcher drops trailing arguments equal to their
    # default (an IndexError there). The backend methods below pass every argument.
    @torch.library.custom_op("fusedclip_triton::total_norm", mutates_args=("per_tensor",))
    def _total_norm_op(tensors: List[torch.Tensor], norm_type: float, per_tensor: Optional[torch.Tensor],
                       out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:  # after the mutated one: safe
        return total_norm(tensors, norm_type, per_tensor, out_dtype)

    @_total_norm_op.register_fake
    def _(tensors, norm_type, per_tensor=None, out_dtype=None):
        return tensors[0].new_empty((), dtype=out_dtype or acc_dtype(tensors))

    @torch.library.custom_op("fusedclip_triton::clip_", mutates_args=("grads", "per_tensor", "found_inf"))
    def _clip_op(grads: List[torch.Tensor], max_norm: float, norm_type: float, per_tensor: Optional[torch.Tensor],
                 inv_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]) -> torch.Tensor:
        return clip(grads, max_norm, norm_type, per_tensor, inv_scale, found_inf)

    @_clip_op.register_fake
    def _(grads, max_norm, norm_type, per_tensor=None, inv_scale=None, found_inf=None):
        return grads[0].new_empty((), dtype=result_dtype(grads))

    @torch.library.custom_op("fusedclip_triton::scale_", mutates_args=("grads",))
    def _scale_op(grads: List[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
        scale(grads, max_norm, total_norm)

    @_scale_op.register_fake
    def _(grads, max_norm, total_norm):
        return None

    @torch.library.custom_op("fusedclip_triton::clamp_", mutates_args=("grads",))
    def _clamp_op(grads: List[torch.Tensor], clip_value: float) -> None:
        clamp(grads, clip_value)

    @_clamp_op.register_fake
    def _(grads, clip_value):
        return None


if not hasattr(torch.ops.fusedclip_triton, "clip_"):  # once per process
    _define_ops()
