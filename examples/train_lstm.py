"""Exploding gradients in a deep LSTM, with and without clipping.

A 4-layer LSTM learns the "adding problem" (each sequence holds random values and two markers; the
target is the sum of the two marked values), with SGD and momentum at a step size that is fine for
clipped gradients. Without clipping the gradient norm feeds on itself: a large gradient makes a large
step, the larger weights give a larger gradient, and within a few dozen steps the norm has grown by
many orders of magnitude and the loss is inf/NaN. With fusedclip.clip_ (max_norm 1) the same run, same
data, same initialisation trains normally.

    python examples/train_lstm.py                       # CPU, about 10-20 s
    python examples/train_lstm.py --steps 60 --out /tmp/lstm.png

Prints the losses of both runs and saves a PNG of loss and gradient norm (before clipping) per step (when
matplotlib is installed; without it, the run says the plot was skipped).
"""
import argparse
import math
import time

import torch

import fusedclip


def adding_problem(batch, seq_len, generator):
    """x: (batch, seq_len, 2): a random value in [0, 1) and a marker (1 at two positions, one in each half);
    y: (batch, 1): the sum of the two marked values."""
    x = torch.zeros(batch, seq_len, 2)
    x[..., 0] = torch.rand(batch, seq_len, generator=generator)
    rows = torch.arange(batch)
    first = torch.randint(0, seq_len // 2, (batch,), generator=generator)
    second = torch.randint(seq_len // 2, seq_len, (batch,), generator=generator)
    x[rows, first, 1] = 1.0
    x[rows, second, 1] = 1.0
    y = (x[..., 0] * x[..., 1]).sum(dim=1, keepdim=True)
    return x, y


class DeepLSTM(torch.nn.Module):
    def __init__(self, hidden, layers, init_scale):
        super().__init__()
        self.lstm = torch.nn.LSTM(2, hidden, num_layers=layers, batch_first=True)
        self.head = torch.nn.Linear(hidden, 1)
        with torch.no_grad():  # larger-than-default weights: the regime where gradients can run away
            for name, p in self.lstm.named_parameters():
                if name.startswith("weight"):
                    p.mul_(init_scale)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def train(args, clip):
    """One run; returns (losses, gradient norms before clipping), one per step. The same seed gives both
    runs the same initial weights and the same batches."""
    torch.manual_seed(args.seed)
    model = DeepLSTM(args.hidden, args.layers, args.init_scale)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    data = torch.Generator().manual_seed(args.seed + 1)
    losses, norms = [], []
    for _ in range(args.steps):
        x, y = adding_problem(args.batch, args.seq_len, data)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            norm = fusedclip.clip_(model.parameters(), max_norm=args.max_norm)  # the norm before clipping
        else:
            norm = fusedclip.get_total_norm([p.grad for p in model.parameters()])
        opt.step()
        losses.append(loss.item())
        norms.append(norm.item())
    return losses, norms


def first_nonfinite(values):
    return next((i for i, v in enumerate(values) if not math.isfinite(v)), None)


def describe(name, losses, norms):
    bad = first_nonfinite(losses)
    finite_norms = [n for n in norms if math.isfinite(n)]
    peak = max(finite_norms) if finite_norms else float("nan")
    peak_step = norms.index(peak) if finite_norms else -1
    print(f"{name}: loss {losses[0]:.4g} -> {losses[-1]:.4g} (final); gradient norm at step 0 {norms[0]:.3g}, "
          f"largest finite {peak:.3g} (step {peak_step})"
          + (f"; loss non-finite from step {bad}" if bad is not None else ""))


def plot(path, runs, max_norm):
    """Saves the PNG; returns False (and draws nothing) when matplotlib is not installed: it is optional."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_norm) = plt.subplots(1, 2, figsize=(11, 4))
    for name, (losses, norms), color in zip(runs, runs.values(), ["tab:red", "tab:blue"]):
        steps = range(len(losses))
        ax_loss.plot(steps, [v if math.isfinite(v) else float("nan") for v in losses], label=name, color=color)
        ax_norm.plot(steps, [v if math.isfinite(v) else float("nan") for v in norms], label=name, color=color)
        bad = first_nonfinite(losses)
        if bad is not None:
            for ax in (ax_loss, ax_norm):
                ax.axvline(bad, color=color, linestyle=":", label=f"{name}: loss inf/NaN from here" if ax is ax_loss
                           else None)
    ax_norm.axhline(max_norm, color="gray", linestyle="--", label=f"max_norm = {max_norm:g}")
    for ax, title in ((ax_loss, "training loss (MSE)"), (ax_norm, "gradient norm before clipping")):
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle("Deep LSTM on the adding problem: SGD with and without fusedclip.clip_")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=40)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1.0)
    ap.add_argument("--init-scale", type=float, default=2.0, help="multiplies the LSTM's default initial weights")
    ap.add_argument("--max-norm", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="examples/lstm_clipping.png", help="where to save the plot")
    args = ap.parse_args(argv)

    start = time.perf_counter()
    runs = {"without clipping": train(args, clip=False),
            f"with fusedclip.clip_(max_norm={args.max_norm:g})": train(args, clip=True)}
    seconds = time.perf_counter() - start

    every = max(1, args.steps // 10)
    print("step " + "".join(f"{name:>36}" for name in runs))
    for i in list(range(0, args.steps, every)) + ([args.steps - 1] if (args.steps - 1) % every else []):
        print(f"{i:4d} " + "".join(f"{losses[i]:>36.4g}" for losses, _ in runs.values()))
    for name, (losses, norms) in runs.items():
        describe(name, losses, norms)
    if plot(args.out, runs, args.max_norm):
        print(f"saved {args.out} ({2 * args.steps} steps in {seconds:.1f} s)")
    else:
        print(f"plot skipped: matplotlib not installed ({2 * args.steps} steps in {seconds:.1f} s)")


if __name__ == "__main__":
    main()
