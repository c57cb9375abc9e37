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
gradients' device. With the native and Triton backends one kernel pass does everything (csrc/common/zclip_rule.h,
fusedclip/backends/triton/zclip.py): the norm, the coefficient from the state, the scaling only when it is not 1 and the
state's update, with no host sync, so step() can be captured in a CUDA graph (after a warm-up call) and traced
by torch.compile(fullgraph=True). backend="torch" (and gradients on several devices) runs the same rule in
torch ops, which reads the step count on the host. Every operation of the rule is one correctly rounded
float64 operation in zclip's order, so the decisions are those of zclip's Python floats.

zclip's public surface is kept: the arguments, `initialized`, `buffer`, `mean` and `var` (read from the device
state, and assignable: seeding `mean`, `var` then `initialized = True` starts the EMA from those values, as in
zclip), `apply_in_place_clipping`, and zclip's exception classes and wording for a bad `mode` or `clip_option`.
zclip's own test suite runs against this class (`make test-zclip-upstream`, tests/zclip_upstream/).

Deliberate differences from zclip, each for a reason:
* The norm is fusedclip's (accumulated in fp32, fp64 for fp64 gradients, never rounded to fp16/bf16; zclip
  accumulates in the first parameter's dtype), and step() returns it as a 0-dim tensor in that dtype, not a
  float: a float would be a host sync on every step. Squares and square roots are correctly rounded (x * x,
  sqrt) where zclip's `**` goes through libm's pow, 1 ulp off in about 0.1% of cases: the same results on
  every backend and device.
* The state lives on the device (for the sync-free step): reading or assigning `initialized`, `buffer`, `mean`
  or `var` is a host read of it (a sync on CUDA). `buffer` is a new list on each read (zclip's is the list it
  appends to: assign a list to change it) and holds at most warmup_steps - 1 norms between steps (the kernels
  keep a buffer of warmup_steps). The kernels tell the warm-up from the step count, so assigning
  `initialized = True` mid warm-up sets `steps` to warmup_steps, and False to the norms in the buffer.
* step() is one fused pass: it calls none of zclip's private methods (`_compute_grad_norm`,
  `_compute_clip_val`, ...) nor `apply_in_place_clipping`; replacing them changes nothing.
* step() with `initialized` True and `mean` or `var` None raises a RuntimeError before touching the gradients
  (zclip's fails with a TypeError in its arithmetic).
* Arguments are checked at construction (a ValueError) where zclip takes anything and fails or misbehaves
  later (alpha outside [0, 1], a non-positive z_thresh, eps, clip_factor or max_grad_norm, a non-int
  warmup_steps). A bad clip_option in zscore mode raises ZClipArgumentError, both a ValueError and zclip's
  AssertionError, with zclip's message (also under `python -O`, which strips zclip's assert); a bad mode a
  ValueError with zclip's message (also for a non-str, where zclip fails with an AttributeError);
  clip_option is case-insensitive (zclip lowers it after its check). In percentile mode clip_option is
  ignored and stored as None, as in zclip, whatever it is; one that is no option at all warns (a likely typo).

Beyond zclip: on_spike="skip" / on_nonfinite="skip" skip the optimizer step on a spike / a non-finite norm,
without a host sync for torch's fused optimizers (fusedclip/optimizers.py); AMP's unscale in the same pass
(step(..., scaler=, optimizer=)); gradients sharded over a process group or DTensors (the global norm first).
"""
import math
import numbers
import warnings

import torch

from . import _ext, backends, optimizers
from . import distributed as _distributed
from ._core import as_list, by_device, check_writable, grads_of, total_norm_of
from .optimizers import begin_unscale, hand_over_grad_scale, params_of
from .clip import clip_grads_with_norm_, get_total_norm
from .ops import ZCLIP_CONFIG, ZCLIP_STATE, acc_dtype, zclip_layout_mismatch

_MODES = ("zscore", "percentile")
_CLIP_OPTIONS = ("adaptive_scaling", "mean")
_ON = ("clip", "skip")
# The state's slots (ops.ZCLIP_STATE), then the warm-up norms.
STEPS, MEAN, VAR, SKIPPED = map(ZCLIP_STATE.index, ("steps", "mean", "var", "skipped"))
BUFFER = len(ZCLIP_STATE)
# Once: a stale extension whose kernels read another layout must not run (ZClip refuses to be made; see __init__).
_LAYOUT_MISMATCH = zclip_layout_mismatch() if _ext.LOADED else None
_UNIT_NORMS = {}  # dtype -> _unit_norm(dtype)


class ZClipArgumentError(ValueError, AssertionError):
    """A bad argument to ZClip. A ValueError, as fusedclip's other argument errors are, and an AssertionError,
    which is what zclip 1.0.0 raises for a bad clip_option (its check is an assert): code that catches either
    one keeps working."""


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
    shards (DTensor gradients need none); every rank must call step().

    Args:
        alpha (float): the EMA's smoothing factor, in [0, 1]. Default 0.97.
        z_thresh (float): the z-score (mode "zscore") or the number of standard deviations above the mean (mode
            "percentile") beyond which a norm is a spike; positive, finite. Default 2.5.
        max_grad_norm (float or None): a cap on the limit after the rule (None: no cap). Default 1.0.
        eps (float): added to the standard deviation in the z-score; positive, finite. Default 1e-6.
        warmup_steps (int): how many norms are collected (and clipped to max_grad_norm) before the EMA starts
            from their mean and variance; 0 behaves as 1, as in zclip. Default 25.
        mode (str): "zscore" (default) or "percentile".
        clip_option (str): in zscore mode, "adaptive_scaling" (default) or "mean" (case-insensitive); ignored and
            stored as None in percentile mode.
        clip_factor (float): multiplies the adaptive_scaling threshold; positive, finite. Default 1.0.
        skip_update_on_spike (bool): leave the EMA alone on a spike. Default False.
        on_spike (str): "clip" (default, zclip's behaviour) or "skip" (leave the gradients and skip the
            optimizer's next step).
        on_nonfinite (str): the same choice for an inf/NaN norm. Default "clip".
        process_group (ProcessGroup, optional): the gradients are this rank's shards; with DTensor gradients
            (any of them, first or not), the pipeline stages' group, as in fusedclip.clip_.
        backend (str): "auto" (default), "native", "triton" or "torch".

    Raises:
        ValueError: for an argument out of its range or an unknown backend name (ZClipArgumentError, also an
            AssertionError as zclip's, for a bad clip_option in zscore mode).
        RuntimeError: for a known backend that cannot run here.
    """

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
        self.mode = mode.lower() if isinstance(mode, str) else mode
        if self.mode not in _MODES:  # zclip's ValueError and wording (it fails on a non-str with AttributeError)
            raise ValueError(f"fusedclip.ZClip: mode must be either 'zscore' or 'percentile', got {mode!r}")
        option = clip_option.lower() if isinstance(clip_option, str) else clip_option
        if self.mode == "percentile":
            # zclip ignores clip_option here and stores None: so does this class. A value that is no option at
            # all is a likely typo, but it changes nothing in this mode and zclip takes it: a warning, no error.
            if option is not None and option not in _CLIP_OPTIONS:
                warnings.warn(f"fusedclip.ZClip: clip_option {clip_option!r} is not one of {_CLIP_OPTIONS}; it is "
                              "ignored in percentile mode (as zclip ignores it)", stacklevel=2)
            self.clip_option = None
        elif option not in _CLIP_OPTIONS:
            # zclip asserts here (an AssertionError); fusedclip's argument errors are ValueErrors: this is both
            raise ZClipArgumentError("fusedclip.ZClip: For zscore mode, clip_option must be either 'mean' or "
                                     f"'adaptive_scaling', got {clip_option!r}")
        else:
            self.clip_option = option
        self.clip_factor = _real(clip_factor, "clip_factor", lambda c: 0.0 < c < math.inf, "a positive finite number")
        if not isinstance(skip_update_on_spike, bool):
            raise ValueError(f"fusedclip.ZClip: skip_update_on_spike must be a bool, got {skip_update_on_spike!r}")
        self.skip_update_on_spike = skip_update_on_spike
        self.on_spike = _choice(on_spike, "on_spike", _ON)
        self.on_nonfinite = _choice(on_nonfinite, "on_nonfinite", _ON)
        backends.check_name(backend, "ZClip")
        if _LAYOUT_MISMATCH and backend != "torch":
            raise RuntimeError(f"fusedclip.ZClip: {_LAYOUT_MISMATCH}; backend='torch' runs without the extension")
        self.backend = backend
        self.process_group = process_group
        # zclip appends the norm before testing len(buffer) >= warmup_steps, so 0 warm-up steps behave as 1.
        self._n_warmup = max(warmup_steps, 1)
        self._config = self._kernel_config()
        self._skips = on_spike == "skip" or on_nonfinite == "skip"
        self._state = None  # created on the gradients' device by the first step (or load_state_dict)
        self._found = None  # the skip flag handed to the optimizer
        # Host-side facts about zclip's attributes that the state cannot tell (see the properties below):
        # _none: "mean" / "var" -> where zclip's attribute is None: "warmup" (None until a warm-up ends, as
        # after construction) or "init" (None although initialized: assigned so; step() refuses to run);
        # _stale: how many norms zclip's buffer still holds while initialized (set by assigning initialized
        # = True mid warm-up, or buffer while initialized); they are slots BUFFER.. of the state.
        self._set_none({"mean": "warmup", "var": "warmup"})
        self._stale = 0

    def _kernel_config(self):
        """The kernels' config: ops.ZCLIP_CONFIG's values, in that order."""
        values = dict(alpha=self.alpha, z_thresh=self.z_thresh, cap=self.max_grad_norm or 0.0,
                      has_cap=float(self.max_grad_norm is not None), eps=self.eps, warmup=float(self._n_warmup),
                      percentile=float(self.mode == "percentile"), clip_to_mean=float(self.clip_option == "mean"),
                      clip_factor=self.clip_factor, skip_update_on_spike=float(self.skip_update_on_spike),
                      skip_spikes=float(self.on_spike == "skip"), skip_nonfinite=float(self.on_nonfinite == "skip"))
        return [values[name] for name in ZCLIP_CONFIG]

    # zclip reads its hyper-parameters at every step, so code may change them between steps (a schedule for
    # alpha or z_thresh): assigning one here is checked as at construction and reaches the next step's kernel
    # (a CUDA graph captured before keeps the values it was captured with). The ones that decide the state's
    # layout or the kind of rule are fixed once the clipper exists: assigning them raises instead of being
    # silently ignored.
    _TUNABLE = {
        "alpha": lambda v: _real(v, "alpha", lambda a: 0.0 <= a <= 1.0, "a number in [0, 1]"),
        "z_thresh": lambda v: _real(v, "z_thresh", lambda z: 0.0 < z < math.inf, "a positive finite number"),
        "max_grad_norm": lambda v: None if v is None else _real(v, "max_grad_norm", lambda m: m > 0.0,
                                                                 "a positive number or None"),
        "eps": lambda v: _real(v, "eps", lambda e: 0.0 < e < math.inf, "a positive finite number"),
        "clip_factor": lambda v: _real(v, "clip_factor", lambda c: 0.0 < c < math.inf, "a positive finite number"),
    }
    _FIXED = ("warmup_steps", "mode", "clip_option", "skip_update_on_spike", "on_spike", "on_nonfinite")

    def __setattr__(self, name, value):
        if "_config" in self.__dict__:  # constructed: __init__ sets the attributes itself
            if name in self._TUNABLE:
                object.__setattr__(self, name, self._TUNABLE[name](value))
                object.__setattr__(self, "_config", self._kernel_config())
                return
            if name in self._FIXED and value != getattr(self, name):
                raise AttributeError(f"fusedclip.ZClip: {name} is fixed once the clipper exists (it decides the "
                                     f"state's layout or the rule); make a new ZClip with {name}={value!r}")
        object.__setattr__(self, name, value)

    # -- state ------------------------------------------------------------------------------------------

    def _state_on(self, device):
        if self._state is None:
            self._state = torch.zeros(BUFFER + self._n_warmup, dtype=torch.float64, device=device)
        elif self._state.device != device:  # only when the gradients moved (or a CPU state was loaded)
            self._state = self._state.to(device)
        return self._state

    @property
    def steps(self):
        """The steps taken (skipped non-finite ones not counted); assigning initialized = True mid warm-up sets
        it to the warm-up's length, False to the norms in the buffer. Reads the device: a host sync."""
        return 0 if self._state is None else int(self._state[STEPS])

    # zclip's public state, read from and written to the device state. Each read or assignment is a host
    # read of the device (a sync on CUDA); step() itself never reads the state on the host. Assignments write
    # the state in place, so they reach a step() captured in a CUDA graph too.

    @property
    def initialized(self):
        """zclip's `initialized`: whether the warm-up is over (the EMA is in use). Reading it is a host read of
        the device state. Assigning True skips the rest of the warm-up (seed `mean` and `var`: the next step
        uses them as zclip's would); False starts a warm-up again, from the norms in `buffer`."""
        if self._state is None:
            return False
        return self._head()[STEPS] >= self._n_warmup

    @initialized.setter
    def initialized(self, value):
        s = self._writable_state()
        steps = int(self._head()[STEPS])
        n = self._n_warmup
        if value and steps < n:
            # zclip keeps the warm-up's norms (unread until initialized is False again); the kernels leave the
            # warm-up when the step count reaches the warm-up's length
            self._stale = steps
            s[STEPS] = n
            self._set_none({k: "init" for k in self._none})
        elif not value and steps >= n:
            s[STEPS] = self._stale  # the next step appends to the norms zclip's buffer holds
            self._stale = 0
            self._set_none({k: "warmup" for k in self._none})

    @property
    def buffer(self):
        """zclip's `buffer`: the norms (floats) collected so far in the warm-up; [] once the warm-up has ended.
        A new list on each read (zclip's is the list it appends to): assign a list to change it. Reading it is a
        host read of the device state."""
        if self._state is None:
            return []
        s = self._state.tolist()
        steps = int(s[STEPS])
        return s[BUFFER:BUFFER + (steps if steps < self._n_warmup else self._stale)]

    @buffer.setter
    def buffer(self, values):
        norms = [float(v) for v in values]
        if len(norms) >= self._n_warmup:
            raise ValueError(f"fusedclip.ZClip: buffer can hold at most {self._n_warmup - 1} norms between steps "
                             f"(the next step's norm ends a warm-up of {self._n_warmup}), got {len(norms)}")
        s = self._writable_state()
        steps = int(self._head()[STEPS])
        s[BUFFER:] = 0.0
        if norms:
            s[BUFFER:BUFFER + len(norms)] = torch.tensor(norms, dtype=torch.float64)
        if steps < self._n_warmup:
            s[STEPS] = len(norms)
        else:
            self._stale = len(norms)

    @property
    def mean(self):
        """zclip's `mean`: the EMA of the norm, a float; None before the first warm-up ends (unless assigned).
        Reading it is a host read of the device state; assigning it writes the state."""
        return self._ema(MEAN, "mean")

    @mean.setter
    def mean(self, value):
        self._set_ema(MEAN, "mean", value)

    @property
    def var(self):
        """zclip's `var`: the EMA of the norm's variance, a float; None before the first warm-up ends (unless
        assigned). Reading it is a host read of the device state; assigning it writes the state."""
        return self._ema(VAR, "var")

    @var.setter
    def var(self, value):
        self._set_ema(VAR, "var", value)

    def _head(self):
        """The state's slots before the buffer, as floats (one read of the device); forgets the None of a
        "warmup" kind once the warm-up has ended on the device."""
        head = self._state[:BUFFER].tolist()
        if head[STEPS] >= self._n_warmup:
            self._set_none({k: v for k, v in self._none.items() if v != "warmup"})
        return head

    def _writable_state(self):
        """The state, created on the CPU before the first step (that step moves it to the gradients' device)."""
        return self._state_on(torch.device("cpu")) if self._state is None else self._state

    def _ema(self, slot, name):
        if self._state is None:
            return None
        head = self._head()
        return None if name in self._none else head[slot]

    def _set_ema(self, slot, name, value):
        s = self._writable_state()
        initialized = self._head()[STEPS] >= self._n_warmup
        if value is None:  # zclip's step fails on a None once initialized: step() refuses to run then
            self._set_none(dict(self._none, **{name: "init" if initialized else "warmup"}))
            return
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"fusedclip.ZClip: {name} must be a number, got a tensor of shape "
                                 f"{tuple(value.shape)}")
            s[slot].copy_(value.reshape(()))
        else:
            s[slot] = float(value)
        self._set_none({k: v for k, v in self._none.items() if k != name})

    def _set_none(self, none):
        self._none = none
        self._refuse = "init" in none.values()  # step() checks this flag only (no host read)

    def _check_seeded(self):
        """zclip's step would fail with a TypeError on its None mean or var: a clear error instead."""
        missing = [k for k, v in self._none.items() if v == "init"]
        if missing:
            raise RuntimeError(f"fusedclip.ZClip.step: initialized is True but {' and '.join(missing)} "
                               f"{'is' if len(missing) == 1 else 'are'} None: assign "
                               f"{' and '.join(missing)} (or initialized = False) first")

    @property
    def skipped_steps(self):
        """How many steps were skipped (on_spike / on_nonfinite "skip"): a 0-dim float64 device tensor, no
        sync (it is a view of the state, updated by every step)."""
        return self._state_on(torch.device("cpu"))[SKIPPED] if self._state is None else self._state[SKIPPED]

    def state_dict(self):
        """The state to resume from exactly: the step count (an int: a host sync), the skipped steps, and the
        float64 tensors (clones, on their device).

        Returns:
            dict: {"steps": int, "skipped": int, "buffer": Tensor (the warm-up norms), "mean": Tensor, "var":
            Tensor}, the layout zclip 1.0.0's state_dict has, plus "skipped".
        """
        s = self._state if self._state is not None else torch.zeros(BUFFER + self._n_warmup, dtype=torch.float64)
        return {"steps": int(s[STEPS]), "skipped": int(s[SKIPPED]), "buffer": s[BUFFER:].clone(),
                "mean": s[MEAN].clone(), "var": s[VAR].clone()}

    def load_state_dict(self, state_dict):
        """Resumes from state_dict() (this clipper's or zclip 1.0.0's: "skipped" may be absent).

        Args:
            state_dict (dict): as state_dict() returns; its buffer must hold warmup_steps norms.

        Returns:
            None.

        Raises:
            ValueError: a steps value that is not an int >= 0, or a buffer of another warm-up length.
        """
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
        self._stale = 0
        self._set_none({} if steps >= self._n_warmup else {"mean": "warmup", "var": "warmup"})

    # -- the step ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, model_or_params, optimizer=None, *, scaler=None):
        """Clips the gradients in place; returns their total norm before clipping (a 0-dim tensor on the
        first gradient's device). Call after backward, before optimizer.step().

        optimizer: needed with on_spike / on_nonfinite "skip" (its next step is skipped when this one is; see
        fusedclip/optimizers.py), and with scaler. scaler: a torch.amp.GradScaler whose gradients are still scaled:
        they are unscaled in the same pass (as scaler.unscale_(optimizer) then step() would), and the norm is
        the unscaled one.

        Args:
            model_or_params (torch.nn.Module or iterable of Tensors): whose .grad are clipped.
            optimizer (torch.optim.Optimizer, optional): the optimizer whose next step a "skip" skips; needed
                with "skip" and with scaler.
            scaler (torch.amp.GradScaler, optional): a scaler whose scale the gradients still carry.

        Returns:
            Tensor: the total (L2) norm of the gradients before clipping, 0-dim, in the accumulation dtype
            (fp32; fp64 when any gradient is fp64; backend="torch": torch's norm, in the gradients' dtype), on
            the first gradient's device; 0 without gradients.
        """
        if self._refuse:
            self._check_seeded()
        params = as_list(model_or_params.parameters() if isinstance(model_or_params, torch.nn.Module)
                          else model_or_params)
        if (self._skips or scaler is not None) and optimizer is None:
            raise ValueError("fusedclip.ZClip.step: pass the optimizer (step(model, optimizer)): "
                             + ("the scaler's state is per optimizer" if scaler is not None else
                                "on_spike / on_nonfinite 'skip' skips its step"))
        if (self._state is not None and scaler is None and self.process_group is None
                and backends.fast_path_allowed(self.backend)):
            # the eager fast path (csrc/python_module.cpp): the grads read in C++, one kernel; None: declined
            found = self._found_on(self._state.device) if self._skips else None
            norm = _ext._C.zclip_grads(params, self._state, self._config, found)
            if norm is not None:
                if self._skips:
                    optimizers.skip_next_step_if(optimizer, found)
                return norm
        grads = grads_of(params, "ZClip.step")  # a clear error for a non-tensor item
        check_writable(grads, "ZClip.step")
        if any(g.device.type == "meta" for g in grads):  # the rule reads the norm and its state: meta has neither
            raise NotImplementedError("fusedclip.ZClip.step: gradients on the meta device have no values to clip")
        amp = scaler is not None and scaler.is_enabled()
        if amp and self._skips:
            raise NotImplementedError(
                "fusedclip.ZClip: on_spike / on_nonfinite 'skip' with a GradScaler is not supported: a skipped step "
                "would count as an overflow for scaler.update() and lower the loss scale. Use 'clip' with a scaler "
                "(scaler.step already skips steps whose gradients are inf/NaN)")
        # any DTensor makes the step sharded (a mix with plain gradients too: those are replicated, or with
        # process_group the pipeline stage's), not only a DTensor first
        sharded = self.process_group is not None or _distributed.has_dtensor(grads)
        if amp and (sharded or not grads):
            scaler.unscale_(optimizer)
            amp = False
        device = grads[0].device if grads else (self._state.device if self._state is not None else None)
        be = backends.resolve(self.backend, device.type if device is not None else "cpu")
        # len(grads) > 0, not bool(grads): torch 2.6 and 2.11 cannot trace bool() of a list
        one_device = len(grads) > 0 and len({g.device for g in grads}) == 1
        fused = be.fused_zclip and one_device and not be.delegates_to_torch
        if amp and not fused:
            scaler.unscale_(optimizer)
            amp = False

        inv_scale = found = None
        if amp:
            inv_scale, found, commit = begin_unscale(scaler, optimizer, grads)
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
            optimizers.skip_next_step_if(optimizer, found)
        return norm

    @torch.no_grad()
    def step_into(self, optimizer):
        """step() with the coefficient handed to the optimizer instead of written into the gradients, as
        fusedclip.clip_into_ does: one read of the gradients and no write; the next optimizer.step() applies
        grad * coef (up to the rounding of grad / (1 / coef) against grad * coef). For torch's fused
        optimizers (fused=True), which take a device-side grad_scale; with others, and for gradients on
        several devices or sharded ones, this is step(<the optimizer's params>, optimizer), which writes them.
        The gradients must be unscaled (with AMP: scaler.unscale_(optimizer) first).

        Args:
            optimizer (torch.optim.Optimizer): its parameters' gradients are clipped (through its next step when
                it is a fused one).

        Returns:
            Tensor: the total norm before clipping, as step() returns it.
        """
        if self._refuse:
            self._check_seeded()
        params = params_of(optimizer)
        grads = [p.grad for p in params if p.grad is not None]
        be = backends.resolve(self.backend, grads[0].device.type if grads else "cpu")
        if (not optimizers.is_fused(optimizer) or not grads or len({g.device for g in grads}) > 1
                or self.process_group is not None or _distributed.has_dtensor(grads) or be.delegates_to_torch
                or not be.fused_zclip):
            return self.step(params, optimizer if self._skips else None)
        device = grads[0].device
        found = self._found_on(device) if self._skips else None
        factor = torch.empty((), dtype=torch.float32, device=device)
        norm = be.zclip(grads, self._state_on(device), self._config, None, None, found, factor)
        hand_over_grad_scale(optimizer, factor.reciprocal())
        if self._skips:
            optimizers.skip_next_step_if(optimizer, found)
        return norm

    @torch.no_grad()
    def apply_in_place_clipping(self, pl_module, global_norm, max_global_norm):
        """zclip's method: when global_norm > max_global_norm, scales the gradients of `pl_module` (a module, or
        an iterable of parameters) in place by max_global_norm / (global_norm + 1e-6), computed in float64 as
        zclip's Python floats are and applied in the accumulation dtype (fp32 for fp32/fp16/bf16 gradients), as
        zclip's mul_ by a Python float is: the same gradients, bit for bit. One fused scaling pass (the
        backend's clip_grads_with_norm_ kernel; backend="torch": zclip's mul_ per gradient). The norms are numbers;
        a tensor is read on the host (a sync). step() does not call this method: its scaling is in its own pass.

        Args:
            pl_module (torch.nn.Module or iterable of Tensors): whose .grad are scaled.
            global_norm (float or Tensor): the gradients' norm.
            max_global_norm (float or Tensor): the norm they are scaled to when global_norm exceeds it.

        Returns:
            None.
        """
        global_norm, max_global_norm = float(global_norm), float(max_global_norm)
        if not global_norm > max_global_norm:  # zclip's coefficient is then 1 (a NaN norm too): nothing written
            return
        coef = max_global_norm / (global_norm + 1e-6)
        if not coef < 1.0:
            return
        params = as_list(pl_module.parameters() if isinstance(pl_module, torch.nn.Module) else pl_module)
        grads = grads_of(params, "ZClip.apply_in_place_clipping")
        if not grads:
            return
        if backends.resolve(self.backend, grads[0].device.type).delegates_to_torch:
            for g in grads:  # zclip's own op (torch._foreach_mul_ rounds the scalar to fp16/bf16 first)
                g.mul_(coef)
            return
        # The kernels' coefficient is max_norm / (total_norm + 1e-6) in the accumulation dtype: with a total_norm
        # u such that u + 1e-6 is exactly 1 there, it is max_norm rounded to that dtype, i.e. zclip's coef.
        clip_grads_with_norm_(params, coef, _unit_norm(acc_dtype(grads)), backend=self.backend)

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
        if be.delegates_to_torch:
            return get_total_norm(grads, 2.0, backend="torch")
        return total_norm_of(grads, 2.0, be, "ZClip.step")

    def _global_norm(self, grads, be):
        """(the norm of all ranks' shards in the accumulation dtype, this rank's local tensors to scale)."""
        if _distributed.has_dtensor(grads):  # with process_group: the pipeline stages' group, as in clip_
            norm, local, _ = _distributed.dtensor_norm(grads, 2.0, be, "ZClip.step", self.process_group)
        else:
            norm, local = _distributed.group_norm(grads, 2.0, self.process_group, be, "ZClip.step"), grads
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
            for dev, group in by_device(grads).items():
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


def _unit_norm(dtype):
    """A 0-dim tensor u of `dtype` (float32 or float64) with u + 1e-6 == 1 exactly in that dtype (1e-6 rounded to
    it first, as the scale kernels and torch compute norm + 1e-6)."""
    u = _UNIT_NORMS.get(dtype)
    if u is None:
        one, eps = torch.ones((), dtype=dtype), torch.tensor(1e-6, dtype=dtype)
        u = one - eps
        for _ in range(8):  # at most an ulp or two from 1 - eps
            total = u + eps
            if total == one:
                break
            u = torch.nextafter(u, -one if total > one else one)
        if not u + eps == one:
            raise RuntimeError(f"fusedclip.ZClip: no unit norm found for {dtype}")
        _UNIT_NORMS[dtype] = u
    return u
