"""The CUDA kernels' resources, read from the built module without a GPU (`python -m fusedclip info --kernels`).

cuobjdump (the CUDA toolkit's, or the copy the nvidia Triton package ships) lists, for every architecture the
module was built for, each kernel's registers, stack frame (where spills go), local and static shared memory.
From those and the architecture's per-SM limits follow the blocks per SM at the launcher's block size: what a
cooperative launch may put on each SM, and so what `cudaOccupancyMaxActiveBlocksPerMultiprocessor` will
answer on that GPU.
"""
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Dict, List, Optional

from .occupancy import SM_LIMITS, blocks_per_sm

@dataclass
class KernelResources:
    arch: int          # e.g. 90 for sm_90
    name: str          # demangled-ish: "fused_norm_clip_kernel<L2, float>"
    registers: int
    stack: int         # bytes of stack frame per thread: spills and local arrays live there
    local: int
    shared: int        # static shared memory, bytes
    threads: int = 0   # the launcher's block size
    blocks_per_sm: int = 0

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0


def cuobjdump() -> Optional[str]:
    """The cuobjdump to use: on PATH, in CUDA_HOME, or the one Triton's nvidia backend ships."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "cuobjdump")):
            return os.path.join(home, "bin", "cuobjdump")
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        return path if os.path.exists(path) else None
    except ImportError:
        return None


_NORM_KINDS = {"0": "L2", "1": "inf", "2": "-inf", "3": "p"}


def short_name(mangled: str) -> str:
    """`_ZN9fusedclip..22fused_norm_clip_kernelILNS_8NormKindE0EfEEv...` -> `fused_norm_clip_kernel<L2, float>`."""
    m = re.search(r"\d+(fused_norm_clip_kernel|scale_by_norm_kernel|scale_each_kernel|clamp_kernel|agc_kernel)(I.*)?", mangled)
    if not m:
        return mangled
    name, args = m.group(1), m.group(2) or ""
    kind = re.search(r"NormKindE(\d)E", args)
    acc = re.search(r"E([fd])EE|I([fd])EE", args)
    parts = []
    if kind:
        parts.append(_NORM_KINDS[kind.group(1)])
    if acc:
        parts.append({"f": "float", "d": "double"}[acc.group(1) or acc.group(2)])
    return f"{name}<{', '.join(parts)}>" if parts else name


def parse_resource_usage(text: str) -> List[KernelResources]:
    """Parses `cuobjdump --dump-resource-usage` output."""
    out, arch = [], None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*arch = sm_(\d+)", line)
        if m:
            arch = int(m.group(1))
            continue
        m = re.match(r"\s*Function (\S+):", line)
        if m and arch is not None and i + 1 < len(lines):
            f = dict(re.findall(r"(\w+):(\d+)", lines[i + 1]))
            out.append(KernelResources(arch, short_name(m.group(1)), int(f.get("REG", 0)), int(f.get("STACK", 0)),
                                       int(f.get("LOCAL", 0)), int(f.get("SHARED", 0))))
    return out


def module_path() -> str:
    from . import _ext

    if not _ext.LOADED:
        raise RuntimeError(f"the compiled extension is not loaded: {_ext.LOAD_ERROR}")
    return _ext._C.__file__


def kernel_resources(path: Optional[str] = None) -> List[KernelResources]:
    """Every CUDA kernel of the built module, per architecture, with the blocks per SM at its launch size."""
    from . import _ext

    tool = cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found: put the CUDA toolkit's bin on PATH, or install triton "
                           "(its nvidia backend ships one)")
    path = path or module_path()
    text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    info = _ext.build_info()
    threads = int(info.get("cuda_block_threads", 0))
    agc_threads = int(info.get("agc_block_threads", 0))  # csrc/cuda/agc_cuda.cu's block size
    kernels = parse_resource_usage(text)
    for k in kernels:
        k.threads = agc_threads if k.name.startswith("agc_kernel") else threads
        if k.threads and k.arch in SM_LIMITS:
            k.blocks_per_sm = blocks_per_sm(k.arch, k.threads, k.registers, k.shared)
    return kernels


def declared_min_blocks() -> Dict[str, int]:
    """The blocks per SM each fused kernel is compiled for (csrc/cuda/clip_cuda.cu, kMinBlocksPerSm; csrc/cuda/agc_cuda.cu,
    kAgcMinBlocksPerSm), from the module's build_info: {"fused_norm_clip_kernel<L2, float>": 2, ...}."""
    from . import _ext

    info = _ext.build_info()
    spec = info.get("cuda_min_blocks", "") + "," + info.get("agc_min_blocks", "")
    return {name: int(n) for name, n in re.findall(r"([\w]+<[^>]*>)=(\d+)", spec)}


def print_kernels():
    kernels = kernel_resources()
    if not kernels:
        print("no CUDA kernels in this build")
        return
    declared = declared_min_blocks()
    print(f"{'arch':<7} {'kernel':<38} {'regs':>4} {'stack':>5} {'smem':>6} {'threads':>7} {'blocks/SM':>9}  "
          "compiled for")
    for k in sorted(kernels, key=lambda k: (k.arch, k.name)):
        want = declared.get(k.name)
        print(f"sm_{k.arch:<4} {k.name:<38} {k.registers:>4} {k.stack:>5} {k.shared:>6} {k.threads:>7} "
              f"{k.blocks_per_sm or '?':>9}  {want if want else ''}{'  SPILLS' if k.spills else ''}")
