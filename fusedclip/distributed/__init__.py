"""Clipping sharded gradients on torch.distributed: a process group, DTensors, and a DDP communication hook.

The kernels never communicate. A global norm is: this rank's norm (one fused pass over its shards) ->
its partial (norm**p for a finite p; the norm itself for inf/-inf; the count for p=0) -> one all_reduce
(SUM, or MAX/MIN for +-inf; a functional collective, so torch.compile traces it, which the current stream
waits for) -> the global norm -> the scale pass. The partial is
reduced in float64 whatever the gradients' dtypes (so norm**p does not overflow, and ranks holding
different dtypes, or no gradients at all, still reduce the same dtype). Nothing waits on the host,
except error_if_nonfinite=True, which reads the global norm (as torch does) on every rank, so every
rank raises before any gradient is scaled.

fusedclip.clip_, get_total_norm and clip_grads_with_norm_ call sharded.py when `process_group` is
given or when the gradients are DTensors; the package builds on _core.py and never calls back into clip.py
(except fsdp.py, FSDP1's method, which is an entry point of its own).

  reduce.py   the reduction (pack, all_reduce, unpack), one rank's local passes, a process group's norm
  dtensor.py  DTensors: which rank counts which shard, the reduction plan, the C++ path
  sharded.py  the sharded clip_ / get_total_norm / clip_grads_with_norm_
  ddp.py      the DDP communication hook that records the norm during backward
  fsdp.py     FSDP1's clip_grad_norm_ (imported on demand: torch.distributed.fsdp is slow to import)
"""
from .ddp import DDPNormState, ddp_norm_hook
from .dtensor import dtensor_norm, has_dtensor, is_dtensor
from .reduce import group_norm
from .sharded import fast_clip, sharded_clip_, sharded_scale_, sharded_total_norm

__all__ = ["DDPNormState", "ddp_norm_hook", "dtensor_norm", "fast_clip", "group_norm", "has_dtensor", "is_dtensor",
           "sharded_clip_", "sharded_scale_", "sharded_total_norm"]
