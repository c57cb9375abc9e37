"""Issue #26 rows (`python -m fusedclip bench --step`, or `python -m fusedclip.bench.adagc_rows`): ClipInBackward and
AdaGC timed in a training step on the CPU, for three models: an MLP (depth x Linear(width, width)), a small
transformer (TransformerEncoder layers, d_model, 4 heads, sequence 64) and many small tensors (Linear(16, 16)
blocks: per-tensor costs).

- step rows: a whole training step (forward, backward, clip, fused AdamW step, zero_grad), clipping active (max_norm
  below every model's norm), a fresh backward each step, the variants interleaved round by round: no clipping,
  no clipping but the fused step handed a grad_scale (`grad_scale`: what any coefficient applied inside torch's fused
  step costs, the floor of clip_into_ and ClipInBackward), torch's clip_grad_norm_, fusedclip.clip_,
  fusedclip.clip_into_, fusedclip.ClipInBackward (into the fused step).
  Each row has the whole step and the optimizer side (everything after backward returns) as percentiles, and each
  against no clipping as the median of the per-round ratios (paired: a shared machine's load drifts between rounds
  by more than the differences measured; the AdaGC rows' ratio to clip_ likewise). The
  in-backward clipper's own work runs inside backward (its hooks), so its cost shows in the whole step.
- adagc rows: fusedclip.AdaGC.step past its warm-up against the same rule in plain torch ops (`torch_adagc`,
  unfused: torch._foreach_norm, the rule, torch._foreach_mul_) and against fusedclip.clip_, on the model's gradients
  at mixed scales, restored before each call. The warm-up clipped hard, so every tensor is clipped on every timed
  step: the case where AdaGC writes every gradient, as clip_ does (when few tensors are clipped it writes less).

Targets (issue #26 item 4): ClipInBackward adds <= 1% to the whole step and <= 10% to the optimizer side over no
clipping; AdaGC.step within 1.15x of clip_.
"""
import argparse
import math
import os
import time

import torch

import fusedclip

from .machine import cpu_name
from .report import write_side_report
from .timing import summarize

VARIANTS = ("none", "grad_scale", "torch", "clip_", "clip_into_", "in_backward")
MODELS = ("mlp", "transformer", "many-small")
IN_BACKWARD_WHOLE = 0.01  # at most +1% on the whole step ...
IN_BACKWARD_SIDE = 0.10  # ... and +10% on the optimizer side
ADAGC_VS_CLIP = 1.15  # AdaGC.step / clip_
MAX_NORM = 1e-3  # below every model's gradient norm here: clipping is active


def mlp(width, depth, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])


class _Transformer(torch.nn.Module):
    def __init__(self, d, layers):
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
        self.enc = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d, d)

    def forward(self, x):
        return self.head(self.enc(x))


def make(model, size, batch, seed=0):
    """(module, input, target) for a model kind at a size: mlp (width 1024 x depth 24 at size 1), transformer
    (d_model 256 x 4 layers, sequence 64), many-small (Linear(16, 16) x 300: 600 tensors)."""
    g = torch.Generator().manual_seed(seed + 1)
    if model == "mlp":
        width, depth = max(8, int(1024 * size)), 24 if size >= 1 else 2
        m = mlp(width, depth, seed)
        x = torch.randn(batch, width, generator=g)
    elif model == "transformer":
        d, layers, seq = max(8, int(256 * size)), 4 if size >= 1 else 1, 64 if size >= 1 else 4
        torch.manual_seed(seed)
        m = _Transformer(d, layers)
        x = torch.randn(batch, seq, d, generator=g)
    elif model == "many-small":
        torch.manual_seed(seed)
        m = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(max(2, int(300 * size)))])
        x = torch.randn(batch, 16, generator=g)
    else:
        raise ValueError(f"unknown model {model!r}; the models are {MODELS}")
    return m, x, torch.randn(x.shape, generator=g)


def step_rows(model="mlp", size=1.0, batch=64, rounds=15, max_norm=MAX_NORM, width=None, depth=None):
    """The whole-step rows of one model (see the module docstring). width/depth: an MLP of that shape instead."""
    runs = {}
    for name in VARIANTS:
        if width is not None:
            m = mlp(width, depth)
            g = torch.Generator().manual_seed(1)
            x, y = torch.randn(batch, width, generator=g), torch.randn(batch, width, generator=g)
        else:
            m, x, y = make(model, size, batch)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-6, fused=True)
        clipper = fusedclip.ClipInBackward(m, max_norm, optimizer=opt) if name == "in_backward" else None
        runs[name] = (m, opt, clipper, x, y)

    grad_scale = torch.tensor(3.0)

    def one(name):
        m, opt, clipper, x, y = runs[name]
        t0 = time.perf_counter()
        torch.nn.functional.mse_loss(m(x), y).backward()
        t1 = time.perf_counter()
        if name == "torch":
            torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm)
        elif name == "clip_":
            fusedclip.clip_(m.parameters(), max_norm)
        elif name == "clip_into_":
            fusedclip.clip_into_(opt, max_norm)
        elif name == "in_backward":
            clipper.clip_()
        elif name == "grad_scale":  # no clip; the fused step divides by a grad_scale: the floor of the in-step paths
            opt.grad_scale = grad_scale
        opt.step()
        opt.grad_scale = None
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        return t2 - t0, t2 - t1

    for name in VARIANTS:  # one untimed step each (allocations, the optimizers' state)
        one(name)
    times = {name: ([], []) for name in VARIANTS}
    for _ in range(rounds):
        for name in VARIANTS:
            whole, side = one(name)
            times[name][0].append(whole)
            times[name][1].append(side)
    label = model if width is None else f"mlp{width}x{depth}"
    n_params = sum(p.numel() for p in runs["none"][0].parameters())
    n_tensors = len(list(runs["none"][0].parameters()))
    base_w, base_s = times["none"]
    # Each variant against no clipping in the same round (paired): the machine's load drifts between rounds by
    # more than the differences measured, and a ratio within a round cancels most of that drift.
    return [{"row": "step", "model": label, "variant": name, "params": n_params, "tensors": n_tensors,
             "batch": batch, "whole": summarize(w, w), "optimizer_side": summarize(s, s),
             "whole_vs_none": _median([a / b for a, b in zip(w, base_w)]),
             "side_vs_none": _median([a / b for a, b in zip(s, base_s)]),
             "cpu": cpu_name(), "torch": torch.__version__} for name, (w, s) in times.items()]


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


class torch_adagc:
    """AdaGC's post-warm-up rule (fusedclip.AdaGC's) in plain torch ops: the unfused baseline."""

    def __init__(self, n, lambda_rel=1.04, beta=0.99, eps=1e-6):
        self.gamma = torch.full((n,), math.inf, dtype=torch.float64)
        self.lambda_rel, self.beta, self.eps = lambda_rel, beta, eps

    def step(self, grads):
        norms = torch.stack(torch._foreach_norm(grads)).double()
        start = torch.where(torch.isinf(self.gamma), norms, self.gamma)
        coef = (self.lambda_rel * start / (norms + self.eps)).clamp(max=1.0)
        clipped = coef * norms
        self.gamma = torch.where(torch.isfinite(clipped), self.beta * start + (1 - self.beta) * clipped, self.gamma)
        torch._foreach_mul_(grads, list(coef.float().unbind()))


def adagc_rows(model="mlp", size=1.0, rounds=25, seed=0, width=None, depth=None):
    """The AdaGC rows of one model (see the module docstring): its parameters' shapes, gradients of mixed scales
    (1e-3 to 10), past the warm-up."""
    g = torch.Generator().manual_seed(seed)
    m = mlp(width, depth) if width is not None else make(model, size, 2)[0]
    params = list(m.parameters())
    saved = [torch.randn(p.shape, generator=g) * 10.0 ** (torch.rand((), generator=g).item() * 4 - 3) for p in params]

    def fresh():
        for p, s in zip(params, saved):
            p.grad = s.clone()

    fused = fusedclip.AdaGC(params, warmup_steps=1)
    plain = torch_adagc(len(params))
    fresh()
    fused.step()
    fresh()
    plain.step([p.grad for p in params])
    calls = {"adagc-fused": fused.step, "adagc-torch": lambda: plain.step([p.grad for p in params]),
             "clip_": lambda: fusedclip.clip_(params, 1.0)}
    times = {k: [] for k in calls}
    for _ in range(rounds):
        for k, f in calls.items():
            fresh()
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    label = model if width is None else f"mlp{width}x{depth}"
    return [{"row": "adagc", "model": label, "variant": k, "params": sum(p.numel() for p in params),
             "tensors": len(params), "time": summarize(v, v),
             "vs_clip": _median([a / b for a, b in zip(v, times["clip_"])]),  # paired, as the step rows
             "cpu": cpu_name(), "torch": torch.__version__} for k, v in times.items()]


def checks(rows):
    """The targets against the rows: [(what, value, target, ok)]."""
    out = []
    step = {(r["model"], r["variant"]): r for r in rows if r["row"] == "step"}
    for model in dict.fromkeys(m for m, _ in step):
        base, ib = step.get((model, "none")), step.get((model, "in_backward"))
        if base and ib:
            whole, side = ib["whole_vs_none"] - 1, ib["side_vs_none"] - 1
            out.append((f"{model}: ClipInBackward's whole step over no clipping", whole, IN_BACKWARD_WHOLE,
                        whole <= IN_BACKWARD_WHOLE))
            out.append((f"{model}: ClipInBackward's optimizer side over no clipping", side, IN_BACKWARD_SIDE,
                        side <= IN_BACKWARD_SIDE))
    ada = {(r["model"], r["variant"]): r for r in rows if r["row"] == "adagc"}
    for model in dict.fromkeys(m for m, _ in ada):
        f, c = ada.get((model, "adagc-fused")), ada.get((model, "clip_"))
        if f and c:
            ratio = f["vs_clip"]
            out.append((f"{model}: AdaGC.step / clip_", ratio, ADAGC_VS_CLIP, ratio <= ADAGC_VS_CLIP))
    return out


def floor_notes(rows):
    """ClipInBackward against the `grad_scale` row (no clip; the fused step divides by a grad_scale): what is left of
    its cost above what torch's fused step charges for any coefficient handed to it. Paired medians, as the rows."""
    step = {(r["model"], r["variant"]): r for r in rows if r["row"] == "step"}
    out = []
    for model in dict.fromkeys(m for m, _ in step):
        floor, ib = step.get((model, "grad_scale")), step.get((model, "in_backward"))
        if floor and ib:
            out.append(f"- {model}: the fused step's grad_scale alone (no clip) over no clipping: whole step "
                       f"{(floor['whole_vs_none'] - 1) * 100:+.1f}%, optimizer side "
                       f"{(floor['side_vs_none'] - 1) * 100:+.1f}%; ClipInBackward: "
                       f"{(ib['whole_vs_none'] - 1) * 100:+.1f}%, {(ib['side_vs_none'] - 1) * 100:+.1f}%")
    return out


def table(rows):
    lines = []
    step = [r for r in rows if r["row"] == "step"]
    if step:
        lines += ["| model | params | tensors | variant | whole step ms (p20-p80) | vs none (paired) | optimizer side "
                  "ms (p20-p80) | vs none (paired) |", "|---|---:|---:|---|---:|---:|---:|---:|"]
        for r in step:
            w, s = r["whole"], r["optimizer_side"]
            lines.append(f"| {r['model']} | {r['params']:,} | {r['tensors']} | {r['variant']} | "
                         f"{w['median_s'] * 1e3:.2f} ({w['p20_s'] * 1e3:.2f}-{w['p80_s'] * 1e3:.2f}) | "
                         f"{(r['whole_vs_none'] - 1) * 100:+.1f}% | "
                         f"{s['median_s'] * 1e3:.2f} ({s['p20_s'] * 1e3:.2f}-{s['p80_s'] * 1e3:.2f}) | "
                         f"{(r['side_vs_none'] - 1) * 100:+.1f}% |")
    ada = [r for r in rows if r["row"] == "adagc"]
    if ada:
        lines += ["", "| model | params | tensors | AdaGC variant | ms (p20-p80) | vs clip_ (paired) |",
                  "|---|---:|---:|---|---:|---:|"]
        for r in ada:
            t = r["time"]
            lines.append(f"| {r['model']} | {r['params']:,} | {r['tensors']} | {r['variant']} | "
                         f"{t['median_s'] * 1e3:.3f} ({t['p20_s'] * 1e3:.3f}-{t['p80_s'] * 1e3:.3f}) | "
                         f"{r['vs_clip']:.2f}x |")
    return "\n".join(lines)


def measure(models=MODELS, size=1.0, batch=64, rounds=15):
    rows = []
    for model in models:
        rows += step_rows(model, size, batch, rounds)
        rows += adagc_rows(model, size, max(rounds, 25))
    return rows


def main(models=MODELS, out=os.path.join("bench", "results", "local"), tag="", size=1.0, batch=64, rounds=25):
    """`python -m fusedclip bench --step`: runs the rows, prints the table and the targets, writes out/..._step{tag}
    .json and .md with the machine, its load and the date; returns 0 when every target holds, else 1."""
    from .machine import environment

    meta = environment(torch.device("cpu"))
    meta["date_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    try:  # the machine's load when the run started (and ended): timings scale with it
        meta["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    meta["threads"] = torch.get_num_threads()
    rows = measure(models, size, batch, rounds)
    try:
        meta["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    results = checks(rows)
    head = (f"# Issue 26 rows: a training step with clipping, and AdaGC; {meta.get('device_name')}, "
            f"{meta['threads']} threads, torch {meta.get('torch')}, {meta['date_utc']} UTC, load average "
            f"{meta.get('load_average')} before, {meta.get('load_average_after')} after")
    text = "\n".join([head, "", table(rows), ""] +
                     [f"- {'ok' if ok else 'MISSED'}: {what}: {value * 100:+.2f}% (target <= {target * 100:+.0f}%)"
                      if "over no clipping" in what else
                      f"- {'ok' if ok else 'MISSED'}: {what}: {value:.2f}x (target <= {target:.2f}x)"
                      for what, value, target, ok in results] + [""] + floor_notes(rows))
    print(text)
    write_side_report(out, meta, rows, results, text, "step", tag)
    return 0 if all(ok for *_, ok in results) else 1


def cli(argv=None):
    ap = argparse.ArgumentParser(description="issue #26 rows: ClipInBackward and AdaGC in a training step")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--size", type=float, default=1.0, help="scale of the models (tests run them tiny)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--out", default=os.path.join("bench", "results", "local"))
    args = ap.parse_args(argv)
    return main(args.models.split(","), args.out, "", args.size, args.batch, args.rounds)


if __name__ == "__main__":
    raise SystemExit(cli())
