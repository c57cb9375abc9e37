"""DTensor gradients, alone or mixed with plain tensors: which rank counts which local shard, the reduction plan
(one fused pass and one all_reduce per rank set), and the C++ path that reads DTensors without dispatch."""
import operator
import sys
import threading

import torch
import torch.distributed as dist

from .. import _core
from .. import _ext
from .reduce import (all_reduce, combine, distinct_dtypes, fast_local, group_device, local_norm, pack, reduce_op,
                     scale_local, unpack)

# the extension's entries for DTensors read in C++ (dtensor_norm / dtensor_scale: fast_norm below)
FAST_DTENSOR = _ext.LOADED and hasattr(_ext._C, "dtensor_norm")


def is_dtensor(t):
    """Whether t is a DTensor, without importing torch.distributed.tensor (slow to import): DTensors can
    only exist once that module has been imported. Plain gradients cost one type check."""
    if type(t) is torch.Tensor:
        return False
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def has_dtensor(tensors):
    """Whether any of `tensors` is a DTensor (one type check per distinct type)."""
    mod = sys.modules.get("torch.distributed.tensor")
    if mod is None:
        return False
    return any(issubclass(t, mod.DTensor) for t in set(map(type, tensors)) if t is not torch.Tensor)


# ---------------------------------------------------------------------------------------------------------
# The reduction plan.
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


class Plan:
    """One call's gradients sorted for the reduction: `scale` every local tensor to scale (DTensors' local shards
    and plain tensors, in order); `buckets` [(rank set, mesh to reduce over, tensors this rank counts, every local
    tensor of the bucket)], sorted the same way on every rank; `plain` the plain tensors; `meshes` the first
    DTensor's mesh (none without DTensors)."""
    __slots__ = ("scale", "buckets", "plain", "meshes", "_dtypes")

    def dtypes(self):
        """The distinct dtypes of the local tensors (read once)."""
        if getattr(self, "_dtypes", None) is None:
            self._dtypes = distinct_dtypes(self.scale)
        return self._dtypes


def _bucket_order(bucket):
    """Larger rank sets first, then by ranks: the same order on every rank, so no two ranks wait on each other's
    collectives in opposite orders."""
    return (-len(bucket[0]), bucket[0])


def plan_of(grads, fn):
    """The plan of a list of gradients (DTensors, plain tensors, or both)."""
    plan = Plan()
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


class FastPlan:
    """What fast_norm read: the handle owning the local tensors (for dtensor_scale), their promoted dtype, whether
    any is float64, the first DTensor's mesh."""
    __slots__ = ("handle", "dtype", "any_double", "meshes")


def fast_norm(items, of_grads, p, fn, process_group=None):
    """(global norm in float64, FastPlan) of DTensors (or, of_grads, of the .grad of DTensor parameters) read in
    C++: one read of the Python objects, per rank set one fused pass over the shards this rank counts and one
    all_reduce, then over process_group; or None (nothing read or written) for what the plan path handles: a
    mix with plain tensors, Partial specs, non-dense shards, several devices, p <= 0, a mode, torch.compile."""
    if not FAST_DTENSOR or torch.compiler.is_compiling():
        return None
    mod = sys.modules.get("torch.distributed.tensor")
    if mod is None:
        return None
    r = _ext._C.dtensor_norm(items, of_grads, p, mod.DTensor, _classify, fn)
    if r is None:
        return None
    buckets, first, handle, dtype, any_double, spec = r
    device, op = first.device, reduce_op(p)
    if len(buckets) > 1:
        buckets.sort(key=lambda b: _bucket_order(_RANK_SETS[b[0]]))
    total = None
    for key, local in buckets:
        t = all_reduce(pack(local, True, p, device)[0], op, _mesh_groups(_RANK_SETS[key][1]))
        total = t if total is None else combine(total, t, op)
    if process_group is not None:
        total = all_reduce(total, op, [process_group])
    plan = FastPlan()
    plan.handle, plan.dtype, plan.any_double, plan.meshes = handle, dtype, any_double, [spec.mesh]
    return unpack(total, p), plan


def fast_scale(plan, max_norm, norm):
    """Scales the local tensors of a FastPlan by the global norm (the coefficient in their accumulation dtype)."""
    _ext._C.dtensor_scale(plan.handle, max_norm, norm.to(torch.float64 if plan.any_double else torch.float32))


def _bucket_norm(tensors, p, be, fn):
    """(this rank's unrounded norm of a bucket's counted local shards, or None; whether they have elements). One
    device (a mesh's), so the backend is called directly: no per-tensor checks in Python."""
    if not tensors:
        return None, False
    if be.delegates_to_torch or torch.compiler.is_compiling():
        return local_norm(tensors, p, be, fn)
    has = p > 0 or any(map(torch.Tensor.numel, tensors))  # for p > 0 an empty list's norm is 0 anyway
    if fast_local(be):
        norm = _ext._C.local_norm(tensors, p)  # the op, called from C++ (None: take the op path)
        if norm is not None:
            return norm, has
    try:
        return be.total_norm(tensors, p, None, torch.float64), has
    except (TypeError, ValueError, RuntimeError, NotImplementedError):
        return local_norm(tensors, p, be, fn)  # explains the failure, or takes the devices one by one


def plan_norm(plan, p, be, fn, process_group, plain_group):
    """The global norm (float64) of a plan: per rank set one fused pass and one all_reduce; the plain tensors
    (replicated, or shards of plain_group); then over process_group (pipeline stages)."""
    if plan.scale:
        device = plan.scale[0].device
    else:
        device = group_device(process_group if process_group is not None else plain_group)
    op = reduce_op(p)
    total = pack(None, False, p, device)[0]
    for _, mesh, counted, all_local in plan.buckets:
        if p == 0.0:
            # torch's p=0 counts the (whole) tensors with a nonzero element: a per-tensor flag, MAX over the mesh
            # (every rank of a mesh holds a shard, maybe empty, of each of its DTensors), then a count.
            flags = (torch.stack([(t != 0).any() for t in all_local]).to(device, torch.float64) if all_local
                     else torch.zeros(0, dtype=torch.float64, device=device))
            t = all_reduce(flags, "max", _mesh_groups(mesh)).sum()
        else:
            local, has = _bucket_norm(counted, p, be, fn)
            t = all_reduce(pack(local, has, p, device)[0], op, _mesh_groups(mesh))
        total = combine(total, t, op)
    if plan.plain:
        local, has = local_norm(plan.plain, p, be, fn) if p != 0.0 else (
            _core.total_norm_of(plan.plain, 0.0, be, fn), True)
        part = pack(local, has, p, device)[0]
        if plain_group is not None:
            part = all_reduce(part, op, [plain_group])
        total = combine(total, part, op)
    elif plain_group is not None:  # every rank of plain_group reduces, also those without plain tensors
        total = combine(total, all_reduce(pack(None, False, p, device)[0], op, [plain_group]), op)
    if process_group is not None:
        total = all_reduce(total, op, [process_group])
    return unpack(total, p)


def scale_plan(plan, max_norm, norm, be, fn):
    tensors = plan.scale
    if not tensors:
        return
    if be.delegates_to_torch or torch.compiler.is_compiling() or plan.plain:
        scale_local(tensors, max_norm, norm, be, fn)
        return
    # DTensors' local shards only: one device, each writable unless expanded (checked when not contiguous)
    norm = norm.to(tensors[0].device, torch.float64 if torch.float64 in plan.dtypes() else torch.float32)
    if fast_local(be) and _ext._C.scale_local(tensors, max_norm, norm):
        return  # dense tensors on one device (checked in C++), scaled by the op called from C++
    if not all(map(torch.Tensor.is_contiguous, tensors)):
        _core.check_writable(tensors, fn)
    try:
        be.scale(tensors, max_norm, norm)
    except (TypeError, ValueError, RuntimeError, NotImplementedError):
        _core.scale_by_norm(tensors, max_norm, norm, be, fn)


def dtensor_norm(grads, p, be, fn, process_group=None, plain_group=None):
    """(the global norm in float64, the local tensors to scale, the meshes) of DTensor gradients (ZClip's too)."""
    plan = plan_of(grads, fn)
    return plan_norm(plan, p, be, fn, process_group, plain_group), plan.scale, plan.meshes
