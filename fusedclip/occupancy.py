"""How many blocks (or Triton programs) of a kernel an SM holds at once: the CUDA occupancy rule from a kernel's
registers, threads and shared memory, and the per-SM limits of each architecture. The CUDA kernels' resources are
checked with it (kernel_info.py, `python -m fusedclip info --kernels`) and the Triton backend sizes its persistent
grids with it (backends/triton/launcher.py)."""

# Per-SM limits by architecture (CUDA C++ Programming Guide, "Technical Specifications per Compute Capability"):
# (max threads, max resident blocks, 32-bit registers, shared memory in bytes). Shared memory is what a block
# can be given at most; each block also reserves 1 KB of it for the system.
SM_LIMITS = {
    80: (2048, 32, 65536, 164 * 1024),
    86: (1536, 16, 65536, 100 * 1024),
    89: (1536, 24, 65536, 100 * 1024),
    90: (2048, 32, 65536, 228 * 1024),
    100: (2048, 32, 65536, 228 * 1024),
    # Jetson Thor and consumer Blackwell: 1536 threads per SM, 100 KB of shared memory
    110: (1536, 24, 65536, 100 * 1024),
    120: (1536, 32, 65536, 100 * 1024),
}
RESERVED_SMEM_PER_BLOCK = 1024
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256


def resident_blocks(threads: int, registers: int, shared: int, *, max_threads: int, max_blocks: int,
              shared_per_sm: int, regs_per_sm: int = 65536) -> int:
    """Resident blocks per SM for a kernel of these resources (the CUDA occupancy rule; the Triton backend sizes
    its persistent grid with it too). Registers go to warps in units of 256, and a warp's registers come from
    one of the SM's four quarters (counting per quarter never overestimates); each block also takes the 1 KB
    of shared memory the system reserves (sm_80 and later)."""
    warps = -(-threads // 32)
    warp_regs = -(-max(registers, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = (regs_per_sm // 4 // warp_regs) * 4 // warps
    by_smem = shared_per_sm // (shared + RESERVED_SMEM_PER_BLOCK)
    return min(max_blocks, max_threads // threads, by_regs, by_smem)


def blocks_per_sm(arch: int, threads: int, registers: int, shared: int) -> int:
    """resident_blocks() with the limits of an architecture (SM_LIMITS)."""
    max_threads, max_blocks, regs, smem = SM_LIMITS[arch]
    return resident_blocks(threads, registers, shared, max_threads=max_threads, max_blocks=max_blocks,
                     shared_per_sm=smem, regs_per_sm=regs)
