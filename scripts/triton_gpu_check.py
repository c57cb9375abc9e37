#!/usr/bin/env python3
"""GPU check of the Triton backend (called by scripts/gpu_check.sh).

  python scripts/triton_gpu_check.py [--budget S] [--first-launch-timeout S] [--timeout S]

Runs in child processes, each under a time limit inside --budget (gpu_check.sh passes its step limit), so a
deadlocked grid barrier fails the check instead of hanging it (or outliving the step):
  1. first launch: one small and one large one-launch clip (compiles the kernel; a barrier that never opens
     times out here);
  2. checks: one launch against two launches, bit for bit (dtypes x norms x clipping) and against the native
     backend and a float64 reference; the barrier counters back at zero; the programs of two concurrent calls fit
     on the SMs together (registers and shared memory of the compiled kernel); CUDA-graph
     capture and replay with new gradients copied in between, equal to eager; two streams clipping at once;
     the fused extras: per-tensor norms and AMP's unscale (inv_scale, found_inf) in both variants, against each
     other, the native backend, a float64 reference and torch's unscale + clip, and fusedclip.unscale_clip_ with
     GradScaler("cuda"). Each is a section of its own (try/except: one failing never stops the others), skipped
     when the budget is spent.
Prints one summary line, last; exits 0 only if everything passed (2 when no GPU is visible: nothing checked).
"""
import argparse
import math
import os
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bits_equal(a, b):
    import torch
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def _grads(seed, dtypes, shapes=None):
    import torch
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = shapes or [(4096, 1024), (1024,), (3000, 77), (5,), (0,), (50257, 64), (16385,), (7,)]
    return [(torch.randn(s, device="cuda", generator=g) * 0.1).to(dtypes[i % len(dtypes)]) for i, s in
            enumerate(shapes)]


def child_first_launch():
    import torch
    from fusedclip import triton_backend as tb
    for grads in ([torch.randn(1000, device="cuda")], _grads(0, [torch.float32, torch.bfloat16])):
        tb.clip(grads, 0.1, 2.0, launch="one")
        torch.cuda.synchronize()
    print("first launch ok")


def _check_fused_extras(check):
    """Per-tensor norms and AMP's unscale in the kernels' own pass, once each on CUDA."""
    import torch
    import fusedclip
    from fusedclip import triton_backend as tb

    for name, dtypes in {"mixed": [torch.float32, torch.bfloat16], "mixed64": [torch.float32, torch.float64]}.items():
        grads0 = _grads(5, dtypes)
        acc = torch.float64 if name == "mixed64" else torch.float32
        runs = []
        for launch in ("one", "two"):
            norms = torch.randn(len(grads0), dtype=acc, device="cuda")
            grads = [x.clone() for x in grads0]
            runs.append((tb.clip(grads, 0.5, 2.0, per_tensor=norms, launch=launch), norms, grads))
        (na, pa, ga), (nb, pb, gb) = runs
        check(_bits_equal(na, nb) and _bits_equal(pa, pb) and all(_bits_equal(x, y) for x, y in zip(ga, gb)),
              f"per-tensor: one launch != two launches bitwise ({name})")
        ref = [float(x.double().norm()) if x.numel() else 0.0 for x in grads0]
        tol = 1e-12 if acc == torch.float64 else 2e-6
        check(all((n == r == 0.0) or abs(n - r) <= tol * r for n, r in zip(pa.tolist(), ref)),
              f"per-tensor norms vs float64 reference ({name}): {pa.tolist()} vs {ref}")
        _, native = fusedclip.get_total_norm(grads0, 2.0, per_tensor=True, backend="native")
        check(torch.allclose(pa, native, rtol=1e-5, atol=0), f"per-tensor norms vs native ({name})")

    grads0 = _grads(6, [torch.float32, torch.bfloat16])
    grads0 = [x * 3000 for x in grads0]
    inv = torch.tensor(1 / 3000.0, device="cuda")
    ref = float(torch.cat([x.double().flatten() * float(inv) for x in grads0]).norm())
    for bad in (None, float("inf"), float("nan")):
        base = [x.clone() for x in grads0]
        if bad is not None:
            base[0][1, 2] = bad
        runs = []
        for launch in ("one", "two"):
            grads, found = [x.clone() for x in base], torch.zeros((), device="cuda")
            runs.append((tb.clip(grads, 0.5 * ref, 2.0, inv_scale=inv, found_inf=found, launch=launch), grads, found))
        theirs, their_found = [x.clone() for x in base], torch.zeros((), device="cuda")
        torch._amp_foreach_non_finite_check_and_unscale_(theirs, their_found, inv)
        params = [torch.nn.Parameter(torch.empty_like(x)) for x in theirs]
        for q, x in zip(params, theirs):
            q.grad = x
        their_norm = torch.nn.utils.clip_grad_norm_(params, 0.5 * ref)
        tag = f"AMP bad={bad}"
        (na, ga, fa), (nb, gb, fb) = runs
        check(_bits_equal(na, nb) and _bits_equal(fa, fb) and all(_bits_equal(x, y) for x, y in zip(ga, gb)),
              f"{tag}: one launch != two launches bitwise")
        check(float(fa) == float(their_found) == (0.0 if bad is None else 1.0), f"{tag}: found_inf {float(fa)}")
        check(torch.allclose(na, their_norm, rtol=1.6e-2, equal_nan=True) and all(
            torch.allclose(x.double(), y.double(), rtol=3.2e-2, atol=1e-5, equal_nan=True)
            for x, y in zip(ga, theirs)), f"{tag}: differs from torch's unscale + clip")
        if bad is None:
            check(abs(float(na) - ref) <= 2e-6 * ref, f"{tag}: norm {float(na)} vs float64 reference {ref}")
            # fp32 division, as in the kernel (a Python float over a tensor would multiply by a reciprocal)
            coef = torch.clamp(torch.tensor(0.5 * ref, device="cuda") / (na + 1e-6), max=1.0)
            check(all(_bits_equal(x, (y.float() * (inv * coef)).to(y.dtype)) for x, y in zip(ga, base)),
                  f"{tag}: grads not written once as grad * (inv_scale * coef)")

    # the public path: GradScaler("cuda") + unscale_clip_ against scaler.unscale_ + clip_grad_norm_
    def amp_model():
        torch.manual_seed(7)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 8)).cuda()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cuda", init_scale=3000.0, growth_interval=1)
        scaler.scale(model(torch.randn(32, 64, device="cuda")).square().mean()).backward()
        model[2].weight.grad[0, 0] = float("inf")
        return model, opt, scaler

    (ma, oa, sa), (mb, ob, sb) = amp_model(), amp_model()
    before = [p.detach().clone() for p in ma.parameters()]
    fusedclip.unscale_clip_(sa, oa, 0.5, backend="triton")
    sb.unscale_(ob)
    torch.nn.utils.clip_grad_norm_(mb.parameters(), 0.5)
    for s, o in ((sa, oa), (sb, ob)):
        s.step(o)
        s.update()
    check(sa.get_scale() == sb.get_scale() < 3000.0 and all(torch.equal(p, b) for p, b in zip(ma.parameters(), before)),
          "unscale_clip_ with GradScaler('cuda'): inf did not skip the step and lower the scale as torch does")


SECTIONS = []  # in order; each independent (one that fails or raises never stops the others)


def section(f):
    SECTIONS.append(f)
    return f


@section
def parity(check):
    """One launch against two launches bit for bit, the native backend and a float64 reference."""
    import torch
    import fusedclip
    from fusedclip import triton_backend as tb
    dtype_sets = {"fp32": [torch.float32], "fp16": [torch.float16], "bf16": [torch.bfloat16],
                  "mixed": [torch.float32, torch.bfloat16, torch.float16], "mixed64": [torch.float32, torch.float64]}
    for name, dtypes in dtype_sets.items():
        for p in (2.0, math.inf, -math.inf, 1.0, 3.0):
            for clipping in (True, False):
                grads = _grads(1, dtypes)
                flat = torch.cat([x.double().flatten() for x in grads])
                ref = float(torch.linalg.vector_norm(flat, p))
                max_norm = ref * (0.5 if clipping else 2.0)
                a, b, c = ([x.clone() for x in grads] for _ in range(3))
                na = tb.clip(a, max_norm, p, launch="one")
                nb = tb.clip(b, max_norm, p, launch="two")
                nc = fusedclip.clip_(c, max_norm, p, backend="native")
                tag = f"{name} p={p} clipping={clipping}"
                check(_bits_equal(na, nb) and all(_bits_equal(x, y) for x, y in zip(a, b)),
                      f"one launch != two launches bitwise ({tag})")
                rounding = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}.get(na.dtype, 0.0)
                check(abs(float(na) - ref) <= (2e-6 + rounding) * ref,
                      f"norm {float(na)} vs float64 reference {ref} ({tag})")
                check(abs(float(na) - float(nc)) <= 1e-5 * abs(float(nc)) + 1e-30,
                      f"norm {float(na)} vs native {float(nc)} ({tag})")
                if not clipping:
                    check(all(_bits_equal(x, y) for x, y in zip(a, grads)), f"grads written with coef 1 ({tag})")
                else:
                    coef = min(max_norm / (ref + 1e-6), 1.0)
                    check(all(torch.allclose(x.double(), y.double() * coef, rtol=1.6e-2, atol=1e-5)
                              for x, y in zip(a, grads)), f"grads not scaled by coef ({tag})")


@section
def barrier_reset(check):
    """The one-launch kernel leaves its barrier counters at zero for the next call."""
    import torch
    from fusedclip import triton_backend as tb
    tb.clip(_grads(7, [torch.float32]), 0.5, 2.0, launch="one")
    device = torch.device("cuda", torch.cuda.current_device())
    ws = tb._WORKSPACES.get(device)
    torch.cuda.synchronize()
    check(all(v == 0 for v in ws.flatten().tolist()), f"barrier counters not reset: {ws.tolist()}")


def residency_problems(launches, sms, **limits):
    """Grid-barrier launches whose programs two calls at once could not all hold on the SMs: for each launch
    (kernel name, programs, the compiled kernel's registers a thread, shared bytes), the programs per SM it
    uses, doubled (a second call at once: two streams, a graph beside an eager call), must fit in what an SM
    holds of that compiled kernel (triton_backend.resident_per_sm, limits: the device's)."""
    from fusedclip import triton_backend as tb
    problems = []
    for name, programs, regs, shared in launches:
        fit = tb.resident_per_sm(regs, shared, **limits)
        used = -(-programs // sms)
        if 2 * used > fit:
            problems.append(f"{name}: {programs} programs on {sms} SMs ({used} per SM), twice that does not fit in "
                            f"{fit} per SM ({regs} registers, {shared} B shared)")
    return problems


def record_barrier_launches(call):
    """[(kernel name, programs, registers, shared)] of the grid-barrier (one-launch) kernels call() launched,
    read from the launches themselves (triton_backend._launch), not from bookkeeping that may change."""
    from fusedclip import triton_backend as tb
    launches, launch = [], tb._launch

    def recording(kernel, programs, *args, options=None, **constexprs):
        launch(kernel, programs, *args, options=options, **constexprs)
        if constexprs.get("ONE_LAUNCH", kernel is tb._one_launch_kernel):
            compiled = tb._compiled[kernel.__name__]
            launches.append((kernel.__name__, programs, compiled.n_regs, compiled.metadata.shared))
    tb._launch = recording
    try:
        call()
    finally:
        tb._launch = launch
    return launches


@section
def residency(check):
    """Two one-launch calls at once (two streams, a graph beside an eager call) must all be resident, or a grid
    barrier never opens: the compiled kernel's registers and shared memory decide how many programs an SM holds.
    Every one-launch variant the public calls use (L2, inf with AMP and per-tensor norms, fp64, ZClip), on a set
    with more chunks than the grid has programs."""
    import torch
    from fusedclip import triton_backend as tb
    from fusedclip import triton_zclip as tz
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    limits = {name: getattr(props, attr) for name, attr in
              (("regs_per_sm", "regs_per_multiprocessor"), ("threads_per_sm", "max_threads_per_multi_processor"),
               ("shared_per_sm", "shared_memory_per_multiprocessor")) if getattr(props, attr, None)}
    big = [torch.float32, torch.bfloat16]
    calls = {
        "L2": lambda: tb.clip(_grads(8, big), 0.5, 2.0, launch="one"),
        "inf AMP per-tensor": lambda: tb.clip(_grads(9, big), 0.5, math.inf, launch="one",
                                              per_tensor=torch.empty(8, device="cuda"),
                                              inv_scale=torch.full((), 0.5, device="cuda"),
                                              found_inf=torch.zeros((), device="cuda")),
        "fp64": lambda: tb.clip(_grads(10, [torch.float64, torch.float32]), 0.5, 2.0, launch="one"),
        "zclip": lambda: tz.zclip(_grads(11, big), torch.zeros(tz.BUFFER + 2, dtype=torch.float64, device="cuda"),
                                  [0.97, 2.5, 1.0, 1.0, 1e-6, 2.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0], launch="one"),
    }
    for what, call in calls.items():
        launches = record_barrier_launches(call)
        check(bool(launches), f"{what}: no one-launch kernel was launched")
        for name, programs, regs, shared in launches:
            print(f"residency {what}: {name} {regs} registers/thread, {shared} B shared, {programs} programs on "
                  f"{props.multi_processor_count} SMs: {tb.resident_per_sm(regs, shared, **limits)} fit per SM",
                  flush=True)
        for problem in residency_problems(launches, props.multi_processor_count, **limits):
            check(False, f"{what}: {problem}")


@section
def two_streams(check):
    """Two streams clipping at once, 30 times: bitwise equal to sequential calls."""
    import torch
    from fusedclip import triton_backend as tb
    sets = [_grads(3, [torch.float32]), _grads(4, [torch.bfloat16, torch.float32])]
    expected = []
    for g in sets:
        e = [x.clone() for x in g]
        expected.append((tb.clip(e, 0.5, 2.0), e))
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    torch.cuda.synchronize()
    ok = True
    for _ in range(30):
        work = [[x.clone() for x in g] for g in sets]
        torch.cuda.synchronize()
        norms = []
        for s, w in zip(streams, work):
            with torch.cuda.stream(s):
                norms.append(tb.clip(w, 0.5, 2.0))
        torch.cuda.synchronize()
        for (en, eg), n, w in zip(expected, norms, work):
            ok &= _bits_equal(n, en) and all(_bits_equal(x, y) for x, y in zip(w, eg))
    check(ok, "two concurrent streams differ from sequential results")


@section
def fused_extras(check):
    _check_fused_extras(check)


@section
def cuda_graph(check):
    """Capture after a warm-up, replay with new gradients copied in, compare with eager. Last: a capture that
    fails (a compile inside it) can leave the stream unusable for what would follow."""
    import torch
    from fusedclip import triton_backend as tb
    grads = _grads(2, [torch.float32, torch.bfloat16])
    static = [x.clone() for x in grads]
    tb.clip(static, 1.0, 2.0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        norm = tb.clip(static, 1.0, 2.0)
    for step in range(6):
        fresh = [torch.randn_like(x) * (0.001 if step % 2 else 1.0) for x in grads]
        for s, f in zip(static, fresh):
            s.copy_(f)
        graph.replay()
        eager = [f.clone() for f in fresh]
        eager_norm = tb.clip(eager, 1.0, 2.0)
        torch.cuda.synchronize()
        check(_bits_equal(norm, eager_norm) and all(_bits_equal(s, e) for s, e in zip(static, eager)),
              f"CUDA-graph replay {step} differs from eager")


def child_checks(budget):
    import torch

    end = time.monotonic() + budget
    failures, passed = [], 0

    def check(ok, what):
        nonlocal passed
        if ok:
            passed += 1
        else:
            failures.append(what)
            print("FAIL", what, flush=True)

    done = {"ok": 0, "failed": 0, "skipped": 0}
    for f in SECTIONS:
        t0, before = time.monotonic(), len(failures)
        if end - t0 < 5:
            done["skipped"] += 1
            print(f"section {f.__name__}: SKIPPED (budget spent)", flush=True)
            continue
        try:
            f(check)
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # an asynchronous error belongs to this section
        except Exception as e:  # report and go on with the next section
            traceback.print_exc()
            failures.append(f"{f.__name__}: {type(e).__name__}: {str(e)[:300]}")
        bad = len(failures) - before
        done["failed" if bad else "ok"] += 1
        print(f"section {f.__name__}: {'FAIL' if bad else 'PASS'} ({bad} failed) [{time.monotonic() - t0:.1f} s]",
              flush=True)
    print(f"checks: {passed} passed, {len(failures)} failed; sections {done['ok']} ok, {done['failed']} failed, "
          f"{done['skipped']} skipped", flush=True)
    return 0 if not failures and not done["skipped"] else 1


COMPILER_FRAMES = ("triton/compiler", "triton/backends", "triton/runtime/jit", "triton/runtime/build", "torch/_inductor",
                   "torch/_dynamo")


def killed_where(stderr):
    """Why a child was killed at its limit, from the last traceback it dumped (faulthandler, most recent call
    first): "still compiling" when the innermost frame is in a compiler, so compile time is not reported as a
    grid-barrier deadlock; else the frame it was in."""
    lines = stderr.splitlines()
    heads = [i for i, x in enumerate(lines) if "most recent call first" in x]
    if not heads or heads[-1] + 1 >= len(lines):
        return "no traceback: grid-barrier deadlock?"
    frame = lines[heads[-1] + 1].strip()
    if any(c in frame for c in COMPILER_FRAMES):
        return f"still compiling, not a deadlock: {frame}"
    return f"grid-barrier deadlock? stuck in {frame}"


def run_child(mode, timeout, *extra):
    start = time.time()
    try:  # the child dumps its stacks 2 s before its limit: where it was when killed
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, "--dump-after",
                              str(max(1.0, timeout - 2)), *extra], cwd=ROOT, capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired as e:
        text = lambda x: x.decode(errors="replace") if isinstance(x, bytes) else (x or "")  # noqa: E731
        sys.stdout.write(text(e.stdout))
        sys.stderr.write(text(e.stderr)[-4000:])
        return False, f"{mode}: no result within {timeout:.0f} s ({killed_where(text(e.stderr))})"
    sys.stdout.write(out.stdout)
    sys.stderr.write(out.stderr[-4000:])
    summary = next((line for line in reversed(out.stdout.splitlines()) if line.startswith("checks:")), "")
    return out.returncode == 0, f"{mode}: rc={out.returncode} in {time.time() - start:.0f} s" + \
        (f" ({summary})" if summary else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=float(os.environ.get("STEP_LIMIT", 180)),
                    help="seconds for the whole check, children included (gpu_check.sh passes its step limit)")
    ap.add_argument("--first-launch-timeout", type=float, default=None, help="default: min(60, budget / 3)")
    ap.add_argument("--timeout", type=float, default=None, help="the checks child's; default: what is left")
    ap.add_argument("--child", choices=["first-launch", "checks"], help=argparse.SUPPRESS)
    ap.add_argument("--dump-after", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    if args.dump_after:
        import faulthandler
        faulthandler.dump_traceback_later(args.dump_after, exit=False)
    if args.child == "first-launch":
        child_first_launch()
        return 0
    if args.child == "checks":
        return child_checks(args.budget)

    start = time.monotonic()
    import torch
    if not torch.cuda.is_available():
        print("triton_gpu_check: NOT RUN: no CUDA GPU visible (nothing was checked)")
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("triton_gpu_check: NOT RUN: TRITON_INTERPRET=1 is set; unset it to check the compiled kernels")
        return 2
    import triton
    gpu = torch.cuda.get_device_name()
    # every inner limit inside the budget, so the deadlock guards fire before gpu_check.sh's own limit
    first = args.first_launch_timeout or min(60.0, args.budget / 3)
    ok1, msg1 = run_child("first-launch", first)
    left = args.budget - (time.monotonic() - start) - 3
    timeout = min(args.timeout or left, left)
    if not ok1:
        ok2, msg2 = False, "checks: not run (first launch failed)"
    elif timeout < 10:
        ok2, msg2 = False, f"checks: not run (only {timeout:.0f} s left)"
    else:  # the child skips sections it cannot start in time, 3 s before it would be killed
        ok2, msg2 = run_child("checks", timeout, "--budget", str(timeout - 3))
    verdict = "PASS" if ok1 and ok2 else "FAIL"
    print(f"triton_gpu_check: {verdict} on {gpu} (torch {torch.__version__}, triton {triton.__version__}): "
          f"{msg1}; {msg2}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
