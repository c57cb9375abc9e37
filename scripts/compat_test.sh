#!/usr/bin/env bash
# One leg of the compatibility matrix: build fusedclip against another torch and run the suite on it.
#
#   scripts/compat_test.sh 2.6.0     torch 2.6.0 (the PyTorch 2.6 image's; Triton 3.2), CPU-only build
#   scripts/compat_test.sh 2.11.0    torch 2.11.0 + Triton 3.6.0 (the GPU machine's), CUDA build for sm_90
#   scripts/compat_test.sh --venv-only VERSION   only the leg's venv (CI makes them while the default build
#                                                compiles: a download, not CPU work)
#
# Each leg has a venv and a copy of the source tree of its own under .compat/torch-VERSION/ (git-ignored), so
# its build never touches the in-place module of the default .venv (`make test`); the copy is refreshed from
# the working tree on every run and ninja rebuilds only what changed. pip's download cache makes a rerun cheap.
# COMPAT_PYTEST_ARGS: pytest arguments instead of the leg's selection (below), e.g. "tests" for the whole suite.
set -euo pipefail
VENV_ONLY=0
if [ "${1:-}" = "--venv-only" ]; then VENV_ONLY=1; shift; fi
VERSION=${1:?usage: scripts/compat_test.sh [--venv-only] TORCH_VERSION}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LEG=$ROOT/.compat/torch-$VERSION
JOBS=${MAX_JOBS:-2}
unset MAX_JOBS  # the build's only: the tests see the environment `make test` gives them

# What each leg runs (the whole suite runs on the default torch, `make test`; CI's time allows these here): every
# public entry point (clip_, get_total_norm, clip_grads_with_norm_, clip_value_, per-tensor norms, unscale_clip_,
# clip_into_, ZClip, clip_agc_, the sharded paths on Gloo, torch.compile, the fast path) on the native backend,
# and then, in a pytest process of its own under TRITON_INTERPRET=1, the Triton backend in its interpreter (the
# selection of `make test-triton-interpret`: the Makefile's TRITON_TESTS, -k triton). Left to `make test`: packaging and the CMake build,
# the benchmark harness, the GPU check's dry run, the frameworks' integrations, examples, properties.
API_TESTS="tests/test_clip.py tests/test_fast_path.py tests/test_fused_extras.py tests/test_compile.py
  tests/test_zclip.py tests/test_zclip_fused.py tests/test_agc.py tests/test_distributed.py tests/test_triton.py
  tests/test_accuracy.py"
case "$VERSION" in
  # The oldest supported torch on the oldest supported Python: the PyTorch 2.6 image's torch (a CUDA 12.4 build;
  # nvcc 13 here cannot build against it, so the extension is CPU-only, as FUSEDCLIP_CUDA=0 makes it).
  2.6.0)  PYVER=3.10; EXTRA=""; BUILD_ENV=(FUSEDCLIP_CUDA=0)
          TESTS="$API_TESTS tests/test_patch.py" ;;
  # Exactly the GPU machine's stack (Python 3.12 too). nvcc 13 here builds the extension it would load, for its
  # H200 (sm_90), so a header or API break of that torch shows here before a GPU run; the built kernels'
  # resources are read from it ((tests/tooling/test_kernel_info.py)). numpy < 2.4: Triton 3.6's interpreter turns 1-element
  # arrays into Python ints (range(tl.program_id(0), ...)): deprecated since NumPy 1.25, an error from 2.4 on.
  2.11.0) PYVER=3.12; EXTRA="triton==3.6.0 numpy<2.4"; BUILD_ENV=(FUSEDCLIP_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0)
          TESTS="$API_TESTS tests/tooling/test_kernel_info.py" ;;
  *) echo "compat_test.sh: no leg for torch $VERSION (2.6.0, 2.11.0)" >&2; exit 2 ;;
esac
# pyenv's interpreters first: its shims on PATH answer only for the globally selected versions.
PY=""
for cand in "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/"$PYVER".*/bin/"python$PYVER" \
            "$(command -v "python$PYVER" || true)"; do
  if [ -x "$cand" ] && "$cand" -c "import venv" 2>/dev/null; then PY=$cand; break; fi
done
[ -n "$PY" ] || { echo "compat_test.sh: the torch $VERSION leg needs python$PYVER (pyenv install $PYVER)" >&2; exit 2; }

WANT="python$PYVER torch==$VERSION $EXTRA"
if [ "$(cat "$LEG/venv/.installed" 2>/dev/null)" != "$WANT" ]; then
  rm -rf "$LEG/venv"
  "$PY" -m venv "$LEG/venv"
  "$LEG/venv/bin/python" -m pip install -q --upgrade pip "setuptools<82" wheel
  "$LEG/venv/bin/python" -m pip install -q "torch==$VERSION" $EXTRA numpy pytest expecttest hypothesis ninja
  "$LEG/venv/bin/python" -m pip install -q --no-deps "zclip==1.0.0"  # tests/test_zclip.py compares with it
  echo "$WANT" > "$LEG/venv/.installed"
fi
[ "$VENV_ONLY" = 0 ] || exit 0

# The tracked and the new (not ignored) files of the working tree, as CI's clean clone has them.
# Changed files are copied (with a new mtime, so ninja sees them); files gone from the tree are removed.
"$PY" - "$ROOT" "$LEG" <<'PYEOF'
import filecmp, os, shutil, subprocess, sys
root, leg = sys.argv[1], sys.argv[2]
out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                     check=True, capture_output=True).stdout.decode()
files = [f for f in out.split("\0") if f and os.path.isfile(os.path.join(root, f))]
manifest = os.path.join(leg, "manifest")
old = set(open(manifest).read().split("\0")) if os.path.exists(manifest) else set()
for f in old - set(files) - {""}:
    if os.path.exists(os.path.join(leg, "src", f)):
        os.remove(os.path.join(leg, "src", f))
for f in files:
    src, dst = os.path.join(root, f), os.path.join(leg, "src", f)
    if not (os.path.exists(dst) and filecmp.cmp(src, dst, shallow=False)):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy(src, dst)
with open(manifest, "w") as m:
    m.write("\0".join(files))
PYEOF

cd "$LEG/src"
# In place, with setup.py's build/ kept: pip's editable install would recompile everything in a fresh temporary
# folder every run. The tests import the package from here (cwd); tests/tooling/test_packaging.py checks pip's build.
env "${BUILD_ENV[@]}" MAX_JOBS="$JOBS" "$LEG/venv/bin/python" setup.py -q build_ext --inplace
"$LEG/venv/bin/python" -m fusedclip info
# The build switches stay set, as in the shell of a user who built this way (the CMake test builds alike);
# PYTHONPATH: the examples and other child processes import this copy's package too.
# -p no:cacheprovider: the copy is rewritten by each run; nothing to keep between them.
env "${BUILD_ENV[@]}" PYTHONPATH="$LEG/src" \
  "$LEG/venv/bin/python" -m pytest -q -ra -p no:cacheprovider ${COMPAT_PYTEST_ARGS:-$TESTS}
if [ -z "${COMPAT_PYTEST_ARGS:-}" ]; then
  # Triton 3.2's and 3.6's interpreters turn 1-element arrays into ints, which NumPy >= 1.25 deprecates: ~48,000
  # copies of that one warning per leg (the numpy pin above keeps it a warning), filtered by its text only.
  env "${BUILD_ENV[@]}" PYTHONPATH="$LEG/src" TRITON_INTERPRET=1 \
    "$LEG/venv/bin/python" -m pytest -q -ra -p no:cacheprovider -k triton \
    -W "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning" \
    $(make -s --no-print-directory -C "$LEG/src" print-TRITON_TESTS)
fi
