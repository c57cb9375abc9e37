"""The device-table cache of the CUDA clip and AGC (csrc/cuda/device_table_cache.h), proven on the CPU: the cache's
policy is compiled with a simulated GPU (tests/cpp/table_cache_test.cpp) and checked for what a GPU run would
show only as wrong results or reads of freed memory: a table a captured CUDA graph reads is never evicted, a
table used from a second stream before its host-to-device copy is known to be done is waited for, a capture
never queries or waits on an event in the graph. And both caches use that one policy."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CXX = shutil.which("g++") or shutil.which("clang++") or shutil.which("c++")


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
def test_cache_policy_on_a_simulated_gpu(tmp_path):
    exe = tmp_path / "table_cache_test"
    subprocess.run([CXX, "-std=c++17", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc'}",
                    str(ROOT / "tests" / "cpp" / "table_cache_test.cpp"), "-o", str(exe)], check=True)
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and lines[-1] == "0 failed", proc.stdout + proc.stderr
    assert sum(x.startswith("PASS ") for x in lines) >= 16, proc.stdout


@pytest.mark.parametrize("source", ["clip_cuda.cu", "agc_cuda.cu"])
def test_both_caches_use_the_shared_policy(source):
    """csrc/cuda/agc_cuda.cu had its own cache (8 entries, pop_back eviction, no graph pinning, no recordStream, no
    copy event): a replay after 8 other tables read freed memory."""
    text = (ROOT / "csrc" / "cuda" / source).read_text()
    assert '#include "cuda/device_table_cuda.h"' in text
    assert re.search(r"static DeviceTableCache<CudaTables> cache\(\d+\);", text)
    assert "cache.get(ops, " in text
    assert "pop_back" not in text and "std::list<" not in text  # no second, private cache


def test_non_dense_gradients_refused_under_capture_before_their_copies():
    """Every CUDA op that builds a gradient table first refuses non-dense gradients under a CUDA-graph capture,
    before build_table makes their dense copies (which a capture would record ahead of the error: issue 25,
    defect 11); the fast path leaves non-dense CUDA gradients to the ops."""
    csrc = ROOT / "csrc"
    src = (csrc / "cuda" / "clip_cuda.cu").read_text()
    builds = re.findall(r"\n(.*)\n  const GradTable g = build_table\((\w+), \"([\w.]+)\"", src)
    assert len(builds) == 6, builds  # total_norm, clip_, ZClip.step, clip_grads_with_norm_, scale_each_, clip_value_
    for before, arg, op in builds:
        assert before.strip() == f"refuse_copies_under_capture({arg});", op
    fast = (csrc / "python_module.cpp").read_text()
    assert "if (t.is_cuda() && t.numel() > 0 && !t.is_non_overlapping_and_dense()) Py_RETURN_NONE;" in fast
