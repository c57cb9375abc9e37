"""DTensor rows (--dtensor): the host cost of clipping N DTensor gradients, FSDP2-style (each a Shard(0) DTensor on
a 1-D mesh), on `world` Gloo ranks on the CPU: torch.nn.utils.clip_grad_norm_ against fusedclip.clip_, and
fusedclip.clip_ on the same local shards as plain tensors with process_group= (the floor: what a call costs with
no DTensor in it).

torch is timed up to TORCH_MAX_N DTensors, in steady state (after one warm-up call, as every row): its first call
on N new DTensor specs is superlinear in N (measured here: 1.3 s at 200, 92 s at 4,000; pytorch #169445; ~15 min
expected at 20,000), so past that its row is left out and its time is estimated as its steady-state time per tensor
at the largest N it ran times N (marked "est."; its time per tensor does not fall with N: 19.9 us at 1,000, 21.4 us
at 4,000 in the 2026-12-02 run, so the estimate does not flatter fusedclip).

The gradients are small (SHAPE, 64 local elements a rank at 2 ranks), so a call is almost all host time: Python,
dispatch and the one collective; the row reports the median time per call over `reps` calls and that divided by N
(the host time per tensor). Every rank times the same calls in the same order (the collectives keep them in step);
rank 0's numbers are reported. The gradients are clipped on every call (max_norm below their norm), so every call
writes them, as in training.

    python -m fusedclip bench --dtensor                    # N = 200, 1000, 4000, 20000 on 2 ranks
    python -m fusedclip bench --dtensor 1000,20000 --dtensor-world 4
"""
import datetime
import functools
import json
import math
import os
import statistics
import sys
import time

import torch

from fusedclip.bench.report import write_side_report

DEFAULT_NS = [200, 1000, 4000, 20000]
SHAPE = (16, 8)  # the unsharded gradient of each parameter
MAX_NORM = 1e-3  # below the gradients' norm: every call clips
ROWS = ("torch", "fusedclip", "plain+group")
TORCH_MAX_N = 4000
# the targets of issue 24 (on 2 ranks, this CPU): host time per DTensor, the 20k-DTensor call, the speedup
TARGET_US_PER_TENSOR = 0.5
TARGET_MS_20K = 10.0
TARGET_SPEEDUP = 5.0


def _params(n, mesh, world, rank):
    """n Parameters holding Shard(0) DTensors (built from their local shards: no communication) with gradients.
    The local shards are views into one flat buffer per rank, as FSDP2's are (its reduce-scatter output)."""
    from torch.distributed.tensor import DTensor, Shard

    rows = -(-SHAPE[0] // world)
    local_rows = max(0, min(rows, SHAPE[0] - rank * rows))
    k = local_rows * SHAPE[1]
    g = torch.Generator().manual_seed(rank)
    weights, grads = torch.zeros(n * k), torch.randn(n * k, generator=g)
    params = []
    for i in range(n):
        def dt(flat):
            return DTensor.from_local(flat[i * k:(i + 1) * k].view(local_rows, SHAPE[1]), mesh, [Shard(0)],
                                      run_check=False, shape=torch.Size(SHAPE), stride=(SHAPE[1], 1))
        p = torch.nn.Parameter(dt(weights))
        p.grad = dt(grads)
        params.append(p)
    return params


def _plain_like(params):
    """Plain parameters whose gradients are copies of the DTensors' local shards, views into one flat buffer."""
    locals_ = [p.grad.to_local() for p in params]
    flat = torch.cat([t.reshape(-1) for t in locals_]) if locals_ else torch.zeros(0)
    out, at = [], 0
    for t in locals_:
        q = torch.nn.Parameter(torch.zeros_like(t))
        q.grad = flat[at:at + t.numel()].view(t.shape)
        at += t.numel()
        out.append(q)
    return out


def _max_rss_kb():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _time(fn, reps, group):
    """(median wall time, the times, how much the process's peak resident memory grew over the timed calls in
    KiB: 0 when a call allocates nothing that outlives it and nothing gradient-sized)."""
    import torch.distributed as dist

    fn()  # warm: caches, first-call imports (torch's first call on new DTensor specs is its slow one)
    rss = _max_rss_kb()
    times = []
    for _ in range(reps):
        dist.barrier(group)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, _max_rss_kb() - rss


def _rank(ns, reps, torch_max, rank, world, port, out_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import fusedclip
    from fusedclip import _core

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    mesh = init_device_mesh("cpu", (world,))
    group = dist.group.WORLD
    out = []
    for n in ns:
        t0 = time.perf_counter()
        params = _params(n, mesh, world, rank)
        if rank == 0:
            print(f"  N={n}: made in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        plain = _plain_like(params)
        calls = {
            "torch": lambda: _core.torch_clip_grad_norm_(params, MAX_NORM),
            "fusedclip": lambda: fusedclip.clip_(params, MAX_NORM),
            "plain+group": lambda: fusedclip.clip_(plain, MAX_NORM, process_group=group),
        }
        r = max(41, min(reps, int(reps * 1000 / n)))  # fewer calls for the long lists, never under 41: the median of
        # a 2-rank call on 2 shared cores moves by tens of percent between runs at 15
        row = {"n": n, "world": world, "reps": r}
        for name in ROWS:
            if name == "torch" and n > torch_max:
                continue
            med, times, rss = _time(calls[name], r, group)
            row[name] = {"median_s": med, "min_s": min(times), "us_per_tensor": med / n * 1e6,
                         "peak_rss_growth_kib": rss}
            if rank == 0:
                print(f"  N={n} {name}: {med * 1e3:.2f} ms", file=sys.stderr, flush=True)
        out.append(row)
        del params, plain
    if rank == 0:
        with open(os.path.join(out_dir, "dtensor.json"), "w") as f:
            json.dump(out, f)
    dist.destroy_process_group()


def _worker(ns, reps, torch_max, rank, world, port, out_dir):
    _rank(ns, reps, torch_max, rank, world, port, out_dir)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:  # what run_ranks reads back
        json.dump({"done": True}, f)


def measure(ns=DEFAULT_NS, world=2, reps=60, timeout=900, torch_max=TORCH_MAX_N):
    """Spawns `world` Gloo ranks and times the rows; returns a list of {n, world, reps, torch, fusedclip,
    plain+group}, each row {median_s, min_s, us_per_tensor}."""
    import tempfile

    from fusedclip.testing import free_port
    import torch.multiprocessing as mp

    out_dir = tempfile.mkdtemp(prefix="fusedclip_dtensor_")
    ctx = mp.start_processes(functools.partial(_worker, list(ns), reps, torch_max), args=(world, free_port(), out_dir),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the --dtensor run did not finish in {timeout} s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
    with open(os.path.join(out_dir, "dtensor.json")) as f:
        return json.load(f)


def _torch_s(rows, r):
    """(torch's time for row r, whether estimated): measured, or its time per tensor at the largest N it ran."""
    if "torch" in r:
        return r["torch"]["median_s"], False
    ran = [x for x in rows if "torch" in x]
    if not ran:
        return math.nan, True
    last = max(ran, key=lambda x: x["n"])
    return last["torch"]["us_per_tensor"] * 1e-6 * r["n"], True


def checks(rows):
    """The targets against the measured rows: a list of (what, ok)."""
    out = []
    if len(rows) > 1:
        # the host time each further DTensor costs: the slope between the smallest and the largest N (a call's
        # fixed part, the collective and ~0.5 ms of Python, is not a per-DTensor cost; every row's time divided by
        # its N is in the table, and the largest N's average is checked below with its time per call)
        lo, hi = min(rows, key=lambda x: x["n"]), max(rows, key=lambda x: x["n"])
        slope = (hi["fusedclip"]["median_s"] - lo["fusedclip"]["median_s"]) / (hi["n"] - lo["n"]) * 1e6
        out.append((f"N={lo['n']}..{hi['n']}: {slope:.3f} us per further DTensor (<= {TARGET_US_PER_TENSOR})",
                    slope <= TARGET_US_PER_TENSOR))
    for r in rows:
        f = r["fusedclip"]
        t_s, est = _torch_s(rows, r)
        speedup = t_s / f["median_s"]
        if r["n"] < 4000:
            continue  # a call's fixed part dominates
        out.append((f"N={r['n']}: {f['us_per_tensor']:.2f} us per DTensor on average (<= {TARGET_US_PER_TENSOR})",
                    f["us_per_tensor"] <= TARGET_US_PER_TENSOR))
        if r["n"] >= 20000 and r["world"] == 2:
            out.append((f"N={r['n']}: {f['median_s'] * 1e3:.2f} ms per call (<= {TARGET_MS_20K} ms)",
                        f["median_s"] * 1e3 <= TARGET_MS_20K))
            out.append((f"N={r['n']}: {speedup:.1f}x torch{' (est.)' if est else ''} (>= {TARGET_SPEEDUP}x)",
                        speedup >= TARGET_SPEEDUP))
    return out


def table(rows):
    lines = ["| N DTensors | ranks | torch ms | fusedclip ms | plain+group ms | fusedclip us/tensor | "
             "plain us/tensor | speedup vs torch |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        f, q = r["fusedclip"], r["plain+group"]
        t_s, est = _torch_s(rows, r)
        torch_ms = f"{t_s * 1e3:.2f}" + (" est." if est else "")
        lines.append(f"| {r['n']:,} | {r['world']} | {torch_ms} | {f['median_s'] * 1e3:.2f} | "
                     f"{q['median_s'] * 1e3:.2f} | {f['us_per_tensor']:.2f} | {q['us_per_tensor']:.2f} | "
                     f"{t_s / f['median_s']:.1f}x{' est.' if est else ''} |")
    return "\n".join(lines)


def main(ns, world, out, tag="", reps=60):
    """`python -m fusedclip bench --dtensor`: runs the rows, prints the table and the targets, writes
    out/dtensor{tag}.json and .md with the machine; returns 0 when every target holds, else 1."""
    from .machine import environment

    meta = environment(torch.device("cpu"))
    try:
        meta["load_average"] = os.getloadavg()  # the machine's load when the run started: timings scale with it
    except OSError:
        pass
    rows = measure(ns, world, reps)
    try:
        meta["load_average_after"] = os.getloadavg()
    except OSError:
        pass
    results = checks(rows)
    load = meta.get("load_average")
    after = meta.get("load_average_after")
    about = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; processor: {meta.get('device_name')}; "
             f"load average (1, 5, 15 min) at the start {tuple(round(x, 2) for x in load) if load else '?'}, "
             f"at the end {tuple(round(x, 2) for x in after) if after else '?'}; peak RSS growth over fusedclip's "
             f"timed calls (KiB, rank 0): " + ", ".join(f"N={r['n']}: {r['fusedclip'].get('peak_rss_growth_kib')}"
                                                          for r in rows))
    text = "\n".join([f"# DTensor rows: {world} Gloo ranks, {meta.get('device_name')}, torch {meta.get('torch')}",
                      "", about, "", table(rows), ""]
                     + [("- ok: " if ok else "- MISSED: ") + what for what, ok in results])
    print(text)
    write_side_report(out, meta, rows, results, text, "dtensor", tag)
    return 0 if all(ok for _, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main([int(x) for x in sys.argv[1].split(",")] if len(sys.argv) > 1 else DEFAULT_NS, 2,
                  os.path.join("bench", "results", "local")))
