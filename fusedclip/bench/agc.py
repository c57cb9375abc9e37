"""AGC rows (--agc): fusedclip.clip_agc_ against timm's adaptive_clip_grad (timm.utils.agc, the loop of about
eight torch ops per parameter that timm's --clip-mode agc runs), on the sets of a ResNet-50 and a ViT-B.

The workload has real weights: per unit (a row, or a whole 1-D tensor), a random weight whose norm puts the
unit's gradient at 2x its threshold clip_factor * ||w|| (clipped) or at 0.5x (left alone), one or the other at
random, so about half the units are scaled each call; the gradients are restored between calls. Bytes moved
(every provider's row): what must move, the weights and gradients read once and the clipped half of the
gradients written: 2.5 N for N bytes of gradients."""
import importlib.util
import math

import torch

import fusedclip

from .providers import Provider
from .workload import Workload

AGC_DEFAULT_SETS = ["resnet50", "vit-b"]
CLIP_FACTOR = 0.01
REGIME = "agc"
BASELINE = "agc-timm"
PER_LIST = 2  # weights and gradients


def timm_available():
    return importlib.util.find_spec("timm") is not None


def _unit_norms(t):
    dims = tuple(range(1, t.ndim)) if t.ndim > 1 else None
    return torch.linalg.vector_norm(t.float(), dim=dims, keepdim=t.ndim > 1)


def make_workload(specs, device, rotations, seed=0):
    """A Workload with real parameters whose weights put about half the units over their threshold."""
    wl = Workload(specs, device, rotations, seed=seed, real_params=True)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    weights = []
    for g in wl.pristine:
        w = torch.randn(g.shape, generator=gen, device=device, dtype=torch.float32)
        rows = g.shape[0] if g.ndim > 1 else 1
        shape = (rows,) + (1,) * (g.ndim - 1) if g.ndim > 1 else ()
        side = torch.where(torch.rand(rows, generator=gen, device=device) < 0.5, 0.5, 2.0).reshape(shape)
        w = w / _unit_norms(w) * (_unit_norms(g) / CLIP_FACTOR) * side
        weights.append(w.to(g.dtype))
    with torch.no_grad():
        for params in wl.lists:
            torch._foreach_copy_([p.detach() for p in params], weights)
    return wl


def check(fn, wl):
    """One call on list 0 against timm on a copy: the same gradients (fp32 rounding aside) and about half the
    units clipped. '' or what is wrong."""
    from timm.utils.agc import adaptive_clip_grad

    ps = wl.lists[0]
    theirs = []
    for p in ps:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        theirs.append(q)
    before = [p.grad.clone() for p in ps]
    adaptive_clip_grad(theirs, CLIP_FACTOR)
    fn(ps)
    err = sum(float((p.grad.float() - q.grad.float()).norm()) ** 2 for p, q in zip(ps, theirs))
    size = sum(float(q.grad.float().norm()) ** 2 for q in theirs)
    units = changed = 0
    for p, b in zip(ps, before):
        rows = p.grad.shape[0] if p.grad.ndim > 1 else 1
        diff = (p.grad != b).reshape(rows, -1).any(1)
        units += rows
        changed += int(diff.sum())
    wl.restore(0)
    problems = []
    # timm's norms and factors are in the gradients' dtype: fp16/bf16 ones agree only to that precision
    tol = 1e-4 if all(p.grad.dtype in (torch.float32, torch.float64) for p in ps) else 2e-2
    if not (size > 0 and math.sqrt(err) <= tol * math.sqrt(size)):
        problems.append(f"gradients differ from timm's by {math.sqrt(err):.3g} (norm {math.sqrt(size):.3g})")
    if not 0.3 <= changed / units <= 0.7:
        problems.append(f"{changed} of {units} units clipped, expected about half")
    return "; ".join(problems)


def _fused(backend):
    def make(device):
        return lambda ps: fusedclip.clip_agc_(ps, CLIP_FACTOR, backend=backend)
    return make


def _timm(device):
    from timm.utils.agc import adaptive_clip_grad

    return lambda ps: adaptive_clip_grad(ps, CLIP_FACTOR)


def providers(device):
    moved = lambda n: {"bytes_moved": int(2.5 * n)}  # noqa: E731  (see the module's doc)
    out = [Provider("agc-timm", "timm adaptive_clip_grad", _timm, lambda d: (True, ""), bytes_moved=moved,
                    check=check),
           Provider("agc-native", "fusedclip.clip_agc_ native", _fused("native"), lambda d: (True, ""),
                    bytes_moved=moved, check=check)]
    if "triton" in fusedclip.available_backends(device.type):
        out.append(Provider("agc-triton", "fusedclip.clip_agc_ triton", _fused("triton"), lambda d: (True, ""),
                            bytes_moved=moved, check=check))
    return out


NOTE = ("agc rows: fusedclip.clip_agc_ against timm.utils.agc.adaptive_clip_grad (clip_factor {cf}), real "
        "weights with about half the units over their threshold, the gradients restored before each call; bytes "
        "moved 2.5N (weights and gradients read once, the clipped half written); speedups against timm")
