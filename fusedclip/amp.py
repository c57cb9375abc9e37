"""Clipping fused with what surrounds it in a training loop: AMP's unscale (unscale_clip_) and the
optimizer step (clip_into_)."""
import torch

from . import backends
from ._core import call_backend, check_writable, grads_of, parse_norm_type, parse_number, total_norm_of
from .clip import clip_, get_total_norm
from .optimizers import begin_unscale, hand_over_coefficient, is_fused, params_of, still_scaled
from .ops import acc_dtype, result_dtype


@torch.no_grad()
def unscale_clip_(scaler, optimizer, max_norm, norm_type=2.0, *, error_if_nonfinite=False, backend="auto"):
    """`scaler.unscale_(optimizer)` then `clip_(<optimizer's params>, max_norm, norm_type)`, reading and
    writing each gradient once (on CUDA: one launch). Returns the norm of the unscaled gradients.

    Afterwards the optimizer counts as unscaled for the scaler: `scaler.step(optimizer)` skips the step when
    a gradient was inf/NaN, `scaler.update()` lowers the scale, and a second `scaler.unscale_(optimizer)`
    raises, exactly as after the two calls. With a disabled scaler this is clip_. With error_if_nonfinite=True
    (which needs a host sync anyway), on several devices, with norm_type 0, or with a backend without the fused
    pass ("torch"), it runs the two calls.

    Args:
        scaler (torch.amp.GradScaler): the scaler whose scale the gradients still carry.
        optimizer (torch.optim.Optimizer): its parameters' gradients are unscaled and clipped; the scaler's
            bookkeeping is per optimizer.
        max_norm (float): the largest norm allowed for the unscaled gradients.
        norm_type (float, int or str): the p of the p-norm. Default 2.0.
        error_if_nonfinite (bool): raise RuntimeError when the norm is inf or NaN. Default False.
        backend (str): "auto" (default), "native", "triton" or "torch".

    Returns:
        Tensor: the total norm of the unscaled gradients before clipping (0-dim, as clip_ returns it).
    """
    params = params_of(optimizer)
    if not scaler.is_enabled():
        return clip_(params, max_norm, norm_type, error_if_nonfinite, backend=backend)
    grads = grads_of(params, "unscale_clip_")
    be = backends.resolve(backend, grads[0].device.type if grads else "cpu")
    p = parse_norm_type(norm_type, "unscale_clip_")
    max_norm = parse_number(max_norm, "unscale_clip_", "max_norm")
    if error_if_nonfinite or not grads or p == 0.0 or not be.fused_extras:
        scaler.unscale_(optimizer)
        return clip_(params, max_norm, p, error_if_nonfinite, backend=backend)

    check_writable(grads, "unscale_clip_")
    inv_scale, found_inf, commit = begin_unscale(scaler, optimizer, grads)
    ok, norm = call_backend(be.clip, grads, "unscale_clip_", max_norm, p, None, inv_scale, found_inf)
    if not ok:  # several devices
        scaler.unscale_(optimizer)
        return clip_(params, max_norm, p, backend=backend)
    commit()
    return norm


@torch.no_grad()
def clip_into_(optimizer, max_norm, norm_type=2.0, *, scaler=None, backend="auto"):
    """Clips by handing the coefficient to the optimizer instead of rewriting the gradients: one read of the
    gradients for the norm, no write; the next `optimizer.step()` (or `scaler.step(optimizer)`) applies
    grad * coef. Returns the total norm (of the unscaled gradients).

    Works with torch's fused optimizers (fused=True: Adam, AdamW, SGD, Adagrad), which take a device-side
    grad_scale. Other optimizers fall back to clip_ (or unscale_clip_ with a scaler), which writes the
    gradients. With a GradScaler: either call `scaler.unscale_(optimizer)` first, or pass `scaler=` so the
    norm of the still-scaled gradients is unscaled on the device. After the step, the parameters equal those
    of clip_ followed by step() (up to the rounding of grad / (1 / coef) versus grad * coef).

    Args:
        optimizer (torch.optim.Optimizer): its parameters' gradients are clipped; with fused=True its next
            step applies the coefficient.
        max_norm (float): the largest norm allowed.
        norm_type (float, int or str): the p of the p-norm. Default 2.0.
        scaler (torch.amp.GradScaler, optional): a scaler whose scale the gradients may still carry.
        backend (str): "auto" (default), "native", "triton" or "torch".

    Returns:
        Tensor: the total norm of the (unscaled) gradients before clipping, 0-dim, in the promotion of their
        dtypes (tensor(0.) without gradients).
    """
    params = params_of(optimizer)
    scaled = still_scaled(scaler, optimizer)
    if not is_fused(optimizer):
        if scaled:
            return unscale_clip_(scaler, optimizer, max_norm, norm_type, backend=backend)
        return clip_(params, max_norm, norm_type, backend=backend)
    grads = grads_of(params, "clip_into_")
    max_norm = parse_number(max_norm, "clip_into_", "max_norm")
    p = parse_norm_type(norm_type, "clip_into_")  # checked also without gradients, as clip_ does
    if not grads:
        return torch.tensor(0.0)
    device = grads[0].device
    be = backends.resolve(backend, device.type)
    if be.delegates_to_torch:
        norm = get_total_norm(grads, p, backend="torch").to(device, acc_dtype(grads))
    else:  # the norm in the accumulation dtype (not rounded to bf16/fp16), so the coef is fp32-accurate
        norm = total_norm_of(grads, p, be, "clip_into_").to(device)
    if scaled:  # the grads are scaled: the norm of the unscaled ones is norm / scale
        norm = norm * scaler._scale.double().reciprocal().to(device, norm.dtype)
    hand_over_coefficient(optimizer, max_norm, norm)  # the fused step applies it
    return norm.to(result_dtype(grads))
