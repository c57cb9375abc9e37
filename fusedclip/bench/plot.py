"""The PNG: speedup per set and regime, and the two scaling curves. matplotlib is optional (report.py skips
the plot without it)."""
from .providers import BASELINE, PROVIDERS
from .workload import is_busy

TICKS = [0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100]


def have_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def has_content(result):
    """Whether the PNG would show anything: speedup bars of the providers, or a scaling curve (a run of the
    --zclip or --extras rows alone has neither)."""
    return (any(speedup(r) and r["provider"] in PROVIDERS for r in result["results"])
            or any(result["scaling"]["points"].values()))


def speedup(r):
    """What a bar shows: the median's speedup; in the busy regimes the mean's (rare long stalls are the
    cost there, and the mean is what a training step pays)."""
    return r.get("mean_speedup") if is_busy(r["regime"]) else r.get("speedup")


def compile_label(result):
    """torch.compile's legend entry, saying why its bar is missing from most groups."""
    cfg = result["config"]
    why = []
    if cfg.get("compile_sets") is not None:
        why.append(f"only on {', '.join(cfg['compile_sets'])}: compile time grows with the tensor count "
                   "(--compile-sets)")
    if any(is_busy(g) for g in cfg["regimes"]):
        why.append("not in the busy regimes")
    return PROVIDERS["compile"].label + "".join(f"\n({w})" for w in why)


REGIME_TITLE = {"clip": "clipping", "noclip": "not clipping", "clip-busy": "clipping, every core busy",
                "noclip-busy": "not clipping, every core busy"}


def plot(result, path):
    """One panel of bars per regime (the sets along x, the same axis in every panel), then the two scaling
    curves. Bars grow from 1x on a log axis centred on 1x: a gain points up, a slowdown (0.8x) points down."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["results"] if speedup(r) and r["provider"] in PROVIDERS]
    sets = list(dict.fromkeys(r["set"] for r in rows))
    regimes = list(dict.fromkeys(r["regime"] for r in rows))
    provs = [k for k in PROVIDERS if any(r["provider"] == k for r in rows) and k != BASELINE]
    colors = {k: f"C{i}" for i, k in enumerate(PROVIDERS)}
    curves = [c for c in ("tensors", "elements") if result["scaling"]["points"].get(c)]
    values = [speedup(r) for r in rows if r["provider"] != BASELINE]
    lim = 1.6 * max([2.0] + [max(v, 1 / v) for v in values])  # the same scale in every panel
    width_in = max(9.0, 0.3 * len(sets) * max(1, len(provs)) + 2)
    fig = plt.figure(figsize=(width_in, 2.6 * max(1, len(regimes)) + (3.6 if curves else 0)))
    grid = fig.add_gridspec(max(1, len(regimes)) + (1 if curves else 0), max(1, len(curves)),
                            height_ratios=[1] * max(1, len(regimes)) + ([1.4] if curves else []))
    width = 0.8 / max(1, len(provs))
    for ri, g in enumerate(regimes):
        ax = fig.add_subplot(grid[ri, :])
        for j, k in enumerate(provs):
            xs, ys = [], []
            for i, s in enumerate(sets):
                r = next((r for r in rows if r["set"] == s and r["regime"] == g and r["provider"] == k), None)
                if r:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(speedup(r))
            label = compile_label(result) if k == "compile" else PROVIDERS[k].label
            bars = ax.bar(xs, [y - 1 for y in ys], width, bottom=1, label=label, color=colors[k])
            ax.bar_label(bars, labels=[f"{y:.2f}" if y < 10 else f"{y:.0f}" for y in ys], fontsize=6, padding=1)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xlim(-0.5, len(sets) - 0.5)
        ax.set_xticks(range(len(sets)))
        ax.set_xticklabels(sets, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylim(1 / lim, lim)
        ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator([t for t in TICKS if 1 / lim <= t <= lim]))
        ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_ylabel("vs torch foreach", fontsize=8)
        stat = "mean" if is_busy(g) else "median"
        ax.set_title(f"{REGIME_TITLE.get(g, g)} ({g}): speedup of the {stat} time per call; below 1x is slower",
                     fontsize=9)
        if ri == 0:  # one legend for all panels, above them (inside a panel it would hide bars)
            handles, labels = ax.get_legend_handles_labels()
    for a, curve in zip([fig.add_subplot(grid[-1, c]) for c in range(len(curves))], curves):
        pts = result["scaling"]["points"][curve]
        for k in [k for k in PROVIDERS if any(p["provider"] == k for p in pts)]:
            pk = [p for p in pts if p["provider"] == k and "median_s" in p]
            a.errorbar([p["x"] for p in pk], [p["median_s"] * 1e3 for p in pk],
                       yerr=[[(p["median_s"] - p["p20_s"]) * 1e3 for p in pk],
                             [(p["p80_s"] - p["median_s"]) * 1e3 for p in pk]],
                       marker="o", ms=3, capsize=2, label=PROVIDERS[k].label, color=colors[k])
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_ylabel("time per call (ms)")
        total = result["config"]["tensors_elements"]
        a.set_xlabel(f"tensors ({total:,} elements in all)" if curve == "tensors" else "elements (100 tensors)")
        a.set_title(f"Time against {curve} ({result['scaling']['regime']})", fontsize=9)
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=7)
    m = result["meta"]
    fig.suptitle(f"fusedclip on {m['device_name']} - torch {m['torch']} - {m['date'][:16]}", fontsize=10)
    top = 1 - 0.75 / fig.get_figheight()  # room for the title and the legend
    if regimes:
        fig.legend(handles, labels, loc="upper center", ncol=len(provs), fontsize=7, frameon=False,
                   bbox_to_anchor=(0.5, top + 0.3 / fig.get_figheight()))
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(path, dpi=110)
    plt.close(fig)
