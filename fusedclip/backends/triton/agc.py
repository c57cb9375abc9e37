"""Adaptive gradient clipping in Triton (backend="triton" of fusedclip.clip_agc_): the algorithm of
csrc/cuda/agc_cuda.cu, kernel and launcher side by side.

One launch per accumulation dtype (fp32; fp64 for fp64 pairs) over the table of all (weight, gradient) pairs:
[w_ptr[n] | g_ptr[n] | rows[n] | len[n] | dtype[n] | item_begin[n+1]] (csrc/common/agc_table.h's layout), built here.
A pair whose units (rows, or the whole tensor) have at most COLS elements is done ROWS units an item, as one
[ROWS, COLS] tile: both norms per row, the factor per row, and the rows that are clipped scaled from the loaded
tile and stored (rows left alone are never written). A larger unit is one item: its norms over COLS-wide steps,
then, when clipped, a second pass that re-reads it (from L2 on a GPU) and scales it. Programs take items i,
i + programs, ...; nothing depends on another item, so there is no barrier and any number of programs gives the
same bits.

Known limits (compiled for sm_90; tests/tooling/test_triton_static.py asserts them, issue 25 defect 10): no 128-bit
loads or stores. The addresses are cast from the table's int64s with no alignment hint and a row starts at any
multiple of its length, so the compiler cannot prove 16-byte alignment; a vectorized path would need a variant
for aligned pointers and lengths divisible by 16 bytes, with tl.multiple_of on the pointer additions (as
kernels._typed_ptr does). 168 registers a thread with Triton 3.6 (96 with 3.8): 2 programs of 4 warps
per SM fit with 3.6, against 4 launched per SM (the rest wait for a slot).
"""
import math
from typing import List

import torch
import triton
import triton.language as tl

from . import kernels, launcher
from .kernels import _combine, _contribution, _div, _f64, _norm_of, _store_as

ROWS_GPU, COLS_GPU = 4, 1024
ROWS_INTERPRET, COLS_INTERPRET = 64, 1024  # the interpreter pays per operation: big tiles, few programs
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


@triton.jit
def _fold_rows(v, NORM: tl.constexpr):
    """[ROWS, COLS] -> [ROWS] by a fixed tree per row; max/min let a NaN win."""
    if NORM == 1 or NORM == 2:
        is_nan = v != v
        if NORM == 1:
            r = tl.max(tl.where(is_nan, 0.0, v), 1)
        else:
            r = tl.min(tl.where(is_nan, float("inf"), v), 1)
        r = tl.where(tl.max(is_nan.to(tl.int32), 1) > 0, float("nan"), r)
    else:
        r = tl.sum(v, 1)
    return r


@triton.jit
def _terms(x, mask, pw, NORM: tl.constexpr, EXACT_POW: tl.constexpr):
    """Each element's term of the norm; the identity where masked (a p < 0 term of 0 would be inf)."""
    if NORM == 2:
        ident: tl.constexpr = float("inf")
    else:
        ident: tl.constexpr = 0.0
    return tl.where(mask, _contribution(x, pw, NORM, EXACT_POW), ident)


@triton.jit
def _factor(w_norm, g_norm, clip, eps, ACC: tl.constexpr):
    """csrc/common/agc_table.h's agc_factor: 1 when g_norm < clip * max(w_norm, eps), else max / max(g_norm, 1e-6)."""
    max_norm = tl.where(w_norm < eps, eps, w_norm) * clip  # a NaN w_norm stays NaN
    floor = tl.full([], 1e-6, ACC)
    scaled = _div(max_norm, tl.where(g_norm < floor, floor, g_norm), ACC)
    return tl.where(g_norm < max_norm, 1.0, scaled)


@triton.jit
def _tile(w, g, rows, length, k, pw, clip, eps, NORM: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr,
          COLS: tl.constexpr, EXACT_POW: tl.constexpr):
    """Units k * ROWS ... of a pair with units of length <= COLS, as one tile."""
    r = k * ROWS + tl.arange(0, ROWS).to(tl.int64)
    c = tl.arange(0, COLS)
    mask = (r[:, None] < rows) & (c[None, :] < length)
    offs = r[:, None] * length + c[None, :]
    wv = tl.load(w + offs, mask=mask, other=0.0).to(ACC)
    gv = tl.load(g + offs, mask=mask, other=0.0).to(ACC)
    w_norm = _norm_of(_fold_rows(_terms(wv, mask, pw, NORM, EXACT_POW), NORM), pw, NORM, ACC, EXACT_POW)
    g_norm = _norm_of(_fold_rows(_terms(gv, mask, pw, NORM, EXACT_POW), NORM), pw, NORM, ACC, EXACT_POW)
    f = _factor(w_norm, g_norm, clip, eps, ACC)
    write = mask & (f != 1.0)[:, None]  # NaN != 1: a NaN factor is written
    _store_as(g + offs, gv * f[:, None], write, g.dtype.element_ty)


@triton.jit
def _long_unit(w, g, length, k, pw, clip, eps, NORM: tl.constexpr, ACC: tl.constexpr, COLS: tl.constexpr,
               EXACT_POW: tl.constexpr):
    """Unit k of a pair with units longer than COLS: norms over COLS-wide steps, then the scaling pass."""
    if NORM == 2:
        ident: tl.constexpr = float("inf")
    else:
        ident: tl.constexpr = 0.0
    base = k * length
    c = tl.arange(0, COLS)
    acc_w = tl.full([COLS], ident, ACC)
    acc_g = tl.full([COLS], ident, ACC)
    for start in range(0, length, COLS):
        m = start + c < length
        wv = tl.load(w + base + start + c, mask=m, other=0.0).to(ACC)
        gv = tl.load(g + base + start + c, mask=m, other=0.0).to(ACC)
        acc_w = _combine(acc_w, _terms(wv, m, pw, NORM, EXACT_POW), NORM)
        acc_g = _combine(acc_g, _terms(gv, m, pw, NORM, EXACT_POW), NORM)
    w_norm = _norm_of(_fold_rows(acc_w[None, :], NORM), pw, NORM, ACC, EXACT_POW)
    g_norm = _norm_of(_fold_rows(acc_g[None, :], NORM), pw, NORM, ACC, EXACT_POW)
    f = tl.sum(_factor(w_norm, g_norm, clip, eps, ACC), 0)  # [1] -> scalar
    if f != 1.0:
        for start in range(0, length, COLS):
            m = start + c < length
            gv = tl.load(g + base + start + c, mask=m, other=0.0).to(ACC)
            _store_as(g + base + start + c, gv * f, m, g.dtype.element_ty)


@triton.jit
def _item_typed(waddr, gaddr, rows, length, k, pw, clip, eps, T: tl.constexpr, NORM: tl.constexpr,
                ACC: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, EXACT_POW: tl.constexpr):
    w = waddr.to(tl.pointer_type(T))
    g = gaddr.to(tl.pointer_type(T))
    if length <= COLS:
        _tile(w, g, rows, length, k, pw, clip, eps, NORM, ACC, ROWS, COLS, EXACT_POW)
    else:
        _long_unit(w, g, length, k, pw, clip, eps, NORM, ACC, COLS, EXACT_POW)


@triton.jit
def _agc_kernel(table, n, n_items, clip_bits: tl.int64, eps_bits: tl.int64, p_bits: tl.int64, NORM: tl.constexpr,
                ACC: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, EXACT_POW: tl.constexpr):
    clip = _f64(clip_bits).to(ACC)
    eps = _f64(eps_bits).to(ACC)
    pw = _f64(p_bits).to(ACC)
    for it in range(tl.program_id(0), n_items, tl.num_programs(0)):
        item = tl.cast(it, tl.int64)
        lo = item * 0
        hi = lo + n
        while hi - lo > 1:  # the pair: the last whose first item is <= item
            mid = lo + (hi - lo) // 2
            if tl.load(table + 5 * n + mid) <= item:
                lo = mid
            else:
                hi = mid
        k = item - tl.load(table + 5 * n + lo)
        waddr = tl.load(table + lo)
        gaddr = tl.load(table + n + lo)
        rows = tl.load(table + 2 * n + lo)
        length = tl.load(table + 3 * n + lo)
        dtype = tl.load(table + 4 * n + lo)
        if dtype == 0:
            _item_typed(waddr, gaddr, rows, length, k, pw, clip, eps, tl.float32, NORM, ACC, ROWS, COLS, EXACT_POW)
        elif dtype == 1:
            _item_typed(waddr, gaddr, rows, length, k, pw, clip, eps, tl.float16, NORM, ACC, ROWS, COLS, EXACT_POW)
        elif dtype == 2:
            _item_typed(waddr, gaddr, rows, length, k, pw, clip, eps, tl.bfloat16, NORM, ACC, ROWS, COLS,
                        EXACT_POW)
        else:
            if ACC == tl.float64:  # fp64 pairs only in fp64 launches
                _item_typed(waddr, gaddr, rows, length, k, pw, clip, eps, tl.float64, NORM, ACC, ROWS, COLS,
                            EXACT_POW)


def _rows_are_blocks(t):
    """Each row one block of memory (csrc/common/agc_table.cpp's rule): dense, with dim 0 outermost."""
    if not launcher._is_dense(t):
        return False
    return t.dim() <= 1 or t.shape[0] == 1 or t.stride(0) == t.numel() // t.shape[0]


def _launch_group(weights, grads, clip_factor, eps, norm_type, acc):
    cols = COLS_INTERPRET if launcher.INTERPRET else COLS_GPU
    tile_rows = ROWS_INTERPRET if launcher.INTERPRET else ROWS_GPU
    n = len(grads)
    ptrs_w, ptrs_g, rows, lens, dtypes, begin = [], [], [], [], [], []
    keep, copies, item = [], [], 0
    for w, g in zip(weights, grads):
        if not _rows_are_blocks(w):
            w = w.contiguous()
            keep.append(w)
        if not _rows_are_blocks(g):
            dense = g.contiguous()
            copies.append((g, dense))
            g = dense
        r = g.shape[0] if g.dim() > 1 else 1
        length = g.numel() // r
        ptrs_w.append(w.data_ptr())
        ptrs_g.append(g.data_ptr())
        rows.append(r)
        lens.append(length)
        dtypes.append(DTYPE_CODES[g.dtype])
        begin.append(item)
        item += -(-r // tile_rows) if length <= cols else r
    table = torch.tensor(ptrs_w + ptrs_g + rows + lens + dtypes + begin + [item], dtype=torch.int64)
    device = grads[0].device
    table = table.to(device, non_blocking=True) if device.type == "cuda" else table
    programs = min(item, kernels.INTERPRET_PROGRAMS if launcher.INTERPRET else 4 * launcher._sm_count(device))
    launcher._launch(_agc_kernel, programs, table, n, item, launcher._bits(clip_factor), launcher._bits(eps),
                     launcher._bits(norm_type), NORM=launcher._norm_kind(norm_type), ACC=acc, ROWS=tile_rows,
                     COLS=cols, EXACT_POW=launcher.EXACT_POW)
    launcher._write_back(copies)
    del keep


def _capturing(device):
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def agc(weights, grads, clip_factor, eps, norm_type):
    """fusedclip.clip_agc_ on one device's pairs (same shapes and dtypes, none empty; norm_type not 0): one launch
    for the fp32-accumulated pairs, one for the fp64 ones."""
    if grads and _capturing(grads[0].device):
        # The table is built on the host and copied on every call (not cached on the device as the native
        # backend's is): a capture would record a copy from a host buffer freed after the call (CUDA's own error
        # at best, stale pointers at replay at worst). Refused before anything is done.
        raise RuntimeError("fusedclip.clip_agc_: backend='triton' cannot be captured in a CUDA graph (its table "
                           "is copied from the host on every call); use backend='native' inside the graph, or "
                           "clip outside it")
    launcher._norm_kind(norm_type)  # raises on NaN and 0 before anything is written
    if math.isnan(clip_factor) or math.isnan(eps):
        raise ValueError("fusedclip.clip_agc_: clip_factor and eps must not be NaN")
    for w, g in zip(weights, grads):
        if w.shape != g.shape or w.dtype != g.dtype or g.dtype not in DTYPE_CODES or g.numel() == 0:
            raise ValueError("fusedclip.clip_agc_: each weight and gradient must be non-empty, of one shape and "
                             "one float dtype")
    for acc, pick in ((tl.float32, lambda d: d != torch.float64), (tl.float64, lambda d: d == torch.float64)):
        idx = [i for i, g in enumerate(grads) if pick(g.dtype)]
        if idx:
            _launch_group([weights[i] for i in idx], [grads[i] for i in idx], clip_factor, eps, norm_type, acc)


def _define_op():
    @torch.library.custom_op("fusedclip_triton::agc_", mutates_args=("grads",))
    def _agc_op(weights: List[torch.Tensor], grads: List[torch.Tensor], clip_factor: float, eps: float,
                norm_type: float) -> None:
        agc(weights, grads, clip_factor, eps, norm_type)

    @_agc_op.register_fake
    def _(weights, grads, clip_factor, eps, norm_type):
        return None


if not hasattr(torch.ops.fusedclip_triton, "agc_"):  # once per process
    _define_op()
