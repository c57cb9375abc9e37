"""The GPU checks as tests (issue 25): what only a GPU can tell, run by scripts/gpu_check.sh in steps against one
deadline. Without a CUDA GPU (`make test` here) every test in this folder skips with the reason "no CUDA GPU",
except those marked `cpu_logic`: the checks' own logic that a CPU can run (the float64 ZClip rule, the residency
rule, the capture refusal's order in the source), which runs everywhere.

Deadline-aware: FUSEDCLIP_GPU_DEADLINE (epoch seconds, time.time()) is when this pytest run will be killed
(gpu_check.sh sets it to the end of the step's limit, less a margin). A test whose expected time (marker
`gpu_seconds(S)`, default DEFAULT_SECONDS) does not fit before it is SKIPPED, saying how much time was left, so
the step ends inside its limit with every result named instead of being killed in the middle of a test.

One line per result as it happens: run with -v (gpu_check.sh does); each result line is flushed the moment it is
written, so a run killed at any point keeps the names of what passed and failed. A test's measurements
(record_property("note", text)) are printed under its result line. FUSEDCLIP_GPU_TEST_TIMEOUT (s, default 40):
after that long in one test, faulthandler dumps every thread's stack (where it hangs; gpu_check.sh reads the
last dump to tell a compiler from a hang), at the latest 2 s before the deadline.
"""
import faulthandler
import os
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
HAS_CUDA = torch.cuda.is_available()
DEFAULT_SECONDS = 5.0
NO_GPU = "no CUDA GPU"
_config = [None]


def deadline():
    """FUSEDCLIP_GPU_DEADLINE as a float, or None when unset (no deadline)."""
    value = os.environ.get("FUSEDCLIP_GPU_DEADLINE")
    return float(value) if value else None


def expected_seconds(item):
    marker = item.get_closest_marker("gpu_seconds")
    return float(marker.args[0]) if marker else DEFAULT_SECONDS


def pytest_configure(config):  # historic: called for this conftest too when it loads during collection
    _config[0] = config
    config.addinivalue_line("markers", "gpu_seconds(s): the time a test is expected to take on the GPU (tests/gpu: "
                                       "skipped when less than that is left before FUSEDCLIP_GPU_DEADLINE)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")  # as pyproject.toml's
    config.addinivalue_line("markers", "cpu_logic: a tests/gpu test of the checks' own logic that runs on a CPU")
    config.addinivalue_line("markers", "smoke: the first GPU step of scripts/gpu_check.sh (what must work before "
                                       "anything else is worth running)")


def _here(item):
    return HERE in Path(str(item.fspath)).resolve().parents


@pytest.hookimpl(tryfirst=True)  # before -m selects: `-m gpu` elsewhere sees these marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        if not _here(item) or item.get_closest_marker("cpu_logic"):
            continue
        item.add_marker(pytest.mark.gpu)
        if not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason=NO_GPU))


def pytest_runtest_setup(item):
    end = deadline()
    if end is None:
        return
    left, need = end - time.time(), expected_seconds(item)
    if left < need:
        pytest.skip(f"deadline: {max(left, 0.0):.0f} s left before FUSEDCLIP_GPU_DEADLINE, this test expects "
                    f"{need:.0f} s")
    timeout = min(float(os.environ.get("FUSEDCLIP_GPU_TEST_TIMEOUT", 40)), left - 2)
    if timeout > 0:
        try:
            faulthandler.dump_traceback_later(timeout, exit=False, file=_stderr_fd(item.config))
        except (ValueError, OSError, AttributeError):  # no file descriptor behind stderr: no dump then
            pass


def _stderr_fd(config):
    """The real stderr (pytest's faulthandler plugin's copy of it): during a test, file descriptor 2 is pytest's
    capture file, which a killed run never shows."""
    try:
        from _pytest.faulthandler import fault_handler_stderr_fd_key
        return config.stash[fault_handler_stderr_fd_key]
    except (ImportError, KeyError, AttributeError):
        return sys.__stderr__


def pytest_runtest_teardown(item):
    if deadline() is not None:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(autouse=True)
def _cuda_errors_belong_to_their_test(request):
    """An asynchronous CUDA error surfaces at the next sync: sync at teardown so that it fails the test that made
    it (as an error in its teardown), not a later one; then give the cached memory back for the next set."""
    yield
    if HAS_CUDA and not request.node.get_closest_marker("cpu_logic"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


@pytest.hookimpl(trylast=True)  # after the terminal reporter wrote the result
def pytest_runtest_logreport(report):
    reporter = _config[0] and _config[0].pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    if report.when == "call" or (report.when == "setup" and report.skipped):
        for name, value in report.user_properties:
            if name == "note":
                reporter.write_line(f"    > {value}")
    reporter._tw.flush()  # the line is out before the next test starts: a killed run keeps it

