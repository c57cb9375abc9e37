"""scripts/gpu_check.sh --dry-run: the GPU check's own logic, run here with stand-ins for nvidia-smi, nvcc,
compute-sanitizer and the GPU-side python. GPU time comes as one command of at most 10 minutes, so what must
hold before it ever runs on a GPU: every step's limit fits in the time left before the one global deadline, a
step without enough time left is SKIPPED, each step's row is in summary.txt the moment the step ends (a killed
run still reports everything before it), at most 8 files land in OUTDIR, and a Triton one-launch kernel that
did not pass the smoke step is kept out of the rest of the run."""
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
# what only a GPU can tell and what has never run first (issue 25, defect 2): the sanitizers included
STEPS = ["header", "build", "info", "smoke", "sanitizer-memcheck", "gpu-checks", "bench", "pytest",
         "sanitizer-racecheck", "sanitizer-synccheck"]
# the pytest steps and what each runs, in order (tests/gpu/: the GPU checks as tests)
PYTEST_STEPS = {
    "smoke": "-m smoke tests/gpu/test_checks.py tests/gpu/test_smoke.py",
    "gpu-checks": "-m not smoke tests/gpu/test_checks.py tests/gpu/test_adaptive.py tests/gpu/test_triton_gpu.py "
                  "tests/gpu/test_compile_gpu.py",
    "pytest": "-m gpu -o faulthandler_timeout=30 tests/gpu/test_parity.py tests/test_",
}
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
    t0 = time.time()
    proc, summary = dry_run(tmp_path / "out")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "plan: deadline 540.0s" in proc.stdout and "DRY RUN" in proc.stdout
    got = rows(summary)
    assert [r[0] for r in got] == STEPS and all(r[1] == "PASS" for r in got), summary
    caps = check_limits(summary, 540, 5)
    assert sum(caps.values()) > 540  # the caps alone would not fit: the clipping is what makes the run fit
    assert re.search(r"^total [\d.]+s: 10 passed, 0 not", summary, re.M)
    # at most 8 files, nothing deeper than OUTDIR/<folder>/<file>
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(tmp_path / "out").parts) <= 2 for p in files)
    logs = {p.name: p.read_text() for p in files}
    # what would run on the GPU machine, as the stand-ins saw it
    assert "pip install --no-build-isolation --no-deps -e ." in logs["build.log"]
    assert "TORCH_CUDA_ARCH_LIST=9.0" in logs["build.log"] and "MAX_JOBS=16" in logs["build.log"]
    assert "scripts/triton_precompile.py --jobs 8" in logs["build.log"]  # in the background, after the build
    assert "Triton variants compiling in the background" in summary
    assert "--device cuda --sets gpt2-small,mixed,many-small,llama-7b --providers all" in logs["bench.txt"]
    # the GPU checks as pytest modules, -v (one line per result: a killed step keeps the names), each step's
    # deadline handed to tests/gpu/conftest.py: the end of its limit less 3 s
    steps = {r[0]: r for r in got}
    for name, log in (("smoke", "smoke.txt"), ("gpu-checks", "checks.txt"), ("pytest", "tests.txt")):
        (line,) = [x for x in logs[log].splitlines() if x.startswith(f"standin python3 [step {name},")]
        assert "-m pytest -v -ra -o console_output_style=classic -p no:cacheprovider " + PYTEST_STEPS[name] in line
        deadline = float(re.search(r"FUSEDCLIP_GPU_DEADLINE=([\d.]+)", line)[1])
        assert abs(deadline - (t0 + steps[name][4] + steps[name][3] - 3)) < 2.0, (name, line)
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
            if "gpu-checks" in [r[0] for r in rows(text)] and (out / "bench.txt").exists():
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
                            GPU_CHECK_STANDIN_SAY_SMOKE="tests/gpu/test_checks.py::test_cuda_graph_replay[native] "
                                                        "PASSED\\ntests/gpu/test_smoke.py::test_triton_one_launch_"
                                                        "first_launch FAILED")
    assert proc.returncode != 0
    verdicts = {r[0]: r[1] for r in rows(summary)}
    assert verdicts["build"] == "FAIL" and re.search(r"^build\s+FAIL.*rc=1", summary, re.M)
    assert all(verdicts[s] == "PASS" for s in STEPS if s != "build"), summary
    assert "    > tests/gpu/test_checks.py::test_cuda_graph_replay[native] PASSED" in summary
    assert "    > tests/gpu/test_smoke.py::test_triton_one_launch_first_launch FAILED" in summary
    assert "FUSEDCLIP_TRITON_LAUNCH=two" in summary
    bench = (tmp_path / "out" / "bench.txt").read_text()
    assert "--providers torch,torch-loop,compile,native,triton-2,apex" in bench
    for log in ("checks.txt", "tests.txt"):  # every step after the smoke runs with the two-launch variant
        lines = [x for x in (tmp_path / "out" / log).read_text().splitlines() if x.startswith("standin")]
        assert lines and all("FUSEDCLIP_TRITON_LAUNCH=two" in x for x in lines)


@pytest.mark.parametrize("line, fallback", [
    ("PASSED", False),
    ("SKIPPED (the triton backend is not available for cuda here (python -m fusedclip info says why))", False),
    ("SKIPPED (deadline: 12 s left before FUSEDCLIP_GPU_DEADLINE, this test expects 30 s)", True),
    ("FAILED", True),
])
def test_one_launch_kept_only_after_its_guarded_first_launch_passed(tmp_path, line, fallback):
    """The rest of the run uses the one-launch Triton kernel only when its guarded first launch passed in the smoke
    step (or Triton is not there at all): one that failed, or was not reached before the step's deadline, could
    hang every step after it."""
    say = f"tests/gpu/test_smoke.py::test_triton_one_launch_first_launch {line}"
    proc, summary = dry_run(tmp_path / "out", GPU_CHECK_STANDIN_SAY_SMOKE=say)
    assert proc.returncode == 0, summary
    assert ("FUSEDCLIP_TRITON_LAUNCH=two" in summary) == fallback, summary


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
    ('/repo/fusedclip/backends/triton/kernels.py", line 460 in _grid_barrier',
     "(killed in /repo/fusedclip/backends/triton/kernels.py:460 _grid_barrier)"),
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
    assert re.search(r"^bench\s+PASS", summary, re.M)


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


# ---- tests/gpu: the GPU checks as pytest modules ----------------------------------------------------------------

def test_every_gpu_module_runs_in_one_step_in_order():
    """Each tests/gpu module is run by a step of the plan (none left out, the checks not run twice): the smoke
    tests first, then what never ran (graph replay, streams, sync; ZClip, AGC; the Triton kernels; compile), the
    parity at GPU sizes after the bench."""
    modules = sorted(p.name for p in (ROOT / "tests" / "gpu").glob("test_*.py"))
    named = " ".join(PYTEST_STEPS.values())
    assert all(f"tests/gpu/{m}" in named for m in modules), (modules, named)
    assert PYTEST_STEPS["smoke"].startswith("-m smoke ") and PYTEST_STEPS["gpu-checks"].startswith("-m not smoke ")
    assert "tests/gpu/test_parity.py" in PYTEST_STEPS["pytest"] and "tests/gpu/test_smoke.py" not in \
        PYTEST_STEPS["pytest"] + PYTEST_STEPS["gpu-checks"]
    assert STEPS.index("smoke") < STEPS.index("gpu-checks") < STEPS.index("bench") < STEPS.index("pytest")
    text = SCRIPT.read_text()
    # `-m gpu` over tests/test_*.py, not tests/: tests/gpu's smoke and checks are not run a second time
    assert re.search(r"^do_pytest\(\) \{ run_pytest -m gpu .*tests/gpu/test_parity\.py tests/test_\*\.py; \}", text,
                     re.M)


def test_gpu_conftest_leaves_the_suites_conftest_alone():
    """tests/gpu collected before a suite module that imports from tests/conftest.py (make test's order): its own
    conftest must not take the module name "conftest" (tests/gpu is a package for that)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                           "tests/gpu/test_smoke.py", "tests/test_clip.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "tests/test_clip.py::" in proc.stdout and "tests/gpu/test_smoke.py::" in proc.stdout


def _run_gpu_tests(args, env_extra, cwd=ROOT, timeout=240):
    env = dict(os.environ, COLUMNS="250", **env_extra)  # gpu_check.sh's width: -v lines keep the skip reasons
    return subprocess.run([sys.executable, "-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the skips of a machine without a GPU")
def test_gpu_tests_skip_without_a_gpu_and_before_the_deadline():
    """Without a GPU every tests/gpu test skips with the reason "no CUDA GPU", except the checks' CPU logic; with a
    deadline too close for a test's expected time, that test skips and says so (the deadline-aware conftest)."""
    late = _run_gpu_tests(["tests/gpu"], {"FUSEDCLIP_GPU_DEADLINE": str(time.time() + 2)})
    assert late.returncode == 0, late.stdout[-3000:] + late.stderr[-3000:]
    results = re.findall(r"^tests/gpu/(\S+) (PASSED|FAILED|ERROR|SKIPPED) ?(.*)$", late.stdout, re.M)
    assert len(results) >= 40, late.stdout[-3000:]
    gpu = [r for r in results if "(no CUDA GPU)" in r[2]]
    logic = [r for r in results if "(no CUDA GPU)" not in r[2]]
    assert gpu and all(r[1] == "SKIPPED" for r in gpu)
    assert logic and all(r[1] == "SKIPPED" for r in logic), logic  # the cpu_logic tests expect 5 s: not left
    assert all(re.match(r"\(deadline: \d s left before FUSEDCLIP_GPU_DEADLINE, this test expects \d+ s\)", r[2])
               for r in logic), logic


def test_gpu_conftest_reports_each_result_with_its_notes(tmp_path):
    """tests/gpu/conftest.py on a module of its own (copied with it): a test's notes printed under its result line;
    the result lines as -v writes them; with a deadline, a test expecting more time than is left skipped while one
    that fits runs; a test running past FUSEDCLIP_GPU_TEST_TIMEOUT has its stack dumped to the real stderr (not
    pytest's capture, which a killed run never shows; gpu_check.sh reads the dump); without a GPU, a test that is
    not cpu_logic skipped with the reason."""
    import shutil
    import torch
    shutil.copy(ROOT / "tests" / "gpu" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_notes.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.cpu_logic\n"
        "def test_measures(record_property):\n"
        "    record_property('note', 'copy 4000 GB/s')\n\n"
        "@pytest.mark.cpu_logic\n"
        "@pytest.mark.gpu_seconds(3600)\n"
        "def test_long():\n"
        "    raise AssertionError('must not start')\n\n"
        "def test_on_the_gpu():\n"
        "    assert torch_cuda_is_here()\n\n"
        "@pytest.mark.cpu_logic\n"
        "def test_slow():\n"
        "    import time\n"
        "    time.sleep(2.5)\n")
    out = _run_gpu_tests([str(tmp_path)], {"FUSEDCLIP_GPU_DEADLINE": str(time.time() + 60),
                                           "FUSEDCLIP_GPU_TEST_TIMEOUT": "1"}, cwd=tmp_path)
    assert re.search(r"most recent call first\):\n +File .*test_notes\.py\", line \d+ in test_slow", out.stderr), \
        out.stderr
    lines = out.stdout.splitlines()
    i = next(k for k, x in enumerate(lines) if x.startswith("test_notes.py::test_measures PASSED"))
    assert lines[i + 1] == "    > copy 4000 GB/s", lines[i:i + 2]
    assert re.search(r"^test_notes\.py::test_long SKIPPED \(deadline: \d+ s left before FUSEDCLIP_GPU_DEADLINE, "
                     r"this test expects 3600 s\)", out.stdout, re.M), out.stdout
    if not torch.cuda.is_available():
        assert re.search(r"^test_notes\.py::test_on_the_gpu SKIPPED \(no CUDA GPU\)", out.stdout, re.M), out.stdout


TRITON_MODULES = {alias: f"fusedclip.backends.triton.{name}" for alias, name in [
    ("tk", "kernels"), ("tlauncher", "launcher"), ("tclip", "clip"), ("tbackend", "backend"), ("tz", "zclip"),
    ("ta", "agc")]}


def missing_attributes(source):
    """The attributes `source` reads of fusedclip's Triton modules (tclip.X, tz.X, ...,
    getattr / hasattr(tlauncher, "X"))
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


GPU_SIDE = ["scripts/sanitize_clip.py", "scripts/triton_precompile.py", "tools/triton_static.py"] + \
    sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests" / "gpu").glob("*.py"))


@pytest.mark.parametrize("path", GPU_SIDE)
def test_gpu_side_code_uses_only_attributes_that_exist(path):
    """Every attribute the GPU checks (tests/gpu) and GPU-side scripts read of fusedclip's Triton modules exists: a
    renamed one makes a GPU check silently check nothing (issue 25, defect 9: the residency check read
    tb._per_sm, long gone)."""
    pytest.importorskip("triton")
    assert missing_attributes((ROOT / path).read_text()) == []


def test_the_old_residency_read_is_caught():
    pytest.importorskip("triton")
    old = 'used = max(getattr(tlauncher, "_per_sm", {}).values(), default=1)\nfit = tlauncher.resident_per_sm(1, 2)'
    assert missing_attributes(old) == ["tlauncher._per_sm"]


@pytest.mark.skipif(not _native_on_cpu(), reason="fusedclip's extension is not built")
def test_precompile_lists_the_variants_the_run_launches():
    """scripts/triton_precompile.py records, from the launchers, every variant a check run launches (one and
    two launches, every norm kind, the extras, ZClip, scale and clamp; AGC needs the GPU's SM count), without
    duplicates, the options the launchers try first ahead of the fallbacks."""
    pytest.importorskip("triton")
    from fusedclip.backends.triton import launcher as tlauncher
    if tlauncher.INTERPRET:
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
