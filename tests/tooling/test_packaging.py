"""The package as a newcomer meets it: the sdist and the wheel built from it install and run from any directory,
an isolated build stops with a message naming --no-build-isolation, and a fusedclip whose compiled module cannot
load says so at import (and backend="native" raises) instead of quietly running torch's clip."""
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(cmd, cwd, env=None, timeout=900):
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdist")
    r = run([sys.executable, "setup.py", "-q", "sdist", "-d", str(out)], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    (path,) = out.glob("fusedclip-*.tar.gz")
    return path


def test_sdist_has_what_the_build_and_the_tests_need(sdist):
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    need = {"setup.py", "pyproject.toml", "CMakeLists.txt", "LICENSE", "README.md", "tools/build_config.py",
            "csrc/common/clip_math.h", "csrc/common/grad_table.h", "csrc/cuda/clip_cuda.cu", "csrc/cpu/clip_cpu.cpp", "tests/conftest.py",
            "bench/README.md", "docs/usage.md", "examples/train_lstm.py", "fusedclip/__init__.py"}
    assert need <= names, sorted(need - names)
    assert not any(n.endswith(".so") or n == "fusedclip/_build_info.py" for n in names)


def test_wheel_from_the_sdist_installs_and_runs_from_any_directory(sdist, tmp_path):
    # CPU kernels only, to keep the build short: the CUDA build is `make build`'s (and the same setup.py).
    env = dict(os.environ, FUSEDCLIP_CUDA="0", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    wheels = tmp_path / "wheels"
    r = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", str(wheels),
             str(sdist)], cwd=str(tmp_path), env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (wheel,) = wheels.glob("fusedclip-*.whl")
    site = tmp_path / "site"
    r = run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
            cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site))
    r = run([sys.executable, "-W", "error::RuntimeWarning", "-m", "fusedclip", "info"], cwd=str(elsewhere), env=env)
    assert r.returncode == 0, r.stderr
    assert f"extension loaded, built against torch {torch.__version__}" in r.stdout, r.stdout
    assert "backends for cpu: ['native'" in r.stdout
    r = run([sys.executable, "-c", "import fusedclip, torch; p = torch.nn.Parameter(torch.ones(3)); "
             "p.grad = torch.full((3,), 2.0); print(fusedclip.__file__, float(fusedclip.clip_([p], 1.0, "
             "backend='native')))"], cwd=str(elsewhere), env=env)
    assert r.returncode == 0, r.stderr
    where, norm = r.stdout.split()
    assert where.startswith(str(site)) and abs(float(norm) - 12 ** 0.5) < 1e-6


def test_isolated_build_stops_and_names_the_flag(tmp_path):
    # What setup.py sees in pip's isolated build environment: a second torch under pip-build-env-*.
    fake = tmp_path / "pip-build-env-abc" / "site-packages" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '9.9.9'\nversion = type('v', (), {'cuda': None})\n")
    env = dict(os.environ, PYTHONPATH=str(fake.parent))
    r = run([sys.executable, "setup.py", "build_ext"], cwd=ROOT, env=env)
    assert r.returncode != 0
    assert "isolated" in r.stderr and "--no-build-isolation" in r.stderr and "9.9.9" in r.stderr, r.stderr
    # and without torch at all (pip's isolated environment installs only setuptools and wheel)
    (fake / "__init__.py").write_text("raise ImportError('no torch here')\n")
    r = run([sys.executable, "setup.py", "build_ext"], cwd=ROOT, env=env)
    assert r.returncode != 0 and "--no-build-isolation" in r.stderr, r.stderr


def package_copy(tmp_path, source_checkout, built_for=None):
    """fusedclip's Python files without the compiled module, as a source folder or an installed package."""
    root = tmp_path / "copy"
    shutil.copytree(os.path.join(ROOT, "fusedclip"), root / "fusedclip",
                    ignore=shutil.ignore_patterns("_C*.so", "_build_info.py", "__pycache__"))
    if source_checkout:
        shutil.copy(os.path.join(ROOT, "setup.py"), root)
        (root / "csrc").mkdir()
    if built_for:
        (root / "fusedclip" / "_build_info.py").write_text(f"TORCH_VERSION = {built_for!r}\n")
    return root


CHECK = """
import sys, warnings, torch
# This checkout's own editable install maps fusedclip._C to its built module whatever the path says: drop it.
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", repr(f))]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fusedclip
msgs = [str(w.message) for w in caught if type(w.message).__name__ == "ExtensionNotLoadedWarning"]
assert len(msgs) == 1, [str(w.message) for w in caught]
print(msgs[0])
p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.full((3,), 2.0)
try:
    fusedclip.clip_([p], 1.0, backend="native")
except RuntimeError as e:
    print("native raises:", e)
else:
    raise SystemExit("backend='native' ran without its extension")
assert torch.equal(p.grad, torch.full((3,), 2.0))
"""


@pytest.mark.parametrize("case", ["source-folder", "other-torch"])
def test_a_fusedclip_without_its_kernels_says_so(tmp_path, case):
    root = package_copy(tmp_path, source_checkout=case == "source-folder",
                        built_for="2.0.0+cu118" if case == "other-torch" else None)
    r = run([sys.executable, "-c", CHECK], cwd=str(root), env=dict(os.environ, PYTHONPATH=str(root)))
    assert r.returncode == 0, r.stdout + r.stderr
    warning, raised = r.stdout.splitlines()[:2]
    assert warning.startswith("fusedclip's compiled kernels did not load, so backend='auto' runs torch's own clip")
    if case == "source-folder":
        assert "source folder" in warning and "pip install --no-build-isolation -e ." in warning
    else:
        assert f"built for torch 2.0.0+cu118 but this is torch {torch.__version__}" in warning
        assert "--no-build-isolation --force-reinstall" in warning
    assert raised.startswith("native raises:") and "did not load" in raised


def _documented(name, obj, has_args):
    """What name's docstring lacks of Args/Returns (an API page is generated from them)."""
    import inspect
    doc = inspect.getdoc(obj) or ""
    missing = []
    if has_args and "Args:" not in doc:
        missing.append(f"{name}: no Args")
    if not inspect.isclass(obj) and "Returns:" not in doc:
        missing.append(f"{name}: no Returns")
    return missing


def test_every_public_function_and_method_has_args_and_returns():
    """Every name in fusedclip.__all__ and every public method of its classes says its arguments (when it takes
    any) and what it returns, in the Args:/Returns: form an API page is generated from."""
    import inspect

    import fusedclip
    missing = []
    for name in fusedclip.__all__:
        obj = getattr(fusedclip, name)
        if inspect.isclass(obj):
            init_params = list(inspect.signature(obj.__init__).parameters)[1:]
            missing += _documented(name, obj, bool(init_params))
            for mname, member in vars(obj).items():
                if mname.startswith("_") or not inspect.isfunction(member):
                    continue
                fn = inspect.unwrap(member)
                params = [q for q in inspect.signature(fn).parameters if q != "self"]
                missing += _documented(f"{name}.{mname}", member, bool(params))
        else:
            missing += _documented(name, obj, bool(inspect.signature(obj).parameters))
    assert missing == [], missing
