"""Timing rules: how a call is timed (CUDA events on a GPU, torch.utils.benchmark or one perf_counter per call
on the CPU), the statistics kept, the busy processes of the contention regimes, and launch counting."""
import contextlib
import math
import os
import subprocess
import sys
import time

import torch

LONG_CALL_S = 0.02  # CPU calls at least this long are timed one by one (see Clock._cpu)
# Calls per provider in a busy regime at least, for calls shorter than LONG_CALL_S: a stall is a scheduler time
# slice (milliseconds), rare and long next to such a call, so the p90 needs samples in the tail. A longer call
# averages the stalls within itself, and min_n calls of it already take seconds under load.
BUSY_MIN_N = 20


def percentile(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(times, hosts):
    """Per-call statistics. The mean and p90 are what a training step pays on a busy machine, where rare long
    stalls decide the mean; the median and p20..p80 are the usual speed."""
    return {"median_s": percentile(times, 0.5), "p20_s": percentile(times, 0.2), "p80_s": percentile(times, 0.8),
            "mean_s": sum(times) / len(times) if times else float("nan"), "p50_s": percentile(times, 0.5),
            "p90_s": percentile(times, 0.9), "n": len(times), "host_s": percentile(hosts, 0.5)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Runs fn over the workload's rotating lists and returns per-call samples (seconds). per_call: every CPU
    call timed on its own (the busy regimes: blocks of calls would average their stalls away)."""

    def __init__(self, device, budget_s, min_n, max_n, per_call=False):
        self.device, self.budget_s, self.min_n, self.max_n, self.per_call = device, budget_s, min_n, max_n, per_call

    def busy(self):
        return Clock(self.device, self.budget_s, self.min_n, self.max_n, per_call=True)

    def warmup(self, fn, wl, calls=2):
        """`calls` calls (the first may compile); returns the duration of each, synchronized."""
        out = []
        for k in range(calls):
            i = k % len(wl.lists)
            sync(self.device)
            t0 = time.perf_counter()
            fn(wl.lists[i])
            sync(self.device)
            out.append(time.perf_counter() - t0)
            if wl.clipping:
                wl.restore(i)
        return out

    def calls_for(self, est_s, share=1.0):
        """Samples for a call of about est_s seconds: the time budget, within [min_calls, max_n] (both scaled
        by share, the fraction of the budget this measurement gets)."""
        lo, hi = max(1, math.ceil(self.min_calls(est_s) * share)), max(1, int(self.max_n * share))
        return int(max(lo, min(hi, share * self.budget_s / max(est_s, 1e-7))))

    def min_calls(self, est_s):
        return max(self.min_n, BUSY_MIN_N) if self.per_call and est_s < LONG_CALL_S else self.min_n

    def measure(self, fn, wl, est_s, share=1.0):
        if self.device.type == "cuda":
            return self._cuda(fn, wl, self.calls_for(est_s, share))
        if self.per_call or est_s >= LONG_CALL_S:
            return self._one_by_one(fn, wl, est_s, share)
        return self._cpu(fn, wl, est_s, share)

    def _cuda(self, fn, wl, n):
        """CUDA events around each call, the GPU idle before it: the time includes launch overhead when the
        call is host-bound and the kernels' time when it is not. Lists rotate; a clipped list is restored
        right after its call, so it is out of L2 by the time it comes back (when there are enough lists)."""
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        hosts = []
        rot = len(wl.lists)
        for k in range(n):
            i = k % rot
            torch.cuda.synchronize(self.device)
            starts[k].record()
            t0 = time.perf_counter()
            fn(wl.lists[i])
            hosts.append(time.perf_counter() - t0)
            ends[k].record()
            if wl.clipping:
                wl.restore(i)
        torch.cuda.synchronize(self.device)
        times = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
        return times, hosts

    def _one_by_one(self, fn, wl, est_s, share):
        """perf_counter around each call, a clipped list restored after it (outside the timed region), until
        the budget is spent (at least min_calls, at most max_n calls, scaled by share). For long calls the
        timer's overhead does not matter, and Timer.timeit's two warm-up calls per sample would triple the run
        time."""
        lo, hi = max(1, math.ceil(self.min_calls(est_s) * share)), max(1, int(self.max_n * share))
        end = time.perf_counter() + share * self.budget_s
        times, rot = [], len(wl.lists)
        while len(times) < lo or (len(times) < hi and time.perf_counter() < end):
            i = len(times) % rot
            t0 = time.perf_counter()
            fn(wl.lists[i])
            times.append(time.perf_counter() - t0)
            if wl.clipping:
                wl.restore(i)
        return times, times

    def _cpu(self, fn, wl, est_s, share):
        """torch.utils.benchmark with torch's intra-op thread count, over the rotating lists. Not clipping:
        blocked_autorange (its samples are means over blocks of calls). Clipping: one timed call per sample
        (Timer.timeit(1)), the lists clipped since the last sample restored in the timer's setup, outside the
        timed region."""
        from torch.utils import benchmark

        rot = len(wl.lists)
        state = {"k": 0}

        def call():
            i = state["k"] % rot
            state["k"] += 1
            fn(wl.lists[i])
            if wl.clipping:
                wl.dirty.add(i)

        def prep():
            for i in wl.dirty:
                wl.restore(i)
            wl.dirty.clear()

        threads = torch.get_num_threads()
        if not wl.clipping:
            timer = benchmark.Timer(stmt="call()", globals={"call": call}, num_threads=threads)
            m = timer.blocked_autorange(min_run_time=share * self.budget_s)
            times = list(m.times)
            while len(times) < math.ceil(self.min_n * share):  # blocks of the same size, up to min_n samples
                times.append(timer.timeit(m.number_per_run).times[0])
            return times, times
        timer = benchmark.Timer(stmt="call()", setup="prep()", globals={"call": call, "prep": prep},
                                num_threads=threads)
        # timeit() runs two warm-up calls (after setup) before the timed one; prep() runs before each.
        times = [timer.timeit(1).times[0] for _ in range(self.calls_for(3 * est_s, share))]
        prep()
        return times, times


# Each busy process reports that it runs (so timing starts under load, not while they start), then spins in
# pure Python until killed, or until its parent is gone (a killed benchmark must not leave spinners behind).
_SPIN = ("import os, sys\nparent = os.getppid()\nsys.stdout.write('up\\n'); sys.stdout.flush()\n"
         "while os.getppid() == parent:\n    for _ in range(100000): pass\n")


@contextlib.contextmanager
def busy_cores(n=None):
    """n processes (default one per core) spinning for the duration of the block: the contention of data-loader
    workers, other ranks on the node, or a shared machine. Killed on the way out, whatever happens."""
    procs = []
    try:
        for _ in range(n or os.cpu_count() or 1):
            procs.append(subprocess.Popen([sys.executable, "-I", "-S", "-c", _SPIN], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE))
        for p in procs:
            p.stdout.readline()
        yield len(procs)
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
            p.stdout.close()


@contextlib.contextmanager
def quiet_stderr():
    """Silences the profiler's C++ log lines (written straight to file descriptor 2) for the block."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def count_launches(fn, wl, device):
    """One call under the profiler. On a GPU: the kernels, copies and memsets it ran on the device. On the
    CPU: the top-level operators it called (what a launch is there; a torch.compile'd region counts as one)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with quiet_stderr(), profile(activities=acts) as prof:
        fn(wl.lists[0])
        sync(device)
    if wl.clipping:
        wl.restore(0)
    events = prof.events()
    if device.type == "cuda":
        dev = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        if dev:
            return len(dev)
        launches = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC",
                    "cudaLaunchCooperativeKernel", "cudaMemcpyAsync", "cudaMemsetAsync")
        return sum(1 for e in events if e.name in launches)
    # a compiled region is one call into generated code: it counts as one
    return sum(1 for e in events if e.cpu_parent is None and ("::" in e.name or e.name.startswith("Torch-Compiled")))
