"""Smoke test of the benchmark harness (fusedclip/bench.py) on tiny sets: the parameter sets have the sizes
of the models they name, a broken provider is caught, and a whole quick run writes its reports."""
import json
import math
import os

import pytest
import torch

from fusedclip import bench


@pytest.mark.parametrize("name, tensors, elements", [
    ("gpt2-small", 148, 124_439_808),
    ("gpt2-xl", 580, 1_557_611_200),
    ("bert-base", 199, 109_482_240),
    ("llama-7b", 291, 6_738_415_616),
    ("transformer", 184, 44_140_544),
])
def test_param_sets_match_the_models(name, tensors, elements):
    specs = bench.SETS[name].specs()
    assert len(specs) == tensors
    assert sum(bench.numel(s) for s, _ in specs) == elements


def test_many_small_and_mixed():
    specs = bench.SETS["many-small"].specs()
    assert len(specs) >= 2000 and 8e6 <= sum(bench.numel(s) for s, _ in specs) <= 12e6
    dtypes = {d for _, d in bench.SETS["mixed"].specs()}
    assert dtypes == {torch.bfloat16, torch.float32}
    assert len(bench.SETS["llama-7b"].specs(2)) == 2 + 9 * 2 + 1


def test_check_catches_a_provider_that_does_not_clip():
    wl = bench.Workload(bench.SETS["tiny"].specs(), torch.device("cpu"), rotations=2)
    wl.set_regime(True)
    assert bench.check_call(lambda ps: torch.nn.utils.clip_grad_norm_(ps, bench.MAX_NORM), wl) == ""
    assert "norm after" in bench.check_call(lambda ps: torch.nn.utils.get_total_norm([p.grad for p in ps]), wl)
    wl.set_regime(False)
    assert bench.check_call(lambda ps: torch.nn.utils.clip_grad_norm_(ps, bench.MAX_NORM), wl) == ""


def test_quick_run_writes_reports(tmp_path, capsys):
    rc = bench.main(["--sets", "tiny", "--providers", "torch,torch-loop,native,triton", "--quick",
                     "--time", "0.01", "--tensors-points", "1,16,256", "--tensors-elements", "100000", "--elements-points", "1000,10000",
                     "--out", str(tmp_path), "--tag", "smoke"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "fusedclip native" in out and "[" in out  # progress lines and the table
    files = sorted(os.listdir(tmp_path))
    assert [f.rsplit(".", 1)[1] for f in files] == ["json", "md", "png"]
    assert all("smoke" in f and os.path.getsize(tmp_path / f) > 0 for f in files)
    result = json.loads((tmp_path / files[0]).read_text())
    assert result["meta"]["device_type"] == "cpu" and result["meta"]["torch"] == torch.__version__
    rows = [r for r in result["results"] if r["set"] == "tiny"]
    assert {(r["provider"], r["regime"]) for r in rows} == {
        (p, g) for p in ("torch", "torch-loop", "native") for g in ("clip", "noclip")}
    for r in rows:
        assert "error" not in r and r["check"] == "", r
        assert 0 < r["p20_s"] <= r["median_s"] <= r["p80_s"] and r["n"] >= 3
        assert r["launches"] >= 1 and r["pct_copy"] > 0
        assert r["bytes_moved"] == (2 if r["regime"] == "clip" else 1) * r["bytes"]
        assert math.isclose(r["speedup"], 1.0) if r["provider"] == "torch" else r["speedup"] > 0
    assert set(result["scaling"]["per_tensor_s"]) == {"torch", "torch-loop", "native"}
    assert len(result["scaling"]["points"]["elements"]) == 2 * 3
    if "triton" not in __import__("fusedclip").available_backends("cpu"):
        assert any("triton" in n for n in result["notes"])
    assert "| tiny | clip | fusedclip native |" in (tmp_path / files[1]).read_text()
