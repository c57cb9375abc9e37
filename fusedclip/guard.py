"""The spike guard's last step: skipping an optimizer step that a device-side flag marks, without a host sync
where the optimizer allows it.

torch's fused optimizers (Adam, AdamW, SGD, Adagrad with fused=True) take a device tensor `found_inf`: when it
is nonzero their step leaves the parameters and the optimizer state (moments, step counts) alone, decided on
the device. For them the flag is handed over as `optimizer.found_inf` for one step.

Other optimizers cannot be told on the device. Zeroing the gradients is not a skip (Adam would still decay its
moments, count the step and apply weight decay), so for them the flag is read on the host before their step (one
host sync per step, as GradScaler.step does for such optimizers) and, when set, their gradients are hidden for
that step (set to None, which every torch optimizer skips entirely) and put back after it.
"""
import torch


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
