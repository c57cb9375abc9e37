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


def test_extras_rows(tmp_path):
    """--extras: the AMP (unscale_clip_) and optimizer (clip_into_ + fused AdamW step) rows, checked and timed
    against the unfused sequences, with the bytes each sequence moves."""
    rc = bench.main(["--sets", "tiny", "--providers", "torch", "--regimes", "clip", "--quick", "--time", "0.01",
                     "--scaling", "none", "--no-plot", "--extras", "--out", str(tmp_path)])
    assert rc == 0
    (path,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    result = json.loads((tmp_path / path).read_text())
    rows = {r["provider"]: r for r in result["results"] if r.get("kind") == "extra"}
    assert set(rows) == {"amp-torch", "amp-clip", "amp-fused", "optim-torch", "optim-clip", "optim-into"}
    n = rows["amp-torch"]["bytes"]
    for key, r in rows.items():
        assert r["set"] == "tiny" and r["regime"] == key.split("-")[0], r
        assert "error" not in r and r["check"] == "", r
        assert 0 < r["p20_s"] <= r["median_s"] <= r["p80_s"] and r["n"] >= 1
        assert r["speedup"] > 0 and r["launches"] >= 1 and r["bytes_per_s"] > 0
    assert math.isclose(rows["amp-torch"]["speedup"], 1.0) and math.isclose(rows["optim-torch"]["speedup"], 1.0)
    assert rows["amp-fused"]["bytes_moved"] == 2 * n and rows["amp-torch"]["bytes_moved"] == 5 * n
    assert rows["optim-into"]["clip_bytes_moved"] == n and rows["optim-torch"]["clip_bytes_moved"] == 3 * n
    assert rows["optim-into"]["bytes_moved"] == (1 + bench.ADAMW_BYTES) * n
    md = next(f for f in os.listdir(tmp_path) if f.endswith(".md"))
    assert "| tiny | amp | fusedclip.unscale_clip_ |" in (tmp_path / md).read_text()


def test_extras_checks_catch_a_wrong_sequence():
    """The AMP check sees a sequence that does not unscale; the optimizer check one that skips clipping."""
    dev = torch.device("cpu")
    specs = bench.SETS["tiny"].specs()
    wl = bench.Workload(specs, dev, rotations=1, grad_scale=bench.AMP_SCALE)
    wl.set_regime(True)
    provs = {p.key: p for p in bench._amp_providers(dev, wl)}
    assert bench.check_call(provs["amp-fused"].make(dev), wl) == ""
    assert "norm" in bench.check_call(lambda ps: torch.nn.utils.clip_grad_norm_(ps, bench.MAX_NORM), wl)
    wl = bench.Workload(specs, dev, rotations=1, real_params=True)
    wl.set_regime(True)
    provs = {p.key: p for p in bench._optim_providers(dev, wl)}
    check = provs["optim-into"].check
    for _ in range(2):  # the second step has optimizer state, so the clip coefficient shows in the update
        assert check(provs["optim-into"].make(dev), wl) == ""
    # a step without clipping (the right norm returned), once the optimizer has state
    unclipped = lambda ps: (wl.optimizers[id(ps)].step(), torch.nn.utils.get_total_norm([p.grad for p in ps]))[1]  # noqa: E731
    assert "step differs" in check(unclipped, wl)
