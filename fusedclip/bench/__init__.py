"""python -m fusedclip bench: fusedclip against torch (and apex) on the gradient sets people train.

One module per concern (bench/README.md says what is measured and why):

- sets.py       the parameter sets, computed from model configs; the scaling curves' sizes
- machine.py    the machine: last-level cache, free memory, versions
- workload.py   the gradients to clip (rotated copies, a pristine one), the regimes, the correctness check
- providers.py  the implementations timed (torch, torch.compile, fusedclip's backends, apex)
- extras.py     --extras: unscale_ + clip and clip + optimizer step, fused and not
- zclip_rows.py --zclip: fusedclip.ZClip.step against zclip 1.0.0's ZClip.step and plain clip_
- dtensor_rows.py --dtensor: N DTensor gradients on Gloo ranks, torch vs fusedclip, host time per tensor
- timing.py     how a call is timed, the statistics, the busy processes, launch counting
- reference.py  the copy bandwidth and the memory floor, measured in the same run
- run.py        sets x regimes x providers, the scaling curves: the result
- report.py     progress lines, tables, markdown, JSON, file names
- plot.py       the PNG
- cli.py        the flags

The issues' targets are the repository's bench/targets.py (--targets), not part of the installed package.
"""
from .cli import main

__all__ = ["main"]
