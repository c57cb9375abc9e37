"""ZClip rows (--zclip): fusedclip.ZClip.step against the published zclip package's ZClip.step (version 1.0.0,
`from zclip import ZClip`) and against plain fusedclip.clip_, on a set's gradients, past the clippers' warm-up.

Both clippers get the same arguments (ARGS) and a fresh warm-up per set and regime, on a small module of their
own whose gradient norms are NOCLIP_NORM times WARMUP_JITTER: the EMA starts at mean NOCLIP_NORM with a std of
a few percent. The timed calls then see the set's gradients (restored between calls as in the plain rows):
- clip: norm CLIP_NORM, a spike (z-score ~270 at first); both clip to the adaptive threshold (just above the mean);
- noclip: norm NOCLIP_NORM, z-score ~0: nothing to scale.
The EMA keeps updating during the timing (the norm is the same every call, so the regime does not change).
The set's parameters are registered on an nn.Module, which all three rows get, as a user would call them:
ZClip.step(model), clip_(model.parameters(), max_norm).
"""
import importlib.util
import math

import torch

import fusedclip

from .providers import Provider, always
from .workload import CLIP_NORM, MAX_NORM, NOCLIP_NORM, check_call, total_norm

ARGS = dict(alpha=0.97, z_thresh=2.5, max_grad_norm=MAX_NORM, eps=1e-6, warmup_steps=5, mode="zscore",
            clip_option="adaptive_scaling", clip_factor=1.0, skip_update_on_spike=False)
WARMUP_JITTER = (0.9, 1.1, 1.0, 0.95, 1.05)  # warm-up norms: NOCLIP_NORM times these (std ~7% of the mean)
ZCLIP_DEFAULT_SETS = ["bert-base", "bert-base-bf16", "many-small"]
BASELINE = "zclip-ref"
CLIP_KEY = "zclip-clip"
FUSED_KEY = "zclip-fused"
ZCLIP_VERSION = "1.0.0"


def reference_available(device):
    if importlib.util.find_spec("zclip") is None:
        return False, f"the zclip package is not installed (pip install --no-deps zclip=={ZCLIP_VERSION})"
    return True, ""


def holder(params):
    """An nn.Module whose parameters are `params` (zclip's step takes a model: it calls model.parameters()
    and model.modules())."""
    m = torch.nn.Module()
    for i, p in enumerate(params):
        m.register_parameter(f"p{i}", p)
    return m


def warm_up(clipper, device):
    """Runs the clipper's warm-up steps on a module of its own (gradient norms NOCLIP_NORM * WARMUP_JITTER),
    so that the timed calls are past it and see a known mean and std."""
    p = torch.nn.Parameter(torch.zeros(16, device=device))
    m = holder([p])
    for f in WARMUP_JITTER[:ARGS["warmup_steps"]]:
        p.grad = torch.full((16,), NOCLIP_NORM * f / 4.0, device=device)  # norm: 4 * value
        clipper.step(m)


def expected_limit(mean, var, norm, args=ARGS):
    """zclip 1.0.0's rule (mode zscore, clip_option adaptive_scaling) from the state before a step: the norm
    the gradients must have after it. Written out here as a third implementation, for the check."""
    std = math.sqrt(var)
    z = (norm - mean) / (std + args["eps"])
    limit = norm
    if z > args["z_thresh"]:
        eta = z / args["z_thresh"]
        limit = (mean + args["z_thresh"] * std / eta) * args["clip_factor"]
    if args["max_grad_norm"] is not None:
        limit = min(limit, args["max_grad_norm"])
    return limit


def check_zclip(fn, wl):
    """One step on list 0: the returned norm, and the gradients' norm after it against zclip's rule applied to
    the clipper's state before it (fn.state() -> (mean, var)). In the clip regime the step must clip (a spike),
    in the noclip regime it must not: this also checks that the warm-up set the EMA up as intended."""
    mean, var = fn.state()
    before = total_norm(wl.grads[0])
    got = float(fn(wl.lists[0]))
    want = wl.expected_norm()
    problems = []
    if not math.isfinite(got) or abs(got - want) > 2e-2 * want:
        problems.append(f"norm {got:.6g}, expected {want:.6g}")
    after = total_norm(wl.grads[0])
    limit = expected_limit(mean, var, got)
    want_after = limit if got > limit else got
    if abs(after - want_after) > 2e-2 * want_after:
        problems.append(f"norm after the step {after:.6g}, expected {want_after:.6g} (EMA mean {mean:.6g}, "
                        f"var {var:.3g})")
    if wl.clipping and not after < 0.5 * before:
        problems.append(f"no spike clipped: norm after {after:.6g} (before {before:.6g})")
    if not wl.clipping and abs(after - before) > 1e-6 * before:
        problems.append(f"scaled gradients that were no spike: norm {before:.6g} -> {after:.6g}")
    if wl.clipping:
        wl.restore(0)
    return "; ".join(problems)


def zclip_providers(device, wl):
    """The three rows, with fresh clippers warmed up (call once per set and regime)."""
    mods = {id(ps): holder(ps) for ps in wl.lists}
    be = fusedclip.backends.resolve("auto", device.type).name

    def fused(device):
        clipper = fusedclip.ZClip(**ARGS)
        warm_up(clipper, device)

        def call(ps):
            return clipper.step(mods[id(ps)])

        def state():
            sd = clipper.state_dict()
            return float(sd["mean"]), float(sd["var"])

        call.state, call.clipper = state, clipper
        return call

    def reference(device):
        from zclip import ZClip

        clipper = ZClip(**ARGS)
        warm_up(clipper, device)

        def call(ps):
            return clipper.step(mods[id(ps)])

        call.state, call.clipper = (lambda: (float(clipper.mean), float(clipper.var))), clipper
        return call

    def plain(device):
        return lambda ps: fusedclip.clip_(mods[id(ps)].parameters(), MAX_NORM)

    return [
        Provider(BASELINE, f"zclip {ZCLIP_VERSION} ZClip.step", reference, reference_available, check=check_zclip),
        Provider(FUSED_KEY, f"fusedclip.ZClip.step ({be})", fused, always, check=check_zclip),
        Provider(CLIP_KEY, f"fusedclip.clip_ ({be})", plain, always, check=check_call),
    ]


def relate_to_clip(rows, label, regime):
    """fusedclip.ZClip's time over plain clip_'s of the same set and regime (median, mean, p90)."""
    same = [r for r in rows if r.get("kind") == "zclip" and r["set"] == label and r["regime"] == regime
            and "median_s" in r]
    base = next((r for r in same if r["provider"] == CLIP_KEY), None)
    if base is None:
        return
    for r in same:
        r["vs_clip"] = r["median_s"] / base["median_s"]
        r["mean_vs_clip"] = r["mean_s"] / base["mean_s"]
        r["p90_vs_clip"] = r["p90_s"] / base["p90_s"]


NOTE = (f"zclip rows: ZClip({', '.join(f'{k}={v!r}' for k, v in ARGS.items())})" +
        f"; both clippers warmed up ({ARGS['warmup_steps']} steps, norms {NOCLIP_NORM:g} x "
        f"{', '.join(f'{j:g}' for j in WARMUP_JITTER)}) before each set and regime (not timed in the busy "
        f"regimes); clip: norm {CLIP_NORM:g}, a "
        f"spike clipped to the adaptive threshold; noclip: norm {NOCLIP_NORM:g}, no spike. Speedups against "
        f"zclip {ZCLIP_VERSION}'s ZClip.step; 'time / clip_' is over fusedclip.clip_'s (max_norm {MAX_NORM:g}).")
