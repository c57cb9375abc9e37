"""Clipping sharded gradients on torch.distributed: a process group, DTensors, and a DDP communication hook.

The kernels never communicate. A global norm is: this rank's norm (one fused pass over its shards) ->
its partial (norm**p for a finite p; the norm itself for inf/-inf; the count for p=0) -> one all_reduce
(SUM, or MAX/MIN for +-inf; a functional collective, so torch.compile traces it, which the current stream
waits for) -> the global norm -> the scale pass. The partial is
reduced in float64 whatever the gradients' dtypes (so norm**p does not overflow, and ranks holding
different dtypes, or no gradients at all, still reduce the same dtype). Nothing waits on the host,
except error_if_nonfinite=True, which reads the global norm (as torch does) on every rank, so every
rank raises before any gradient is scaled.

fusedclip.clip_, get_total_norm and clip_grads_with_norm_ call this module when `process_group` is
given or when the gradients are DTensors; it builds on _core.py and never calls back into clip.py.
"""
import functools
import math
import sys

import torch
import torch.distributed as dist

if dist.is_available():  # a torch built without distributed has no collectives (nor sharded gradients)
    import torch.distributed._functional_collectives as funcol

from . import backends
from . import _core
from .ops import acc_dtype, result_dtype

_INF = math.inf


def is_dtensor(t):
    """Whether t is a DTensor, without importing torch.distributed.tensor (slow to import): DTensors can
    only exist once that module has been imported. Plain gradients cost one type check."""
    if type(t) is torch.Tensor:
        return False
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


# ---------------------------------------------------------------------------------------------------------
# The reduction: pack a rank's norm into the tensor all ranks reduce, and unpack the result.
# ---------------------------------------------------------------------------------------------------------

def _pack(local, has, p, device):
    """The tensor this rank contributes (float64 on `device`) and the reduce op. `local` is this rank's norm
    of the elements it counts (None when it counts none); `has`: whether it counts any element."""
    x = local.to(device, torch.float64) if local is not None else torch.zeros((), dtype=torch.float64,
                                                                              device=device)
    if p == _INF:
        # MAX drops NaN on some backends (std::max, NCCL), so a NaN norm travels as a flag.
        nan = torch.isnan(x)
        return torch.stack([x.masked_fill(nan, 0.0), nan.to(torch.float64)]), "max"
    if p == -_INF:
        # min over elements: a rank without elements contributes +inf (min's identity); the third entry
        # says whether any rank has elements (no elements at all: norm 0, fusedclip's convention).
        nan = torch.isnan(x)
        x = x.masked_fill(nan, _INF) if has else torch.full_like(x, _INF)
        return torch.stack([x, -nan.to(torch.float64), torch.full_like(x, -float(has))]), "min"
    if p == 0.0:
        return x, "sum"  # a count of tensors: counts add up
    return (x.pow(p) if has else x), "sum"  # sum of |g|^p; a rank without elements adds 0


def _unpack(t, p):
    """The global norm (float64) from the reduced tensor."""
    if p == _INF:
        return torch.where(t[1] > 0, torch.full_like(t[0], math.nan), t[0])
    if p == -_INF:
        return torch.where(t[1] < 0, torch.full_like(t[0], math.nan),
                           torch.where(t[2] < 0, t[0], torch.zeros_like(t[0])))
    if p == 0.0:
        return t
    return t.pow(1.0 / p)


def _combine(a, b, op):
    if op == "max":
        return torch.maximum(a, b)
    if op == "min":
        return torch.minimum(a, b)
    return a + b


def _all_reduce(t, op, groups):
    """t reduced with op ("sum", "max" or "min") over every group in turn (the dims of a mesh reduce over all
    of its ranks). Functional collectives, as DTensor's own: torch.compile traces them into the graph."""
    for group in groups:
        t = funcol.all_reduce(t, op, group)
    return funcol.wait_tensor(t)  # eager returns a tensor that waits on first use: make it a plain one


def _local_norm(tensors, p, be, fn):
    """(this rank's norm of `tensors` or None, whether they have any element)."""
    if not tensors:
        return None, False
    has = any(t.numel() for t in tensors)
    if be.name != "torch":
        # in float64 as the kernel computed it: a norm rounded to fp32, raised to p and summed over ranks,
        # would cost the global norm up to an ulp
        return _core._total_norm(tensors, p, be, fn, unrounded=True), has
    nonempty = [t for t in tensors if t.numel()]
    if not nonempty:  # torch's norms raise on empty tensors for inf; their norm is 0
        return None, False
    return _core._torch_get_total_norm(nonempty, p), has


def _group_device(group):
    """Where a rank without gradients puts its partial: the device the group's backend communicates on."""
    name = str(dist.get_backend(group))
    if "nccl" in name and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _scale_local(tensors, max_norm, norm, be, fn):
    """Scales local tensors by the global norm with the coefficient computed in their accumulation dtype."""
    if not tensors:
        return
    norm = norm.to(acc_dtype(tensors))
    if be.name != "torch":
        _core._scale(tensors, max_norm, norm, be, fn)
        return
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    groups = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for (device, _), group in groups.items():
        torch._foreach_mul_(group, coef.to(device))


# ---------------------------------------------------------------------------------------------------------
# A process group: each rank passes its shards (FSDP1 flat parameters, ZeRO partitions, TP slices).
# ---------------------------------------------------------------------------------------------------------

def _group_norm(grads, p, process_group, be, fn):
    """The global norm (float64, on this rank's gradient device) of the shards all ranks of the group hold."""
    _core._check_tensors(grads, fn, "gradients")
    if any(is_dtensor(g) for g in grads):
        raise TypeError(f"fusedclip.{fn}: DTensor gradients carry their own device mesh; pass them without "
                        "process_group (or pass their .to_local() shards with it)")
    local, has = _local_norm(grads, p, be, fn)
    device = grads[0].device if grads else _group_device(process_group)
    t, op = _pack(local, has, p, device)
    return _unpack(_all_reduce(t, op, [process_group]), p)


def _result(norm, tensors):
    return norm.to(result_dtype(tensors)) if tensors else norm.to(torch.float32)


# ---------------------------------------------------------------------------------------------------------
# DTensors: local shards, reduced over the mesh each gradient lives on, replicas counted once.
# ---------------------------------------------------------------------------------------------------------

def _mesh_groups(mesh):
    """Groups (as functional collectives name them) that together reduce over every rank of the mesh: one when
    possible."""
    if mesh.ndim == 1:
        return [mesh]
    if mesh.size() == dist.get_world_size():
        return [dist.group.WORLD]  # the mesh is the whole world: the default group
    return [(mesh, d) for d in range(mesh.ndim)]


def _dtensor_parts(grads, fn):
    """(the local tensors to scale, [(mesh, tensors this rank counts in the norm, all its local tensors)]).
    A gradient replicated along a mesh dim is counted only by the ranks at coordinate 0 of that dim, so
    replicas are not counted twice; Partial gradients are made Replicate for the norm (they are scaled as
    they are: scaling is linear)."""
    from torch.distributed.tensor import DTensor, Replicate
    # Meshes are told apart by identity in a list, not used as dict keys: torch 2.6's dynamo cannot hash a
    # DeviceMesh (torch.compile of a sharded clip failed on dict.setdefault). Two equal meshes that are distinct
    # objects are reduced separately: the same norm, one more collective.
    locals_, meshes, counted, per_mesh = [], [], [], []
    for i, g in enumerate(grads):
        if not isinstance(g, DTensor):
            raise TypeError(f"fusedclip.{fn}: gradient {i} is a {type(g).__name__} among DTensor gradients; "
                            "all or none must be DTensors")
        local = g.to_local()
        locals_.append(local)
        mesh, placements = g.device_mesh, g.placements
        k = len(meshes)  # a plain loop: torch 2.6's dynamo cannot trace next(generator, default)
        for j, m in enumerate(meshes):
            if m is mesh:
                k = j
                break
        if k == len(meshes):
            meshes.append(mesh)
            counted.append([])
            per_mesh.append([])
        per_mesh[k].append(local)
        if any(pl.is_partial() for pl in placements):
            placements = tuple(Replicate() if pl.is_partial() else pl for pl in placements)
            local = g.redistribute(mesh, placements).to_local()
        coord = mesh.get_coordinate()  # not get_local_rank(d): torch 2.6's dynamo cannot trace that one
        if all(coord[d] == 0 for d, pl in enumerate(placements) if pl.is_replicate()):
            counted[k].append(local)
    return locals_, list(zip(meshes, counted, per_mesh))


def _dtensor_norm(grads, p, be, fn):
    """The global norm (float64) of DTensor gradients, equal to torch's total_norm.full_tensor(); and the
    local tensors to scale, and the meshes."""
    locals_, parts = _dtensor_parts(grads, fn)
    device = locals_[0].device
    total, op = None, None
    for mesh, tensors, all_local in parts:
        if p == 0.0:
            # torch's p=0 counts the (whole) tensors with a nonzero element: a per-tensor flag, MAX over the
            # mesh (every rank of a mesh holds a shard, maybe empty, of each of its DTensors), then a count.
            flags = torch.stack([(t != 0).any().to(device) for t in all_local]).to(torch.float64)
            t, op = _all_reduce(flags, "max", _mesh_groups(mesh)).sum(), "sum"
        else:
            local, has = _local_norm(tensors, p, be, fn)
            t, op = _pack(local, has, p, device)
            t = _all_reduce(t, op, _mesh_groups(mesh))
        total = t if total is None else _combine(total, t, op)
    return _unpack(total, p), locals_, [mesh for mesh, _, _ in parts]


def _as_dtensor(norm, meshes):
    """The norm as a replicated DTensor when all gradients share one mesh (so code written for torch's
    result, e.g. total_norm.full_tensor(), keeps working); a plain tensor otherwise."""
    if len(meshes) != 1:
        return norm
    from torch.distributed.tensor import DTensor, Replicate
    return DTensor.from_local(norm, meshes[0], [Replicate()] * meshes[0].ndim, run_check=False)


# ---------------------------------------------------------------------------------------------------------
# The entry points fusedclip.clip_, get_total_norm and clip_grads_with_norm_ delegate to.
# ---------------------------------------------------------------------------------------------------------

def clip_(params, grads, max_norm, p, error_if_nonfinite, process_group, be, foreach=None):
    """clip_ over a process group or DTensor gradients. `params` as the user passed them (a list), `grads`
    their gradients, `p` and `max_norm` validated floats, `be` the resolved backend. Every rank of the group
    must call it (also ranks without gradients). Returns the global norm (before clipping)."""
    dtensors = process_group is None
    if dtensors and be.name == "torch":  # torch handles DTensors itself
        return _core._torch_clip_grad_norm_(params, max_norm, p, error_if_nonfinite, foreach)
    if dtensors:
        norm, locals_, meshes = _dtensor_norm(grads, p, be, "clip_")
    else:
        norm = _group_norm(grads, p, process_group, be, "clip_")
        locals_, meshes = grads, []
    if error_if_nonfinite:
        _core._check_finite(norm, p)  # the same global norm on every rank: all raise, before any scaling
    _scale_local(locals_, max_norm, norm, be, "clip_")
    norm = _result(norm, locals_)
    return _as_dtensor(norm, meshes) if dtensors else norm


def total_norm(tensors, p, error_if_nonfinite, process_group, be, foreach=None):
    """get_total_norm over a process group or DTensors: the global norm, on every rank."""
    dtensors = process_group is None
    if dtensors and be.name == "torch":
        return _core._torch_get_total_norm(tensors, p, error_if_nonfinite, foreach)
    if dtensors:
        norm, locals_, meshes = _dtensor_norm(tensors, p, be, "get_total_norm")
    else:
        norm = _group_norm(tensors, p, process_group, be, "get_total_norm")
        locals_, meshes = tensors, []
    if error_if_nonfinite:
        _core._check_finite(norm, p)
    norm = _result(norm, locals_)
    return _as_dtensor(norm, meshes) if dtensors else norm


def scale_(params, grads, max_norm, total_norm, be, foreach=None):
    """clip_grads_with_norm_ for DTensor gradients: scales each local shard (no communication). total_norm
    may be a DTensor (as clip_/get_total_norm return), a tensor or a number."""
    if be.name == "torch":
        return _core._torch_clip_grads_with_norm_(params, max_norm, total_norm, foreach)
    if is_dtensor(total_norm):
        total_norm = total_norm.full_tensor()
    elif not isinstance(total_norm, torch.Tensor):
        total_norm = torch.tensor(_core._number(total_norm, "clip_grads_with_norm_", "total_norm"))
    locals_, _ = _dtensor_parts(grads, "clip_grads_with_norm_")
    _scale_local(locals_, max_norm, total_norm.to(locals_[0].device), be, "clip_grads_with_norm_")
    return None


# ---------------------------------------------------------------------------------------------------------
# DDP: the norm accumulated by the communication hook while backward runs.
# ---------------------------------------------------------------------------------------------------------

class DDPNormState:
    """The state of fusedclip.ddp_norm_hook: the 2-norm of the averaged gradients, bucket by bucket.

        state = fusedclip.DDPNormState()                 # process_group=None: DDP's default group
        model.register_comm_hook(state, fusedclip.ddp_norm_hook)
        loss.backward()                                  # buckets are averaged and their norms recorded
        norm = state.clip_(model.parameters(), max_norm)  # only the scale pass runs
        optimizer.step()

    The hook starts a new step at the first bucket of each backward that synchronizes gradients, so no
    reset is needed between steps. total_norm() is the norm of the last such backward (a backward inside
    DDP's no_sync() does not call the hook); it raises if no complete backward has been recorded since
    reset(). The norm stays on the device (float32, float64 when a bucket is float64): no host sync.
    """

    def __init__(self, process_group=None, backend="auto"):
        self.process_group = process_group
        self.backend = backend
        self.reset()

    def reset(self):
        """Forgets the recorded norms (the hook does this itself at the start of each backward)."""
        self._norms = {}  # bucket index -> (the averaged bucket's 2-norm in float64, its accumulation dtype)
        self._n_buckets = None
        self._total = None

    def _record(self, index, buffer):
        dtype = acc_dtype([buffer])
        if buffer.numel():
            be = backends.resolve(self.backend, buffer.device.type)
            # unrounded: the buckets' norms combine in float64, then round once (as the fused pass's chunks)
            norm = (be.total_norm([buffer], 2.0, None, torch.float64) if be.name != "torch"
                    else torch.linalg.vector_norm(buffer, dtype=dtype))
        else:
            norm = torch.zeros((), dtype=dtype, device=buffer.device)
        self._norms[index] = (norm, dtype)  # a dict, not a list: callbacks may finish out of order (Gloo threads)

    def total_norm(self):
        """The 2-norm of all averaged gradients of the last synchronizing backward (a 0-dim device tensor)."""
        if self._total is None:
            n = self._n_buckets
            if n is None or len(self._norms) != n:
                raise RuntimeError("fusedclip.DDPNormState.total_norm: no complete DDP backward has been "
                                   "recorded since reset(); register the state with "
                                   "model.register_comm_hook(state, fusedclip.ddp_norm_hook) and call "
                                   "it after a backward outside no_sync()")
            norms = [self._norms[i][0] for i in range(n)]  # bucket order: deterministic
            dtype = functools.reduce(torch.promote_types, [self._norms[i][1] for i in range(n)])
            device = norms[0].device
            wide = torch.stack([x.to(device, torch.float64) for x in norms])
            self._total = torch.linalg.vector_norm(wide).to(dtype)
        return self._total

    def clip_(self, parameters, max_norm, error_if_nonfinite=False):
        """Scales the gradients of `parameters` by the recorded norm (as fusedclip.clip_grads_with_norm_ does);
        returns the norm. The same result as fusedclip.clip_(parameters, max_norm) after DDP's default hook."""
        norm = self.total_norm()
        if error_if_nonfinite:
            _core._check_finite(norm, 2.0)
        params = _core._as_list(parameters)
        grads = _core._grads(params, "DDPNormState.clip_")
        be = backends.resolve(self.backend, grads[0].device.type if grads else "cpu")
        max_norm = _core._number(max_norm, "DDPNormState.clip_", "max_norm")
        _core._scale_with_norm(params, grads, max_norm, norm, be, None, "DDPNormState.clip_")
        return norm


def ddp_norm_hook(state, bucket):
    """A DDP communication hook: averages the bucket over the group as DDP's default hook does (divide by
    the group size, then all_reduce SUM), and once it is averaged records its 2-norm in `state`
    (a DDPNormState). Register with model.register_comm_hook(state, fusedclip.ddp_norm_hook)."""
    index = bucket.index()
    if index == 0:  # the first bucket of a new backward: the previous step's callbacks have all finished
        state.reset()
    if bucket.is_last():
        state._n_buckets = index + 1
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    buffer.div_(dist.get_world_size(group))
    fut = dist.all_reduce(buffer, group=group, async_op=True).get_future()

    def record(fut):
        averaged = fut.value()[0]
        state._record(index, averaged)
        return averaged

    return fut.then(record)
