"""The workload compute-sanitizer runs (scripts/gpu_check.sh: memcheck with PYTORCH_NO_CUDA_MEMORY_CACHING=1,
so every tensor is its own allocation and an access past its end is seen; then racecheck and synccheck).

A script, not a tests/gpu module: under the sanitizer every CUDA call is instrumented and start-up alone takes a
large share of a 10-20 s share of the step, so the workload is one process that imports torch and fusedclip only
(no pytest collection, no hypothesis, no test modules), reaches every kernel once within its first seconds, and
skips the rest of its parts against its own budget so that the sanitizer still prints its summary inside the
limit; its verdict is the sanitizer's report and exit code, with the results checked here (fusedclip.testing's
float64 reference, bit equality and ZClip rule) so that a kernel that does nothing cannot pass.

  python scripts/sanitize_clip.py [cuda|cpu] [native|triton]     (default: every fused backend)

Every kernel of every fused backend (native; triton one-launch and two-launch) runs on REAL gradients (.grad
set on parameters: without one, clip_grads_with_norm_ and clip_value_ return before any kernel): the fused norm +
clip with clipping active and not, fp32/fp16/bf16/fp64 alone and mixed, norm types 2, inf, 1 and 3;
get_total_norm; per_tensor=True; clip_grads_with_norm_ (scale from a given norm); clip_value_ (clamp);
unscale_clip_ with a GradScaler (AMP); clip_agc_ (every norm kind, fp32/bf16/fp64, both sides of the threshold)
and ZClip through its warm-up and a skipped spike. Gradients have odd sizes, several chunks, empty and 0-dim tensors, views
at odd offsets (not 16-byte aligned) and a strided (non-dense) view. Every result is compared with torch (a
float64 reference or torch.nn.utils itself), so a kernel that does nothing cannot pass. Exits non-zero if a
result is wrong (3 if the budget, STEP_LIMIT seconds from gpu_check.sh, ran out before every variant and part
ran: the rest is skipped so that the sanitizer still ends, and prints its summary, inside the step's limit);
the sanitizer reports memory, race and sync errors on its own. Each variant runs every kernel once first
(clip_ on the mixed sets, clip_grads_with_norm_, clip_value_, unscale_clip_, clip_agc_, ZClip), then the
exhaustive cases, so a short run still reaches every kernel.
"""
import math
import os
import sys
import time

START = time.monotonic()  # before torch's import: under a sanitizer, start-up is much of the time

import torch  # noqa: E402

import fusedclip  # noqa: E402
from fusedclip.testing import params_with, ref_norm as ref_norm64, same_bits, same_f64, zclip_state_f64  # noqa: E402

NORMS = (2.0, math.inf, 1.0, 3.0)
F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
# dtype sets: the mixed ones cover every (norm kind, accumulation type) kernel with every element type in it
SETS = {"mixed": [F32, BF16, F16], "mixed64": [F32, F64, BF16], "fp32": [F32], "fp16": [F16], "bf16": [BF16],
        "fp64": [F64]}
TOL = {F32: 1e-5, F16: 2e-3, BF16: 1.6e-2, F64: 1e-12}  # relative, per element, for values stored in that dtype
FAILURES = []
SKIPPED = []  # parts of a variant not run for want of time


def expect(ok, what):
    if not ok:
        FAILURES.append(what)
        print("FAIL", what, flush=True)


def make_params(device, dtypes, seed, scale=0.1):
    """Parameters with .grad set: sizes odd, one over several 16384-element chunks, empty and 0-dim ones, views
    one element into their storage (not 16-byte aligned), and one strided (non-dense) 2-D view."""
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 0, 16387, 40000, 3, 70001, 5, ()]
    params = []
    for i, n in enumerate(sizes):
        dtype = dtypes[i % len(dtypes)]
        shape = n if isinstance(n, tuple) else (n,)
        base = (torch.randn(*(shape or (1,)), generator=g, dtype=F64) * scale).reshape(shape)
        if shape and i % 2:  # odd offset into a larger buffer
            buf = torch.zeros(shape[0] + 1, dtype=dtype, device=device)
            buf[1:] = base.to(dtype)
            grad = buf[1:]
        else:
            grad = base.to(device=device, dtype=dtype)
        params.append(_param(grad))
    wide = (torch.randn(33, 258, generator=g, dtype=F64) * scale).to(device=device, dtype=dtypes[0])
    params.append(_param(wide[:, ::2]))  # strided: processed through a dense copy, written back
    return params


def _param(grad):
    return params_with([grad])[0]


def grads(params):
    return [p.grad for p in params]


def snapshot(params):
    return [p.grad.detach().clone() for p in params]


def ref_norm(gs, p):
    return float(ref_norm64(gs, p))


def norm_ok(norm, ref, all64):
    rounding = {F16: 2.0**-11, BF16: 2.0**-8}.get(norm.dtype, 0.0)
    return abs(float(norm) - ref) <= ((1e-12 if all64 else 2e-6) + rounding) * ref + 1e-30


def scaled_ok(params, before, coef):
    """Each grad equals its value before times coef (computed in float64, stored in its dtype)."""
    return all(torch.allclose(p.grad.double(), (b.double() * coef).to(b.dtype).double(), rtol=TOL[b.dtype],
                              atol=6e-8 if b.dtype == F16 else 1e-30)  # fp16 subnormals: one ulp is 6e-8
               for p, b in zip(params, before))


def bits_equal(params, before):
    return all(same_bits(p.grad, b) for p, b in zip(params, before))


def clip_sets(device, backend, tag, first):
    """clip_ on every dtype set, norm type and clipping or not; first: only what runs each clip kernel
    instantiation once (the mixed sets, L2 and inf, clipping), the rest otherwise."""
    seed = 0
    for name, dtypes in SETS.items():
        mixed = name.startswith("mixed")
        for p in NORMS if mixed else (2.0,):
            for clipping in (True, False) if mixed else (True,):
                seed += 1
                if first != (mixed and clipping and p in (2.0, math.inf)):
                    continue
                params = make_params(device, dtypes, seed)
                before = snapshot(params)
                ref = ref_norm(before, p)
                max_norm = ref * (0.3 if clipping else 3.0)
                norm = fusedclip.clip_(params, max_norm, p, backend=backend)
                what = f"{tag} clip_ {name} p={p} clipping={clipping}"
                expect(norm_ok(norm, ref, dtypes == [F64]), f"{what}: norm {float(norm)} vs float64 {ref}")
                if clipping:
                    expect(scaled_ok(params, before, min(max_norm / (ref + 1e-6), 1.0)), f"{what}: grads not scaled")
                else:
                    expect(bits_equal(params, before), f"{what}: grads changed although the norm is below max_norm")


def total_norm(device, backend, tag):
    params = make_params(device, SETS["mixed"], 100)
    before = snapshot(params)
    for p in NORMS:
        n = fusedclip.get_total_norm(grads(params), p, backend=backend)
        expect(norm_ok(n, ref_norm(before, p), False), f"{tag} get_total_norm p={p}: {float(n)}")
    expect(bits_equal(params, before), f"{tag} get_total_norm wrote the gradients")


def per_tensor(device, backend, tag):
    for name in ("mixed", "mixed64"):
        params = make_params(device, SETS[name], 101)
        before = snapshot(params)
        total, norms = fusedclip.clip_(params, 0.5, per_tensor=True, backend=backend)
        want = [float(torch.linalg.vector_norm(b.double())) if b.numel() else 0.0 for b in before]
        tol = 1e-12 if name == "mixed64" else 2e-6
        expect(norms.numel() == len(want) and all(abs(a - w) <= tol * w + 1e-30 for a, w in zip(norms.tolist(), want)),
               f"{tag} per_tensor {name}: {norms.tolist()} vs {want}")
        ref = ref_norm(before, 2.0)
        expect(norm_ok(total, ref, False) and scaled_ok(params, before, min(0.5 / (ref + 1e-6), 1.0)),
               f"{tag} per_tensor {name}: total or scaling wrong")


def scale(device, backend, tag):
    """A given norm, against torch.nn.utils.clip_grads_with_norm_ (same fp32 coefficient)."""
    params = make_params(device, SETS["mixed"], 102)
    before = snapshot(params)
    theirs = [_param(g.clone()) for g in before]
    total = torch.tensor(3.0, device=device)
    fusedclip.clip_grads_with_norm_(params, 1.0, total, backend=backend)
    torch.nn.utils.clip_grads_with_norm_(theirs, 1.0, total)
    expect(all(torch.allclose(a.grad.double(), b.grad.double(), rtol=TOL[a.grad.dtype], atol=1e-30)
               for a, b in zip(params, theirs)), f"{tag} clip_grads_with_norm_ differs from torch")
    expect(scaled_ok(params, before, 1.0 / (3.0 + 1e-6)), f"{tag} clip_grads_with_norm_: grads not scaled")


def clamp(device, backend, tag):
    """Against torch.nn.utils.clip_grad_value_ (exact)."""
    params = make_params(device, SETS["mixed64"], 103, scale=1.0)
    theirs = [_param(g.clone()) for g in snapshot(params)]
    fusedclip.clip_value_(params, 0.1, backend=backend)
    torch.nn.utils.clip_grad_value_(theirs, 0.1)
    expect(bits_equal(params, snapshot(theirs)), f"{tag} clip_value_ differs from torch")


def run(device, backend, tag, deadline=math.inf):
    """Every kernel once first (a short sanitizer run still reaches each), then the exhaustive cases; a part
    that would start after `deadline` is skipped (listed in SKIPPED) so that the sanitizer ends, and prints its
    summary, inside its limit."""
    parts = [("clip_ (each kernel once)", lambda: clip_sets(device, backend, tag, True)),
             ("clip_grads_with_norm_", lambda: scale(device, backend, tag)),
             ("clip_value_", lambda: clamp(device, backend, tag)),
             ("unscale_clip_", lambda: amp(device, backend, tag)),
             ("clip_agc_", lambda: agc(device, backend, tag)),
             ("ZClip", lambda: zclip(device, backend, tag)),
             ("get_total_norm", lambda: total_norm(device, backend, tag)),
             ("per_tensor", lambda: per_tensor(device, backend, tag)),
             ("clip_ (every set and norm)", lambda: clip_sets(device, backend, tag, False))]
    for name, part in parts:
        if time.monotonic() > deadline:
            SKIPPED.append(f"{tag} {name}")
            print(f"sanitize_clip: {tag} {name} SKIPPED (past the budget)", flush=True)
            continue
        part()
    if device == "cuda":
        torch.cuda.synchronize()


def agc(device, backend, tag):
    """clip_agc_ (warp- and block-sized units, cached and streamed, a strided gradient, fp32/bf16/fp64, every
    norm kind) against the native CPU kernel on copies; the weights never written."""
    g = torch.Generator().manual_seed(200)
    shapes = [(64, 300), (5, 3000), (3, 70001), (70001,), (7,), ()]
    for dtype in (F32, BF16, F64):
        for p in NORMS:
            ws = [(torch.randn(s, generator=g, dtype=F64)).to(device=device, dtype=dtype) for s in shapes]
            gs = []
            for s in shapes:  # per unit, a gradient 0.3x to 3x its threshold (clip_factor 0.01): both sides
                rows = s[0] if len(s) > 1 else 1
                unit = torch.rand(rows, generator=g, dtype=F64).mul(2.7).add(0.3).reshape((rows,) + (1,) * (len(s) - 1))
                gs.append((torch.randn(s, generator=g, dtype=F64) * 0.01 * (unit if len(s) > 1 else unit.reshape(())))
                          .to(device=device, dtype=dtype))
            wide = torch.randn(6, 40, generator=g, dtype=F64).to(device=device, dtype=dtype)
            ws.append(wide[:, ::2].clone())
            gs.append(wide[:, ::2] * 0.003)  # strided: a dense copy, written back
            params = [_param(x) for x in gs]
            for q, w in zip(params, ws):
                q.data = w
            ref = [_param(x.detach().cpu().clone()) for x in gs]
            for r, w in zip(ref, ws):
                r.data = w.cpu().clone()
            w0 = [w.clone() for w in ws]
            fusedclip.clip_agc_(params, 0.01, norm_type=p, backend=backend)
            fusedclip.clip_agc_(ref, 0.01, norm_type=p, backend="native")
            tol = {F32: 1e-5, BF16: 8e-3, F64: 1e-12}[dtype]
            expect(all(torch.equal(q.detach(), w) for q, w in zip(params, w0)), f"{tag} clip_agc_ wrote a weight")
            expect(all(torch.allclose(q.grad.cpu().double(), r.grad.double(), rtol=tol, atol=0)
                       for q, r in zip(params, ref)), f"{tag} clip_agc_ {dtype} p={p} differs from the CPU kernel")


def zclip(device, backend, tag):
    """ZClip through the warm-up and a skipped spike (a fused optimizer's skip flag): the norms against float64,
    the state exactly the float64 rule's on the norms returned (fusedclip.testing.zclip_state_f64)."""
    for dtype in (F32, BF16):
        clipper = fusedclip.ZClip(warmup_steps=3, on_spike="skip", backend=backend)
        seen = []
        for t in range(6):
            params = make_params(device, [dtype], 300 + t, scale=40.0 if t == 4 else 1.0)
            opt = torch.optim.AdamW(params, lr=0.0, fused=True)
            before = snapshot(params)
            n = clipper.step(params, opt)
            expect(norm_ok(n, ref_norm(before, 2.0), False), f"{tag} ZClip {dtype} step {t}: norm {float(n)}")
            seen.append(float(n.double()))
            want = zclip_state_f64(clipper._config, seen, clipper._state.numel() - 4)
            expect(same_f64(clipper._state.tolist(), want), f"{tag} ZClip {dtype} step {t}: state "
                   f"{clipper._state.tolist()} vs the float64 rule {want}")
        expect(float(clipper.skipped_steps) == 1.0, f"{tag} ZClip {dtype}: {float(clipper.skipped_steps)} skipped")


def amp(device, backend, tag):
    """unscale_clip_ with a GradScaler against scaler.unscale_ + torch clip, with and without an inf."""
    for bad in (False, True):
        runs = []
        for fused in (True, False):
            torch.manual_seed(7)
            model = torch.nn.Sequential(torch.nn.Linear(33, 70), torch.nn.Tanh(), torch.nn.Linear(70, 5)).to(device)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            scaler = torch.amp.GradScaler(device, init_scale=1024.0)
            scaler.scale(model(torch.randn(17, 33, device=device)).square().mean()).backward()
            if bad:
                model[2].weight.grad[1, 2] = float("inf")
            if fused:
                n = fusedclip.unscale_clip_(scaler, opt, 0.05, backend=backend)
            else:
                scaler.unscale_(opt)
                n = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            found = sum(float(v) for v in scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values())
            runs.append((n, [q.grad.clone() for q in model.parameters()], found))
        (n1, g1, f1), (n2, g2, f2) = runs
        expect(f1 == f2 == float(bad), f"{tag} unscale_clip_ bad={bad}: found_inf {f1} vs torch {f2}")
        if not bad:
            expect(abs(float(n1) - float(n2)) <= 1e-5 * float(n2),
                   f"{tag} unscale_clip_: norm {float(n1)} vs {float(n2)}")
            expect(all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(g1, g2)),
                   f"{tag} unscale_clip_: gradients differ from unscale_ + clip_grad_norm_")


def main():
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    only = sys.argv[2] if len(sys.argv) > 2 else None  # one backend per sanitizer run (scripts/gpu_check.sh)
    variants = []
    for backend in fusedclip.available_backends(device):
        if only is not None and backend != only:
            continue
        if backend == "native":
            variants.append(("native", None))
        elif backend == "triton":
            from fusedclip.backends.triton import launcher as tlauncher
            # both Triton variants, unless gpu_check.sh fell back to two launches (the one-launch kernel hung)
            variants += [("triton", mode) for mode in ("one", "two") if mode == "two" or tlauncher.LAUNCH != "two"]
    budget = float(os.environ.get("STEP_LIMIT", 0)) or math.inf
    skipped = 0
    for backend, launch in variants:
        tag = backend + (f"-{launch}" if launch else "")
        if time.monotonic() - START > 0.6 * budget:  # a variant takes about as long as start-up did
            skipped += 1
            print(f"sanitize_clip: {tag} SKIPPED ({time.monotonic() - START:.0f} s of {budget:.0f} s spent)")
            continue
        if launch:
            from fusedclip.backends.triton import launcher as tlauncher
            tlauncher.LAUNCH = launch  # read at each call: the public functions use this variant
        before = len(FAILURES)
        run(device, backend, tag, START + 0.85 * budget)
        parts = sum(x.startswith(f"{tag} ") for x in SKIPPED)
        print(f"sanitize_clip: {tag} {'ok' if len(FAILURES) == before else 'FAILED'}"
              f"{f' ({parts} parts skipped for time)' if parts else ''}", flush=True)
    print(f"sanitize_clip: {[t + (f'-{m}' if m else '') for t, m in variants]} done, {len(FAILURES)} failures, "
          f"{skipped} variants and {len(SKIPPED)} parts skipped, {time.monotonic() - START:.0f} s")
    return 1 if FAILURES or not variants else 3 if skipped or SKIPPED else 0


if __name__ == "__main__":
    sys.exit(main())
