"""DDP: the norm accumulated by a communication hook while backward runs, applied by DDPNormState.clip_."""
import functools

import torch
import torch.distributed as dist

from .. import _core
from .. import backends
from ..ops import acc_dtype
from ..optimizers import hand_over_coefficient, takes_coefficient


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

    Args:
        process_group (ProcessGroup, optional): the group DDP averages over (None: the default group).
        backend (str): the backend that computes the buckets' norms and scales: "auto" (default), "native",
            "triton" or "torch".
    """

    def __init__(self, process_group=None, backend="auto"):
        self.process_group = process_group
        self.backend = backend
        self.reset()

    def reset(self):
        """Forgets the recorded norms (the hook does this itself at the start of each backward).

        Returns:
            None.
        """
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
        """The 2-norm of all averaged gradients of the last synchronizing backward.

        Returns:
            Tensor: 0-dim, on the buckets' device (float32; float64 when a bucket is float64).

        Raises:
            RuntimeError: no complete backward recorded since reset().
        """
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

    def clip_(self, parameters, max_norm, error_if_nonfinite=False, *, optimizer=None):
        """Clips the gradients of `parameters` by the recorded norm: the same result as fusedclip.clip_(parameters,
        max_norm) after DDP's default hook, with no read of the gradients. The coefficient goes into `optimizer`'s
        step when it is one of torch's fused optimizers over exactly these parameters (as fusedclip.clip_into_ and
        ClipInBackward do: no pass over the gradients at all), else one scaling pass (clip_grads_with_norm_'s).

        Args:
            parameters (Tensor or iterable of Tensors): the DDP model's parameters.
            max_norm (float): the largest norm allowed.
            error_if_nonfinite (bool): raise (before scaling anything) if the norm is nan or inf. A host sync.
            optimizer (torch.optim.Optimizer, optional): the optimizer whose next step may apply the coefficient.

        Returns:
            Tensor: the recorded total norm (before clipping), as total_norm() returns it.
        """
        norm = self.total_norm()
        if error_if_nonfinite:
            _core.check_finite(norm, 2.0)
        params = _core.as_list(parameters)
        grads = _core.grads_of(params, "DDPNormState.clip_")
        be = backends.resolve(self.backend, grads[0].device.type if grads else "cpu")
        max_norm = _core.parse_number(max_norm, "DDPNormState.clip_", "max_norm")
        if grads and takes_coefficient(optimizer, params):
            hand_over_coefficient(optimizer, max_norm, norm.to(grads[0].device))
        else:
            _core.scale_with_norm(params, grads, max_norm, norm, be, None, "DDPNormState.clip_")
        return norm


def ddp_norm_hook(state, bucket):
    """A DDP communication hook: averages the bucket over the group as DDP's default hook does (divide by
    the group size, then all_reduce SUM), and once it is averaged records its 2-norm in `state`
    (a DDPNormState). Register with model.register_comm_hook(state, fusedclip.ddp_norm_hook).

    Args:
        state (DDPNormState): where the buckets' norms are recorded.
        bucket (torch.distributed.GradBucket): given by DDP.

    Returns:
        torch.futures.Future: resolves to the averaged bucket, as DDP's default hook's does.
    """
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
