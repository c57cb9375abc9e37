"""The single-device building blocks of the public functions: argument checks, the norm and scale passes over
one device's (or one rank's) tensors, and torch's own functions. clip.py (the public functions), distributed/
(the sharded ones) and amp.py build on this module; it imports none of them.
"""
import math
import sys

import torch

from .ops import acc_dtype

# torch's own functions, captured at import: backend="torch" calls these, so fusedclip.patch_torch() (which
# routes torch.nn.utils' names to fusedclip) cannot make them call themselves.
torch_clip_grad_norm_ = torch.nn.utils.clip_grad_norm_
torch_get_total_norm = torch.nn.utils.get_total_norm
torch_clip_grads_with_norm_ = torch.nn.utils.clip_grads_with_norm_
torch_clip_grad_value_ = torch.nn.utils.clip_grad_value_

NONFINITE_MESSAGE = ("The total norm of order {p} for gradients from `parameters` is non-finite, so it cannot be "
                     "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
                     "`error_if_nonfinite=False`")


def as_list(tensors):
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    return tensors if isinstance(tensors, (list, tuple)) else list(tensors)


def grads_of(params, fn):
    try:
        if params and type(params[0]) is not torch.nn.Parameter and is_dtensor_type(type(params[0])):
            # DTensor parameters: .grad would go through __torch_function__ (DTensor's does nothing) at ~0.5 us a read
            with torch._C.DisableTorchFunctionSubclass():
                grads = [p.grad for p in params]
        else:
            grads = [p.grad for p in params]  # one attribute read per parameter
        return [g for g in grads if g is not None]
    except AttributeError:
        check_tensors(params, fn, "parameters")
        raise


def is_dtensor_type(cls):
    mod = sys.modules.get("torch.distributed.tensor")  # DTensors exist only once it is imported
    return mod is not None and issubclass(cls, mod.DTensor)


def check_tensors(items, fn, what):
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fusedclip.{fn}: {what} must be Tensors, but item {i} is a {type(t).__name__}")


def check_writable(grads, fn, offset=0):
    """Before any gradient is written: an expanded gradient (stride 0 along a dimension of size > 1) cannot be
    written in place (torch's in-place ops refuse it too). Checked here, in Python, because the kernels write the
    dense gradients in place and the others through copies written back last: the failing write-back would come
    after the other gradients were scaled."""
    for i, g in enumerate(grads):
        if (isinstance(g, torch.Tensor) and g.layout == torch.strided and not g.is_contiguous()
                and any(st == 0 and n > 1 for st, n in zip(g.stride(), g.shape))):
            raise RuntimeError(f"fusedclip.{fn}: gradient {i + offset} is an expanded tensor (stride 0 along a "
                               "dimension of size > 1): its elements share memory, so it cannot be written in place; "
                               "clone() it first")


def parse_norm_type(norm_type, fn):
    try:
        p = float(norm_type)
    except (TypeError, ValueError):
        raise ValueError(f"fusedclip.{fn}: norm_type must be a number or 'inf', got {norm_type!r}") from None
    if math.isnan(p):
        raise ValueError(f"fusedclip.{fn}: norm_type must not be NaN")
    return p


def parse_number(x, fn, what):
    try:
        return float(x)
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as e:
        # RuntimeError / NotImplementedError: a tensor float() cannot read (on the meta device, several elements)
        raise TypeError(f"fusedclip.{fn}: {what} must be a number, got {x!r} ({e})") from None


def by_device(tensors):
    groups = {}
    for t in tensors:
        groups.setdefault(t.device, []).append(t)
    return groups


def groups_for(be, tensors, fn, writes=False):
    """by_device(tensors), after checking that `be` runs on every device among them (a gradient on the meta
    device beside CPU ones, say): a clear error before anything is read or written, not a kernel's fake result.
    With writes, meta tensors (no data: nothing to write, as torch's in-place ops on them do nothing) are left out."""
    groups = by_device(tensors)
    if writes:
        groups = {d: g for d, g in groups.items() if d.type != "meta"}
    for device in groups:
        ok, why = be.available(device.type)
        if not ok:
            raise RuntimeError(f"fusedclip.{fn}: the gradients are on {', '.join(str(d) for d in groups)}, and "
                               f"backend {be.name!r} cannot run on {device.type} tensors: {why}")
    return groups


def call_backend(op, tensors, fn, *args):
    """op(tensors, *args) for one device. Returns (True, result), or (False, None) when the tensors span
    several devices (the caller then goes device by device); other failures become clear errors."""
    if len({t.device for t in tensors if isinstance(t, torch.Tensor)}) > 1:
        # not left to the op: with a meta tensor among them the dispatcher runs the op's fake kernel, which
        # returns an uninitialized norm and writes nothing, instead of raising
        return False, None
    try:
        return True, op(tensors, *args)
    except (TypeError, ValueError, RuntimeError, NotImplementedError):
        check_tensors(tensors, fn, "gradients" if fn != "get_total_norm" else "tensors")
        for i, t in enumerate(tensors):
            if t.layout != torch.strided:
                raise NotImplementedError(f"fusedclip.{fn}: tensor {i} is {t.layout}; only dense gradients are "
                                          "supported by the fused kernels (backend='torch' handles sparse ones)")
        if len({t.device for t in tensors}) > 1:
            return False, None
        raise


KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_kernel_inputs(tensors, fn):
    """What the fused kernels take (dense float32/float64/float16/bfloat16), checked in Python where no kernel
    runs (norm_type 0 counts tensors): the same errors as the kernels' (complex or integer tensors a TypeError,
    sparse ones NotImplementedError), so the outcome does not depend on the norm type."""
    for i, t in enumerate(tensors):
        if t.layout != torch.strided:
            raise NotImplementedError(f"fusedclip.{fn}: tensor {i} is {t.layout}; only dense gradients are "
                                      "supported by the fused kernels (backend='torch' handles sparse ones)")
        if t.dtype not in KERNEL_DTYPES:
            raise TypeError(f"fusedclip.{fn}: tensor {i} is {t.dtype}; gradients must be float32, float64, "
                            "float16 or bfloat16")


def new_per_tensor(grads, be):
    """The output buffer for per-tensor norms when the backend fills it in its own pass, else None."""
    if be.fused_extras:
        return torch.empty(len(grads), dtype=acc_dtype(grads), device=grads[0].device)
    return None


def per_tensor_norms(grads, p):
    """Each grad's norm in the accumulation dtype, with torch ops: the path for several devices, norm_type 0 and
    backends without fused per-tensor norms (an extra read of the gradients). Empty tensors have norm 0."""
    dtype = acc_dtype(grads)
    first = grads[0].device
    return torch.stack([(torch.linalg.vector_norm(g, p, dtype=dtype) if g.numel() else g.new_zeros((), dtype=dtype))
                        .to(first) for g in grads])


def total_norm_of(grads, p, be, fn, per_tensor=False, unrounded=False):
    """The norm of all grads in the accumulation dtype (fp32, or fp64 when any grad is fp64), any devices;
    with per_tensor, also each grad's norm (returns the pair). unrounded: the norm in float64 as the kernel
    computed it, not rounded to fp32 (what the sharded paths reduce across ranks); not with per_tensor."""
    if p == 0.0:
        check_tensors(grads, fn, "tensors" if fn == "get_total_norm" else "gradients")
        check_kernel_inputs(grads, fn)  # no kernel runs for p=0, but what it takes must not depend on p
        # torch's definition (the norm of the per-tensor norms) makes p=0 count the tensors with a nonzero
        # (or NaN) element; fusedclip keeps that.
        first = grads[0].device
        norm = torch.stack([(g != 0).any().to(first) for g in grads]).sum().to(acc_dtype(grads))
        return (norm, per_tensor_norms(grads, p)) if per_tensor else norm
    # Under torch.compile the per-tensor buffer is passed even when not asked for: the total_norm op is then
    # functionalized with a mutated buffer to return beside the norm. Without one, Inductor (seen in torch 2.14) turns
    # the functionalized op's 1-tuple result back into the bare op but keeps the `[0]` on it, and fails with
    # "getitem is not an OpOverload". Filling the buffer costs no extra read of the tensors.
    out = new_per_tensor(grads, be) if per_tensor or torch.compiler.is_compiling() else None
    wide = (torch.float64,) if unrounded else ()
    ok, norm = call_backend(be.total_norm, grads, fn, p, *([out] if out is not None or wide else []), *wide)
    if not ok:
        dtype = torch.float64 if unrounded else acc_dtype(grads)
        first = grads[0].device
        norms = [be.total_norm(group, p, None, *wide).to(first, dtype)
                 for group in groups_for(be, grads, fn).values()]
        norm, out = torch.linalg.vector_norm(torch.stack(norms), p), None
    if not per_tensor:
        return norm
    return norm, (out if out is not None else per_tensor_norms(grads, p))


def scale_by_norm(grads, max_norm, norm, be, fn):
    check_writable(grads, fn)
    ok, _ = call_backend(be.scale, grads, fn, max_norm, norm.to(grads[0].device))
    if not ok:
        for device, group in groups_for(be, grads, fn, writes=True).items():
            be.scale(group, max_norm, norm.to(device))


def check_finite(norm, p):
    if not torch.isfinite(norm):  # a host sync, as in torch: only with error_if_nonfinite=True
        raise RuntimeError(NONFINITE_MESSAGE.format(p=p))


def scale_with_norm(params, grads, max_norm, total_norm, be, foreach, fn):
    """clip_grads_with_norm_ on plain tensors: `params` a list, `grads` their gradients, max_norm a float,
    total_norm a tensor or a number."""
    if be.delegates_to_torch:
        return torch_clip_grads_with_norm_(params, max_norm, total_norm, foreach)
    if not grads:
        return None
    if not isinstance(total_norm, torch.Tensor):
        total_norm = torch.tensor(parse_number(total_norm, fn, "total_norm"))
    scale_by_norm(grads, max_norm, total_norm, be, fn)
    return None
