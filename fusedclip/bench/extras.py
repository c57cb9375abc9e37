"""Extras (--extras): clipping fused with what surrounds it in a training loop (GradScaler.unscale_ before,
the optimizer step after), against the unfused sequences it replaces. Each regime's sequences are providers
built on a workload of their own; run.measure_extras times them like the plain rows."""
import collections
import copy
import math

import torch

import fusedclip

from .providers import Provider, always
from .workload import MAX_NORM

AMP_SCALE = 2.0 ** 12  # the loss scale the AMP rows' gradients carry
ADAMW_BYTES = 7  # fused AdamW step: reads grad, param, exp_avg, exp_avg_sq; writes the last three (x N)
EXTRAS_DEFAULT_SETS = ["gpt2-small", "many-small"]


def _fresh_scaler_state(scaler):
    scaler._per_optimizer_states = collections.defaultdict(torch.amp.grad_scaler._refresh_per_optimizer_state)


def amp_providers(device, wl):
    """Each call: gradients scaled by AMP_SCALE, a GradScaler whose per-optimizer stage is fresh (reset on
    restore, outside the timed region); the call unscales and clips. Returns the unscaled norm."""
    scaler = torch.amp.GradScaler(device.type, init_scale=AMP_SCALE)
    scaler.scale(torch.ones((), device=device))  # creates the scale tensor (GradScaler's lazy init)
    opts = {id(ps): torch.optim.SGD(ps, lr=0.0) for ps in wl.lists}  # holds the params; never steps
    wl.on_restore.append(lambda i: _fresh_scaler_state(scaler))

    def torch_seq(device):
        def call(ps):
            scaler.unscale_(opts[id(ps)])
            return torch.nn.utils.clip_grad_norm_(ps, MAX_NORM)
        return call

    def fused_clip_seq(device):
        def call(ps):
            scaler.unscale_(opts[id(ps)])
            return fusedclip.clip_(ps, MAX_NORM)
        return call

    def fused(device):
        return lambda ps: fusedclip.unscale_clip_(scaler, opts[id(ps)], MAX_NORM)

    unfused = lambda n: {"bytes_moved": 5 * n}  # noqa: E731  unscale r+w (2N) + norm r (N) + scale r+w (2N)
    return [
        Provider("amp-torch", "unscale_+torch clip", torch_seq, always, bytes_moved=unfused),
        Provider("amp-clip", "unscale_+fusedclip.clip_", fused_clip_seq, always, bytes_moved=unfused),
        Provider("amp-fused", "fusedclip.unscale_clip_", fused, always, bytes_moved=lambda n: {"bytes_moved": 2 * n}),
    ]


def optim_providers(device, wl):
    """Each call: clip, then a fused AdamW step (one optimizer per list, shared by the three sequences).
    bytes_moved is the whole step (clipping + AdamW's 7N); clip_bytes_moved the clipping part."""
    opts = {id(ps): torch.optim.AdamW(ps, lr=1e-3, fused=True) for ps in wl.lists}
    wl.optimizers = opts

    def seq(clip):
        def make(device):
            def call(ps):
                norm = clip(ps)
                opts[id(ps)].step()
                return norm
            return call
        return make

    def check(fn, wl):
        """The returned norm, and the parameters after the call against clip_grad_norm_ + step from the same
        parameters and optimizer state."""
        ps, opt = wl.lists[0], opts[id(wl.lists[0])]
        p0 = [p.detach().clone() for p in ps]
        st = copy.deepcopy(opt.state_dict())
        got_norm = float(fn(ps))
        got = [p.detach().clone() for p in ps]
        with torch.no_grad():
            torch._foreach_copy_([p.detach() for p in ps], p0)
        opt.load_state_dict(st)
        wl.restore(0)
        torch.nn.utils.clip_grad_norm_(ps, MAX_NORM)
        opt.step()
        wl.restore(0)
        problems = []
        want = wl.expected_norm()
        if not math.isfinite(got_norm) or abs(got_norm - want) > 2e-2 * want:
            problems.append(f"norm {got_norm:.6g}, expected {want:.6g}")
        d_ref = torch.cat([(p.detach().float() - a.float()).flatten() for p, a in zip(ps, p0)])
        d_got = torch.cat([(g.float() - a.float()).flatten() for g, a in zip(got, p0)])
        err, size = float((d_got - d_ref).norm()), float(d_ref.norm())
        if not (size > 0 and err <= 2e-2 * size):
            problems.append(f"step differs from clip_grad_norm_ + step by {err:.3g} (update norm {size:.3g})")
        return "; ".join(problems)

    def by(clip_n):
        return lambda n: {"bytes_moved": (clip_n + ADAMW_BYTES) * n, "clip_bytes_moved": clip_n * n}

    def into(ps):
        return fusedclip.clip_into_(opts[id(ps)], MAX_NORM)

    return [
        Provider("optim-torch", "torch clip+AdamW step", seq(lambda ps: torch.nn.utils.clip_grad_norm_(ps, MAX_NORM)),
                 always, bytes_moved=by(3), check=check),
        Provider("optim-clip", "fusedclip.clip_+step", seq(lambda ps: fusedclip.clip_(ps, MAX_NORM)), always,
                 bytes_moved=by(3), check=check),
        Provider("optim-into", "fusedclip.clip_into_+step", seq(into), always, bytes_moved=by(1), check=check),
    ]


EXTRAS = [  # (regime, workload options, providers, baseline key, copies of the gradients' size per list)
    ("amp", {"grad_scale": AMP_SCALE}, amp_providers, "amp-torch", 1),
    ("optim", {"real_params": True}, optim_providers, "optim-torch", 4),  # grad, param, exp_avg, exp_avg_sq
]

NOTE = ("amp rows: gradients scaled by {scale:g} (torch.amp.GradScaler), a fresh scaler stage and the gradients "
        "restored before each call; bytes moved: unscale_clip_ 2N, unscale_ + clip 5N (unscale r+w, norm r, scale "
        "r+w). optim rows: clip + torch.optim.AdamW(fused=True).step(); bytes moved is the whole step: clipping "
        "(clip_into_ N, clip_ 3N) + AdamW's 7N. Speedups against the torch sequence of the same regime.")
