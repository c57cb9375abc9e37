"""The Triton backend (backend="triton"): the fused clip written in Triton, kernels and launchers side by side.

Addressing: one int64 table per call, from the core's torch.ops.fusedclip.table (csrc/common/clip_math.h, TableView):
[ptr[n] | numel[n] | dtype[n] | chunk_begin[n+1]], dtype codes 0=fp32 1=fp16 2=bf16 3=fp64. Work is split into
chunks of CHUNK elements that never span two tensors; a program finds a chunk's tensor by binary search over
chunk_begin and casts the tensor's address to a typed pointer. Accumulation is in fp32 (fp64 when any tensor is
fp64). Every chunk writes one partial; partials are combined in a fixed order by every program, so the norm does
not depend on the number of programs (one-launch and two-launch agree bit for bit) and runs are deterministic.

Kernels:
  - one launch (GPU default): a persistent kernel that writes the chunk partials, crosses an in-kernel grid
    barrier (atomics on two int32 counters, reset by the last program out), reduces the partials, and scales its
    own chunks in place (in reverse, so the data it read last is written first) only when coef < 1. The counters
    belong to one stream (or to one CUDA-graph capture), so concurrent calls on two streams never share them.
    Programs per SM come from the compiled kernel's registers and shared memory: at most half of what an SM
    holds (one_launch_per_sm), so two concurrent one-launch calls are all co-resident, as the barrier needs.
  - two launches (the interpreter's default; FUSEDCLIP_TRITON_LAUNCH=two): a partials kernel, then a finish
    kernel that reads the partials (or, for clip_grads_with_norm_, the norm) from device memory and scales.
    No host sync either way.
Both variants take the native ops' extras in the same pass (shared tail: _after_norm): per-tensor norms, each
reduced from its own chunks' partials (chunks never span tensors) in the same fixed order as the total; and AMP's
unscale, which multiplies every element by inv_scale before it counts, keeps a per-chunk non-finite detector
(sum of x * 0) for found_inf, and writes grad * (inv_scale * coef) once.

Under TRITON_INTERPRET=1 (set before importing fusedclip) the kernels run in Triton's interpreter on CPU
tensors; the one-launch kernel then runs with a single program, since the interpreter runs programs one
after another and a barrier across several would never open.

Known low-occupancy variants (compiled for sm_90; tests/tooling/test_triton_static.py asserts these numbers, issue 25
defect 10): one launch with inf norm + AMP + per-tensor norms spills at ONE_LAUNCH_MAXNREG with Triton 3.6 and
takes the free variant (168 registers, 24 bytes of stack): 1 program per SM, 16 KB in flight, so every Triton
unscale_clip_ with Triton 3.6 runs at about half the two-launch variant's bandwidth (3.8: 128 registers, no
spill, 2 per SM). fp64 accumulation (any fp64 gradient: rare) takes 246 registers with 3.6, 168 with 3.8: 1
program per SM. Triton AGC (agc.py) has no 128-bit loads (see there).
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice

CHUNK = 16384  # csrc/common/clip_math.h kChunkElems: the table's chunk size
_CHUNK = tl.constexpr(CHUNK)  # the same, visible inside kernels
L2, INF, NEG_INF, P_NORM = 0, 1, 2, 3  # norm kinds (constexpr NORM)
OP_NORM, OP_SCALE, OP_CLAMP = 0, 1, 2  # what a chunk visit does (constexpr OP)
NUM_WARPS = 4  # 128 threads: even at 255 registers a thread, two programs fit on one SM
BLOCK_GPU = 4096  # elements per step of a program (32 per thread: 16-byte vector loads)
# One launch: an H100/H200 needs ~32-40 KB of loads in flight per SM to approach its bandwidth. A program has
# 16 KB in flight per step (a BLOCK of fp32; 16-bit grads go two blocks a step), so at least two programs per SM:
# ONE_LAUNCH_MAXNREG makes two fit (one_launch_per_sm), up to ONE_LAUNCH_PROGRAMS_PER_SM where the registers
# allow. More programs rather than a bigger BLOCK: a bigger BLOCK costs as many registers per byte in flight
# (the accumulators grow with it), and with fewer programs per SM it gains nothing. Capped because every
# program re-reads all partials after the barrier. See _one_launch_variant.
ONE_LAUNCH_PROGRAMS_PER_SM = 4
ONE_LAUNCH_MAXNREG = 128  # 4 programs of 4 warps fit in an SM's registers: two per SM (one_launch_options)
BLOCK_INTERPRET = CHUNK  # the interpreter pays per operation, not per element: one step per chunk
PBLOCK = 1024  # partials per step of the final reduction
INTERPRET_PROGRAMS = 2  # programs per launch in the interpreter (~0.5 ms each); several, to test striding
TWO_LAUNCH_PROGRAMS_PER_SM = 4
TWO_LAUNCH_MAXNREG = 128  # 4 programs of 4 warps at 128 registers fill an SM's 64K registers: the grid in one wave


# ---------------------------------------------------------------------------------------------------------------
# Device code
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _max_nan(a, b):
    """max that lets a NaN win (torch's norms propagate NaN; tl.maximum's default may drop it). One max.NaN
    instruction for fp32 on sm_80+, where a compare-and-select per element costs registers for the masks."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _min_nan(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _f64(bits):
    """A double passed as its int64 bit pattern (Triton passes Python floats as fp32)."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _div(a, b, ACC: tl.constexpr):
    """IEEE division in the accumulation type (fp32 '/' is approximate in Triton)."""
    if ACC == tl.float64:
        q = a / b
    else:
        q = tl.div_rn(a, b)
    return q


@triton.jit
def _pow(a, p, EXACT_POW: tl.constexpr):
    """a ** p. libdevice's pow where it exists (compiled kernels); the interpreter has no libdevice, so there
    exp2(p * log2(a)) in fp64, rounded once to a's type."""
    if EXACT_POW:
        r = libdevice.pow(a, p)
    else:
        r = tl.exp2(p.to(tl.float64) * tl.log2(a.to(tl.float64))).to(a.dtype)
    return r


@triton.jit
def _contribution(x, pw, NORM: tl.constexpr, EXACT_POW: tl.constexpr):
    """One element's term of the norm (x already in the accumulation type)."""
    if NORM == 0:
        r = x * x
    elif NORM == 3:
        r = _pow(tl.abs(x), pw, EXACT_POW)
    else:
        r = tl.abs(x)
    return r


@triton.jit
def _combine(a, b, NORM: tl.constexpr):
    if NORM == 1:
        r = _max_nan(a, b)
    elif NORM == 2:
        r = _min_nan(a, b)
    else:
        r = a + b
    return r


@triton.jit
def _fold(v, NORM: tl.constexpr):
    """A block of accumulators to one value, by a fixed tree (deterministic)."""
    if NORM == 1 or NORM == 2:
        # max/min over the non-NaN lanes, then NaN if any lane is NaN (tl.max may drop NaN; tl.reduce with
        # _max_nan is the same tree but crawls in the interpreter)
        is_nan = v != v
        if NORM == 1:
            r = tl.max(tl.where(is_nan, 0.0, v), 0)
        else:
            r = tl.min(tl.where(is_nan, float("inf"), v), 0)
        r = tl.where(tl.max(is_nan.to(tl.int32), 0) > 0, float("nan"), r)
    else:
        r = tl.sum(v, 0)
    return r


@triton.jit
def _bf16_rne(x):
    """fp32 -> bf16, round to nearest even, NaN -> quiet NaN: c10::BFloat16's rule, in integer ops (the
    interpreter's own fp32 -> bf16 cast truncates; on a GPU this gives what cvt.rn.bf16.f32 does)."""
    u = x.to(tl.uint32, bitcast=True)
    r = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).to(tl.uint16)
    return tl.where(x != x, 0x7FC0, r).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _store_as(ptrs, y, mask, T: tl.constexpr):
    """Store y (fp32 or fp64) as T; fp16/bf16 go through fp32, as the native kernels' casts do."""
    if T == tl.float64:
        tl.store(ptrs, y.to(tl.float64), mask=mask)
    elif T == tl.bfloat16:
        tl.store(ptrs, _bf16_rne(y.to(tl.float32)), mask=mask)
    else:
        tl.store(ptrs, y.to(tl.float32).to(T), mask=mask)


@triton.jit
def _clamp_block(x, c):
    """clamp_min(-c), then clamp_max(c): a NaN passes through (both comparisons are false)."""
    # c * -1.0, not -c: Triton 3.2 negates as 0 - c, which makes -0.0 of c = 0.0 (torch clamps a negative
    # gradient to -0.0 there; seen under Triton 3.2's interpreter, torch 2.6).
    lo = c * -1.0
    x = tl.where(x < lo, lo, x)
    return tl.where(x > c, c, x)


@triton.jit
def _in_place(x, coef, c, OP: tl.constexpr, ACC: tl.constexpr):
    """What the in-place ops write for loaded elements x: x * coef in ACC (OP_SCALE), or x clamped to [-c, c] in
    c's type (OP_CLAMP); _store_as rounds it to the tensor's type."""
    if OP == 1:
        y = x.to(ACC) * coef
    else:
        y = _clamp_block(x.to(c.dtype), c)
    return y


@triton.jit
def _norm_step(acc, nf, x, pw, mul, NORM: tl.constexpr, ACC: tl.constexpr, AMP: tl.constexpr,
               EXACT_POW: tl.constexpr):
    """One full block of loaded elements into the accumulators (see _chunk_work)."""
    x = x.to(ACC)
    if AMP:
        x = x * mul
        nf += x * 0.0
    return _combine(acc, _contribution(x, pw, NORM, EXACT_POW), NORM), nf


@triton.jit
def _chunk_work(p, length, pw, mul, coef, clamp32, clamp64, OP: tl.constexpr, NORM: tl.constexpr,
                ACC: tl.constexpr, AMP: tl.constexpr, BLOCK: tl.constexpr, EXACT_POW: tl.constexpr,
                ALIGNED: tl.constexpr):
    """One chunk at typed pointer p, `length` elements: its norm partial (OP_NORM), or scale it in place by coef
    (OP_SCALE), or clamp it to [-c, c] (OP_CLAMP). Full blocks load unmasked (vector loads when p is aligned);
    the tail block, if any, is masked. Returns (partial, nonfinite); the identity and 0 for the in-place ops.
    With AMP every element is multiplied by mul (the inverse scale) before it counts, and nonfinite sums
    x * 0 over those values: 0 while all are finite, NaN once one is inf/NaN (the norm alone cannot tell, as
    finite values may overflow it).
    16-bit elements go two full blocks a step, both loaded before either is used, so that a step has as many
    bytes in flight as one block of fp32 (the loads in flight per SM are what bounds the bandwidth); each lane
    still sees its elements in the same order, so the bits do not change. Not for p-norms' partials (pow, not
    memory, bounds those, and two blocks of pow in flight spill in fp64), nor with AMP's extra accumulators
    (they spill then)."""
    T: tl.constexpr = p.dtype.element_ty
    if NORM == 2:
        ident: tl.constexpr = float("inf")
    else:
        ident: tl.constexpr = 0.0
    lane = tl.arange(0, BLOCK)
    n_full = length // BLOCK
    tail = n_full * BLOCK
    if T.primitive_bitwidth == 16 and (OP != 0 or (NORM != 3 and not AMP)):
        n_pairs = n_full // 2
    else:
        n_pairs = n_full * 0
    r = tl.full([], ident, ACC)
    nonfinite = tl.full([], 0.0, ACC)
    if OP == 0:
        acc = tl.full([BLOCK], ident, ACC)
        nf = tl.zeros([BLOCK], ACC)
        for i in range(0, n_pairs):
            x0 = tl.load(p + (2 * i * BLOCK + lane))
            x1 = tl.load(p + ((2 * i + 1) * BLOCK + lane))
            acc, nf = _norm_step(acc, nf, x0, pw, mul, NORM, ACC, AMP, EXACT_POW)
            acc, nf = _norm_step(acc, nf, x1, pw, mul, NORM, ACC, AMP, EXACT_POW)
        for i in range(2 * n_pairs, n_full):
            acc, nf = _norm_step(acc, nf, tl.load(p + (i * BLOCK + lane)), pw, mul, NORM, ACC, AMP, EXACT_POW)
        if tail < length:
            idx = tail + lane
            m = idx < length
            x = tl.load(p + idx, mask=m, other=0.0).to(ACC)
            if AMP:
                x = x * mul
                nf += tl.where(m, x * 0.0, 0.0)
            acc = _combine(acc, tl.where(m, _contribution(x, pw, NORM, EXACT_POW), ident), NORM)
        r = _fold(acc, NORM)
        if AMP:
            nonfinite = tl.sum(nf, 0)
    else:
        # in place: scaled by coef in ACC (OP_SCALE), or clamped in fp32 (fp64 for fp64 tensors; OP_CLAMP)
        if T == tl.float64:
            c = clamp64
        else:
            c = clamp32
        if ALIGNED:
            # [BLOCK // W, W] tiles, W elements = 16 bytes a row, in the same element order as `lane`: the load
            # and the store share one layout (16 bytes a thread). With a 1-D block the fp32 load took the 16-bit
            # branches' 8-wide layout (through the shared `lane`) and the store a 4-wide one, converted through
            # shared memory on every block (issue 25, defect 4: the clamp had 88 barriers and 16 KB of shared
            # memory for it until it took these tiles too).
            W: tl.constexpr = 128 // T.primitive_bitwidth
            tile = tl.arange(0, BLOCK // W)[:, None] * W + tl.arange(0, W)[None, :]
            for i in range(0, n_pairs):
                p0 = p + (2 * i * BLOCK + tile)
                p1 = p + ((2 * i + 1) * BLOCK + tile)
                x0 = tl.load(p0)
                x1 = tl.load(p1)
                _store_as(p0, _in_place(x0, coef, c, OP, ACC), None, T)
                _store_as(p1, _in_place(x1, coef, c, OP, ACC), None, T)
            for i in range(2 * n_pairs, n_full):
                ptrs = p + (i * BLOCK + tile)
                _store_as(ptrs, _in_place(tl.load(ptrs), coef, c, OP, ACC), None, T)
            if tail < length:
                idx = tail + tile
                m = idx < length
                _store_as(p + idx, _in_place(tl.load(p + idx, mask=m, other=0.0), coef, c, OP, ACC), m, T)
        else:
            # Not 16-byte aligned (a view at an odd offset): a store takes no more elements a thread than the
            # alignment allows (one) while a load takes what is contiguous, so a [n, 1] tile, one element a
            # thread on both sides (no conversion), a quarter block at a time (a whole block of scalar accesses
            # in flight took 250 registers).
            SUB: tl.constexpr = BLOCK // 4
            sub = tl.arange(0, SUB)[:, None]
            n_sub = length // SUB
            for i in range(0, n_sub):
                ptrs = p + (i * SUB + sub)
                _store_as(ptrs, _in_place(tl.load(ptrs), coef, c, OP, ACC), None, T)
            if n_sub * SUB < length:
                idx = n_sub * SUB + sub
                m = idx < length
                _store_as(p + idx, _in_place(tl.load(p + idx, mask=m, other=0.0), coef, c, OP, ACC), m, T)
    return r, nonfinite


@triton.jit
def _typed_ptr(addr, start, T: tl.constexpr, ALIGNED: tl.constexpr):
    """The chunk's first element as a T pointer, from the tensor's int64 address. Computed here, not passed in:
    tl.multiple_of marks the op that defines a value, and a function's argument has none (the hint would be
    dropped and every load scalar). The hint goes on the pointer addition, not on the integer address: the
    compiler's alignment analysis does not follow the int-to-pointer cast."""
    p = addr.to(tl.pointer_type(T)) + start
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _chunk_typed(addr, start, aligned, length, pw, mul, coef, clamp32, clamp64, T: tl.constexpr, OP: tl.constexpr,
                 NORM: tl.constexpr, ACC: tl.constexpr, AMP: tl.constexpr, BLOCK: tl.constexpr,
                 EXACT_POW: tl.constexpr):
    """_chunk_work on a T tensor's chunk; when the chunk is 16-byte aligned, with a pointer the compiler knows to
    be (so that full blocks are 128-bit loads and stores)."""
    if aligned:
        r, nonfinite = _chunk_work(_typed_ptr(addr, start, T, True), length, pw, mul, coef, clamp32, clamp64, OP,
                                   NORM, ACC, AMP, BLOCK, EXACT_POW, True)
    else:
        r, nonfinite = _chunk_work(_typed_ptr(addr, start, T, False), length, pw, mul, coef, clamp32, clamp64, OP,
                                   NORM, ACC, AMP, BLOCK, EXACT_POW, False)
    return r, nonfinite


@triton.jit
def _chunk(table, n, c, pw, mul, coef, clamp32, clamp64, OP: tl.constexpr, NORM: tl.constexpr, ACC: tl.constexpr,
           AMP: tl.constexpr, BLOCK: tl.constexpr, EXACT_POW: tl.constexpr):
    """Visit chunk c (int64) of the table: find its tensor (binary search over chunk_begin; empty tensors own no
    chunk), and run _chunk_work on it with a pointer of the tensor's dtype."""
    lo = c * 0
    hi = lo + n
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        if tl.load(table + 3 * n + mid) <= c:
            lo = mid
        else:
            hi = mid
    start = (c - tl.load(table + 3 * n + lo)) * _CHUNK
    length = tl.minimum(tl.load(table + n + lo) - start, _CHUNK).to(tl.int32)
    addr = tl.load(table + lo)
    dtype = tl.load(table + 2 * n + lo)
    # chunk starts are CHUNK elements apart, so a chunk is 16-byte aligned when its tensor is
    aligned = (addr % 16) == 0
    r = tl.full([], 0.0, ACC)
    nonfinite = tl.full([], 0.0, ACC)
    if dtype == 0:
        r, nonfinite = _chunk_typed(addr, start, aligned, length, pw, mul, coef, clamp32, clamp64, tl.float32, OP,
                                    NORM, ACC, AMP, BLOCK, EXACT_POW)
    elif dtype == 1:
        r, nonfinite = _chunk_typed(addr, start, aligned, length, pw, mul, coef, clamp32, clamp64, tl.float16, OP,
                                    NORM, ACC, AMP, BLOCK, EXACT_POW)
    elif dtype == 2:
        r, nonfinite = _chunk_typed(addr, start, aligned, length, pw, mul, coef, clamp32, clamp64, tl.bfloat16, OP,
                                    NORM, ACC, AMP, BLOCK, EXACT_POW)
    else:
        if ACC == tl.float64:  # fp64 tensors only exist in fp64-accumulating calls
            r, nonfinite = _chunk_typed(addr, start, aligned, length, pw, mul, coef, clamp32, clamp64, tl.float64,
                                        OP, NORM, ACC, AMP, BLOCK, EXACT_POW)
    return r, nonfinite


@triton.jit
def _write_partials(table, n, n_chunks, partials, nonfinite, pw, mul, NORM: tl.constexpr, ACC: tl.constexpr,
                    AMP: tl.constexpr, BLOCK: tl.constexpr, EXACT_POW: tl.constexpr):
    """Phase 1: program i takes chunks i, i + programs, ...; one partial per chunk (and, with AMP, one
    non-finite detector per chunk)."""
    zero = tl.full([], 0.0, ACC)
    for c in range(tl.program_id(0), n_chunks, tl.num_programs(0)):
        part, nf = _chunk(table, n, tl.cast(c, tl.int64), pw, mul, zero, zero, zero, 0, NORM, ACC, AMP, BLOCK,
                          EXACT_POW)
        tl.store(partials + c, part)
        if AMP:
            tl.store(nonfinite + c, nf)


@triton.jit
def _reduce(partials, count, NORM: tl.constexpr, ACC: tl.constexpr, PBLOCK: tl.constexpr):
    """count partials combined in a fixed order (lane l takes l, l + PBLOCK, ...; then a fixed tree), the same
    in every program, whatever the number of programs."""
    if NORM == 2:
        ident: tl.constexpr = float("inf")
    else:
        ident: tl.constexpr = 0.0
    acc = tl.full([PBLOCK], ident, ACC)
    lane = tl.arange(0, PBLOCK)
    # full blocks unmasked (vector loads where partials is aligned), then the masked rest: the same order as
    # one masked loop. Written by other programs: skip L1 (.cg).
    n_full = count // PBLOCK
    for i in range(0, n_full):
        acc = _combine(acc, tl.load(partials + (i * PBLOCK + lane), cache_modifier=".cg"), NORM)
    if n_full * PBLOCK < count:
        idx = n_full * PBLOCK + lane
        acc = _combine(acc, tl.load(partials + idx, mask=idx < count, other=ident, cache_modifier=".cg"), NORM)
    return _fold(acc, NORM)


@triton.jit
def _norm_of(total, pw, NORM: tl.constexpr, ACC: tl.constexpr, EXACT_POW: tl.constexpr):
    """The norm from the combined partials."""
    if NORM == 0:
        if ACC == tl.float64:
            norm = tl.sqrt(total)
        else:
            norm = tl.sqrt_rn(total)
    elif NORM == 3:
        norm = _pow(total, _div(1.0, pw, ACC), EXACT_POW)
    else:
        norm = total
    return norm


@triton.jit
def _norm_from_partials(partials, count, pw, NORM: tl.constexpr, ACC: tl.constexpr, PBLOCK: tl.constexpr,
                        EXACT_POW: tl.constexpr):
    """The norm of `count` chunk partials (float64: each chunk's fp32 sum is stored widened), combined and
    finished in float64, unrounded (callers round it once to ACC): an fp32 combination of thousands of partials
    costs tens of ulps (csrc/common/clip_math.h: widen)."""
    # a quarter as many lanes as the fp32 reductions: 1,024 float64 lanes took the finish kernels from 80-95 to
    # 128-168 registers (Triton 3.8 / 3.6; ZClip's finish spilled), 256 keep them where they were
    total = _reduce(partials, count, NORM, tl.float64, PBLOCK // 4)
    return _norm_of(total, pw.to(tl.float64), NORM, tl.float64, EXACT_POW)


@triton.jit
def _clip_coef(max_norm, norm, ACC: tl.constexpr):
    """torch's rule: max_norm / (norm + 1e-6), clamped to at most 1 (NaN stays NaN)."""
    coef = _div(max_norm, norm + tl.full([], 1e-6, ACC), ACC)
    return tl.where(coef > 1.0, 1.0, coef)


@triton.jit
def _scale_mine(table, n, n_chunks, coef, ACC: tl.constexpr, BLOCK: tl.constexpr, EXACT_POW: tl.constexpr):
    """Scale this program's chunks in place, the last one first (it was read last: likely still in L2)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    count = (n_chunks - pid + programs - 1) // programs
    zero = tl.full([], 0.0, ACC)
    for i in range(0, count):
        c = pid + (count - 1 - i) * programs
        _chunk(table, n, tl.cast(c, tl.int64), zero, zero, coef, zero, zero, 1, 0, ACC, False, BLOCK, EXACT_POW)


@triton.jit
def _unscale_mul(inv_scale, ACC: tl.constexpr, AMP: tl.constexpr):
    """AMP's inverse scale (GradScaler keeps it in fp32), or 1."""
    if AMP:
        mul = tl.load(inv_scale).to(ACC)
    else:
        mul = tl.full([], 1.0, ACC)
    return mul


@triton.jit
def _after_norm(table, n, n_chunks, partials, nonfinite, wide, norm_out, per_tensor, found_inf, pw, mul, max_norm,
                WRITE_NORM: tl.constexpr, CLIP: tl.constexpr, AMP: tl.constexpr, PER_TENSOR: tl.constexpr,
                NORM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, PBLOCK: tl.constexpr,
                EXACT_POW: tl.constexpr):
    """What follows the norm in both variants, once every chunk's partials are in memory: program 0 stores the
    norm and sets found_inf (never clears it: GradScaler accumulates it); each tensor's norm from its own chunks'
    partials (chunks never span tensors), tensors spread over the programs; then the in-place scaling by
    inv_scale * coef unless that is exactly 1. wide: the norm in float64, unrounded; a float64 norm_out gets it
    as is (the sharded paths' partials), everything else the norm rounded once to ACC."""
    pid = tl.program_id(0)
    norm = wide.to(ACC)
    if WRITE_NORM:
        if pid == 0:
            if norm_out.dtype.element_ty == tl.float64:
                tl.store(norm_out, wide)
            else:
                tl.store(norm_out, norm.to(norm_out.dtype.element_ty))
    if AMP:
        if pid == 0:
            if _reduce(nonfinite, n_chunks, 0, ACC, PBLOCK) != 0.0:  # NaN counts: != is unordered
                tl.store(found_inf, 1.0)
    if PER_TENSOR:
        for i in range(pid, n, tl.num_programs(0)):
            begin = tl.load(table + 3 * n + i)
            end = tl.load(table + 3 * n + i + 1)
            t_norm = _norm_from_partials(partials + begin, end - begin, pw, NORM, ACC, PBLOCK, EXACT_POW).to(ACC)
            tl.store(per_tensor + i, tl.where(end > begin, t_norm, 0.0))  # empty: 0 for every norm type
    if CLIP:
        factor = mul * _clip_coef(max_norm, norm, ACC)
        if factor != 1.0:  # unordered: a NaN factor scales too, so NaN spreads as in torch
            _scale_mine(table, n, n_chunks, factor, ACC, BLOCK, EXACT_POW)


# What Triton compiles a kernel for depends on its arguments (the specialization key): an integer's value (equal
# to 1, divisible by 16) and a pointer's 16-byte alignment. A key that differs between an eager warm-up and a
# CUDA-graph capture means a compile and a module load inside the capture, which fails it. So no integer argument
# is specialized on its value (the bit patterns are annotated int64: 0.0's bits would otherwise pass as int32), and
# no pointer on its alignment except the partials (fresh allocations, always aligned; _reduce's vector loads need
# the hint): the others are only read or written one element at a time, so the hint is worth nothing there.
_NO_VALUE_KEY = ["n", "n_chunks", "p_bits", "max_norm_bits", "clip_bits"]
_NO_ALIGNMENT_KEY = ["table", "ws", "norm_in", "norm_out", "per_tensor", "inv_scale", "found_inf"]


@triton.jit
def _grid_barrier(ws):
    """Every program waits here until all have arrived. ws: two int32 counters (arrivals, departures), zero on
    entry; the last program to leave sets both back to zero, so the next kernel on this stream finds them
    ready. Only safe when all programs are resident at once."""
    programs = tl.num_programs(0)
    tl.debug_barrier()  # this program's partial stores are done before its arrival is published
    tl.atomic_add(ws, 1, sem="release", scope="gpu")
    while tl.atomic_add(ws, 0, sem="acquire", scope="gpu") < programs:
        pass
    tl.debug_barrier()
    if tl.atomic_add(ws + 1, 1, sem="acq_rel", scope="gpu") == programs - 1:
        # everyone has seen the arrivals count complete: reset for the next call
        tl.atomic_xchg(ws, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(ws + 1, 0, sem="relaxed", scope="gpu")


@triton.jit(do_not_specialize=_NO_VALUE_KEY, do_not_specialize_on_alignment=_NO_ALIGNMENT_KEY)
def _one_launch_kernel(table, n, n_chunks, partials, nonfinite, ws, norm_out, per_tensor, inv_scale, found_inf,
                       p_bits: tl.int64, max_norm_bits: tl.int64, CLIP: tl.constexpr, AMP: tl.constexpr,
                       PER_TENSOR: tl.constexpr, NORM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                       PBLOCK: tl.constexpr, EXACT_POW: tl.constexpr):
    """The fused clip in one launch: partials, grid barrier, norm, then _after_norm."""
    pw = _f64(p_bits).to(ACC)
    mul = _unscale_mul(inv_scale, ACC, AMP)
    _write_partials(table, n, n_chunks, partials, nonfinite, pw, mul, NORM, ACC, AMP, BLOCK, EXACT_POW)
    _grid_barrier(ws)
    wide = _norm_from_partials(partials, n_chunks, pw, NORM, ACC, PBLOCK, EXACT_POW)
    _after_norm(table, n, n_chunks, partials, nonfinite, wide, norm_out, per_tensor, found_inf, pw, mul,
                _f64(max_norm_bits).to(ACC), True, CLIP, AMP, PER_TENSOR, NORM, ACC, BLOCK, PBLOCK, EXACT_POW)


@triton.jit(do_not_specialize=_NO_VALUE_KEY, do_not_specialize_on_alignment=_NO_ALIGNMENT_KEY)
def _partials_kernel(table, n, n_chunks, partials, nonfinite, inv_scale, p_bits: tl.int64, NORM: tl.constexpr,
                     ACC: tl.constexpr, AMP: tl.constexpr, BLOCK: tl.constexpr, EXACT_POW: tl.constexpr):
    """Two-launch variant, launch 1: the chunk partials."""
    _write_partials(table, n, n_chunks, partials, nonfinite, _f64(p_bits).to(ACC), _unscale_mul(inv_scale, ACC, AMP),
                    NORM, ACC, AMP, BLOCK, EXACT_POW)


@triton.jit(do_not_specialize=_NO_VALUE_KEY, do_not_specialize_on_alignment=_NO_ALIGNMENT_KEY)
def _finish_kernel(table, n, n_chunks, partials, nonfinite, norm_in, norm_out, per_tensor, inv_scale, found_inf,
                   p_bits: tl.int64, max_norm_bits: tl.int64, FROM_PARTIALS: tl.constexpr, WRITE_NORM: tl.constexpr,
                   CLIP: tl.constexpr, AMP: tl.constexpr, PER_TENSOR: tl.constexpr, NORM: tl.constexpr,
                   ACC: tl.constexpr, BLOCK: tl.constexpr, PBLOCK: tl.constexpr, EXACT_POW: tl.constexpr):
    """Two-launch variant, launch 2 (and clip_grads_with_norm_): the norm from the partials (or read from
    norm_in), then _after_norm."""
    pw = _f64(p_bits).to(ACC)
    if FROM_PARTIALS:
        wide = _norm_from_partials(partials, n_chunks, pw, NORM, ACC, PBLOCK, EXACT_POW)
    else:
        given = tl.load(norm_in)
        if norm_in.dtype.element_ty == tl.float64:
            wide = given.to(ACC).to(tl.float64)
        else:
            wide = given.to(tl.float32).to(ACC).to(tl.float64)
    _after_norm(table, n, n_chunks, partials, nonfinite, wide, norm_out, per_tensor, found_inf, pw,
                _unscale_mul(inv_scale, ACC, AMP), _f64(max_norm_bits).to(ACC), WRITE_NORM, CLIP, AMP, PER_TENSOR,
                NORM, ACC, BLOCK, PBLOCK, EXACT_POW)


@triton.jit(do_not_specialize=_NO_VALUE_KEY, do_not_specialize_on_alignment=_NO_ALIGNMENT_KEY)
def _clamp_kernel(table, n, n_chunks, clip_bits: tl.int64, BLOCK: tl.constexpr):
    """clip_value_: clamp every chunk in place."""
    c64 = _f64(clip_bits)
    zero = tl.full([], 0.0, tl.float64)
    for c in range(tl.program_id(0), n_chunks, tl.num_programs(0)):
        _chunk(table, n, tl.cast(c, tl.int64), zero, zero, zero, c64.to(tl.float32), c64, 2, 0, tl.float64, False,
               BLOCK, False)
