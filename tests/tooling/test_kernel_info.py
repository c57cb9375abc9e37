"""Static proof of the CUDA kernels, from the built module (no GPU needed): every instantiation for every
architecture is present, none spills, and each fits the blocks per SM that the launcher's cooperative grid
and csrc/cuda/clip_cuda.cu's kMinBlocksPerSm (csrc/cuda/agc_cuda.cu's kAgcMinBlocksPerSm) count on."""
import subprocess
import sys

import pytest

from fusedclip import _ext, kernel_info, occupancy

pytestmark = pytest.mark.skipif(not _ext.HAS_CUDA_KERNELS, reason="this build has no CUDA kernels")

KINDS = ["L2", "inf", "-inf", "p"]
EXPECTED = ([f"fused_norm_clip_kernel<{k}, {acc}>" for k in KINDS for acc in ("float", "double")]
            + ["scale_by_norm_kernel<float>", "scale_by_norm_kernel<double>", "clamp_kernel"]
            + ["scale_each_kernel<float>", "scale_each_kernel<double>"]
            + [f"agc_kernel<{k}>" for k in KINDS])


@pytest.fixture(scope="module")
def kernels():
    return kernel_info.kernel_resources()


def built_archs():
    return sorted(int(float(a.replace("+PTX", "")) * 10) for a in _ext.build_info()["cuda_archs"].split())


def test_every_kernel_for_every_arch(kernels):
    for arch in built_archs():
        names = sorted(k.name for k in kernels if k.arch == arch)
        assert names == sorted(EXPECTED), f"sm_{arch}: {names}"


def test_no_kernel_spills(kernels):
    spilling = [(k.arch, k.name, k.stack, k.local) for k in kernels if k.spills]
    assert not spilling, f"kernels with a stack frame (spills) or local memory: {spilling}"


def test_fused_kernels_fit_the_blocks_per_sm_they_are_compiled_for(kernels):
    declared = kernel_info.declared_min_blocks()
    assert set(declared) == {n for n in EXPECTED if n.startswith(("fused", "agc"))}
    # The bandwidth-bound fp32 kernels run two blocks per SM; the fp64 and p-norm ones one. AGC (256 threads a
    # block): three, the p-norm one two.
    assert all(declared[f"fused_norm_clip_kernel<{k}, float>"] == 2 for k in ("L2", "inf", "-inf"))
    assert all(declared[f"agc_kernel<{k}>"] == 3 for k in ("L2", "inf", "-inf")) and declared["agc_kernel<p>"] == 2
    info = _ext.build_info()
    for k in kernels:
        assert k.threads == int(info["agc_block_threads" if k.name.startswith("agc") else "cuda_block_threads"])
        if k.name in declared:
            assert k.blocks_per_sm >= declared[k.name], (k.arch, k.name, k.registers, k.shared, k.blocks_per_sm)


def test_occupancy_rule():
    # sm_90, 512 threads: 64 registers give two blocks, 65 (allocated as 72) one; shared memory and the
    # thread limit bound it too.
    assert occupancy.blocks_per_sm(90, 512, 64, 5120) == 2
    assert occupancy.blocks_per_sm(90, 512, 65, 5120) == 1
    assert occupancy.blocks_per_sm(90, 512, 32, 0) == 4
    assert occupancy.blocks_per_sm(90, 256, 32, 100 * 1024) == 2
    assert occupancy.blocks_per_sm(120, 512, 32, 0) == 3


def test_names_from_mangled():
    assert kernel_info.short_name(
        "_ZN9fusedclip45_GLOBAL__N__db687411_12_clip_cuda_cu_1860927822fused_norm_clip_kernelILNS_8NormKindE3EdEEvNS0_9FusedArgsIT0_EE"
    ) == "fused_norm_clip_kernel<p, double>"
    assert kernel_info.short_name(
        "_ZN9fusedclip45_GLOBAL__N__db687411_12_clip_cuda_cu_1860927820scale_by_norm_kernelIfEEvPKllPKvlT_"
    ) == "scale_by_norm_kernel<float>"
    assert kernel_info.short_name(
        "_ZN9fusedclip48_GLOBAL__N__bb801c05_11_agc_cuda_cu_8114ecb9_46610agc_kernelILNS_8NormKindE3EEEvPKllddd"
    ) == "agc_kernel<p>"


def test_info_kernels_command():
    out = subprocess.run([sys.executable, "-m", "fusedclip", "info", "--kernels"], capture_output=True, text=True,
                         check=True).stdout
    row = next(line for line in out.splitlines() if line.startswith("sm_90") and "<L2, float>" in line)
    assert row.split()[-2:] == ["2", "2"], row  # blocks per SM from the module, and what it is compiled for
    assert "SPILLS" not in out


def test_grid_stride_kernels_launch_one_wave(kernels):
    """The scale and clamp kernels (grid-stride loops) fit fewer than 4 blocks per SM (3 on sm_90): their grid
    is the occupancy API's count for the kernel itself, one full wave, not a fixed 4 per SM (1.33 waves:
    issue 25, defect 11)."""
    import pathlib
    grid_stride = [k for k in kernels if k.name.startswith(("scale_by_norm_kernel", "clamp_kernel"))]
    assert grid_stride and any(k.blocks_per_sm < 4 for k in grid_stride), [(k.name, k.blocks_per_sm) for k in grid_stride]
    src = (pathlib.Path(__file__).resolve().parents[2] / "csrc" / "cuda" / "clip_cuda.cu").read_text()
    assert "4LL * sm_count" not in src
    assert "l.grid(g.n_chunks, reinterpret_cast<const void*>(scale_by_norm_kernel<acc_t>))" in src
    assert "l.grid(g.n_chunks, reinterpret_cast<const void*>(clamp_kernel))" in src
