"""The reduction every sharded norm ends in: a rank's norm packed into the float64 tensor all ranks reduce, the
all_reduce (functional collectives), the global norm unpacked; the passes over one rank's local tensors; and the
norm over a process group of plain shards (FSDP1 flat parameters, ZeRO partitions, TP slices)."""
import math
import operator

import torch
import torch.distributed as dist

if dist.is_available():  # a torch built without distributed has no collectives (nor sharded gradients)
    import torch.distributed._functional_collectives as funcol

from .. import _core
from .. import _ext

INF = math.inf
# the extension's entries for the two passes over local tensors (absent from a build older than this module)
FAST_LOCAL = _ext.LOADED and hasattr(_ext._C, "local_norm")


# ---------------------------------------------------------------------------------------------------------
# The reduction: pack a rank's norm into the tensor all ranks reduce, and unpack the result.
# ---------------------------------------------------------------------------------------------------------

def pack(local, has, p, device):
    """The tensor this rank contributes (float64 on `device`) and the reduce op. `local` is this rank's norm
    of the elements it counts (None when it counts none); `has`: whether it counts any element."""
    x = local.to(device, torch.float64) if local is not None else torch.zeros((), dtype=torch.float64,
                                                                              device=device)
    if p == INF:
        # MAX drops NaN on some backends (std::max, NCCL), so a NaN norm travels as a flag.
        nan = torch.isnan(x)
        return torch.stack([x.masked_fill(nan, 0.0), nan.to(torch.float64)]), "max"
    if p == -INF:
        # min over elements: a rank without elements contributes +inf (min's identity); the third entry
        # says whether any rank has elements (no elements at all: norm 0, fusedclip's convention).
        nan = torch.isnan(x)
        x = x.masked_fill(nan, INF) if has else torch.full_like(x, INF)
        return torch.stack([x, -nan.to(torch.float64), torch.full_like(x, -float(has))]), "min"
    if p == 0.0:
        return x, "sum"  # a count of tensors: counts add up
    return (x.pow(p) if has else x), "sum"  # sum of |g|^p; a rank without elements adds 0


def unpack(t, p):
    """The global norm (float64) from the reduced tensor."""
    if p == INF:
        return torch.where(t[1] > 0, torch.full_like(t[0], math.nan), t[0])
    if p == -INF:
        return torch.where(t[1] < 0, torch.full_like(t[0], math.nan),
                           torch.where(t[2] < 0, t[0], torch.zeros_like(t[0])))
    if p == 0.0:
        return t
    return t.pow(1.0 / p)


def combine(a, b, op):
    if op == "max":
        return torch.maximum(a, b)
    if op == "min":
        return torch.minimum(a, b)
    return a + b


def all_reduce(t, op, groups):
    """t reduced with op ("sum", "max" or "min") over every group in turn (the dims of a mesh reduce over all
    of its ranks). Functional collectives, as DTensor's own: torch.compile traces them into the graph."""
    for group in groups:
        t = funcol.all_reduce(t, op, group)
    return funcol.wait_tensor(t)  # eager returns a tensor that waits on first use: make it a plain one


def local_norm(tensors, p, be, fn):
    """(this rank's norm of `tensors` or None, whether they have any element)."""
    if not tensors:
        return None, False
    if fast_local(be) and p != 0.0:
        norm = _ext._C.local_norm(tensors, p)  # plain tensors on one device, read in C++ (None: the op path)
        if norm is not None:
            return norm, p > 0 or any(map(torch.Tensor.numel, tensors))  # for p > 0 no elements is a norm of 0
    has = any(t.numel() for t in tensors)
    if not be.delegates_to_torch:
        # in float64 as the kernel computed it: a norm rounded to fp32, raised to p and summed over ranks,
        # would cost the global norm up to an ulp
        return _core.total_norm_of(tensors, p, be, fn, unrounded=True), has
    nonempty = [t for t in tensors if t.numel()]
    if not nonempty:  # torch's norms raise on empty tensors for inf; their norm is 0
        return None, False
    return _core.torch_get_total_norm(nonempty, p), has


def fast_local(be):
    """Whether the local passes may try the extension's C++ entries (eager, native backend, a recent build)."""
    return be.name == "native" and FAST_LOCAL and not torch.compiler.is_compiling()


def group_device(group):
    """Where a rank without gradients puts its partial: the device the group's backend communicates on."""
    name = str(dist.get_backend(group))
    if "nccl" in name and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def scale_local(tensors, max_norm, norm, be, fn):
    """Scales local tensors by the global norm with the coefficient computed in their accumulation dtype."""
    if not tensors:
        return
    norm = norm.to(torch.float64 if torch.float64 in distinct_dtypes(tensors) else torch.float32)
    if fast_local(be) and _ext._C.scale_local(tensors, max_norm, norm.to(tensors[0].device)):
        return  # dense tensors on one device (checked in C++; an expanded one takes the op path, which raises)
    if not be.delegates_to_torch:
        _core.scale_by_norm(tensors, max_norm, norm, be, fn)
        return
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    groups = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for (device, _), group in groups.items():
        torch._foreach_mul_(group, coef.to(device))


_dtype_of = operator.attrgetter("dtype")


def distinct_dtypes(tensors):
    """The distinct dtypes of `tensors` (a C loop in eager mode; dynamo cannot trace operator.attrgetter)."""
    return {t.dtype for t in tensors} if torch.compiler.is_compiling() else set(map(_dtype_of, tensors))


def reduce_op(p):
    """The all_reduce op of a p-norm's partials."""
    return "max" if p == INF else "min" if p == -INF else "sum"


# ---------------------------------------------------------------------------------------------------------
# A process group: each rank passes its shards (FSDP1 flat parameters, ZeRO partitions, TP slices).
# ---------------------------------------------------------------------------------------------------------

def group_norm(grads, p, process_group, be, fn):
    """The global norm (float64, on this rank's gradient device) of the shards all ranks of the group hold."""
    if not all(issubclass(t, torch.Tensor) for t in set(map(type, grads))):
        _core.check_tensors(grads, fn, "gradients")  # says which item is not a tensor
    local, has = local_norm(grads, p, be, fn)
    device = grads[0].device if grads else group_device(process_group)
    t, op = pack(local, has, p, device)
    return unpack(all_reduce(t, op, [process_group]), p)
