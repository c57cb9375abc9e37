"""The command line: flags -> run.Config -> run -> reports."""
import argparse
import contextlib
import os
import sys
import time

import torch

from .agc import AGC_DEFAULT_SETS
from .dtensor_rows import DEFAULT_NS as DTENSOR_NS
from .extras import EXTRAS_DEFAULT_SETS
from .providers import PROVIDERS
from .report import terminal, write_outputs
from .run import PARTIAL, Config, run
from .sets import (DEFAULT_COMPILE_SETS, DEFAULT_SETS, QUICK_SETS, SCALING, SCALING_TENSORS_ELEMENTS, SETS, numel,
                   specs_bytes)
from .workload import REGIMES
from .zclip_rows import ZCLIP_DEFAULT_SETS, ZCLIP_VERSION

# git-ignored: a run leaves the checkout clean; `--out bench/results` keeps one to commit
DEFAULT_OUT = os.path.join("bench", "results", "local")
DEFAULT_REGIMES = {"cpu": REGIMES, "cuda": ["clip", "noclip"]}


def _csv(text, known, what):
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in known]
    if bad:
        raise SystemExit(f"fusedclip bench: unknown {what} {bad}; choose from {sorted(known)}")
    return items


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m fusedclip bench",
                                 description="fusedclip against torch (and apex) on the gradient sets people "
                                             "train; see bench/README.md")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when a GPU is visible)")
    ap.add_argument("--sets", default=None,
                    help="comma-separated, or 'all' (default: every set on a GPU, a CPU-sized subset on the CPU). "
                         f"Sets: {', '.join(SETS)}")
    ap.add_argument("--providers", default=None,
                    help=f"comma-separated (default: all; 'none' for only the --extras or --zclip rows). "
                         f"{', '.join(PROVIDERS)}")
    ap.add_argument("--regimes", default=None,
                    help=f"comma-separated from {', '.join(REGIMES)} (default: all on the CPU, clip,noclip on a GPU)")
    ap.add_argument("--busy-procs", type=int, default=0,
                    help="busy processes in the -busy regimes (default: one per core)")
    ap.add_argument("--floor", action=argparse.BooleanOptionalAction, default=None,
                    help="time each set's memory floor (default: on the CPU)")
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help=f"output folder (default {DEFAULT_OUT}, git-ignored; bench/results to keep a run)")
    ap.add_argument("--tag", default="", help="suffix for the output file names")
    ap.add_argument("--targets", default="",
                    help="a Python file whose targets(rows, scaling, device, cache_bytes) judges the run against "
                         "goals, into the JSON (the repository's bench/targets.py: the issues' targets; make bench "
                         "passes it)")
    ap.add_argument("--quick", action="store_true", help="fewer sets, short timings, small scaling curves")
    ap.add_argument("--time", type=float, default=None, help="seconds of timing per measurement")
    ap.add_argument("--compile-sets", default=None,
                    help="sets on which torch.compile runs ('all', or comma-separated; CPU default gpt2-small)")
    ap.add_argument("--scaling", default="tensors,elements", help="curves to run: tensors, elements, none")
    ap.add_argument("--scaling-regime", default="clip", choices=["clip", "noclip"])
    ap.add_argument("--tensors-points", default=None, help="tensor counts of the tensors curve (comma-separated)")
    ap.add_argument("--tensors-elements", type=float, default=SCALING_TENSORS_ELEMENTS,
                    help="elements shared by the tensors of the tensors curve (default 4M)")
    ap.add_argument("--elements-points", default=None, help="element counts of the elements curve")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--mem-fraction", type=float, default=None,
                    help="fraction of free memory the sets may use (GPU 0.85, CPU 0.5)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved timing rounds per set and regime (default 3, quick 2)")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="soft time limit: sets and scaling points that start after it are skipped, torch.compile "
                         "after half of it (GPU default 7, CPU none)")
    ap.add_argument("--extras", nargs="?", const="auto", default=None,
                    help="also time AMP (unscale_clip_) and optimizer (clip_into_ + fused AdamW step) rows against "
                         "the unfused sequences, on the listed sets (comma-separated, or 'all'; bare --extras: "
                         f"{' and '.join(EXTRAS_DEFAULT_SETS)} when run, else every set of the run). Off by default")
    ap.add_argument("--zclip", nargs="?", const="auto", default=None,
                    help=f"also time fusedclip.ZClip.step against zclip {ZCLIP_VERSION}'s ZClip.step and plain "
                         "fusedclip.clip_ (clip and noclip regimes, past the warm-up), on the listed sets (comma-"
                         f"separated, or 'all'; bare --zclip: {', '.join(ZCLIP_DEFAULT_SETS)} when run, else "
                         "every set of the run). Off by default")
    ap.add_argument("--agc", nargs="?", const="auto", default=None,
                    help="adaptive gradient clipping rows, fusedclip.clip_agc_ against timm's adaptive_clip_grad, on "
                         f"the listed sets (comma-separated; bare --agc: {','.join(AGC_DEFAULT_SETS)}; 'none'). "
                         "Default: those two when --sets is not given, none when it is")
    ap.add_argument("--dtensor", nargs="?", const="default", default=None,
                    help="only the DTensor rows: N Shard(0) DTensor gradients on Gloo ranks on the CPU, torch vs "
                         "fusedclip, host time per tensor (comma-separated N; bare --dtensor: "
                         f"{','.join(str(n) for n in DTENSOR_NS)}); see bench/dtensor_rows.py")
    ap.add_argument("--step", nargs="?", const="all", default=None,
                    help="only the issue-26 rows: a CPU training step (forward, backward, clip, fused AdamW) with no "
                         "clipping, torch's clip, clip_, clip_into_ and ClipInBackward, and AdaGC against an unfused "
                         "torch AdaGC and clip_, for the models mlp, transformer, many-small (comma-separated; bare "
                         "--step: all); --quick: tiny models; see bench/adagc_rows.py")
    ap.add_argument("--dtensor-world", type=int, default=2, help="ranks of the --dtensor rows (default 2)")
    ap.add_argument("--list", action="store_true", help="list the sets and providers and exit")
    return ap.parse_args(argv)


def make_config(ns):
    dev = ns.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("fusedclip bench: --device cuda but no CUDA GPU is visible")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise SystemExit(f"fusedclip bench: unsupported device {dev!r} (cpu or cuda)")
    dt = device.type
    if ns.sets in (None, "default"):
        sets = (QUICK_SETS if ns.quick else DEFAULT_SETS)[dt]
    elif ns.sets == "all":
        sets = [n for n, s in SETS.items() if not s.hidden]
    else:
        sets = _csv(ns.sets, SETS, "set")
    if ns.providers in (None, "all"):
        providers = list(PROVIDERS)
    elif ns.providers == "none":
        providers = []
    else:
        providers = _csv(ns.providers, PROVIDERS, "provider")
    regimes = list(DEFAULT_REGIMES[dt]) if ns.regimes is None else _csv(ns.regimes, REGIMES, "regime")
    if ns.compile_sets is None:
        compile_sets = DEFAULT_COMPILE_SETS[dt]
    elif ns.compile_sets == "all":
        compile_sets = None
    else:
        compile_sets = _csv(ns.compile_sets, SETS, "set")
    if ns.extras is None:
        extras = []
    elif ns.extras == "all":
        extras = list(sets)
    elif ns.extras == "auto":
        extras = [s for s in sets if s in EXTRAS_DEFAULT_SETS] or list(sets)
    else:
        extras = _csv(ns.extras, SETS, "set")
    if ns.zclip is None:
        zclip = []
    elif ns.zclip == "all":
        zclip = list(sets)
    elif ns.zclip == "auto":
        zclip = [s for s in sets if s in ZCLIP_DEFAULT_SETS] or list(sets)
    else:
        zclip = _csv(ns.zclip, SETS, "set")
    if ns.agc is None:
        agc = list(AGC_DEFAULT_SETS) if ns.sets in (None, "default") else []
    elif ns.agc == "none":
        agc = []
    elif ns.agc == "auto":
        agc = list(AGC_DEFAULT_SETS)
    else:
        agc = _csv(ns.agc, SETS, "set")
    scaling = [] if ns.scaling == "none" else _csv(ns.scaling, {"tensors", "elements"}, "scaling curve")
    points = dict(SCALING["quick" if ns.quick else dt])
    for curve, text in (("tensors", ns.tensors_points), ("elements", ns.elements_points)):
        if text:
            try:
                points[curve] = [int(float(x)) for x in text.split(",") if x.strip()]
            except ValueError:
                raise SystemExit(f"fusedclip bench: --{curve}-points takes integers, got {text!r}") from None
    if ns.quick:
        budget, min_n, max_n = ns.time or 0.05, 3, 50
    elif dt == "cuda":
        budget, min_n, max_n = ns.time or 0.25, 10, 2000
    else:
        budget, min_n, max_n = ns.time or 0.5, 5, 500
    return Config(device=device, sets=sets, providers=providers, regimes=regimes, out=ns.out, quick=ns.quick,
                  budget_s=budget, min_n=min_n, max_n=max_n, compile_sets=compile_sets, scaling=scaling,
                  scaling_points=points, scaling_regime=ns.scaling_regime,
                  tensors_elements=int(ns.tensors_elements), plot=not ns.no_plot, tag=ns.tag,
                  mem_fraction=ns.mem_fraction or (0.85 if dt == "cuda" else 0.5),
                  rounds=max(1, ns.rounds or (2 if ns.quick else 3)), extras=extras, zclip=zclip, agc=agc,
                  floor=dt == "cpu" if ns.floor is None else ns.floor, busy_procs=max(0, ns.busy_procs),
                  max_s=60 * (ns.max_minutes if ns.max_minutes is not None else (7 if dt == "cuda" else 0)),
                  targets=ns.targets)


def list_all():
    print("sets:")
    for s in SETS.values():
        specs = s.specs()
        print(f"  {s.name:<18} {len(specs):6,} tensors {sum(numel(x) for x, _ in specs) / 1e6:9.2f}M elements "
              f"{specs_bytes(specs) / 2**30:7.2f} GiB  {s.about}{' (hidden)' if s.hidden else ''}")
    print("providers:")
    for p in PROVIDERS.values():
        print(f"  {p.key:<12} {p.label}")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # the old spelling `python -m fusedclip bench -- --quick` still works
        argv = argv[1:]
    ns = parse(argv)
    if ns.list:
        list_all()
        return 0
    if ns.dtensor is not None:
        from . import dtensor_rows
        try:
            counts = DTENSOR_NS if ns.dtensor == "default" else [int(float(x)) for x in ns.dtensor.split(",")]
        except ValueError:
            raise SystemExit(f"fusedclip bench: --dtensor takes integers, got {ns.dtensor!r}") from None
        return dtensor_rows.main(counts, ns.dtensor_world, ns.out, ns.tag)
    if ns.step is not None:
        from . import adagc_rows
        models = adagc_rows.MODELS if ns.step == "all" else _csv(ns.step, set(adagc_rows.MODELS), "model")
        return adagc_rows.main(models, ns.out, ns.tag, size=0.02 if ns.quick else 1.0, batch=4 if ns.quick else 64,
                               rounds=ns.rounds or (2 if ns.quick else 25))
    cfg = make_config(ns)
    t0 = time.perf_counter()
    print(f"fusedclip bench on {cfg.device}: sets {', '.join(cfg.sets)}; providers {', '.join(cfg.providers)}; "
          f"regimes {', '.join(cfg.regimes)}; floor {'on' if cfg.floor else 'off'}; "
          f"scaling {', '.join(cfg.scaling) or 'none'}; agc rows {', '.join(cfg.agc) or 'none'}; results to {cfg.out}",
          flush=True)
    result = run(cfg)
    result["meta"]["wall_s"] = time.perf_counter() - t0
    terminal(result)
    paths = write_outputs(result, cfg)
    with contextlib.suppress(FileNotFoundError):  # the full results replace the ones written set by set
        os.remove(os.path.join(cfg.out, PARTIAL))
    print(f"\nwrote {', '.join(paths.values())} in {result['meta']['wall_s']:.0f} s")
    failed = [r for r in result["results"] if r.get("check")]
    for r in failed:
        print(f"CHECK FAILED: {r['set']} {r['regime']} {r['label']}: {r['check']}")
    return 1 if failed else 0
