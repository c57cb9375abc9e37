"""Reports: progress lines while it runs, then the tables (terminal and markdown), the JSON, and the plot
(plot.py), under file names that two runs never share."""
import json
import math
import os
import re
import time

from .plot import has_content, have_matplotlib, plot
from .providers import FUSED, PROVIDERS
from .reference import FLOOR_TOLERANCE
from .workload import CLIP_NORM, MAX_NORM, NOCLIP_NORM, is_busy


class Progress:
    """One line per measurement, "[done/total] elapsed  what", flushed (make and tee buffer otherwise)."""

    def __init__(self, total):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()

    def _print(self, count, text):
        print(f"[{count}] {time.perf_counter() - self.t0:6.0f}s  {text}", flush=True)

    def step(self, text):
        self.done += 1
        self._print(f"{self.done:3d}/{self.total}", text)

    def note(self, text):
        """What is about to take a while (building gradients, compiling), before it starts."""
        self._print(" " * len(f"{self.done:3d}/{self.total}"), f"... {text}")


def fmt_time(s):
    if s is None or not math.isfinite(s):
        return "-"
    if s >= 1.0:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def fmt_x(v):
    return f"{v:.2f}x" if v else "-"


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def status_line(row):
    head = f"{row['set']:<18} {row['regime']:<11} {row['label']:<26}"
    if "error" in row:
        return f"{head} ERROR {row['error']}"
    extra = f"  CHECK FAILED: {row['check']}" if row.get("check") else ""
    if is_busy(row["regime"]):
        return (f"{head} mean {fmt_time(row['mean_s'])}, p50 {fmt_time(row['p50_s'])}, p90 {fmt_time(row['p90_s'])} "
                f"(n={row['n']}){extra}")
    return (f"{head} {fmt_time(row['median_s']):>10}  ({fmt_time(row['p20_s'])} .. {fmt_time(row['p80_s'])}, "
            f"n={row['n']}){extra}")


def result_table(result):
    """The uncontended rows of every set (and the extras; the ZClip rows have a table of their own)."""
    head = ("| set | regime | provider | median | p20 .. p80 | speedup | bytes moved | GB/s | % copy | "
            "launches | host/call |")
    lines = [head, "|" + "---|" * 11]
    for r in result["results"]:
        if r.get("kind") in ("floor", "zclip") or is_busy(r["regime"]):
            continue
        if r["regime"] == "compile_s":
            lines.append(f"| {r['set']} | compile | {r['label']} | {fmt_time(r['compile_s'])} | first call | "
                         "| | | | | |")
            continue
        if "error" in r:
            lines.append(f"| {r['set']} | {r['regime']} | {r['label']} | error: {r['error']} | | | | | | | |")
            continue
        chk = " (CHECK FAILED)" if r.get("check") else ""
        launches = "-" if r.get("launches") is None else str(r["launches"])
        lines.append(f"| {r['set']} | {r['regime']} | {r['label']}{chk} | {fmt_time(r['median_s'])} | "
                     f"{fmt_time(r['p20_s'])} .. {fmt_time(r['p80_s'])} | {fmt_x(r.get('speedup'))} | "
                     f"{r['bytes_moved'] / 1e6:.1f} MB | {r['bytes_per_s'] / 1e9:.1f} | {r['pct_copy']:.0f}% | "
                     f"{launches} | {fmt_time(r['host_s'])} |")
    return "\n".join(lines) if len(lines) > 2 else ""  # no rows (--providers none)


def busy_table(result):
    """The busy regimes: each call timed on its own while every core runs a busy process."""
    rows = [r for r in result["results"] if is_busy(r["regime"])]
    if not rows:
        return ""
    lines = ["| set | regime | provider | mean | p50 | p90 | speedup of the mean | speedup of the p90 | calls |",
             "|" + "---|" * 9]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['set']} | {r['regime']} | {r['label']} | error: {r['error']} | | | | | |")
            continue
        chk = " (CHECK FAILED)" if r.get("check") else ""
        lines.append(f"| {r['set']} | {r['regime']} | {r['label']}{chk} | {fmt_time(r['mean_s'])} | "
                     f"{fmt_time(r['p50_s'])} | {fmt_time(r['p90_s'])} | {fmt_x(r.get('mean_speedup'))} | "
                     f"{fmt_x(r.get('p90_speedup'))} | {r['n']} |")
    return "\n".join(lines)


def fmt_ratio(v):
    return f"{v:.2f}" if v else "-"


def zclip_table(result):
    """--zclip: fusedclip.ZClip.step and fusedclip.clip_ against zclip's ZClip.step, median and tails."""
    rows = [r for r in result["results"] if r.get("kind") == "zclip"]
    if not rows:
        return ""
    lines = ["| set | regime | row | median | p20 .. p80 | mean | p90 | speedup vs zclip (median / mean / p90) | "
             "time / clip_ (median / mean / p90) | launches |", "|" + "---|" * 10]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['set']} | {r['regime']} | {r['label']} | error: {r['error']} | | | | | | |")
            continue
        chk = " (CHECK FAILED)" if r.get("check") else ""
        launches = "-" if r.get("launches") is None else str(r["launches"])
        lines.append(f"| {r['set']} | {r['regime']} | {r['label']}{chk} | {fmt_time(r['median_s'])} | "
                     f"{fmt_time(r['p20_s'])} .. {fmt_time(r['p80_s'])} | {fmt_time(r['mean_s'])} | "
                     f"{fmt_time(r['p90_s'])} | {fmt_x(r.get('speedup'))} / {fmt_x(r.get('mean_speedup'))} / "
                     f"{fmt_x(r.get('p90_speedup'))} | {fmt_ratio(r.get('vs_clip'))} / "
                     f"{fmt_ratio(r.get('mean_vs_clip'))} / {fmt_ratio(r.get('p90_vs_clip'))} | {launches} |")
    return "\n".join(lines)


def floor_table(result):
    """fusedclip (and torch) against the memory floor of each set, judged only for sets larger than the
    last-level cache: a set that fits can be read from the cache, the floor's flat tensor too."""
    rows = result["results"]
    cache = result["meta"]["cache_bytes"]
    lines = []
    for f in (r for r in rows if r.get("kind") == "floor" and "median_s" in r):
        same = [r for r in rows if r.get("kind") == "set" and r["set"] == f["set"] and r["regime"] == f["regime"]
                and "median_s" in r]
        torch_row = next((r for r in same if r["provider"] == "torch"), None)
        for r in (r for r in same if r["provider"] in FUSED):
            ratio = r["floor_ratio"]
            if f["bytes"] <= cache:
                verdict = "fits in the LLC: not judged"
            elif ratio <= FLOOR_TOLERANCE:
                verdict = "within 10% of floor"
            else:
                verdict = f"{100 * (ratio - 1):.0f}% above floor"
            torch_cell = f"{fmt_time(torch_row['median_s'])} ({torch_row['floor_ratio']:.2f})" if torch_row else "-"
            lines.append(f"| {f['set']} | {f['dtype']} | {f['bytes'] / 1e6:.1f} MB | {f['regime']} | "
                         f"{fmt_time(f['median_s'])} | {torch_cell} | {r['label']} {fmt_time(r['median_s'])} | "
                         f"{ratio:.2f} | {verdict} |")
    if not lines:
        return ""
    return "\n".join(["| set | dtype | gradients | regime | floor | torch foreach (/ floor) | fusedclip | "
                      "fusedclip / floor | |", "|" + "---|" * 9] + lines)


def scaling_table(result, curve):
    pts = result["scaling"]["points"].get(curve, [])
    if not pts:
        return ""
    provs = list(dict.fromkeys(p["label"] for p in pts))
    xs = list(dict.fromkeys(p["x"] for p in pts))
    by = {(p["x"], p["label"]): p for p in pts}
    total = result["config"]["tensors_elements"]
    name = f"tensors ({total:,} elements in all)" if curve == "tensors" else "elements (100 tensors)"
    lines = [f"| {name} | " + " | ".join(provs) + " |", "|---|" + "---|" * len(provs)]
    for x in xs:
        cells = []
        for lab in provs:
            p = by.get((x, lab))
            cells.append(fmt_time(p["median_s"]) if p and "median_s" in p else "-")
        lines.append(f"| {x:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header(result):
    m, c = result["meta"], result["copy"]
    lines = [f"- device: **{m['device_name']}** ({m['device_type']}, {m.get('threads')} threads)",
             f"- date: {m['date']}",
             f"- torch {m['torch']}, CUDA {m['cuda']}, Triton {m['triton']}, Python {m['python']}, "
             f"fusedclip {m['fusedclip']}",
             f"- last-level cache: {m['cache_bytes'] / 2**20:.0f} MiB ({m['cache_source']})",
             f"- copy limit: {c['bytes_per_s'] / 1e9:.1f} GB/s (dst.copy_(src) of {c['buffer_bytes'] / 2**20:.0f} "
             f"MiB, read + write, measured in this run)",
             f"- max_norm {MAX_NORM}; gradient norm {CLIP_NORM} when clipping (clip), {NOCLIP_NORM} when not "
             "(noclip); bytes moved: 2N clipping, N not"]
    return "\n".join(lines)


def _sections(result):
    """(title, body) of every table that has rows, in the order both reports show them."""
    out = [("Per set", result_table(result)),
           ("Under contention (a busy process on every core)", busy_table(result)),
           ("Against the memory floor (one flat tensor of the same size and dtype)", floor_table(result)),
           ("ZClip (--zclip): against zclip's ZClip.step and plain fusedclip.clip_", zclip_table(result))]
    for curve in ("tensors", "elements"):
        out.append((f"Time per call against {curve} ({result['scaling']['regime']})", scaling_table(result, curve)))
    pt = result["scaling"].get("per_tensor_s", {})
    if pt:
        out.append(("Cost per tensor", "least-squares slope of the tensors curve: " +
                    ", ".join(f"{PROVIDERS[k].label} {v * 1e6:.2f} us" for k, v in pt.items())))
    return [(t, b) for t, b in out if b]


def markdown(result):
    parts = ["# fusedclip benchmark", "", header(result), ""]
    for title, body in _sections(result):
        parts += [f"## {title}", "", body, ""]
    if result["notes"]:
        parts += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(parts)


def terminal(result):
    print()
    print(header(result).replace("**", ""))
    for title, body in _sections(result):
        print(f"\n{title}:\n{body}")
    for n in result["notes"]:
        print(f"note: {n}")


def output_stem(result, out, tag):
    """<device>_<date>T<hhmm>[_<tag>], with -2, -3 ... when a run of the same minute already wrote there:
    no run overwrites another."""
    m = result["meta"]
    stem = f"{slug(m['device_name'])}_{m['date'][:16].replace(':', '')}" + (f"_{slug(tag)}" if tag else "")
    name, k = stem, 2
    while any(os.path.exists(os.path.join(out, name + ext)) for ext in (".json", ".md", ".png")):
        name, k = f"{stem}-{k}", k + 1
    return name


def write_outputs(result, cfg):
    os.makedirs(cfg.out, exist_ok=True)
    stem = output_stem(result, cfg.out, cfg.tag)
    paths = {"json": os.path.join(cfg.out, stem + ".json"), "md": os.path.join(cfg.out, stem + ".md")}
    # the plot is optional (the GPU machines have no matplotlib): say so in the reports, never fail the run
    skipped = cfg.plot and not have_matplotlib()
    if skipped:
        result["notes"].append("plot skipped: matplotlib not installed (pip install matplotlib)")
        print(f"note: {result['notes'][-1]}")
    empty = cfg.plot and not skipped and not has_content(result)
    if empty:
        result["notes"].append("plot skipped: nothing to plot (no provider rows nor scaling curves)")
        print(f"note: {result['notes'][-1]}")
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(paths["md"], "w") as f:
        f.write(markdown(result))
    if cfg.plot and not skipped and not empty:
        paths["png"] = os.path.join(cfg.out, stem + ".png")
        plot(result, paths["png"])
    return paths


def write_side_report(out, meta, rows, checks, text, kind, tag=""):
    """A side benchmark's files (--step, --dtensor): <device>_<date>_<kind><tag>.json (meta, rows, checks) and
    .md (text)."""
    os.makedirs(out, exist_ok=True)
    name = re.sub(r"[^a-z0-9]+", "-", str(meta.get("device_name", "cpu")).lower()).strip("-")
    stem = os.path.join(out, f"{name}_{time.strftime('%Y-%m-%dT%H%M')}_{kind}{tag}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows, "checks": checks}, f, indent=1, default=str)
    with open(stem + ".md", "w") as f:
        f.write(text + "\n")
    print(f"wrote {stem}.json, {stem}.md")
