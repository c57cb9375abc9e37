"""Workloads: several copies of a set's gradients (rotated so that sets smaller than the cache are not timed
from cache) and a pristine copy to restore them between calls when clipping is active; the regimes; the
check every provider passes before it is timed."""
import math

import torch

from .machine import cache_bytes, free_bytes
from .sets import F32, numel, specs_bytes

MAX_NORM = 1.0
CLIP_NORM = 10.0 * MAX_NORM  # the gradients' norm when clipping is active (clip coefficient 0.1)
NOCLIP_NORM = 0.5 * MAX_NORM  # ... and when it is not

# "-busy": the same, timed while every core runs a busy process (timing.busy_cores)
REGIMES = ["clip", "noclip", "clip-busy", "noclip-busy"]


def clips(regime):
    """Whether the gradients need scaling in this regime (the extras' regimes, amp and optim, clip)."""
    return not regime.startswith("noclip")


def is_busy(regime):
    return regime.endswith("-busy")


def rotations_for(nbytes, device, cap=64):
    """How many copies to rotate so that each is evicted from the cache before it comes back."""
    return max(1, min(cap, math.ceil(3 * cache_bytes(device) / max(nbytes, 1))))


def rotations_within(nbytes, device, mem_fraction, per_list=1):
    """rotations_for, fewer when (per_list * rotations + 1) copies do not fit the usable memory; 0 when not
    even one list fits."""
    budget = mem_fraction * free_bytes(device)
    rot = rotations_for(nbytes, device)
    while rot > 0 and (per_list * rot + 1) * nbytes > budget:
        rot -= 1
    return rot


class Workload:
    """`rotations` lists of parameters with gradients of the given specs, and a pristine copy of the
    gradients. Parameters are zero-stride views of one element, so only the gradients take memory."""

    def __init__(self, specs, device, rotations, seed=0, grad_scale=1.0, real_params=False):
        """grad_scale: the gradients are stored multiplied by it (an AMP loss scale; the reference norm stays
        that of the unscaled gradients). real_params: parameters are real tensors (an optimizer can step
        them) instead of zero-stride views."""
        self.specs, self.device = specs, device
        self.on_restore = []  # callables(i), run after list i is restored (outside the timed region)
        self.numel = sum(numel(s) for s, _ in specs)
        self.nbytes = specs_bytes(specs)
        gen = torch.Generator(device=device).manual_seed(seed)
        pristine = []
        for shape, dtype in specs:
            g = torch.randn(shape, generator=gen, device=device, dtype=F32)
            pristine.append(g.to(dtype) if dtype != F32 else g)
        torch._foreach_mul_(pristine, CLIP_NORM / total_norm(pristine))
        self.pristine = pristine
        self.ref_norm = total_norm(pristine)
        if grad_scale != 1.0:
            torch._foreach_mul_(pristine, grad_scale)
        self.lists, self.grads = [], []
        for _ in range(rotations):
            params, grads = [], []
            for g0 in pristine:
                p = torch.nn.Parameter(torch.zeros(g0.shape, dtype=g0.dtype, device=device) if real_params
                                       else torch.zeros((), dtype=g0.dtype, device=device).expand(g0.shape))
                p.grad = g0.clone()
                params.append(p)
                grads.append(p.grad)
            self.lists.append(params)
            self.grads.append(grads)
        self.clipping = True
        self.dirty = set()

    def set_regime(self, clipping):
        """Clipping active: norm CLIP_NORM, restored after each call. Inactive: norm NOCLIP_NORM."""
        self.restore_all()
        if not clipping:  # nothing is restored in this regime
            for grads in self.grads:
                torch._foreach_mul_(grads, NOCLIP_NORM / CLIP_NORM)
        self.clipping = clipping

    def restore(self, i):
        torch._foreach_copy_(self.grads[i], self.pristine)
        for hook in self.on_restore:
            hook(i)

    def restore_all(self):
        for i in range(len(self.lists)):
            self.restore(i)
        self.dirty.clear()

    def expected_norm(self):
        return self.ref_norm * (1.0 if self.clipping else NOCLIP_NORM / CLIP_NORM)


def total_norm(tensors):
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t, dtype=F32) for t in tensors])))


def check_call(fn, wl):
    """One call on list 0: the returned norm and (when clipping) the clipped gradients' norm. '' or a
    description of what is wrong."""
    got = float(fn(wl.lists[0]))
    want = wl.expected_norm()
    problems = []
    if not math.isfinite(got) or abs(got - want) > 2e-2 * want:
        problems.append(f"norm {got:.6g}, expected {want:.6g}")
    after = total_norm(wl.grads[0])
    want_after = MAX_NORM if wl.clipping else want
    if abs(after - want_after) > 2e-2 * want_after:
        problems.append(f"norm after the call {after:.6g}, expected {want_after:.6g}")
    if wl.clipping:
        wl.restore(0)
    return "; ".join(problems)


class FixedWorkload:
    """A stand-in workload for timing a function that ignores its argument (the copy)."""
    lists = [None]
    clipping = False
    dirty = set()
