"""The sharded forms of fusedclip.clip_, get_total_norm and clip_grads_with_norm_ (clip.py calls them when
`process_group` or `plain_group` is given or the gradients are DTensors): the global norm from reduce.py (a process
group) or dtensor.py (DTensors), then the scale pass, with torch's result dtype and a DTensor result where torch
returns one."""
import torch

from .. import _core
from ..ops import result_dtype
from .dtensor import FastPlan, Plan, fast_norm, fast_scale, has_dtensor, is_dtensor, plan_norm, plan_of, scale_plan
from .reduce import distinct_dtypes, fast_local, group_norm, scale_local


def _as_dtensor(norm, meshes):
    """The norm, the same on every rank, as a replicated DTensor on the first gradient's mesh (so code written for
    torch's result, e.g. total_norm.full_tensor(), keeps working, on mixed meshes too); a plain tensor when there
    are no DTensor gradients."""
    if not meshes:
        return norm
    from torch.distributed.tensor import DTensor, Replicate
    return DTensor.from_local(norm, meshes[0], [Replicate()] * meshes[0].ndim, run_check=False)


def _result(norm, tensors, dtypes=None):
    """The norm in torch's result dtype (the promotion of the tensors' dtypes), read from the distinct dtypes."""
    if not tensors:
        return norm.to(torch.float32)
    dtypes = dtypes if dtypes is not None else distinct_dtypes(tensors)
    return norm.to(result_dtype([torch.empty(0, dtype=d) for d in dtypes]))


def fast_clip(params, max_norm, norm_type, process_group=None):
    """clip_ of DTensor parameters' gradients on the C++ path (clip.py tries it for the default arguments before
    reading the gradients in Python): the global norm as clip_ returns it, or None when the plan path must run."""
    if type(max_norm) not in (float, int) or type(norm_type) not in (float, int):
        return None  # strings, tensors, bools: validated (or refused) on the plan path
    r = fast_norm(params, True, float(norm_type), "clip_", process_group)
    if r is None:
        return None
    norm, plan = r
    fast_scale(plan, float(max_norm), norm)
    return _as_dtensor(norm.to(plan.dtype), plan.meshes)


# ---------------------------------------------------------------------------------------------------------
# The entry points fusedclip.clip_, get_total_norm and clip_grads_with_norm_ delegate to.
# ---------------------------------------------------------------------------------------------------------

def _norm(grads, p, process_group, plain_group, be, fn, foreach, torch_fn):
    """(global norm in float64, tensors to scale, meshes), or (torch's result, None, None) when torch runs."""
    dtensors = has_dtensor(grads)
    if not dtensors and plain_group is None:
        return group_norm(grads, p, process_group, be, fn), grads, []
    if be.delegates_to_torch and process_group is None and plain_group is None and not any(
            type(g) is torch.Tensor for g in grads):
        return torch_fn(), None, None  # DTensors alone: torch handles them itself
    if plain_group is None and fast_local(be):
        r = fast_norm(grads, False, p, fn, process_group)
        if r is not None:
            return r[0], r[1], r[1].meshes
    if not dtensors:  # plain tensors only, shards of plain_group (then maybe over process_group)
        plan = Plan()
        plan.scale, plan.buckets, plan.plain, plan.meshes = grads, [], grads, []
    else:
        plan = plan_of(grads, fn)
    return plan_norm(plan, p, be, fn, process_group, plain_group), plan, plan.meshes


def sharded_clip_(params, grads, max_norm, p, error_if_nonfinite, process_group, be, foreach=None, plain_group=None):
    """clip_ over a process group and/or DTensor gradients. `params` as the user passed them (a list), `grads`
    their gradients, `p` and `max_norm` validated floats, `be` the resolved backend. Every rank of the groups and
    meshes involved must call it (also ranks without gradients). Returns the global norm (before clipping)."""
    norm, plan, meshes = _norm(grads, p, process_group, plain_group, be, "clip_", foreach,
                               lambda: _core.torch_clip_grad_norm_(params, max_norm, p, error_if_nonfinite, foreach))
    if plan is None:
        return norm
    if error_if_nonfinite:
        _core.check_finite(norm, p)  # the same global norm on every rank: all raise, before any scaling
    if isinstance(plan, FastPlan):
        fast_scale(plan, max_norm, norm)
        return _as_dtensor(norm.to(plan.dtype), meshes)
    if isinstance(plan, Plan):
        scale_plan(plan, max_norm, norm, be, "clip_")
        return _as_dtensor(_result(norm, plan.scale, plan.dtypes()), meshes)
    scale_local(plan, max_norm, norm, be, "clip_")
    return _result(norm, plan)


def sharded_total_norm(tensors, p, error_if_nonfinite, process_group, be, foreach=None, plain_group=None):
    """get_total_norm over a process group and/or DTensors: the global norm, on every rank."""
    norm, plan, meshes = _norm(tensors, p, process_group, plain_group, be, "get_total_norm", foreach,
                               lambda: _core.torch_get_total_norm(tensors, p, error_if_nonfinite, foreach))
    if plan is None:
        return norm
    if error_if_nonfinite:
        _core.check_finite(norm, p)
    if isinstance(plan, FastPlan):
        return _as_dtensor(norm.to(plan.dtype), meshes)
    if isinstance(plan, Plan):
        return _as_dtensor(_result(norm, plan.scale, plan.dtypes()), meshes)
    return _result(norm, plan)


def sharded_scale_(params, grads, max_norm, total_norm, be, foreach=None):
    """clip_grads_with_norm_ for DTensor gradients, alone or mixed with plain ones: scales each local shard (no
    communication). total_norm may be a DTensor (as clip_/get_total_norm return), a tensor or a number."""
    if be.delegates_to_torch and not any(type(g) is torch.Tensor for g in grads):
        return _core.torch_clip_grads_with_norm_(params, max_norm, total_norm, foreach)
    if is_dtensor(total_norm):
        replicated = all(pl.is_replicate() for pl in total_norm.placements)
        total_norm = total_norm.to_local() if replicated else total_norm.full_tensor()
    elif not isinstance(total_norm, torch.Tensor):
        total_norm = torch.tensor(_core.parse_number(total_norm, "clip_grads_with_norm_", "total_norm"))
    plan = plan_of(grads, "clip_grads_with_norm_")
    scale_plan(plan, max_norm, total_norm.to(torch.float64), be, "clip_grads_with_norm_")
    return None
