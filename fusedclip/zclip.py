"""ZClip: adaptive gradient clipping (Kumar et al., 2025, arXiv 2504.02507) without a host sync.

The rules are those of the `zclip` package, version 1.0.0, step for step:

* Warm-up: the first `warmup_steps` norms are collected (and the gradients clipped to `max_grad_norm`
  as torch.nn.utils.clip_grad_norm_ would); on the last of those steps the mean and the (population)
  variance of the collected norms start the EMA.
* Then each step: std = sqrt(var). A spike is
    - mode "percentile": norm > mean + z_thresh * std, clipped to that threshold;
    - mode "zscore": z = (norm - mean) / (std + eps) > z_thresh, clipped to
      (mean + z_thresh * std / (z / z_thresh)) * clip_factor  (clip_option "adaptive_scaling"), or
      to mean  (clip_option "mean").
  The limit is the threshold on a spike, else the norm itself, capped by max_grad_norm (None: no cap);
  the gradients are scaled by limit / (norm + 1e-6) when norm > limit.
* The EMA is then fed the limit before the cap (the threshold on a spike, else the norm), unless
  skip_update_on_spike and this step was a spike: mean = alpha * mean + (1 - alpha) * x, then
  var = alpha * var + (1 - alpha) * (x - mean)^2 with the mean just updated.

The state (step count, EMA mean and variance, skipped steps, the warm-up norms) is one float64 tensor on the
gradients' device. With the native and Triton backends one kernel pass does everything (csrc/zclip_rule.h,
fusedclip/triton_zclip.py): the norm, the coefficient from the state, the scaling only when it is not 1 and the
state's update, with no host sync, so step() can be captured in a CUDA graph (after a warm-up call) and traced
by torch.compile(fullgraph=True). backend="torch" (and gradients on several devices) runs the same rule in
torch ops, which reads the step count on the host. Every operation of the rule is one correctly rounded
float64 operation in zclip's order, so the decisions are those of zclip's Python floats.

Known differences from zclip: the norm is fusedclip's (accumulated in fp32, fp64 for fp64 gradients; zclip
accumulates in the first parameter's dtype); step() returns that norm as a 0-dim tensor in the accumulation
dtype (fp32, fp64 for fp64 gradients), not a float; squares and square roots are correctly rounded (x * x,
sqrt) where zclip's `**` goes through libm's pow, which is 1 ulp off in about 0.1% of cases.

Beyond zclip: on_spike="skip" / on_nonfinite="skip" skip the optimizer step on a spike / a non-finite norm,
without a host sync for torch's fused optimizers (fusedclip/guard.py); AMP's unscale in the same pass
(step(..., scaler=, optimizer=)); gradients sharded over a process group or DTensors (the global norm first).
"""
import math
import numbers

import torch

from . import _ext, backends, guard
from . import distributed as _distributed
from ._core import _as_list, _by_device, _total_norm
from .amp import _begin_unscale, _hand_over, _optimizer_params
from .clip import _fast_path, get_total_norm

_MODES = ("zscore", "percentile")
_CLIP_OPTIONS = ("adaptive_scaling", "mean")
_ON = ("clip", "skip")
# The state's slots (csrc/zclip_rule.h ZSlot), then the warm-up norms.
STEPS, MEAN, VAR, SKIPPED, BUFFER = 0, 1, 2, 3, 4


def _real(x, what, ok, must):
    """x as a float, or a ValueError saying what it must be."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or math.isnan(x) or not ok(x):
        raise ValueError(f"fusedclip.ZClip: {what} must be {must}, got {x!r}")
    return float(x)


def _choice(x, what, choices):
    if x not in choices:
        raise ValueError(f"fusedclip.ZClip: {what} must be one of {choices}, got {x!r}")
    return x


class ZClip:
    """Adaptive gradient clipping with the rules and arguments of zclip 1.0.0's ZClip (see the module
    docstring); call step(model) after backward and before optimizer.step(). `backend` is fusedclip's
    ("auto", "native", "triton", "torch"). on_spike / on_nonfinite: "clip" (zclip's behaviour) or "skip" (the
    optimizer step is skipped: pass the optimizer to step()). process_group: the gradients are this rank's
    shards (DTensor gradients need none); every rank must call step()."""

    def __init__(self, alpha=0.97, z_thresh=2.5, max_grad_norm=1.0, eps=1e-6, warmup_steps=25, mode="zscore",
                 clip_option="adaptive_scaling", clip_factor=1.0, skip_update_on_spike=False, *, on_spike="clip",
                 on_nonfinite="clip", process_group=None, backend="auto"):
        self.alpha = _real(alpha, "alpha", lambda a: 0.0 <= a <= 1.0, "a number in [0, 1]")
        self.z_thresh = _real(z_thresh, "z_thresh", lambda z: 0.0 < z < math.inf, "a positive finite number")
        self.max_grad_norm = (None if max_grad_norm is None else
                              _real(max_grad_norm, "max_grad_norm", lambda m: m > 0.0, "a positive number or None"))
        self.eps = _real(eps, "eps", lambda e: 0.0 < e < math.inf, "a positive finite number")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"fusedclip.ZClip: warmup_steps must be an int >= 0, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        self.mode = _choice(mode.lower() if isinstance(mode, str) else mode, "mode", _MODES)
        # zclip ignores clip_option in percentile mode (None included); a misspelt one is still an error here.
        if clip_option is None and self.mode == "percentile":
            clip_option = "adaptive_scaling"
        self.clip_option = _choice(clip_option.lower() if isinstance(clip_option, str) else clip_option,
                                   "clip_option", _CLIP_OPTIONS)
        self.clip_factor = _real(clip_factor, "clip_factor", lambda c: 0.0 < c < math.inf, "a positive finite number")
        if not isinstance(skip_update_on_spike, bool):
            raise ValueError(f"fusedclip.ZClip: skip_update_on_spike must be a bool, got {skip_update_on_spike!r}")
        self.skip_update_on_spike = skip_update_on_spike
        self.on_spike = _choice(on_spike, "on_spike", _ON)
        self.on_nonfinite = _choice(on_nonfinite, "on_nonfinite", _ON)
        backends.check_name(backend, "ZClip")
        self.backend = backend
        self.process_group = process_group
        # zclip appends the norm before testing len(buffer) >= warmup_steps, so 0 warm-up steps behave as 1.
        self._n_warmup = max(warmup_steps, 1)
        # The kernels' config (csrc/zclip_rule.h ZConfigSlot), in that order.
        self._config = [self.alpha, self.z_thresh, self.max_grad_norm or 0.0, float(self.max_grad_norm is not None),
                        self.eps, float(self._n_warmup), float(self.mode == "percentile"),
                        float(self.clip_option == "mean"), self.clip_factor, float(skip_update_on_spike),
                        float(on_spike == "skip"), float(on_nonfinite == "skip")]
        self._skips = on_spike == "skip" or on_nonfinite == "skip"
        self._state = None  # created on the gradients' device by the first step (or load_state_dict)
        self._found = None  # the skip flag handed to the optimizer

    # -- state ------------------------------------------------------------------------------------------

    def _state_on(self, device):
        if self._state is None:
            self._state = torch.zeros(BUFFER + self._n_warmup, dtype=torch.float64, device=device)
        elif self._state.device != device:  # only when the gradients moved (or a CPU state was loaded)
            self._state = self._state.to(device)
        return self._state

    @property
    def steps(self):
        """The steps taken (skipped non-finite ones not counted). Reads the device: a host sync."""
        return 0 if self._state is None else int(self._state[STEPS])

    @property
    def skipped_steps(self):
        """How many steps were skipped (on_spike / on_nonfinite "skip"): a 0-dim float64 device tensor, no
        sync (it is a view of the state, updated by every step)."""
        return self._state_on(torch.device("cpu"))[SKIPPED] if self._state is None else self._state[SKIPPED]

    def state_dict(self):
        """The state to resume from exactly: the step count (an int: a host sync), the skipped steps, and the
        float64 tensors (clones, on their device)."""
        s = self._state if self._state is not None else torch.zeros(BUFFER + self._n_warmup, dtype=torch.float64)
        return {"steps": int(s[STEPS]), "skipped": int(s[SKIPPED]), "buffer": s[BUFFER:].clone(),
                "mean": s[MEAN].clone(), "var": s[VAR].clone()}

    def load_state_dict(self, state_dict):
        steps, buf = state_dict["steps"], state_dict["buffer"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"fusedclip.ZClip.load_state_dict: steps must be an int >= 0, got {steps!r}")
        if tuple(buf.shape) != (self._n_warmup,):
            raise ValueError(f"fusedclip.ZClip.load_state_dict: the buffer holds {tuple(buf.shape)} norms, this "
                             f"clipper's warm-up takes ({self._n_warmup},): warmup_steps differs")
        device = self._state.device if self._state is not None else buf.device
        s = torch.zeros(BUFFER + self._n_warmup, dtype=torch.float64, device=device)
        s[STEPS] = steps
        s[SKIPPED] = state_dict.get("skipped", 0)
        s[MEAN].copy_(state_dict["mean"])
        s[VAR].copy_(state_dict["var"])
        s[BUFFER:].copy_(buf)
        self._state = s

    # -- the step ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, model_or_params, optimizer=None, *, scaler=None):
        """Clips the gradients in place; returns their total norm before clipping (a 0-dim tensor on the
        first gradient's device). Call after backward, before optimizer.step().

        optimizer: needed with on_spike / on_nonfinite "skip" (its next step is skipped when this one is; see
        fusedclip/guard.py), and with scaler. scaler: a torch.amp.GradScaler whose gradients are still scaled:
        they are unscaled in the same pass (as scaler.unscale_(optimizer) then step() would), and the norm is
        the unscaled one."""
        params = _as_list(model_or_params.parameters() if isinstance(model_or_params, torch.nn.Module)
                          else model_or_params)
        if (self._skips or scaler is not None) and optimizer is None:
            raise ValueError("fusedclip.ZClip.step: pass the optimizer (step(model, optimizer)): "
                             + ("the scaler's state is per optimizer" if scaler is not None else
                                "on_spike / on_nonfinite 'skip' skips its step"))
        if self._state is not None and scaler is None and self.process_group is None and _fast_path(self.backend):
            # the eager fast path (csrc/python_module.cpp): the grads read in C++, one kernel; None: declined
            found = self._found_on(self._state.device) if self._skips else None
            norm = _ext._C.zclip_grads(params, self._state, self._config, found)
            if norm is not None:
                if self._skips:
                    guard.skip_next_step_if(optimizer, found)
                return norm
        grads = [p.grad for p in params if p.grad is not None]
        amp = scaler is not None and scaler.is_enabled()
        if amp and self._skips:
            raise NotImplementedError(
                "fusedclip.ZClip: on_spike / on_nonfinite 'skip' with a GradScaler is not supported: a skipped step "
                "would count as an overflow for scaler.update() and lower the loss scale. Use 'clip' with a scaler "
                "(scaler.step already skips steps whose gradients are inf/NaN)")
        sharded = self.process_group is not None or (grads and _distributed.is_dtensor(grads[0]))
        if amp and (sharded or not grads):
            scaler.unscale_(optimizer)
            amp = False
        device = grads[0].device if grads else (self._state.device if self._state is not None else None)
        be = backends.resolve(self.backend, device.type if device is not None else "cpu")
        # len(grads) > 0, not bool(grads): torch 2.6 and 2.11 cannot trace bool() of a list
        one_device = len(grads) > 0 and len({g.device for g in grads}) == 1
        fused = getattr(be, "zclip", None) is not None and one_device and be.name != "torch"
        if amp and not fused:
            scaler.unscale_(optimizer)
            amp = False

        inv_scale = found = None
        if amp:
            inv_scale, found, commit = _begin_unscale(scaler, optimizer, grads)
        elif self._skips:
            found = self._found_on(device if device is not None else torch.device("cpu"))
        if sharded:
            norm, local = self._global_norm(grads, be)
            state = self._state_on(norm.device)
            if fused and local:
                be.zclip(local, state, self._config, norm, None, found)
            else:
                self._torch_rule(state, local, norm, found)
        elif fused:
            state = self._state_on(device)
            norm = be.zclip(grads, state, self._config, None, inv_scale, found)
        else:
            norm = self._norm(grads, be, device)
            self._torch_rule(self._state_on(norm.device), grads, norm, found)
        if amp:
            commit()
        if self._skips:
            guard.skip_next_step_if(optimizer, found)
        return norm

    @torch.no_grad()
    def step_into(self, optimizer):
        """step() with the coefficient handed to the optimizer instead of written into the gradients, as
        fusedclip.clip_into_ does: one read of the gradients and no write; the next optimizer.step() applies
        grad * coef (up to the rounding of grad / (1 / coef) against grad * coef). For torch's fused
        optimizers (fused=True), which take a device-side grad_scale; with others, and for gradients on
        several devices or sharded ones, this is step(<the optimizer's params>, optimizer), which writes them.
        The gradients must be unscaled (with AMP: scaler.unscale_(optimizer) first). Returns the norm."""
        params = _optimizer_params(optimizer)
        grads = [p.grad for p in params if p.grad is not None]
        be = backends.resolve(self.backend, grads[0].device.type if grads else "cpu")
        if (not guard.is_fused(optimizer) or not grads or len({g.device for g in grads}) > 1
                or self.process_group is not None or _distributed.is_dtensor(grads[0]) or be.name == "torch"
                or getattr(be, "zclip", None) is None):
            return self.step(params, optimizer if self._skips else None)
        device = grads[0].device
        found = self._found_on(device) if self._skips else None
        factor = torch.empty((), dtype=torch.float32, device=device)
        norm = be.zclip(grads, self._state_on(device), self._config, None, None, found, factor)
        _hand_over(optimizer, factor.reciprocal())
        if self._skips:
            guard.skip_next_step_if(optimizer, found)
        return norm

    def _found_on(self, device):
        if self._found is None or self._found.device != device:
            self._found = torch.zeros((), dtype=torch.float32, device=device)
        else:
            self._found.zero_()
        return self._found

    def _norm(self, grads, be, device):
        if not grads:  # zclip counts a step without gradients as a norm of 0
            return torch.zeros((), device=device if device is not None else "cpu")
        # The norm in the accumulation dtype (fp32; fp64 for fp64 grads), never rounded to fp16/bf16 before
        # the EMA sees it; backend="torch" is torch's own norm (in the gradients' dtype), as everywhere.
        if be.name == "torch":
            return get_total_norm(grads, 2.0, backend="torch")
        return _total_norm(grads, 2.0, be, "fusedclip.ZClip.step")

    def _global_norm(self, grads, be):
        """(the norm of all ranks' shards in the accumulation dtype, this rank's local tensors to scale)."""
        if self.process_group is None:
            norm, local, _ = _distributed._dtensor_norm(grads, 2.0, be, "ZClip.step")
        else:
            norm, local = _distributed._group_norm(grads, 2.0, self.process_group, be, "ZClip.step"), grads
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in local) else torch.float32
        return norm.to(dtype), local

    # -- the rule in torch ops (backend="torch", several devices, sharded without a fused backend) ---------

    def _torch_rule(self, s, grads, norm, found):
        """zclip's rule on the state, in zclip's order of float64 operations; reads the step count on the
        host (this path is not the default one)."""
        x = norm.to(torch.float64)
        steps = int(s[STEPS])
        nonfinite = ~torch.isfinite(x)
        if steps < self._n_warmup:
            coef, spike = self._warmup_coef(norm), torch.zeros((), dtype=torch.bool, device=s.device)
        else:
            coef, spike, target = self._adaptive(s, x)
        skip = torch.zeros((), dtype=torch.bool, device=s.device)
        if self.on_nonfinite == "skip":
            skip = skip | nonfinite
        if self.on_spike == "skip":
            skip = skip | spike
        keep_stats = ~(skip & nonfinite)  # a skipped non-finite step leaves the statistics alone
        old = s.clone()
        if steps < self._n_warmup:
            s[BUFFER + steps].copy_(x)
            if steps == self._n_warmup - 1:
                self._init_ema(s)
        else:
            self._update_ema(s, x, spike, target)
        s[STEPS] += 1
        s.copy_(torch.where(keep_stats, s, old))
        s[SKIPPED] += skip.to(torch.float64)
        if found is not None:
            found.copy_(torch.maximum(found, skip.to(found.dtype)))
        if coef is not None and grads:
            coef = torch.where(skip, torch.ones_like(coef), coef)
            for dev, group in _by_device(grads).items():
                torch._foreach_mul_(group, coef.to(dev))

    def _warmup_coef(self, norm):
        if self.max_grad_norm is None:
            return None
        # zclip calls torch.nn.utils.clip_grad_norm_(max_grad_norm) here: torch's coefficient, max / (norm +
        # 1e-6) clamped to 1, in the norm's dtype (fp32 at least, so fp16/bf16 gradients get an fp32 one).
        n = norm if norm.dtype == torch.float64 else norm.float()
        return (self.max_grad_norm / (n + 1e-6)).clamp(max=1.0)

    def _init_ema(self, s):
        # Python's sum() adds left to right; torch.sum may not, so the sums are spelt out (once per run).
        buf = s[BUFFER:]
        n = torch.full_like(buf[0], self._n_warmup)  # a tensor divisor: CUDA computes tensor / scalar as a * (1 / b)
        total = buf[0]
        for i in range(1, self._n_warmup):
            total = total + buf[i]
        mean = total / n
        d = buf - mean
        sq = d * d
        total = sq[0]
        for i in range(1, self._n_warmup):
            total = total + sq[i]
        s[MEAN].copy_(mean)
        s[VAR].copy_(total / n)

    def _adaptive(self, s, x):
        mean, var = s[MEAN], s[VAR]
        zt = torch.full_like(mean, self.z_thresh)  # a tensor divisor, for the reason given in _init_ema
        std = torch.sqrt(var)
        if self.mode == "percentile":
            threshold = mean + self.z_thresh * std
            spike = x > threshold
        else:
            z = (x - mean) / (std + self.eps)
            spike = z > self.z_thresh
            if self.clip_option == "adaptive_scaling":
                eta = z / zt  # a larger z, a lower threshold
                threshold = (mean + (self.z_thresh * std) / eta) * self.clip_factor
            else:
                threshold = mean
        target = torch.where(spike, threshold, x)  # what the EMA is fed
        limit = target
        if self.max_grad_norm is not None:
            # Python's min(target, cap): the cap only when it is smaller (a NaN target stays NaN).
            limit = torch.where(target > self.max_grad_norm, self.max_grad_norm, target)
        coef = torch.where(x > limit, limit / (x + 1e-6), 1.0)
        return coef, spike, target

    def _update_ema(self, s, x, spike, target):
        mean, var = s[MEAN].clone(), s[VAR].clone()
        new_mean = self.alpha * mean + (1 - self.alpha) * target
        d = target - new_mean  # the variance is updated about the new mean, as zclip does
        new_var = self.alpha * var + (1 - self.alpha) * (d * d)
        if self.skip_update_on_spike:
            new_mean = torch.where(spike, mean, new_mean)
            new_var = torch.where(spike, var, new_var)
        s[MEAN].copy_(new_mean)
        s[VAR].copy_(new_var)
