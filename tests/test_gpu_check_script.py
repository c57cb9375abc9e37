"""scripts/gpu_check.sh --dry-run: the GPU check's own logic, run here with stand-ins for nvidia-smi, nvcc,
compute-sanitizer and the GPU-side python. GPU time comes as one command of at most 10 minutes, so what must
hold before it ever runs on a GPU: every step's limit fits in the time left before the one global deadline, a
step without enough time left is SKIPPED, each step's row is in summary.txt the moment the step ends (a killed
run still reports everything before it), at most 8 files land in OUTDIR, and a Triton one-launch kernel that
did not pass the smoke step is kept out of the rest of the run."""
import importlib.util
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
# what only a GPU can tell and what has never run first (issue 25, defect 2): the sanitizers included
STEPS = ["header", "build", "info", "smoke", "sanitizer-memcheck", "gpu-checks", "triton-check", "bench", "pytest",
         "sanitizer-racecheck", "sanitizer-synccheck"]
ROW = re.compile(r"^(\S+)\s+(PASS|FAIL|TIMEOUT|SKIPPED)\s+([\d.]+)s\s+limit\s+([\d.]+)s\s+start\s+([\d.]+)s", re.M)
PLAN = re.compile(r"^  (\S+)\s+cap\s+([\d.]+)s\s+expect\s+([\d.]+)s\s+ends by\s+([\d.]+)s\s+-> (\S+)", re.M)
# the timeline expected on an H200 (issue 25): build 80-130 s, smoke 50-80, bench 85-100; the budget-driven
# steps (gpu-checks, triton-check, pytest, sanitizers) use their whole caps
EXPECTED_TOP = {"build": 130, "smoke": 80, "bench": 100}

pytestmark = pytest.mark.skipif(os.name != "posix", reason="bash script")


def dry_run(out, timeout=60, **knobs):
    env = dict(os.environ, **{k: str(v) for k, v in knobs.items()})
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc, (out / "summary.txt").read_text()


def rows(summary):
    return [(m[1], m[2], float(m[3]), float(m[4]), float(m[5])) for m in ROW.finditer(summary)]


def check_limits(summary, deadline, grace):
    """Each step that ran had a limit within its cap and ended (with the kill grace) by the deadline."""
    caps = {m[1]: float(m[2]) for m in PLAN.finditer(summary)}
    assert list(caps) == STEPS
    ran = [r for r in rows(summary) if r[1] != "SKIPPED"]
    for name, verdict, elapsed, limit, start in ran:
        assert limit <= caps[name]
        assert start + limit + grace <= deadline + 1e-9, (name, start, limit)
        assert elapsed <= limit + grace + 0.5, (name, elapsed, limit)  # timeout's kill takes a moment
    return caps


def test_dry_run_plans_and_runs_every_step(tmp_path):
    proc, summary = dry_run(tmp_path / "out")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "plan: deadline 540.0s" in proc.stdout and "DRY RUN" in proc.stdout
    got = rows(summary)
    assert [r[0] for r in got] == STEPS and all(r[1] == "PASS" for r in got), summary
    caps = check_limits(summary, 540, 5)
    assert sum(caps.values()) > 540  # the caps alone would not fit: the clipping is what makes the run fit
    assert re.search(r"^total [\d.]+s: 11 passed, 0 not", summary, re.M)
    # at most 8 files, nothing deeper than OUTDIR/<folder>/<file>
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(tmp_path / "out").parts) <= 2 for p in files)
    logs = {p.name: p.read_text() for p in files}
    # what would run on the GPU machine, as the stand-ins saw it
    assert "pip install --no-build-isolation --no-deps -e ." in logs["build.log"]
    assert "TORCH_CUDA_ARCH_LIST=9.0" in logs["build.log"] and "MAX_JOBS=16" in logs["build.log"]
    assert "scripts/gpu_smoke.py --budget 80" in logs["smoke.txt"]
    assert "scripts/triton_precompile.py --jobs 8" in logs["build.log"]  # in the background, after the build
    assert "Triton variants compiling in the background" in summary
    assert "--device cuda --sets gpt2-small,mixed,many-small,llama-7b --providers all" in logs["bench.txt"]
    assert "scripts/gpu_checks.py --device cuda --budget" in logs["checks.txt"]
    assert "scripts/triton_gpu_check.py --budget" in logs["checks.txt"]
    assert "-m pytest -v -ra -m gpu" in logs["tests.txt"]  # one line per result: a killed run keeps the names
    # one sanitizer run per backend and tool (a Triton hang loses nothing of the native run); the Triton one
    # under racecheck and synccheck with the two-launch variant
    for tool in ("memcheck", "racecheck", "synccheck"):
        runs = re.findall(rf"^standin compute-sanitizer \[step sanitizer-{tool}.*$", logs["tests.txt"], re.M)
        assert len(runs) == 2 and all(f"--tool {tool}" in r for r in runs), runs
        assert runs[0].endswith("scripts/sanitize_clip.py cuda native")
        assert runs[1].endswith("scripts/sanitize_clip.py cuda triton")
        assert ("FUSEDCLIP_TRITON_LAUNCH=two" in runs[1]) == (tool != "memcheck")
        assert all(("PYTORCH_NO_CUDA_MEMORY_CACHING=1" in r) == (tool == "memcheck") for r in runs)
    assert "FUSEDCLIP_TRITON_LAUNCH=two" not in summary + logs["checks.txt"]
    assert "every step runs, sanitizers included" in summary


def test_deadline_clips_a_step_and_skips_the_rest(tmp_path):
    """A smoke step that would run for a minute gets only what is left of a 4 s deadline, times out there, and
    every later step is SKIPPED; the whole run ends by the deadline."""
    t0 = time.monotonic()
    proc, summary = dry_run(tmp_path / "out", GPU_CHECK_DEADLINE=4, GPU_CHECK_MIN_STEP=1, GPU_CHECK_GRACE=0.5,
                            GPU_CHECK_STANDIN_SLEEP_SMOKE=60)
    wall = time.monotonic() - t0
    assert proc.returncode != 0
    got = rows(summary)
    assert [r[0] for r in got] == STEPS, summary
    verdicts = dict((r[0], r[1]) for r in got)
    assert [verdicts[s] for s in STEPS[:4]] == ["PASS", "PASS", "PASS", "TIMEOUT"], summary
    assert all(verdicts[s] == "SKIPPED" for s in STEPS[4:]), summary
    smoke = next(r for r in got if r[0] == "smoke")
    assert smoke[3] < 4 - 0.5 - smoke[4] + 0.1  # clipped to the time left, far below its 150 s cap
    check_limits(summary, 4, 0.5)
    assert wall < 4 + 2
    assert "under 1.0s left" in summary


def test_worst_case_every_step_hangs(tmp_path):
    """Every stand-in hangs: each step is killed at its limit, the limits (and the last one's kill grace) add up
    to no more than the deadline, the step the deadline reaches is clipped below its cap, and the run ends on
    time. The caps are scaled down (x0.01) so that several steps run into them within a 5 s deadline."""
    deadline, grace = 5, 0.1
    hang = {f"GPU_CHECK_STANDIN_SLEEP_{s.upper().replace('-', '_')}": 100 for s in STEPS}
    t0 = time.monotonic()
    proc, summary = dry_run(tmp_path / "out", GPU_CHECK_DEADLINE=deadline, GPU_CHECK_MIN_STEP=0.1,
                            GPU_CHECK_GRACE=grace, GPU_CHECK_CAP_SCALE=0.01, **hang)
    wall = time.monotonic() - t0
    assert proc.returncode != 0
    caps = check_limits(summary, deadline, grace)
    got = rows(summary)
    assert [r[0] for r in got] == STEPS, summary
    ran = [r for r in got if r[1] != "SKIPPED"]
    assert len(ran) >= 4 and all(r[1] == "TIMEOUT" for r in ran), summary
    assert all(r[1] == "SKIPPED" for r in got[len(ran):]), summary
    assert sum(r[3] for r in ran) + grace <= deadline
    # the deadline cut the last step that ran short, or fell within the minimum step time of its end (the next
    # step, with less than that left, SKIPPED); which one depends on how long the script itself took here
    assert ran[-1][3] < caps[ran[-1][0]] - 0.05 or got[len(ran)][3] < 0.1 + 1e-9, \
        "the last step that ran was not clipped to the time left"
    assert wall < deadline + 1.5


def test_summary_rows_are_written_as_steps_end(tmp_path):
    """Killed while the bench runs (as a 10-minute command limit would), the run has already reported every step
    before it."""
    out = tmp_path / "out"
    env = dict(os.environ, GPU_CHECK_STANDIN_SLEEP_BENCH="60")
    proc = subprocess.Popen(["bash", str(SCRIPT), "--dry-run", str(out)], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else ""
            if "triton-check" in [r[0] for r in rows(text)] and (out / "bench.txt").exists():
                break
            time.sleep(0.1)
        time.sleep(0.3)
        assert proc.poll() is None, "the run ended although the bench stand-in sleeps for 60 s"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole run, stand-ins included: they are in its session
        proc.wait()
    got = rows((out / "summary.txt").read_text())
    assert [r[0] for r in got] == STEPS[:STEPS.index("bench")] and all(r[1] == "PASS" for r in got)
    assert "== bench: limit" in (out / "bench.txt").read_text()


def test_failures_do_not_stop_the_run_and_a_bad_triton_launch_is_avoided(tmp_path):
    """A failed build is a FAIL row and the run goes on; when the Triton one-launch kernel did not pass in the
    smoke step, the rest of the run uses the two-launch variant and the bench leaves the one-launch provider out."""
    proc, summary = dry_run(tmp_path / "out", GPU_CHECK_STANDIN_RC_BUILD=1,
                            GPU_CHECK_STANDIN_SAY_SMOKE="smoke coop-graph: PASS ok\\nsmoke triton-one-launch: "
                                                        "TIMEOUT no result within 60 s")
    assert proc.returncode != 0
    verdicts = {r[0]: r[1] for r in rows(summary)}
    assert verdicts["build"] == "FAIL" and re.search(r"^build\s+FAIL.*rc=1", summary, re.M)
    assert all(verdicts[s] == "PASS" for s in STEPS if s != "build"), summary
    assert "    > smoke coop-graph: PASS ok" in summary and "    > smoke triton-one-launch: TIMEOUT" in summary
    assert "FUSEDCLIP_TRITON_LAUNCH=two" in summary
    bench = (tmp_path / "out" / "bench.txt").read_text()
    assert "--providers torch,torch-loop,compile,native,triton-2,apex" in bench
    for log in ("checks.txt", "tests.txt"):  # every step after the smoke runs with the two-launch variant
        lines = [x for x in (tmp_path / "out" / log).read_text().splitlines() if x.startswith("standin")]
        assert lines and all("FUSEDCLIP_TRITON_LAUNCH=two" in x for x in lines)


def test_the_plan_fits_the_expected_timeline(tmp_path):
    """Every step, sanitizers included, runs inside the 540 s deadline when each takes the top of its expected
    time on an H200 (issue 25: the sanitizers were all skipped): the plan's own arithmetic, and a dry run, scaled
    x0.05, whose stand-ins take exactly that long (less what the script itself spends between steps here)."""
    proc, summary = dry_run(tmp_path / "plan", GPU_CHECK_STANDIN_SLEEP_BUILD=0)
    plan = {m[1]: (float(m[2]), float(m[3])) for m in PLAN.finditer(summary)}
    assert list(plan) == STEPS
    assert all(plan[name][1] >= top for name, top in EXPECTED_TOP.items())
    assert all(expect <= cap for cap, expect in plan.values())
    assert sum(e for _, e in plan.values()) + 5 <= 540
    assert "every step runs, sanitizers included" in summary
    scale, overhead = 0.05, 0.4
    sleeps = {}
    for name, (cap, expect) in plan.items():
        t = max(0.0, expect * scale - overhead)
        key = f"GPU_CHECK_STANDIN_SLEEP_{name.upper().replace('-', '_')}"
        if name.startswith("sanitizer"):  # two sanitizer runs in the step, native and Triton
            t /= 2
        sleeps[key] = round(t, 3)
    t0 = time.monotonic()
    proc, summary = dry_run(tmp_path / "out", timeout=120, GPU_CHECK_DEADLINE=540 * scale, GPU_CHECK_GRACE=5 * scale,
                            GPU_CHECK_MIN_STEP=10 * scale, GPU_CHECK_CAP_SCALE=scale, **sleeps)
    got = rows(summary)
    assert proc.returncode == 0 and [r[0] for r in got] == STEPS and all(r[1] == "PASS" for r in got), summary
    assert time.monotonic() - t0 < 540 * scale + 3


def test_a_plan_that_does_not_fit_says_so(tmp_path):
    proc, summary = dry_run(tmp_path / "out", GPU_CHECK_DEADLINE=400)
    assert "PLAN DOES NOT FIT: expected 535.0s + 5.0s grace > 400.0s" in summary


@pytest.mark.parametrize("frame, label", [
    ('/v/lib/python3.12/site-packages/triton/compiler/compiler.py", line 300 in compile',
     "(killed compiling: /v/lib/python3.12/site-packages/triton/compiler/compiler.py:300 compile)"),
    ('/v/lib/python3.12/site-packages/torch/_inductor/codecache.py", line 9 in load',
     "(killed compiling: /v/lib/python3.12/site-packages/torch/_inductor/codecache.py:9 load)"),
    ('/repo/fusedclip/triton_backend.py", line 460 in _grid_barrier',
     "(killed in /repo/fusedclip/triton_backend.py:460 _grid_barrier)"),
])
def test_a_step_killed_while_compiling_says_so(tmp_path, frame, label):
    """A step killed at its limit is labelled from the last traceback its scripts dumped (faulthandler, most
    recent call first): compile time is not reported as a hang (issue 25: the Triton check, killed while
    compiling ~24 variants, was reported as a grid-barrier deadlock)."""
    dump = f'Thread 0x01 (most recent call first):\\n  File "{frame}\\n  File "/repo/scripts/x.py", line 1 in main'
    proc, summary = dry_run(tmp_path / "out", GPU_CHECK_CAP_SCALE=0.01, GPU_CHECK_MIN_STEP=0.1, GPU_CHECK_GRACE=0.1,
                            GPU_CHECK_STANDIN_SAY_GPU_CHECKS=dump, GPU_CHECK_STANDIN_SLEEP_GPU_CHECKS=5)
    line = next(x for x in summary.splitlines() if x.startswith("gpu-checks "))
    assert " TIMEOUT " in line and line.endswith(label), line
    assert re.search(r"^triton-check\s+PASS", summary, re.M)


# ---- the GPU-side scripts' own logic, as far as a CPU runs it ----------------------------------------------------

def load_script(name):
    """A fresh module object of scripts/<name>.py (its globals start clean for each test)."""
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _native_on_cpu():
    try:  # the dry-run tests above need no fusedclip at all; these do
        import fusedclip
        return "native" in fusedclip.available_backends("cpu")
    except Exception:
        return False


needs_native = pytest.mark.skipif(not _native_on_cpu(), reason="fusedclip's extension is not built")


@needs_native
def test_smoke_parts_run_on_cpu():
    """gpu_smoke.py --device cpu: one line per part, in order; the CUDA-only parts say so."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_smoke.py"), "--device", "cpu", "--gib", "0.01",
                           "--budget", "60"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [x for x in proc.stdout.splitlines() if x.startswith("smoke ")]
    assert [x.split(":")[0] for x in lines] == ["smoke coop-graph", "smoke defect5", "smoke bandwidth-fp32",
                                               "smoke bandwidth-bf16", "smoke triton-one-launch"]
    assert all(": PASS " in x for x in lines[1:4]) and all(": SKIP needs CUDA" in x for x in (lines[0], lines[4]))
    assert "copy " in lines[2] and "% of copy" in lines[2]


@needs_native
def test_sanitizer_workload_checks_results(monkeypatch, capsys):
    """sanitize_clip.py runs every public function on real gradients and checks the results: it passes as it
    is, and fails when the scale and clamp kernels do nothing (the defect where clip_grads_with_norm_ saw
    parameters without .grad and returned before any kernel)."""
    import fusedclip
    monkeypatch.setattr(sys, "argv", ["sanitize_clip.py", "cpu"])
    monkeypatch.setattr(fusedclip, "available_backends", lambda device="cpu": ["native", "torch"])
    assert load_script("sanitize_clip").main() == 0
    assert "sanitize_clip: native ok" in capsys.readouterr().out
    monkeypatch.setattr(fusedclip, "clip_grads_with_norm_", lambda *a, **k: None)
    monkeypatch.setattr(fusedclip, "clip_value_", lambda *a, **k: None)
    script = load_script("sanitize_clip")
    assert script.main() == 1
    assert any("clip_grads_with_norm_" in f for f in script.FAILURES)
    assert any("clip_value_" in f for f in script.FAILURES)


@needs_native
def test_gpu_checks_go_on_after_a_failure_and_respect_the_budget(monkeypatch, capsys):
    checks = load_script("gpu_checks")

    def broken(device, backend):
        raise RuntimeError("boom")

    monkeypatch.setattr(checks, "CHECKS", [(broken, False)] + [c for c in checks.CHECKS if c[0].__name__ ==
                                                               "nonfinite"])
    assert checks.main(["--device", "cpu", "--backends", "native"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"native +broken +FAIL RuntimeError: boom", out)
    assert re.search(r"native +nonfinite +PASS", out)  # the check after the failing one ran
    assert "1 passed, 1 failed, 0 skipped" in out
    assert checks.main(["--device", "cpu", "--backends", "native", "--budget", "0.01"]) == 0
    assert "0 passed, 0 failed, 2 skipped" in capsys.readouterr().out


def test_triton_check_sections_are_independent(monkeypatch, capsys):
    tgc = load_script("triton_gpu_check")
    assert [f.__name__ for f in tgc.SECTIONS][-1] == "cuda_graph"  # a failed capture can spoil what follows

    def fine(check):
        check(True, "fine")

    def raises(check):
        raise RuntimeError("capture failed")

    def wrong(check):
        check(False, "a wrong result")

    monkeypatch.setattr(tgc, "SECTIONS", [fine, raises, wrong, fine])
    assert tgc.child_checks(60) == 1
    out = capsys.readouterr().out
    assert [x.split(":")[1].split()[0] for x in out.splitlines() if x.startswith("section ")] == \
        ["PASS", "FAIL", "FAIL", "PASS"]
    assert "checks: 2 passed, 2 failed; sections 2 ok, 2 failed, 0 skipped" in out
    assert tgc.child_checks(1) == 1  # no budget: every section SKIPPED, which is not a pass
    assert "sections 0 ok, 0 failed, 4 skipped" in capsys.readouterr().out


# ---- scripts/gpu_checks.py zclip: the expected state from the norms the GPU returned (defect 1, issue 25) ----

@needs_native
@pytest.mark.parametrize("kwargs", [dict(warmup_steps=3, on_spike="skip"), dict(warmup_steps=1),
                                    dict(warmup_steps=4, mode="percentile", max_grad_norm=None),
                                    dict(warmup_steps=2, clip_option="mean", skip_update_on_spike=True,
                                         on_nonfinite="skip")])
def test_zclip_state_f64_is_the_kernels_rule(kwargs):
    """zclip_state_f64, fed the norms a kernel returned, gives that kernel's state to the bit: through the
    warm-up, spikes (skipped or clipped), a skipped non-finite step, every rule variant."""
    import torch
    import fusedclip
    checks = load_script("gpu_checks")
    clipper = fusedclip.ZClip(**kwargs, backend="native")
    g = torch.Generator().manual_seed(5)
    seen = []
    for t in range(12):
        scale = 40.0 if t in (5, 8) else 1.0 + 0.05 * t
        params = [torch.nn.Parameter(torch.zeros(n)) for n in (1000, 77)]
        for q in params:
            q.grad = torch.randn(q.shape, generator=g) * scale
        if t == 9 and kwargs.get("on_nonfinite") == "skip":
            params[1].grad[3] = float("nan")
        opt = torch.optim.AdamW(params, lr=0.0, fused=True)
        seen.append(clipper.step(params, opt).double().item())
        want = checks.zclip_state_f64(clipper._config, seen, clipper._state.numel() - 4)
        assert clipper._state.tolist() == want, (t, clipper._state.tolist(), want)
        assert checks.same_f64(clipper._state.tolist(), want)
    assert clipper._state[0].item() >= 10 and not math.isnan(clipper._state[2].item())
    assert not checks.same_f64([1.0, 2.0], [1.0, 2.0 + 2**-51]) and checks.same_f64([math.nan], [math.nan])


@needs_native
def test_zclip_check_takes_norms_from_another_summation_order(monkeypatch):
    """The zclip check passes when the backend's fp32 norms differ in the last bits from the CPU kernel's (as
    the GPU's do: another summation order), which moved the warm-up variance past the old rtol 1e-6 comparison
    with the CPU kernel's state. Emulated with backend="torch" (torch's own fp32 norm, the rule in torch ops)."""
    import torch
    import fusedclip
    checks = load_script("gpu_checks")
    monkeypatch.setattr(checks, "ZCLIP_SHAPES", [(3000, 77), (50000,), (7,)])
    monkeypatch.setattr(checks, "ZCLIP_DTYPES", [torch.float32])
    # the premise: torch's norms are not the CPU kernel's bit for bit, and a 3.6e-7 relative change of one
    # warm-up norm moves the state's variance by more than 1e-6 relative
    norms = [1.0, 1.05, 1.1]
    config = fusedclip.ZClip(warmup_steps=3)._config
    a = checks.zclip_state_f64(config, norms, 3)
    b = checks.zclip_state_f64(config, [norms[0] * (1 + 3.6e-7)] + norms[1:], 3)
    assert abs(a[2] - b[2]) > 1e-6 * abs(a[2])
    seen = []
    real_step = fusedclip.ZClip.step

    def step(self, *args, **kw):
        n = real_step(self, *args, **kw)
        seen.append((self.backend, n.item()))
        return n
    monkeypatch.setattr(fusedclip.ZClip, "step", step)
    checks.zclip("cpu", "torch")
    ours = [n for b, n in seen if b == "torch"]
    cpu = [n for b, n in seen if b == "native"]
    assert len(ours) == len(cpu) == 8 and ours != cpu, "the premise: different summation orders"


def test_gpu_checks_order_puts_what_never_ran_first():
    """Graph replay, two streams, ZClip, AGC and torch.compile before the long parity checks (issue 25: AGC,
    ZClip and compile came last and were skipped when the budget ran out)."""
    checks = load_script("gpu_checks")
    assert checks.ORDER[:5] == ["cuda_graph_replay", "two_streams", "zclip", "agc", "compile_fullgraph"]
    assert sorted(checks.ORDER) == sorted(f.__name__ for f, _ in checks.CHECKS)


def test_triton_check_tells_compile_time_from_a_deadlock():
    tgc = load_script("triton_gpu_check")
    compiling = ('Thread 0x7f (most recent call first):\n  File "/v/site-packages/triton/backends/nvidia/compiler.py", '
                 'line 400 in make_cubin\n  File "/v/site-packages/triton/compiler/compiler.py", line 300 in compile\n')
    assert tgc.killed_where("noise\n" + compiling).startswith("still compiling, not a deadlock")
    spinning = 'Thread 0x7f (most recent call first):\n  File "/r/scripts/triton_gpu_check.py", line 53 in child\n'
    assert tgc.killed_where(compiling + spinning).startswith("grid-barrier deadlock? stuck in")  # the last dump
    assert tgc.killed_where("") == "no traceback: grid-barrier deadlock?"


def test_triton_check_residency_rule():
    """The residency section's rule (issue 25, defect 9: the section read an attribute that no longer existed
    and checked nothing): a grid-barrier launch whose programs per SM, doubled, do not fit is reported."""
    tgc = load_script("triton_gpu_check")
    sms = 132
    assert tgc.residency_problems([("_one_launch_kernel", 2 * sms, 128, 8192)], sms) == []  # 4 fit a SM
    (problem,) = tgc.residency_problems([("_one_launch_kernel", 2 * sms, 168, 8192)], sms)  # 2 fit: 2 x 2 > 2
    assert "2 per SM" in problem and "168 registers" in problem
    assert tgc.residency_problems([("_zclip_kernel", sms, 255, 0)], sms) == []  # 2 fit: one each
    assert tgc.residency_problems([("_zclip_kernel", sms + 1, 255, 0)], sms) != []  # 2 on one SM: 4 > 2


TRITON_MODULES = {"tb": "fusedclip.triton_backend", "tz": "fusedclip.triton_zclip", "ta": "fusedclip.triton_agc"}


def missing_attributes(source):
    """The attributes `source` reads of fusedclip's Triton modules (tb.X, tz.X, ta.X, getattr / hasattr(tb, "X"))
    that do not exist."""
    import ast
    import importlib
    used = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in TRITON_MODULES \
                and isinstance(node.ctx, ast.Load):
            used.add((node.value.id, node.attr))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr") \
                and len(node.args) >= 2 and isinstance(node.args[0], ast.Name) and node.args[0].id in TRITON_MODULES \
                and isinstance(node.args[1], ast.Constant):
            used.add((node.args[0].id, node.args[1].value))
    return [f"{alias}.{name}" for alias, name in sorted(used)
            if not hasattr(importlib.import_module(TRITON_MODULES[alias]), name)]


@pytest.mark.parametrize("script", ["triton_gpu_check", "gpu_checks", "gpu_smoke", "sanitize_clip",
                                    "triton_precompile", "triton_static"])
def test_scripts_use_only_attributes_that_exist(script):
    """Every attribute a GPU-side script reads of fusedclip's Triton modules exists: a renamed one makes a GPU
    check silently check nothing (issue 25, defect 9: the residency section read tb._per_sm, long gone)."""
    pytest.importorskip("triton")
    assert missing_attributes((ROOT / "scripts" / f"{script}.py").read_text()) == []


def test_the_old_residency_read_is_caught():
    pytest.importorskip("triton")
    old = 'used = max(getattr(tb, "_per_sm", {}).values(), default=1)\nfit = tb.resident_per_sm(1, 2)'
    assert missing_attributes(old) == ["tb._per_sm"]


@pytest.mark.skipif(not _native_on_cpu(), reason="fusedclip's extension is not built")
def test_precompile_lists_the_variants_the_run_launches():
    """scripts/triton_precompile.py records, from the launchers, every variant a check run launches (one and
    two launches, every norm kind, the extras, ZClip, scale and clamp; AGC needs the GPU's SM count), without
    duplicates, the options the launchers try first ahead of the fallbacks."""
    pytest.importorskip("triton")
    from fusedclip import triton_backend as tb
    if tb.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1: nothing is compiled")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "triton_precompile.py"), "--list", "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [x for x in proc.stdout.splitlines() if x.startswith("_")]
    kernels = {x.split()[0] for x in lines}
    assert {"_one_launch_kernel", "_partials_kernel", "_finish_kernel", "_zclip_kernel", "_clamp_kernel"} <= kernels
    assert len(lines) == len(set(lines)) and len(lines) >= 40
    firsts = [i for i, x in enumerate(lines) if "maxnreg" in x]
    fallbacks = [i for i, x in enumerate(lines) if x.startswith("_one_launch_kernel") and " fp32 " in x
                 and "maxnreg" not in x]
    assert firsts and fallbacks and max(firsts) < min(fallbacks)


def test_background_compile_is_stopped_before_the_bench(tmp_path):
    """The Triton variants compile in the background after the build; if that still runs when the bench starts
    (which times launch-bound sets), it is stopped, and the summary says so."""
    proc, summary = dry_run(tmp_path / "out", GPU_CHECK_STANDIN_SLEEP_NONE=30)  # the background stand-in's step
    assert proc.returncode == 0, summary
    lines = summary.splitlines()
    stop = lines.index("note: the background Triton compile was still running before the bench: stopped")
    assert lines[stop + 1].startswith("bench ")  # right before the bench's row
    assert "still running at the end" not in summary


def test_sanitizer_workload_runs_every_kernel_first_and_stops_in_time(monkeypatch):
    """A short sanitizer run (20-40 s under memcheck on the GPU) still reaches every kernel: each once first
    (clip_, scale, clamp, AMP, AGC, ZClip), the exhaustive cases last; a part that would start past the deadline
    is skipped and listed, so the sanitizer ends, and prints its summary, inside its limit."""
    script = load_script("sanitize_clip")
    ran = []
    for name in ("clip_sets", "scale", "clamp", "amp", "agc", "zclip", "total_norm", "per_tensor"):
        monkeypatch.setattr(script, name, lambda *a, _n=name: ran.append(_n if _n != "clip_sets" else
                                                                           f"clip_sets first={a[3]}"))
    script.run("cpu", "native", "native")
    assert ran == ["clip_sets first=True", "scale", "clamp", "amp", "agc", "zclip", "total_norm", "per_tensor",
                   "clip_sets first=False"]
    ran.clear()
    clock = iter(range(100))
    monkeypatch.setattr(script.time, "monotonic", lambda: next(clock))
    script.run("cpu", "native", "native", deadline=1.5)  # two parts start in time
    assert ran == ["clip_sets first=True", "scale"]
    assert len(script.SKIPPED) == 7 and script.SKIPPED[0] == "native clip_value_"
