"""Builds fusedclip._C with torch.utils.cpp_extension.

    pip install --no-build-isolation -e .

The build decisions (CUDA or not, architectures, include fixes) live in
tools/build_config.py, shared with CMakeLists.txt; its docstring lists the
environment switches.
"""
import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools"))  # build_config
import build_config  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
NO_ISOLATION = ("build in the environment that will import fusedclip, with its torch: "
                "pip install --no-build-isolation .")
# A source distribution needs no compiler and no torch (pip's metadata step for it runs egg_info).
SDIST_ONLY = "sdist" in sys.argv[1:] or sys.argv[1:2] == ["egg_info"]
if SDIST_ONLY:
    setup()
    sys.exit(0)

try:
    import torch
except ImportError:
    sys.exit("fusedclip: torch is not importable in this build environment. pip builds in an isolated "
             "environment unless told not to; " + NO_ISOLATION + " (install torch first)")

# An isolated build environment (pip's pip-build-env-*, pypa/build's build-env-*) would compile against a
# second, freshly downloaded torch, and the module would not load into the user's torch.
if any(part.startswith(("pip-build-env-", "build-env-")) for part in torch.__file__.split(os.sep)):
    sys.exit(f"fusedclip: this build is isolated and found torch {torch.__version__} at {torch.__file__}, not the "
             "torch that will import the package; " + NO_ISOLATION)

try:
    with_cuda, why_not = build_config.want_cuda()
except build_config.BuildError as e:
    sys.exit(f"fusedclip: {e}")
if with_cuda:  # cpp_extension reads CUDA_HOME when it is imported
    os.environ["CUDA_HOME"] = build_config.cuda_home()

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

# The torch the module is tied to, readable even when the module cannot load (fusedclip/_ext.py checks it).
with open(os.path.join(ROOT, "fusedclip", "_build_info.py"), "w") as f:
    f.write(f'"""Written by setup.py."""\nTORCH_VERSION = "{torch.__version__}"\n')

defines = [f'-DFUSEDCLIP_TORCH_VERSION="{torch.__version__}"']
sources = list(build_config.CPU_SOURCES)
includes = [os.path.join(ROOT, build_config.INCLUDE_DIR)]  # the sources' includes are spelled from csrc/
extra = {"cxx": build_config.CXX_FLAGS + defines}
if with_cuda:
    home = os.environ["CUDA_HOME"]
    arch_list = build_config.cuda_arch_list(home)
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list  # read by cpp_extension for the -gencode flags
    cuda_defines = ["-DFUSEDCLIP_WITH_CUDA", f'-DFUSEDCLIP_CUDA_ARCHS="{arch_list.replace(";", " ")}"']
    sources += build_config.CUDA_SOURCES
    extra["cxx"] += cuda_defines
    extra["nvcc"] = build_config.NVCC_FLAGS + defines + cuda_defines
    print(f"fusedclip: building the CUDA kernels for {arch_list} with {home}")
    ext = CUDAExtension("fusedclip._C", sources, extra_compile_args=extra, extra_link_args=build_config.LINK_FLAGS,
                        include_dirs=includes + build_config.extra_include_dirs(home))
else:
    print(f"fusedclip: building without CUDA kernels ({why_not}); the CPU kernel and the torch backend work")
    ext = CppExtension("fusedclip._C", sources, extra_compile_args=extra, extra_link_args=build_config.LINK_FLAGS,
                       include_dirs=includes)

# Name, version and packages are in pyproject.toml.
setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension})
