"""Gradient spikes, with fusedclip.ZClip (adaptive clipping), with a fixed clip_, and without clipping.

A small MLP learns a fixed random "teacher" network's function with SGD and momentum. On a few steps
(--spike-steps) the loss is multiplied by --spike-factor before backward: a bad batch, whose gradient is
that many times the usual one. Without clipping one such step throws the weights far away and the loss
jumps by orders of magnitude. fusedclip.ZClip keeps an EMA of the gradient norm's mean and variance, sees
the spike's z-score and clips it to just above the usual norm, so the run carries on as if the bad batch
had been an ordinary one; the regular steps are left alone. A fixed fusedclip.clip_ also stops the spikes,
but only at a max_norm someone had to pick (too low and it slows every step, too high and spikes get through).

    python examples/train_zclip.py                        # CPU, a few seconds
    python examples/train_zclip.py --steps 300 --spike-steps 100,200 --out /tmp/zclip.png

Per step it records the loss (unscaled), the gradient norm before clipping, the norm after it, and ZClip's
spike threshold, mean + z_thresh * (std + eps) from clipper.state_dict() before the step: a norm above it is
clipped (a host read per step, fine in an example). It prints a summary per run and saves a PNG (when
matplotlib is installed; without it the run says the plot was skipped).
"""
import argparse
import math
import time

import torch

import fusedclip

EPS = 1e-6  # ZClip's eps (its default), passed explicitly so that the threshold below uses the same one


def make_data(n, d_in, seed):
    """Inputs and targets of a fixed random teacher (a tanh MLP), with a little noise."""
    g = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(d_in, 32, generator=g) / math.sqrt(d_in), torch.randn(32, 1, generator=g) / math.sqrt(32)]
    x = torch.randn(n, d_in, generator=g)
    y = torch.tanh(x @ teacher[0]) @ teacher[1] + 0.01 * torch.randn(n, 1, generator=g)
    return x, y


def make_model(d_in, hidden, seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden),
                               torch.nn.Tanh(), torch.nn.Linear(hidden, 1))


def zclip_threshold(clipper, warmup_steps):
    """The norm above which the next step is a spike: mean + z_thresh * (std + eps) from the clipper's state
    (NaN while it warms up). state_dict() holds float64 tensors; reading them here is a host sync."""
    sd = clipper.state_dict()
    if sd["steps"] < max(warmup_steps, 1):
        return float("nan")
    return float(sd["mean"]) + clipper.z_thresh * (math.sqrt(float(sd["var"])) + EPS)


def train(args, method):
    """One run: method is "none", "zclip" or "clip". Returns per step: loss, norm before clipping, norm after
    it, ZClip's threshold (NaN for the other methods and during warm-up). Same seeds: same initial weights
    and batches in every run."""
    x, y = make_data(args.batch * args.steps, args.d_in, args.seed)
    model = make_model(args.d_in, args.hidden, args.seed + 1)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    clipper = None
    if method == "zclip":
        clipper = fusedclip.ZClip(alpha=args.alpha, z_thresh=args.z_thresh, max_grad_norm=args.max_grad_norm,
                                  eps=EPS, warmup_steps=args.warmup_steps)
    spikes = set(args.spike_steps)
    rec = {"loss": [], "norm": [], "clipped": [], "threshold": []}
    for step in range(args.steps):
        xb = x[step * args.batch:(step + 1) * args.batch]
        yb = y[step * args.batch:(step + 1) * args.batch]
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        (loss * args.spike_factor if step in spikes else loss).backward()  # the bad batch: a huge gradient
        threshold = float("nan")
        if method == "zclip":
            threshold = zclip_threshold(clipper, args.warmup_steps)  # the state before this step decides it
            norm = clipper.step(model)  # a 0-dim tensor: the norm before clipping
        elif method == "clip":
            norm = fusedclip.clip_(model.parameters(), max_norm=args.fixed_max_norm)
        else:
            norm = fusedclip.get_total_norm([p.grad for p in model.parameters()])
        after = fusedclip.get_total_norm([p.grad for p in model.parameters()])
        opt.step()
        rec["loss"].append(loss.item())
        rec["norm"].append(norm.item())
        rec["clipped"].append(after.item())
        rec["threshold"].append(threshold)
    return rec


def finite_max(values):
    vals = [v for v in values if math.isfinite(v)]
    return max(vals) if vals else float("nan")


def summarize(name, rec, args):
    """One line per run; returns the numbers the line shows."""
    first_spike = min(args.spike_steps) if args.spike_steps else args.steps
    before = rec["loss"][max(0, first_spike - 1)]
    after = rec["loss"][first_spike + 1:]
    worst = (float("inf") if any(not math.isfinite(v) for v in after) else max(after)) if after else float("nan")
    clipped = sum(1 for n, c in zip(rec["norm"], rec["clipped"]) if c < 0.999 * n)
    print(f"{name}: loss {rec['loss'][0]:.4g} -> {before:.4g} (before the first spike) -> {rec['loss'][-1]:.4g} "
          f"(final); largest loss after a spike {worst:.4g}; largest gradient norm {finite_max(rec['norm']):.3g}; "
          f"steps clipped {clipped}")
    return {"before": before, "worst": worst, "final": rec["loss"][-1], "clipped": clipped}


def plot(path, runs, args):
    """Saves the PNG; returns False (and draws nothing) when matplotlib is not installed: it is optional."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def clean(vs):
        return [v if math.isfinite(v) else float("nan") for v in vs]

    fig, (ax_loss, ax_norm) = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = {"none": "tab:red", "clip": "tab:green", "zclip": "tab:blue"}
    for (method, name), rec in runs.items():
        steps = range(len(rec["loss"]))
        ax_loss.plot(steps, clean(rec["loss"]), label=name, color=colors[method])
        ax_norm.plot(steps, clean(rec["norm"]), label=f"{name}: norm before clipping", color=colors[method],
                     lw=0.9, alpha=0.8)
        if method == "zclip":
            ax_norm.plot(steps, clean(rec["threshold"]), color="k", ls="--", lw=1,
                         label=f"ZClip threshold (mean + {args.z_thresh:g} std)")
            ax_norm.plot(steps, clean(rec["clipped"]), color=colors[method], ls=":", lw=1.2,
                         label=f"{name}: norm after clipping")
    for s in args.spike_steps:
        for ax in (ax_loss, ax_norm):
            ax.axvline(s, color="gray", alpha=0.3, lw=3)
    for ax, title in ((ax_loss, "training loss (MSE, unscaled)"), (ax_norm, "gradient norm")):
        ax.set_yscale("log")
        ax.set_xlabel(f"step (grey: loss x {args.spike_factor:g} on that step)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle("Injected gradient spikes: SGD without clipping, with fusedclip.clip_, with fusedclip.ZClip")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def int_list(text):
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--d-in", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--spike-steps", type=int_list, default=[60, 120, 160],
                    help="steps whose loss is multiplied by --spike-factor (comma-separated)")
    ap.add_argument("--spike-factor", type=float, default=300.0)
    ap.add_argument("--alpha", type=float, default=0.97, help="ZClip's EMA factor")
    ap.add_argument("--z-thresh", type=float, default=2.5, help="ZClip's z-score threshold")
    ap.add_argument("--warmup-steps", type=int, default=25, help="ZClip's warm-up")
    ap.add_argument("--max-grad-norm", type=float, default=None,
                    help="ZClip's cap (default none: the threshold alone)")
    ap.add_argument("--fixed-max-norm", type=float, default=1.0, help="max_norm of the fixed clip_ run")
    ap.add_argument("--no-fixed", action="store_true", help="skip the fixed clip_ run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="examples/zclip_spikes.png", help="where to save the plot")
    args = ap.parse_args(argv)
    if any(s < args.warmup_steps for s in args.spike_steps):
        print(f"note: a spike during ZClip's warm-up ({args.warmup_steps} steps) is not detected, only capped "
              "by --max-grad-norm")

    start = time.perf_counter()
    methods = [("none", "without clipping")]
    if not args.no_fixed:
        methods.append(("clip", f"with fusedclip.clip_(max_norm={args.fixed_max_norm:g})"))
    methods.append(("zclip", f"with fusedclip.ZClip(z_thresh={args.z_thresh:g})"))
    runs = {m: train(args, m[0]) for m in methods}
    seconds = time.perf_counter() - start

    for (_, name), rec in runs.items():
        summarize(name, rec, args)
    z = runs[methods[-1]]
    over = [i for i, (c, t) in enumerate(zip(z["clipped"], z["threshold"])) if math.isfinite(t) and c > t * (1 + 1e-6)]
    caught = [s for s in args.spike_steps if s < args.steps and z["clipped"][s] < 0.5 * z["norm"][s]]
    print(f"ZClip: {len(caught)} of {len(args.spike_steps)} spikes clipped (steps {', '.join(map(str, caught))}); "
          f"steps whose norm after clipping exceeds the threshold: {len(over)}")
    if plot(args.out, runs, args):
        print(f"saved {args.out} ({len(runs) * args.steps} steps in {seconds:.1f} s)")
    else:
        print(f"plot skipped: matplotlib not installed ({len(runs) * args.steps} steps in {seconds:.1f} s)")


if __name__ == "__main__":
    main()
