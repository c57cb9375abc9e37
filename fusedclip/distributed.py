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
import operator
import sys
import threading

import torch
import torch.distributed as dist

if dist.is_available():  # a torch built without distributed has no collectives (nor sharded gradients)
    import torch.distributed._functional_collectives as funcol

from . import backends
from . import _core
from . import _ext
from .ops import acc_dtype, result_dtype

_INF = math.inf
# the extension's entries for the two passes over local tensors (absent from a build older than this module)
_FAST_LOCAL = _ext.LOADED and hasattr(_ext._C, "local_norm")
# and for DTensors read in C++ (dtensor_norm / dtensor_scale: _fast_norm below)
_FAST_DTENSOR = _ext.LOADED and hasattr(_ext._C, "dtensor_norm")


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
    if _fast_local(be) and p != 0.0:
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


def _fast_local(be):
    """Whether the local passes may try the extension's C++ entries (eager, native backend, a recent build)."""
    return be.name == "native" and _FAST_LOCAL and not torch.compiler.is_compiling()


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
    norm = norm.to(torch.float64 if torch.float64 in _dtypes(tensors) else torch.float32)
    if _fast_local(be) and _ext._C.scale_local(tensors, max_norm, norm.to(tensors[0].device)):
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


# ---------------------------------------------------------------------------------------------------------
# A process group: each rank passes its shards (FSDP1 flat parameters, ZeRO partitions, TP slices).
# ---------------------------------------------------------------------------------------------------------

def group_norm(grads, p, process_group, be, fn):
    """The global norm (float64, on this rank's gradient device) of the shards all ranks of the group hold."""
    if not all(issubclass(t, torch.Tensor) for t in set(map(type, grads))):
        _core.check_tensors(grads, fn, "gradients")  # says which item is not a tensor
    local, has = _local_norm(grads, p, be, fn)
    device = grads[0].device if grads else _group_device(process_group)
    t, op = _pack(local, has, p, device)
    return _unpack(_all_reduce(t, op, [process_group]), p)


# ---------------------------------------------------------------------------------------------------------
# DTensors, and DTensors mixed with plain tensors: the reduction plan.
#
# Every gradient's elements are counted once in the global norm:
# - a DTensor by the ranks of its mesh, each counting its local shard unless the shard is a replica (a rank at a
#   coordinate other than 0 of a Replicate dim skips it; a Partial dim is first reduced, then treated as Replicate);
# - a plain tensor among DTensors is replicated (the same on every rank): each rank adds it once, after the mesh
#   reductions, with no collective; with plain_group= it is this rank's shard of that group (reduced over it);
# - with process_group= among DTensors (pipeline stages: each rank of the group holds a different stage), the
#   rank's whole partial (meshes and plain tensors) is then reduced over that group.
# DTensors whose meshes cover the same ranks (a dense world mesh and an expert (dp, ep) mesh, say) share one
# fused pass and one all_reduce: the number of collectives is the number of distinct rank sets, plus one for
# plain_group and one for process_group when given.
# ---------------------------------------------------------------------------------------------------------

def _mesh_groups(mesh):
    """Groups (as functional collectives name them) that together reduce over every rank of the mesh: one when
    possible. A mesh of the whole world reduces over the default group whatever its shape, so every rank picks
    the same group for a world-spanning rank set whichever of its meshes it saw first."""
    if mesh.size() == dist.get_world_size():
        return [dist.group.WORLD]
    if mesh.ndim == 1:
        return [mesh]
    return [(mesh, d) for d in range(mesh.ndim)]



_spec_of = operator.attrgetter("_spec")
_local_of = operator.attrgetter("_local_tensor")
_dtype_of = operator.attrgetter("dtype")

# Per (mesh, placements): what a rank does with such a gradient. Meshes are long-lived; the table holds them.
_KINDS = []        # kind index -> _Kind
_KIND_INDEX = {}   # (id(mesh), placements) -> kind index
# Per DTensorSpec object: its kind. FSDP2 gives each parameter's gradient the same spec object every step, so after
# the first step a call reads two attributes per gradient and looks the spec up (no DTensor dispatch). The table
# holds the specs it maps (so an id is never reused while it is in there); it is emptied when it outgrows
# _SPEC_TABLE_MAX (specs made anew every step, as tensor-parallel autograd does, just miss it).
_SPEC_KIND = {}    # id(spec) -> kind index
_SPEC_KEEP = []    # the specs of _SPEC_KIND, alive
_SPEC_TABLE_MAX = 1 << 17
_TABLE_LOCK = threading.RLock()


class _Kind:
    __slots__ = ("mesh", "ranks", "counted", "partial", "placements")

    def __init__(self, mesh, placements, fn):
        coord = mesh.get_coordinate()
        if coord is None:
            raise ValueError(f"fusedclip.{fn}: a DTensor gradient lives on a device mesh that does not include this "
                             f"rank ({list(mesh.mesh.flatten().tolist())}); pass each rank only the gradients of "
                             "its own meshes")
        self.mesh, self.placements = mesh, tuple(placements)
        self.ranks = tuple(sorted(mesh.mesh.flatten().tolist()))
        self.partial = any(pl.is_partial() for pl in placements)
        # a replica (Replicate, or Partial once reduced) is counted by the ranks at coordinate 0 of that dim only
        self.counted = all(coord[d] == 0 for d, pl in enumerate(placements) if pl.is_replicate() or pl.is_partial())


def _kind(mesh, placements, fn):
    key = (id(mesh), tuple(placements))
    k = _KIND_INDEX.get(key)
    if k is None:
        kind = _Kind(mesh, placements, fn)
        with _TABLE_LOCK:
            k = _KIND_INDEX.get(key)
            if k is None:
                _KINDS.append(kind)
                k = _KIND_INDEX[key] = len(_KINDS) - 1
    return k


# The last call's (specs, their kinds, the dtypes): a training loop passes the same specs every step. One tuple,
# replaced whole, so a thread never reads one call's specs with another's kinds.
_LAST = (None, None, None)


def _kinds_of(specs, fn):
    """(the kind index of each spec, the distinct dtypes of the local tensors or None): C-speed lookups once the
    specs are known. The same specs as the last call's (a list comparison: identity first, then DTensorSpec's
    equality, which covers mesh, placements and dtype) reuse its kinds and dtypes."""
    global _LAST
    last, kinds, dtypes = _LAST
    if last is not None and len(last) == len(specs) and last == specs:
        return kinds, dtypes
    kinds = _spec_kinds(specs, fn)
    metas = [s.tensor_meta for s in specs]
    dtypes = None if None in metas else {m.dtype for m in metas}  # a DTensor's local tensor has its spec's dtype
    _LAST = (specs, kinds, dtypes)
    return kinds, dtypes


def _spec_kinds(specs, fn):
    ids = list(map(id, specs))
    kinds = list(map(_SPEC_KIND.get, ids))
    if None in kinds:
        with _TABLE_LOCK:  # threads: a spec is kept alive before its id is entered, and clearing drops both
            if len(_SPEC_KEEP) + len(specs) > max(_SPEC_TABLE_MAX, 2 * len(specs)):
                _SPEC_KIND.clear()
                _SPEC_KEEP.clear()
            for i, (sid, spec) in enumerate(zip(ids, specs)):
                if kinds[i] is None:
                    _SPEC_KEEP.append(spec)
                    kinds[i] = _SPEC_KIND[sid] = _kind(spec.mesh, spec.placements, fn)
    return kinds


def _dtypes(tensors):
    """The distinct dtypes of `tensors` (a C loop in eager mode; dynamo cannot trace operator.attrgetter)."""
    return {t.dtype for t in tensors} if torch.compiler.is_compiling() else set(map(_dtype_of, tensors))


class _Plan:
    """One call's gradients sorted for the reduction: `scale` every local tensor to scale (DTensors' local shards
    and plain tensors, in order); `buckets` [(rank set, mesh to reduce over, tensors this rank counts, every local
    tensor of the bucket)], sorted the same way on every rank; `plain` the plain tensors; `meshes` the first
    DTensor's mesh (none without DTensors)."""
    __slots__ = ("scale", "buckets", "plain", "meshes", "_dtypes")

    def dtypes(self):
        """The distinct dtypes of the local tensors (read once)."""
        if getattr(self, "_dtypes", None) is None:
            self._dtypes = _dtypes(self.scale)
        return self._dtypes


def _bucket_order(bucket):
    """Larger rank sets first, then by ranks: the same order on every rank, so no two ranks wait on each other's
    collectives in opposite orders."""
    return (-len(bucket[0]), bucket[0])


def _plan(grads, fn):
    """The plan of a list of gradients (DTensors, plain tensors, or both)."""
    plan = _Plan()
    mod = sys.modules.get("torch.distributed.tensor")
    DTensor = mod.DTensor if mod is not None else None
    types = set(map(type, grads))
    if (DTensor is not None and len(types) == 1 and issubclass(next(iter(types)), DTensor)
            and not torch.compiler.is_compiling()):
        # the hot path: DTensors only, read without dispatch
        locals_ = list(map(_local_of, grads))
        kinds, plan._dtypes = _kinds_of(list(map(_spec_of, grads)), fn)
        distinct = set(kinds)
        if len(distinct) == 1:
            kind = _KINDS[kinds[0]]
            if not kind.partial:
                plan.scale, plan.plain, plan.meshes = locals_, [], [kind.mesh]
                mesh = _RANK_SETS[_rank_set(kind)][1]
                plan.buckets = [(kind.ranks, mesh, locals_ if kind.counted else [], locals_)]
                return plan
        return _sorted_plan(plan, grads, locals_, kinds, DTensor)
    if torch.compiler.is_compiling():
        return _traced_plan(plan, grads, fn, DTensor)
    locals_, kinds = [], []
    for g in grads:
        if DTensor is not None and isinstance(g, DTensor):
            locals_.append(g._local_tensor)
            kinds.append(_kind(g._spec.mesh, g._spec.placements, fn))
        else:
            locals_.append(g)
            kinds.append(None)
    return _sorted_plan(plan, grads, locals_, kinds, DTensor)


def _sorted_plan(plan, grads, locals_, kinds, DTensor):
    buckets, plain, meshes = {}, [], []
    for g, local, k in zip(grads, locals_, kinds):
        if k is None:
            plain.append(local)
            continue
        kind = _KINDS[k]
        b = buckets.get(kind.ranks)
        if b is None:
            b = buckets[kind.ranks] = [{}, [], []]
            meshes = meshes or [kind.mesh]
        b[0][k] = None
        b[2].append(local)
        if kind.partial:  # the one case that communicates a gradient (every rank of the mesh): a sum, never a gather
            placements = tuple(pl if not pl.is_partial() else _replicate() for pl in kind.placements)
            local = g.redistribute(kind.mesh, placements).to_local()
        if kind.counted:
            b[1].append(local)
    plan.scale, plan.plain, plan.meshes = locals_, plain, meshes
    # meshes of the same ranks: reduce over the one _rank_set chooses (the C++ path's choice too)
    for ks, _, _ in buckets.values():
        for k in ks:
            _rank_set(_KINDS[k])
    plan.buckets = sorted(((ranks, _RANK_SETS[_RANK_SET_KEYS[ranks]][1], counted, all_)
                           for ranks, (ks, counted, all_) in buckets.items()), key=_bucket_order)
    return plan


def _replicate():
    from torch.distributed.tensor import Replicate
    return Replicate()


def _traced_plan(plan, grads, fn, DTensor):
    """The plan under torch.compile: public DTensor API only (dynamo traces it), meshes told apart by identity in a
    list (torch 2.6's dynamo cannot hash a DeviceMesh), one reduction per mesh object."""
    meshes, buckets, plain, locals_ = [], [], [], []
    for g in grads:
        if DTensor is None or not isinstance(g, DTensor):
            plain.append(g)
            locals_.append(g)
            continue
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
            buckets.append((None, mesh, [], []))
        buckets[k][3].append(local)
        if any(pl.is_partial() for pl in placements):
            placements = tuple(_replicate() if pl.is_partial() else pl for pl in placements)
            local = g.redistribute(mesh, placements).to_local()
        coord = mesh.get_coordinate()  # not get_local_rank(d): torch 2.6's dynamo cannot trace that one
        if all(coord[d] == 0 for d, pl in enumerate(placements) if pl.is_replicate()):
            buckets[k][2].append(local)
    plan.scale, plan.plain, plan.meshes, plan.buckets = locals_, plain, meshes, buckets
    return plan


# The C++ path (csrc/python_module.cpp, dtensor_norm): it keeps its own spec -> kind table, filled by _classify, and
# groups the gradients by rank set under the keys below (the same for every spec of a rank set).
_RANK_SETS = []       # key -> (ranks, the mesh to reduce over)
_RANK_SET_KEYS = {}   # ranks -> key


def _rank_set(kind):
    """The key of a kind's rank set, registering its mesh: a rank set reduces over the registered mesh that needs
    the fewest collectives, the first registered among equals. Both paths (the C++ one and the plan) choose it here,
    from meshes registered in the order the calls first show them, so every rank picks the same groups, whichever
    path each takes (a rank whose local shard is not dense takes the plan path while the others take the C++ one)."""
    key = _RANK_SET_KEYS.get(kind.ranks)
    if key is None:
        with _TABLE_LOCK:
            key = _RANK_SET_KEYS.get(kind.ranks)
            if key is None:
                _RANK_SETS.append((kind.ranks, kind.mesh))
                key = _RANK_SET_KEYS[kind.ranks] = len(_RANK_SETS) - 1
    ranks, mesh = _RANK_SETS[key]
    if mesh is not kind.mesh and len(_mesh_groups(kind.mesh)) < len(_mesh_groups(mesh)):
        with _TABLE_LOCK:
            ranks, mesh = _RANK_SETS[key]
            if len(_mesh_groups(kind.mesh)) < len(_mesh_groups(mesh)):
                _RANK_SETS[key] = (ranks, kind.mesh)
    return key


def _classify(spec, fn):
    """(rank set key, whether this rank counts such a shard, whether it is Partial) of a spec the C++ path has not
    seen; raises as _kind does (a mesh without this rank)."""
    kind = _KINDS[_kind(spec.mesh, spec.placements, fn)]
    return _rank_set(kind), kind.counted, kind.partial


class _FastPlan:
    """What _fast_norm read: the handle owning the local tensors (for dtensor_scale), their promoted dtype, whether
    any is float64, the first DTensor's mesh."""
    __slots__ = ("handle", "dtype", "any_double", "meshes")


def _fast_norm(items, of_grads, p, fn, process_group=None):
    """(global norm in float64, _FastPlan) of DTensors (or, of_grads, of the .grad of DTensor parameters) read in
    C++: one read of the Python objects, per rank set one fused pass over the shards this rank counts and one
    all_reduce, then over process_group; or None (nothing read or written) for what the plan path handles: a
    mix with plain tensors, Partial specs, non-dense shards, several devices, p <= 0, a mode, torch.compile."""
    if not _FAST_DTENSOR or torch.compiler.is_compiling():
        return None
    mod = sys.modules.get("torch.distributed.tensor")
    if mod is None:
        return None
    r = _ext._C.dtensor_norm(items, of_grads, p, mod.DTensor, _classify, fn)
    if r is None:
        return None
    buckets, first, handle, dtype, any_double, spec = r
    device, op = first.device, _op(p)
    if len(buckets) > 1:
        buckets.sort(key=lambda b: _bucket_order(_RANK_SETS[b[0]]))
    total = None
    for key, local in buckets:
        t = _all_reduce(_pack(local, True, p, device)[0], op, _mesh_groups(_RANK_SETS[key][1]))
        total = t if total is None else _combine(total, t, op)
    if process_group is not None:
        total = _all_reduce(total, op, [process_group])
    plan = _FastPlan()
    plan.handle, plan.dtype, plan.any_double, plan.meshes = handle, dtype, any_double, [spec.mesh]
    return _unpack(total, p), plan


def _fast_scale(plan, max_norm, norm):
    """Scales the local tensors of a _FastPlan by the global norm (the coefficient in their accumulation dtype)."""
    _ext._C.dtensor_scale(plan.handle, max_norm, norm.to(torch.float64 if plan.any_double else torch.float32))


def fast_clip(params, max_norm, norm_type, process_group=None):
    """clip_ of DTensor parameters' gradients on the C++ path (clip.py tries it for the default arguments before
    reading the gradients in Python): the global norm as clip_ returns it, or None when the plan path must run."""
    if type(max_norm) not in (float, int) or type(norm_type) not in (float, int):
        return None  # strings, tensors, bools: validated (or refused) on the plan path
    r = _fast_norm(params, True, float(norm_type), "clip_", process_group)
    if r is None:
        return None
    norm, plan = r
    _fast_scale(plan, float(max_norm), norm)
    return _as_dtensor(norm.to(plan.dtype), plan.meshes)


def _bucket_norm(tensors, p, be, fn):
    """(this rank's unrounded norm of a bucket's counted local shards, or None; whether they have elements). One
    device (a mesh's), so the backend is called directly: no per-tensor checks in Python."""
    if not tensors:
        return None, False
    if be.delegates_to_torch or torch.compiler.is_compiling():
        return _local_norm(tensors, p, be, fn)
    has = p > 0 or any(map(torch.Tensor.numel, tensors))  # for p > 0 an empty list's norm is 0 anyway
    if _fast_local(be):
        norm = _ext._C.local_norm(tensors, p)  # the op, called from C++ (None: take the op path)
        if norm is not None:
            return norm, has
    try:
        return be.total_norm(tensors, p, None, torch.float64), has
    except (TypeError, ValueError, RuntimeError, NotImplementedError):
        return _local_norm(tensors, p, be, fn)  # explains the failure, or takes the devices one by one


def _op(p):
    return "max" if p == _INF else "min" if p == -_INF else "sum"


def _plan_norm(plan, p, be, fn, process_group, plain_group):
    """The global norm (float64) of a plan: per rank set one fused pass and one all_reduce; the plain tensors
    (replicated, or shards of plain_group); then over process_group (pipeline stages)."""
    if plan.scale:
        device = plan.scale[0].device
    else:
        device = _group_device(process_group if process_group is not None else plain_group)
    op = _op(p)
    total = _pack(None, False, p, device)[0]
    for _, mesh, counted, all_local in plan.buckets:
        if p == 0.0:
            # torch's p=0 counts the (whole) tensors with a nonzero element: a per-tensor flag, MAX over the mesh
            # (every rank of a mesh holds a shard, maybe empty, of each of its DTensors), then a count.
            flags = (torch.stack([(t != 0).any() for t in all_local]).to(device, torch.float64) if all_local
                     else torch.zeros(0, dtype=torch.float64, device=device))
            t = _all_reduce(flags, "max", _mesh_groups(mesh)).sum()
        else:
            local, has = _bucket_norm(counted, p, be, fn)
            t = _all_reduce(_pack(local, has, p, device)[0], op, _mesh_groups(mesh))
        total = _combine(total, t, op)
    if plan.plain:
        local, has = _local_norm(plan.plain, p, be, fn) if p != 0.0 else (
            _core.total_norm_of(plan.plain, 0.0, be, fn), True)
        part = _pack(local, has, p, device)[0]
        if plain_group is not None:
            part = _all_reduce(part, op, [plain_group])
        total = _combine(total, part, op)
    elif plain_group is not None:  # every rank of plain_group reduces, also those without plain tensors
        total = _combine(total, _all_reduce(_pack(None, False, p, device)[0], op, [plain_group]), op)
    if process_group is not None:
        total = _all_reduce(total, op, [process_group])
    return _unpack(total, p)


def _scale_plan(plan, max_norm, norm, be, fn):
    tensors = plan.scale
    if not tensors:
        return
    if be.delegates_to_torch or torch.compiler.is_compiling() or plan.plain:
        _scale_local(tensors, max_norm, norm, be, fn)
        return
    # DTensors' local shards only: one device, each writable unless expanded (checked when not contiguous)
    norm = norm.to(tensors[0].device, torch.float64 if torch.float64 in plan.dtypes() else torch.float32)
    if _fast_local(be) and _ext._C.scale_local(tensors, max_norm, norm):
        return  # dense tensors on one device (checked in C++), scaled by the op called from C++
    if not all(map(torch.Tensor.is_contiguous, tensors)):
        _core.check_writable(tensors, fn)
    try:
        be.scale(tensors, max_norm, norm)
    except (TypeError, ValueError, RuntimeError, NotImplementedError):
        _core.scale_by_norm(tensors, max_norm, norm, be, fn)


def dtensor_norm(grads, p, be, fn, process_group=None, plain_group=None):
    """(the global norm in float64, the local tensors to scale, the meshes) of DTensor gradients (ZClip's too)."""
    plan = _plan(grads, fn)
    return _plan_norm(plan, p, be, fn, process_group, plain_group), plan.scale, plan.meshes


def has_dtensor(tensors):
    """Whether any of `tensors` is a DTensor (one type check per distinct type)."""
    mod = sys.modules.get("torch.distributed.tensor")
    if mod is None:
        return False
    return any(issubclass(t, mod.DTensor) for t in set(map(type, tensors)) if t is not torch.Tensor)


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
    dtypes = dtypes if dtypes is not None else _dtypes(tensors)
    return norm.to(result_dtype([torch.empty(0, dtype=d) for d in dtypes]))


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
    if plain_group is None and _fast_local(be):
        r = _fast_norm(grads, False, p, fn, process_group)
        if r is not None:
            return r[0], r[1], r[1].meshes
    if not dtensors:  # plain tensors only, shards of plain_group (then maybe over process_group)
        plan = _Plan()
        plan.scale, plan.buckets, plan.plain, plan.meshes = grads, [], grads, []
    else:
        plan = _plan(grads, fn)
    return _plan_norm(plan, p, be, fn, process_group, plain_group), plan, plan.meshes


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
    if isinstance(plan, _FastPlan):
        _fast_scale(plan, max_norm, norm)
        return _as_dtensor(norm.to(plan.dtype), meshes)
    if isinstance(plan, _Plan):
        _scale_plan(plan, max_norm, norm, be, "clip_")
        return _as_dtensor(_result(norm, plan.scale, plan.dtypes()), meshes)
    _scale_local(plan, max_norm, norm, be, "clip_")
    return _result(norm, plan)


def sharded_total_norm(tensors, p, error_if_nonfinite, process_group, be, foreach=None, plain_group=None):
    """get_total_norm over a process group and/or DTensors: the global norm, on every rank."""
    norm, plan, meshes = _norm(tensors, p, process_group, plain_group, be, "get_total_norm", foreach,
                               lambda: _core.torch_get_total_norm(tensors, p, error_if_nonfinite, foreach))
    if plan is None:
        return norm
    if error_if_nonfinite:
        _core.check_finite(norm, p)
    if isinstance(plan, _FastPlan):
        return _as_dtensor(norm.to(plan.dtype), meshes)
    if isinstance(plan, _Plan):
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
    plan = _plan(grads, "clip_grads_with_norm_")
    _scale_plan(plan, max_norm, total_norm.to(torch.float64), be, "clip_grads_with_norm_")
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
            norm = (be.total_norm([buffer], 2.0, None, torch.float64) if not be.delegates_to_torch
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
            _core.check_finite(norm, 2.0)
        params = _core.as_list(parameters)
        grads = _core.grads_of(params, "DDPNormState.clip_")
        be = backends.resolve(self.backend, grads[0].device.type if grads else "cpu")
        max_norm = _core.parse_number(max_norm, "DDPNormState.clip_", "max_norm")
        _core.scale_with_norm(params, grads, max_norm, norm, be, None, "DDPNormState.clip_")
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
