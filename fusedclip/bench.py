"""python -m fusedclip bench: fusedclip against torch (and apex) on the gradient sets people train.

One file, in the order it runs (see bench/README.md for what it measures and why):

1. Parameter sets: gradient shapes computed from model configs (no downloads).
2. Providers: the clipping implementations a user could pick instead of fusedclip.
3. Workloads: several copies of a set's gradients (rotated so sets smaller than the cache are not timed
   from cache) and a pristine copy to restore them between calls when clipping is active.
4. Timing: CUDA events on a GPU, torch.utils.benchmark on the CPU; launches from the profiler.
5. The run: sets x regimes x providers, the two scaling curves, the copy bandwidth.
6. Reports: terminal table, JSON, markdown, PNG.
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field

import torch

import fusedclip

MAX_NORM = 1.0
CLIP_NORM = 10.0 * MAX_NORM  # the gradients' norm when clipping is active (clip coefficient 0.1)
NOCLIP_NORM = 0.5 * MAX_NORM  # ... and when it is not

# ----------------------------------------------------------------------------------------------------------
# 1. Parameter sets
# ----------------------------------------------------------------------------------------------------------
F32, BF16 = torch.float32, torch.bfloat16


def gpt2_shapes(n_layer, d, vocab=50257, n_ctx=1024):
    """HF GPT2LMHeadModel (lm_head tied to wte): 12 tensors per block."""
    shapes = [(vocab, d), (n_ctx, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),  # ln_1, attn.c_attn, attn.c_proj
                   (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # ln_2, mlp.c_fc, mlp.c_proj
    return shapes + [(d,), (d,)]  # ln_f


def bert_shapes(n_layer=12, d=768, ffn=3072, vocab=30522, max_pos=512, type_vocab=2):
    """HF BertModel (bert-base-uncased): embeddings, 16 tensors per layer, pooler."""
    shapes = [(vocab, d), (max_pos, d), (type_vocab, d), (d,), (d,)]
    for _ in range(n_layer):
        shapes += [(d, d), (d,)] * 4  # query, key, value, attention.output.dense
        shapes += [(d,), (d,), (ffn, d), (ffn,), (d, ffn), (d,), (d,), (d,)]
    return shapes + [(d, d), (d,)]


def llama_shapes(n_layer=32, d=4096, ffn=11008, vocab=32000):
    """Llama-2-7B: embeddings, 9 tensors per layer, final norm, untied lm_head (291 tensors at 32 layers)."""
    shapes = [(vocab, d)]
    for _ in range(n_layer):
        shapes += [(d, d)] * 4 + [(ffn, d), (ffn, d), (d, ffn), (d,), (d,)]
    return shapes + [(d,), (vocab, d)]


def transformer_shapes():
    """torch.nn.Transformer(d_model=512, nhead=8, 6 encoder + 6 decoder layers), built on the meta device."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = torch.nn.Transformer(d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
                                 dim_feedforward=2048, device="meta")
    return [tuple(p.shape) for p in m.parameters()]


def many_small_shapes(n_blocks=512, widths=(96, 128, 160, 192)):
    """A deep narrow network: per block a Linear (weight, bias) and a LayerNorm (weight, bias)."""
    shapes = []
    for i in range(n_blocks):
        w = widths[i % len(widths)]
        shapes += [(w, w), (w,), (w,), (w,)]
    return shapes


def with_dtype(shapes, dtype):
    return [(s, dtype) for s in shapes]


def mixed_dtypes(shapes):
    """bf16 weights (2-D and up), fp32 norms and biases (1-D)."""
    return [(s, BF16 if len(s) >= 2 else F32) for s in shapes]


@dataclass
class ParamSet:
    name: str
    about: str
    make: object  # layers (or None for the full model) -> [(shape, dtype)]
    layers: int = 0  # > 0: may be sized down to fewer layers when memory is short
    hidden: bool = False  # not part of "all" (the test set)

    def specs(self, layers=None):
        return self.make(layers or self.layers or None)


SETS = {s.name: s for s in [
    ParamSet("gpt2-small", "GPT-2 small, fp32 (12 layers, d=768)", lambda n: with_dtype(gpt2_shapes(12, 768), F32)),
    ParamSet("gpt2-xl", "GPT-2 XL, fp32 (48 layers, d=1600)", lambda n: with_dtype(gpt2_shapes(48, 1600), F32)),
    ParamSet("bert-base", "BERT base, fp32 (12 layers, d=768)", lambda n: with_dtype(bert_shapes(), F32)),
    ParamSet("llama-7b", "Llama-2 7B, bf16 (32 layers, d=4096)",
             lambda n: with_dtype(llama_shapes(n or 32), BF16), layers=32),
    ParamSet("transformer", "nn.Transformer d_model=512, 6+6 layers, fp32",
             lambda n: with_dtype(transformer_shapes(), F32)),
    ParamSet("many-small", "512 narrow blocks (Linear + LayerNorm), fp32",
             lambda n: with_dtype(many_small_shapes(), F32)),
    ParamSet("mixed", "GPT-2 small shapes: bf16 weights, fp32 norms and biases",
             lambda n: mixed_dtypes(gpt2_shapes(12, 768))),
    ParamSet("tiny", "2-layer GPT-2 (d=64), bf16 weights + fp32 vectors (smoke tests)",
             lambda n: mixed_dtypes(gpt2_shapes(2, 64, vocab=512, n_ctx=64)), hidden=True),
]}

DEFAULT_SETS = {"cpu": ["gpt2-small", "transformer", "many-small", "mixed"],
                "cuda": [n for n, s in SETS.items() if not s.hidden]}
QUICK_SETS = {"cpu": ["many-small", "gpt2-small"], "cuda": ["many-small", "gpt2-small", "mixed"]}
# torch.compile's compile time grows with the tensor count (on a 2-core CPU about 30 s for gpt2-small's 148
# tensors, more than 7 minutes for many-small's 2,048), so by default the CPU compiles gpt2-small only and a
# GPU every set but many-small; --compile-sets adds the others.
DEFAULT_COMPILE_SETS = {"cpu": ["gpt2-small"],
                        "cuda": [n for n, s in SETS.items() if not s.hidden and n != "many-small"]}

# Scaling curves: (points, fixed size). "tensors": x tensors sharing 4M elements; "elements": x elements
# spread over 100 tensors.
SCALING = {
    "cuda": {"tensors": [1, 4, 16, 64, 256, 1000, 4000, 16000], "elements": [10**5, 10**6, 10**7, 10**8, 10**9]},
    "cpu": {"tensors": [1, 16, 256, 1000, 4000, 16000], "elements": [10**5, 10**6, 10**7, 3 * 10**7]},
    "quick": {"tensors": [1, 64, 1000], "elements": [10**4, 10**5, 10**6]},
}
SCALING_TENSORS_ELEMENTS = 4_000_000
LONG_CALL_S = 0.02  # CPU calls at least this long are timed one by one (see Clock._cpu)
SCALING_ELEMENTS_TENSORS = 100


def scaling_specs(curve, x, total=SCALING_TENSORS_ELEMENTS):
    if curve == "tensors":
        return [((total // x,), F32)] * x
    return [((max(1, x // SCALING_ELEMENTS_TENSORS),), F32)] * SCALING_ELEMENTS_TENSORS


def numel(shape):
    return math.prod(shape)


def specs_bytes(specs):
    return sum(numel(s) * d.itemsize for s, d in specs)


# ----------------------------------------------------------------------------------------------------------
# 2. Providers: each make(device) returns fn(params) -> total norm, called with max_norm = MAX_NORM
# ----------------------------------------------------------------------------------------------------------
def _torch_foreach(device):
    return lambda ps: torch.nn.utils.clip_grad_norm_(ps, MAX_NORM)


def _torch_loop(device):
    return lambda ps: torch.nn.utils.clip_grad_norm_(ps, MAX_NORM, foreach=False)


def _torch_compile(device):
    if device.type == "cpu":
        # No pool of compile workers: they start in the background after the first compile and would share
        # the cores with the calls being timed (100x slower calls on a 2-core machine).
        import torch._inductor.config

        torch._inductor.config.compile_threads = 1
    import torch._inductor.config

    torch._inductor.config.force_disable_caches = True  # the compile row is a cold compile, as on a first run
    import warnings

    warnings.filterwarnings("ignore", message=".*force_disable_caches.*")
    torch._dynamo.reset()  # a fresh cache per set: the recompile limit would otherwise fall back to eager
    compiled = torch.compile(torch.nn.utils.clip_grad_norm_)
    return lambda ps: compiled(ps, MAX_NORM)


def _fused(backend):
    def make(device):
        clip = fusedclip.clip_
        return lambda ps: clip(ps, MAX_NORM, backend=backend)
    return make


def _triton(launch):
    """fusedclip.clip_(backend="triton") with the launch mode forced for the call: "one" (the persistent
    kernel with a grid barrier) or "two" (partials, then finish). fusedclip/triton_backend.py reads its
    module-level LAUNCH (FUSEDCLIP_TRITON_LAUNCH) at each call."""
    def make(device):
        from fusedclip import triton_backend as tb

        clip = fusedclip.clip_

        def call(ps):
            saved, tb.LAUNCH = tb.LAUNCH, launch
            try:
                return clip(ps, MAX_NORM, backend="triton")
            finally:
                tb.LAUNCH = saved
        return call
    return make


def _apex(device):
    """apex's multi-tensor kernels as Megatron uses them: l2norm per dtype group, then one scale launch per
    group when the coefficient is below 1 (that test reads the norm on the host, as apex users do)."""
    import amp_C
    from apex.multi_tensor_apply import multi_tensor_applier

    flag = torch.zeros(1, dtype=torch.int, device=device)

    def clip(ps):
        groups = {}
        for p in ps:
            if p.grad is not None:
                groups.setdefault(p.grad.dtype, []).append(p.grad)
        norms = [multi_tensor_applier(amp_C.multi_tensor_l2norm, flag, [g], False)[0] for g in groups.values()]
        total = torch.linalg.vector_norm(torch.stack([n.float().reshape(()) for n in norms]))
        coef = MAX_NORM / (float(total) + 1e-6)
        if coef < 1.0:
            for g in groups.values():
                multi_tensor_applier(amp_C.multi_tensor_scale, flag, [g, g], coef)
        return total
    return clip


def _has_backend(name):
    def check(device):
        if name in fusedclip.available_backends(device):
            return True, ""
        return False, f"fusedclip backend {name!r} is not available for {device.type}"
    return check


def _apex_available(device):
    if device.type != "cuda":
        return False, "apex's kernels are CUDA only"
    try:
        import amp_C  # noqa: F401
        from apex.multi_tensor_apply import multi_tensor_applier  # noqa: F401
    except ImportError:
        return False, "apex (with its CUDA extensions) is not importable"
    return True, ""


def _always(device):
    return True, ""


def _compile_available(device):
    if device.type == "cpu":
        import shutil

        if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
            return False, "torch.compile needs a C++ compiler on the CPU"
    return True, ""


@dataclass
class Provider:
    key: str
    label: str
    make: object
    available: object
    compiles: bool = False
    bytes_moved: object = None  # nbytes -> {"bytes_moved": ..., ...} for the row (default: 2N clip, N noclip)
    check: object = None  # (fn, workload) -> '' or what is wrong (default: check_call)


PROVIDERS = {p.key: p for p in [
    Provider("torch", "torch foreach", _torch_foreach, _always),
    Provider("torch-loop", "torch foreach=False", _torch_loop, _always),
    Provider("compile", "torch.compile", _torch_compile, _compile_available, compiles=True),
    Provider("native", "fusedclip native", _fused("native"), _has_backend("native")),
    Provider("triton", "fusedclip triton 1-launch", _triton("one"), _has_backend("triton")),
    Provider("triton-2", "fusedclip triton 2-launch", _triton("two"), _has_backend("triton")),
    Provider("apex", "apex multi_tensor", _apex, _apex_available),
]}
BASELINE = "torch"
SCALING_SKIP = {"compile"}  # a recompile per point; its cost is on the compile rows instead


# ----------------------------------------------------------------------------------------------------------
# 3. Workloads
# ----------------------------------------------------------------------------------------------------------
def cache_bytes(device):
    """The last-level cache: L2 on a GPU, the largest CPU cache level otherwise (32 MiB if unknown)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in os.listdir(base):
            with open(os.path.join(base, idx, "size")) as f:
                s = f.read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
            best = max(best, int(s.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best or 32 << 20


def free_bytes(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def rotations_for(nbytes, device, cap=64):
    """How many copies to rotate so that each is evicted from the cache before it comes back."""
    return max(1, min(cap, math.ceil(3 * cache_bytes(device) / max(nbytes, 1))))


class Workload:
    """`rotations` lists of parameters with gradients of the given specs, and a pristine copy of the
    gradients. Parameters are zero-stride views of one element, so only the gradients take memory."""

    def __init__(self, specs, device, rotations, seed=0, grad_scale=1.0, real_params=False):
        """grad_scale: the gradients are stored multiplied by it (an AMP loss scale; the reference norm stays
        that of the unscaled gradients). real_params: parameters are real tensors (an optimizer can step
        them) instead of zero-stride views."""
        self.specs, self.device = specs, device
        self.on_restore = []  # callables(i), run after list i is restored (outside the timed region)
        self.numel = sum(numel(s) for s, _ in specs)
        self.nbytes = specs_bytes(specs)
        gen = torch.Generator(device=device).manual_seed(seed)
        pristine = []
        for shape, dtype in specs:
            g = torch.randn(shape, generator=gen, device=device, dtype=F32)
            pristine.append(g.to(dtype) if dtype != F32 else g)
        norm = float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g, dtype=F32) for g in pristine])))
        torch._foreach_mul_(pristine, CLIP_NORM / norm)
        self.pristine = pristine
        self.ref_norm = float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g, dtype=F32) for g in pristine])))
        if grad_scale != 1.0:
            torch._foreach_mul_(pristine, grad_scale)
        self.lists, self.grads = [], []
        for _ in range(rotations):
            params, grads = [], []
            for g0 in pristine:
                p = torch.nn.Parameter(torch.zeros(g0.shape, dtype=g0.dtype, device=device) if real_params
                                       else torch.zeros((), dtype=g0.dtype, device=device).expand(g0.shape))
                p.grad = g0.clone()
                params.append(p)
                grads.append(p.grad)
            self.lists.append(params)
            self.grads.append(grads)
        self.clipping = True
        self.dirty = set()

    def set_regime(self, clipping):
        """Clipping active: norm CLIP_NORM, restored after each call. Inactive: norm NOCLIP_NORM. The extras'
        regimes (amp, optim) clip."""
        self.restore_all()
        if not clipping:  # nothing is restored in this regime
            for grads in self.grads:
                torch._foreach_mul_(grads, NOCLIP_NORM / CLIP_NORM)
        self.clipping = clipping

    def restore(self, i):
        torch._foreach_copy_(self.grads[i], self.pristine)
        for hook in self.on_restore:
            hook(i)

    def restore_all(self):
        for i in range(len(self.lists)):
            self.restore(i)
        self.dirty.clear()

    def expected_norm(self):
        return self.ref_norm * (1.0 if self.clipping else NOCLIP_NORM / CLIP_NORM)


def check_call(fn, wl):
    """One call on list 0: the returned norm and (when clipping) the clipped gradients' norm. '' or a
    description of what is wrong."""
    out = fn(wl.lists[0])
    want = wl.expected_norm()
    got = float(out)
    problems = []
    if not math.isfinite(got) or abs(got - want) > 2e-2 * want:
        problems.append(f"norm {got:.6g}, expected {want:.6g}")
    after = float(torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(g, dtype=F32) for g in wl.grads[0]])))
    want_after = MAX_NORM if wl.clipping else want
    if abs(after - want_after) > 2e-2 * want_after:
        problems.append(f"norm after the call {after:.6g}, expected {want_after:.6g}")
    if wl.clipping:
        wl.restore(0)
    return "; ".join(problems)


# ----------------------------------------------------------------------------------------------------------
# 4. Timing
# ----------------------------------------------------------------------------------------------------------
def percentile(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(times, hosts):
    return {"median_s": percentile(times, 0.5), "p20_s": percentile(times, 0.2), "p80_s": percentile(times, 0.8),
            "n": len(times), "host_s": percentile(hosts, 0.5)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Runs fn over the workload's rotating lists and returns per-call samples (seconds)."""

    def __init__(self, device, budget_s, min_n, max_n):
        self.device, self.budget_s, self.min_n, self.max_n = device, budget_s, min_n, max_n

    def warmup(self, fn, wl, calls=2):
        """`calls` calls (the first may compile); returns the duration of each, synchronized."""
        out = []
        for k in range(calls):
            i = k % len(wl.lists)
            sync(self.device)
            t0 = time.perf_counter()
            fn(wl.lists[i])
            sync(self.device)
            out.append(time.perf_counter() - t0)
            if wl.clipping:
                wl.restore(i)
        return out

    def calls_for(self, est_s, share=1.0):
        """Samples for a call of about est_s seconds: the time budget, within [min_n, max_n] (both scaled by
        share, the fraction of the budget this measurement gets)."""
        lo, hi = max(1, math.ceil(self.min_n * share)), max(1, int(self.max_n * share))
        return int(max(lo, min(hi, share * self.budget_s / max(est_s, 1e-7))))

    def measure(self, fn, wl, est_s, share=1.0):
        if self.device.type == "cuda":
            return self._cuda(fn, wl, self.calls_for(est_s, share))
        return self._cpu(fn, wl, est_s, share)

    def _cuda(self, fn, wl, n):
        """CUDA events around each call, the GPU idle before it: the time includes launch overhead when the
        call is host-bound and the kernels' time when it is not. Lists rotate; a clipped list is restored
        right after its call, so it is out of L2 by the time it comes back (when there are enough lists)."""
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        hosts = []
        rot = len(wl.lists)
        for k in range(n):
            i = k % rot
            torch.cuda.synchronize(self.device)
            starts[k].record()
            t0 = time.perf_counter()
            fn(wl.lists[i])
            hosts.append(time.perf_counter() - t0)
            ends[k].record()
            if wl.clipping:
                wl.restore(i)
        torch.cuda.synchronize(self.device)
        times = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
        return times, hosts

    def _cpu(self, fn, wl, est_s, share=1.0):
        """torch.utils.benchmark with torch's intra-op thread count, over the rotating lists. Not clipping:
        blocked_autorange. Clipping: one timed call per sample (Timer.timeit(1)), the lists clipped since
        the last sample restored in the timer's setup, outside the timed region. Calls of LONG_CALL_S or
        more are timed one by one with perf_counter instead (timer overhead is irrelevant there, and
        Timer.timeit's two warm-up calls per sample would triple the run time)."""
        from torch.utils import benchmark

        rot = len(wl.lists)
        state = {"k": 0}

        def call():
            i = state["k"] % rot
            state["k"] += 1
            fn(wl.lists[i])
            if wl.clipping:
                wl.dirty.add(i)

        def prep():
            for i in wl.dirty:
                wl.restore(i)
            wl.dirty.clear()

        if est_s >= LONG_CALL_S:
            times = []
            for _ in range(self.calls_for(est_s, share)):
                prep()
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            prep()
            return times, times
        threads = torch.get_num_threads()
        if not wl.clipping:
            timer = benchmark.Timer(stmt="call()", globals={"call": call}, num_threads=threads)
            m = timer.blocked_autorange(min_run_time=share * self.budget_s)
            times = list(m.times)
            while len(times) < math.ceil(self.min_n * share):  # blocks of the same size, up to min_n samples
                times.append(timer.timeit(m.number_per_run).times[0])
            return times, times
        timer = benchmark.Timer(stmt="call()", setup="prep()", globals={"call": call, "prep": prep},
                                num_threads=threads)
        # timeit() runs two warm-up calls (after setup) before the timed one; prep() runs before each.
        times = [timer.timeit(1).times[0] for _ in range(self.calls_for(3 * est_s, share))]
        prep()
        return times, times


@contextlib.contextmanager
def quiet_stderr():
    """Silences the profiler's C++ log lines (written straight to file descriptor 2) for the block."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def count_launches(fn, wl, device):
    """One call under the profiler. On a GPU: the kernels, copies and memsets it ran on the device. On the
    CPU: the top-level operators it called (what a launch is there; a torch.compile'd region counts as one)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with quiet_stderr(), profile(activities=acts) as prof:
        fn(wl.lists[0])
        sync(device)
    if wl.clipping:
        wl.restore(0)
    events = prof.events()
    if device.type == "cuda":
        dev = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        if dev:
            return len(dev)
        launches = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC",
                    "cudaLaunchCooperativeKernel", "cudaMemcpyAsync", "cudaMemsetAsync")
        return sum(1 for e in events if e.name in launches)
    # a compiled region is one call into generated code: it counts as one
    return sum(1 for e in events if e.cpu_parent is None and ("::" in e.name or e.name.startswith("Torch-Compiled")))


def copy_bandwidth(device, clock, nbytes):
    """Bytes per second of dst.copy_(src) (2 x nbytes move), timed like the providers."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    fn = lambda ps: dst.copy_(src)  # noqa: E731
    wl = _FixedWorkload()
    est = clock.warmup(fn, wl, 3)[-1]
    times, _ = clock.measure(fn, wl, est)
    med = percentile(times, 0.5)
    return {"bytes_per_s": 2 * n * 4 / med, "buffer_bytes": n * 4, "median_s": med,
            "p20_s": percentile(times, 0.2), "p80_s": percentile(times, 0.8)}


class _FixedWorkload:
    """A stand-in workload for timing a function that ignores its argument (the copy)."""
    lists = [None]
    clipping = False
    dirty = set()


# ----------------------------------------------------------------------------------------------------------
# 5. The run
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Config:
    device: torch.device
    sets: list
    providers: list
    regimes: list
    out: str
    quick: bool
    budget_s: float
    min_n: int
    max_n: int
    compile_sets: object
    scaling: list
    scaling_points: dict
    scaling_regime: str
    tensors_elements: int
    plot: bool
    tag: str
    mem_fraction: float
    rounds: int = 3  # interleaved rounds of timing per set and regime
    max_s: float = 0.0  # soft time limit (0: none): later sets and points are skipped past it
    extras: list = field(default_factory=list)  # sets that also get the AMP and optimizer rows (--extras)
    t0: float = field(default_factory=time.perf_counter)
    notes: list = field(default_factory=list)


class Progress:
    def __init__(self, total):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()

    def step(self, text):
        self.done += 1
        el = time.perf_counter() - self.t0
        print(f"[{self.done:3d}/{self.total}] {el:6.0f}s  {text}", flush=True)


def fmt_time(s):
    if s is None or not math.isfinite(s):
        return "-"
    if s >= 1.0:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def fit_set(pset, device, mem_fraction):
    """The set's specs, sized down to fewer layers when a copy to rotate plus the pristine copy do not fit.
    Returns (specs, label, note) or (None, label, why) when it cannot fit at all."""
    budget = mem_fraction * free_bytes(device)
    specs = pset.specs()
    need = 2 * specs_bytes(specs)  # one list and the pristine copy, at least
    if need <= budget:
        return specs, pset.name, ""
    if pset.layers:
        for n in range(pset.layers - 1, 0, -1):
            specs = pset.specs(n)
            if 2 * specs_bytes(specs) <= budget:
                label = f"{pset.name}[{n}/{pset.layers} layers]"
                return specs, label, f"{pset.name} sized down to {n} of {pset.layers} layers to fit memory"
    return None, pset.name, f"{pset.name} skipped: needs {need / 2**30:.1f} GiB, {budget / 2**30:.1f} GiB usable"


def measure_set(cfg, clock, specs, label, providers, progress, rows, compile_ok=True, kind="set", wl=None,
                baseline=BASELINE):
    """Every provider on one set, in each regime; appends rows. Within a regime the providers are timed in
    interleaved rounds (cfg.rounds), so that a load that drifts during the run (a shared machine) biases
    none of them more than the others."""
    device = cfg.device
    nbytes = specs_bytes(specs)
    if wl is None:
        rot = rotations_for(nbytes, device)
        while rot > 1 and (rot + 1) * nbytes > cfg.mem_fraction * free_bytes(device):
            rot -= 1
        wl = Workload(specs, device, rot)
    rot = len(wl.lists)
    fns, base, compiled = {}, {}, set()

    def fail(row, e):  # a provider failing must not lose the others' results
        wl.set_regime(wl.clipping)  # the failed call may have left some gradients clipped
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]

    try:
        for regime in cfg.regimes:
            wl.set_regime(regime != "noclip")
            active = []  # [row, fn, estimated seconds per call, times, host times]
            for prov in providers:
                if prov.compiles and not compile_ok:
                    continue
                row = {"kind": kind, "set": label, "regime": regime, "provider": prov.key, "label": prov.label,
                       "tensors": len(specs), "elements": wl.numel, "bytes": nbytes, "rotations": rot,
                       "bytes_moved": (2 if regime == "clip" else 1) * nbytes}
                if getattr(prov, "bytes_moved", None):
                    row.update(prov.bytes_moved(nbytes))
                active.append([row, None, 0.0, [], []])
                try:
                    if prov.key not in fns:
                        fns[prov.key] = prov.make(device)
                    fn = fns[prov.key]
                    first = clock.warmup(fn, wl, 1)[0]
                    if prov.compiles and prov.key not in compiled:  # the first call compiles
                        compiled.add(prov.key)
                        rows.append({"kind": kind, "set": label, "regime": "compile_s", "provider": prov.key,
                                     "label": prov.label + " (compile)", "tensors": len(specs),
                                     "elements": wl.numel, "bytes": nbytes, "compile_s": first})
                    row["check"] = (getattr(prov, "check", None) or check_call)(fn, wl)
                    active[-1][1:3] = [fn, min(first, clock.warmup(fn, wl, 1)[0])]
                except Exception as e:  # noqa: BLE001
                    fail(row, e)
            for _ in range(cfg.rounds):
                for row, fn, est, times, hosts in active:
                    if "error" in row:
                        continue
                    try:
                        t, h = clock.measure(fn, wl, est, share=1.0 / cfg.rounds)
                        times += t
                        hosts += h
                    except Exception as e:  # noqa: BLE001
                        fail(row, e)
            for row, fn, est, times, hosts in active:
                if "error" not in row:
                    row.update(summarize(times, hosts))
                    try:
                        row["launches"] = count_launches(fn, wl, device) if kind != "scaling" else None
                    except Exception as e:  # noqa: BLE001
                        fail(row, e)
                if row["provider"] == baseline and "median_s" in row:
                    base[regime] = row["median_s"]
                rows.append(row)
                progress.step(status_line(row))
            for r in rows:
                if r["set"] == label and r.get("regime") == regime and "median_s" in r and regime in base:
                    r["speedup"] = base[regime] / r["median_s"]
    finally:
        del wl, fns
        if device.type == "cuda":
            torch.cuda.empty_cache()


def status_line(row):
    head = f"{row['set']:<18} {row['regime']:<6} {row['label']:<20}"
    if "error" in row:
        return f"{head} ERROR {row['error']}"
    extra = f"  CHECK FAILED: {row['check']}" if row.get("check") else ""
    return (f"{head} {fmt_time(row['median_s']):>10}  ({fmt_time(row['p20_s'])} .. {fmt_time(row['p80_s'])}, "
            f"n={row['n']}){extra}")


def add_bandwidth(rows, copy_bps):
    for r in rows:
        if "median_s" in r and r.get("bytes_moved"):
            r["bytes_per_s"] = r["bytes_moved"] / r["median_s"]
            r["pct_copy"] = 100.0 * r["bytes_per_s"] / copy_bps


def per_tensor_cost(points):
    """Least-squares slope of median time against tensor count: seconds per tensor."""
    xs = [p["tensors"] for p in points]
    ys = [p["median_s"] for p in points]
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else None


# ----------------------------------------------------------------------------------------------------------
# 5b. Extras (--extras): clipping fused with what surrounds it in a training loop, against the unfused
#     sequences it replaces. Timed by measure_set like the providers, on workloads of their own.
# ----------------------------------------------------------------------------------------------------------
AMP_SCALE = 2.0 ** 12  # the loss scale the AMP rows' gradients carry
ADAMW_BYTES = 7  # fused AdamW step: reads grad, param, exp_avg, exp_avg_sq; writes the last three (x N)
EXTRAS_DEFAULT_SETS = ["gpt2-small", "many-small"]


def _fresh_scaler_state(scaler):
    scaler._per_optimizer_states = __import__("collections").defaultdict(
        torch.amp.grad_scaler._refresh_per_optimizer_state)


def _amp_providers(device, wl):
    """Each call: gradients scaled by AMP_SCALE, a GradScaler whose per-optimizer stage is fresh (reset on
    restore, outside the timed region); the call unscales and clips. Returns the unscaled norm."""
    scaler = torch.amp.GradScaler(device.type, init_scale=AMP_SCALE)
    scaler.scale(torch.ones((), device=device))  # creates the scale tensor (GradScaler's lazy init)
    opts = {id(ps): torch.optim.SGD(ps, lr=0.0) for ps in wl.lists}  # holds the params; never steps
    wl.on_restore.append(lambda i: _fresh_scaler_state(scaler))

    def torch_seq(device):
        def call(ps):
            scaler.unscale_(opts[id(ps)])
            return torch.nn.utils.clip_grad_norm_(ps, MAX_NORM)
        return call

    def fused_clip_seq(device):
        def call(ps):
            scaler.unscale_(opts[id(ps)])
            return fusedclip.clip_(ps, MAX_NORM)
        return call

    def fused(device):
        return lambda ps: fusedclip.unscale_clip_(scaler, opts[id(ps)], MAX_NORM)

    unfused = lambda n: {"bytes_moved": 5 * n}  # noqa: E731  unscale r+w (2N) + norm r (N) + scale r+w (2N)
    return [
        Provider("amp-torch", "unscale_+torch clip", torch_seq, _always, bytes_moved=unfused),
        Provider("amp-clip", "unscale_+fusedclip.clip_", fused_clip_seq, _always, bytes_moved=unfused),
        Provider("amp-fused", "fusedclip.unscale_clip_", fused, _always, bytes_moved=lambda n: {"bytes_moved": 2 * n}),
    ]


def _optim_providers(device, wl):
    """Each call: clip, then a fused AdamW step (one optimizer per list, shared by the three sequences).
    bytes_moved is the whole step (clipping + AdamW's 7N); clip_bytes_moved the clipping part."""
    opts = {id(ps): torch.optim.AdamW(ps, lr=1e-3, fused=True) for ps in wl.lists}
    wl.optimizers = opts

    def seq(clip):
        def make(device):
            def call(ps):
                norm = clip(ps)
                opts[id(ps)].step()
                return norm
            return call
        return make

    def check(fn, wl):
        """The returned norm, and the parameters after the call against clip_grad_norm_ + step from the same
        parameters and optimizer state."""
        ps, opt = wl.lists[0], opts[id(wl.lists[0])]
        p0 = [p.detach().clone() for p in ps]
        st = __import__("copy").deepcopy(opt.state_dict())
        got_norm = float(fn(ps))
        got = [p.detach().clone() for p in ps]
        with torch.no_grad():
            torch._foreach_copy_([p.detach() for p in ps], p0)
        opt.load_state_dict(st)
        wl.restore(0)
        torch.nn.utils.clip_grad_norm_(ps, MAX_NORM)
        opt.step()
        wl.restore(0)
        problems = []
        want = wl.expected_norm()
        if not math.isfinite(got_norm) or abs(got_norm - want) > 2e-2 * want:
            problems.append(f"norm {got_norm:.6g}, expected {want:.6g}")
        d_ref = torch.cat([(p.detach().float() - a.float()).flatten() for p, a in zip(ps, p0)])
        d_got = torch.cat([(g.float() - a.float()).flatten() for g, a in zip(got, p0)])
        err, size = float((d_got - d_ref).norm()), float(d_ref.norm())
        if not (size > 0 and err <= 2e-2 * size):
            problems.append(f"step differs from clip_grad_norm_ + step by {err:.3g} (update norm {size:.3g})")
        return "; ".join(problems)

    def by(clip_n):
        return lambda n: {"bytes_moved": (clip_n + ADAMW_BYTES) * n, "clip_bytes_moved": clip_n * n}

    def into(ps):
        return fusedclip.clip_into_(opts[id(ps)], MAX_NORM)

    return [
        Provider("optim-torch", "torch clip+AdamW step", seq(lambda ps: torch.nn.utils.clip_grad_norm_(ps, MAX_NORM)),
                 _always, bytes_moved=by(3), check=check),
        Provider("optim-clip", "fusedclip.clip_+step", seq(lambda ps: fusedclip.clip_(ps, MAX_NORM)), _always,
                 bytes_moved=by(3), check=check),
        Provider("optim-into", "fusedclip.clip_into_+step", seq(into), _always, bytes_moved=by(1), check=check),
    ]


EXTRAS = [  # (regime, workload options, providers, baseline key, copies of the gradients' size per list)
    ("amp", {"grad_scale": AMP_SCALE}, _amp_providers, "amp-torch", 1),
    ("optim", {"real_params": True}, _optim_providers, "optim-torch", 4),  # grad, param, exp_avg, exp_avg_sq
]


def measure_extras(cfg, clock, specs, label, progress, rows):
    """The AMP and optimizer rows of one set (regimes "amp" and "optim", speedups against the torch
    sequence). The optimizer's per-list memory limits the rotations (on the CPU usually 1 for large sets)."""
    device = cfg.device
    nbytes = specs_bytes(specs)
    for regime, opts, make_providers, baseline, per_list in EXTRAS:
        budget = cfg.mem_fraction * free_bytes(device)
        rot = rotations_for(nbytes, device)
        while rot > 1 and (per_list * rot + 1) * nbytes > budget:
            rot -= 1
        if (per_list * rot + 1) * nbytes > budget:
            cfg.notes.append(f"{regime} rows of {label} skipped: do not fit memory")
            for _ in range(3):
                progress.step(f"{label} {regime}: skipped (memory)")
            continue
        wl = Workload(specs, device, rot, **opts)
        try:
            providers = make_providers(device, wl)
            measure_set(_with_regimes(cfg, [regime]), clock, specs, label, providers, progress, rows,
                        kind="extra", wl=wl, baseline=baseline)
        finally:
            del wl
            if device.type == "cuda":
                torch.cuda.empty_cache()


def run(cfg):
    device = cfg.device
    clock = Clock(device, cfg.budget_s, cfg.min_n, cfg.max_n)
    providers = []
    for key in cfg.providers:
        ok, why = PROVIDERS[key].available(device)
        if ok:
            providers.append(PROVIDERS[key])
        else:
            cfg.notes.append(f"provider {key} not run: {why}")
    plan = []
    for name in cfg.sets:
        specs, label, note = fit_set(SETS[name], device, cfg.mem_fraction)
        if note:
            cfg.notes.append(note)
        if specs is not None:
            plan.append((name, specs, label))
    compile_sets = cfg.compile_sets
    if any(p.compiles for p in providers) and compile_sets is not None:
        left = [name for name, _, _ in plan if name not in compile_sets]
        if left:
            cfg.notes.append(f"torch.compile not run on {', '.join(left)} (compile time grows with the tensor "
                             f"count; --compile-sets {','.join(left)} or all to include)")
    n_prov = {name: sum(1 for p in providers if not p.compiles or compile_sets is None or name in compile_sets)
              for name, _, _ in plan}
    scal_prov = [p for p in providers if p.key not in SCALING_SKIP]
    total = sum(n_prov[n] * len(cfg.regimes) for n, _, _ in plan)
    total += len(scal_prov) * sum(len(cfg.scaling_points[c]) for c in cfg.scaling)
    total += 3 * len(EXTRAS) * sum(1 for n, _, _ in plan if n in cfg.extras)
    progress = Progress(total + 1)

    meta = environment(device)
    meta["cache_bytes"] = cache_bytes(device)
    copy_size = (1 << 30) if device.type == "cuda" else max(4 * cache_bytes(device), 64 << 20)
    if cfg.quick:
        copy_size = max(2 * cache_bytes(device), 32 << 20)
    copy_size = int(min(copy_size, cfg.mem_fraction * free_bytes(device) / 3))
    copy = copy_bandwidth(device, clock, copy_size)
    progress.step(f"device-to-device copy of {copy['buffer_bytes'] / 2**20:.0f} MiB: "
                  f"{copy['bytes_per_s'] / 1e9:.1f} GB/s (read + write)")

    rows = []
    for name, specs, label in plan:
        ok = compile_sets is None or name in compile_sets
        if over_time(cfg, 1.0):
            cfg.notes.append(f"{label} skipped: past the time limit (--max-minutes)")
            continue
        if ok and over_time(cfg, 0.5) and any(p.compiles for p in providers):
            ok = False
            cfg.notes.append(f"torch.compile skipped on {label}: past half the time limit (--max-minutes)")
        measure_set(cfg, clock, specs, label, providers, progress, rows, compile_ok=ok)
        if name in cfg.extras:
            measure_extras(cfg, clock, specs, label, progress, rows)
    if any(name in cfg.extras for name, _, _ in plan):
        cfg.notes.append(
            f"amp rows: gradients scaled by {AMP_SCALE:g} (torch.amp.GradScaler), a fresh scaler stage and the "
            "gradients restored before each call; bytes moved: unscale_clip_ 2N, unscale_ + clip 5N "
            "(unscale r+w, norm r, scale r+w). optim rows: clip + torch.optim.AdamW(fused=True).step(); bytes "
            "moved is the whole step: clipping (clip_into_ N, clip_ 3N) + AdamW's 7N. Speedups against the "
            "torch sequence of the same regime.")
    add_bandwidth(rows, copy["bytes_per_s"])

    scaling = {"regime": cfg.scaling_regime, "points": {}, "per_tensor_s": {}}
    for curve in cfg.scaling:
        pts = []
        for x in cfg.scaling_points[curve]:
            specs = scaling_specs(curve, x, cfg.tensors_elements)
            if over_time(cfg, 1.0):
                cfg.notes.append(f"scaling {curve}={x} skipped: past the time limit (--max-minutes)")
                continue
            if 2 * specs_bytes(specs) > cfg.mem_fraction * free_bytes(device):
                cfg.notes.append(f"scaling {curve}={x} skipped: does not fit memory")
                for _ in scal_prov:
                    progress.step(f"scaling {curve}={x}: skipped (memory)")
                continue
            sub = []
            cfg_r = _with_regimes(cfg, [cfg.scaling_regime])
            measure_set(cfg_r, clock, specs, f"{curve}={x}", scal_prov, progress, sub, kind="scaling")
            for r in sub:
                r["curve"], r["x"] = curve, x
            pts += sub
        add_bandwidth(pts, copy["bytes_per_s"])
        scaling["points"][curve] = pts
        if curve == "tensors":
            for p in scal_prov:
                ok_pts = [r for r in pts if r["provider"] == p.key and "median_s" in r]
                slope = per_tensor_cost(ok_pts)
                if slope is not None:
                    scaling["per_tensor_s"][p.key] = slope
    return {"meta": meta, "config": config_json(cfg), "copy": copy, "results": rows, "scaling": scaling,
            "notes": cfg.notes, "targets": targets(rows, scaling, device)}


def over_time(cfg, fraction):
    return cfg.max_s > 0 and time.perf_counter() - cfg.t0 > fraction * cfg.max_s


def _with_regimes(cfg, regimes):
    import copy as _copy

    c = _copy.copy(cfg)
    c.regimes = regimes
    return c


def environment(device):
    meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "device_type": device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "fusedclip": fusedclip.__version__,
            "threads": torch.get_num_threads(), "host": platform.node()}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    try:
        from fusedclip import _ext

        meta["fusedclip_build"] = _ext.build_info()
    except Exception as e:  # noqa: BLE001
        meta["fusedclip_build"] = {"error": str(e)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        meta.update(device_name=p.name, sm=f"{p.major}{p.minor}", sms=p.multi_processor_count,
                    memory_bytes=p.total_memory, driver=_nvidia_driver())
    else:
        meta.update(device_name=cpu_name(), cores=os.cpu_count())
    return meta


def _nvidia_driver():
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU " + (platform.processor() or platform.machine())


def config_json(cfg):
    return {"device": str(cfg.device), "sets": cfg.sets, "providers": cfg.providers, "regimes": cfg.regimes,
            "quick": cfg.quick, "budget_s": cfg.budget_s, "min_n": cfg.min_n, "max_n": cfg.max_n,
            "compile_sets": cfg.compile_sets, "scaling": cfg.scaling, "scaling_points": cfg.scaling_points,
            "max_s": cfg.max_s, "rounds": cfg.rounds, "extras": cfg.extras, "scaling_regime": cfg.scaling_regime, "tensors_elements": cfg.tensors_elements, "max_norm": MAX_NORM, "clip_norm": CLIP_NORM,
            "noclip_norm": NOCLIP_NORM}


def targets(rows, scaling, device):
    """The issue's targets, as measured: [{what, value, target, met}] (only those with data)."""
    out = []

    def row(set_name, regime, prov):
        for r in rows:
            if r["set"].split("[")[0] == set_name and r["regime"] == regime and r["provider"] == prov \
                    and "median_s" in r:
                return r
        return None

    def add(what, value, target, higher=True, unit="x"):
        if value is not None:
            out.append({"what": what, "value": value, "target": target, "unit": unit,
                        "met": value >= target if higher else value <= target})

    fused = [p for p in ("native", "triton") if any(r["provider"] == p for r in rows)]
    if device.type == "cpu":
        for p in fused:
            for regime in ("clip", "noclip"):
                r = row("many-small", regime, p)
                add(f"{p}: many-small {regime} speedup vs torch foreach", r and r.get("speedup"), 4.0)
            r = row("gpt2-small", "clip", p)
            add(f"{p}: gpt2-small clip speedup vs torch foreach", r and r.get("speedup"), 1.0)
            r = row("gpt2-small", "noclip", p)
            add(f"{p}: gpt2-small noclip speedup vs torch foreach", r and r.get("speedup"), 1.6)
    else:
        for p in fused:
            for s in ("gpt2-xl", "llama-7b"):
                for regime, t in (("clip", 1.4), ("noclip", 2.7)):
                    r = row(s, regime, p)
                    add(f"{p}: {s} {regime} speedup vs torch foreach", r and r.get("speedup"), t)
                    add(f"{p}: {s} {regime} % of copy bandwidth", r and r.get("pct_copy"), 90.0, unit="%")
            for regime in ("clip", "noclip"):
                r = row("many-small", regime, p)
                add(f"{p}: many-small {regime} speedup vs torch foreach", r and r.get("speedup"), 10.0)
                c = row("many-small", regime, "compile")
                if r and c:
                    add(f"{p}: many-small {regime} speedup vs torch.compile", c["median_s"] / r["median_s"], 2.0)
                add(f"{p}: many-small {regime} launches per call", r and r.get("launches"), 1, higher=False,
                    unit="")
    for p in fused:
        s = scaling.get("per_tensor_s", {}).get(p)
        add(f"{p}: cost per tensor (tensors curve)", s and s * 1e6, 0.2, higher=False, unit="us")
        if s is not None and s < 0:  # a negative slope is noise, not a met target
            out[-1]["met"] = False
            out[-1]["what"] += " (negative: too noisy to judge)"
    return out


# ----------------------------------------------------------------------------------------------------------
# 6. Reports
# ----------------------------------------------------------------------------------------------------------
def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def result_table(result):
    """Markdown table of the per-set results (also printed on the terminal)."""
    head = ("| set | regime | provider | median | p20 .. p80 | speedup | bytes moved | GB/s | % copy | "
            "launches | host/call |")
    lines = [head, "|" + "---|" * 11]
    for r in result["results"]:
        if r["regime"] == "compile_s":
            lines.append(f"| {r['set']} | compile | {r['label']} | {fmt_time(r['compile_s'])} | first call | "
                         "| | | | | |")
            continue
        if "error" in r:
            lines.append(f"| {r['set']} | {r['regime']} | {r['label']} | error: {r['error']} | | | | | | | |")
            continue
        sp = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        chk = " (CHECK FAILED)" if r.get("check") else ""
        launches = "-" if r.get("launches") is None else str(r["launches"])
        lines.append(f"| {r['set']} | {r['regime']} | {r['label']}{chk} | {fmt_time(r['median_s'])} | "
                     f"{fmt_time(r['p20_s'])} .. {fmt_time(r['p80_s'])} | {sp} | "
                     f"{r['bytes_moved'] / 1e6:.1f} MB | {r['bytes_per_s'] / 1e9:.1f} | {r['pct_copy']:.0f}% | "
                     f"{launches} | {fmt_time(r['host_s'])} |")
    return "\n".join(lines)


def scaling_table(result, curve):
    pts = result["scaling"]["points"].get(curve, [])
    if not pts:
        return ""
    provs = list(dict.fromkeys(p["label"] for p in pts))
    xs = list(dict.fromkeys(p["x"] for p in pts))
    by = {(p["x"], p["label"]): p for p in pts}
    total = result["config"]["tensors_elements"]
    name = f"tensors ({total:,} elements in all)" if curve == "tensors" else "elements (100 tensors)"
    lines = [f"| {name} | " + " | ".join(provs) + " |", "|---|" + "---|" * len(provs)]
    for x in xs:
        cells = []
        for lab in provs:
            p = by.get((x, lab))
            cells.append(fmt_time(p["median_s"]) if p and "median_s" in p else "-")
        lines.append(f"| {x:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_table(result):
    if not result["targets"]:
        return ""
    lines = ["| target | measured | goal | |", "|---|---|---|---|"]
    for t in result["targets"]:
        cmp = ">=" if "per call" not in t["what"] and t["unit"] != "us" else "<="
        val = f"{t['value']:.2f}{t['unit']}" if t["unit"] != "" else f"{t['value']:.0f}"
        goal = f"{cmp} {t['target']}{t['unit']}"
        lines.append(f"| {t['what']} | {val} | {goal} | {'met' if t['met'] else 'MISSED'} |")
    return "\n".join(lines)


def header(result):
    m, c = result["meta"], result["copy"]
    lines = [f"- device: **{m['device_name']}** ({m['device_type']}, {m.get('threads')} threads)",
             f"- date: {m['date']}",
             f"- torch {m['torch']}, CUDA {m['cuda']}, Triton {m['triton']}, Python {m['python']}, "
             f"fusedclip {m['fusedclip']}",
             f"- copy limit: {c['bytes_per_s'] / 1e9:.1f} GB/s (dst.copy_(src) of {c['buffer_bytes'] / 2**20:.0f} "
             f"MiB, read + write, measured in this run)",
             f"- max_norm {MAX_NORM}; gradient norm {CLIP_NORM} when clipping (clip), {NOCLIP_NORM} when not "
             "(noclip); bytes moved: 2N clipping, N not"]
    return "\n".join(lines)


def markdown(result):
    parts = ["# fusedclip benchmark", "", header(result), "", "## Per set", "", result_table(result), ""]
    pt = result["scaling"].get("per_tensor_s", {})
    for curve in ("tensors", "elements"):
        t = scaling_table(result, curve)
        if t:
            parts += [f"## Time per call against {curve} ({result['scaling']['regime']})", "", t, ""]
    if pt:
        parts += ["Cost per tensor (least-squares slope of the tensors curve): " +
                  ", ".join(f"{PROVIDERS[k].label} {v * 1e6:.2f} us" for k, v in pt.items()), ""]
    t = targets_table(result)
    if t:
        parts += ["## Targets", "", t, ""]
    if result["notes"]:
        parts += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(parts)


def terminal(result):
    print()
    print(header(result).replace("**", ""))
    print()
    print(result_table(result))
    for curve in ("tensors", "elements"):
        t = scaling_table(result, curve)
        if t:
            print()
            print(t)
    pt = result["scaling"].get("per_tensor_s", {})
    if pt:
        print("\ncost per tensor: " + ", ".join(f"{PROVIDERS[k].label} {v * 1e6:.2f} us" for k, v in pt.items()))
    t = targets_table(result)
    if t:
        print()
        print(t)
    for n in result["notes"]:
        print(f"note: {n}")


def plot(result, path):
    """Speedup per set (both regimes) and the two scaling curves, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["results"] if "speedup" in r]
    sets = list(dict.fromkeys(r["set"] for r in rows))
    provs = [k for k in PROVIDERS if any(r["provider"] == k for r in rows) and k != BASELINE]
    colors = {k: f"C{i}" for i, k in enumerate(PROVIDERS)}
    curves = [c for c in ("tensors", "elements") if result["scaling"]["points"].get(c)]
    fig, axes = plt.subplots(1, 1 + len(curves), figsize=(7 + 5 * len(curves), 4.8),
                             gridspec_kw={"width_ratios": [1.6] + [1] * len(curves)}, squeeze=False)
    ax = axes[0][0]
    groups = [(s, g) for s in sets for g in ("clip", "noclip") if any(r["set"] == s and r["regime"] == g
                                                                     for r in rows)]
    width = 0.8 / max(1, len(provs))
    for j, k in enumerate(provs):
        xs, ys = [], []
        for i, (s, g) in enumerate(groups):
            r = next((r for r in rows if r["set"] == s and r["regime"] == g and r["provider"] == k), None)
            if r:
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(r["speedup"])
        bars = ax.bar(xs, ys, width, label=PROVIDERS[k].label, color=colors[k])
        ax.bar_label(bars, labels=[f"{y:.1f}" if y < 10 else f"{y:.0f}" for y in ys], fontsize=6.5, padding=1)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{s}\n{g}" for s, g in groups], fontsize=7.5, rotation=0)
    ax.set_ylabel("speedup vs torch foreach (higher is better)")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator([0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100]))
    ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title("Speedup per set (median time per call)")
    ax.legend(fontsize=8)
    for a, curve in zip(axes[0][1:], curves):
        pts = result["scaling"]["points"][curve]
        for k in [k for k in PROVIDERS if any(p["provider"] == k for p in pts)]:
            pk = [p for p in pts if p["provider"] == k and "median_s" in p]
            a.errorbar([p["x"] for p in pk], [p["median_s"] * 1e3 for p in pk],
                       yerr=[[(p["median_s"] - p["p20_s"]) * 1e3 for p in pk],
                             [(p["p80_s"] - p["median_s"]) * 1e3 for p in pk]],
                       marker="o", ms=3, capsize=2, label=PROVIDERS[k].label, color=colors[k])
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_ylabel("time per call (ms)")
        total = result["config"]["tensors_elements"]
        a.set_xlabel(f"tensors ({total:,} elements in all)" if curve == "tensors" else "elements (100 tensors)")
        a.set_title(f"Time against {curve} ({result['scaling']['regime']})")
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=8)
    m = result["meta"]
    fig.suptitle(f"fusedclip on {m['device_name']} - torch {m['torch']} - {m['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result, cfg):
    os.makedirs(cfg.out, exist_ok=True)
    m = result["meta"]
    stem = f"{slug(m['device_name'])}_{m['date'][:10]}" + (f"_{slug(cfg.tag)}" if cfg.tag else "")
    paths = {"json": os.path.join(cfg.out, stem + ".json"), "md": os.path.join(cfg.out, stem + ".md")}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(paths["md"], "w") as f:
        f.write(markdown(result))
    if cfg.plot:
        try:
            paths["png"] = os.path.join(cfg.out, stem + ".png")
            plot(result, paths["png"])
        except ImportError:
            paths.pop("png")
            print("matplotlib is not installed: no plot (pip install matplotlib)")
    return paths


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
def _csv(text, known, what):
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in known]
    if bad:
        raise SystemExit(f"fusedclip bench: unknown {what} {bad}; choose from {sorted(known)}")
    return items


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m fusedclip bench",
                                 description="fusedclip against torch (and apex) on Transformer-sized gradient "
                                             "sets; see bench/README.md")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when a GPU is visible)")
    ap.add_argument("--sets", default=None,
                    help="comma-separated, or 'all' (default: every set on a GPU, a CPU-sized subset on the CPU). "
                         f"Sets: {', '.join(SETS)}")
    ap.add_argument("--providers", default=None, help=f"comma-separated (default: all). {', '.join(PROVIDERS)}")
    ap.add_argument("--regimes", default="clip,noclip", help="clip (clipping active), noclip, or both")
    ap.add_argument("--out", default=os.path.join("bench", "results"), help="output folder (default bench/results)")
    ap.add_argument("--tag", default="", help="suffix for the output file names")
    ap.add_argument("--quick", action="store_true", help="fewer sets, short timings, small scaling curves")
    ap.add_argument("--time", type=float, default=None, help="seconds of timing per measurement")
    ap.add_argument("--compile-sets", default=None,
                    help="sets on which torch.compile runs ('all', or comma-separated; CPU default gpt2-small)")
    ap.add_argument("--scaling", default="tensors,elements", help="curves to run: tensors, elements, none")
    ap.add_argument("--scaling-regime", default="clip", choices=["clip", "noclip"])
    ap.add_argument("--tensors-points", default=None, help="tensor counts of the tensors curve (comma-separated)")
    ap.add_argument("--tensors-elements", type=float, default=SCALING_TENSORS_ELEMENTS,
                    help="elements shared by the tensors of the tensors curve (default 4M)")
    ap.add_argument("--elements-points", default=None, help="element counts of the elements curve")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--mem-fraction", type=float, default=None,
                    help="fraction of free memory the sets may use (GPU 0.85, CPU 0.5)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved timing rounds per set and regime (default 3, quick 2)")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="soft time limit: sets and scaling points that start after it are skipped, torch.compile "
                         "after half of it (GPU default 7, CPU none)")
    ap.add_argument("--extras", nargs="?", const="auto", default=None,
                    help="also time AMP (unscale_clip_) and optimizer (clip_into_ + fused AdamW step) rows against "
                         "the unfused sequences, on the listed sets (comma-separated, or 'all'; bare --extras: "
                         f"{' and '.join(EXTRAS_DEFAULT_SETS)} when run, else every set of the run). Off by default")
    ap.add_argument("--list", action="store_true", help="list the sets and providers and exit")
    return ap.parse_args(argv)


def make_config(ns):
    dev = ns.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("fusedclip bench: --device cuda but no CUDA GPU is visible")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise SystemExit(f"fusedclip bench: unsupported device {dev!r} (cpu or cuda)")
    dt = device.type
    if ns.sets in (None, "default"):
        sets = (QUICK_SETS if ns.quick else DEFAULT_SETS)[dt]
    elif ns.sets == "all":
        sets = [n for n, s in SETS.items() if not s.hidden]
    else:
        sets = _csv(ns.sets, SETS, "set")
    providers = list(PROVIDERS) if ns.providers in (None, "all") else _csv(ns.providers, PROVIDERS, "provider")
    regimes = _csv(ns.regimes, {"clip", "noclip"}, "regime")
    if ns.compile_sets is None:
        compile_sets = DEFAULT_COMPILE_SETS[dt]
    elif ns.compile_sets == "all":
        compile_sets = None
    else:
        compile_sets = _csv(ns.compile_sets, SETS, "set")
    if ns.extras is None:
        extras = []
    elif ns.extras == "all":
        extras = list(sets)
    elif ns.extras == "auto":
        extras = [s for s in sets if s in EXTRAS_DEFAULT_SETS] or list(sets)
    else:
        extras = _csv(ns.extras, SETS, "set")
    scaling = [] if ns.scaling == "none" else _csv(ns.scaling, {"tensors", "elements"}, "scaling curve")
    points = dict(SCALING["quick" if ns.quick else dt])
    for curve, text in (("tensors", ns.tensors_points), ("elements", ns.elements_points)):
        if text:
            try:
                points[curve] = [int(float(x)) for x in text.split(",") if x.strip()]
            except ValueError:
                raise SystemExit(f"fusedclip bench: --{curve}-points takes integers, got {text!r}") from None
    if ns.quick:
        budget, min_n, max_n = ns.time or 0.05, 3, 50
    elif dt == "cuda":
        budget, min_n, max_n = ns.time or 0.25, 10, 2000
    else:
        budget, min_n, max_n = ns.time or 0.5, 5, 500
    return Config(device=device, sets=sets, providers=providers, regimes=regimes, out=ns.out, quick=ns.quick,
                  budget_s=budget, min_n=min_n, max_n=max_n, compile_sets=compile_sets, scaling=scaling,
                  scaling_points=points, scaling_regime=ns.scaling_regime,
                  tensors_elements=int(ns.tensors_elements), plot=not ns.no_plot, tag=ns.tag,
                  mem_fraction=ns.mem_fraction or (0.85 if dt == "cuda" else 0.5),
                  rounds=max(1, ns.rounds or (2 if ns.quick else 3)), extras=extras,
                  max_s=60 * (ns.max_minutes if ns.max_minutes is not None else (7 if dt == "cuda" else 0)))


def list_all():
    print("sets:")
    for s in SETS.values():
        specs = s.specs()
        print(f"  {s.name:<12} {len(specs):6,} tensors {sum(numel(x) for x, _ in specs) / 1e6:9.2f}M elements "
              f"{specs_bytes(specs) / 2**30:7.2f} GiB  {s.about}{' (hidden)' if s.hidden else ''}")
    print("providers:")
    for p in PROVIDERS.values():
        print(f"  {p.key:<12} {p.label}")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `python -m fusedclip bench -- --quick` (argparse's REMAINDER keeps the "--")
        argv = argv[1:]
    ns = parse(argv)
    if ns.list:
        list_all()
        return 0
    cfg = make_config(ns)
    t0 = time.perf_counter()
    print(f"fusedclip bench on {cfg.device}: sets {', '.join(cfg.sets)}; providers {', '.join(cfg.providers)}; "
          f"regimes {', '.join(cfg.regimes)}; scaling {', '.join(cfg.scaling) or 'none'}", flush=True)
    result = run(cfg)
    result["meta"]["wall_s"] = time.perf_counter() - t0
    terminal(result)
    paths = write_outputs(result, cfg)
    print(f"\nwrote {', '.join(paths.values())} in {result['meta']['wall_s']:.0f} s")
    failed = [r for r in result["results"] if r.get("check")]
    for r in failed:
        print(f"CHECK FAILED: {r['set']} {r['regime']} {r['label']}: {r['check']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
