"""The run: sets x regimes x providers (with the memory floor beside them), the extras, the two scaling
curves, the copy bandwidth; returns the result that report.py writes."""
import contextlib
import copy
import importlib.util
import os
import time
from dataclasses import dataclass, field

import torch

from . import agc
from . import extras as ex
from . import zclip_rows as zr
from .machine import environment, free_bytes
from .providers import BASELINE, FUSED, PROVIDERS, SCALING_SKIP
from .reference import FLOOR_LABEL, copy_bandwidth, floor_fn
from .report import Progress, status_line
from .sets import SETS, dtype_names, flat_specs, scaling_specs, specs_bytes
from .timing import Clock, busy_cores, count_launches, summarize
from .workload import MAX_NORM, CLIP_NORM, NOCLIP_NORM, Workload, check_call, clips, is_busy, rotations_within


@dataclass
class Config:
    device: torch.device
    sets: list
    providers: list
    regimes: list
    out: str
    quick: bool
    budget_s: float
    min_n: int
    max_n: int
    compile_sets: object
    scaling: list
    scaling_points: dict
    scaling_regime: str
    tensors_elements: int
    plot: bool
    tag: str
    mem_fraction: float
    rounds: int = 3  # interleaved rounds of timing per set and regime
    max_s: float = 0.0  # soft time limit (0: none): later sets and points are skipped past it
    extras: list = field(default_factory=list)  # sets that also get the AMP and optimizer rows (--extras)
    zclip: list = field(default_factory=list)  # sets that also get the ZClip rows (--zclip)
    agc: list = field(default_factory=list)  # sets of the AGC rows (--agc; agc.py)
    floor: bool = True  # time each set's memory floor beside its providers
    busy_procs: int = 0  # busy processes in the busy regimes (0: one per core)
    t0: float = field(default_factory=time.perf_counter)
    targets: str = ""  # a file with targets(rows, scaling, device, cache_bytes) (--targets; the repo's bench/targets.py)
    notes: list = field(default_factory=list)


def config_json(cfg):
    return {"device": str(cfg.device), "sets": cfg.sets, "providers": cfg.providers, "regimes": cfg.regimes,
            "quick": cfg.quick, "budget_s": cfg.budget_s, "min_n": cfg.min_n, "max_n": cfg.max_n,
            "compile_sets": cfg.compile_sets, "scaling": cfg.scaling, "scaling_points": cfg.scaling_points,
            "max_s": cfg.max_s, "rounds": cfg.rounds, "extras": cfg.extras, "zclip": cfg.zclip, "agc": cfg.agc,
            "scaling_regime": cfg.scaling_regime,
            "tensors_elements": cfg.tensors_elements, "floor": cfg.floor, "busy_procs": cfg.busy_procs,
            "max_norm": MAX_NORM, "clip_norm": CLIP_NORM, "noclip_norm": NOCLIP_NORM}


def runs_in(providers, regime, compile_ok=True):
    """The providers timed in a regime: torch.compile only where it may compile; the busy regimes only the
    providers marked busy (torch and fusedclip)."""
    return [p for p in providers if (compile_ok or not p.compiles) and (p.busy or not is_busy(regime))]


def fit_set(pset, device, mem_fraction):
    """The set's specs, sized down to fewer layers when a copy to rotate plus the pristine copy do not fit.
    Returns (specs, label, note) or (None, label, why) when it cannot fit at all."""
    budget = mem_fraction * free_bytes(device)
    specs = pset.specs()
    need = 2 * specs_bytes(specs)  # one list and the pristine copy, at least
    if need <= budget:
        return specs, pset.name, ""
    if pset.layers:
        for n in range(pset.layers - 1, 0, -1):
            specs = pset.specs(n)
            if 2 * specs_bytes(specs) <= budget:
                label = f"{pset.name}[{n}/{pset.layers} layers]"
                return specs, label, f"{pset.name} sized down to {n} of {pset.layers} layers to fit memory"
    return None, pset.name, f"{pset.name} skipped: needs {need / 2**30:.1f} GiB, {budget / 2**30:.1f} GiB usable"


class _Entry:
    """One row being measured: its function, its workload, the estimate of one call, the samples so far."""

    def __init__(self, row, wl):
        self.row, self.wl, self.fn, self.est, self.times, self.hosts = row, wl, None, 0.0, [], []

    def fail(self, e):  # a provider failing must not lose the others' results
        self.wl.set_regime(self.wl.clipping)  # the failed call may have left some gradients clipped
        self.row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def measure_set(cfg, clock, specs, label, providers, progress, rows, compile_ok=True, kind="set", wl=None,
                baseline=BASELINE, floor=False):
    """Every provider on one set, in each regime; appends rows. Within a regime the providers (and with floor,
    the set's memory floor) are timed in interleaved rounds (cfg.rounds), so that a load that drifts during
    the run (a shared machine) biases none of them more than the others. A busy regime's rounds run inside
    busy_cores(), each call timed on its own."""
    device = cfg.device
    nbytes = specs_bytes(specs)
    if wl is None:
        if kind == "set":
            progress.note(f"{label}: making the gradients ({len(specs):,} tensors, {nbytes / 1e6:.0f} MB)")
        wl = Workload(specs, device, max(1, rotations_within(nbytes, device, cfg.mem_fraction)))
    rot = len(wl.lists)
    floor_wl = None
    if floor:
        if (rot + 1) * nbytes <= cfg.mem_fraction * free_bytes(device):
            floor_wl = Workload(flat_specs(specs), device, rot)
        else:
            cfg.notes.append(f"memory floor of {label} not measured: does not fit memory beside the set")
            for _ in (r for r in cfg.regimes if not is_busy(r)):
                progress.step(f"{label}: memory floor skipped (memory)")
    fns, compiled = {}, set()
    try:
        for regime in cfg.regimes:
            busy = is_busy(regime)
            wl.set_regime(clips(regime))
            entries = []
            for prov in runs_in(providers, regime, compile_ok):
                row = {"kind": kind, "set": label, "regime": regime, "provider": prov.key, "label": prov.label,
                       "tensors": len(specs), "elements": wl.numel, "bytes": nbytes, "rotations": rot,
                       "bytes_moved": (2 if clips(regime) else 1) * nbytes}
                if prov.bytes_moved:
                    row.update(prov.bytes_moved(nbytes))
                e = _Entry(row, wl)
                entries.append(e)
                try:
                    if prov.key not in fns:
                        fns[prov.key] = prov.make(device)
                    fn = fns[prov.key]
                    if prov.compiles and prov.key not in compiled:  # the first call compiles
                        progress.note(f"{label}: {prov.label} compiling (cold; ~30 s for 148 tensors on 2 cores)")
                    first = clock.warmup(fn, wl, 1)[0]
                    if prov.compiles and prov.key not in compiled:
                        compiled.add(prov.key)
                        rows.append({"kind": kind, "set": label, "regime": "compile_s", "provider": prov.key,
                                     "label": prov.label + " (compile)", "tensors": len(specs),
                                     "elements": wl.numel, "bytes": nbytes, "compile_s": first})
                    row["check"] = (prov.check or check_call)(fn, wl)
                    e.fn, e.est = fn, min(first, clock.warmup(fn, wl, 1)[0])
                except Exception as err:  # noqa: BLE001
                    e.fail(err)
            if floor_wl is not None and not busy:
                floor_wl.set_regime(clips(regime))
                e = _Entry({"kind": "floor", "set": label, "regime": regime, "provider": "floor",
                            "label": FLOOR_LABEL[clips(regime)], "tensors": len(floor_wl.specs),
                            "elements": floor_wl.numel, "bytes": nbytes, "rotations": rot,
                            "dtype": dtype_names(specs), "bytes_moved": (2 if clips(regime) else 1) * nbytes},
                           floor_wl)
                e.fn = floor_fn(clips(regime))
                e.est = min(clock.warmup(e.fn, floor_wl, 2))
                entries.append(e)
            timer = clock.busy() if busy else clock
            with busy_cores(cfg.busy_procs) if busy else contextlib.nullcontext():
                for _ in range(cfg.rounds):
                    for e in entries:
                        if "error" in e.row:
                            continue
                        try:
                            t, h = timer.measure(e.fn, e.wl, e.est, share=1.0 / cfg.rounds)
                            e.times += t
                            e.hosts += h
                        except Exception as err:  # noqa: BLE001
                            e.fail(err)
            for e in entries:
                row = e.row
                if "error" not in row:
                    row.update(summarize(e.times, e.hosts))
                    row["launches"] = None  # the busy and floor rows' launches are those of the plain rows
                    if kind != "scaling" and not busy and row["kind"] != "floor":
                        try:
                            row["launches"] = count_launches(e.fn, e.wl, device)
                        except Exception as err:  # noqa: BLE001
                            e.fail(err)
                rows.append(row)
                progress.step(status_line(row))
            relate(rows, label, regime, baseline, kind)
    finally:
        del wl, floor_wl, fns
        if device.type == "cuda":
            torch.cuda.empty_cache()


def relate(rows, label, regime, baseline, kind="set"):
    """Speedups against the baseline of the same set, regime and kind of row (of the median, the mean and the
    p90), and every row's time over the set's memory floor. The kind keeps the ZClip rows (regimes clip and
    noclip too, their own baseline) from relating the plain rows to zclip, and the other way round."""
    same = [r for r in rows if r["set"] == label and r.get("regime") == regime and "median_s" in r]
    floor = next((r for r in same if r.get("kind") == "floor"), None)
    same = [r for r in same if r.get("kind") == kind or (r is floor and kind == "set")]
    base = next((r for r in same if r["provider"] == baseline), None)
    for r in same:
        if base:
            r["speedup"] = base["median_s"] / r["median_s"]
            r["mean_speedup"] = base["mean_s"] / r["mean_s"]
            r["p90_speedup"] = base["p90_s"] / r["p90_s"]
        if floor and r is not floor:
            r["floor_s"] = floor["median_s"]
            r["floor_ratio"] = r["median_s"] / floor["median_s"]


def add_bandwidth(rows, copy_bps):
    for r in rows:
        if "median_s" in r and r.get("bytes_moved"):
            r["bytes_per_s"] = r["bytes_moved"] / r["median_s"]
            r["pct_copy"] = 100.0 * r["bytes_per_s"] / copy_bps


def per_tensor_cost(points):
    """Least-squares slope of median time against tensor count: seconds per tensor."""
    xs = [p["tensors"] for p in points]
    ys = [p["median_s"] for p in points]
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else None


def measure_extras(cfg, clock, specs, label, progress, rows):
    """The AMP and optimizer rows of one set (regimes "amp" and "optim", speedups against the torch
    sequence). The optimizer's per-list memory limits the rotations (on the CPU usually 1 for large sets)."""
    device = cfg.device
    nbytes = specs_bytes(specs)
    for regime, opts, make_providers, baseline, per_list in ex.EXTRAS:
        rot = rotations_within(nbytes, device, cfg.mem_fraction, per_list)
        if rot == 0:
            cfg.notes.append(f"{regime} rows of {label} skipped: do not fit memory")
            for _ in range(3):
                progress.step(f"{label} {regime}: skipped (memory)")
            continue
        wl = Workload(specs, device, rot, **opts)
        try:
            providers = make_providers(device, wl)
            measure_set(_with_regimes(cfg, [regime]), clock, specs, label, providers, progress, rows,
                        kind="extra", wl=wl, baseline=baseline)
        finally:
            del wl
            if device.type == "cuda":
                torch.cuda.empty_cache()


def zclip_regimes(cfg):
    """The regimes of the ZClip rows: the run's uncontended ones."""
    return [r for r in cfg.regimes if r in ("clip", "noclip")]


def measure_zclip(cfg, clock, specs, label, progress, rows):
    """The ZClip rows of one set: zclip's ZClip.step (the baseline of the speedups), fusedclip.ZClip.step and
    fusedclip.clip_, in each uncontended regime, with clippers made and warmed up afresh for each regime."""
    device = cfg.device
    nbytes = specs_bytes(specs)
    rot = rotations_within(nbytes, device, cfg.mem_fraction)
    regimes = zclip_regimes(cfg)
    if rot == 0:
        cfg.notes.append(f"zclip rows of {label} skipped: do not fit memory")
        for _ in range(3 * len(regimes)):
            progress.step(f"{label} zclip: skipped (memory)")
        return
    wl = Workload(specs, device, rot)
    try:
        for regime in regimes:
            providers = []
            for p in zr.zclip_providers(device, wl):
                ok, why = p.available(device)
                if ok:
                    providers.append(p)
                else:
                    progress.step(f"{label} {regime} {p.label}: not run ({why})")
                    note = f"zclip row {p.key} not run: {why}"
                    if note not in cfg.notes:
                        cfg.notes.append(note)
            measure_set(_with_regimes(cfg, [regime]), clock, specs, label, providers, progress, rows,
                        kind="zclip", wl=wl, baseline=zr.BASELINE)
            zr.relate_to_clip(rows, label, regime)
    finally:
        del wl
        if device.type == "cuda":
            torch.cuda.empty_cache()


def measure_agc(cfg, clock, specs, label, progress, rows, provs):
    """The AGC rows of one set (regime "agc", speedups against timm; agc.py)."""
    device = cfg.device
    rot = rotations_within(specs_bytes(specs), device, cfg.mem_fraction, agc.PER_LIST)
    if rot == 0:
        cfg.notes.append(f"agc rows of {label} skipped: do not fit memory")
        for _ in provs:
            progress.step(f"{label} agc: skipped (memory)")
        return
    progress.note(f"{label}: making weights and gradients for the agc rows")
    wl = agc.make_workload(specs, device, rot)
    try:
        measure_set(_with_regimes(cfg, [agc.REGIME]), clock, specs, label, provs, progress, rows, kind="agc",
                    wl=wl, baseline=agc.BASELINE)
    finally:
        del wl
        if device.type == "cuda":
            torch.cuda.empty_cache()


def over_time(cfg, fraction):
    return cfg.max_s > 0 and time.perf_counter() - cfg.t0 > fraction * cfg.max_s


def _with_regimes(cfg, regimes):
    c = copy.copy(cfg)
    c.regimes = regimes
    return c


PARTIAL = "partial.json"  # in cfg.out while a run is under way: what the sets finished so far measured


def write_partial(cfg, meta, copy_ref, rows):
    """The results so far, rewritten after every set (atomically: a run killed mid-write leaves the previous
    one), so a run killed before its end (a step limit on a GPU machine) keeps every set it finished. The CLI
    removes it once the full results are written."""
    if not cfg.out:
        return
    import json
    os.makedirs(cfg.out, exist_ok=True)
    path = os.path.join(cfg.out, PARTIAL)
    with open(path + ".tmp", "w") as f:
        json.dump({"partial": True, "meta": meta, "config": config_json(cfg), "copy": copy_ref, "results": rows,
                   "notes": cfg.notes}, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def run(cfg):
    device = cfg.device
    clock = Clock(device, cfg.budget_s, cfg.min_n, cfg.max_n)
    providers = []
    for key in cfg.providers:
        ok, why = PROVIDERS[key].available(device)
        if ok:
            providers.append(PROVIDERS[key])
        else:
            cfg.notes.append(f"provider {key} not run: {why}")
    plan = []
    for name in cfg.sets:
        specs, label, note = fit_set(SETS[name], device, cfg.mem_fraction)
        if note:
            cfg.notes.append(note)
        if specs is not None:
            plan.append((name, specs, label))
    for what, asked in (("--extras", cfg.extras), ("--zclip", cfg.zclip)):
        left = [n for n in asked if n not in cfg.sets]
        if left:
            cfg.notes.append(f"{what} rows not run on {', '.join(left)}: not in the run's sets (--sets)")
    compile_sets = cfg.compile_sets
    if any(p.compiles for p in providers) and compile_sets is not None:
        left = [name for name, _, _ in plan if name not in compile_sets]
        if left:
            cfg.notes.append(f"torch.compile not run on {', '.join(left)} (compile time grows with the tensor "
                             f"count; --compile-sets {','.join(left)} or all to include)")
    scal_prov = [p for p in providers if p.key not in SCALING_SKIP]
    floors = sum(1 for r in cfg.regimes if not is_busy(r)) if cfg.floor and providers else 0
    total = sum(floors + sum(len(runs_in(providers, r, compile_sets is None or n in compile_sets))
                             for r in cfg.regimes) for n, _, _ in plan)
    total += len(scal_prov) * sum(len(cfg.scaling_points[c]) for c in cfg.scaling)
    total += 3 * len(ex.EXTRAS) * sum(1 for n, _, _ in plan if n in cfg.extras)
    total += 3 * len(zclip_regimes(cfg)) * sum(1 for n, _, _ in plan if n in cfg.zclip)
    agc_sets = cfg.agc if agc.timm_available() else []
    if cfg.agc and not agc_sets:
        cfg.notes.append("agc rows not run: timm is not installed (pip install timm)")
    agc_provs = agc.providers(device) if agc_sets else []
    total += len(agc_provs) * len(agc_sets)
    progress = Progress(total + 1)

    meta = environment(device)
    cache = meta["cache_bytes"]
    copy_size = (1 << 30) if device.type == "cuda" else max(4 * cache, 64 << 20)
    if cfg.quick:
        copy_size = max(2 * cache, 32 << 20)
    copy_size = int(min(copy_size, cfg.mem_fraction * free_bytes(device) / 3))
    progress.note(f"timing a copy of {copy_size / 2**20:.0f} MiB (the bandwidth reference)")
    copy_ref = copy_bandwidth(device, clock, copy_size)
    progress.step(f"device-to-device copy of {copy_ref['buffer_bytes'] / 2**20:.0f} MiB: "
                  f"{copy_ref['bytes_per_s'] / 1e9:.1f} GB/s (read + write)")

    rows = []
    for name, specs, label in plan:
        ok = compile_sets is None or name in compile_sets
        if over_time(cfg, 1.0):
            cfg.notes.append(f"{label} skipped: past the time limit (--max-minutes)")
            continue
        if ok and over_time(cfg, 0.5) and any(p.compiles for p in providers):
            ok = False
            cfg.notes.append(f"torch.compile skipped on {label}: past half the time limit (--max-minutes)")
        if providers:  # --providers none: only the --extras or --zclip rows (the floor alone compares nothing)
            measure_set(cfg, clock, specs, label, providers, progress, rows, compile_ok=ok, floor=cfg.floor)
        if name in cfg.extras:
            measure_extras(cfg, clock, specs, label, progress, rows)
        if name in cfg.zclip:
            measure_zclip(cfg, clock, specs, label, progress, rows)
        write_partial(cfg, meta, copy_ref, rows)
    if any(name in cfg.extras for name, _, _ in plan):
        cfg.notes.append(ex.NOTE.format(scale=ex.AMP_SCALE))
    if any(name in cfg.zclip for name, _, _ in plan):
        cfg.notes.append(zr.NOTE if zclip_regimes(cfg) else "zclip rows not run: they need the clip or noclip regime")
    for name in agc_sets:
        if over_time(cfg, 1.0):
            cfg.notes.append(f"agc rows of {name} skipped: past the time limit (--max-minutes)")
            continue
        specs, label, note = fit_set(SETS[name], device, cfg.mem_fraction)
        if specs is None:
            cfg.notes.append(note)
            continue
        measure_agc(cfg, clock, specs, label, progress, rows, agc_provs)
        write_partial(cfg, meta, copy_ref, rows)
    if agc_sets:
        cfg.notes.append(agc.NOTE.format(cf=agc.CLIP_FACTOR))
    busy = [r for r in cfg.regimes if is_busy(r)]
    if busy and any(p.busy for p in providers):
        cfg.notes.append(
            f"{', '.join(busy)}: timed while {cfg.busy_procs or os.cpu_count()} processes spin "
            f"in Python (one per core by default, as data-loader workers or other ranks would), each call timed on "
            f"its own; providers {', '.join(p.key for p in providers if p.busy)} (torch.compile and "
            "foreach=False are not timed there); speedups are torch's mean (p90) over this mean (p90)")
    if cfg.floor and any(r.get("kind") == "floor" for r in rows):
        cfg.notes.append(
            f"memory floor: one torch.linalg.vector_norm (noclip), or one vector_norm and one mul_ (clip), of one "
            f"flat tensor per dtype with the set's size, timed in the same rounds; judged only for sets larger "
            f"than the {cache / 2**20:.0f} MiB last-level cache. Fused providers compared: "
            f"{', '.join(p for p in FUSED if any(r['provider'] == p for r in rows))}")
    add_bandwidth(rows, copy_ref["bytes_per_s"])

    scaling = {"regime": cfg.scaling_regime, "points": {}, "per_tensor_s": {}}
    for curve in cfg.scaling:
        pts = []
        for x in cfg.scaling_points[curve]:
            specs = scaling_specs(curve, x, cfg.tensors_elements)
            if over_time(cfg, 1.0):
                cfg.notes.append(f"scaling {curve}={x} skipped: past the time limit (--max-minutes)")
                continue
            if 2 * specs_bytes(specs) > cfg.mem_fraction * free_bytes(device):
                cfg.notes.append(f"scaling {curve}={x} skipped: does not fit memory")
                for _ in scal_prov:
                    progress.step(f"scaling {curve}={x}: skipped (memory)")
                continue
            sub = []
            measure_set(_with_regimes(cfg, [cfg.scaling_regime]), clock, specs, f"{curve}={x}", scal_prov,
                        progress, sub, kind="scaling")
            for r in sub:
                r["curve"], r["x"] = curve, x
            pts += sub
        add_bandwidth(pts, copy_ref["bytes_per_s"])
        scaling["points"][curve] = pts
        if curve == "tensors":
            for p in scal_prov:
                ok_pts = [r for r in pts if r["provider"] == p.key and "median_s" in r]
                slope = per_tensor_cost(ok_pts)
                if slope is not None:
                    scaling["per_tensor_s"][p.key] = slope
    out = {"meta": meta, "config": config_json(cfg), "copy": copy_ref, "results": rows, "scaling": scaling,
           "notes": cfg.notes}
    if cfg.targets:
        out["targets"] = load_targets(cfg.targets).targets(rows, scaling, device, cache)
    return out


def load_targets(path):
    """A targets file (--targets) as a module: its targets(rows, scaling, device, cache_bytes) makes the JSON's list."""
    spec = importlib.util.spec_from_file_location("fusedclip_bench_targets", path)
    if spec is None or not os.path.isfile(path):
        raise SystemExit(f"fusedclip bench: --targets {path}: no such file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
