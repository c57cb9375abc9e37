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

Everything after the norm is float64 arithmetic on 0-dim device tensors, in zclip's order of operations,
so the decisions are those of zclip's Python floats; the choices are torch.where, never a Python `if` on a
value, so step() never waits for the device. Known differences from zclip: the norm is fusedclip's
(accumulated in fp32, fp64 for fp64 gradients; zclip accumulates in the first parameter's dtype); step()
returns that norm as a 0-dim tensor in the accumulation dtype (fp32, fp64 for fp64 gradients), not a float; squares and square roots are correctly
rounded (x * x, sqrt) where zclip's `**` goes through libm's pow, which is 1 ulp off in about 0.1% of cases.
"""
import math
import numbers

import torch

from . import backends
from ._core import _as_list, _by_device, _total_norm
from .clip import get_total_norm

_MODES = ("zscore", "percentile")
_CLIP_OPTIONS = ("adaptive_scaling", "mean")


def _real(x, what, ok, must):
    """x as a float, or a ValueError saying what it must be."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or math.isnan(x) or not ok(x):
        raise ValueError(f"fusedclip.ZClip: {what} must be {must}, got {x!r}")
    return float(x)


class ZClip:
    """Adaptive gradient clipping with the rules and arguments of zclip 1.0.0's ZClip (see the module
    docstring); call step(model) after backward and before optimizer.step(). `backend` is fusedclip's
    ("auto", "native", "triton", "torch") and is used for the norm."""

    def __init__(self, alpha=0.97, z_thresh=2.5, max_grad_norm=1.0, eps=1e-6, warmup_steps=25, mode="zscore",
                 clip_option="adaptive_scaling", clip_factor=1.0, skip_update_on_spike=False, *, backend="auto"):
        self.alpha = _real(alpha, "alpha", lambda a: 0.0 <= a <= 1.0, "a number in [0, 1]")
        self.z_thresh = _real(z_thresh, "z_thresh", lambda z: 0.0 < z < math.inf, "a positive finite number")
        self.max_grad_norm = (None if max_grad_norm is None else
                              _real(max_grad_norm, "max_grad_norm", lambda m: m > 0.0, "a positive number or None"))
        self.eps = _real(eps, "eps", lambda e: 0.0 < e < math.inf, "a positive finite number")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"fusedclip.ZClip: warmup_steps must be an int >= 0, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        self.mode = mode.lower() if isinstance(mode, str) else mode
        if self.mode not in _MODES:
            raise ValueError(f"fusedclip.ZClip: mode must be one of {_MODES}, got {mode!r}")
        # zclip ignores clip_option in percentile mode (None included); a misspelt one is still an error here.
        if clip_option is None and self.mode == "percentile":
            clip_option = "adaptive_scaling"
        self.clip_option = clip_option.lower() if isinstance(clip_option, str) else clip_option
        if self.clip_option not in _CLIP_OPTIONS:
            raise ValueError(f"fusedclip.ZClip: clip_option must be one of {_CLIP_OPTIONS}, got {clip_option!r}")
        self.clip_factor = _real(clip_factor, "clip_factor", lambda c: 0.0 < c < math.inf, "a positive finite number")
        if not isinstance(skip_update_on_spike, bool):
            raise ValueError(f"fusedclip.ZClip: skip_update_on_spike must be a bool, got {skip_update_on_spike!r}")
        self.skip_update_on_spike = skip_update_on_spike
        if backend != "auto" and backend not in backends.BACKENDS:
            raise ValueError(f"fusedclip.ZClip: unknown backend {backend!r}; the backends are "
                             f"{sorted(backends.BACKENDS)} or 'auto'")
        self.backend = backend
        # zclip appends the norm before testing len(buffer) >= warmup_steps, so 0 warm-up steps behave as 1.
        self._n_warmup = max(warmup_steps, 1)
        # The step count lives on the host: it is known there without asking the device, and it picks the
        # warm-up or the EMA code path (a Python branch on a host value, not on a device one).
        self.steps = 0
        self._state = None  # created on the gradients' device by the first step (or load_state_dict)

    # -- state ------------------------------------------------------------------------------------------

    def _new_state(self, device):
        f64 = dict(dtype=torch.float64, device=device)
        return {"buffer": torch.zeros(self._n_warmup, **f64),  # the warm-up norms
                "mean": torch.zeros((), **f64), "var": torch.zeros((), **f64),
                # a device copy of z_thresh: CUDA computes tensor / Python scalar as a * (1 / b), which is not
                # the division zclip does; tensor / tensor is.
                "z_thresh": torch.full((), self.z_thresh, **f64)}  # torch.full: a fill, not a host-to-device copy

    def _state_on(self, device):
        if self._state is None:
            self._state = self._new_state(device)
        elif self._state["mean"].device != device:  # only when the gradients moved (or a CPU state was loaded)
            self._state = {k: v.to(device) for k, v in self._state.items()}
        return self._state

    def state_dict(self):
        """The state to resume from exactly: the step count and float64 tensors (clones, on their device)."""
        s = self._state or self._new_state("cpu")
        return {"steps": self.steps, "buffer": s["buffer"].clone(), "mean": s["mean"].clone(),
                "var": s["var"].clone()}

    def load_state_dict(self, state_dict):
        steps, buf = state_dict["steps"], state_dict["buffer"]
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"fusedclip.ZClip.load_state_dict: steps must be an int >= 0, got {steps!r}")
        if tuple(buf.shape) != (self._n_warmup,):
            raise ValueError(f"fusedclip.ZClip.load_state_dict: the buffer holds {tuple(buf.shape)} norms, this "
                             f"clipper's warm-up takes ({self._n_warmup},): warmup_steps differs")
        device = self._state["mean"].device if self._state is not None else buf.device
        state = self._new_state(device)
        for k in ("buffer", "mean", "var"):
            state[k].copy_(state_dict[k])
        self._state, self.steps = state, steps

    # -- the step ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, model_or_params):
        """Clips the gradients in place; returns their total norm before clipping (a 0-dim tensor on the
        first gradient's device). Call after backward, before optimizer.step()."""
        params = (model_or_params.parameters() if isinstance(model_or_params, torch.nn.Module)
                  else model_or_params)
        grads = [p.grad for p in _as_list(params) if p.grad is not None]
        if grads:
            # The norm in the accumulation dtype (fp32; fp64 for fp64 grads), never rounded to fp16/bf16 before
            # the EMA sees it; backend="torch" is torch's own norm (in the gradients' dtype), as everywhere.
            be = backends.resolve(self.backend, grads[0].device.type)
            norm = (get_total_norm(grads, 2.0, backend="torch") if be.name == "torch"
                    else _total_norm(grads, 2.0, be, "fusedclip.ZClip.step"))
            device = norm.device
        else:  # zclip counts a step without gradients as a norm of 0
            device = self._state["mean"].device if self._state is not None else torch.device("cpu")
            norm = torch.zeros((), device=device)
        s = self._state_on(device)
        x = norm.to(torch.float64)
        if self.steps < self._n_warmup:
            coef = self._warmup(s, x, norm)
        else:
            coef = self._adaptive(s, x)
        self.steps += 1
        # The scaling pass runs on every step with a cap or after warm-up, with a coefficient of exactly 1
        # when nothing is to change (g * 1.0 == g, bit for bit): skipping it would need the coefficient on the
        # host. The one-launch kernel of a later phase skips the write on the device instead.
        if coef is not None and grads:
            for dev, group in _by_device(grads).items():
                torch._foreach_mul_(group, coef.to(dev))
        return norm

    def _warmup(self, s, x, norm):
        s["buffer"][self.steps].copy_(x)
        if self.steps == self._n_warmup - 1:
            self._init_ema(s)
        if self.max_grad_norm is None:
            return None
        # zclip calls torch.nn.utils.clip_grad_norm_(max_grad_norm) here: torch's coefficient, max / (norm +
        # 1e-6) clamped to 1, in the norm's dtype (fp32 at least, so fp16/bf16 gradients get an fp32 one).
        n = norm if norm.dtype == torch.float64 else norm.float()
        return (self.max_grad_norm / (n + 1e-6)).clamp(max=1.0)

    def _init_ema(self, s):
        # Python's sum() adds left to right; torch.sum may not, so the sums are spelt out (once per run).
        buf = s["buffer"]
        n = torch.full_like(buf[0], self._n_warmup)  # a tensor divisor, for the reason given at "z_thresh"
        total = buf[0]
        for i in range(1, self._n_warmup):
            total = total + buf[i]
        mean = total / n
        d = buf - mean
        sq = d * d
        total = sq[0]
        for i in range(1, self._n_warmup):
            total = total + sq[i]
        s["mean"].copy_(mean)
        s["var"].copy_(total / n)

    def _adaptive(self, s, x):
        mean, var, zt = s["mean"], s["var"], s["z_thresh"]
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

        new_mean = self.alpha * mean + (1 - self.alpha) * target
        d = target - new_mean  # the variance is updated about the new mean, as zclip does
        new_var = self.alpha * var + (1 - self.alpha) * (d * d)
        if self.skip_update_on_spike:
            new_mean = torch.where(spike, mean, new_mean)
            new_var = torch.where(spike, var, new_var)
        mean.copy_(new_mean)
        var.copy_(new_var)
        return coef
