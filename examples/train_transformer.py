"""The classic training loop with fusedclip: nn.Transformer on a synthetic copy task, Adam, mixed precision,
gradient clipping, per-layer gradient norms with a warning when one jumps.

    python examples/train_transformer.py --small --steps 100 --device cpu   # CPU, well under a minute
    python examples/train_transformer.py                                    # d_model=512, on the GPU if any

Mixed precision: on CUDA, fp16 autocast with a GradScaler (gradients are unscaled before clipping, so
max_norm means the same as without AMP); on CPU, bf16 autocast (no scaler needed).

Each step also times torch's own clip_grad_norm_ on a copy of the same gradients, so the closing summary
compares the two measured in the same run. --spike-step N multiplies one layer's gradients by 1000 at
step N (a simulated bad batch) to show the jump warning and the clip catching it.
"""
import argparse
import math
import re
import time
from collections import defaultdict

import torch

import fusedclip

PAD, BOS = 0, 1  # token ids; the data uses 2..vocab-1


def copy_batch(batch, seq_len, vocab, generator, device):
    """src: random tokens; the model must reproduce them. tgt_in is the target shifted right after BOS."""
    src = torch.randint(2, vocab, (batch, seq_len), generator=generator).to(device)
    tgt_in = torch.cat([torch.full((batch, 1), BOS, device=device), src[:, :-1]], dim=1)
    return src, tgt_in, src


class CopyTransformer(torch.nn.Module):
    def __init__(self, vocab, d_model, nhead, layers, ff, max_len):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d_model)
        self.pos = torch.nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        self.transformer = torch.nn.Transformer(d_model, nhead, layers, layers, ff, dropout=0.0, batch_first=True)
        self.head = torch.nn.Linear(d_model, vocab)

    def forward(self, src, tgt_in):
        n = tgt_in.shape[1]
        mask = torch.nn.Transformer.generate_square_subsequent_mask(n, device=src.device)
        s = self.embed(src) + self.pos[: src.shape[1]]
        t = self.embed(tgt_in) + self.pos[:n]
        return self.head(self.transformer(s, t, tgt_mask=mask, tgt_is_causal=True))


def layer_of(name):
    """'transformer.decoder.layers.3.linear1.weight' -> 'decoder.layers.3'; 'embed.weight' -> 'embed'."""
    m = re.match(r"transformer\.((?:en|de)coder\.layers\.\d+)\.", name)
    if m:
        return m.group(1)
    m = re.match(r"transformer\.((?:en|de)coder\.norm)\.", name)
    return m.group(1) if m else name.split(".")[0]


class LayerNormMonitor:
    """Per-layer gradient norms each step (one host sync for all of them) and a warning when a layer's norm
    exceeds `factor` times its running mean. (A later fusedclip adds per_tensor=True, which returns the
    per-tensor norms from the clip's own pass; until then each layer is one get_total_norm call.)"""

    def __init__(self, model, factor, warmup=10):
        groups = defaultdict(list)
        for name, p in model.named_parameters():
            groups[layer_of(name)].append(p)
        self.groups = dict(groups)
        self.factor, self.warmup = factor, warmup
        self.mean = {}
        self.warnings = 0

    def norms(self):
        names = list(self.groups)
        norms = torch.stack([fusedclip.get_total_norm([p.grad for p in self.groups[k] if p.grad is not None])
                             .float().to(next(iter(self.groups[k])).device) for k in names])
        return dict(zip(names, norms.tolist()))

    def update(self, step, norms):
        for name, value in norms.items():
            mean = self.mean.get(name)
            if mean is not None and step >= self.warmup and (not math.isfinite(value) or value > self.factor * mean):
                self.warnings += 1
                print(f"WARNING step {step}: gradient norm of {name} jumped to {value:.3g} "
                      f"({value / mean:.1f}x its running mean {mean:.3g})")
            if mean is None:
                self.mean[name] = value
            elif math.isfinite(value):  # folded in capped, so one spike does not blind the monitor for long
                self.mean[name] = 0.9 * mean + 0.1 * min(value, self.factor * mean)


class ClipTimer:
    """Times fusedclip.clip_ on the real gradients and torch's clip_grad_norm_ on a copy of the same gradients
    (the copy is made outside the timed region); which one goes first alternates step by step."""

    def __init__(self, params, device):
        self.params = [p for p in params if p.requires_grad]
        self.shadow = [torch.nn.Parameter(torch.empty_like(p), requires_grad=True) for p in self.params]
        self.cuda = torch.device(device).type == "cuda"
        self.seconds = {"fusedclip": 0.0, "torch": 0.0}
        self.max_rel_diff = 0.0
        self.calls = 0

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def _timed(self, key, fn):
        self._sync()
        t0 = time.perf_counter()
        out = fn()
        self._sync()
        self.seconds[key] += time.perf_counter() - t0
        return out

    def clip(self, max_norm):
        for s, p in zip(self.shadow, self.params):
            s.grad = None if p.grad is None else p.grad.clone()
        fused = lambda: fusedclip.clip_(self.params, max_norm)  # noqa: E731
        # backend="torch" is torch.nn.utils.clip_grad_norm_ itself (even if torch has been patched)
        ref = lambda: fusedclip.clip_(self.shadow, max_norm, backend="torch")  # noqa: E731
        if self.calls % 2:
            norm = self._timed("fusedclip", fused)
            torch_norm = self._timed("torch", ref)
        else:
            torch_norm = self._timed("torch", ref)
            norm = self._timed("fusedclip", fused)
        self.calls += 1
        n, t = float(norm), float(torch_norm)
        if math.isfinite(n) and math.isfinite(t):
            self.max_rel_diff = max(self.max_rel_diff, abs(n - t) / max(abs(t), 1e-30))
        return norm


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="a small model and batch: runs on CPU in seconds")
    ap.add_argument("--max-norm", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=None, help="default: 1e-3 with --small, 3e-4 without")
    ap.add_argument("--jump-factor", type=float, default=5.0,
                    help="warn when a layer's gradient norm exceeds this many times its running mean")
    ap.add_argument("--log-every", type=int, default=None)
    ap.add_argument("--spike-step", type=int, default=None,
                    help="multiply one layer's gradients by 1000 at this step (a simulated bad batch)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if args.small:
        cfg = dict(vocab=32, d_model=64, nhead=4, layers=2, ff=128, seq_len=12, batch=32)
    else:
        cfg = dict(vocab=1000, d_model=512, nhead=8, layers=6, ff=2048, seq_len=64, batch=64)
    lr = args.lr if args.lr is not None else (1e-3 if args.small else 3e-4)
    log_every = args.log_every or max(1, args.steps // 10)

    torch.manual_seed(args.seed)
    model = CopyTransformer(cfg["vocab"], cfg["d_model"], cfg["nhead"], cfg["layers"], cfg["ff"],
                            cfg["seq_len"]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    use_cuda = device.type == "cuda"
    amp_dtype = torch.float16 if use_cuda else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if use_cuda else None
    monitor = LayerNormMonitor(model, args.jump_factor)
    timer = ClipTimer(model.parameters(), device)
    spike_layer = "decoder.layers.0"
    data = torch.Generator().manual_seed(args.seed + 1)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: d_model={cfg['d_model']}, {cfg['layers']}+{cfg['layers']} layers, {n_params / 1e6:.2f}M "
          f"parameters in {len(list(model.parameters()))} tensors; device {device}, autocast {amp_dtype}"
          f"{' + GradScaler' if scaler else ''}; fusedclip backend {fusedclip.available_backends(device)[0]}")

    first_loss = loss_value = None
    start = time.perf_counter()
    for step in range(args.steps):
        src, tgt_in, tgt = copy_batch(cfg["batch"], cfg["seq_len"], cfg["vocab"], data, device)
        with torch.autocast(device_type=device.type, dtype=amp_dtype):
            logits = model(src, tgt_in)
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, cfg["vocab"]), tgt.reshape(-1))
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
        else:
            loss.backward()
        if step == args.spike_step:
            for p in monitor.groups[spike_layer]:
                p.grad.mul_(1000.0)

        layer_norms = monitor.norms()
        total = timer.clip(args.max_norm)  # fusedclip.clip_(model.parameters(), max_norm), timed
        monitor.update(step, layer_norms)

        if scaler is not None:
            scaler.step(opt)  # skips the step if the unscaled gradients held inf/NaN
            scaler.update()
        else:
            opt.step()

        loss_value = loss.item()
        first_loss = loss_value if first_loss is None else first_loss
        if step % log_every == 0 or step == args.steps - 1:
            top = sorted(layer_norms.items(), key=lambda kv: -kv[1])[:3]
            print(f"step {step:5d}  loss {loss_value:.4f}  grad norm {float(total):.3g}  largest layers: "
                  + ", ".join(f"{k} {v:.3g}" for k, v in top))
    seconds = time.perf_counter() - start

    fc, tc = (timer.seconds[k] / max(args.steps, 1) * 1e3 for k in ("fusedclip", "torch"))
    print(f"summary: {args.steps} steps in {seconds:.1f} s = {args.steps / seconds:.2f} steps/s on {device}; "
          f"loss {first_loss:.4f} -> {loss_value:.4f}; {monitor.warnings} jump warning(s)")
    print(f"summary: clipping {n_params / 1e6:.2f}M gradients, per step: fusedclip {fc:.3f} ms, "
          f"torch.nn.utils.clip_grad_norm_ {tc:.3f} ms (x{tc / fc if fc else float('nan'):.2f}, same gradients, "
          f"same run); largest relative difference of their norms {timer.max_rel_diff:.1e}")


if __name__ == "__main__":
    main()
