"""The Triton backend's host code shared by its clip, ZClip and AGC launchers: the table of a call, the
workspaces, how many programs to launch and which compiled variant, the launch itself."""
import math
import os
import struct
import threading

import torch
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from ... import occupancy
from .kernels import (BLOCK_GPU, BLOCK_INTERPRET, INF, INTERPRET_PROGRAMS, L2, NEG_INF, NUM_WARPS,
                      ONE_LAUNCH_MAXNREG, ONE_LAUNCH_PROGRAMS_PER_SM, P_NORM, TWO_LAUNCH_MAXNREG,
                      TWO_LAUNCH_PROGRAMS_PER_SM, _one_launch_kernel)

INTERPRET = isinstance(_one_launch_kernel, InterpretedFunction)  # TRITON_INTERPRET=1 when this module loaded
EXACT_POW = not INTERPRET
BLOCK = BLOCK_INTERPRET if INTERPRET else BLOCK_GPU

# "auto" (one launch on a GPU, two in the interpreter), "one" or "two"
LAUNCH = os.environ.get("FUSEDCLIP_TRITON_LAUNCH", "auto")
if LAUNCH not in ("auto", "one", "two"):
    raise ValueError(f"FUSEDCLIP_TRITON_LAUNCH must be 'auto', 'one' or 'two', got {LAUNCH!r}")


def one_launch(launch=None):
    """Whether a call uses the one-launch kernel: `launch` ("one", "two", "auto" or None for LAUNCH)."""
    mode = LAUNCH if launch is None else launch
    if mode not in ("auto", "one", "two"):
        raise ValueError(f"fusedclip triton: launch must be 'auto', 'one' or 'two', got {mode!r}")
    return (not INTERPRET) if mode == "auto" else mode == "one"


def _bits(x):
    """A Python float as the int64 bit pattern of the double."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _norm_kind(p):
    p = float(p)
    if math.isnan(p):
        raise ValueError("fusedclip: norm_type must not be NaN")
    if p == 0.0:
        raise ValueError("fusedclip: norm_type 0 is handled by the Python layer, not by the kernels")
    if p == 2.0:
        return L2
    if math.isinf(p):
        return INF if p > 0 else NEG_INF
    return P_NORM


def _tl_acc(any_double):
    return tl.float64 if any_double else tl.float32


_sm_counts = {}


def _sm_count(device):
    sms = _sm_counts.get(device.index)
    if sms is None:
        sms = _sm_counts[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return sms


def _programs(device, n_chunks):
    """Programs of a two-launch kernel (or clip_grads_with_norm_'s, clip_value_'s): no barrier, so any number.
    The interpreter runs programs one after another: a few."""
    if INTERPRET:
        return min(n_chunks, INTERPRET_PROGRAMS)
    return min(n_chunks, TWO_LAUNCH_PROGRAMS_PER_SM * _sm_count(device))


def resident_per_sm(n_regs, shared, num_warps=NUM_WARPS, regs_per_sm=65536, threads_per_sm=2048,
                    shared_per_sm=232448, blocks_per_sm=32):
    """How many programs of a compiled kernel (n_regs registers a thread, `shared` bytes of shared memory) one SM
    holds at once: occupancy.resident_blocks, the rule the CUDA kernels are checked with. Defaults: sm_90."""
    return occupancy.resident_blocks(32 * num_warps, n_regs, shared, max_threads=threads_per_sm,
                                     max_blocks=blocks_per_sm, shared_per_sm=shared_per_sm, regs_per_sm=regs_per_sm)


def one_launch_per_sm(n_regs, shared, **limits):
    """Programs per SM of a one-launch call: at most half of what an SM holds, so that two calls at once (two
    streams, or a graph replayed beside an eager call), of any variants, are all resident together: a grid
    barrier whose programs cannot all be resident never opens. Each call takes at most half of every limit, so
    any two fit. Capped at ONE_LAUNCH_PROGRAMS_PER_SM."""
    return max(1, min(ONE_LAUNCH_PROGRAMS_PER_SM, resident_per_sm(n_regs, shared, **limits) // 2))


def one_launch_options(constexprs):
    """The compile options to try for a one-launch variant, best first: the first that does not spill is used
    (if all spill, the one that spills least).
    fp32 accumulation: at most ONE_LAUNCH_MAXNREG registers a thread first. Left free, ptxas takes 117-168 (by
    variant and Triton version) where fewer do without spills, and above 128 one_launch_per_sm's half-of-an-SM
    rule leaves one program per SM (16 KB in flight) instead of two. fp64 accumulation (rare) needs more."""
    free = dict(num_warps=NUM_WARPS)
    if constexprs["ACC"] == tl.float32:
        return [dict(free, maxnreg=ONE_LAUNCH_MAXNREG), free]
    return [free]


def two_launch_options(constexprs):
    """The compile options to try for the kernels launched TWO_LAUNCH_PROGRAMS_PER_SM programs per SM (the
    two-launch finish, clip_grads_with_norm_'s scaling, the clamp, two-launch ZClip), best first as in
    one_launch_options. fp32 accumulation: at most TWO_LAUNCH_MAXNREG registers first, so that the whole grid is
    resident at once (one wave). Left free, ptxas picks an occupancy target of its own: with Triton 3.6, 168
    registers (3 programs per SM, 1.33 waves) for the finish kernel since the partials are reduced in float64 (95
    before), 140 for clip_grads_with_norm_'s; with 3.8, 168 for the clamp. None of them needs that many."""
    free = dict(num_warps=NUM_WARPS)
    if constexprs.get("ACC", tl.float32) == tl.float32:  # the clamp has no accumulator
        return [dict(free, maxnreg=TWO_LAUNCH_MAXNREG), free]
    return [free]


_variants = {}  # (device index, kernel name, constexprs) -> (compile options, compiled kernel)


def _compiled_variant(device, args, constexprs, kernel_fn, candidates):
    """(compile options, compiled kernel) for a launch of kernel_fn with these arguments: the first candidate
    whose compiled kernel does not spill (else the one that spills least), found once per device and variant (the
    constexprs; the other arguments are not specialized on, see _NO_VALUE_KEY, except the partials' alignment,
    which is always 16). The first call of a variant compiles it here (warmup: no launch); later calls, a
    CUDA-graph capture among them, only look it up."""
    key = (device.index, kernel_fn.__name__, tuple(sorted((k, str(v)) for k, v in constexprs.items())))
    variant = _variants.get(key)
    if variant is None:
        if torch.cuda.is_current_stream_capturing():  # compiling and loading a module would fail the capture
            raise RuntimeError("fusedclip triton: this clip variant was not compiled before the CUDA-graph capture; "
                               "call clip_ once outside the capture first (a warm-up step), with the same options")
        for options in candidates:
            kernel = kernel_fn.warmup(*args, grid=(1,), **options, **constexprs)
            kernel._init_handles()  # loads the module: sets n_regs and n_spills
            if variant is None or kernel.n_spills < variant[1].n_spills:
                variant = options, kernel
            if not kernel.n_spills:
                break
        _variants[key] = variant
    return variant


def _two_launch_options(device, args, constexprs, kernel_fn, extra_options=None):
    """The compile options of a kernel launched TWO_LAUNCH_PROGRAMS_PER_SM programs per SM (two_launch_options);
    None in the interpreter (nothing is compiled there)."""
    if INTERPRET:
        return None
    candidates = [dict(o, **(extra_options or {})) for o in two_launch_options(constexprs)]
    return _compiled_variant(device, args, constexprs, kernel_fn, candidates)[0]


def _one_launch_variant(device, n_chunks, args, constexprs, kernel=None, extra_options=None):
    """(compile options, programs) of a one-launch call, the programs per SM from the compiled kernel's
    registers, spills and shared memory (see _compiled_variant)."""
    kernel_fn = kernel or _one_launch_kernel  # any kernel with _grid_barrier (zclip.py has one too)
    candidates = [dict(o, **(extra_options or {})) for o in one_launch_options(constexprs)]
    options, kernel = _compiled_variant(device, args, constexprs, kernel_fn, candidates)
    props = torch.cuda.get_device_properties(device)
    limits = {name: getattr(props, attr) for name, attr in
              (("regs_per_sm", "regs_per_multiprocessor"), ("threads_per_sm", "max_threads_per_multi_processor"),
               ("shared_per_sm", "shared_memory_per_multiprocessor")) if getattr(props, attr, None)}
    per_sm = one_launch_per_sm(kernel.n_regs, kernel.metadata.shared, **limits)
    return options, min(n_chunks, per_sm * _sm_count(device))


_compiled = {}  # kernel name -> the last CompiledKernel launched (registers, shared memory: scripts/ check them)


# Triton's interpreter is not thread-safe: it patches triton.language's functions for the duration of a kernel
# and restores them on exit, so a second thread's interpreted kernel could run (or leave) with them unpatched
# ("_semantic argument must be provided outside of JIT functions", seen in tests/test_threads.py). Interpreted
# launches take turns; compiled ones never wait.
_INTERPRET_LOCK = threading.Lock()


def _launch(kernel, programs, *args, options=None, **constexprs):
    if INTERPRET:
        import numpy as np  # log2(0), NaN inputs: expected, not worth a warning

        with _INTERPRET_LOCK, np.errstate(all="ignore"):
            kernel[(programs,)](*args, **constexprs)
        return
    _compiled[kernel.__name__] = kernel[(programs,)](*args, **(options or dict(num_warps=NUM_WARPS)), **constexprs)


class _Workspaces:
    """The one-launch kernel's barrier counters: two int32 per slot, zero between kernels (the kernel resets
    them). Each stream has its own slot, so concurrent calls on two streams never share one; each call captured
    into a CUDA graph gets a slot of its own for good (the graph may be replayed on any stream, any time). Slots
    are zeroed once, outside any capture, in arenas of 64. Slots are SLOT int32 (128 bytes) apart: each 16-byte
    aligned (ws is not specialized on alignment, but so it stays harmless if it were), and two streams' counters
    never share a cache line."""

    ARENA = 64
    SLOT = 32
    LOW = 16  # refill below this many free slots, so that captures find some

    def __init__(self):
        self._lock = threading.Lock()
        self._by_stream = {}
        self._free = {}
        self._arenas = []

    def get(self, device):
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        with self._lock:
            free = self._free.setdefault(device, [])
            if capturing:
                if not free:
                    raise RuntimeError("fusedclip triton: no barrier workspace left for this CUDA-graph capture; "
                                       "call clip_ once outside the capture first (a warm-up step)")
                return free.pop()
            if len(free) < self.LOW:
                arena = torch.zeros(self.SLOT * self.ARENA, dtype=torch.int32, device=device)
                if device.type == "cuda":  # zeroed before any stream uses a slot (once per arena)
                    torch.cuda.current_stream(device).synchronize()
                self._arenas.append(arena)
                free.extend(arena[self.SLOT * i:self.SLOT * i + 2] for i in reversed(range(self.ARENA)))
            ws = self._by_stream.get((device, stream))
            if ws is None:
                ws = self._by_stream[(device, stream)] = free.pop()
            return ws


_WORKSPACES = _Workspaces()


def _is_dense(t):
    """is_non_overlapping_and_dense: the elements fill [data_ptr, data_ptr + numel) exactly once."""
    expected = 1
    for stride, size in sorted((s, z) for s, z in zip(t.stride(), t.shape) if z != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _table(tensors):
    """(table, n_chunks, any_double, copies): the core's table of the tensors. Tensors that are not dense are
    replaced by dense copies; in-place ops copy the results back (copies: pairs of original, copy)."""
    try:
        table, n_chunks, any_double = torch.ops.fusedclip.table(tensors)
        return table, n_chunks, any_double, ()
    except ValueError:
        strided = [i for i, t in enumerate(tensors) if t.layout == torch.strided and t.numel() > 0 and not _is_dense(t)]
        if not strided:
            raise
        # Each call copies such a tensor to a new address, so no table (nor graph) could ever be reused for it.
        if tensors[0].is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"fusedclip: gradient {strided[0]} is not dense in memory (a strided view), so it cannot be clipped "
                "inside a CUDA graph: each call works on a new dense copy of it. Make the gradients dense before "
                "the capture (e.g. p.grad = p.grad.contiguous()), or clip outside the graph")
        copies = [(i, tensors[i].contiguous()) for i in strided]
    dense = list(tensors)
    for i, copy in copies:
        dense[i] = copy
    table, n_chunks, any_double = torch.ops.fusedclip.table(dense)
    return table, n_chunks, any_double, [(tensors[i], copy) for i, copy in copies]


def _write_back(copies):
    for original, copy in copies:
        original.copy_(copy)


def _check_extras(n, device, acc_dtype_, per_tensor, inv_scale, found_inf):
    """The native kernels' rules for the extras (csrc/common/grad_table.cpp, check_extras), before anything is
    written."""
    if per_tensor is not None and not (per_tensor.device == device and per_tensor.dtype == acc_dtype_
                                       and per_tensor.numel() == n and per_tensor.is_contiguous()):
        raise ValueError(f"fusedclip: per_tensor must be a contiguous {acc_dtype_} tensor of {n} elements on "
                         f"{device}")
    for t in (inv_scale, found_inf):
        if t is not None and not (t.device == device and t.dtype == torch.float32 and t.numel() == 1):
            raise ValueError(f"fusedclip: inv_scale and found_inf must be one-element float32 tensors on {device} "
                             "(as torch.amp.GradScaler's are)")
