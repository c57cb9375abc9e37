"""The examples run, with their smallest settings, on CPU, and what they print makes sense. The LSTM plot is
optional (no matplotlib on the GPU machines): without matplotlib the example says it skipped the plot."""
import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
# runs an example as __main__ with `import matplotlib` failing (sys.modules[name] = None), as on the GPU machines
WITHOUT_MATPLOTLIB = ("import runpy, sys; sys.modules['matplotlib'] = None; script = sys.argv.pop(1); "
                      "sys.argv[0] = script; runpy.run_path(script, run_name='__main__')")


def run_example(script, *args, timeout=120, block_matplotlib=False):
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")  # small models: threads only contend
    prefix = ["-c", WITHOUT_MATPLOTLIB] if block_matplotlib else []
    proc = subprocess.run([sys.executable, *prefix, str(ROOT / "examples" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def number(text):
    return float(text)  # float() reads "nan" and "inf" as well


def test_train_transformer_small():
    out = run_example("train_transformer.py", "--small", "--device", "cpu", "--steps", "24", "--spike-step", "16",
                      "--log-every", "8")
    m = re.search(r"summary: 24 steps in [\d.]+ s = ([\d.]+) steps/s on cpu; loss ([\d.]+) -> ([\d.]+); "
                  r"(\d+) jump warning", out)
    assert m, out
    steps_per_s, first, last, warnings = float(m[1]), float(m[2]), float(m[3]), int(m[4])
    assert steps_per_s > 0 and last < first  # the copy task is learning
    # the simulated bad batch is caught, in the layer it hit, and only there
    spikes = re.findall(r"WARNING step (\d+): gradient norm of (\S+) jumped", out)
    assert ("16", "decoder.layers.0") in spikes and warnings == len(spikes), out
    assert re.search(r"step +16 +loss [\d.]+ +grad norm (\d[\d.e+]*)", out)
    assert float(re.search(r"step +16 +loss [\d.]+ +grad norm (\S+)", out)[1]) > 10  # the spike reached the clip
    m = re.search(r"per step: fusedclip ([\d.]+) ms, torch.nn.utils.clip_grad_norm_ ([\d.]+) ms .*"
                  r"largest relative difference of their norms (\S+)", out)
    assert m, out
    assert float(m[1]) > 0 and float(m[2]) > 0
    assert float(m[3]) < 1e-5  # fusedclip and torch clipped the same gradients to the same norm


def test_train_lstm_explodes_without_clipping(tmp_path):
    png = tmp_path / "lstm.png"
    out = run_example("train_lstm.py", "--steps", "40", "--batch", "16", "--out", str(png))
    runs = {}
    for m in re.finditer(r"^(without clipping|with fusedclip\S*): loss (\S+) -> (\S+) \(final\); gradient norm at "
                         r"step 0 (\S+), largest finite (\S+)", out, re.M):
        runs[m[1].split(":")[0].split("(")[0]] = [number(x.rstrip(",")) for x in m.groups()[1:]]
    assert set(runs) == {"without clipping", "with fusedclip.clip_"}, out
    first, last, norm0, peak = runs["without clipping"]
    assert peak > 1000 * norm0  # the explosion is real: the gradient norm grew by orders of magnitude
    assert not math.isfinite(last) or last > 10 * first
    c_first, c_last, _, _ = runs["with fusedclip.clip_"]
    assert c_first == first  # same initial weights and data
    assert math.isfinite(c_last) and c_last < c_first
    assert not math.isfinite(last) or c_last < last
    if HAS_MATPLOTLIB:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    else:
        assert "plot skipped: matplotlib not installed" in out and not png.exists()


def test_train_lstm_without_matplotlib(tmp_path):
    png = tmp_path / "lstm.png"
    out = run_example("train_lstm.py", "--steps", "3", "--batch", "4", "--out", str(png), block_matplotlib=True)
    assert "plot skipped: matplotlib not installed" in out and "with fusedclip.clip_" in out
    assert not png.exists()


def zclip_runs(out):
    """The summary lines of examples/train_zclip.py: {run: (loss before the first spike, largest loss after it,
    final loss, steps clipped)}."""
    runs = {}
    for m in re.finditer(r"^(without clipping|with fusedclip\S*): loss \S+ -> (\S+) \(before the first spike\) -> "
                         r"(\S+) \(final\); largest loss after a spike (\S+); largest gradient norm \S+; "
                         r"steps clipped (\d+)$", out, re.M):
        runs[m[1].split("(")[0]] = (number(m[2]), number(m[4]), number(m[3]), int(m[5]))
    return runs


def test_train_zclip_spikes(tmp_path):
    """Injected gradient spikes: without clipping the loss jumps by orders of magnitude after the first one;
    with fusedclip.ZClip every spike is clipped, the norm after clipping never exceeds ZClip's threshold, the
    loss after the spikes stays near where it was, and the regular steps are not clipped."""
    png = tmp_path / "zclip.png"
    out = run_example("train_zclip.py", "--steps", "60", "--spike-steps", "30,45", "--warmup-steps", "10",
                      "--out", str(png))
    runs = zclip_runs(out)
    assert set(runs) == {"without clipping", "with fusedclip.clip_", "with fusedclip.ZClip"}, out
    before, worst, _, clipped = runs["without clipping"]
    assert clipped == 0 and (not math.isfinite(worst) or worst > 100 * before)  # diverged
    z_before, z_worst, z_final, z_clipped = runs["with fusedclip.ZClip"]
    assert z_before == before  # same weights, same batches until the first spike (nothing clipped before it)
    assert math.isfinite(z_worst) and z_worst < 3 * z_before and z_final < 2 * z_before
    assert z_clipped == 2  # the two spikes, and no regular step
    m = re.search(r"ZClip: (\d+) of (\d+) spikes clipped \(steps ([\d, ]+)\); steps whose norm after clipping "
                  r"exceeds the threshold: (\d+)", out)
    assert m and (m[1], m[2], m[3], m[4]) == ("2", "2", "30, 45", "0"), out
    if HAS_MATPLOTLIB:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    else:
        assert "plot skipped: matplotlib not installed" in out and not png.exists()


def test_train_zclip_without_matplotlib(tmp_path):
    png = tmp_path / "zclip.png"
    out = run_example("train_zclip.py", "--steps", "12", "--spike-steps", "8", "--warmup-steps", "4", "--no-fixed",
                      "--out", str(png), block_matplotlib=True)
    assert "plot skipped: matplotlib not installed" in out and set(zclip_runs(out)) == {
        "without clipping", "with fusedclip.ZClip"}
    assert not png.exists()
