"""A pytest plugin: zclip 1.0.0's own test suite, run against fusedclip.ZClip (`make test-zclip-upstream`).

    PYTHONPATH=tests/zclip_upstream python -m pytest -p fusedclip_as_zclip -c tests/zclip_upstream/pytest.ini \
        [--fusedclip-backend=triton] <unpacked zclip-1.0.0 sdist>/tests

Run from the repository root (`python -m` puts it first on sys.path: this checkout's fusedclip is the one tested).
Before the test modules import it, the `zclip` package's ZClip becomes fusedclip.ZClip: zclip.ZClip,
zclip.zclip.ZClip and the name zclip's Lightning callback builds its clipper with. With --fusedclip-backend other
than "auto" it is a subclass of fusedclip.ZClip whose backend defaults to that one (backend="triton" on CPU needs
TRITON_INTERPRET=1 in the environment, set before Triton is imported). The tests that use zclip's private methods
(fusedclip.ZClip has none of them: its step is one fused pass) and the one that fails on zclip itself are
deselected, each with its reason in the summary; a deselected test that is no longer in the suite is an error, so
the list cannot go stale silently.
"""
import pytest

# test file::class::name -> why it does not run against fusedclip.ZClip
DESELECTED = {
    "test_zclip.py::TestZClip::test_zscore_clipping":
        "replaces zclip's private _compute_grad_norm to feed a made-up norm",
    "test_zclip.py::TestZClip::test_percentile_clipping":
        "replaces zclip's private _compute_grad_norm to feed a made-up norm",
    "test_zclip.py::TestZClip::test_skip_update_on_spike":
        "replaces zclip's private _compute_grad_norm and _compute_clip_val",
    "test_zclip.py::TestZClip::test_adaptive_scaling_threshold": "calls zclip's private _compute_clip_val",
    "test_zclip.py::TestZClip::test_mean_threshold": "calls zclip's private _compute_clip_val",
    "test_zclip_integration.py::TestZClipIntegration::test_clip_option_adaptive_scaling":
        "replaces zclip's private _compute_clip_val with a spy",
    "test_zclip_lightning_callback.py::TestZClipLightningCallback::test_callback_called_before_optimizer":
        "fails on zclip 1.0.0 itself: its DataLoader adds a batch dimension, and CrossEntropyLoss rejects the "
        "targets' shape (Expected target size [1, 2], got [1, 5])",
}


def pytest_addoption(parser):
    parser.addoption("--fusedclip-backend", default="auto",
                     help="the backend fusedclip.ZClip runs zclip's tests with (auto, native, triton, torch)")


def _key(item):
    cls = item.cls.__name__ + "::" if item.cls is not None else ""
    return f"{item.path.name}::{cls}{item.name}"


def pytest_configure(config):
    import fusedclip
    import zclip
    import zclip.zclip

    backend = config.getoption("fusedclip_backend")
    if backend == "auto":
        cls = fusedclip.ZClip
    else:
        if backend not in fusedclip.available_backends("cpu"):
            raise pytest.UsageError(f"--fusedclip-backend={backend}: not available on CPU here (available: "
                                    f"{fusedclip.available_backends('cpu')}; Triton needs TRITON_INTERPRET=1)")

        class ZClip(fusedclip.ZClip):
            def __init__(self, *args, **kwargs):
                kwargs.setdefault("backend", backend)
                super().__init__(*args, **kwargs)

        cls = ZClip
    zclip.ZClip = zclip.zclip.ZClip = cls
    assert issubclass(zclip.ZClip, fusedclip.ZClip)
    callback = getattr(zclip, "zclip_lightning_callback", None)  # imported by zclip when Lightning is there
    if callback is not None:
        callback.ZClip = cls
    config._fusedclip_as_zclip = (fusedclip.__file__, backend, cls)


def pytest_collection_modifyitems(config, items):
    keep, dropped = [], []
    for item in items:
        (dropped if _key(item) in DESELECTED else keep).append(item)
    missing = set(DESELECTED) - {_key(item) for item in dropped}
    if missing:
        raise pytest.UsageError(f"fusedclip_as_zclip: tests to deselect that zclip's suite no longer has: "
                                f"{sorted(missing)}")
    items[:] = keep
    config.hook.pytest_deselected(items=dropped)
    config._fusedclip_as_zclip_dropped = [(item.nodeid, DESELECTED[_key(item)]) for item in dropped]


def pytest_terminal_summary(terminalreporter, config):
    path, backend, cls = config._fusedclip_as_zclip
    terminalreporter.section("fusedclip_as_zclip")
    terminalreporter.write_line(f"zclip.ZClip was fusedclip.ZClip ({cls.__module__}.{cls.__qualname__}), "
                                f"backend={backend!r}, fusedclip from {path}")
    for nodeid, why in getattr(config, "_fusedclip_as_zclip_dropped", []):
        terminalreporter.write_line(f"deselected {nodeid}: {why}")
