"""The public functions: torch.nn.utils' clipping API, backed by fused kernels.

The hot path (clip_ or get_total_norm in eager mode with the default arguments,
plain tensors on one device) is one call into the extension, which reads the
gradients in C++ (csrc/python_module.cpp); it declines anything unusual, and
that (several devices, error_if_nonfinite, norm_type 0, subclasses, bad input,
torch.compile) goes through the operator path below.
"""
import math

import torch

from . import _ext, backends, optimizers
from . import distributed as _distributed
from ._core import (as_list, call_backend, check_finite, check_kernel_inputs, check_tensors, check_writable, grads_of,
                    groups_for, new_per_tensor, parse_norm_type, parse_number, per_tensor_norms, scale_by_norm,
                    scale_with_norm, torch_clip_grad_norm_, torch_clip_grad_value_, torch_get_total_norm, total_norm_of)
from .ops import result_dtype


def _no_per_tensor_when_sharded(per_tensor, fn):
    if per_tensor:
        raise NotImplementedError(f"fusedclip.{fn}: per_tensor=True is not supported with process_group or "
                                  "DTensor gradients (the norms would be of this rank's shards)")


@torch.no_grad()
def clip_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None, *, backend="auto",
          per_tensor=False, process_group=None, plain_group=None, on_nonfinite="clip", optimizer=None):
    """Clips the gradient norm of `parameters` in place; returns the total norm (before clipping).

    Same arguments and result as torch.nn.utils.clip_grad_norm_; unlike it, the norm is accumulated in fp32
    (fp64 when any gradient is fp64) whatever the gradients' dtypes, the coefficient computed in that dtype, and
    nothing is written when the coefficient is 1 (docs/usage.md, "Semantics").

    Args:
        parameters (Tensor or iterable of Tensors): the tensors whose .grad are clipped (a generator is fine);
            those without a gradient are skipped.
        max_norm (float): the largest norm allowed; the gradients are scaled by max_norm / (norm + 1e-6) when
            that is below 1.
        norm_type (float, int or str): the p of the p-norm; 'inf' / float('inf') for the largest absolute value.
            Default 2.0. 0 counts the gradients with a nonzero element, as torch does. NaN raises ValueError.
        error_if_nonfinite (bool): raise RuntimeError (torch's message, no gradient changed) when the norm is
            inf or NaN. A host sync. Default False.
        foreach: accepted for torch's signature and ignored: the fused kernels take every tensor in one pass.
        backend (str): "auto" (default), "native", "triton" or "torch" (torch.nn.utils itself).
        per_tensor (bool): also return each gradient's own norm, from the same pass. Default False.
        process_group (ProcessGroup, optional): plain gradients: they are this rank's shards; the norm is that of
            all ranks' shards (one all_reduce; every rank of the group must call). DTensor gradients need none: they
            are reduced over their meshes; with them, process_group is the pipeline stages' group (each rank holds
            another stage's gradients) and the norm covers all stages.
        plain_group (ProcessGroup, optional): plain gradients among DTensor ones are replicated (the same on every
            rank: counted once) unless this names the group they are shards of (e.g. experts kept as plain
            tensors: their expert-parallel group). docs/distributed.md says what each mix means.
        on_nonfinite (str): "clip" (default, torch's behaviour) or "skip": when the norm is inf/NaN the gradients
            are left as they are and `optimizer`'s next step is skipped (no host sync for torch's fused
            optimizers; the norm and scaling passes are then two launches).
        optimizer (torch.optim.Optimizer, optional): the optimizer whose step on_nonfinite="skip" skips.

    Returns:
        Tensor: the total norm of the gradients before clipping, a 0-dim tensor on the first gradient's device
        in the promotion of their dtypes (tensor(0.) without gradients; a DTensor for DTensor gradients). With
        per_tensor=True, (total_norm, norms): norms[i] is the i-th non-None gradient's norm before clipping, a
        1-D tensor in the accumulation dtype (fp32; fp64 when any gradient is fp64).
    """
    params = as_list(parameters)
    if on_nonfinite != "clip":
        return _clip_or_skip(params, max_norm, norm_type, error_if_nonfinite, backend, per_tensor, process_group,
                             on_nonfinite, optimizer, plain_group)
    if not (per_tensor or error_if_nonfinite or plain_group is not None) and backends.fast_path_allowed(backend):
        norm = _ext._C.clip_grads(params, max_norm, norm_type) if process_group is None else None
        if norm is None:  # DTensor parameters (FSDP2, TP): their gradients read in C++ too, or None
            norm = _distributed.fast_clip(params, max_norm, norm_type, process_group)
        if norm is not None:
            return norm
    grads = grads_of(params, "clip_")
    device_type = grads[0].device.type if grads else "cpu"
    be = backends.resolve(backend, device_type)
    p = parse_norm_type(norm_type, "clip_")
    max_norm = parse_number(max_norm, "clip_", "max_norm")
    if process_group is not None or plain_group is not None or _distributed.has_dtensor(grads):
        _no_per_tensor_when_sharded(per_tensor, "clip_")
        return _distributed.sharded_clip_(params, grads, max_norm, p, error_if_nonfinite, process_group, be, foreach,
                                          plain_group)
    if be.delegates_to_torch:
        norms = per_tensor_norms(grads, p) if per_tensor and grads else torch.empty(0)
        norm = torch_clip_grad_norm_(params, max_norm, p, error_if_nonfinite, foreach)
        return (norm, norms) if per_tensor else norm
    if not grads:
        return (torch.tensor(0.0), torch.empty(0)) if per_tensor else torch.tensor(0.0)
    check_writable(grads, "clip_")
    if p != 0.0 and not error_if_nonfinite:
        out = new_per_tensor(grads, be) if per_tensor else None
        if out is not None or not per_tensor:
            ok, norm = call_backend(be.clip, grads, "clip_", max_norm, p, *([out] if out is not None else []))
            if ok:
                return (norm, out) if per_tensor else norm
    result = total_norm_of(grads, p, be, "clip_", per_tensor)
    norm = result[0] if per_tensor else result
    if error_if_nonfinite:
        check_finite(norm, p)
    scale_by_norm(grads, max_norm, norm, be, "clip_")
    total = norm.to(result_dtype(grads))
    return (total, result[1]) if per_tensor else total


clip_grad_norm_ = clip_


def _clip_or_skip(params, max_norm, norm_type, error_if_nonfinite, backend, per_tensor, process_group,
                  on_nonfinite, optimizer, plain_group=None):
    if on_nonfinite != "skip":
        raise ValueError(f"fusedclip.clip_: on_nonfinite must be 'clip' or 'skip', got {on_nonfinite!r}")
    if optimizer is None:
        raise ValueError("fusedclip.clip_: on_nonfinite='skip' skips the optimizer's next step: pass optimizer=")
    if error_if_nonfinite or per_tensor:
        raise ValueError("fusedclip.clip_: on_nonfinite='skip' cannot be combined with error_if_nonfinite or "
                         "per_tensor")
    grads = grads_of(params, "clip_")
    norm = get_total_norm(grads, norm_type, backend=backend, process_group=process_group, plain_group=plain_group)
    if not grads:
        return norm
    finite = torch.isfinite(norm)
    # a norm of 0 gives a coefficient of 1: nothing is written on a skipped step
    clip_grads_with_norm_(params, max_norm, torch.where(finite, norm, torch.zeros_like(norm)), backend=backend)
    flag = finite.logical_not().to(torch.float32)
    if _distributed.is_dtensor(flag):
        flag = flag.to_local()
    optimizers.skip_next_step_if(optimizer, flag.to(grads[0].device))
    return norm


@torch.no_grad()
def get_total_norm(tensors, norm_type=2.0, error_if_nonfinite=False, foreach=None, *, backend="auto",
                   per_tensor=False, process_group=None, plain_group=None):
    """The norm of `tensors` (usually gradients) as if they were one vector; like
    torch.nn.utils.get_total_norm, but accumulated in fp32 (fp64 when any tensor is fp64) whatever their dtype.

    Args:
        tensors (Tensor or iterable of Tensors): the tensors themselves (not parameters).
        norm_type (float, int or str): the p of the p-norm; 'inf' for the largest absolute value. Default 2.0.
        error_if_nonfinite (bool): raise RuntimeError when the norm is inf or NaN (a host sync). Default False.
        foreach: accepted for torch's signature and ignored.
        backend (str): "auto" (default), "native", "triton" or "torch".
        per_tensor (bool): also return each tensor's norm, from the same pass. Default False.
        process_group (ProcessGroup, optional): the tensors are this rank's shards; every rank gets the norm of
            all shards (every rank of the group must call). Among DTensors: the pipeline stages' group.
        plain_group (ProcessGroup, optional): the group plain tensors among DTensors are shards of (default: they
            are replicated, counted once).

    Returns:
        Tensor: a 0-dim tensor on the first tensor's device in the promotion of their dtypes (tensor(0.) for an
        empty list). With per_tensor=True, (total_norm, norms), norms[i] being tensors[i]'s norm in the
        accumulation dtype.
    """
    tensors = as_list(tensors)
    if not (per_tensor or error_if_nonfinite or process_group is not None or plain_group is not None) \
            and backends.fast_path_allowed(backend):
        norm = _ext._C.total_norm(tensors, norm_type)
        if norm is not None:
            return norm
    device_type = tensors[0].device.type if tensors and isinstance(tensors[0], torch.Tensor) else "cpu"
    be = backends.resolve(backend, device_type)
    p = parse_norm_type(norm_type, "get_total_norm")
    if process_group is not None or plain_group is not None or _distributed.has_dtensor(tensors):
        _no_per_tensor_when_sharded(per_tensor, "get_total_norm")
        return _distributed.sharded_total_norm(tensors, p, error_if_nonfinite, process_group, be, foreach, plain_group)
    if be.delegates_to_torch:
        norms = per_tensor_norms(tensors, p) if per_tensor and tensors else torch.empty(0)
        norm = torch_get_total_norm(tensors, p, error_if_nonfinite, foreach)
        return (norm, norms) if per_tensor else norm
    if not tensors:
        return (torch.tensor(0.0), torch.empty(0)) if per_tensor else torch.tensor(0.0)
    check_tensors(tensors, "get_total_norm", "tensors")  # before any dtype or device is read from them
    result = total_norm_of(tensors, p, be, "get_total_norm", per_tensor)
    norm = result[0] if per_tensor else result
    if error_if_nonfinite:
        check_finite(norm, p)
    total = norm.to(result_dtype(tensors))
    return (total, result[1]) if per_tensor else total


@torch.no_grad()
def clip_grads_with_norm_(parameters, max_norm, total_norm, foreach=None, *, backend="auto"):
    """Scales the gradients of `parameters` by max_norm / (total_norm + 1e-6) when that is below 1, as
    torch.nn.utils.clip_grads_with_norm_ does; the coefficient is computed in fp32 (fp64 for fp64). Nothing is
    written when it is 1.

    Args:
        parameters (Tensor or iterable of Tensors): the tensors whose .grad are scaled; those without one are
            skipped.
        max_norm (float): the largest norm allowed.
        total_norm (Tensor or float): the norm to clip against (usually from get_total_norm); a number is taken
            too, where torch's fails on one. A DTensor norm for DTensor gradients.
        foreach: accepted for torch's signature and ignored.
        backend (str): "auto" (default), "native", "triton" or "torch".

    Returns:
        None
    """
    params = as_list(parameters)
    grads = grads_of(params, "clip_grads_with_norm_")
    be = backends.resolve(backend, grads[0].device.type if grads else "cpu")
    max_norm = parse_number(max_norm, "clip_grads_with_norm_", "max_norm")
    if _distributed.has_dtensor(grads):
        return _distributed.sharded_scale_(params, grads, max_norm, total_norm, be, foreach)
    return scale_with_norm(params, grads, max_norm, total_norm, be, foreach, "clip_grads_with_norm_")


@torch.no_grad()
def clip_value_(parameters, clip_value, foreach=None, *, backend="auto"):
    """Clamps the gradients of `parameters` to [-clip_value, clip_value] in place, as
    torch.nn.utils.clip_grad_value_ does.

    Args:
        parameters (Tensor or iterable of Tensors): the tensors whose .grad are clamped; those without one are
            skipped.
        clip_value (float): the bound; NaN makes every element NaN, as torch's clamp does.
        foreach: accepted for torch's signature and ignored.
        backend (str): "auto" (default), "native", "triton" or "torch".

    Returns:
        None
    """
    params = as_list(parameters)
    grads = grads_of(params, "clip_value_")
    be = backends.resolve(backend, grads[0].device.type if grads else "cpu")
    clip_value = parse_number(clip_value, "clip_value_", "clip_value")
    if be.delegates_to_torch:
        return torch_clip_grad_value_(params, clip_value, foreach)
    check_writable(grads, "clip_value_")  # before anything is written, torch's clamp below included
    if math.isnan(clip_value):
        check_kernel_inputs(grads, "clip_value_")  # what the kernels refuse, refused before torch writes any
        # NaN bounds: torch's clamp makes every element NaN; the kernels would leave the gradients as they are
        return torch_clip_grad_value_(params, clip_value, foreach)
    if not grads:
        return None
    ok, _ = call_backend(be.clamp, grads, "clip_value_", clip_value)
    if not ok:
        for group in groups_for(be, grads, "clip_value_", writes=True).values():
            be.clamp(group, clip_value)
    return None


clip_grad_value_ = clip_value_
