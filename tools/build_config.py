"""How fusedclip is built: one place for setup.py and CMakeLists.txt.

Switches (environment variables):
  FUSEDCLIP_CUDA=0|1      force the CUDA kernels off / on (default: on when nvcc is found)
  TORCH_CUDA_ARCH_LIST    e.g. "9.0" or "8.0;9.0+PTX" (default: the visible GPU's, or with no GPU
                          every major architecture this nvcc supports from Ampere on,
                          as X.0, which runs on all X.y GPUs; PTX for newer ones)
  MAX_JOBS                parallel compile jobs (ninja)
  FUSEDCLIP_DEBUG=1       keep the host code's debug information (stripped by default)
  FUSEDCLIP_SANITIZE=1    build the host code with AddressSanitizer and UndefinedBehaviorSanitizer (a CPU
                          build for `make test-sanitize`, scripts/test_sanitize.sh; it loads only into a Python
                          started with the sanitizer runtimes preloaded)

`python scripts/build_config.py --cmake` prints the decisions as CMake `set()` lines.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The sources by folder (a new file joins the build by where it is): csrc/ the schemas (ops.cpp) and the Python
# entry (python_module.cpp), csrc/common/ the host code both devices share, csrc/cpu/ and csrc/cuda/ the kernels
# with their TORCH_LIBRARY_IMPL. Relative to the repository root, sorted: the same list for setup.py and CMake.
# Includes are spelled from csrc/ ("common/grad_table.h"): both builds put INCLUDE_DIR on the include path.
INCLUDE_DIR = "csrc"


def _sources(*patterns):
    return sorted(os.path.relpath(f, ROOT) for p in patterns for f in glob.glob(os.path.join(ROOT, p)))


CPU_SOURCES = _sources("csrc/*.cpp", "csrc/common/*.cpp", "csrc/cpu/*.cpp")
CUDA_SOURCES = _sources("csrc/cuda/*.cu")
# -fopenmp: at::parallel_for is inline OpenMP code in torch's headers; without it the CPU kernel runs on one thread.
# -ffp-contract=off: no multiply-add contraction, so the CPU loops' ISA variants give the same bits (csrc/cpu/cpu_simd.h).
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]
# Host debug information is ~12 MB of the module; FUSEDCLIP_DEBUG=1 keeps it (the kernels keep -lineinfo anyway).
LINK_FLAGS = ["-fopenmp"] + ([] if os.environ.get("FUSEDCLIP_DEBUG") == "1" else ["-Wl,--strip-debug"])
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
# -fno-sanitize-recover=undefined: UBSan's first report aborts, as ASan's does, so a test run fails on it;
# -fno-omit-frame-pointer and -g: whole, symbolized stacks in the reports.
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g"]
if os.environ.get("FUSEDCLIP_SANITIZE") == "1":
    # -O0, not -O3: the instrumented -O3 build of the CPU loops took ~13 min on 2 cores (clip_cpu.cpp alone ~8),
    # -O1 288 s, -O0 113 s (its tests 112 s against -O1's 76 s: the shortest in all, for CI's time); unoptimized
    # code keeps every memory access, so the checks miss nothing that an optimized build would show.
    CXX_FLAGS = [f if f != "-O3" else "-O0" for f in CXX_FLAGS] + SANITIZE_FLAGS
    LINK_FLAGS = ["-fopenmp", "-fsanitize=address,undefined"]


class BuildError(RuntimeError):
    pass


def cuda_home():
    """The CUDA toolkit: $CUDA_HOME / $CUDA_PATH, the toolkit of the nvcc on PATH, or /usr/local/cuda.
    A candidate counts only if it has bin/nvcc and include/cuda_runtime.h (an nvcc on PATH may be a
    wrapper script outside the toolkit)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")) and \
                os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def nvcc_version(home):
    out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def want_cuda():
    """(build the CUDA kernels?, why not)."""
    flag = os.environ.get("FUSEDCLIP_CUDA", "").strip()
    if flag == "0":
        return False, "FUSEDCLIP_CUDA=0"
    home = cuda_home()
    if home is None:
        if flag == "1":
            raise BuildError("FUSEDCLIP_CUDA=1 but no CUDA toolkit was found: install nvcc (the CUDA toolkit "
                             "matching torch.version.cuda) and put it on PATH or set CUDA_HOME")
        return False, "no nvcc found (set CUDA_HOME or put nvcc on PATH)"
    import torch

    if torch.version.cuda is None:
        if flag == "1":
            raise BuildError(f"FUSEDCLIP_CUDA=1 but this torch ({torch.__version__}) is a CPU-only build: "
                             "install a CUDA build of torch")
        return False, f"torch {torch.__version__} is a CPU-only build"
    have = nvcc_version(home)
    torch_major = int(torch.version.cuda.split(".")[0])
    if have is None or have[0] != torch_major:
        raise BuildError(f"nvcc at {home} is CUDA {have} but torch {torch.__version__} was built with CUDA "
                         f"{torch.version.cuda}: install a CUDA {torch_major}.x toolkit (or point CUDA_HOME at "
                         "one), or build without CUDA kernels with FUSEDCLIP_CUDA=0")
    return True, ""


def cuda_arch_list(home):
    """TORCH_CUDA_ARCH_LIST if set; the visible GPUs' if any; else nvcc's architectures from 8.0 on."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    import torch

    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{a}.{b}" for a, b in caps)
    out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--list-gpu-arch"], capture_output=True, text=True).stdout
    # One cubin per major version from Ampere on (sm_80 code runs on 8.6/8.7/8.9, sm_100 on 10.3, ...),
    # which keeps the build short; PTX of the newest for GPUs newer than this nvcc.
    majors = sorted({int(m) // 10 for m in re.findall(r"compute_(\d+)\b", out) if int(m) >= 80}) or [8, 9]
    names = [f"{m}.0" for m in majors]
    names[-1] += "+PTX"
    return ";".join(names)


def extra_include_dirs(home):
    """torch's CUDA headers include cusparse.h etc.; slim toolkits lack them but the nvidia pip packages have them."""
    if os.path.exists(os.path.join(home, "include", "cusparse.h")):
        return []
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    return [d for d in (os.path.join(site, "nvidia", sub, "include") for sub in ("cu13", "cu12", "cusparse"))
            if os.path.exists(os.path.join(d, "cusparse.h"))]


def nvrtc_library(home):
    """torch's CMake config links nvrtc; slim toolkits lack it, the nvidia pip packages have it."""
    import glob

    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    for pattern in (os.path.join(home, "lib64", "libnvrtc.so*"), os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so*")):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return ""


def cxx_standard():
    """The C++ standard torch's own extension builder uses (17 up to torch 2.9, 20 after)."""
    import torch.utils.cpp_extension as ce

    with open(ce.__file__) as f:
        return 20 if "c++20" in f.read() else 17


def cmake_lines():
    cuda, why = want_cuda()
    lines = [f'set(FUSEDCLIP_WITH_CUDA {"ON" if cuda else "OFF"})',
             f'set(FUSEDCLIP_CXX_STANDARD {cxx_standard()})',
             f'set(FUSEDCLIP_CPU_SOURCES {" ".join(CPU_SOURCES)})',
             f'set(FUSEDCLIP_CUDA_SOURCES {" ".join(CUDA_SOURCES)})']
    if cuda:
        home = cuda_home()
        lines += [f'set(FUSEDCLIP_CUDA_HOME "{home}")',
                  f'set(FUSEDCLIP_ARCH_LIST "{cuda_arch_list(home)}")',
                  f'set(FUSEDCLIP_EXTRA_INCLUDES "{";".join(extra_include_dirs(home))}")',
                  f'set(FUSEDCLIP_NVRTC_LIBRARY "{nvrtc_library(home)}")']
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["--cmake"]:
        print(cmake_lines())
    else:
        cuda, why = want_cuda()
        print(f"cuda kernels: {cuda} {why}")
        if cuda:
            print("arch list:", cuda_arch_list(cuda_home()))
