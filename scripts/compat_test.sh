#!/usr/bin/env bash
# One leg of the compatibility matrix: build fusedclip against another torch and run the suite on it.
#
#   scripts/compat_test.sh 2.6.0     torch 2.6.0 (the PyTorch 2.6 image's; Triton 3.2), CPU-only build
#   scripts/compat_test.sh 2.11.0    torch 2.11.0 + Triton 3.6.0 (the GPU machine's), CUDA build for sm_90
#
# Each leg has a venv and a copy of the source tree of its own under .compat/torch-VERSION/ (git-ignored), so
# its build never touches the in-place module of the default .venv (`make test`); the copy is refreshed from
# the working tree on every run and ninja rebuilds only what changed. pip's download cache makes a rerun cheap.
# Extra pytest arguments: COMPAT_PYTEST_ARGS.
set -euo pipefail
VERSION=${1:?usage: scripts/compat_test.sh TORCH_VERSION}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LEG=$ROOT/.compat/torch-$VERSION
MAX_JOBS=${MAX_JOBS:-2}

case "$VERSION" in
  # The oldest supported torch on the oldest supported Python.
  2.6.0)  PYVER=3.10; EXTRA="";              BUILD_ENV=(FUSEDCLIP_CUDA=0) ;;
  # Exactly the GPU machine's stack (Python 3.12 too). nvcc 13 here builds the extension it would load, for its
  # H200 (sm_90), so a header or API break of that torch shows here before a GPU run.
  2.11.0) PYVER=3.12; EXTRA="triton==3.6.0"; BUILD_ENV=(FUSEDCLIP_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0) ;;
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
# folder every run. The tests import the package from here (cwd); tests/test_packaging.py checks pip's build.
env "${BUILD_ENV[@]}" MAX_JOBS="$MAX_JOBS" "$LEG/venv/bin/python" setup.py -q build_ext --inplace
"$LEG/venv/bin/python" -m fusedclip info
# -p no:cacheprovider: the copy is rewritten by each run; nothing to keep between them.
"$LEG/venv/bin/python" -m pytest -q -ra -p no:cacheprovider tests ${COMPAT_PYTEST_ARGS:-}
