"""AdaGC: per-tensor adaptive gradient clipping (Wang, Li, Chen, Zeng, Yang, Yu, Ma, Shen, "AdaGC: Enhancing LLM
Pretraining Stability via Adaptive Gradient Clipping", ICML 2026, arXiv 2502.11034), without a host sync, and usable
inside a post-accumulate-grad hook (optimizer-in-backward).

The rule, for each parameter tensor i at step t (counted from 1), with g_{t,i} its gradient:

* warm-up, t <= warmup_steps: global clipping, one coefficient for every tensor,
      h_t = min(1, lambda_abs / (||g_t|| + eps))        (||g_t||: the norm of all gradients together)
  which is fusedclip.clip_(params, max_norm=lambda_abs); each tensor's threshold starts at the smallest clipped
  norm it has shown: gamma_{t,i} = min(gamma_{t-1,i}, h_t ||g_{t,i}||), gamma_{0,i} = +inf.
* then each tensor against its own history:
      h_{t,i} = min(1, lambda_rel * gamma_{t-1,i} / (||g_{t,i}|| + eps)),   g_{t,i} <- h_{t,i} g_{t,i},
      gamma_{t,i} = beta * gamma_{t-1,i} + (1 - beta) * h_{t,i} ||g_{t,i}||   (an EMA of the clipped norms).

Defaults: lambda_abs = 1.0, lambda_rel = 1.04, beta = 0.99, warmup_steps = 100, eps = 1e-6: the authors' released
code (a Megatron-LM patch, github.com/lishuai-97/AdaGC, commit 32c249f, megatron-gpt2.patch: the defaults of its
--clip-ratio / --clip-beta arguments and of its AdaGC class, and the values its GPT-2 345M AdaGC run passes, with
--clip-grad 1.0 and 100 warm-up steps). The paper's own text could not be read where this was built; the values
stated there are not checked. eps is not in the paper's formula; it is torch's and the authors' code's guard
against a zero norm. The authors' code feeds the EMA lambda_rel * gamma exactly where it clips (here h ||g||, the
paper's ||g^||, which differs from it by the factor ||g|| / (||g|| + eps)).

Choices where the paper says nothing, each for a reason:
* A tensor first seen with a gradient after the warm-up starts from its own norm (gamma = ||g||: not clipped that step),
  as the authors' code does; a tensor without a gradient in a step keeps its gamma.
* A non-finite norm (inf/NaN gradients) leaves gamma as it was: one bad step must not poison the threshold forever. The
  gradients are still scaled as torch's clip would (a NaN coefficient for a NaN norm, 0 for an inf one).
* A tensor whose every warm-up gradient was exactly zero gets gamma = 0 and stays clipped to zero: the published rule,
  kept; docs/adagc.md says so.

The state is one float64 tensor (gamma per tensor) on the gradients' device and the step count, a host int (it only
counts calls: reading it is no sync). step(): the per-tensor norms come from the fused pass (with the global clip in
the same pass during the warm-up), the coefficients and the state's update are device tensor ops on one value per
tensor, and the native backend scales every gradient by its own coefficient in one more kernel
(torch.ops.fusedclip.scale_each_, the coefficients read on the device) that writes only the tensors whose
coefficient is not 1 -- clip_'s two passes, minus the writes of the tensors left alone. Other backends scale with
torch._foreach_mul_. No .item(), no host sync.

clip_param_(p): the same rule for one parameter, for a post-accumulate-grad hook: the optimizer step right after it
sees the clipped gradient (torch's optimizer-in-backward recipe; examples/adagc_in_backward.py). The warm-up needs the
global norm, which does not exist before backward ends: during the warm-up (in_warmup) call step() after backward
instead and step the optimizers there. The step count advances when the backward ends (an autograd final callback).
"""
import math
import numbers

import torch

from . import _ext, backends
from ._core import (as_list, by_device, call_backend, check_tensors, check_writable, new_per_tensor, per_tensor_norms,
                    scale_by_norm, total_norm_of)
from .ops import acc_dtype


def _norms(grads, be, fn):
    """(total norm, per-tensor norms) in the accumulation dtype: the backend's fused pass, or for backend="torch"
    torch's own definition (the norm of the per-tensor norms, torch.linalg.vector_norm)."""
    if be.delegates_to_torch:
        norms = per_tensor_norms(grads, 2.0)
        return torch.linalg.vector_norm(norms), norms
    return total_norm_of(grads, 2.0, be, fn, per_tensor=True)


def _scale_each(grads, coefs, be, fn):
    """grads[i] *= coefs[i] (coefs: a 1-D tensor in the accumulation dtype on the first gradient's device), each
    product in the gradient's opmath type (float; double for fp64), as torch's mul_ on the CPU computes it.

    The native backend does it in one kernel (torch.ops.fusedclip.scale_each_) that does not write a gradient whose
    coefficient is 1 -- after the warm-up most tensors are not clipped on most steps, so most of the write traffic
    goes. Other backends, and gradients on several devices, take torch._foreach_mul_ with one 0-dim coefficient
    per gradient (every gradient read and written)."""
    op = be.scale_each if be.fused_scale_each else None
    if op is not None:
        ok, _ = call_backend(op, grads, fn, coefs)
        if ok:
            return
    groups = {}
    for g, c in zip(grads, coefs.unbind()):
        gs, cs = groups.setdefault(g.device, ([], []))
        gs.append(g)
        cs.append(c)
    for device, (gs, cs) in groups.items():
        torch._foreach_mul_(gs, [c.to(device) for c in cs])


def _real(x, what, ok, must):
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or math.isnan(x) or not ok(x):
        raise ValueError(f"fusedclip.AdaGC: {what} must be {must}, got {x!r}")
    return float(x)


class AdaGC:
    """AdaGC (arXiv 2502.11034): each parameter's gradient clipped against an EMA of its own past clipped norms, after
    a warm-up of global clipping (see the module docstring for the rule). Call step() after backward and before
    optimizer.step(), or clip_param_(p) from a post-accumulate-grad hook once the warm-up is over.

    Args:
        params (torch.nn.Module or iterable of Tensors): the parameters, in a fixed order (each has its own threshold;
            state_dict follows this order).
        lambda_abs (float): the global clipping threshold of the warm-up; positive. Default 1.0.
        lambda_rel (float): a tensor is clipped to lambda_rel times its EMA; positive, finite. Default 1.04.
        beta (float): the EMA's smoothing factor, in [0, 1). Default 0.99.
        warmup_steps (int): steps of global clipping before the per-tensor rule; >= 0. Default 100.
        eps (float): added to the norm in the coefficient; positive, finite. Default 1e-6.
        backend (str): "auto" (default), "native", "triton" or "torch": whose norm pass is used.

    Raises:
        ValueError: for an argument out of its range, a parameter that is not a tensor, or a repeated parameter.
    """

    def __init__(self, params, lambda_abs=1.0, lambda_rel=1.04, beta=0.99, warmup_steps=100, eps=1e-6, *,
                 backend="auto"):
        self.lambda_abs = _real(lambda_abs, "lambda_abs", lambda v: v > 0.0, "a positive number")
        self.lambda_rel = _real(lambda_rel, "lambda_rel", lambda v: 0.0 < v < math.inf, "a positive finite number")
        self.beta = _real(beta, "beta", lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
        self.eps = _real(eps, "eps", lambda v: 0.0 < v < math.inf, "a positive finite number")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"fusedclip.AdaGC: warmup_steps must be an int >= 0, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        backends.check_name(backend, "AdaGC")
        self.backend = backend
        self.params = as_list(params.parameters() if isinstance(params, torch.nn.Module) else params)
        check_tensors(self.params, "AdaGC", "parameters")
        self._slot = {}
        for i, p in enumerate(self.params):
            if p in self._slot:
                raise ValueError(f"fusedclip.AdaGC: parameter {i} is also parameter {self._slot[p]}")
            self._slot[p] = i
        self.steps = 0  # completed steps (a host int: counting calls needs no device read)
        self._gamma = None  # float64 [len(params)] on the gradients' device, +inf until a tensor is first clipped
        self._index = {}  # (device, tuple of slots) -> the slots as a device tensor, made once
        self._callback_queued = False

    @property
    def in_warmup(self):
        """Whether the next step is a warm-up one (global clipping): then clip_param_ cannot run (no sync)."""
        return self.steps < self.warmup_steps

    @property
    def gamma(self):
        """Each parameter's threshold state (float64, +inf before its first clipped norm), a view of the device
        state: no sync to get it, one to read it."""
        return self._gamma_on(self.params[0].device if self.params else torch.device("cpu"))

    def _gamma_on(self, device):
        if self._gamma is None:
            self._gamma = torch.full((len(self.params),), math.inf, dtype=torch.float64, device=device)
        elif self._gamma.device != device:
            self._gamma = self._gamma.to(device)
        return self._gamma

    def _slots(self, slots, device):
        key = (device, slots)
        index = self._index.get(key)
        if index is None:
            # made on the CPU and copied without blocking: torch.tensor(..., device="cuda") copies and synchronizes
            index = self._index[key] = torch.tensor(slots, dtype=torch.long).to(device, non_blocking=True)
        return index

    def _rule(self, gamma, norms):
        """The post-warm-up rule on float64 device tensors: (coefficients, the new gamma)."""
        start = torch.where(torch.isinf(gamma), norms, gamma)  # first seen: its own norm
        coef = (self.lambda_rel * start / (norms + self.eps)).clamp(max=1.0)
        clipped = coef * norms
        new = torch.where(torch.isfinite(clipped), self.beta * start + (1.0 - self.beta) * clipped, gamma)
        return coef, new

    # -- after backward --------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self):
        """Clips every parameter's gradient in place by the rule of this step; returns the total norm of the
        gradients before clipping (a 0-dim tensor in the accumulation dtype, fp32 or fp64, on the first gradient's
        device; 0 without gradients). No host sync.

        Returns:
            Tensor: the total (L2) norm before clipping.
        """
        if not self.in_warmup and self._gamma is not None and self._gamma.device.type == "cpu" \
                and backends.fast_path_allowed(self.backend):
            # the whole step in one call (csrc/python_module.cpp adagc_grads), the same bits as below; None: declined
            norm = _ext._C.adagc_grads(self.params, self._gamma, [self.lambda_rel, self.beta, self.eps])
            if norm is not None:
                self.steps += 1
                return norm
        pairs = [(i, p.grad) for i, p in enumerate(self.params) if p.grad is not None]
        if not pairs:
            self.steps += 1
            return torch.zeros((), dtype=torch.float32,
                               device=self._gamma.device if self._gamma is not None else "cpu")
        slots, grads = tuple(i for i, _ in pairs), [g for _, g in pairs]
        check_writable(grads, "AdaGC.step")
        device = grads[0].device
        be = backends.resolve(self.backend, device.type)
        gamma = self._gamma_on(device)
        every = len(slots) == len(self.params)
        old = gamma if every else gamma.index_select(0, self._slots(slots, device))
        if self.in_warmup:
            norm, norms = self._global_clip(grads, be)
            h = (self.lambda_abs / (norm.to(device, torch.float64) + self.eps)).clamp(max=1.0)
            clipped = h * norms.to(device, torch.float64)
            new = torch.where(torch.isfinite(clipped), torch.minimum(old, clipped), old)
        else:
            norm, norms = _norms(grads, be, "AdaGC.step")
            coef, new = self._rule(old, norms.to(device, torch.float64))
            _scale_each(grads, coef.to(acc_dtype(grads)), be, "AdaGC.step")
        if every:
            gamma.copy_(new)
        else:
            gamma.index_copy_(0, self._slots(slots, device), new)
        self.steps += 1
        return norm

    def _global_clip(self, grads, be):
        """The warm-up's global clip (fusedclip.clip_(max_norm=lambda_abs)) with each gradient's norm before it, from
        the same pass where the backend fuses them. Returns (total norm, per-tensor norms)."""
        out = new_per_tensor(grads, be) if not be.delegates_to_torch else None
        if out is not None:
            ok, norm = call_backend(be.clip, grads, "AdaGC.step", self.lambda_abs, 2.0, out)
            if ok:
                return norm, out
        norm, norms = _norms(grads, be, "AdaGC.step")
        if be.delegates_to_torch:  # torch's clip: coefficient clamped to 1, multiplied in (as clip_grads_with_norm_)
            coef = (self.lambda_abs / (norm + 1e-6)).clamp(max=1.0)
            for device, group in by_device(grads).items():
                torch._foreach_mul_(group, coef.to(device))
        else:
            scale_by_norm(grads, self.lambda_abs, norm, be, "AdaGC.step")
        return norm, norms

    # -- inside backward -------------------------------------------------------------------------------

    @torch.no_grad()
    def clip_param_(self, param):
        """Clips one parameter's gradient in place by the post-warm-up rule, from a post-accumulate-grad hook
        (param.register_post_accumulate_grad_hook): the optimizer step that follows in the hook sees the clipped
        gradient. The step count advances when the backward ends. No host sync. Returns None (so that it can be
        registered as the hook itself: a post-accumulate-grad hook must return None).

        Args:
            param (Tensor): one of the clipper's parameters, whose .grad is final.

        Returns:
            None.

        Raises:
            RuntimeError: during the warm-up (the global norm is not known before backward ends: call step() after
                backward then), or outside a backward.
            KeyError: for a tensor that is not one of the clipper's parameters.
        """
        if self.in_warmup:
            raise RuntimeError(f"fusedclip.AdaGC.clip_param_: step {self.steps + 1} is in the warm-up "
                               f"({self.warmup_steps} steps of global clipping, whose norm needs every gradient): "
                               "call step() after backward while in_warmup is True")
        slot = self._slot[param]
        grad = param.grad
        if grad is None:
            raise ValueError("fusedclip.AdaGC.clip_param_: the parameter has no gradient")
        self._advance_after_backward()
        check_writable([grad], "AdaGC.clip_param_")
        be = backends.resolve(self.backend, grad.device.type)
        gamma = self._gamma_on(grad.device)
        _, norms = _norms([grad], be, "AdaGC.clip_param_")
        coef, new = self._rule(gamma[slot:slot + 1], norms.to(grad.device, torch.float64))
        _scale_each([grad], coef.to(acc_dtype([grad])), be, "AdaGC.clip_param_")
        gamma[slot:slot + 1].copy_(new)

    def _advance_after_backward(self):
        if self._callback_queued:
            return
        try:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
        except RuntimeError as e:
            raise RuntimeError("fusedclip.AdaGC.clip_param_ runs inside a backward (a post-accumulate-grad hook); "
                               "after backward, call step()") from e
        self._callback_queued = True

    def _end_backward(self):
        self._callback_queued = False
        self.steps += 1

    # -- checkpoints -----------------------------------------------------------------------------------

    def state_dict(self):
        """The state to resume from exactly.

        Returns:
            dict: {"steps": int, "gamma": a float64 clone of the per-parameter thresholds (on their device),
            "warmup_steps": int}.
        """
        return {"steps": self.steps, "gamma": self.gamma.clone(), "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state_dict):
        """Resumes from state_dict().

        Args:
            state_dict (dict): as state_dict() returns, for the same parameters (one threshold each).

        Returns:
            None.

        Raises:
            ValueError: a steps value that is not an int >= 0, or gamma not a tensor of one value per parameter.
        """
        steps, gamma = state_dict["steps"], state_dict["gamma"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"fusedclip.AdaGC.load_state_dict: steps must be an int >= 0, got {steps!r}")
        if not isinstance(gamma, torch.Tensor) or tuple(gamma.shape) != (len(self.params),):
            shape = tuple(gamma.shape) if isinstance(gamma, torch.Tensor) else type(gamma).__name__
            raise ValueError(f"fusedclip.AdaGC.load_state_dict: gamma must be a tensor of shape "
                             f"({len(self.params)},) (one per parameter), got {shape}")
        device = self._gamma.device if self._gamma is not None else gamma.device
        self._gamma = gamma.detach().to(device=device, dtype=torch.float64, copy=True)
        self.steps = steps
