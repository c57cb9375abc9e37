"""Static proof of the Triton kernels for a GPU, on a machine without one (tests/tooling/test_triton_static.py).

Triton's compiler takes a GPU target without a GPU: this compiles the kernel variants the launchers of
fusedclip/backends/triton would launch on an H100/H200 (sm_90) and reports, per variant, registers, spills,
shared memory, 128-bit global loads in the PTX, and the one-launch programs per SM that follow.

The arguments are the launchers' own: the public entry points run on CPU tensors with the launch replaced by a
recorder (nothing runs), and the compile goes through Triton's own binder (the function that turns a launch's
arguments into the specialization key) and argument packing, as a real launch would. Uses only what Triton 3.6
(the GPU machine's) and 3.8 both have.

    python tools/triton_static.py [--json]     # with PYTHONPATH=<dir> to try another Triton
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from fusedclip.backends.triton import agc as ta
from fusedclip.backends.triton import clip as tclip, kernels as tk, launcher as tlauncher
from fusedclip.backends.triton import zclip as tz

TARGET = GPUTarget("cuda", 90, 32)  # H100/H200

# 128-bit global loads: four 32-bit or two 64-bit lanes (any cache or eviction qualifiers before the vector)
V128_LOAD = re.compile(r"\bld\.global(?:\.[\w:]+)*\.(?:v4\.[bfsu]32|v2\.[bfsu]64)\b")
ANY_LOAD = re.compile(r"\bld\.global(?:\.[\w:]+)*\b")
# barriers of a program in the PTX: a layout conversion through shared memory costs some on every block
BAR_SYNC = re.compile(r"\b(?:bar|barrier)\.sync\b")


def record_launches(call):
    """[(kernel, args, constexprs)] of what call() would launch; nothing is launched or compiled."""
    launches = []
    saved = tlauncher._launch, tlauncher._programs, tlauncher._one_launch_variant, tlauncher._two_launch_options
    tlauncher._launch = lambda kernel, programs, *args, options=None, **constexprs: launches.append(
        (kernel, args, constexprs))
    tlauncher._programs = lambda *a: 1
    tlauncher._one_launch_variant = lambda *a, **k: (None, 1)
    tlauncher._two_launch_options = lambda *a, **k: None
    try:
        call()
    finally:
        tlauncher._launch, tlauncher._programs, tlauncher._one_launch_variant, tlauncher._two_launch_options = saved
    return launches


def candidate_options(kernel, constexprs):
    """The compile options the launchers try for this kernel, best first."""
    if kernel is tk._one_launch_kernel:
        return tlauncher.one_launch_options(constexprs)
    if kernel is tz._zclip_kernel:
        choose = tlauncher.one_launch_options if constexprs["ONE_LAUNCH"] else tlauncher.two_launch_options
        options = choose(constexprs)
        return [dict(o, **tz._OPTIONS) for o in options]
    if kernel in (tk._finish_kernel, tk._clamp_kernel):
        return tlauncher.two_launch_options(constexprs)
    return [dict(num_warps=tk.NUM_WARPS)]


def specialization(kernel, args, constexprs, options=None, target=TARGET):
    """Triton's specialization of a launch (the kernel cache key without the options) for target: what decides
    whether a launch reuses a compiled kernel or compiles a new one. Returns (bound args, key, backend)."""
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, _ = binder(*args, **(options or candidate_options(kernel, constexprs)[0]), **constexprs)
    return bound, spec, backend


def compile_for(kernel, args, constexprs, options, target=TARGET):
    """Compile a recorded launch for target as JITFunction.run would (its binder, _pack_args, ASTSource)."""
    bound, spec, backend = specialization(kernel, args, constexprs, options, target)
    kwargs = dict(options, **constexprs)
    options, signature, consts, attrs = kernel._pack_args(backend, kwargs, bound, spec, None)
    return triton.compile(ASTSource(kernel, signature, consts, attrs), target=target, options=options.__dict__)


def resources(compiled):
    """(registers, stack bytes, local bytes) of the cubin Triton made, from cuobjdump (shipped with Triton; no GPU
    needed). Spills go to the stack frame in local memory, and these kernels have no local arrays: no spills
    when both are 0."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True)
    usage = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out.stdout))
    return int(usage["REG"]), int(usage["STACK"]), int(usage["LOCAL"])


def barrier_before_first_atomic(ttir):
    """Whether the kernel asks for a barrier of its program (tl.debug_barrier: gpu.barrier in 3.6's TTIR,
    ttg.barrier in 3.8's, before the backend adds its own) ahead of its first atomic: a program's arrival (the
    grid barrier) or ticket (two-launch ZClip) is published by one thread, after all of its threads are done.
    None: no atomics."""
    atomic = ttir.find("tt.atomic_rmw")
    if atomic < 0:
        return None
    return re.search(r"\b(?:gpu|ttg)\.barrier\b", ttir[:atomic]) is not None


def _grads(dtypes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).to(d) for n, d in zip((40000, 3000, 70, 16390), dtypes)]


MIXED = [torch.float32, torch.bfloat16, torch.float16, torch.float32]
MIXED64 = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def variants():
    """name -> (kernel, args, constexprs, expected 128-bit data loads): the variants that matter. Expected: one
    per 16 bytes a thread loads from a full block, per dtype path (fp32, fp16, bf16, and fp64 where the
    accumulation is fp64), per pass that reads the grads (the norm; the scaling, which rereads)."""
    per_thread = tk.BLOCK_GPU // (32 * tk.NUM_WARPS)
    v4 = {torch.float32: per_thread * 4 // 16, torch.float16: per_thread * 2 // 16,
          torch.bfloat16: per_thread * 2 // 16, torch.float64: per_thread * 8 // 16}
    low = v4[torch.float32] + v4[torch.float16] + v4[torch.bfloat16]
    wide = low + v4[torch.float64]
    out = {}

    def one(name, call, passes, loads):
        (launch,) = record_launches(call)
        out[name] = launch + (passes * loads,)

    one("one-launch L2 fp32-acc", lambda: tclip.clip(_grads(MIXED), 1.0, 2.0, launch="one"), 2, low)
    one("one-launch L2 fp64-acc", lambda: tclip.clip(_grads(MIXED64), 1.0, 2.0, launch="one"), 2, wide)
    one("one-launch inf fp32-acc AMP per-tensor",
        lambda: tclip.clip(_grads(MIXED), 1.0, float("inf"), per_tensor=torch.empty(4), inv_scale=torch.ones(()),
                           found_inf=torch.zeros(()), launch="one"), 2, low)
    partials, finish = record_launches(lambda: tclip.clip(_grads(MIXED), 1.0, 2.0, launch="two"))
    out["partials L2 fp32-acc"] = partials + (low,)
    out["finish L2 fp32-acc"] = finish + (low,)
    (clamp,) = record_launches(lambda: tclip.clamp(_grads(MIXED64), 0.5))
    out["clamp"] = clamp + (wide,)
    # ZClip: the norm pass and the scaling (one launch), or the scaling only (after the partials kernel)
    config = [0.97, 2.5, 1.0, 1.0, 1e-6, 25.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    state = torch.zeros(tz.BUFFER + 25, dtype=torch.float64)
    one("zclip one-launch fp32-acc", lambda: tz.zclip(_grads(MIXED), state, config, found_inf=torch.zeros(()),
                                                      launch="one"), 2, low)
    _, zfinish = record_launches(lambda: tz.zclip(_grads(MIXED), state, config, launch="two"))
    out["zclip finish fp32-acc"] = zfinish + (low,)
    # AGC (fusedclip/backends/triton/agc.py): its addresses are cast from the table's int64s with no alignment hint
    # and its rows start at any multiple of their length, so no 128-bit loads are expected (issue 25, defect 10)
    saved = tlauncher._sm_count
    tlauncher._sm_count = lambda device: 132
    try:
        (agc,) = record_launches(lambda: ta.agc([w.clone() for w in _grads([torch.float32] * 4, 1)],
                                                _grads([torch.float32] * 4, 2), 0.01, 1e-3, 2.0))
    finally:
        tlauncher._sm_count = saved
    out["agc L2 fp32"] = agc + (0,)
    return out


def report():
    """[{variant, registers, stack_bytes, ...}] for every variant, compiled for TARGET with the options the
    launchers would settle on (the first candidate without spills, else the one that spills least)."""
    rows = []
    for name, (kernel, args, constexprs, expected) in variants().items():
        t = time.time()
        best = None
        for options in candidate_options(kernel, constexprs):  # the launchers' rule: see _one_launch_variant
            compiled = compile_for(kernel, args, constexprs, options)
            regs, stack, local = resources(compiled)
            if best is None or stack + local < best[3] + best[4]:
                best = options, compiled, regs, stack, local
            if stack == local == 0:
                break
        options, compiled, regs, stack, local = best
        ptx = compiled.asm["ptx"]
        loads = V128_LOAD.findall(ptx)
        row = dict(variant=name, kernel=kernel.__name__, maxnreg=options.get("maxnreg"), registers=regs,
                   stack_bytes=stack, local_bytes=local, shared=compiled.metadata.shared, v128_loads=len(loads),
                   v128_data_loads=sum(".cg" not in x for x in loads), expected_v128_data_loads=expected,
                   global_loads=len(ANY_LOAD.findall(ptx)), f64_fma=ptx.count("fma.rn.f64"),
                   barrier_before_atomic=barrier_before_first_atomic(compiled.asm["ttir"]),
                   bar_syncs=len(BAR_SYNC.findall(ptx)),
                   compile_s=round(time.time() - t, 1))
        if kernel is tk._one_launch_kernel or (kernel is tz._zclip_kernel and constexprs["ONE_LAUNCH"]):
            row["resident_per_sm"] = tlauncher.resident_per_sm(regs, compiled.metadata.shared)
            row["one_launch_per_sm"] = tlauncher.one_launch_per_sm(regs, compiled.metadata.shared)
        rows.append(row)
    return rows


if __name__ == "__main__":
    rows = report()
    if "--json" in sys.argv:
        print(json.dumps(dict(triton=triton.__version__, rows=rows)))
    else:
        print(f"Triton {triton.__version__}, target sm_{TARGET.arch}")
        for r in rows:
            print("  " + ", ".join(f"{k}={v}" for k, v in r.items()))
