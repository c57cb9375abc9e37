"""ZClip's step in Triton (backend="triton"): the fused L2 norm of kernels.py, then ZClip's rule
(csrc/common/zclip_rule.h, in the same order of float64 operations) and the scaling, and the state's update.

Both launch variants of clip.py:
  - one launch: every program reads the state before the grid barrier, so program 0 can write the next state
    after it (no program reads it any more);
  - two launches (the interpreter's): the partials kernel, then this kernel, whose programs each read the state,
    decide and scale their chunks, then take a ticket; the last program to take one writes the next state (every
    other program has read the old one by then).
The kernels are compiled with enable_fp_fusion=False: a * b + c contracted to one fma would round differently
from zclip's Python floats.
"""
from typing import List, Optional

import torch
import triton
import triton.language as tl

from . import kernels, launcher
from .kernels import _f64
from .launcher import _bits
from ...ops import ZCLIP_CONFIG, ZCLIP_STATE, acc_dtype

# the state's slots and the config's order: ops.ZCLIP_STATE and ZCLIP_CONFIG (csrc/common/zclip_rule.h ZSlot,
# ZConfigSlot)
STEPS, MEAN, VAR, SKIPPED = map(ZCLIP_STATE.index, ("steps", "mean", "var", "skipped"))
BUFFER = len(ZCLIP_STATE)
_STEPS, _MEAN, _VAR, _SKIPPED, _BUFFER = map(tl.constexpr, (STEPS, MEAN, VAR, SKIPPED, BUFFER))  # inside kernels
CONFIG_LEN = len(ZCLIP_CONFIG)
_OPTIONS = dict(enable_fp_fusion=False)


@triton.jit
def _decide(steps, mean, var, x, z_thresh, cap, eps, clip_factor, n_warmup, PERCENTILE: tl.constexpr,
            CLIP_TO_MEAN: tl.constexpr, HAS_CAP: tl.constexpr, SKIP_SPIKES: tl.constexpr,
            SKIP_NONFINITE: tl.constexpr):
    """zclip_decide: (warm-up?, spike?, non-finite?, skip?, the EMA's target, the post-warm-up coef)."""
    warm = steps < n_warmup.to(tl.float64)
    nonfinite = (x - x) != 0.0  # NaN for inf and NaN; != is unordered
    std = tl.sqrt(var)  # fp64: sqrt.rn.f64, correctly rounded (sqrt_rn is fp32 only)
    if PERCENTILE:
        threshold = mean + z_thresh * std
        spike = x > threshold
    else:
        z = (x - mean) / (std + eps)
        spike = z > z_thresh
        if CLIP_TO_MEAN:
            threshold = mean
        else:
            threshold = (mean + (z_thresh * std) / (z / z_thresh)) * clip_factor
    spike = spike & (warm == 0)
    target = tl.where(spike, threshold, x)
    if HAS_CAP:
        limit = tl.where(target > cap, cap, target)
    else:
        limit = target
    coef = tl.where(x > limit, limit / (x + 1e-6), 1.0)
    skip = x != x  # False unless x is NaN, then or-ed below (a bool tensor to start from)
    skip = skip & (x == x)
    if SKIP_SPIKES:
        skip = skip | spike
    if SKIP_NONFINITE:
        skip = skip | nonfinite
    return warm, spike, nonfinite, skip, target, coef


@triton.jit
def _factor(warm, skip, coef, norm, cap, mul, HAS_CAP: tl.constexpr, ACC: tl.constexpr):
    """zclip_coef times AMP's inverse scale, in the accumulation dtype."""
    if HAS_CAP:  # torch's clip_grad_norm_ coefficient: (norm + 1e-6).reciprocal() * max_norm
        wc = kernels._div(tl.full([], 1.0, ACC), norm + tl.full([], 1e-6, ACC), ACC) * cap.to(ACC)
        wc = tl.where(wc > 1.0, 1.0, wc)
    else:
        wc = tl.full([], 1.0, ACC)
    f = tl.where(warm, wc, coef.to(ACC))
    return mul * tl.where(skip, 1.0, f)


@triton.jit
def _update(state, x, warm, spike, nonfinite, skip, target, alpha, n_warmup, SKIP_UPDATE_ON_SPIKE: tl.constexpr):
    """zclip_update, by one program. The norm just stored is used from x, not reloaded: the program's threads
    do not see each other's stores without a barrier."""
    steps = tl.load(state + _STEPS)
    if skip:
        tl.store(state + _SKIPPED, tl.load(state + _SKIPPED) + 1.0)
    if (skip & nonfinite) == 0:
        if warm:
            i = steps.to(tl.int64)
            tl.store(state + _BUFFER + i, x)
            if i == n_warmup - 1:
                total = tl.where(i == 0, x, tl.load(state + _BUFFER))
                for k in range(1, n_warmup):
                    total = total + tl.where(k == i, x, tl.load(state + _BUFFER + k))
                n = n_warmup.to(tl.float64)
                mean = total / n
                d0 = tl.where(i == 0, x, tl.load(state + _BUFFER)) - mean
                sq = d0 * d0
                for k in range(1, n_warmup):
                    d = tl.where(k == i, x, tl.load(state + _BUFFER + k)) - mean
                    sq = sq + d * d
                tl.store(state + _MEAN, mean)
                tl.store(state + _VAR, sq / n)
        else:
            if SKIP_UPDATE_ON_SPIKE:
                ema = spike == 0
            else:
                ema = spike | (spike == 0)
            if ema:
                old_mean = tl.load(state + _MEAN)
                b = 1.0 - alpha
                mean = alpha * old_mean + b * target
                d = target - mean  # about the updated mean, as zclip does
                tl.store(state + _VAR, alpha * tl.load(state + _VAR) + b * (d * d))
                tl.store(state + _MEAN, mean)
        tl.store(state + _STEPS, steps + 1.0)


_NO_VALUE_KEY = ["n", "n_chunks", "alpha_bits", "z_bits", "cap_bits", "eps_bits", "factor_bits", "n_warmup"]
_NO_ALIGNMENT_KEY = ["table", "ws", "state", "norm_in", "norm_out", "inv_scale", "found_inf", "coef_out"]


@triton.jit(do_not_specialize=_NO_VALUE_KEY, do_not_specialize_on_alignment=_NO_ALIGNMENT_KEY)
def _zclip_kernel(table, n, n_chunks, partials, nonfinite, ws, state, norm_in, norm_out, inv_scale, found_inf, coef_out,
                  alpha_bits: tl.int64, z_bits: tl.int64, cap_bits: tl.int64, eps_bits: tl.int64,
                  factor_bits: tl.int64, n_warmup: tl.int64, ONE_LAUNCH: tl.constexpr, GIVEN: tl.constexpr,
                  COEF_OUT: tl.constexpr,
                  AMP: tl.constexpr, FOUND: tl.constexpr, PERCENTILE: tl.constexpr, CLIP_TO_MEAN: tl.constexpr,
                  HAS_CAP: tl.constexpr, SKIP_UPDATE_ON_SPIKE: tl.constexpr, SKIP_SPIKES: tl.constexpr,
                  SKIP_NONFINITE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, PBLOCK: tl.constexpr,
                  EXACT_POW: tl.constexpr):
    pid = tl.program_id(0)
    cap = _f64(cap_bits)
    mul = kernels._unscale_mul(inv_scale, ACC, AMP)
    pw = tl.full([], 2.0, ACC)
    steps = tl.load(state + _STEPS)  # read before anyone can write the next state (see the module docstring)
    mean = tl.load(state + _MEAN)
    var = tl.load(state + _VAR)
    if ONE_LAUNCH:
        if not GIVEN:
            kernels._write_partials(table, n, n_chunks, partials, nonfinite, pw, mul, 0, ACC, AMP, BLOCK, EXACT_POW)
        kernels._grid_barrier(ws)
    if GIVEN:
        given = tl.load(norm_in)
        if norm_in.dtype.element_ty == tl.float64:
            norm = given.to(ACC)
        else:
            norm = given.to(tl.float32).to(ACC)
    else:
        norm = kernels._norm_from_partials(partials, n_chunks, pw, 0, ACC, PBLOCK, EXACT_POW).to(ACC)  # 0 chunks: 0
    x = norm.to(tl.float64)
    warm, spike, nonf, skip, target, coef = _decide(
        steps, mean, var, x, _f64(z_bits), cap, _f64(eps_bits), _f64(factor_bits), n_warmup, PERCENTILE,
        CLIP_TO_MEAN, HAS_CAP, SKIP_SPIKES, SKIP_NONFINITE)
    factor = _factor(warm, skip, coef, norm, cap, mul, HAS_CAP, ACC)
    if COEF_OUT:  # handed to the optimizer instead
        if pid == 0:
            tl.store(coef_out, factor.to(tl.float32))
    elif factor != 1.0:  # unordered: a NaN factor scales too, so NaN spreads as in torch
        kernels._scale_mine(table, n, n_chunks, factor, ACC, BLOCK, EXACT_POW)
    if ONE_LAUNCH:
        writer = pid == 0
    else:
        # Every thread of this program has read the state (and stored its scaled chunks) before the ticket is
        # taken: the ticket is one thread's atomic, and the last program's writer must find no thread of any
        # program still to read the old state. Asked for here, not left to a barrier Triton happens to insert
        # (tests/tooling/test_triton_static.py checks it is in the TTIR, before the atomic).
        tl.debug_barrier()
        writer = tl.atomic_add(ws, 1, sem="acq_rel", scope="gpu") == tl.num_programs(0) - 1
    if writer:
        if not ONE_LAUNCH:
            tl.atomic_xchg(ws, 0, sem="relaxed", scope="gpu")  # the ticket counter, ready for the next call
            # The rule again, from the state read again: the last program is the only writer and every other
            # program has read the state before its ticket, so this reads what the entry read, and the rule's
            # float64 values need not live through the scaling (with Triton 3.6 they made ptxas spill at 128
            # registers, the most at which the two-launch grid is resident at once; the one-launch kernel must
            # keep them: its writer does not wait for the other programs' reads).
            warm, spike, nonf, skip, target, coef = _decide(
                tl.load(state + _STEPS), tl.load(state + _MEAN), tl.load(state + _VAR), x, _f64(z_bits), cap,
                _f64(eps_bits), _f64(factor_bits), n_warmup, PERCENTILE, CLIP_TO_MEAN, HAS_CAP, SKIP_SPIKES,
                SKIP_NONFINITE)
        _update(state, x, warm, spike, nonf, skip, target, _f64(alpha_bits), n_warmup, SKIP_UPDATE_ON_SPIKE)
        tl.store(norm_out, norm)
        if FOUND:
            flag = skip
            if AMP:
                flag = flag | (kernels._reduce(nonfinite, n_chunks, 0, ACC, PBLOCK) != 0.0)
            if flag:
                tl.store(found_inf, 1.0)


def zclip(grads, state, config, norm=None, inv_scale=None, found_inf=None, coef_out=None, launch=None):
    """The native zclip_ op's contract (csrc/ops.cpp) in Triton; returns the norm in the accumulation dtype."""
    table, n_chunks, any_double, copies = launcher._table(grads)
    device = grads[0].device
    acc_torch = torch.float64 if any_double else torch.float32
    if len(config) != CONFIG_LEN:
        raise ValueError(f"fusedclip.ZClip: the config has {len(config)} values, the kernels take {CONFIG_LEN}")
    c = dict(zip(ZCLIP_CONFIG, config))
    alpha, z_thresh, cap, has_cap, eps, n_warmup = (c[k] for k in ("alpha", "z_thresh", "cap", "has_cap", "eps",
                                                                    "warmup"))
    percentile, clip_to_mean, clip_factor, skip_update, skip_spikes, skip_nonfinite = (c[k] for k in (
        "percentile", "clip_to_mean", "clip_factor", "skip_update_on_spike", "skip_spikes", "skip_nonfinite"))
    n_warmup = int(n_warmup)
    if not (state.device == device and state.dtype == torch.float64 and state.is_contiguous()
            and state.numel() == BUFFER + n_warmup):
        raise ValueError(f"fusedclip.ZClip: the state must be a contiguous float64 tensor of {BUFFER + n_warmup} "
                         f"elements on {device}")
    if norm is not None:
        if inv_scale is not None:
            raise ValueError("fusedclip.ZClip: a given norm cannot be combined with AMP's unscale")
        if not (isinstance(norm, torch.Tensor) and norm.device == device and norm.numel() == 1):
            raise ValueError(f"fusedclip.ZClip: the given norm must be a one-element tensor on {device}")
        norm = norm.reshape(()).contiguous()
    launcher._check_extras(len(grads), device, acc_torch, None, inv_scale, found_inf)
    if coef_out is not None and not (coef_out.device == device and coef_out.dtype == torch.float32
                                     and coef_out.numel() == 1):
        raise ValueError(f"fusedclip.ZClip: coef_out must be a one-element float32 tensor on {device}")
    amp = inv_scale is not None
    partials = torch.empty(max(n_chunks, 1), dtype=torch.float64, device=device)  # kernels._norm_from_partials
    nonfinite = torch.empty(max(n_chunks, 1), dtype=acc_torch, device=device) if amp else partials
    out = torch.empty((), dtype=acc_torch, device=device)
    inv_scale_ = inv_scale.reshape(()) if amp else partials
    found_ = found_inf.reshape(()) if found_inf is not None else partials
    norm_ = norm if norm is not None else partials
    one = launcher.one_launch(launch)
    ws = launcher._WORKSPACES.get(device)
    coef_ = coef_out.reshape(()) if coef_out is not None else partials
    args = (table, len(grads), n_chunks, partials, nonfinite, ws, state, norm_, out, inv_scale_, found_, coef_,
            _bits(alpha), _bits(z_thresh), _bits(cap), _bits(eps), _bits(clip_factor), n_warmup)
    constexprs = dict(ONE_LAUNCH=one, GIVEN=norm is not None, COEF_OUT=coef_out is not None, AMP=amp,
                      FOUND=found_inf is not None,
                      PERCENTILE=bool(percentile), CLIP_TO_MEAN=bool(clip_to_mean), HAS_CAP=bool(has_cap),
                      SKIP_UPDATE_ON_SPIKE=bool(skip_update), SKIP_SPIKES=bool(skip_spikes),
                      SKIP_NONFINITE=bool(skip_nonfinite), ACC=launcher._tl_acc(any_double), BLOCK=launcher.BLOCK,
                      PBLOCK=kernels.PBLOCK, EXACT_POW=launcher.EXACT_POW)
    if one:
        if launcher.INTERPRET:  # programs run one after another there: a barrier across several would never open
            options, programs = None, 1
        else:
            options, programs = launcher._one_launch_variant(device, max(n_chunks, 1), args, constexprs,
                                                             kernel=_zclip_kernel, extra_options=_OPTIONS)
    else:
        options = launcher._two_launch_options(device, args, constexprs, _zclip_kernel, extra_options=_OPTIONS)
        programs = launcher._programs(device, max(n_chunks, 1))
        if norm is None and n_chunks:
            launcher._launch(kernels._partials_kernel, programs, table, len(grads), n_chunks, partials, nonfinite,
                             inv_scale_, _bits(2.0), NORM=kernels.L2, ACC=constexprs["ACC"], AMP=amp,
                             BLOCK=launcher.BLOCK, EXACT_POW=launcher.EXACT_POW)
    launcher._launch(_zclip_kernel, programs, *args, options=options, **constexprs)
    launcher._write_back(copies)
    return out


def _define_op():
    # typing's List/Optional: torch 2.6's schema inference knows no list[...] or X | None. The optional tensors
    # have no default: torch 2.6's custom_op wrapper indexes mutated arguments by position in the arguments as
    # the dispatcher hands them over, and it drops trailing arguments equal to their default (an IndexError).
    @torch.library.custom_op("fusedclip_triton::zclip_", mutates_args=("grads", "state", "found_inf", "coef_out"))
    def _zclip_op(grads: List[torch.Tensor], state: torch.Tensor, config: List[float],
                  norm: Optional[torch.Tensor], inv_scale: Optional[torch.Tensor],
                  found_inf: Optional[torch.Tensor], coef_out: Optional[torch.Tensor]) -> torch.Tensor:
        return zclip(grads, state, config, norm, inv_scale, found_inf, coef_out)

    @_zclip_op.register_fake
    def _(grads, state, config, norm=None, inv_scale=None, found_inf=None, coef_out=None):
        return grads[0].new_empty((), dtype=acc_dtype(grads))


if not hasattr(torch.ops.fusedclip_triton, "zclip_"):  # once per process
    _define_op()
