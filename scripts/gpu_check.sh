#!/usr/bin/env bash
# The whole GPU check in one go (see ../shared/GPU_CHECK.md): build, tests, compute-sanitizer,
# CUDA graphs / torch.compile / streams / stress, the Triton GPU check, the benchmark.
#
#   scripts/gpu_check.sh [OUTDIR]        (OUTDIR defaults to ./gpu-results)
#
# Uses the machine's python3 as it is (no downloads). Each step has a time limit; the whole run is
# sized to finish well inside 8 minutes. At most 8 files land in OUTDIR:
#   summary.txt build.log pytest.txt sanitizer.txt checks.txt bench/{*.json,*.md,*.png}
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-./gpu-results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16}
SUMMARY="$OUT/summary.txt"
T0=$(date +%s)
declare -a ROWS

step() {  # step NAME LIMIT_S LOG CMD... : run with a time limit, append the outcome to the table
  local name=$1 limit=$2 log=$3; shift 3
  local t=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  local verdict=PASS
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && verdict="TIMEOUT(${limit}s)"
  [ $rc -ne 0 ] && [ "$verdict" = PASS ] && verdict="FAIL(rc=$rc)"
  ROWS+=("$(printf '%-22s %-16s %4ss' "$name" "$verdict" $(( $(date +%s) - t )))")
  echo "== $name: $verdict" | tee -a "$log"
  return $rc
}

{
  echo "fusedclip GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi -L
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  $PY -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton not importable"
  nvcc --version | tail -2
} >"$SUMMARY" 2>&1
cat "$SUMMARY"

# 2. build in place for the card in hand
ARCH=$($PY -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}.{b}')")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
step build 300 "$OUT/build.log" $PY -m pip install --no-build-isolation --no-deps -e . || {
  tail -40 "$OUT/build.log"; printf '%s\n' "${ROWS[@]}" | tee -a "$SUMMARY"; exit 1; }
$PY -m fusedclip info | tee -a "$SUMMARY"

# 3. the test suite on the GPU (the CMake build test is skipped: CPU-side, proven by CI)
step pytest 240 "$OUT/pytest.txt" $PY -m pytest -q -ra -k "not cmake" tests

# 4. compute-sanitizer over every backend
for tool in memcheck racecheck synccheck; do
  step "sanitizer-$tool" 120 "$OUT/sanitizer.txt" compute-sanitizer --tool "$tool" --error-exitcode 9 \
    $PY scripts/sanitize_clip.py cuda
done

# 5. graphs, compile, streams, stress; then the Triton one-launch check (deadlock guard inside)
step gpu-checks 240 "$OUT/checks.txt" $PY scripts/gpu_checks.py --device cuda
if [ -f scripts/triton_gpu_check.py ]; then
  step triton-gpu-check 180 "$OUT/checks.txt" $PY scripts/triton_gpu_check.py
fi

# 6. the benchmark, in the time that is left (the whole script stays under ~8 minutes)
LEFT=$(( 470 - ($(date +%s) - T0) ))
if [ $LEFT -gt 60 ]; then
  mkdir -p "$OUT/bench"
  step bench $LEFT "$OUT/checks.txt" $PY -m fusedclip bench --device cuda --out "$OUT/bench" \
    --max-minutes "$(python3 -c "print(round(($LEFT - 40) / 60, 1))")"
else
  ROWS+=("bench                  SKIPPED (no time left)")
fi

# 7. the table, last
{
  echo
  grep -h "ERROR SUMMARY" "$OUT/sanitizer.txt" | sed 's/^/sanitizer: /'
  grep -E "[0-9]+ (passed|failed)" "$OUT/pytest.txt" | tail -1 | sed 's/^/pytest: /'
  grep -h "gpu_checks:\|triton_gpu_check" "$OUT/checks.txt" | tail -3
  echo
  printf '%s\n' "${ROWS[@]}"
  echo "total $(( $(date +%s) - T0 ))s"
} | tee -a "$SUMMARY"
