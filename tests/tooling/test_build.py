"""The build: `python -m fusedclip info`, and the CMake build of the same module."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_info_runs():
    out = subprocess.run([sys.executable, "-m", "fusedclip", "info"], capture_output=True, text=True, check=True).stdout
    assert "extension loaded" in out and "backends for cpu: ['native'" in out


def test_cmake_builds_the_same_module(tmp_path):
    """CMakeLists.txt builds csrc/ into an importable fusedclip._C that registers the same operators."""
    cmake = shutil.which("cmake", path=os.path.dirname(sys.executable)) or shutil.which("cmake")
    ninja = shutil.which("ninja", path=os.path.dirname(sys.executable)) or shutil.which("ninja")
    if cmake is None:
        pytest.fail("cmake not found: `make setup` installs it into the venv")
    build = tmp_path / "build"
    # one architecture is enough to prove the CMake path (setup.py's build covers the full default list)
    env = dict(os.environ)
    if torch.version.cuda and "TORCH_CUDA_ARCH_LIST" not in env and not torch.cuda.is_available():
        env["TORCH_CUDA_ARCH_LIST"] = "9.0"
    gen = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
    for cmd in ([cmake, "-S", ROOT, "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}", *gen],
                [cmake, "--build", str(build), "-j", os.environ.get("MAX_JOBS", "2")]):
        run = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    built = list((build / "fusedclip").glob("_C*.so"))
    assert len(built) == 1
    # a copy of the package with the CMake-built module in place of the setup.py one
    pkg = tmp_path / "pkg" / "fusedclip"
    shutil.copytree(os.path.join(ROOT, "fusedclip"), pkg, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    shutil.copy(built[0], pkg)
    check = "\n".join([
        "import torch, fusedclip",
        "assert fusedclip._ext.LOADED, fusedclip._ext.LOAD_ERROR",
        "print(fusedclip._ext.build_info())",
        "params = [torch.nn.Parameter(torch.zeros(1000)), torch.nn.Parameter(torch.zeros(33, dtype=torch.float64))]",
        "for p in params: p.grad = torch.randn_like(p)",
        "ref = torch.cat([p.grad.double().flatten() for p in params]).norm()",
        "n = fusedclip.clip_(params, 1.0, backend='native')",
        "assert abs(float(n) - float(ref)) < 1e-9 * float(ref), (n, ref)",
        "assert abs(float(torch.cat([p.grad.double().flatten() for p in params]).norm()) - 1.0) < 1e-5",
        "print('ok', fusedclip.__file__)",
    ])
    out = subprocess.run([sys.executable, "-c", check], cwd=str(tmp_path / "pkg"), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout and str(tmp_path) in out.stdout
    info = eval(out.stdout.splitlines()[0])
    assert info["cuda"] == (torch.version.cuda is not None and os.environ.get("FUSEDCLIP_CUDA") != "0")


def test_cmake_configures_with_the_oldest_declared_version(tmp_path):
    """CMakeLists.txt's cmake_minimum_required is a version it really works with (generation included, where
    a CMake that does not know a language dialect's flags fails)."""
    import re

    with open(os.path.join(ROOT, "CMakeLists.txt")) as f:
        declared = re.search(r"cmake_minimum_required\(VERSION ([\d.]+)\)", f.read()).group(1)
    cmake = os.path.join(os.path.dirname(os.path.dirname(sys.executable)), "cmake-min", "cmake", "data", "bin", "cmake")
    assert os.path.exists(cmake), "`make setup` installs the oldest declared CMake into .venv/cmake-min"
    env = dict(os.environ, PYTHONPATH="")
    version = subprocess.run([cmake, "--version"], capture_output=True, text=True, env=env).stdout.split()[2]
    assert version.split(".")[:2] == declared.split(".")[:2], (version, declared)
    ninja = shutil.which("ninja", path=os.path.dirname(sys.executable)) or shutil.which("ninja")
    gen = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
    run = subprocess.run([cmake, "-S", ROOT, "-B", str(tmp_path / "build"), f"-DPython_EXECUTABLE={sys.executable}",
                          *gen], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
