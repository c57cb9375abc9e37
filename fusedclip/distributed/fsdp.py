"""FSDP1: FullyShardedDataParallel.clip_grad_norm_ on fusedclip's sharded path.

fusedclip.patch_torch() installs `clip_grad_norm_` below as FSDP1's method, so code that calls
`model.clip_grad_norm_(max_norm, norm_type)` (Accelerate and Lightning Fabric under FSDP1) runs it; it can
also be called directly: `fusedclip.fsdp.clip_grad_norm_(fsdp_model, max_norm)` (fusedclip.fsdp is this
module's public name; the code lives in fusedclip/distributed/ with the rest of the sharded paths).

It does what FSDP's own method does, with fusedclip computing the norm and scaling: the root-only and idle
checks; every unit NO_SHARD -> the local gradients clipped as torch.nn.utils would; otherwise this rank's
shards (the flat parameters, or with use_orig_params the original parameters' shard views) reduced over
the FSDP process group, and the gradients FSDP does not shard (NO_SHARD units, parameters FSDP does not
manage) counted as FSDP counts them: added after the reduction, or for inf inside its MAX reduction.
Hybrid strategies reduce over the shard group only, as FSDP's own does (every replica holds the same
shards). Parameters without gradients are skipped; the norm has the promoted dtype of this rank's
gradients (float32, with FSDP's warning, when it has none) and is moved to the CPU under CPU offload. The
norm equals FSDP's own up to rounding (fusedclip reduces in float64, FSDP in float32) for p = inf and
p > 0. For -inf FSDP's own formula does not give the norm (the min); fusedclip's does. For 0 the nonzero
shards are counted, each rank's separately, as in fusedclip.clip_ with a process group.
"""
import math
import warnings

import torch
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp._common_utils import TrainingState
from torch.distributed.fsdp._runtime_utils import _lazy_init

from .. import clip as _clip  # called by attribute, so a spy or a patch of fusedclip.clip sees the calls
from ..ops import result_dtype

# FSDP's own method, captured when patch_torch() first imports this module, before it installs ours:
# backend="torch" runs it.
_fsdp_clip_grad_norm_ = FullyShardedDataParallel.clip_grad_norm_


def _split(module):
    """(sharded, not sharded) parameters, listed as FSDP's own method lists them (its order, so the result
    is deterministic): per unit its flat parameter, or its original parameters with use_orig_params;
    parameters no unit manages count as not sharded."""
    sharded, unsharded, seen = [], [], set()
    for handle in module._all_handles:
        target = sharded if handle.uses_sharded_strategy else unsharded
        for p in handle.flat_param._params if handle._use_orig_params else [handle.flat_param]:
            if p not in seen:
                seen.add(p)
                target.append(p)
    unsharded += [p for p in module.parameters() if p not in seen]
    return sharded, unsharded


def _add_local(shards, local, p):
    """The norm of all gradients from the shards' global norm and the local norm of the unsharded ones."""
    local = local.to(shards.device)
    if p == 0.0:
        return shards + local  # counts of nonzero tensors
    return (shards.double().pow(p) + local.double().pow(p)).pow(1.0 / p)


@torch.no_grad()
def clip_grad_norm_(module, max_norm, norm_type=2.0, *, backend="auto"):
    """FullyShardedDataParallel.clip_grad_norm_(max_norm, norm_type) for the root FSDP1 `module`, computed by
    fusedclip (`backend` as in fusedclip.clip_; "torch" runs FSDP's own method). Every rank must call it.

    Args:
        module (FullyShardedDataParallel): the root FSDP1 module.
        max_norm (float): the largest norm allowed.
        norm_type (float, int or str): the p of the p-norm. Default 2.0.
        backend (str): "auto" (default), "native", "triton" or "torch".

    Returns:
        Tensor: the total norm of all ranks' gradients before clipping, 0-dim, on every rank.
    """
    if backend == "torch":
        return _fsdp_clip_grad_norm_(module, max_norm, norm_type)
    _lazy_init(module, module)
    if not module._is_root:
        raise RuntimeError("`clip_grad_norm_()` should only be called on the root FSDP instance")
    module._assert_state(TrainingState.IDLE)
    if all(not handle.uses_sharded_strategy for handle in module._all_handles):
        return _clip.clip_(list(module.parameters()), max_norm, norm_type, backend=backend)
    p = float(norm_type)
    sharded, unsharded = _split(module)
    local_grads = [q.grad for q in unsharded if q.grad is not None]
    if local_grads and not math.isinf(p):
        # FSDP adds the unsharded gradients' sum of |g|^p after the all_reduce (in it, each replica would count)
        shards = _clip.get_total_norm([q.grad for q in sharded if q.grad is not None], p, backend=backend,
                                      process_group=module.process_group)
        norm = _add_local(shards, _clip.get_total_norm(local_grads, p, backend=backend), p)
        _clip.clip_grads_with_norm_(sharded + unsharded, max_norm, norm, backend=backend)
    else:  # for +-inf FSDP's all_reduce (MAX) takes in the unsharded gradients too; replicas change nothing
        norm = _clip.clip_(sharded + unsharded, max_norm, p, backend=backend, process_group=module.process_group)
    if module.cpu_offload.offload_params:
        norm = norm.cpu()
    grads = [q.grad for q in sharded + unsharded if q.grad is not None]
    if not grads:
        warnings.warn(f"Called FSDP.clip_grad_norm_() on rank {module.rank} with no gradients -- returning the "
                      "total norm in the default dtype torch.float32 (fusedclip)", stacklevel=2)
        return norm.to(torch.float32)
    return norm.to(result_dtype(grads))
