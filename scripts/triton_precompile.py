#!/usr/bin/env python3
"""Compiles the Triton kernel variants a GPU check run launches into Triton's on-disk cache, in parallel worker
processes, without launching anything (scripts/gpu_check.sh starts it in the background right after the build,
on the cores the GPU steps leave idle). Each variant costs 1-18 s to compile; compiled here, the smoke, check,
bench and test steps that launch it later load it from the cache in milliseconds instead of spending their
time limits compiling (the Triton check's first section used to be killed while compiling ~24 variants).

  python scripts/triton_precompile.py [--jobs N] [--device cuda] [--list]

The variants are recorded from the public launchers themselves (tools/triton_static.py record_launches: the
launch is replaced by a recorder), for every dtype set, norm type, clip or not, extras (per-tensor norms, AMP)
and launch variant the checks use, ZClip and AGC included; deduplicated by Triton's own specialization key and
compiled with the compile options the launchers try (kernel.warmup: the cache key of a real launch). Worker k of
N compiles the variants k, k + N, ... of the same ordered list. One line per variant; failures are reported and
do not stop the others (a variant that fails here fails again, with its error, where the checks launch it).
"""
import argparse
import math
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

DTYPE_SETS = {"fp32": ["float32"], "fp16": ["float16"], "bf16": ["bfloat16"],
              "mixed": ["float32", "bfloat16", "float16"], "mixed64": ["float32", "float64"]}
NORMS = (2.0, math.inf, -math.inf, 1.0, 3.0)


def calls(device):
    """[(name, call)]: the public Triton calls whose launches a check run makes."""
    import torch
    from fusedclip.backends.triton import agc as ta
    from fusedclip.backends.triton import clip as tclip
    from fusedclip.backends.triton import zclip as tz

    def grads(names, seed=0):
        g = torch.Generator(device=device).manual_seed(seed)
        dtypes = [getattr(torch, n) for n in names]
        return [torch.randn(n, generator=g, device=device).to(dtypes[i % len(dtypes)])
                for i, n in enumerate((40000, 3000, 70, 16390))]

    out = []
    for launch in ("one", "two"):
        for set_name, names in DTYPE_SETS.items():
            for p in NORMS:
                for max_norm in (1e-3, 1e30):  # clipping and not
                    out.append((f"clip {launch} {set_name} p={p} max_norm={max_norm}",
                                lambda n=names, p=p, m=max_norm, l=launch: tclip.clip(grads(n), m, p, launch=l)))
            out.append((f"total_norm {launch} {set_name}",
                        lambda n=names, l=launch: tclip.total_norm(grads(n), 2.0, launch=l)))
        for p in (2.0, math.inf):
            mixed = DTYPE_SETS["mixed"]
            out.append((f"clip {launch} mixed p={p} AMP per-tensor", lambda p=p, l=launch: tclip.clip(
                grads(mixed), 1.0, p, per_tensor=torch.empty(4, device=device),
                inv_scale=torch.full((), 0.5, device=device), found_inf=torch.zeros((), device=device), launch=l)))
        for skip in (False, True):
            for set_name in ("fp32", "bf16"):
                config = [0.97, 2.5, 1.0, 1.0, 1e-6, 3.0, 0.0, 0.0, 1.0, 0.0, float(skip), float(skip)]
                out.append((f"zclip {launch} {set_name} skip={skip}", lambda n=DTYPE_SETS[set_name], c=config,
                            s=skip, l=launch: tz.zclip(grads(n), torch.zeros(tz.BUFFER + 3, dtype=torch.float64,
                                                                              device=device), c,
                                                       found_inf=torch.zeros((), device=device) if s else None,
                                                       launch=l)))
    for set_name in ("mixed", "mixed64"):
        out.append((f"scale {set_name}", lambda n=DTYPE_SETS[set_name]: tclip.scale(
            grads(n), 1.0, torch.full((), 10.0, device=device, dtype=torch.float64 if "64" in set_name
                                      else torch.float32))))
        out.append((f"clamp {set_name}", lambda n=DTYPE_SETS[set_name]: tclip.clamp(grads(n), 0.5)))
    for p in (2.0, math.inf, 1.0, 3.0):
        for names in (["float32", "bfloat16"], ["float64"]):
            out.append((f"agc p={p} {'+'.join(names)}", lambda n=names, p=p: ta.agc(
                [w.clone() for w in grads(n, 1)], grads(n, 2), 0.01, 1e-3, p)))
    return out


def variants(device):
    """[(name, kernel, args, constexprs, options)], one per distinct specialization and compile options, in a
    fixed order."""
    import triton_static as ts
    from triton.backends.compiler import GPUTarget
    import torch
    cap = torch.cuda.get_device_capability(device) if device != "cpu" else (9, 0)
    target = GPUTarget("cuda", cap[0] * 10 + cap[1], 32)
    seen, out = set(), []
    for name, call in calls(device):
        try:
            launches = ts.record_launches(call)
        except Exception as e:  # the launcher refused: the checks will say so where they call it
            print(f"precompile: {name}: not recorded ({type(e).__name__}: {str(e)[:200]})", flush=True)
            continue
        for kernel, args, constexprs in launches:
            for rank, options in enumerate(ts.candidate_options(kernel, constexprs)):
                try:
                    key = (kernel.__name__, str(ts.specialization(kernel, args, constexprs, options, target)[1]),
                           str(sorted(options.items())), str(sorted((k, str(v)) for k, v in constexprs.items())))
                except Exception:  # an older Triton's binder: compile every recorded launch
                    key = (name, kernel.__name__, len(out))
                if key not in seen:
                    seen.add(key)
                    out.append((rank, len(out), (name, kernel, args, constexprs, options)))
    # the options a launcher tries first (and almost always keeps), for every variant, before any fallback
    return [v for _, _, v in sorted(out, key=lambda x: x[:2])]


def worker(k, jobs, device):
    todo = variants(device)[k::jobs]
    failed = 0
    for name, kernel, args, constexprs, options in todo:
        t = time.monotonic()
        try:
            kernel.warmup(*args, grid=(1,), **options, **constexprs)
            print(f"precompile [{k}]: {kernel.__name__} ({name}) {time.monotonic() - t:.1f} s", flush=True)
        except Exception as e:
            failed += 1
            print(f"precompile [{k}]: {kernel.__name__} ({name}) FAILED {type(e).__name__}: {str(e)[:300]}",
                  flush=True)
    return 1 if failed else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--list", action="store_true", help="print the variants, compile nothing")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        return worker(args.worker, args.jobs, args.device)
    if args.list:
        found = variants(args.device)
        for name, kernel, _, _, options in found:
            print(f"{kernel.__name__:22s} {name} {options}")
        print(f"precompile: {len(found)} variants")
        return 0
    start = time.monotonic()
    children = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(k), "--jobs",
                                  str(args.jobs), "--device", args.device], cwd=ROOT)
                for k in range(args.jobs)]

    def stop(signum, frame):  # gpu_check.sh stops this at the end of its run: the workers go too
        for c in children:
            c.kill()
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, stop)
    rcs = [c.wait() for c in children]
    print(f"precompile: {args.jobs} workers done in {time.monotonic() - start:.0f} s, "
          f"{sum(rc != 0 for rc in rcs)} with failures", flush=True)
    return 1 if any(rcs) else 0


if __name__ == "__main__":
    sys.exit(main())
