"""Issue #26 rows: ClipInBackward and AdaGC, timed in a training step (not wired into `python -m fusedclip bench`
yet: run `python -m fusedclip.bench.adagc_rows`, which prints the rows as JSON lines).

- step rows: a whole training step (forward, backward, clip, fused AdamW step) of an MLP (24 x Linear(width, width)),
  clipping active, a fresh backward each step, interleaved over the variants: no clipping, torch's clip_grad_norm_,
  fusedclip.clip_, fusedclip.clip_into_, fusedclip.ClipInBackward (into the fused step). Each row has the whole step
  and the optimizer side (everything after backward) as the 20th, 50th and 80th percentiles.
- adagc rows: fusedclip.AdaGC.step past its warm-up against the same rule in plain torch ops (`torch_adagc`,
  unfused: torch._foreach_norm, the rule, torch._foreach_mul_) and against fusedclip.clip_, on the same gradients
  (restored between calls).
"""
import argparse
import json
import math
import time

import torch

import fusedclip

from .machine import cpu_name
from .timing import summarize

VARIANTS = ("none", "torch", "clip_", "clip_into_", "in_backward")


def mlp(width, depth, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])


def step_rows(width=1024, depth=24, batch=64, rounds=15, max_norm=0.01):
    """The whole-step rows (see the module docstring)."""
    x, y = torch.randn(batch, width), torch.randn(batch, width)
    runs = {}
    for name in VARIANTS:
        model = mlp(width, depth)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
        clipper = fusedclip.ClipInBackward(model, max_norm, optimizer=opt) if name == "in_backward" else None
        runs[name] = (model, opt, clipper)

    def one(name):
        model, opt, clipper = runs[name]
        t0 = time.perf_counter()
        torch.nn.functional.mse_loss(model(x), y).backward()
        t1 = time.perf_counter()
        if name == "torch":
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        elif name == "clip_":
            fusedclip.clip_(model.parameters(), max_norm)
        elif name == "clip_into_":
            fusedclip.clip_into_(opt, max_norm)
        elif name == "in_backward":
            clipper.clip_()
        opt.step()
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
    return [{"row": "step", "variant": name, "width": width, "depth": depth, "batch": batch,
             "whole": summarize(w, w), "optimizer_side": summarize(s, s), "cpu": cpu_name(),
             "torch": torch.__version__} for name, (w, s) in times.items()]


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


def adagc_rows(width=1024, depth=24, rounds=25, seed=0):
    """The AdaGC rows (see the module docstring): gradients of mixed scales (1e-3 to 10), past the warm-up."""
    g = torch.Generator().manual_seed(seed)
    params = [p for p in mlp(width, depth).parameters()]
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
    return [{"row": "adagc", "variant": k, "width": width, "depth": depth, "time": summarize(v, v), "cpu": cpu_name(),
             "torch": torch.__version__} for k, v in times.items()]


def main(argv=None):
    ap = argparse.ArgumentParser(description="issue #26 rows: ClipInBackward and AdaGC in a training step")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=24)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    for row in step_rows(args.width, args.depth, args.batch, args.rounds) + adagc_rows(args.width, args.depth,
                                                                                        args.rounds):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
