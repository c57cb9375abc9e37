"""The GPU checks that are not unit tests: CUDA-graph replay, torch.compile, two streams at once, 20,000
tensors, a gradient set larger than L2, Transformer-shaped sets, repeatability, adaptive clipping (clip_agc_, ZClip). Every result is compared
with a float64 reference and with torch. Run by scripts/gpu_check.sh; `--device cpu` runs the subset that
makes sense on a CPU (a dry run of this script's logic).

Every check is independent (one failing never stops the others) and runs for every backend before the next
check starts, in the order of ORDER (what only a GPU can answer first). With --budget S, checks that would start
with under MIN_LEFT_S seconds left are reported SKIPPED, so the script ends inside gpu_check.sh's step limit.
Prints one PASS/FAIL/SKIPPED line per check and backend and exits non-zero if any failed.
"""
import argparse
import faulthandler
import math
import sys
import time
import traceback

import torch

import fusedclip


def ref_norm(grads, p=2.0):
    return torch.linalg.vector_norm(torch.cat([g.detach().double().reshape(-1) for g in grads]), p).item()


def randn(shape, seed, device):
    """Normal numbers drawn on `device` (on a GPU its generator: the CPU would spend seconds per check drawing
    the ~1e9 numbers the checks use, and copying them over)."""
    return torch.randn(shape, generator=torch.Generator(device=device).manual_seed(seed), device=device)


def make(shapes, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.zeros(s, dtype=dtype, device=device))
        p.grad = torch.randn(s, generator=g, device=device).to(dtype)
        params.append(p)
    return params


def clone(params):
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        out.append(q)
    return out


def same_bits(a, b):
    return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def close(a, b, rel):
    return abs(a - b) <= rel * max(abs(b), 1e-30)


def gpt2_small_shapes():
    d, layers, vocab, ctx = 768, 12, 50257, 1024
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def llama_layer_shapes(layers=2):
    d, ff = 4096, 11008
    shapes = [(32000, d)]
    for _ in range(layers):
        shapes += [(d, d)] * 4 + [(ff, d), (ff, d), (d, ff), (d,), (d,)]
    return shapes + [(d,)]


CHECKS = []


def check(gpu_only=False):
    def register(f):
        CHECKS.append((f, gpu_only))
        return f
    return register


def parity(params, max_norm, backend, p=2.0, rel=2e-6):
    """clip_ on params against the float64 reference and torch; returns a problem or None."""
    grads0 = [q.grad.clone() for q in params]
    ref = ref_norm(grads0, p)
    theirs = clone(params)
    norm = fusedclip.clip_(params, max_norm, p, backend=backend)
    torch_norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm, p)
    if not close(norm.double().item(), ref, rel + {torch.bfloat16: 2**-8, torch.float16: 2**-11}.get(norm.dtype, 0)):
        return f"norm {norm.item()} vs float64 {ref}"
    # torch's own error can be large (fp32 sums over 38M elements, bf16 per-tensor norms): ours must not be worse
    torch_err = abs(torch_norm.double().item() - ref) / ref
    if abs(norm.double().item() - ref) / ref > max(2 * torch_err, rel):
        return f"norm {norm.item()} further from float64 {ref} than torch's {torch_norm.item()}"
    coef = min(max_norm / (ref + 1e-6), 1.0)
    for q, g0, t in zip(params, grads0, theirs):
        tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 1e-3, torch.float64: 1e-9}[g0.dtype]
        torch.testing.assert_close(q.grad.double(), g0.double() * coef, rtol=tol, atol=1e-6)
        torch.testing.assert_close(q.grad.double(), t.grad.double(), rtol=2 * tol + 2 * torch_err, atol=1e-6)
    return None


@check()
def transformer_sets(device, backend):
    assert parity(make(gpt2_small_shapes(), torch.float32, device, 1), 1.0, backend) is None
    assert parity(make(llama_layer_shapes(1 if device == "cpu" else 2), torch.bfloat16, device, 2), 1.0, backend) \
        is None
    mixed = make([(1000, 37), (513,), (7,)] * 20, torch.bfloat16, device, 3) + \
        make([(4096,), (77,)] * 20, torch.float32, device, 4) + make([(999,)] * 5, torch.float16, device, 5)
    assert parity(mixed, 1.0, backend) is None
    assert parity(mixed, 1e9, backend, p=math.inf) is None


@check()
def nonfinite(device, backend):
    for bad in (float("nan"), float("inf")):
        params = make([(10000,), (33, 7)], torch.float32, device, 6)
        params[1].grad[3, 3] = bad
        before = [q.grad.clone() for q in params]
        try:
            fusedclip.clip_(params, 1.0, error_if_nonfinite=True, backend=backend)
            raise AssertionError("no error for a non-finite norm")
        except RuntimeError as e:
            assert "non-finite" in str(e)
        assert all(same_bits(q.grad, b) for q, b in zip(params, before)), "grads changed by a failed call"
        theirs = clone(params)
        n = fusedclip.clip_(params, 1.0, backend=backend)
        t = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        torch.testing.assert_close(n, t, equal_nan=True)
        for q, r in zip(params, theirs):
            torch.testing.assert_close(q.grad, r.grad, equal_nan=True)


@check()
def many_tensors(device, backend):
    g = torch.Generator().manual_seed(7)
    shapes = [(int(n),) for n in torch.randint(1, 700, (20000,), generator=g)]
    assert parity(make(shapes, torch.float32, device, 8), 1.0, backend) is None


@check()
def repeatable(device, backend):
    params = make([(3_000_000,), (1000, 999), (5,)] * 2, torch.bfloat16, device, 9)
    runs = []
    for _ in range(5):
        q = clone(params)
        runs.append((fusedclip.clip_(q, 0.5, backend=backend), [x.grad for x in q]))
    for n, grads in runs[1:]:
        assert same_bits(n, runs[0][0]), "norm differs between identical calls"
        assert all(same_bits(a, b) for a, b in zip(grads, runs[0][1])), "grads differ between identical calls"


@check(gpu_only=True)
def larger_than_l2(device, backend):
    params = make([(64 * 2**20,)] * 5 + [(77, 1001)], torch.float32, device, 10)  # 1.25 GiB of fp32 gradients
    assert parity(params, 1.0, backend, rel=5e-6) is None


@check(gpu_only=True)
def cuda_graph_replay(device, backend):
    params = make([(4096, 1024), (1024,), (333, 77), (0,), (5,)], torch.float32, device, 11)
    params += make([(2048, 512)], torch.bfloat16, device, 12)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture, on a side stream as torch recommends
        fusedclip.clip_(clone(params), 1.0, backend=backend)
        fusedclip.clip_(params, 1e9, backend=backend)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        norm_out = fusedclip.clip_(params, 1.0, backend=backend)
    for step in range(3):
        fresh = make([tuple(q.shape) for q in params], torch.float32, device, 100 + step)
        for q, f in zip(params, fresh):
            q.grad.copy_(f.grad * (step + 1))
        eager = clone(params)
        graph.replay()
        n_eager = fusedclip.clip_(eager, 1.0, backend=backend)
        torch.cuda.synchronize()
        assert same_bits(norm_out, n_eager), f"replay {step}: norm {norm_out.item()} vs eager {n_eager.item()}"
        assert all(same_bits(q.grad, e.grad) for q, e in zip(params, eager)), f"replay {step}: grads differ"


@check()
def compile_fullgraph(device, backend):
    torch._dynamo.reset()

    def step(params):
        n = fusedclip.clip_(params, 1.0, backend=backend)
        with torch.no_grad():
            for q in params:
                q.sub_(0.01 * q.grad)
        return n

    params = make([(256, 128), (128,), (10, 256)], torch.float32, device, 13)
    eager = clone(params)
    compiled = torch.compile(step, fullgraph=True)
    for _ in range(2):
        for q, e in zip(params, eager):
            q.grad = torch.randn_like(q) * 10
            e.grad = q.grad.clone()
        assert same_bits(compiled(params), step(eager))
        assert all(same_bits(q.detach(), e.detach()) for q, e in zip(params, eager))


@check(gpu_only=True)
def two_streams(device, backend):
    a = make([(8 * 2**20,), (1000, 17)], torch.float32, device, 14)
    b = make([(6 * 2**20,), (999,)], torch.bfloat16, device, 15)
    ref_a, ref_b = clone(a), clone(b)
    na_ref = fusedclip.clip_(ref_a, 1.0, backend=backend)
    nb_ref = fusedclip.clip_(ref_b, 2.0, backend=backend)
    for _ in range(3):
        qa, qb = clone(a), clone(b)
        s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
        torch.cuda.synchronize()
        with torch.cuda.stream(s1):
            na = fusedclip.clip_(qa, 1.0, backend=backend)
        with torch.cuda.stream(s2):
            nb = fusedclip.clip_(qb, 2.0, backend=backend)
        torch.cuda.synchronize()
        assert same_bits(na, na_ref) and same_bits(nb, nb_ref), "concurrent clips differ from sequential ones"
        assert all(same_bits(x.grad, y.grad) for x, y in zip(qa + qb, ref_a + ref_b))


@check(gpu_only=True)
def amp_and_per_tensor(device, backend):
    torch.manual_seed(18)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 10)).to(device)
    twin = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 10)).to(device)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(64, 256, device=device)
    results = []
    for m, fused in ((model, True), (twin, False)):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**14)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = m(x).float().square().mean()
        scaler.scale(loss).backward()
        if fused:
            total, norms = fusedclip.clip_([q for q in m.parameters()], 1e30, per_tensor=True, backend=backend)
            assert norms.numel() == 4
            n = fusedclip.unscale_clip_(scaler, opt, 0.5, backend=backend)
        else:
            scaler.unscale_(opt)
            n = torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
        scaler.step(opt)
        scaler.update()
        results.append((n, scaler.get_scale()))
    assert close(results[0][0].item(), results[1][0].item(), 1e-5) and results[0][1] == results[1][1]
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@check(gpu_only=True)
def several_devices(device, backend):
    params = make([(1000,), (77, 3)], torch.float32, "cpu", 16) + make([(5000,), (9, 9)], torch.bfloat16, device, 17)
    ref = ref_norm([q.grad for q in params])
    n = fusedclip.clip_(params, 1.0, backend=backend)
    assert n.device.type == "cpu" and close(n.item(), ref, 2e-6)


def _agc_weights(params, clip_factor, seed):
    """Weights whose unit norms put each unit's gradient at 2x (clipped) or 0.5x (left alone) its threshold."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for q in params:
            rows = q.shape[0] if q.ndim > 1 else 1
            dims = tuple(range(1, q.ndim)) if q.ndim > 1 else None
            shape = (rows,) + (1,) * (q.ndim - 1) if q.ndim > 1 else ()
            norms = lambda t: torch.linalg.vector_norm(t.float(), dim=dims, keepdim=q.ndim > 1)  # noqa: E731
            side = torch.where(torch.rand(rows, generator=g) < 0.5, 0.5, 2.0).reshape(shape).to(q.device)
            w = torch.randn(q.shape, generator=g).to(q.device)
            q.copy_((w / norms(w) * norms(q.grad) / clip_factor * side).to(q.dtype))


@check()
def agc(device, backend):
    """fusedclip.clip_agc_ on a ResNet-50 stage (fp32), a ViT-B block (bf16) and units for every kernel path
    (warps and blocks, cached in registers and streamed), real weights with units on both sides of their
    threshold: the same units clipped as by the native CPU kernel on copies (the same rule in fp32), the values
    to rounding, the others bit for bit, weights never written, and identical calls give identical bits."""
    from fusedclip.bench.sets import resnet50_shapes, vit_shapes

    cases = [(resnet50_shapes()[:40], torch.float32), (vit_shapes(layers=1), torch.bfloat16),
             ([(50000, 8), (700, 1000), (5, 3000), (3, 200000), (70001,), (7,), ()], torch.float32),
             ([(600, 700), (9, 5000), (33,)], torch.float64)]
    for i, (shapes, dtype) in enumerate(cases):
        params = make(shapes, dtype, device, 30 + i)
        _agc_weights(params, 0.01, 40 + i)
        w0, g0 = [q.detach().clone() for q in params], [q.grad.clone() for q in params]
        ref = [torch.nn.Parameter(w.cpu().clone()) for w in w0]
        again = [torch.nn.Parameter(w.clone()) for w in w0]
        for r, a, g in zip(ref, again, g0):
            r.grad, a.grad = g.cpu().clone(), g.clone()
        fusedclip.clip_agc_(ref, 0.01, backend="native")
        fusedclip.clip_agc_(params, 0.01, backend=backend)
        fusedclip.clip_agc_(again, 0.01, backend=backend)
        tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float64: 1e-12}[dtype]
        for q, r, w, g, a in zip(params, ref, w0, g0, again):
            assert same_bits(q.detach(), w), "a weight was written"
            assert same_bits(q.grad, a.grad), "identical calls differ"
            rows = q.shape[0] if q.ndim > 1 else 1
            ours = (q.grad.cpu() != g.cpu()).reshape(rows, -1).any(1)
            cpu = (r.grad != g.cpu()).reshape(rows, -1).any(1)
            assert torch.equal(ours, cpu), f"{tuple(q.shape)}: {int((ours != cpu).sum())} units decided otherwise"
            torch.testing.assert_close(q.grad.cpu().double(), r.grad.double(), rtol=tol, atol=0)


def same_f64(got, want):
    """Two lists of floats equal value for value, NaN equal to NaN (its bits may differ between devices)."""
    return len(got) == len(want) and all(a == b or (a != a and b != b) for a, b in zip(got, want))


def zclip_state_f64(config, norms, n_buffer):
    """ZClip's state (csrc/zclip_rule.h ZSlot: steps, mean, var, skipped, then the warm-up buffer) after steps
    fed `norms`, computed in Python floats with csrc/zclip_rule.h's operations in its order (each a correctly
    rounded float64 operation, as the kernels' _rn intrinsics): the state a kernel must hold, to the bit, when
    it returned these norms. config: ZClip._kernel_config() (csrc/zclip_rule.h ZConfigSlot order)."""
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


ZCLIP_SHAPES = [(4096, 4096), (4096, 4096), (4096,), (11008, 1024), (7,)]  # 45M elements: above any L2
ZCLIP_DTYPES = [torch.float32, torch.bfloat16]


@check()
def zclip(device, backend):
    """fusedclip.ZClip on a set larger than L2 (every block of the grid takes part: the state is read before
    the grid sync and written by one block after it), fp32 and bf16, through the warm-up and spikes, skipping
    spikes with a fused optimizer: the same decisions, norms (to fp32 summation order) and clipped gradients as
    the native CPU kernel on copies; the state, step by step, exactly the float64 rule's (zclip_state_f64) fed
    the norms this backend returned (the CPU kernel's own state comes from its own norms, which differ in the
    last bits: a tolerance would be crossed by correct kernels, the variance amplifying those bits)."""
    for dtype in ZCLIP_DTYPES:
        params = make(ZCLIP_SHAPES, dtype, device, 50)
        ref = [torch.nn.Parameter(q.detach().cpu().clone()) for q in params]
        ours = fusedclip.ZClip(warmup_steps=3, on_spike="skip", backend=backend)
        cpu = fusedclip.ZClip(warmup_steps=3, on_spike="skip", backend="native")
        opt = torch.optim.AdamW(params, lr=0.0, fused=True)
        opt_cpu = torch.optim.AdamW(ref, lr=0.0, fused=True)
        seen = []
        for t in range(8):
            scale = 40.0 if t in (4, 6) else 1.0 + 0.05 * t
            grads = [(randn(q.shape, 51 + t, device) * (1e-3 * scale)).to(dtype) for q in params]
            for q, r, gr in zip(params, ref, grads):
                q.grad, r.grad = gr, gr.cpu()
            n, n_cpu = ours.step(params, opt), cpu.step(ref, opt_cpu)
            assert close(n.item(), n_cpu.item(), 1e-5), f"step {t}: norm {n.item()} vs CPU {n_cpu.item()}"
            for q, r in zip(params, ref):
                torch.testing.assert_close(q.grad.cpu().float(), r.grad.float(), rtol=1e-2 if dtype != torch.float32
                                           else 1e-5, atol=1e-7)
            assert ours.skipped_steps.item() == cpu.skipped_steps.item(), f"step {t}: skips differ"
            seen.append(n.double().item())
            want = zclip_state_f64(ours._config, seen, ours._state.numel() - 4)
            got = ours._state.cpu().tolist()
            assert same_f64(got, want), f"step {t}: state {got} vs the float64 rule on this backend's norms {want}"
        assert ours.skipped_steps.item() >= 1, "no spike was skipped"


# what only a GPU can answer and what has never run first (graph replay, two streams, the ZClip and AGC kernels,
# torch.compile), then the parity checks on large sets
ORDER = ["cuda_graph_replay", "two_streams", "zclip", "agc", "compile_fullgraph", "larger_than_l2", "many_tensors",
         "repeatable", "amp_and_per_tensor", "transformer_sets", "nonfinite", "several_devices"]
MIN_LEFT_S = 8.0


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backends", default=None, help="comma-separated; default: every fused backend available")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole script (default: no limit)")
    ap.add_argument("--only", default=None, help="comma-separated check names")
    args = ap.parse_args(argv)
    start = time.monotonic()
    if args.budget:  # a hang is killed by gpu_check.sh's limit; this says where it hung first
        try:
            faulthandler.dump_traceback_later(max(5.0, args.budget - 5), exit=False)
        except (ValueError, OSError):  # stderr without a file descriptor (captured): no traceback then
            pass
    backends = args.backends.split(",") if args.backends else \
        [b for b in fusedclip.available_backends(args.device) if b != "torch"]
    checks = sorted(CHECKS, key=lambda c: ORDER.index(c[0].__name__) if c[0].__name__ in ORDER else len(ORDER))
    if args.only:
        checks = [c for c in checks if c[0].__name__ in args.only.split(",")]
    counts = {"PASS": 0, "FAIL": 0, "SKIPPED": 0}
    for f, gpu_only in checks:
        if gpu_only and args.device == "cpu":
            continue
        for backend in backends:
            t0 = time.perf_counter()
            if args.budget and args.budget - (time.monotonic() - start) < MIN_LEFT_S:
                status = "SKIPPED (budget spent)"
            else:
                try:
                    f(args.device, backend)
                    if args.device != "cpu":
                        torch.cuda.synchronize()  # an asynchronous error belongs to this check
                    status = "PASS"
                except Exception as e:  # report every check, keep going
                    status = f"FAIL {type(e).__name__}: {str(e)[:300]}"
                    traceback.print_exc()
                if args.device != "cpu":
                    torch.cuda.empty_cache()
            counts[status.split()[0]] += 1
            print(f"{backend:8s} {f.__name__:20s} {status} ({time.perf_counter() - t0:.1f}s)", flush=True)
    print(f"gpu_checks: {len(backends)} backend(s) {backends}: {counts['PASS']} passed, {counts['FAIL']} failed, "
          f"{counts['SKIPPED']} skipped in {time.monotonic() - start:.0f}s", flush=True)
    faulthandler.cancel_dump_traceback_later()
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
