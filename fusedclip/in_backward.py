"""Exact global clipping whose norm is recorded while backward runs (issue #26 item 1), single device.

Each included parameter gets a hook that runs when its gradient is final. The hook reads it once, while it is still in
cache, and stores its squared L2 norm in float64 (the fused kernel's unrounded float64 norm of that one tensor, squared)
in the parameter's own slot of a float64 buffer on the device (or, with buckets, below, its bucket's once the bucket is
complete). CPU parameters with the native backend get the hooks in C++ (csrc/in_backward.cpp: on each parameter's
AccumulateGrad node, called by the engine without Python, and clip_() in one call); the others get Python
post-accumulate-grad hooks. After backward, clip_() adds the slots
in a fixed order (the parameters' order: bitwise deterministic whatever order backward produced the gradients in),
takes the square root, rounds it to the accumulation dtype (fp32; fp64 when a gradient is fp64) and applies the
coefficient max_norm / (norm + 1e-6), clamped to 1:

* into the optimizer's step when it is one of torch's fused optimizers whose parameters are exactly the clipped ones
  (its grad_scale, as fusedclip.clip_into_): no pass over the gradients at all after backward;
* else in one scaling pass (the backend's scale kernel, as clip_grads_with_norm_).

No host sync: the norm is a device tensor. With the native backend each slot is the norm from the same kernel as
fusedclip.clip_'s, and the result equals clip_'s bit for bit, the norm, the coefficient and the clipped gradients, in
every draw tested (tests/test_in_backward.py; the two add float64 partials in different orders, which could flip the
last fp32 bit only for a norm within about 1e-8 ulp of a rounding midpoint). With backend="torch" the slots are
torch.linalg.vector_norm(grad, dtype=float64): the norm is the exact one correctly rounded.

Gradient accumulation: each hook overwrites its slot with the norm of the gradient accumulated so far, so the last
backward before clip_() leaves the norms of the final gradients; `with clipper.no_record():` around the earlier
micro-batches skips their reads (as DDP's no_sync skips their all-reduce). Parameters that do not require grad get no
hook; those left out of `params` (a Muon param group, say) are neither measured nor scaled; a parameter without a
gradient in a step counts 0 (its slot is cleared by each clip_()). clip_() itself reads, from the gradients as they are,
what the hooks did not: a bucket whose hooks did not all fire, one that has a gradient but no recording backward reached
it since the last clip_() (every gradient counts, as in clip_), and, with the C++ hooks, one they could not read (a
gradient that is not a plain dense CPU tensor, backward under a dispatch mode) or every bucket under compiled autograd,
which does not run them (a warning says so once).

Under DDP the norm comes from DDP's comm hook instead (fusedclip.DDPNormState: the averaged buckets', which these hooks
cannot see), applied the same way (optimizers.takes_coefficient / hand_over_coefficient, else a scaling pass).
Buckets (bucket_bytes; 16 MiB by default on CUDA, none on the CPU): consecutive parameters in their order, read in one
fused call when the bucket's last gradient lands (one launch per bucket instead of per parameter), each bucket one
slot; a bucket whose hooks did not all fire by clip_() (a parameter without a gradient this step) is read then, from
the gradients as they are. The layout is fixed, so the sum's order does not depend on the order of the gradients.
Not here yet: several devices, FSDP2 / DTensor.
"""
import contextlib
import itertools

import torch

from . import _ext, backends
from ._core import as_list, by_device, check_tensors, check_writable, is_dtensor_type, parse_number, scale_by_norm
from .optimizers import hand_over_coefficient, hand_over_grad_scale, takes_coefficient, withdraw_grad_scale
from .ops import acc_dtype, result_dtype


# The default bucket on CUDA: one launch per bucket instead of per parameter (a parameter larger than this is a bucket
# of its own). On the CPU a bucket of one parameter reads each gradient while it is in cache, with no launch to save.
CUDA_BUCKET_BYTES = 16 << 20


class ClipInBackward:
    """Global L2-norm clipping with the norm recorded during backward (see the module docstring).

        clipper = fusedclip.ClipInBackward(model.parameters(), max_norm=1.0, optimizer=optimizer)
        loss.backward()
        norm = clipper.clip_()      # no read of the gradients; into a fused optimizer's step when it can
        optimizer.step()

    Args:
        params (torch.nn.Module or iterable of Tensors): the parameters clipped together (their order fixes the
            order of the sum); those that do not require grad are left out.
        max_norm (float): the largest norm allowed.
        optimizer (torch.optim.Optimizer, optional): a torch fused optimizer (fused=True) whose parameters are exactly
            these: clip_() hands it the coefficient instead of scaling the gradients.
        backend (str): "auto" (default), "native", "triton" or "torch": whose norm and scale kernels are used.
        bucket_bytes (int, optional): read the gradients per bucket (consecutive parameters, in their order, of at
            least this many bytes), once a bucket's last gradient lands: one fused read (one launch on a GPU) per
            bucket instead of per parameter. Default: 0 on the CPU (each gradient read while it is in cache),
            16 MiB on CUDA (CUDA_BUCKET_BYTES).

    Raises:
        ValueError: a bad max_norm or bucket_bytes, a parameter given twice, parameters on several devices, or DTensor
            parameters.
    """

    def __init__(self, params, max_norm, *, optimizer=None, backend="auto", bucket_bytes=None):
        self.max_norm = parse_number(max_norm, "ClipInBackward", "max_norm")
        backends.check_name(backend, "ClipInBackward")
        self.backend = backend
        params = as_list(params.parameters() if isinstance(params, torch.nn.Module) else params)
        check_tensors(params, "ClipInBackward", "parameters")
        self.params = [p for p in params if p.requires_grad]
        if any(is_dtensor_type(type(p)) for p in self.params):
            raise ValueError("fusedclip.ClipInBackward: DTensor parameters (FSDP2, tensor parallel) are not supported: "
                             "a hook sees only this rank's shard, so the norm would not be global; use fusedclip.clip_ "
                             "(the exact sharded norm)")
        self._slot = {}
        for i, p in enumerate(self.params):
            if p in self._slot:
                raise ValueError(f"fusedclip.ClipInBackward: a parameter is given twice (slots {self._slot[p]}, {i})")
            self._slot[p] = i
        devices = {p.device for p in self.params}
        if len(devices) > 1:
            raise ValueError(f"fusedclip.ClipInBackward: the parameters are on several devices "
                             f"({sorted(map(str, devices))}); one clipper per device is not a global clip: use "
                             "fusedclip.clip_")
        device = devices.pop() if devices else torch.device("cpu")
        self._be = backends.resolve(backend, device.type)
        if bucket_bytes is None:
            bucket_bytes = 0 if device.type == "cpu" else CUDA_BUCKET_BYTES
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 0:
            raise ValueError(f"fusedclip.ClipInBackward: bucket_bytes must be an int >= 0, got {bucket_bytes!r}")
        self.bucket_bytes = bucket_bytes
        # the buckets: consecutive parameters in their order (a fixed layout, so the sum's order does not depend on the
        # order backward produces the gradients in), each closed once it holds bucket_bytes; one slot each
        self._buckets, size = [[]], 0
        for p in self.params:
            if self._buckets[-1] and size >= bucket_bytes:
                self._buckets.append([])
                size = 0
            self._buckets[-1].append(p)
            size += p.numel() * p.element_size()
        if not self._buckets[-1]:
            self._buckets.pop()
        self._partials = torch.zeros(len(self._buckets), dtype=torch.float64, device=device)
        self.optimizer = optimizer
        self._into = takes_coefficient(optimizer, self.params)
        self._recording = True
        # per bucket, the hooks still to fire before it is read, and whether a hook read it since the last clip_(): a
        # bucket not back at its size (a parameter without a gradient this step) or not read though it has a gradient
        # (no recording backward reached it) is read by clip_(), from the gradients as they are then
        self._left = [len(b) for b in self._buckets]
        self._read = [False] * len(self._buckets)
        # CPU parameters with the native backend: the hooks in C++ (csrc/in_backward.cpp; None when it declines them)
        self._compiled = None
        if device.type == "cpu" and self._be.name == "native" and _ext.LOADED:
            ends = list(itertools.accumulate(len(b) for b in self._buckets))
            self._compiled = _ext._C.record_hooks(self.params, ends, self._partials)
        self._handles = [] if self._compiled is not None else [
            p.register_post_accumulate_grad_hook(self._hook(k)) for k, bucket in enumerate(self._buckets)
            for p in bucket]

    def _hook(self, k):
        """The Python hook of a parameter of bucket k (torch calls it once per parameter per backward: a closure, no
        lookup by tensor): the bucket is read once its last gradient lands."""
        left, read, size = self._left, self._read, len(self._buckets[k])

        def hook(param):
            if not self._recording:
                return
            left[k] -= 1
            if left[k] == 0:
                left[k] = size
                self._record(k)
                read[k] = True
        return hook

    @torch.no_grad()
    def _record(self, k):
        """Bucket k's squared norm into its slot, from its gradients as they are now."""
        grads = [p.grad for p in self._buckets[k] if p.grad is not None]
        if not grads:
            self._partials[k:k + 1].zero_()
            return
        if self._be.delegates_to_torch:
            sq = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads]).square().sum()
        else:  # the fused kernel's norm of these tensors, unrounded (float64 partials inside)
            n = self._be.total_norm(grads, 2.0, None, torch.float64)
            sq = n * n
        self._partials[k:k + 1].copy_(sq.reshape(1))

    @contextlib.contextmanager
    def no_record(self):
        """Backward passes inside this block record nothing (gradient accumulation: the micro-batches before the last
        one, whose gradients are not final). The last backward before clip_() must record.

        Returns:
            a context manager.
        """
        previous = self._recording
        self._set_recording(False)
        try:
            yield
        finally:
            self._set_recording(previous)

    def _set_recording(self, on):
        self._recording = on
        if self._compiled is not None:
            _ext._C.record_hooks_recording(self._compiled, on)

    @property
    def partials(self):
        """Each bucket's recorded squared norm (float64, on the device; a bucket per parameter with bucket_bytes=0):
        a view, no sync to get it."""
        return self._partials

    @torch.no_grad()
    def clip_(self):
        """Clips the gradients by the norm recorded during backward and clears the record; returns the total norm
        before clipping (0-dim, in the promotion of the gradients' dtypes, on their device; tensor(0.) without
        gradients). No read of the gradients; no host sync.

        Returns:
            Tensor: the total L2 norm of the gradients before clipping.
        """
        if self._compiled is not None:  # one call: the norm, and the fused step's grad_scale, from the slots
            out = _ext._C.record_hooks_finish(self._compiled, self.max_norm, self._into)
            if isinstance(out, tuple):
                norm, acc_norm, grad_scale = out
                if self._into:  # the fused step applies it; None: the coefficient is 1 (read on the host, the CPU)
                    if grad_scale is not None:
                        hand_over_grad_scale(self.optimizer, grad_scale)
                    else:  # nothing to apply: not even a grad_scale an earlier clip_() of this step handed over
                        withdraw_grad_scale(self.optimizer)
                else:
                    grads = [p.grad for p in self.params if p.grad is not None]
                    scale_by_norm(grads, self.max_norm, acc_norm, self._be, "ClipInBackward.clip_")
                return norm
            unread = out  # buckets the compiled hooks left to Python (or no gradient at all)
        else:
            unread = [k for k, bucket in enumerate(self._buckets) if self._left[k] != len(bucket)
                      or (not self._read[k] and any(p.grad is not None for p in bucket))]
            self._left[:] = [len(b) for b in self._buckets]
            self._read[:] = [False] * len(self._buckets)
        for k in unread:
            self._record(k)
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            self._partials.zero_()
            return torch.tensor(0.0)
        norm = self._partials.sum().sqrt().to(acc_dtype(grads))  # a fixed order: the slots'
        self._partials.zero_()
        if self._into:
            hand_over_coefficient(self.optimizer, self.max_norm, norm)  # the fused step applies it
        elif self._be.delegates_to_torch:  # torch's clip_grads_with_norm_: coefficient clamped to 1, multiplied in
            coef = torch.clamp(self.max_norm / (norm + 1e-6), max=1.0)
            for device, group in by_device(grads).items():
                torch._foreach_mul_(group, coef.to(device))
        else:
            check_writable(grads, "ClipInBackward.clip_")
            scale_by_norm(grads, self.max_norm, norm, self._be, "ClipInBackward.clip_")
        return norm.to(result_dtype(grads))

    def remove(self):
        """Removes the hooks (the clipper records nothing afterwards).

        Returns:
            None.
        """
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._compiled is not None:
            _ext._C.record_hooks_remove(self._compiled)
            self._compiled = None
        # nothing recorded any more: clip_() reads every gradient from now on
        self._partials.zero_()
        self._left[:] = [len(b) for b in self._buckets]
        self._read[:] = [False] * len(self._buckets)
