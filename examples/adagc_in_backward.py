"""AdaGC with the optimizer step inside backward (torch's register_post_accumulate_grad_hook recipe), compared with
AdaGC run after backward.

Optimizer-in-backward steps each parameter as soon as its gradient is final and frees the gradient, so the
gradients of the whole model never exist at once (on GPUs that is the memory saved). A global clip cannot run there:
its norm needs every gradient. AdaGC (fusedclip.AdaGC, arXiv 2502.11034) clips each tensor against its own history,
so after its warm-up each hook clips its parameter (clipper.clip_param_) right before that parameter's step. During
the warm-up (global clipping) the hooks leave the gradients alone and the loop clips and steps after backward.

    python examples/adagc_in_backward.py [--steps 30] [--warmup 5]

prints, per step, the loss of both runs and the largest difference between their parameters.
"""
import argparse
import copy

import torch

import fusedclip


def make_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
                               torch.nn.Linear(64, 1))


def batches(steps, seed, spike_every=7):
    """Fresh random regression batches; every spike_every-th one is scaled by 30 (a loss spike to clip)."""
    g = torch.Generator().manual_seed(seed)
    for t in range(steps):
        x = torch.randn(16, 32, generator=g)
        y = torch.randn(16, 1, generator=g)
        if spike_every and t % spike_every == spike_every - 1:
            x, y = 30 * x, 30 * y
        yield x, y


def in_backward(model, clipper, lr=1e-3):
    """torch's recipe: one optimizer per parameter, stepped from its post-accumulate-grad hook; with AdaGC, the
    parameter is clipped first (once the warm-up is over). Returns the per-parameter optimizers."""
    optimizers = {p: torch.optim.AdamW([p], lr=lr, foreach=False) for p in model.parameters()}

    def hook(p):
        if clipper.in_warmup:  # global clipping needs every gradient: done after backward (below)
            return
        clipper.clip_param_(p)
        optimizers[p].step()
        optimizers[p].zero_grad()

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(hook)
    return optimizers


def train_step_in_backward(model, clipper, optimizers, x, y):
    warmup = clipper.in_warmup  # read before backward: the hooks' steps end the step when the backward ends
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    if warmup:
        clipper.step()
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad()
    return loss.detach()


def train_step_after_backward(model, clipper, optimizers, x, y):
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    clipper.step()
    for opt in optimizers.values():
        opt.step()
        opt.zero_grad()
    return loss.detach()


def run(steps=30, warmup=5, seed=0, lr=1e-3, log=print):
    """Both runs from the same model and batches; returns the largest parameter difference at each step."""
    a = make_model(seed)
    b = copy.deepcopy(a)
    clip_a = fusedclip.AdaGC(a, warmup_steps=warmup)
    clip_b = fusedclip.AdaGC(b, warmup_steps=warmup)
    opt_a = in_backward(a, clip_a, lr)
    opt_b = {p: torch.optim.AdamW([p], lr=lr, foreach=False) for p in b.parameters()}
    diffs = []
    for t, (x, y) in enumerate(batches(steps, seed + 1)):
        loss_a = train_step_in_backward(a, clip_a, opt_a, x, y)
        loss_b = train_step_after_backward(b, clip_b, opt_b, x, y)
        diff = max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))
        diffs.append(diff)
        log(f"step {t + 1:3d}  {'warm-up ' if t < warmup else 'per-tensor'}  loss in-backward {loss_a.item():10.4f}"
            f"  after-backward {loss_b.item():10.4f}  max |param diff| {diff:.3g}")
    return diffs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    diffs = run(args.steps, args.warmup, args.seed)
    print(f"largest parameter difference over {args.steps} steps: {max(diffs):.3g}")


if __name__ == "__main__":
    main()
