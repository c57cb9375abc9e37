"""Helpers for testing gradient clipping against a float64 reference: the ones fusedclip's own tests use, public so
that GPU checks, benchmarks and users' tests can compare the same way.

- references: `ref_norm` (the norm of all elements as one float64 vector), `ref_coef` (torch's clip coefficient
  from it), `rel_err`, `AdaGCReference` (AdaGC's rule, arXiv 2502.11034, in float64);
- makers: `make_grads` (fresh random gradients, one scale or mixed scales), `mixed_scales`, `make_params`
  (parameters with such gradients, optionally non-contiguous or None), `params_with`, `clone_params`, `grads_of`;
  `device_grads` (the same drawn by the device's own generator: GiB-sized sets on a GPU);
- bit equality: `bits`, `same_bits`, `assert_bit_identical` (a gradient that must not change keeps its bits, NaN
  payloads and -0.0 included);
- tolerances: `TOL` (torch.testing.assert_close's defaults per dtype), `low_precision_tol`;
- cases shared by the backends' tests: `check_against_reference`, `clip_parity_case`, `no_write_case`, with the
  shapes, dtype sets and norm types they use (`SHAPES`, `DTYPE_SETS`, `NORMS`);
- multi-process runs (Gloo on CPU): `run_ranks`, `run_cases`, `free_port`;
- ZClip's rule in float64: `zclip_state_f64` (the state a kernel must hold, to the bit, after returning given
  norms), `same_f64`;
- `NoHostRead`: a dispatch mode that fails on any host read of a tensor (what a sync goes through), for CPU tests of
  sync-free code.

Nothing here needs pytest. Example::

    from fusedclip.testing import make_params, clone_params, grads_of, ref_norm, rel_err
    params = make_params([(33, 129), (7,)], [torch.float32, torch.bfloat16], seed=0, scale="mixed")
    orig = clone_params(params)
    norm = fusedclip.clip_(params, 1.0)
    assert rel_err(norm, ref_norm(grads_of(orig), 2.0)) < 2e-6
"""
import math

import torch

import fusedclip

__all__ = ["TOL", "SHAPES", "DTYPE_SETS", "NORMS", "ref_norm", "ref_coef", "rel_err", "mixed_scales", "make_grads",
           "make_params", "params_with", "clone_params", "grads_of", "bits", "same_bits", "assert_bit_identical",
           "low_precision_tol", "check_against_reference", "clip_parity_case", "no_write_case", "free_port",
           "run_ranks", "run_cases", "AdaGCReference", "NoHostRead", "device_grads", "zclip_state_f64",
           "same_f64"]

# ---- tolerances ------------------------------------------------------------------------------------------

# torch.testing.assert_close's defaults per dtype: (rtol, atol)
TOL = {
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
}


def low_precision_tol(dtypes):
    """The loosest assert_close tolerance (rtol, atol) among the dtypes (for values stored in them)."""
    return max(TOL[d] for d in dtypes)


# ---- the sample space of the parity cases -----------------------------------------------------------------

# Odd shapes on purpose: 0-dim, empty, not a multiple of any vector width, > 64K elements, several chunks.
SHAPES = [(), (0,), (7,), (3, 5), (33, 129), (70001,), (2, 16384 + 5), (16,)]
DTYPE_SETS = {
    "fp32": [torch.float32],
    "fp64": [torch.float64],
    "fp16": [torch.float16],
    "bf16": [torch.bfloat16],
    "mixed": [torch.float32, torch.bfloat16, torch.float16],
    "mixed64": [torch.float32, torch.float64, torch.bfloat16],
}
NORMS = [2.0, math.inf, 1.0, 3.0]

# ---- references ------------------------------------------------------------------------------------------


def ref_norm(tensors, p, device="cpu"):
    """The float64 reference: the p-norm of all elements of `tensors` as one vector (a 0-dim float64 tensor on
    `device`, the CPU by default; a GPU for the GiB-sized sets of the GPU checks, where copying them to the CPU
    as float64 would cost seconds). That is torch's norm of the per-tensor norms, except for p=0, where torch
    counts the tensors with a nonzero element, and so does this. An empty list or only empty tensors: 0."""
    p = float(p)
    if not tensors:
        return torch.tensor(0.0, dtype=torch.float64, device=device)
    if p == 0:
        return torch.tensor(float(sum(bool((g != 0).any()) for g in tensors)), dtype=torch.float64, device=device)
    flat = torch.cat([g.detach().reshape(-1).to(device=device, dtype=torch.float64) for g in tensors])
    if flat.numel() == 0:
        return torch.tensor(0.0, dtype=torch.float64, device=device)
    return torch.linalg.vector_norm(flat, p)


def ref_coef(max_norm, norm64):
    """torch's clip coefficient min(max_norm / (norm + 1e-6), 1) as a Python float."""
    return min(max_norm / (float(norm64) + 1e-6), 1.0)


def rel_err(x, ref):
    """|x - ref| / |ref| as a float (0 when both are NaN, inf when only ref is)."""
    x, ref = float(x), float(ref)
    if math.isnan(ref):
        return 0.0 if math.isnan(x) else math.inf
    return abs(x - ref) / max(abs(ref), 1e-30)


# ---- makers ----------------------------------------------------------------------------------------------


def mixed_scales(n, generator, lo=-3.0, hi=1.0):
    """n scales drawn log-uniformly from [10**lo, 10**hi) (a float64 tensor): gradients of many magnitudes in one
    list, as real models have (an embedding's next to a norm layer's)."""
    return 10.0 ** (torch.rand(n, generator=generator, dtype=torch.float64) * (hi - lo) + lo)


def make_grads(shapes, dtypes=torch.float32, device="cpu", seed=0, scale=1.0):
    """Fresh random gradients, one per shape: standard normal values drawn in float64 from a CPU generator seeded
    with `seed`, times `scale`, rounded once to the dtype. dtypes: one dtype or a list cycled over the shapes.
    scale: a number, or "mixed" for one scale per tensor from mixed_scales (drawn after the values). The same
    arguments give the same values on every device."""
    dtypes = [dtypes] if isinstance(dtypes, torch.dtype) else list(dtypes)
    g = torch.Generator().manual_seed(seed)
    values = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    scales = mixed_scales(len(shapes), g).tolist() if scale == "mixed" else [scale] * len(shapes)
    return [(v * k).to(device=device, dtype=dtypes[i % len(dtypes)])
            for i, (v, k) in enumerate(zip(values, scales))]


def device_grads(shapes, dtypes=torch.float32, device="cuda", seed=0, scale=1.0):
    """Fresh random gradients drawn on `device` by its own generator (seeded with `seed`): standard normal fp32
    values times `scale`, rounded once to the dtype (dtypes: one, or a list cycled over the shapes). scale: a
    number, or "mixed" (one log-uniform scale in [1e-3, 10) per tensor, from a CPU generator). For the large sets
    of the GPU checks: make_grads draws in float64 on the CPU and copies, seconds per GiB; the values differ from
    make_grads' (another generator) but the same arguments give the same values on one device."""
    dtypes = [dtypes] if isinstance(dtypes, torch.dtype) else list(dtypes)
    g = torch.Generator(device=device).manual_seed(seed)
    scales = (mixed_scales(len(shapes), torch.Generator().manual_seed(seed + 1)).tolist() if scale == "mixed"
              else [scale] * len(shapes))
    out = []
    for i, (shape, k) in enumerate(zip(shapes, scales)):
        x = torch.randn(shape, generator=g, device=device)
        out.append((x.mul_(k) if k != 1.0 else x).to(dtypes[i % len(dtypes)]))
    return out


def make_params(shapes, dtypes, device="cpu", seed=0, scale=1.0, none_every=0, noncontig=True):
    """Parameters (zeros) with fresh random gradients; dtypes cycles over the shapes, scale multiplies every
    gradient (scale="mixed": one log-uniform scale in [1e-3, 10) per tensor). With noncontig, some 2-D gradients
    are transposed (dense, permuted) or strided slices (not dense); with none_every=k every k-th gradient is
    None."""
    g = torch.Generator().manual_seed(seed)
    scales = (mixed_scales(len(shapes), torch.Generator().manual_seed(seed + 1)).tolist() if scale == "mixed"
              else [scale] * len(shapes))
    params = []
    for i, shape in enumerate(shapes):
        dtype, k = dtypes[i % len(dtypes)], scales[i]
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        if none_every and i % none_every == none_every - 1:
            params.append(p)
            continue
        base = (torch.randn(shape, generator=g, dtype=torch.float64) * k)
        if noncontig and len(shape) == 2 and i % 3 == 0:
            grad = base.t().contiguous().t()  # permuted, dense
        elif noncontig and len(shape) == 2 and i % 3 == 1:
            wide = torch.randn(shape[0], shape[1] * 2, generator=g, dtype=torch.float64) * k
            wide[:, ::2] = base
            grad = wide[:, ::2]  # strided slice: not dense
        else:
            grad = base
        p.grad = grad.to(device=device, dtype=dtype)
        params.append(p)
    return params


def params_with(grads):
    """Parameters (zeros like each gradient) whose .grad are these very tensors."""
    out = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g
        out.append(p)
    return out


def grads_of(params):
    """The gradients of `params` that are not None, in order."""
    return [p.grad for p in params if p.grad is not None]


def clone_params(params):
    """Independent copies of `params` and their gradients, each gradient with the original's strides."""
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        if p.grad is not None:
            q.grad = torch.empty_strided(p.grad.size(), p.grad.stride(), dtype=p.grad.dtype, device=p.grad.device)
            q.grad.copy_(p.grad)
        out.append(q)
    return out


# ---- bit equality ----------------------------------------------------------------------------------------


def bits(t):
    """The raw bits of a tensor as integers of its element size, for bit-for-bit comparisons (NaN payloads
    and the sign of zero included)."""
    t = t.detach().contiguous()
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()])


def same_bits(a, b):
    """Whether a and b have one dtype and shape and the same bits."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a).cpu(), bits(b).cpu())


def assert_bit_identical(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, tuple(a.shape), tuple(b.shape))
    assert torch.equal(bits(a), bits(b))


# ---- the cases every fused backend runs (tests/test_clip.py, tests/test_triton.py) ------------------------


def check_against_reference(params, orig, norm, max_norm, p):
    """norm equals the float64 reference to fp32 accuracy (fp64 for fp64-only lists), whatever the grads'
    dtypes; every grad equals orig * coef (coef from the reference norm) to its dtype's accuracy, with its
    strides kept."""
    grads0 = grads_of(orig)
    ref = ref_norm(grads0, p)
    all64 = all(g.dtype == torch.float64 for g in grads0)
    # fp32-accurate, then rounded once to the returned dtype (fp16/bf16 when all grads are; an fp16 norm
    # may overflow to inf there, while the coef is still computed from the finite fp32 norm)
    rounding = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}.get(norm.dtype, 0.0)
    if not math.isinf(float(ref.to(norm.dtype))):
        assert rel_err(norm, ref) <= (1e-12 if all64 else 2e-6) + rounding, (float(norm), float(ref))
    else:
        assert math.isinf(float(norm))
    coef = ref_coef(max_norm, ref)
    for q, q0 in zip(params, orig):
        if q0.grad is None:
            assert q.grad is None
            continue
        expected = (q0.grad.double() * coef).to(q0.grad.dtype)
        rtol, atol = TOL[q0.grad.dtype]
        torch.testing.assert_close(q.grad, expected, rtol=rtol, atol=atol)
        assert q.grad.stride() == q0.grad.stride()


def clip_parity_case(device, backend, dtypes, p, clipping, noncontig=True):
    """clip_ on a mixed bag of shapes against the float64 reference and torch.nn.utils, clipping or not.
    dtypes: a key of DTYPE_SETS; p: one of NORMS. noncontig: some grads are permuted or strided slices (which the
    native backend's eager fast path leaves to the operator path); without, every grad is contiguous."""
    dtypes = DTYPE_SETS[dtypes]
    # scale 0.1 keeps fp16 norms (p=1 sums 100K values) below fp16's max, where torch's norm would overflow
    params = make_params(SHAPES + [(5, 9), (1,), (300,)], dtypes, device=device, seed=NORMS.index(p) * 2 + clipping,
                         scale=0.1, none_every=4, noncontig=noncontig)
    orig = clone_params(params)
    ref = float(ref_norm(grads_of(orig), p))
    max_norm = ref * (0.3 if clipping else 3.0)

    norm = fusedclip.clip_(params, max_norm, p, backend=backend)
    check_against_reference(params, orig, norm, max_norm, p)

    # against torch itself, in the dtype torch returns (torch raises for inf on empty tensors: leave them out)
    theirs = [q for q in clone_params(orig) if q.grad is None or q.grad.numel() > 0]
    torch_norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm, p)
    assert norm.dtype == torch_norm.dtype and norm.shape == () and norm.device == torch_norm.device
    assert not norm.requires_grad
    # two fp32 sums of 100K terms in different orders differ by ~1e-6
    rtol, atol = low_precision_tol(dtypes)
    rtol = max(rtol, 1e-5)
    torch.testing.assert_close(norm, torch_norm, rtol=rtol, atol=atol)
    # torch's coef carries the error of its low-precision per-tensor norms: compare at the loosest dtype's tolerance
    ours = [q for q in params if q.grad is None or q.grad.numel() > 0]
    for a, b in zip(ours, theirs):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=2 * rtol, atol=atol)
    if not clipping:
        for a, b in zip(params, orig):
            if b.grad is not None:
                assert_bit_identical(a.grad, b.grad)


def no_write_case(device, clip, p):
    """A coefficient of 1: grads stay bit-identical (NaN-free but with -0.0 and subnormals in them).
    clip(params, max_norm, p) -> norm is the implementation under test."""
    params = make_params(SHAPES, [torch.float32, torch.bfloat16, torch.float16, torch.float64], device=device)
    for q in params:
        if q.grad is not None and q.grad.numel() > 2:
            first, second = (0,) * q.grad.dim(), (0,) * (q.grad.dim() - 1) + (1,)
            q.grad[first] = -0.0
            q.grad[second] = 1e-41 if q.grad.dtype in (torch.float32, torch.bfloat16) else 1e-7
    orig = clone_params(params)
    norm = clip(params, 1e30, p)
    assert rel_err(norm, ref_norm(grads_of(orig), p)) < 1e-5
    for a, b in zip(params, orig):
        assert_bit_identical(a.grad, b.grad)


# ---- several processes (torch.distributed with Gloo on CPU) ----------------------------------------------


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process group's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, world, timeout):
    """Runs worker(rank, world, port, out_dir) on `world` spawned processes; each rank writes
    out_dir/rank{rank}.json. Returns ({rank: what it wrote}, error or None); kills ranks still alive."""
    import json
    import os
    import tempfile
    import time

    import torch.multiprocessing as mp

    out_dir = tempfile.mkdtemp(prefix=f"fusedclip_ranks{world}_")
    ctx = mp.start_processes(worker, args=(world, free_port(), out_dir), nprocs=world, join=False,
                             start_method="spawn")
    deadline, error = time.monotonic() + timeout, None
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                error = f"the {world}-rank run did not finish in {timeout} s"
                break
    except Exception as e:  # a rank died
        error = f"a rank failed: {e}"
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
    results = {}
    for rank in range(world):
        path = os.path.join(out_dir, f"rank{rank}.json")
        if os.path.exists(path):
            with open(path) as f:
                results[rank] = json.load(f)
    return results, error


def run_cases(rank, out_dir, cases, after_each=None):
    """In a spawned rank: runs each (name, thunk) of `cases`, records "ok" or the traceback in
    out_dir/rank{rank}.json after every case (so a hang loses none), and stops once a barrier fails (a case
    failed part-way on some rank and left the collectives out of step)."""
    import json
    import os
    import traceback

    import torch.distributed as dist

    results = {}
    for name, thunk in cases:
        try:
            thunk()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
        if after_each is not None:
            after_each()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        try:
            dist.barrier()
        except RuntimeError:
            break


# ---- accuracy in fp32 ulps against the exact norm (tests/test_accuracy.py, tests/test_distributed.py) ----

def fp32_ulps(got, exact):
    """|got - exact| in fp32 ulps of `exact` (a float64 number): the spacing of the fp32 binade holding it."""
    if exact == 0.0:
        return 0.0 if float(got) == 0.0 else math.inf
    _, e = math.frexp(abs(exact))  # exact = m * 2**e, 0.5 <= m < 1: fp32 values there are 2**(e - 24) apart
    return abs(float(got) - exact) / math.ldexp(1.0, e - 24)


def exact_norm(tensors, p):
    """The float64 norm of the tensors' values (those of fp16/bf16 tensors are exact in float64)."""
    flat = torch.cat([t.detach().double().flatten().cpu() for t in tensors])
    if p == math.inf:
        return flat.abs().max().item()
    return (flat.abs().pow(p).sum().item()) ** (1.0 / p)


def mixed_tensors(n, max_numel, seed, dtypes=(torch.float32,), big=()):
    """n tensors of log-uniform sizes in [1, max_numel], each of a random scale in [1e-3, 1e3] (log-uniform), and
    the sizes in `big` on top: what a model's gradients look like (embeddings, norms' scalars, everything)."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.exp(torch.rand(n, generator=g, dtype=torch.float64) * math.log(max_numel)).long().clamp(min=1)
    scales = 10.0 ** (torch.rand(n + len(big), generator=g, dtype=torch.float64) * 6 - 3)
    out = []
    for i, numel in enumerate(sizes.tolist() + list(big)):
        dtype = dtypes[i % len(dtypes)]
        out.append((torch.randn(numel, generator=g) * scales[i].item()).to(dtype))
    return out


class AdaGCReference:
    """AdaGC's rule (arXiv 2502.11034, Algorithm 1) in float64 on the CPU, written from the paper, one plain Python
    number per tensor; the same eps (torch's 1e-6 in the coefficient's denominator), start for a tensor first seen
    after the warm-up (its own norm), and no update of gamma from a non-finite clipped norm, as fusedclip.AdaGC
    documents. step(grads) takes the gradients (None for a tensor without one), returns the clipped ones in float64
    and the coefficients (None where no gradient)."""

    def __init__(self, n, lambda_abs=1.0, lambda_rel=1.04, beta=0.99, warmup_steps=100, eps=1e-6):
        self.gamma = [math.inf] * n
        self.t = 0
        self.lambda_abs, self.lambda_rel, self.beta, self.warmup_steps, self.eps = (
            lambda_abs, lambda_rel, beta, warmup_steps, eps)

    def step(self, grads):
        self.t += 1
        g64 = [None if g is None else g.detach().double().cpu() for g in grads]
        norms = [None if g is None else exact_norm([g], 2.0) for g in g64]
        coefs = [None] * len(grads)
        if self.t <= self.warmup_steps:
            total = exact_norm([g for g in g64 if g is not None], 2.0) if any(g is not None for g in g64) else 0.0
            h = min(1.0, self.lambda_abs / (total + self.eps))
            for i, n in enumerate(norms):
                if n is None:
                    continue
                coefs[i] = h
                if math.isfinite(h * n):
                    self.gamma[i] = min(self.gamma[i], h * n)
        else:
            for i, n in enumerate(norms):
                if n is None:
                    continue
                start = n if math.isinf(self.gamma[i]) else self.gamma[i]
                h = min(1.0, self.lambda_rel * start / (n + self.eps))
                coefs[i] = h
                if math.isfinite(h * n):
                    self.gamma[i] = self.beta * start + (1.0 - self.beta) * (h * n)
        return [None if g is None else g * c for g, c in zip(g64, coefs)], coefs


# ---- ZClip's rule in float64 (the GPU checks' expected state; tests/gpu/test_adaptive.py) -------------------

def same_f64(got, want):
    """Two lists of floats equal value for value, NaN equal to NaN (its bits may differ between devices)."""
    return len(got) == len(want) and all(a == b or (a != a and b != b) for a, b in zip(got, want))


def zclip_state_f64(config, norms, n_buffer):
    """ZClip's state (csrc/common/zclip_rule.h ZSlot: steps, mean, var, skipped, then the warm-up buffer) after steps
    fed `norms`, computed in Python floats with csrc/common/zclip_rule.h's operations in its order (each a correctly
    rounded float64 operation, as the kernels' _rn intrinsics): the state a kernel must hold, to the bit, when it
    returned these norms. Comparing with another kernel's state instead would need a tolerance that correct
    kernels cross: two fp32 norms summed in different orders differ in the last bits, which the warm-up variance
    amplifies (issue 25, defect 1). config: ZClip._config (csrc/common/zclip_rule.h ZConfigSlot order)."""
    alpha, z_thresh, cap, has_cap, eps, n_warm, percentile, to_mean, factor, skip_update, skip_spikes, \
        skip_nonfinite = config
    n_warm = int(n_warm)
    s = [0.0] * (4 + n_buffer)
    for x in norms:
        steps, mean, var = s[0], s[1], s[2]
        warmup = steps < n_warm
        nonfinite = not (x - x == 0.0)
        spike, target = False, x
        if not warmup:
            std = math.sqrt(var)
            if percentile:
                threshold = mean + z_thresh * std
                spike = x > threshold
            else:
                z = (x - mean) / (std + eps)
                spike = z > z_thresh
                threshold = mean if to_mean else (mean + z_thresh * std / (z / z_thresh)) * factor
            if spike:
                target = threshold
        skip = (skip_nonfinite and nonfinite) or (skip_spikes and spike)
        if skip:
            s[3] += 1.0
            if nonfinite:
                continue
        if warmup:
            i = int(steps)
            s[4 + i] = x
            if i == n_warm - 1:
                total = s[4]
                for k in range(1, n_warm):  # left to right (not sum(): Python 3.12's is compensated)
                    total += s[4 + k]
                m = total / n_warm
                sq = 0.0
                for k in range(n_warm):
                    dev = s[4 + k] - m
                    sq = dev * dev if k == 0 else sq + dev * dev
                s[1], s[2] = m, sq / n_warm
        elif not (skip_update and spike):
            b = 1.0 - alpha
            m = alpha * mean + b * target
            dev = target - m
            s[2] = alpha * var + b * (dev * dev)
            s[1] = m
        s[0] = steps + 1.0
    return s


def _no_host_read_mode():
    from torch.utils._python_dispatch import TorchDispatchMode

    class NoHostRead(TorchDispatchMode):
        """Fails on any op that reads a tensor's value on the host (.item(), bool(), int(), float() of a tensor,
        torch.equal): the op every device-to-host sync goes through, so on CPU too it shows code that would sync."""
        READS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal")

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name in self.READS:
                raise AssertionError(f"host read of a tensor: {func._schema.name}")
            return func(*args, **(kwargs or {}))

    return NoHostRead


NoHostRead = _no_host_read_mode()
