"""fusedclip.fsdp.clip_grad_norm_: FSDP1's FullyShardedDataParallel.clip_grad_norm_ on fusedclip's sharded path,
under its public name (the code lives with the other sharded paths, in fusedclip/distributed/fsdp.py). Importing
it imports torch.distributed.fsdp (about a second), which is why `import fusedclip` does not."""
from .distributed.fsdp import clip_grad_norm_

__all__ = ["clip_grad_norm_"]
