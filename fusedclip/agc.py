"""Adaptive gradient clipping (AGC; Brock et al. 2021, the NFNets paper), fused.

    fusedclip.clip_agc_(model.parameters(), clip_factor=0.01)

Each unit of a parameter (a row along dim 0 when it has two or more dimensions, else the whole tensor) has its
gradient scaled by max / max(||g_unit||, 1e-6), where max = clip_factor * max(||w_unit||, eps), but only where
||g_unit|| >= max: the rule of timm.utils.agc.adaptive_clip_grad (timm 1.0.31), whose arguments this takes. Units
that are not clipped keep their exact bits. Norms are accumulated in fp32 (fp64 for fp64) whatever the dtype
(timm computes them in the tensor's own dtype, so for fp16/bf16 a unit near its threshold may decide
differently). The native backend does it in one parallel pass (CPU) or one launch (CUDA) over all parameters.
"""
import math

import torch

from . import backends
from ._core import as_list, by_device, check_tensors, check_writable, parse_norm_type, parse_number

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def agc_torch(weights, grads, clip_factor, eps, norm_type):
    """The same rule with torch ops, pair by pair (backend="torch", and norm_type 0, which no kernel takes)."""
    for w, g in zip(weights, grads):
        acc = _acc(g.dtype)
        dims = tuple(range(1, g.ndim)) if g.ndim > 1 else None
        w_norm = torch.linalg.vector_norm(w, norm_type, dim=dims, keepdim=g.ndim > 1, dtype=acc)
        g_norm = torch.linalg.vector_norm(g, norm_type, dim=dims, keepdim=g.ndim > 1, dtype=acc)
        max_norm = w_norm.clamp(min=eps) * clip_factor
        scaled = (g.to(acc) * (max_norm / g_norm.clamp(min=1e-6))).to(g.dtype)
        g.copy_(torch.where(g_norm < max_norm, g, scaled))


class _TorchAgc:
    """What backend="torch" (and any backend without an AGC kernel) runs."""

    @staticmethod
    def agc(weights, grads, clip_factor, eps, norm_type):
        agc_torch(weights, grads, clip_factor, eps, norm_type)


def _pairs(params):
    """(weight, gradient) of every parameter with a non-empty gradient; raises on anything the kernels
    cannot take, before anything is written."""
    check_tensors(params, "clip_agc_", "parameters")
    pairs = []
    for i, p in enumerate(params):
        g = p.grad
        if g is None:
            continue
        if p.layout != torch.strided or g.layout != torch.strided:
            raise NotImplementedError(f"fusedclip.clip_agc_: parameter {i} or its gradient is {g.layout}; only "
                                      "dense (strided) parameters and gradients are supported")
        if g.shape != p.shape:
            raise ValueError(f"fusedclip.clip_agc_: parameter {i} has shape {tuple(p.shape)} but its gradient "
                             f"{tuple(g.shape)}")
        if g.dtype not in _FLOATS or p.dtype != g.dtype:
            raise TypeError(f"fusedclip.clip_agc_: parameter {i} and its gradient must share one dtype of float32, "
                            f"float64, float16 or bfloat16, got {p.dtype} and {g.dtype}")
        if g.device != p.device:
            raise ValueError(f"fusedclip.clip_agc_: parameter {i} is on {p.device} but its gradient on {g.device}")
        if g.numel():
            check_writable([g], "clip_agc_", offset=i)
            pairs.append((p, g))  # read only, under no_grad (a detach per parameter would cost a dispatch each)
    return pairs


@torch.no_grad()
def clip_agc_(parameters, clip_factor=0.01, eps=1e-3, norm_type=2.0, *, backend="auto"):
    """Adaptive gradient clipping in place (timm's adaptive_clip_grad; see the module's doc): each unit of a
    gradient (a row for 2-D and up, else the whole tensor) is scaled to clip_factor * max(||w_unit||, eps) when
    its norm reaches that, and left alone (bit for bit) otherwise.

    Args:
        parameters (Tensor or iterable of Tensors): the weights, whose .grad are clipped (a generator is fine);
            those without a gradient, or with an empty one, are left alone, and parameters are never written.
        clip_factor (float): the largest gradient norm allowed, relative to the unit's weight norm. Default 0.01.
        eps (float): the smallest weight norm a threshold is computed from. Default 1e-3.
        norm_type (float, int or str): a number, 'inf', or 'fro' (the 2-norm, which timm's tensor.norm takes for
            1-D and 2-D units only). Default 2.0.
        backend (str): "auto" (default), "native", "triton" or "torch".

    Returns:
        None
    """
    params = as_list(parameters)
    clip_factor = parse_number(clip_factor, "clip_agc_", "clip_factor")
    eps = parse_number(eps, "clip_agc_", "eps")
    if math.isnan(clip_factor) or math.isnan(eps):
        raise ValueError(f"fusedclip.clip_agc_: clip_factor and eps must not be NaN, got {clip_factor} and {eps}")
    # 'fro' (the 2-norm), which timm's tensor.norm(norm_type) takes for 1-D and 2-D units, for any shape here
    p = parse_norm_type(2.0 if isinstance(norm_type, str) and norm_type == "fro" else norm_type, "clip_agc_")
    pairs = _pairs(params)
    if not pairs:
        backends.resolve(backend, "cpu")  # an unknown backend name still raises
        return None
    devices = by_device([g for _, g in pairs])
    # every backend resolved before any group is written
    runs = [(_runner(backend, device.type, p), device) for device in devices]
    if len(runs) == 1:
        runs[0][0].agc([w for w, _ in pairs], [g for _, g in pairs], clip_factor, eps, p)
        return None
    for be, device in runs:
        group = [(w, g) for w, g in pairs if g.device == device]
        be.agc([w for w, _ in group], [g for _, g in group], clip_factor, eps, p)
    return None


def _runner(backend, device_type, p):
    be = backends.resolve(backend, device_type)
    if be.delegates_to_torch or p == 0.0 or not be.fused_agc:
        return _TorchAgc
    return be
