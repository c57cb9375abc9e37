"""Smoke test of the benchmark harness (fusedclip/bench/) on tiny sets: the parameter sets have the sizes of
the models they name, a broken provider is caught, and whole quick runs write their reports: every regime
(the busy ones too), fp16 beside bf16 and fp32, the memory floor, file names that two runs do not share, a
default output folder that git ignores. The runs pass --device cpu (the default, auto, picks cuda on a GPU
machine); the plot is optional (no matplotlib on the GPU machines), so a run without matplotlib must say it
skipped the plot and still write the rest."""
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import fusedclip
from fusedclip import bench
from fusedclip.bench import cli, extras, report, sets, timing, workload

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = os.path.join(ROOT, "bench", "targets.py")  # the issues' targets: the repository's, not the package's
TINY = ["--device", "cpu", "--quick", "--time", "0.01"]  # every run: the CPU, the shortest timings


@pytest.mark.parametrize("name, tensors, elements", [
    ("gpt2-small", 148, 124_439_808),
    ("gpt2-xl", 580, 1_557_611_200),
    ("bert-base", 199, 109_482_240),
    ("llama-7b", 291, 6_738_415_616),
    ("transformer", 184, 44_140_544),
    ("resnet50", 161, 25_557_032),  # torchvision.models.resnet50()
    ("vit-b", 152, 86_567_656),  # timm.create_model("vit_base_patch16_224")
    ("transformer-small", 68, 172_576),  # examples/train_transformer.py --small
])
def test_param_sets_match_the_models(name, tensors, elements):
    specs = sets.SETS[name].specs()
    assert len(specs) == tensors
    assert sum(sets.numel(s) for s, _ in specs) == elements


def test_many_small_mixed_and_half_precision_sets():
    specs = sets.SETS["many-small"].specs()
    assert len(specs) >= 2000 and 8e6 <= sum(sets.numel(s) for s, _ in specs) <= 12e6
    assert {d for _, d in sets.SETS["mixed"].specs()} == {torch.bfloat16, torch.float32}
    assert len(sets.SETS["llama-7b"].specs(2)) == 2 + 9 * 2 + 1
    for model in ("bert-base", "resnet50"):  # the same shapes in each dtype
        fp32 = sets.SETS[model].specs()
        for suffix, dtype in (("-fp16", torch.float16), ("-bf16", torch.bfloat16)):
            half = sets.SETS[model + suffix].specs()
            assert [s for s, _ in half] == [s for s, _ in fp32] and {d for _, d in half} == {dtype}
            assert model + suffix in sets.DEFAULT_SETS["cpu"]


def test_flat_specs_keep_the_size_per_dtype():
    specs = sets.SETS["mixed"].specs()
    flat = sets.flat_specs(specs)
    assert {d for _, d in flat} == {torch.bfloat16, torch.float32} and all(len(s) == 1 for s, _ in flat)
    assert sets.specs_bytes(flat) == sets.specs_bytes(specs)


def test_plot_explains_a_missing_compile_bar():
    from fusedclip.bench import plot

    label = plot.compile_label({"config": {"compile_sets": ["gpt2-small"], "regimes": workload.REGIMES}})
    assert "only on gpt2-small" in label and "compile time grows" in label and "busy" in label
    assert plot.speedup({"regime": "clip-busy", "speedup": 2.0, "mean_speedup": 0.8}) == 0.8


def test_check_catches_a_provider_that_does_not_clip():
    wl = workload.Workload(sets.SETS["tiny"].specs(), torch.device("cpu"), rotations=2)
    wl.set_regime(True)
    assert workload.check_call(lambda ps: torch.nn.utils.clip_grad_norm_(ps, workload.MAX_NORM), wl) == ""
    assert "norm after" in workload.check_call(lambda ps: torch.nn.utils.get_total_norm([p.grad for p in ps]), wl)
    wl.set_regime(False)
    assert workload.check_call(lambda ps: torch.nn.utils.clip_grad_norm_(ps, workload.MAX_NORM), wl) == ""


def test_busy_cores_load_every_core_and_are_gone_after():
    def children():
        return set(subprocess.run(["ps", "-o", "pid=", "--ppid", str(os.getpid())], capture_output=True,
                                  text=True).stdout.split())

    # only the block's own processes: earlier tests may have left workers of their own (compile pools, spawn's
    # resource tracker), which are not the busy processes' business
    before = children() if shutil.which("ps") else None
    with timing.busy_cores() as n:
        assert n == os.cpu_count()
        kids = sorted(children() - before) if before is not None else None
        assert kids is None or len(kids) >= n
    if kids:
        alive = subprocess.run(["ps", "-o", "pid=", "-p", ",".join(kids)], capture_output=True, text=True).stdout
        assert alive.split() == [], "busy processes left behind"


def test_quick_run_writes_reports(tmp_path, capsys):
    """Every regime (clip, noclip and both busy), an fp16 set beside the bf16 + fp32 one, the memory floor."""
    rc = bench.main(TINY + ["--sets", "tiny,tiny-fp16", "--providers", "torch,torch-loop,native,triton",
                            "--tensors-points", "1,16,256", "--tensors-elements", "100000",
                            "--elements-points", "1000,10000", "--out", str(tmp_path), "--tag", "smoke",
                            "--targets", TARGETS])
    assert rc == 0
    out = capsys.readouterr().out
    assert "fusedclip native" in out and "[" in out  # progress lines and the tables
    assert "MISSED" not in out and "## Targets" not in out  # the issues' targets are in the JSON only
    files = sorted(os.listdir(tmp_path))
    assert [f.rsplit(".", 1)[1] for f in files] == (["json", "md", "png"] if HAS_MATPLOTLIB else ["json", "md"])
    assert ("plot skipped: matplotlib not installed" in out) == (not HAS_MATPLOTLIB)
    assert all(re.fullmatch(r"cpu-.+_\d{4}-\d\d-\d\dT\d{4}_smoke\.\w+", f) for f in files), files
    result = json.loads((tmp_path / files[0]).read_text())
    assert result["meta"]["device_type"] == "cpu" and result["meta"]["torch"] == torch.__version__
    assert result["meta"]["cache_bytes"] > 0 and result["meta"]["cache_source"]
    rows = [r for r in result["results"] if r["kind"] == "set"]
    plain = {(p, g) for p in ("torch", "torch-loop", "native") for g in ("clip", "noclip")}
    busy = {(p, g) for p in ("torch", "native") for g in ("clip-busy", "noclip-busy")}  # foreach=False is not
    for name in ("tiny", "tiny-fp16"):
        assert {(r["provider"], r["regime"]) for r in rows if r["set"] == name} == plain | busy
    for r in rows:
        assert "error" not in r and r["check"] == "", r
        assert 0 < r["p20_s"] <= r["median_s"] <= r["p80_s"] and r["p50_s"] <= r["p90_s"] and r["mean_s"] > 0
        assert r["bytes_moved"] == (2 if workload.clips(r["regime"]) else 1) * r["bytes"]
        assert math.isclose(r["speedup"], 1.0) if r["provider"] == "torch" else r["speedup"] > 0
        if workload.is_busy(r["regime"]):
            assert r["n"] >= timing.BUSY_MIN_N and r["mean_speedup"] > 0 and r["p90_speedup"] > 0
            assert "floor_ratio" not in r
        else:
            assert r["n"] >= 3 and r["launches"] >= 1 and r["pct_copy"] > 0
            assert r["floor_ratio"] == pytest.approx(r["median_s"] / r["floor_s"])
    floors = [r for r in result["results"] if r["kind"] == "floor"]
    assert {(r["set"], r["regime"], r["dtype"]) for r in floors} == {
        ("tiny", g, "bfloat16+float32") for g in ("clip", "noclip")} | {
        ("tiny-fp16", g, "float16") for g in ("clip", "noclip")}
    assert all(r["median_s"] > 0 for r in floors)
    assert set(result["scaling"]["per_tensor_s"]) == {"torch", "torch-loop", "native"}
    assert len(result["scaling"]["points"]["elements"]) == 2 * 3
    if "triton" not in fusedclip.available_backends("cpu"):
        assert any("triton" in n for n in result["notes"])
    assert result["targets"] and all("met" in t for t in result["targets"])
    md = (tmp_path / files[1]).read_text()
    assert "| tiny | clip | fusedclip native |" in md and "MISSED" not in md
    assert "| tiny-fp16 | clip-busy | fusedclip native |" in md  # the contention table: mean, p50, p90
    assert "| tiny-fp16 | float16 | " in md and "fits in the LLC: not judged" in md  # the floor table
    # a set larger than the last-level cache is judged against its floor
    result["meta"]["cache_bytes"] = 1
    judged = report.floor_table(result)
    assert "not judged" not in judged and ("within 10% of floor" in judged or "% above floor" in judged)


def test_two_runs_never_share_a_file_name(tmp_path):
    args = TINY + ["--sets", "tiny", "--providers", "torch", "--regimes", "noclip", "--scaling", "none",
                   "--no-floor", "--no-plot", "--out", str(tmp_path)]
    assert bench.main(args) == 0 and bench.main(args) == 0
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 4 and len({f.rsplit(".", 1)[0] for f in files}) == 2, files


def test_default_output_folder_is_git_ignored():
    """`make bench` writes there: the checkout stays clean. `--out bench/results` keeps a run to commit."""
    if not (shutil.which("git") and os.path.isdir(os.path.join(ROOT, ".git"))):
        pytest.skip("not a git checkout")
    assert cli.parse([]).out == cli.DEFAULT_OUT
    probe = os.path.join(cli.DEFAULT_OUT, "cpu-x_2026-01-01T0000.json")
    assert subprocess.run(["git", "check-ignore", "-q", probe], cwd=ROOT).returncode == 0
    assert subprocess.run(["git", "check-ignore", "-q", "bench/results/cpu-x_2026-01-01T0000.json"],
                          cwd=ROOT).returncode == 1


def test_flags_go_straight_after_bench(capsys):
    """`python -m fusedclip bench --list` (no "--" needed; the old `bench -- --list` still works)."""
    from fusedclip.__main__ import main as fusedclip_main

    for argv in (["bench", "--list"], ["bench", "--", "--list"]):
        assert fusedclip_main(argv) == 0
        assert "resnet50-fp16" in capsys.readouterr().out


def test_extras_rows(tmp_path):
    """--extras: the AMP (unscale_clip_) and optimizer (clip_into_ + fused AdamW step) rows, checked and timed
    against the unfused sequences, with the bytes each sequence moves."""
    rc = bench.main(TINY + ["--sets", "tiny", "--providers", "torch", "--regimes", "clip", "--scaling", "none",
                            "--no-floor", "--no-plot", "--extras", "--out", str(tmp_path)])
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
    assert rows["optim-into"]["bytes_moved"] == (1 + extras.ADAMW_BYTES) * n
    md = next(f for f in os.listdir(tmp_path) if f.endswith(".md"))
    assert "| tiny | amp | fusedclip.unscale_clip_ |" in (tmp_path / md).read_text()


def test_agc_rows(tmp_path):
    """--agc: fusedclip.clip_agc_ against timm's adaptive_clip_grad, checked against it (about half the units
    clipped), with the bytes that must move (2.5N) and the speedup against timm; not run by default when --sets
    is given."""
    pytest.importorskip("timm")
    rc = bench.main(TINY + ["--sets", "tiny", "--providers", "torch", "--regimes", "clip", "--scaling", "none",
                            "--no-floor", "--no-plot", "--agc", "tiny", "--out", str(tmp_path)])
    assert rc == 0
    (path,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    result = json.loads((tmp_path / path).read_text())
    rows = {r["provider"]: r for r in result["results"] if r.get("kind") == "agc"}
    assert {"agc-timm", "agc-native"} <= set(rows)
    for r in rows.values():
        assert r["set"] == "tiny" and r["regime"] == "agc" and "error" not in r and r["check"] == "", r
        assert r["bytes_moved"] == int(2.5 * r["bytes"]) and r["speedup"] > 0 and r["median_s"] > 0
    assert math.isclose(rows["agc-timm"]["speedup"], 1.0)
    assert "targets" not in result  # no --targets: the installed package judges nothing against the issues
    assert cli.make_config(cli.parse(["--device", "cpu", "--sets", "tiny"])).agc == []
    assert cli.make_config(cli.parse(["--device", "cpu"])).agc == ["resnet50", "vit-b"]
    assert cli.make_config(cli.parse(["--device", "cpu", "--agc", "none"])).agc == []


def test_agc_check_catches_a_provider_that_does_not_clip():
    pytest.importorskip("timm")
    from fusedclip.bench import agc

    wl = agc.make_workload(sets.SETS["tiny"].specs(), torch.device("cpu"), 1)
    wl.set_regime(True)
    assert agc.check(lambda ps: fusedclip.clip_agc_(ps, agc.CLIP_FACTOR), wl) == ""
    assert "units clipped" in agc.check(lambda ps: None, wl)


def test_run_without_matplotlib_skips_the_plot(tmp_path, capsys, monkeypatch):
    """As on the GPU machines: `import matplotlib` fails. The run succeeds, writes JSON and markdown, and says
    (on the terminal and in the reports' notes) that the plot was skipped."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    rc = bench.main(TINY + ["--sets", "tiny", "--providers", "torch", "--regimes", "clip", "--scaling", "none",
                            "--no-floor", "--out", str(tmp_path), "--tag", "nompl"])
    assert rc == 0
    assert "plot skipped: matplotlib not installed" in capsys.readouterr().out
    files = sorted(os.listdir(tmp_path))
    assert [f.rsplit(".", 1)[1] for f in files] == ["json", "md"]
    result = json.loads((tmp_path / files[0]).read_text())
    assert any("plot skipped" in n for n in result["notes"])
    assert "plot skipped" in (tmp_path / files[1]).read_text()


def test_extras_checks_catch_a_wrong_sequence():
    """The AMP check sees a sequence that does not unscale; the optimizer check one that skips clipping."""
    dev = torch.device("cpu")
    specs = sets.SETS["tiny"].specs()
    wl = workload.Workload(specs, dev, rotations=1, grad_scale=extras.AMP_SCALE)
    wl.set_regime(True)
    provs = {p.key: p for p in extras.amp_providers(dev, wl)}
    assert workload.check_call(provs["amp-fused"].make(dev), wl) == ""
    assert "norm" in workload.check_call(lambda ps: torch.nn.utils.clip_grad_norm_(ps, workload.MAX_NORM), wl)
    wl = workload.Workload(specs, dev, rotations=1, real_params=True)
    wl.set_regime(True)
    provs = {p.key: p for p in extras.optim_providers(dev, wl)}
    check = provs["optim-into"].check
    for _ in range(2):  # the second step has optimizer state, so the clip coefficient shows in the update
        assert check(provs["optim-into"].make(dev), wl) == ""
    # a step without clipping (the right norm returned), once the optimizer has state
    unclipped = lambda ps: (wl.optimizers[id(ps)].step(), torch.nn.utils.get_total_norm([p.grad for p in ps]))[1]  # noqa: E731
    assert "step differs" in check(unclipped, wl)


def test_zclip_rows(tmp_path):
    """--zclip: fusedclip.ZClip.step against zclip's ZClip.step and plain clip_, past the warm-up, in the clip
    (a spike) and noclip regimes; checked, timed, related to zclip and to clip_, with the issue's targets. The
    plain rows of the same set and regimes keep torch as their baseline."""
    rc = bench.main(TINY + ["--sets", "tiny", "--providers", "torch", "--regimes", "clip,noclip", "--scaling",
                            "none", "--no-floor", "--no-plot", "--zclip", "tiny,many-small", "--out", str(tmp_path),
                            "--targets", TARGETS])
    assert rc == 0
    (path,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    result = json.loads((tmp_path / path).read_text())
    assert result["config"]["zclip"] == ["tiny", "many-small"]
    assert any("--zclip rows not run on many-small" in n for n in result["notes"])
    have_ref = importlib.util.find_spec("zclip") is not None
    rows = {(r["provider"], r["regime"]): r for r in result["results"] if r.get("kind") == "zclip"}
    keys = ["zclip-fused", "zclip-clip"] + (["zclip-ref"] if have_ref else [])
    assert set(rows) == {(k, g) for k in keys for g in ("clip", "noclip")}
    if not have_ref:
        assert any("zclip row zclip-ref not run" in n for n in result["notes"])
    for (key, regime), r in rows.items():
        assert r["set"] == "tiny" and "error" not in r and r["check"] == "", r
        assert 0 < r["p20_s"] <= r["median_s"] <= r["p80_s"] and r["mean_s"] > 0 and r["p50_s"] <= r["p90_s"]
        assert r["launches"] >= 1 and r["vs_clip"] > 0 and r["mean_vs_clip"] > 0 and r["p90_vs_clip"] > 0
        if have_ref:
            assert r["speedup"] > 0 and r["mean_speedup"] > 0 and r["p90_speedup"] > 0
            assert math.isclose(r["speedup"], 1.0) == (key == "zclip-ref")
        assert math.isclose(r["vs_clip"], r["median_s"] / rows[("zclip-clip", regime)]["median_s"])
    plain = [r for r in result["results"] if r.get("kind") == "set"]
    assert {(r["provider"], r["regime"]) for r in plain} == {("torch", "clip"), ("torch", "noclip")}
    assert all(math.isclose(r["speedup"], 1.0) for r in plain)  # still against torch, not against zclip
    ours = [t for t in result["targets"] if t["issue"] == 16]
    assert {t["what"] for t in ours} == {f"fusedclip.ZClip.step: tiny {g} time / fusedclip.clip_"
                                         for g in ("clip", "noclip")}  # the 3x target is for bert-base only
    for t in ours:
        assert t["target"] == 1.10 and t["met"] == (t["value"] <= 1.10)
    md = (tmp_path / path.replace(".json", ".md")).read_text()
    assert "| tiny | clip | fusedclip.ZClip.step (" in md and "| tiny | noclip | fusedclip.clip_ (" in md


def test_zclip_only_and_default_sets(tmp_path):
    """--providers none --zclip: only the ZClip rows (no plain rows, no floor); bare --zclip picks bert-base,
    bert-base-bf16 and many-small when the run has them."""
    pick = lambda argv: cli.make_config(cli.parse(["--device", "cpu"] + argv)).zclip  # noqa: E731
    assert pick(["--sets", "tiny,bert-base,many-small", "--zclip"]) == ["bert-base", "many-small"]
    assert pick(["--zclip"]) == ["many-small", "bert-base", "bert-base-bf16"]  # the default CPU sets' order
    assert pick(["--sets", "tiny", "--zclip"]) == ["tiny"] and pick(["--sets", "tiny"]) == []
    assert cli.make_config(cli.parse(["--device", "cpu", "--providers", "none"])).providers == []
    rc = bench.main(TINY + ["--sets", "tiny", "--providers", "none", "--regimes", "noclip", "--scaling", "none",
                            "--zclip", "--out", str(tmp_path)])
    assert rc == 0
    assert [f.rsplit(".", 1)[1] for f in sorted(os.listdir(tmp_path))] == ["json", "md"]  # no empty plot
    (path,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    result = json.loads((tmp_path / path).read_text())
    assert any(n.startswith("plot skipped") for n in result["notes"])
    assert {r["kind"] for r in result["results"]} == {"zclip"}
    assert {r["regime"] for r in result["results"]} == {"noclip"}
    assert "## Per set" not in (tmp_path / path.replace(".json", ".md")).read_text()


def test_zclip_check_catches_a_wrong_clipper():
    """The ZClip rows' check: a warmed-up fusedclip.ZClip passes in both regimes; a clipper that clips to
    max_norm instead of the adaptive threshold, one that clips nothing, and one that scales a step that is no
    spike do not."""
    from fusedclip.bench import zclip_rows as zr

    dev = torch.device("cpu")
    wl = workload.Workload(sets.SETS["tiny"].specs(), dev, rotations=1)
    wl.set_regime(True)
    fused = next(p for p in zr.zclip_providers(dev, wl) if p.key == zr.FUSED_KEY).make(dev)
    mean, var = fused.state()
    assert mean == pytest.approx(workload.NOCLIP_NORM) and 0 < var < (0.1 * workload.NOCLIP_NORM) ** 2
    assert zr.check_zclip(fused, wl) == ""

    def like(fn):  # a wrong clipper, with the right clipper's state to judge it by
        fn.state = fused.state
        return fn

    to_max = like(lambda ps: fusedclip.clip_(ps, workload.MAX_NORM))
    assert "norm after the step" in zr.check_zclip(to_max, wl)
    nothing = like(lambda ps: fusedclip.get_total_norm([p.grad for p in ps]))
    assert "no spike clipped" in zr.check_zclip(nothing, wl)
    wl.set_regime(False)
    assert zr.check_zclip(fused, wl) == ""
    scales = like(lambda ps: fusedclip.clip_(ps, 0.1))
    assert "scaled gradients that were no spike" in zr.check_zclip(scales, wl)


def test_zclip_check_rule_is_zclips():
    """The check's own statement of the rule (expected_limit) against zclip 1.0.0's _compute_clip_val and cap."""
    zclip = pytest.importorskip("zclip")
    from fusedclip.bench import zclip_rows as zr

    ref = zclip.ZClip(**zr.ARGS)
    for mean, var, norm in [(0.5, 1e-3, 10.0), (0.5, 1e-3, 0.52), (0.5, 1e-3, 0.6), (2.0, 0.04, 9.0), (0.5, 0.0, 0.5)]:
        ref.mean, ref.var = mean, var
        clip_val = ref._compute_clip_val(norm)
        want = min(norm if clip_val is None else clip_val, zr.ARGS["max_grad_norm"])
        assert zr.expected_limit(mean, var, norm) == pytest.approx(want, rel=1e-12), (mean, var, norm)


def test_results_written_after_every_set(tmp_path, monkeypatch):
    """A run killed mid-way (a GPU check's step limit) keeps every set it finished: partial.json is rewritten
    after each set; a run that ends replaces it with its full results (issue 25, defect 2: the JSON was written
    only at the end, and a set started late lost everything)."""
    from fusedclip.bench import run as run_module
    real, calls = run_module.measure_set, []

    def killed_on_second_set(cfg, clock, specs, label, *a, **k):
        calls.append(label)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(cfg, clock, specs, label, *a, **k)
    monkeypatch.setattr(run_module, "measure_set", killed_on_second_set)
    args = TINY + ["--sets", "tiny,tiny-fp16", "--providers", "torch,native", "--regimes", "clip", "--scaling",
                   "none", "--no-floor", "--no-plot", "--agc", "none", "--out", str(tmp_path)]
    with pytest.raises(KeyboardInterrupt):
        bench.main(args)
    partial = json.loads((tmp_path / run_module.PARTIAL).read_text())
    assert partial["partial"] is True and partial["copy"]["bytes_per_s"] > 0
    sets_done = {r["set"] for r in partial["results"]}
    assert sets_done == {"tiny"} and {r["provider"] for r in partial["results"]} >= {"torch", "native"}
    monkeypatch.setattr(run_module, "measure_set", real)
    assert bench.main(args) == 0
    assert not (tmp_path / run_module.PARTIAL).exists()
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".json")]) == 1


def test_gpu_expectations_are_targets():
    """The expectations the first GPU run is to confirm or refute (issue 25) are in the JSON's targets, for sets
    larger than L2 only: native no-clip >= 85% of copy, native clip >= 90% of the 3N floor and never slower than
    torch, Triton one launch >= 50% of copy, two launches >= 75%."""
    from fusedclip.bench.run import load_targets
    targets = load_targets(TARGETS).targets
    copy_bps, n = 3.0e12, 2**30

    def row(provider, regime, pct, speedup=1.0, nbytes=n):
        moved = nbytes * (2 if regime == "clip" else 1)
        bps = pct / 100.0 * copy_bps
        return {"kind": "set", "set": "llama-7b", "regime": regime, "provider": provider, "bytes": nbytes,
                "bytes_moved": moved, "median_s": moved / bps, "bytes_per_s": bps, "pct_copy": pct,
                "speedup": speedup}
    rows = [row("native", "noclip", 90.0), row("native", "clip", 2 / 3 * 100 * 0.95, 1.1),
            row("triton", "noclip", 45.0), row("triton-2", "noclip", 80.0),
            row("native", "noclip", 10.0, nbytes=2**20)]  # inside L2: not judged
    got = {t["what"]: t for t in targets(rows, {}, torch.device("cuda"), 50 * 2**20) if t["issue"] == 25}
    assert got["native: llama-7b noclip % of copy bandwidth"]["met"]
    floor = got["native: llama-7b clip 3N floor / time"]
    assert floor["met"] and abs(floor["value"] - 0.95) < 1e-9
    assert got["native: llama-7b clip speedup vs torch foreach"]["met"]
    assert not got["triton: llama-7b noclip % of copy bandwidth (one launch)"]["met"]
    assert got["triton-2: llama-7b noclip % of copy bandwidth (two launches)"]["met"]
    assert len(got) == 5


def test_dtensor_rows_targets_and_table():
    """--dtensor: the targets read from the rows (per-tensor time, the 20k call, the speedup, torch estimated from
    its largest N when it did not run), and the flag parses."""
    from fusedclip.bench import dtensor_rows as dr
    from fusedclip.bench.cli import parse

    def row(n, fused_s, plain_s, torch_s=None):
        r = {"n": n, "world": 2, "reps": 15,
             "fusedclip": {"median_s": fused_s, "min_s": fused_s, "us_per_tensor": fused_s / n * 1e6},
             "plain+group": {"median_s": plain_s, "min_s": plain_s, "us_per_tensor": plain_s / n * 1e6}}
        if torch_s is not None:
            r["torch"] = {"median_s": torch_s, "min_s": torch_s, "us_per_tensor": torch_s / n * 1e6}
        return r

    rows = [row(4000, 1.6e-3, 1.2e-3, torch_s=100e-3), row(20000, 9e-3, 6e-3)]
    checks = dict(dr.checks(rows))
    # the slope between N (0.4625 us per further DTensor), the average at each N >= 4,000, the 20k call, the speedup
    assert [ok for _, ok in dr.checks(rows)] == [True, True, True, True, True]
    assert "N=4000..20000: 0.462 us per further DTensor (<= 0.5)" in checks
    assert any("(est.)" in what for what in checks)  # torch at 20k: 25 us/tensor from 4k, 500 ms, 55x
    slow = [row(4000, 4e-3, 1.2e-3, torch_s=10e-3), row(20000, 30e-3, 6e-3)]
    assert [ok for _, ok in dr.checks(slow)] == [False, False, False, False, False]
    table = dr.table(rows)
    assert "| 20,000 | 2 | 500.00 est. | 9.00 |" in table, table
    assert parse(["--dtensor"]).dtensor == "default" and parse(["--dtensor", "1000,2000"]).dtensor == "1000,2000"


def test_step_rows(tmp_path):
    """--step --quick: the issue-26 rows (a training step with no clipping, the fused step's grad_scale alone, torch's
    clip, clip_, clip_into_ and ClipInBackward; AdaGC against an unfused torch AdaGC and clip_) on tiny models, with the targets judged and the
    machine, its load and the date written beside them."""
    from fusedclip.bench import adagc_rows

    bench.main(["--step", "mlp,many-small", "--quick", "--out", str(tmp_path), "--rounds", "1"])
    (path,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    result = json.loads((tmp_path / path).read_text())
    assert result["meta"]["load_average"] and result["meta"]["date_utc"] and result["meta"]["device_name"]
    step = {(r["model"], r["variant"]) for r in result["rows"] if r["row"] == "step"}
    assert step == {(m, v) for m in ("mlp", "many-small") for v in adagc_rows.VARIANTS}
    ada = {(r["model"], r["variant"]) for r in result["rows"] if r["row"] == "adagc"}
    assert ada == {(m, v) for m in ("mlp", "many-small") for v in ("adagc-fused", "adagc-torch", "clip_")}
    for r in result["rows"]:
        t = r.get("whole") or r["time"]
        assert 0 < t["p20_s"] <= t["median_s"] <= t["p80_s"], r
    whats = [c[0] for c in result["checks"]]
    assert len(whats) == 6 and sum("AdaGC.step / clip_" in w for w in whats) == 2
    md = (tmp_path / next(f for f in os.listdir(tmp_path) if f.endswith(".md"))).read_text()
    assert "| many-small |" in md
    assert "- mlp: the fused step's grad_scale alone (no clip) over no clipping: whole step" in md  # the floor note
    with pytest.raises(SystemExit, match="unknown model"):
        bench.main(["--step", "resnet", "--quick", "--out", str(tmp_path)])
