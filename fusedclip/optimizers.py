"""What fusedclip asks of torch's optimizers and GradScaler, in one place: the step skipped on a device flag, the
clip coefficient handed to a fused step as its grad_scale, and GradScaler's unscale bookkeeping for a kernel that
unscales in its own pass. The public functions (clip.py, amp.py, zclip.py, in_backward.py) call only these.

Skipping. torch's fused optimizers (Adam, AdamW, SGD, Adagrad with fused=True) take a device tensor `found_inf`:
when it is nonzero their step leaves the parameters and the optimizer state (moments, step counts) alone, decided
on the device. For them the flag is handed over as `optimizer.found_inf` for one step. Other optimizers cannot be
told on the device. Zeroing the gradients is not a skip (Adam would still decay its moments, count the step and
apply weight decay), so for them the flag is read on the host before their step (one host sync per step, as
GradScaler.step does for such optimizers) and, when set, their gradients are hidden for that step (set to None,
which every torch optimizer skips entirely) and put back after it.

The coefficient. The same fused optimizers divide every gradient by the device tensor `optimizer.grad_scale`
inside their step: clip_into_ (and ZClip.step_into, ClipInBackward) set it for one step.
"""
import torch
from torch.amp.grad_scaler import OptState


def is_fused(optimizer):
    """Whether the optimizer's step takes device-side grad_scale / found_inf tensors (torch's fused ones)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False) and optimizer.defaults.get("fused"))


def skip_next_step_if(optimizer, flag):
    """Makes the optimizer's next step a no-op when `flag` (a 0-dim float32 tensor on its device) is nonzero."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"fusedclip: the optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not getattr(optimizer, "_fusedclip_guarded", False):
        optimizer.register_step_pre_hook(_before_step)
        optimizer.register_step_post_hook(_after_step)
        optimizer._fusedclip_guarded = True
    optimizer._fusedclip_skip_if = flag
    if is_fused(optimizer):
        optimizer.found_inf = flag


def _before_step(optimizer, _args, _kwargs):
    flag = getattr(optimizer, "_fusedclip_skip_if", None)
    optimizer._fusedclip_hidden = None
    if flag is None or is_fused(optimizer):
        return
    if flag.item():  # the host sync of the fallback
        hidden = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                hidden.append((p, p.grad))
                p.grad = None
        optimizer._fusedclip_hidden = hidden


def _after_step(optimizer, _args, _kwargs):
    for p, g in getattr(optimizer, "_fusedclip_hidden", None) or ():
        p.grad = g
    flag = getattr(optimizer, "_fusedclip_skip_if", None)
    # the flag is for one step; a found_inf set by someone else (GradScaler.step) is theirs to clear
    if flag is not None and getattr(optimizer, "found_inf", None) is flag:
        optimizer.found_inf = None
    optimizer._fusedclip_skip_if = None
    optimizer._fusedclip_hidden = None


def params_of(optimizer):
    """The optimizer's parameters, every group's, in order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def hand_over_grad_scale(optimizer, grad_scale):
    """Makes the fused optimizer's next step divide every gradient by grad_scale (a device tensor)."""
    if not getattr(optimizer, "_fusedclip_hooked", False):
        optimizer.register_step_post_hook(_forget_grad_scale_after_step)
        optimizer._fusedclip_hooked = True
    optimizer.grad_scale = grad_scale
    optimizer._fusedclip_grad_scale = grad_scale


def withdraw_grad_scale(optimizer):
    """Takes back the grad_scale hand_over_grad_scale gave: after the step it was for, or before it when a later clip
    found no clipping to do. One set by someone else (GradScaler) is left alone."""
    ours = getattr(optimizer, "_fusedclip_grad_scale", None)
    if ours is not None and getattr(optimizer, "grad_scale", None) is ours:
        optimizer.grad_scale = None
    optimizer._fusedclip_grad_scale = None


def takes_coefficient(optimizer, params):
    """Whether `optimizer` can apply a clipping coefficient in its step instead of a scaling pass: one of torch's
    fused optimizers whose parameters are exactly `params`."""
    return (optimizer is not None and is_fused(optimizer)
            and {id(p) for p in params_of(optimizer)} == {id(p) for p in params})


def hand_over_coefficient(optimizer, max_norm, norm):
    """Makes the fused optimizer's next step clip by `norm` (a device tensor): it divides every gradient by
    1 / coef, coef = max_norm / (norm + 1e-6) clamped to 1, as clip_grads_with_norm_ would multiply it."""
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    hand_over_grad_scale(optimizer, coef.reciprocal().float())


def _forget_grad_scale_after_step(optimizer, _args, _kwargs):
    # Ours is for one step only. A GradScaler that manages the attribute deletes it itself after the step;
    # leaving None keeps that `del` working and makes a later plain step unscaled.
    withdraw_grad_scale(optimizer)


def still_scaled(scaler, optimizer):
    """Whether the optimizer's gradients still carry the scaler's scale (an enabled scaler, not yet unscale_'d)."""
    if scaler is None or not scaler.is_enabled():
        return False
    return scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.READY


def begin_unscale(scaler, optimizer, grads):
    """For a kernel that unscales `grads` (one device) in its own pass: GradScaler.unscale_'s checks, in its
    words, before anything is written; returns (inv_scale, found_inf, commit), commit() marking the optimizer
    unscaled for the scaler once the kernel is launched."""
    scaler._check_scale_growth_tracker("unscale_")
    state = scaler._per_optimizer_states[id(optimizer)]
    if state["stage"] is OptState.UNSCALED:
        raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
    if state["stage"] is OptState.STEPPED:
        raise RuntimeError("unscale_() is being called after step().")
    if any(g.dtype == torch.float16 for g in grads):
        raise ValueError("Attempting to unscale FP16 gradients.")
    device = grads[0].device
    inv_scale = scaler._scale.double().reciprocal().float().to(device)  # as GradScaler computes it
    found_inf = torch.zeros((), dtype=torch.float32, device=device)

    def commit():
        state["found_inf_per_device"] = {device: found_inf}
        state["stage"] = OptState.UNSCALED

    return inv_scale, found_inf, commit
