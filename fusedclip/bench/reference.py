"""Reference timings measured in the same run as the providers: the copy bandwidth (what the GB/s column is a
percentage of) and the memory floor of a set (what a two-pass clip cannot beat once the set exceeds the
last-level cache)."""
import torch

from .timing import percentile
from .workload import MAX_NORM, FixedWorkload

FLOOR_TOLERANCE = 1.10  # "within 10% of the floor"


def copy_bandwidth(device, clock, nbytes):
    """Bytes per second of dst.copy_(src) (2 x nbytes move), timed like the providers."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    fn = lambda ps: dst.copy_(src)  # noqa: E731
    wl = FixedWorkload()
    est = clock.warmup(fn, wl, 3)[-1]
    times, _ = clock.measure(fn, wl, est)
    med = percentile(times, 0.5)
    return {"bytes_per_s": 2 * n * 4 / med, "buffer_bytes": n * 4, "median_s": med,
            "p20_s": percentile(times, 0.2), "p80_s": percentile(times, 0.8)}


def floor_fn(clipping):
    """The memory floor of a set, run on a workload of sets.flat_specs (one flat gradient per dtype): one
    torch.linalg.vector_norm per flat tensor, and when clipping one mul_ by the coefficient. Reads and writes
    do not cost the same, so this is measured rather than derived from the copy's bandwidth."""
    def norm(ps):
        for p in ps:
            torch.linalg.vector_norm(p.grad)

    def norm_mul(ps):
        norms = [torch.linalg.vector_norm(p.grad) for p in ps]  # every norm before any scaling, as a clip must
        for p, n in zip(ps, norms):
            p.grad.mul_(MAX_NORM / n)  # each flat tensor's own coefficient: the same bytes as the total's
    return norm_mul if clipping else norm


FLOOR_LABEL = {True: "floor: vector_norm + mul_", False: "floor: vector_norm"}
