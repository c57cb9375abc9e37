#!/usr/bin/env bash
# make test-sanitize: the CPU extension built with AddressSanitizer and UndefinedBehaviorSanitizer
# (FUSEDCLIP_SANITIZE=1, tools/build_config.py), then the CPU tests that exercise its C++ run against it.
# Fails on any sanitizer report (each one aborts the process that hit it) or any test failure.
#
#   scripts/test_sanitize.sh PYTHON [pytest arguments; default: the selection below]
#
# The build is in a copy of the tree (build-sanitize/tree, git-ignored), so the
# normal in-place module (fusedclip/_C*.so) is never replaced, and the tests' child processes (tests/test_threads.py)
# import the sanitized one too. The copy keeps the sources' times, so a second run rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:?usage: scripts/test_sanitize.sh PYTHON [pytest args]}
PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")  # absolute, the venv's link not resolved
shift
TREE=build-sanitize/tree
START=$(date +%s)

mkdir -p "$TREE"
rm -rf "$TREE/fusedclip" "$TREE/tests"  # files deleted here must not linger there (the .so is rebuilt if need be)
cp -a csrc fusedclip scripts tools tests examples setup.py pyproject.toml README.md LICENSE MANIFEST.in "$TREE"/
rm -f "$TREE"/fusedclip/_C*.so "$TREE"/fusedclip/_build_info.py
(cd "$TREE" && FUSEDCLIP_SANITIZE=1 FUSEDCLIP_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" "$PYTHON" setup.py -q build_ext --inplace)
BUILT=$(date +%s)

# The sanitizer runtimes must be loaded before anything else in the process: Python and torch are not built with
# them, so they come in through LD_PRELOAD (gcc's, the compiler that built the module).
ASAN_LIB=$(gcc -print-file-name=libasan.so)
UBSAN_LIB=$(gcc -print-file-name=libubsan.so)
for lib in "$ASAN_LIB" "$UBSAN_LIB"; do
  [ -e "$lib" ] || { echo "test-sanitize: gcc has no $lib (install gcc's libasan and libubsan)" >&2; exit 2; }
done
export LD_PRELOAD="$ASAN_LIB $UBSAN_LIB"
# detect_leaks=0: CPython and torch keep objects alive until exit on purpose (interned strings, the operator
#   registry, static caches); LeakSanitizer would report thousands of those and none of ours.
# abort_on_error=1: a report ends the process with SIGABRT (a core-like death pytest cannot swallow; the children
#   of tests/test_threads.py report it as a signal, with the report on their stderr).
# halt_on_error=1: stop at the first report (ASan's default, made explicit).
# print_summary=1, symbolize=1: the one-line summary and source lines (gcc's runtime uses addr2line/llvm-symbolizer
#   when on PATH, else raw addresses, still with the module's offsets).
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:print_summary=1:symbolize=1"
# halt_on_error=1: UBSan stops at its first report too (the module is also built with -fno-sanitize-recover).
# print_stacktrace=1: where it happened.
export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1"
# Python objects from malloc, not from pymalloc's arenas: ASan then sees a freed tensor object read after its free.
export PYTHONMALLOC=malloc
# The threads of tests/test_threads.py race for a few seconds a case; under ASan every call is slower, so a bit more.
export FUSEDCLIP_RACE_SECONDS="${FUSEDCLIP_RACE_SECONDS:-4}"

if [ $# -eq 0 ]; then
  # The CPU tests that run the C++ (the native backend, and DTensors read in C++ in test_threads.py; the Triton
  # cases need its interpreter, a process of their own: make test-triton-interpret; and the slow 2**31-element
  # test is GBs of shadow memory: both left to `make test`; so is Inductor compiling a model, a compiler run per case).
  set -- -m "not slow" -k "not triton and not compiled_model" \
    tests/test_clip.py tests/test_fast_path.py tests/test_fused_extras.py tests/test_zclip_fused.py \
    tests/test_agc.py tests/test_adagc.py tests/test_in_backward.py tests/test_threads.py
fi
(cd "$TREE" && "$PYTHON" -c "import fusedclip, os; assert fusedclip._ext.LOADED, 'the sanitized module did not load'; \
  assert os.path.realpath(fusedclip.__file__).startswith(os.path.realpath('.')), fusedclip.__file__" &&
  "$PYTHON" -m pytest -q -p no:cacheprovider "$@")
END=$(date +%s)
echo "test-sanitize: passed, no sanitizer report (build $((BUILT - START)) s, tests $((END - BUILT)) s)"
