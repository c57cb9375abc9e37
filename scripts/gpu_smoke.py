#!/usr/bin/env python3
"""The smoke step of scripts/gpu_check.sh: the few things only a GPU can answer, first, in a couple of minutes.

  python scripts/gpu_smoke.py [--budget S] [--only PART,...]
  python scripts/gpu_smoke.py --device cpu --gib 0.01    this script's logic on a CPU (the parts that can run
                                                          there; CI does it, tests/test_gpu_check_script.py)

Independent parts, each printing one line `smoke <part>: PASS|FAIL|SKIP|NOT RUN|TIMEOUT ...` (one failing part
never stops the others):
  coop-graph         the native cooperative kernel on more chunks than co-resident blocks, captured in a CUDA
                     graph and replayed 3 times with new gradients copied in: bitwise equal to eager calls
  defect5            fp64 (then fp32) norm_type=2, then 1, 3 and inf, on more chunks than 2x the SM count: the
                     cooperative grid must be sized for each kernel instantiation, not per accumulation type
  bandwidth-fp32/-bf16  native clip_ on a 1 GiB set against a device-to-device copy timed in the same run,
                     clipping (read + write) and not (read only); the numbers are the report, the check is the norm
  triton-one-launch  the Triton one-launch kernel's first launch and a CUDA-graph capture, in a child process
                     with its own time limit (a grid barrier that never opens must not hang the run).
                     gpu_check.sh runs the rest with FUSEDCLIP_TRITON_LAUNCH=two unless this says PASS or SKIP.
Exit status: 0 if no part failed.
"""
import argparse
import faulthandler
import math
import os
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNK = 16384  # csrc/clip_math.h kChunkElems
GiB = 2**30
DEVICE = "cuda"  # --device cpu: a dry run of the parts that do not need CUDA
SET_BYTES = GiB  # --gib: the bandwidth sets' size


def grads_of(sizes, dtype, seed, scale=1.0):
    import torch
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return [(torch.randn(n, device=DEVICE, generator=g) * scale).to(dtype) for n in sizes]


def params_with(grads):
    import torch
    out = []
    for x in grads:
        p = torch.nn.Parameter(x.new_zeros(()).expand_as(x))  # clip_ reads only .grad: no memory for weights
        p.grad = x
        out.append(p)
    return out


def same_bits(a, b):
    import torch
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.detach().contiguous().reshape(-1).view(torch.uint8), b.detach().contiguous().reshape(-1).view(torch.uint8))


def ref_norm(grads, p):
    import torch
    return float(torch.linalg.vector_norm(torch.cat([x.double().reshape(-1) for x in grads]), p))


def sm_count():
    import torch
    if DEVICE == "cpu":
        return 2
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def sync():
    import torch
    if DEVICE == "cuda":
        torch.cuda.synchronize()


# ---- parts: each returns the rest of its line (raises on failure) ---------------------------------------------

def part_coop_graph():
    import torch
    import fusedclip
    # more chunks than the grid can hold at once (the persistent blocks loop), mixed dtypes, an odd tail
    n = 6 * sm_count() * CHUNK + 12345
    sizes = [n, 4096 * 1024, 333 * 77, 5]
    static = params_with(grads_of(sizes, torch.float32, 1) + grads_of([2048 * 512, 999], torch.bfloat16, 2))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (the table is cached on the device then)
        fusedclip.clip_(static, 1.0, backend="native")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        norm = fusedclip.clip_(static, 1.0, backend="native")
    for step in range(3):
        fresh = [g * (step + 2.0) for g in grads_of([p.numel() for p in static], torch.float32, 10 + step)]
        for p, f in zip(static, fresh):
            p.grad.copy_(f)
        eager = params_with([p.grad.clone() for p in static])
        ref = ref_norm([e.grad for e in eager], 2.0)
        graph.replay()
        eager_norm = fusedclip.clip_(eager, 1.0, backend="native")
        torch.cuda.synchronize()
        if not same_bits(norm, eager_norm):
            raise AssertionError(f"replay {step}: norm {norm.item()} != eager {eager_norm.item()}")
        if not all(same_bits(p.grad, e.grad) for p, e in zip(static, eager)):
            raise AssertionError(f"replay {step}: gradients differ from eager")
        if abs(eager_norm.item() - ref) > 1e-5 * ref:
            raise AssertionError(f"replay {step}: norm {eager_norm.item()} vs float64 {ref}")
    chunks = sum(-(-p.numel() // CHUNK) for p in static)
    return f"{chunks} chunks on {sm_count()} SMs, captured, 3 replays with new gradients bitwise equal to eager"


def part_defect5():
    import torch
    import fusedclip
    chunks = 2 * sm_count() + 37  # more chunks than 2 blocks per SM
    done = []
    for dtype in (torch.float64, torch.float32):
        base = grads_of([chunks * CHUNK - 3, 1000], dtype, 3)
        for p in (2.0, 1.0, 3.0, math.inf):  # L2 first: its kernel's occupancy was cached for all kinds
            ref = ref_norm(base, p)
            params = params_with([x.clone() for x in base])
            norm = fusedclip.clip_(params, 0.5 * ref, p, backend="native")
            total = fusedclip.get_total_norm([x.grad for x in params], p, backend="native")
            sync()
            tol = 1e-12 if dtype == torch.float64 else 1e-5  # the point here is the launch, not the last bit
            if abs(norm.item() - ref) > tol * ref:
                raise AssertionError(f"{dtype} p={p}: norm {norm.item()} vs float64 {ref}")
            if abs(total.item() - 0.5 * ref) > max(tol, 1e-5) * ref:
                raise AssertionError(f"{dtype} p={p}: norm after clipping {total.item()} vs {0.5 * ref}")
            done.append(f"{str(dtype)[6:]} p={p:g}")
    return f"{chunks} chunks: " + ", ".join(done) + " all launched and correct"


def _median_ms(fn, reps, before=None):
    import torch
    times = []
    for i in range(reps + 2):
        if before is not None:
            before()
        if DEVICE == "cuda":  # CUDA events: the GPU's time, not the host's
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ms = a.elapsed_time(b)
        else:
            t0 = time.perf_counter()
            fn()
            ms = 1e3 * (time.perf_counter() - t0)
        if i >= 2:  # two warm-ups
            times.append(ms)
    return sorted(times)[len(times) // 2]


def part_bandwidth(dtype_name):
    import torch
    import fusedclip
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    elems = SET_BYTES // torch.tensor([], dtype=dtype).element_size()
    # Transformer-like: 60 large matrices and 300 small vectors, 1 GiB in all (well beyond L2, so HBM)
    small = [4099] * 300
    big = (elems - sum(small)) // 60
    sizes = [big] * 60 + small
    grads = grads_of(sizes, dtype, 4)
    nbytes = sum(x.numel() for x in grads) * grads[0].element_size()
    pristine = [x.clone() for x in grads]
    params = params_with(grads)
    ref = math.sqrt(sum(float(torch.linalg.vector_norm(x.double())) ** 2 for x in pristine))
    # correctness first, so a fast no-op cannot pass
    norm = fusedclip.clip_(params, 0.5 * ref, backend="native").item()
    after = fusedclip.get_total_norm(grads, backend="native").item()
    tol = 2e-6 + (2.0**-8 if dtype == torch.bfloat16 else 0.0)
    if abs(norm - ref) > tol * ref or abs(after - 0.5 * ref) > (tol + 1e-5) * ref:
        raise AssertionError(f"norm {norm} vs float64 {ref}; after clipping {after} vs {0.5 * ref}")
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src), 10)
    del src, dst
    restore = lambda: torch._foreach_copy_(grads, pristine)  # noqa: E731 (untimed: before each clipping call)
    clip_ms = _median_ms(lambda: fusedclip.clip_(params, 0.5 * ref, backend="native"), 10, before=restore)
    noclip_ms = _median_ms(lambda: fusedclip.clip_(params, 1e30, backend="native"), 10)
    copy_bw = 2 * nbytes / copy_ms / 1e6  # GB/s: a copy reads and writes every byte
    clip_bw = 2 * nbytes / clip_ms / 1e6
    noclip_bw = nbytes / noclip_ms / 1e6
    return (f"{nbytes / GiB:.2f} GiB in {len(sizes)} tensors: copy {copy_bw:.0f} GB/s ({copy_ms:.3f} ms); "
            f"clip {clip_bw:.0f} GB/s ({clip_ms:.3f} ms, {100 * clip_bw / copy_bw:.0f}% of copy); "
            f"noclip {noclip_bw:.0f} GB/s ({noclip_ms:.3f} ms, {100 * noclip_bw / copy_bw:.0f}% of copy)")


def child_triton():
    """In its own process: the one-launch kernel's first launches, then a capture after a warm-up."""
    import torch
    from fusedclip import triton_backend as tb
    t0 = time.perf_counter()
    small = [torch.randn(1000, device="cuda")]
    tb.clip(small, 0.1, 2.0, launch="one")
    torch.cuda.synchronize()
    print(f"first launch (compile included) {time.perf_counter() - t0:.1f} s", flush=True)
    base = grads_of([4096 * 1024, 1024, 3000 * 77, 5, 0, 16385, 7], torch.float32, 5) + \
        grads_of([50257 * 64, 4099], torch.bfloat16, 6)
    one, two = [x.clone() for x in base], [x.clone() for x in base]
    n1, n2 = tb.clip(one, 1.0, 2.0, launch="one"), tb.clip(two, 1.0, 2.0, launch="two")
    torch.cuda.synchronize()
    assert same_bits(n1, n2) and all(same_bits(a, b) for a, b in zip(one, two)), "one launch != two launches"
    print("one launch == two launches bitwise", flush=True)
    static = [x.clone() for x in base]
    tb.clip(static, 1.0, 2.0, launch="one")  # warm-up, then capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        norm = tb.clip(static, 1.0, 2.0, launch="one")
    for step in range(2):
        for s, b in zip(static, base):
            s.copy_(b * (step + 3.0))
        eager = [s.clone() for s in static]
        graph.replay()
        en = tb.clip(eager, 1.0, 2.0, launch="one")
        torch.cuda.synchronize()
        assert same_bits(norm, en) and all(same_bits(a, b) for a, b in zip(static, eager)), f"replay {step} != eager"
    print(f"captured; 2 replays equal to eager; {time.perf_counter() - t0:.1f} s in all", flush=True)


def part_triton(limit):
    import fusedclip
    if "triton" not in fusedclip.available_backends("cuda"):
        return "SKIP", "the triton backend is not available for cuda here"
    if limit < 10:
        return "NOT RUN", f"only {limit:.0f} s left"
    start = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child-triton"], cwd=ROOT,
                             capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as e:
        tail = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return "TIMEOUT", f"no result within {limit:.0f} s (grid barrier never opened?); got: {tail.strip()[-300:]!r}"
    sys.stderr.write(out.stderr[-3000:])
    said = "; ".join(line for line in out.stdout.splitlines() if line.strip())
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return "FAIL", f"rc={out.returncode} after {time.perf_counter() - start:.0f} s: {last[:300]} ({said})"
    return "PASS", said


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=150.0, help="seconds for all parts (gpu_check.sh: its limit)")
    ap.add_argument("--only", default=None, help="comma-separated parts")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--gib", type=float, default=1.0, help="size of each bandwidth set (default 1 GiB)")
    ap.add_argument("--child-triton", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    if args.child_triton:
        child_triton()
        return 0
    global DEVICE, SET_BYTES
    DEVICE, SET_BYTES = args.device, int(args.gib * GiB)
    end = time.monotonic() + args.budget - 3  # leave a moment to print before the step's own limit
    faulthandler.dump_traceback_later(max(5.0, args.budget - 8), exit=False)  # a hang shows where it hung
    import torch
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("smoke: NOT RUN: no CUDA GPU visible")
        return 2
    cuda_only = {"coop-graph", "triton-one-launch"}
    parts = [("coop-graph", part_coop_graph), ("defect5", part_defect5),
             ("bandwidth-fp32", lambda: part_bandwidth("fp32")), ("bandwidth-bf16", lambda: part_bandwidth("bf16")),
             ("triton-one-launch", None)]
    only = set(args.only.split(",")) if args.only else None
    failed = 0
    for name, fn in parts:
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            if DEVICE == "cpu" and name in cuda_only:
                status, msg = "SKIP", "needs CUDA"
            elif fn is None:  # the Triton child gets what is left, at most 60 s
                status, msg = part_triton(min(60.0, end - time.monotonic()))
            elif end - time.monotonic() < 5:
                status, msg = "NOT RUN", "no time left"
            else:
                status, msg = "PASS", fn()
                sync()  # an asynchronous error belongs to this part
        except Exception as e:  # one line per part, whatever happens; the traceback goes to stderr
            traceback.print_exc()
            status, msg = "FAIL", f"{type(e).__name__}: {str(e).strip()[:400]}"
        failed += status in ("FAIL", "TIMEOUT")
        print(f"smoke {name}: {status} {msg} [{time.perf_counter() - t0:.1f} s]", flush=True)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
