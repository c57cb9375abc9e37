#!/usr/bin/env bash
# The whole GPU check in one run (see ../shared/GPU_CHECK.md). GPU time comes as one command of at most
# 10 minutes, so everything here works against one global deadline and reports as it goes:
#
#   scripts/gpu_check.sh [OUTDIR]             the real run (OUTDIR defaults to <repo>/gpu-results); timeout_s 590
#   scripts/gpu_check.sh --dry-run [OUTDIR]   this script's own logic on a machine without a GPU: nvidia-smi,
#                                             nvcc, compute-sanitizer and python are stand-ins that print what
#                                             they were asked and sleep / fail as told (tests/tooling/test_gpu_check_script.py)
#
# Steps (PLAN below): header, build (then the Triton variants compile in the background on the idle cores),
# info, smoke, sanitizer-memcheck, gpu-checks, bench, pytest, sanitizer-{racecheck,synccheck}: what only a GPU can
# tell and what has never run first. The checks are pytest modules in tests/gpu/ (they share fusedclip.testing's
# helpers with the rest of the suite; tests/gpu/conftest.py skips a test that would not end before the step's
# deadline, FUSEDCLIP_GPU_DEADLINE, and says so); the sanitizer's workload is scripts/sanitize_clip.py.
# Each step's limit is its cap clipped to the time left before
# the deadline (minus the kill grace, so even a step that ignores SIGTERM ends by the deadline); a step with less
# than GPU_CHECK_MIN_STEP seconds left is SKIPPED. Each step's row is appended to summary.txt the moment the
# step ends, so a run killed at any point still reports every step before it. A step killed at its limit says
# where (from the last Python traceback dumped before the limit: tests/gpu/conftest.py's, pytest's faulthandler
# timeout, the scripts'): "killed compiling" when that was a
# compiler, so compile time is not mistaken for a hang.
#
# What the run is to confirm or refute (from the compiled kernels; the bench's JSON holds them as targets with their
# ranges, bench/targets.py EXPECTED_GPU, and the smoke's bandwidth lines print them): native fused
# no-clip 85-100% of copy bandwidth; clip on sets larger than L2 moves
# 3N bytes as torch's does, so hold it to >= 90% of the 3N floor and never slower than torch (not 1.4x torch);
# clip_into_ (N bytes) and the zero-pass clip are the rows that beat torch by 3x; Triton one-launch is limited
# by 32 KB in flight per SM (expect 50-70% of copy), the two-launch variant 75-88%.
#
# Knobs (environment): GPU_CHECK_DEADLINE (s, default 540), GPU_CHECK_MIN_STEP (s, 10), GPU_CHECK_GRACE (s, 5),
# GPU_CHECK_CAP_SCALE (1: multiplies every step's cap; the tests shrink them), GPU_CHECK_TEST_TIMEOUT (s, 40: a
# GPU test running longer dumps its stacks), PYTHON (python3). Dry run only:
# GPU_CHECK_STANDIN_{SLEEP,RC,SAY}_<STEP> (STEP upper-cased, '-' -> '_'): what the stand-ins do in that step.
#
# The GPU machine's stack (Python 3.12, torch 2.11.0+cu130, Triton 3.6.0) is exercised here on every commit before
# any GPU run: `make test-compat` (scripts/compat_test.sh 2.11.0) builds the extension against that torch for sm_90
# with nvcc 13.0 and runs the CPU suite and the Triton interpreter suite on it, so an API break of that torch or
# Triton shows in CI, not in the one GPU run.
#
# At most 8 files land in OUTDIR, none deeper than OUTDIR/bench/:
#   summary.txt build.log smoke.txt bench.txt bench/{*.json,*.md} checks.txt tests.txt
# (smoke.txt, checks.txt, tests.txt: pytest -v, one line per result as it happens, measurements under it as
# "    > ..."; tests.txt also the sanitizers' output)
set -uo pipefail
export LC_ALL=C  # decimal points and sort order the same everywhere
ROOT=$(cd "$(dirname "$0")/.." && pwd)

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
# OUTDIR as given is relative to where the script was called from; the default is under the repository
if [ -n "${1:-}" ]; then OUT=$1; elif [ $DRY = 1 ]; then OUT=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-dry.XXXXXX"); else OUT=$ROOT/gpu-results; fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
SUMMARY=$OUT/summary.txt
# this script's files only: a rerun into the same folder starts clean
rm -f "$OUT"/{summary.txt,build.log,smoke.txt,bench.txt,checks.txt,tests.txt}
rm -rf "$OUT/bench"

to_ms() { awk -v s="$1" 'BEGIN { printf "%d", s * 1000 }'; }
sec() { local m=$1 sign=""; ((m < 0)) && { sign=-; m=$((-m)); }; printf '%s%d.%d' "$sign" $((m / 1000)) $((m % 1000 / 100)); }
now_ms() {  # bash 5's EPOCHREALTIME costs no fork; GNU date otherwise
  if [ -n "${EPOCHREALTIME:-}" ]; then local t=${EPOCHREALTIME//[!0-9]/}; echo $((10#$t / 1000)); else date +%s%3N; fi
}

DEADLINE_MS=$(to_ms "${GPU_CHECK_DEADLINE:-540}")
MIN_STEP_MS=$(to_ms "${GPU_CHECK_MIN_STEP:-10}")
GRACE_MS=$(to_ms "${GPU_CHECK_GRACE:-5}")
CAP_SCALE=${GPU_CHECK_CAP_SCALE:-1}
cap_ms() { awk -v c="$1" -v k="$CAP_SCALE" 'BEGIN { printf "%d", c * k * 1000 }'; }
T0=$(now_ms)

# ---- stand-ins for the dry run: every GPU-side program becomes one small script --------------------------
if [ $DRY = 1 ]; then
  FAKE=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-fakes.XXXXXX")
  trap 'rm -rf "$FAKE"' EXIT
  cat >"$FAKE/standin" <<'EOF'
#!/usr/bin/env bash
# gpu_check.sh --dry-run stand-in: say what was asked, then sleep / print / exit as the step's knobs say
key=$(printf '%s' "${GPU_CHECK_STEP:-none}" | tr 'a-z-' 'A-Z_')
echo "standin $(basename "$0") [step ${GPU_CHECK_STEP:-none}, limit ${STEP_LIMIT:-?}s; FUSEDCLIP_TRITON_LAUNCH=${FUSEDCLIP_TRITON_LAUNCH:-unset} PYTORCH_NO_CUDA_MEMORY_CACHING=${PYTORCH_NO_CUDA_MEMORY_CACHING:-unset} FUSEDCLIP_GPU_DEADLINE=${FUSEDCLIP_GPU_DEADLINE:-unset} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset} MAX_JOBS=${MAX_JOBS:-unset}] $*"
say=GPU_CHECK_STANDIN_SAY_$key; [ -n "${!say:-}" ] && printf '%b\n' "${!say}"
s=GPU_CHECK_STANDIN_SLEEP_$key; sleep "${!s:-0}"
r=GPU_CHECK_STANDIN_RC_$key; exit "${!r:-0}"
EOF
  chmod +x "$FAKE/standin"
  for t in python3 nvidia-smi nvcc compute-sanitizer ncu cuobjdump; do ln -s standin "$FAKE/$t"; done
  export PATH="$FAKE:$PATH"
  PY=$FAKE/python3
  : "${GPU_CHECK_STANDIN_SAY_SMOKE:=tests/gpu/test_smoke.py::test_triton_one_launch_first_launch PASSED (stand-in)}"
  export GPU_CHECK_STANDIN_SAY_SMOKE
else
  PY=$(command -v "${PYTHON:-python3}")  # a full path: compute-sanitizer is handed it as the program to run
fi

tool() {  # tool NAME: its path, on PATH or in the CUDA toolkit; fails if there is none
  command -v "$1" 2>/dev/null && return
  local d
  for d in "${CUDA_HOME:-}" /usr/local/cuda; do
    [ -n "$d" ] && [ -x "$d/bin/$1" ] && { echo "$d/bin/$1"; return; }
  done
  return 1
}
SANITIZER=$(tool compute-sanitizer)
export PY OUT ROOT SUMMARY SANITIZER
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # scripts/*.py import fusedclip also after an in-place build
export MAX_JOBS=${MAX_JOBS:-16}
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1  # offline machine: never wait on a network
BENCH_PROVIDERS=all
export BENCH_PROVIDERS

# ---- the steps: NAME CAP_S EXPECT_S LOG EXCERPT (lines of the step's output copied into the summary) ----------
# In order of what only a GPU can tell and what has never run: the smoke tests (the cooperative launch captured
# and replayed, the grid per kernel instantiation, bandwidth against a copy, the Triton one-launch kernel's first
# launch in a child with its own limit), a short memcheck of every kernel (native, then Triton: one sanitizer run
# per backend, AGC and ZClip included), the checks that need a GPU (CUDA-graph replay, two streams, no host sync,
# torch.compile, ZClip, AGC, the Triton kernels' residency and extras: tests/gpu/), the benchmark (its JSON
# rewritten after every set), parity at GPU sizes and the suite's other GPU tests, racecheck and synccheck last.
# EXPECT_S: the time each step is expected to take on an H200 (the top of the range measured or
# estimated: build 80-130 s, smoke 50-80, bench 85-100; the budget-driven steps use their whole cap). The
# plan must fit: the expected times plus the kill grace within the deadline (checked below, and by the dry run
# in CI, tests/tooling/test_gpu_check_script.py, with stand-ins that take exactly that long).
PYTEST_LINES='::.* (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)|^    > |[0-9]+ (passed|failed|errors?)\b'
PLAN=(
  "header 15 5 summary.txt -"
  "build 180 130 build.log -"
  "info 15 5 summary.txt -"
  "smoke 80 80 smoke.txt $PYTEST_LINES"
  "sanitizer-memcheck 40 40 tests.txt ERROR SUMMARY|^sanitize_clip:|^== sanitizer [a-z]+ "
  "gpu-checks 95 95 checks.txt $PYTEST_LINES"
  "bench 100 100 bench.txt ^wrote|CHECK FAILED|^fusedclip bench"
  "pytest 40 40 tests.txt (FAILED|ERROR)|[0-9]+ (passed|failed|errors?)"
  "sanitizer-racecheck 20 20 tests.txt ERROR SUMMARY|^sanitize_clip:|^== sanitizer [a-z]+ "
  "sanitizer-synccheck 20 20 tests.txt ERROR SUMMARY|^sanitize_clip:|^== sanitizer [a-z]+ "
)

do_header() {
  echo "fusedclip GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)," \
    "commit $(git rev-parse --short HEAD 2>/dev/null || echo '? (no .git)')" \
    "$([ -n "$(git status --porcelain 2>/dev/null)" ] && echo '(with uncommitted changes)')"
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv \
    || echo "nvidia-smi failed"
  "$PY" - <<'EOF' || echo "python3 failed"
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "triton", "setuptools", "numpy", "pytest", "ninja", "pybind11", "matplotlib"):
    try:
        print(f"{name:10s}", getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as e:  # a missing package is information, not a failure
        print(f"{name:10s} not importable ({type(e).__name__})")
import torch
print("torch CUDA", torch.version.cuda, "| GPU visible:", torch.cuda.is_available())
EOF
  nvcc --version 2>&1 | tail -2 || echo "nvcc missing"
  local t
  for t in nvcc compute-sanitizer ncu cuobjdump; do printf '%-18s %s\n' "$t" "$(tool "$t" || echo missing)"; done
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
}

do_build() {
  "$PY" -m pip install --no-build-isolation --no-deps -e . && return 0
  echo "== editable install failed; falling back to setup.py build_ext --inplace"
  "$PY" setup.py build_ext --inplace
}

stop_precompile() {  # stop_precompile WHEN: the background compile, if it still runs (its workers end with it)
  if [ -n "${PRECOMPILE_PID:-}" ] && kill -0 "$PRECOMPILE_PID" 2>/dev/null; then
    kill "$PRECOMPILE_PID" 2>/dev/null
    say "note: the background Triton compile was still running $1: stopped"
  fi
  PRECOMPILE_PID=
}

precompile() {  # the Triton variants the run launches, compiled into Triton's cache on the idle cores meanwhile
  "$PY" scripts/triton_precompile.py --jobs "${GPU_CHECK_PRECOMPILE_JOBS:-8}" >>"$OUT/build.log" 2>&1 &
  PRECOMPILE_PID=$!
  say "note: Triton variants compiling in the background (pid $PRECOMPILE_PID, ${GPU_CHECK_PRECOMPILE_JOBS:-8} jobs;" \
    "its lines in build.log)"
}

do_info() {
  "$PY" -m fusedclip info || return
  # info --kernels (registers, spills, blocks per SM of each kernel) is newer than some builds: optional
  if "$PY" -m fusedclip info --help 2>&1 | grep -q -- --kernels; then
    "$PY" -m fusedclip info --kernels >>"$OUT/build.log" 2>&1 && echo "info --kernels: in build.log" \
      || echo "info --kernels failed (rc=$?), see build.log"
  else
    echo "info --kernels: not in this version of fusedclip"
  fi
}

run_pytest() {  # run_pytest ARGS...: the GPU tests against the step's deadline (tests/gpu/conftest.py skips a test
  # that would not end before it, saying so), -v: one line per result as it happens, so a killed step keeps the
  # names of what passed and failed; a test running past FUSEDCLIP_GPU_TEST_TIMEOUT dumps its stacks (where it hangs)
  local deadline
  deadline=$(awk -v t="$(now_ms)" -v l="$STEP_LIMIT_MS" 'BEGIN { printf "%.3f", (t + l) / 1000 - 3 }')
  # COLUMNS: pytest writes to a file 80 columns wide, which cuts a skip's reason short on its -v line
  FUSEDCLIP_GPU_DEADLINE=$deadline FUSEDCLIP_GPU_TEST_TIMEOUT=${GPU_CHECK_TEST_TIMEOUT:-40} COLUMNS=250 \
    "$PY" -m pytest -v -ra -o console_output_style=classic -p no:cacheprovider "$@"
}

# the smoke tests: the native cooperative launch captured and replayed first, then tests/gpu/test_smoke.py
do_smoke() { run_pytest -m smoke tests/gpu/test_checks.py tests/gpu/test_smoke.py; }

do_bench() {
  # the sets that matter, every provider, short timings; the bench skips what would start after --max-minutes
  local minutes
  minutes=$(awk -v s="$STEP_LIMIT" 'BEGIN { printf "%.2f", (s > 60 ? s - 25 : s / 2) / 60 }')
  "$PY" -m fusedclip bench --device cuda --sets gpt2-small,mixed,many-small,llama-7b --providers "$BENCH_PROVIDERS" \
    --time 0.05 --rounds 1 --scaling none --compile-sets gpt2-small --zclip gpt2-small --no-plot --out "$OUT/bench" \
    --tag gpu-check --targets bench/targets.py \
    --max-minutes "$minutes"
}

# what only a GPU can tell, in this order: graph replay / two streams / no host sync, ZClip and AGC, the Triton
# kernels, torch.compile last (Inductor's compile time is the least predictable; the conftest skips and names what
# would not fit after it)
do_gpu_checks() {
  run_pytest -m "not smoke" tests/gpu/test_checks.py tests/gpu/test_adaptive.py tests/gpu/test_triton_gpu.py \
    tests/gpu/test_compile_gpu.py
}

# parity at GPU sizes, then the suite's other GPU tests (CI runs the rest on the CPU); faulthandler prints where
# a test outside tests/gpu hangs
do_pytest() { run_pytest -m gpu -o faulthandler_timeout=30 tests/gpu/test_parity.py tests/test_*.py; }

sanitize() {  # sanitize TOOL: one sanitizer run per backend (a Triton hang loses nothing of the native run), each
  # within its share of the step's limit (native half, Triton the rest), AGC and ZClip included (sanitize_clip.py);
  # the Triton run under racecheck and synccheck with the two-launch variant (no grid barrier spinning under it)
  [ -n "$SANITIZER" ] || { echo "compute-sanitizer not found"; return 3; }
  local tool=$1 rc=0 backend share left margin t0 r launch
  t0=$(now_ms)
  for backend in native triton; do
    left=$((STEP_LIMIT_MS - ($(now_ms) - t0)))
    margin=$((left / 10 < 1000 ? left / 10 : 1000))  # the lines below print before the step's own limit
    if [ $backend = native ]; then share=$((left / 2)); else share=$((left - margin)); fi
    if ((share < MIN_STEP_MS / 2)); then echo "== sanitizer $tool $backend: SKIPPED ($(sec "$left")s left)"; rc=3; continue; fi
    echo "== sanitizer $tool $backend: limit $(sec "$share")s"
    launch=${FUSEDCLIP_TRITON_LAUNCH:-}
    [ "$tool" != memcheck ] && [ $backend = triton ] && launch=two
    FUSEDCLIP_TRITON_LAUNCH=$launch STEP_LIMIT=$((share / 1000)) timeout --kill-after=1 "$(sec "$share")" \
      "$SANITIZER" --tool "$tool" --error-exitcode 9 --print-limit 20 "$PY" scripts/sanitize_clip.py cuda "$backend"
    r=$?
    echo "== sanitizer $tool $backend: rc=$r$( ((r == 124 || r == 137)) && echo " (killed at its limit)")"
    ((r != 0 && rc == 0)) && rc=$r
  done
  return $rc
}
do_sanitizer_memcheck() { PYTORCH_NO_CUDA_MEMORY_CACHING=1 sanitize memcheck; }
do_sanitizer_racecheck() { sanitize racecheck; }
do_sanitizer_synccheck() { sanitize synccheck; }
export -f do_header do_build do_info do_smoke do_bench do_gpu_checks do_pytest run_pytest sanitize tool \
  do_sanitizer_memcheck do_sanitizer_racecheck do_sanitizer_synccheck now_ms sec

say() { echo "$*" | tee -a "$SUMMARY"; }
NPASS=0 NBAD=0

row() {  # row NAME VERDICT ELAPSED_MS LIMIT_MS START_MS [EXTRA]: one line of the table, appended now
  say "$(printf '%-20s %-8s %7ss  limit %6ss  start %6ss%s' "$1" "$2" "$(sec "$3")" "$(sec "$4")" \
    "$(sec $(($5 - T0)))" "${6:+  $6}")"
}

killed_where() {  # killed_where LOG OFFSET: what a step killed at its limit was doing, from the last Python
  # traceback in its part of the log (faulthandler's, most recent call first; the scripts dump one before their
  # limit): "(killed compiling: <frame>)" when it was in a compiler (Triton's, torch.compile's, nvcc through
  # the build), so compile time is not taken for a hang; "(killed in <frame>)" otherwise
  local frame
  frame=$(tail -c +$(($2 + 1)) "$1" | awk '/most recent call first/ { getline; f = $0 } END { print f }' |
    sed -E 's/^ *File "([^"]*)", line ([0-9]+) in (.*)$/\1:\2 \3/')
  [ -n "$frame" ] || return 0
  if [[ $frame =~ triton/(compiler|backends|runtime/(jit|build))|torch/_inductor|torch/_dynamo|torch/utils/cpp_extension|triton_precompile ]]; then
    echo "(killed compiling: $frame)"
  else
    echo "(killed in $frame)"
  fi
}

step() {  # step NAME CAP_S LOG EXCERPT: run do_NAME within min(cap, time left), then its row
  local name=$1 cap_ms log=$OUT/$3 excerpt=$4
  cap_ms=$(cap_ms "$2")
  local start left limit rc verdict size end
  start=$(now_ms)
  left=$((T0 + DEADLINE_MS - start - GRACE_MS))
  limit=$((cap_ms < left ? cap_ms : left))
  if ((limit < MIN_STEP_MS)); then
    row "$name" SKIPPED 0 $((limit > 0 ? limit : 0)) "$start" "(under $(sec "$MIN_STEP_MS")s left)"
    NBAD=$((NBAD + 1))
    return
  fi
  size=$(stat -c %s "$log" 2>/dev/null || echo 0)
  [ "$log" = "$SUMMARY" ] || echo "== $name: limit $(sec "$limit")s" >>"$log"
  echo "-- $name (limit $(sec "$limit")s) ..."
  GPU_CHECK_STEP=$name STEP_LIMIT=$((limit / 1000)) STEP_LIMIT_MS=$limit MIN_STEP_MS=$MIN_STEP_MS \
    timeout --kill-after="$(sec "$GRACE_MS")" "$(sec "$limit")" bash -c "do_${name//-/_}" >>"$log" 2>&1
  rc=$?
  end=$(now_ms)
  case $rc in
    0) verdict=PASS; NPASS=$((NPASS + 1)) ;;
    124 | 137) verdict=TIMEOUT; NBAD=$((NBAD + 1)) ;;
    *) verdict=FAIL; NBAD=$((NBAD + 1)) ;;
  esac
  local why=""
  [ $verdict = FAIL ] && why="rc=$rc"
  [ $verdict = TIMEOUT ] && why=$(killed_where "$log" "$size")
  [ "$log" = "$SUMMARY" ] || echo "== $name: $verdict (rc=$rc)${why:+ $why}" >>"$log"
  row "$name" "$verdict" $((end - start)) "$limit" "$start" "$why"
  if [ "$excerpt" != - ]; then  # the step's own lines that say the most, from its part of a shared log
    tail -c +$((size + 1)) "$log" | grep -aE "$excerpt" | head -40 | sed 's/^/    > /' | tee -a "$SUMMARY"
  fi
}

# ---- the run --------------------------------------------------------------------------------------------------
CAPS_MS=0 EXPECT_MS=0
say "plan: deadline $(sec "$DEADLINE_MS")s, a step needs $(sec "$MIN_STEP_MS")s left, kill grace $(sec "$GRACE_MS")s$(
  [ $DRY = 1 ] && echo ", DRY RUN with stand-ins")"
for s in "${PLAN[@]}"; do
  read -r name cap expect log _ <<<"$s"
  CAPS_MS=$((CAPS_MS + $(cap_ms "$cap")))
  EXPECT_MS=$((EXPECT_MS + $(cap_ms "$expect")))
  say "$(printf '  %-20s cap %6ss  expect %6ss  ends by %6ss  -> %s' "$name" "$(sec "$(cap_ms "$cap")")" \
    "$(sec "$(cap_ms "$expect")")" "$(sec "$EXPECT_MS")" "$log")"
done
say "  caps add up to $(sec "$CAPS_MS")s; each step's limit is its cap clipped to the time left (less the kill" \
  "grace), so the run ends by the deadline whatever hangs"
if ((EXPECT_MS + GRACE_MS <= DEADLINE_MS)); then
  say "  expected on an H200: $(sec "$EXPECT_MS")s + $(sec "$GRACE_MS")s grace <= $(sec "$DEADLINE_MS")s: every step" \
    "runs, sanitizers included"
else
  say "  PLAN DOES NOT FIT: expected $(sec "$EXPECT_MS")s + $(sec "$GRACE_MS")s grace > $(sec "$DEADLINE_MS")s"
fi
say "rows: step verdict elapsed limit start(since script start)"

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-}
if [ -z "$TORCH_CUDA_ARCH_LIST" ]; then  # build only for the card in hand
  ARCH=$(GPU_CHECK_STEP=arch timeout 10 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)
  if ! [[ $ARCH =~ ^[0-9]+\.[0-9]+$ ]]; then
    ARCH=9.0
    say "note: compute capability not read from nvidia-smi; building for $ARCH (H100/H200)"
  fi
  TORCH_CUDA_ARCH_LIST=$ARCH
fi

for s in "${PLAN[@]}"; do
  read -r name cap _ log excerpt <<<"$s"
  # the bench times launch-bound sets: no compiling beside it
  [ "$name" = bench ] && stop_precompile "before the bench"
  step "$name" "$cap" "$log" "$excerpt"
  [ "$name" = build ] && precompile
  if [ "$name" = smoke ] && [ -f "$OUT/smoke.txt" ] \
    && ! grep -qaE '::test_triton_one_launch_first_launch (PASSED|SKIPPED \(the triton backend is not available)' \
      "$OUT/smoke.txt"; then
    # the one-launch Triton kernel did not pass its guarded first launch (failed, timed out, or not reached before
    # the step's deadline): do not let it hang what follows
    export FUSEDCLIP_TRITON_LAUNCH=two
    BENCH_PROVIDERS=torch,torch-loop,compile,native,triton-2,apex
    say "note: Triton one-launch did not pass in smoke: the rest of the run uses FUSEDCLIP_TRITON_LAUNCH=two" \
      "and the bench leaves out provider 'triton'"
  fi
done

stop_precompile "at the end"
say "total $(sec $(($(now_ms) - T0)))s: $NPASS passed, $NBAD not (deadline $(sec "$DEADLINE_MS")s); files in $OUT"
[ $NBAD = 0 ]
