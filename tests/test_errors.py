"""Error messages name the public entry point once: "fusedclip.<entry point>: <what is wrong>". The internal
passes take the entry point's name (without the package) and add the "fusedclip." prefix themselves, so a caller
that passed an already-prefixed name made messages such as "fusedclip.fusedclip.ZClip.step: ..."."""
import re

import pytest
import torch

import fusedclip
from fusedclip import backends
from fusedclip.backends.native import NativeBackend
from fusedclip.testing import make_params

ONCE = re.compile(r"^fusedclip\.(?!fusedclip\.)[A-Za-z_][A-Za-z_.]*: ")


def message(excinfo):
    return str(excinfo.value)


class _NoFusedZClip(NativeBackend):
    """The native kernels without a fused ZClip step: ZClip runs its rule in torch ops over the backend's norm
    (the path of gradients on several devices and of backends that declare no ZClip kernel)."""
    name = "native-no-zclip"
    fused_zclip = False


@pytest.fixture
def no_fused_zclip(monkeypatch):
    if "native" not in fusedclip.available_backends("cpu"):
        pytest.skip("the extension did not load")
    monkeypatch.setitem(backends.BACKENDS, _NoFusedZClip.name, _NoFusedZClip)
    backends._resolved.clear()
    yield _NoFusedZClip.name
    backends._resolved.clear()


def test_zclip_step_error_is_prefixed_once(no_fused_zclip):
    """A sparse gradient reaches the norm pass, whose error names ZClip.step (it used to read
    "fusedclip.fusedclip.ZClip.step: ...")."""
    clipper = fusedclip.ZClip(warmup_steps=2, backend=no_fused_zclip)
    p = torch.nn.Parameter(torch.zeros(5, 3))
    p.grad = torch.randn(5, 3).to_sparse()
    with pytest.raises(NotImplementedError) as e:
        clipper.step([p])
    assert ONCE.match(message(e)), message(e)
    assert message(e).startswith("fusedclip.ZClip.step: tensor 0 is torch.sparse_coo")


def test_zclip_step_runs_without_a_fused_kernel(no_fused_zclip):
    """The same backend on ordinary gradients: ZClip's torch-ops rule over its norm gives the fused step's result."""
    a = make_params([(33, 5), (7,)], [torch.float32], seed=3, scale="mixed", noncontig=False)
    b = make_params([(33, 5), (7,)], [torch.float32], seed=3, scale="mixed", noncontig=False)
    ours, fused = fusedclip.ZClip(warmup_steps=2, backend=no_fused_zclip), fusedclip.ZClip(warmup_steps=2)
    for _ in range(4):
        torch.testing.assert_close(ours.step(a), fused.step(b), rtol=1e-6, atol=0)
        for x, y in zip(a, b):
            torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=0)


def _bad_calls():
    params = make_params([(4, 3), (5,)], [torch.float32], seed=1)
    sparse = torch.nn.Parameter(torch.zeros(5, 3))
    sparse.grad = torch.randn(5, 3).to_sparse()
    expanded = torch.nn.Parameter(torch.zeros(4, 3))
    expanded.grad = torch.randn(1, 3).expand(4, 3)
    opt = torch.optim.SGD(params, lr=0.1)
    fused = torch.optim.SGD(params, lr=0.1, fused=True)
    scaler = torch.amp.GradScaler("cpu")
    return {
        "clip_ norm_type": lambda: fusedclip.clip_(params, 1.0, "bogus"),
        "clip_ max_norm": lambda: fusedclip.clip_(params, "x"),
        "clip_ on_nonfinite": lambda: fusedclip.clip_(params, 1.0, on_nonfinite="bogus"),
        "clip_ sparse": lambda: fusedclip.clip_([sparse], 1.0, backend="native"),
        "clip_ expanded": lambda: fusedclip.clip_([expanded], 1e-9, backend="native"),
        "clip_grad_norm_ norm_type": lambda: fusedclip.clip_grad_norm_(params, 1.0, float("nan")),
        "get_total_norm sparse": lambda: fusedclip.get_total_norm([sparse.grad], backend="native"),
        "get_total_norm items": lambda: fusedclip.get_total_norm([1.0, 2.0]),
        "clip_grads_with_norm_ total_norm": lambda: fusedclip.clip_grads_with_norm_(params, 1.0, "x"),
        "unscale_clip_ norm_type": lambda: fusedclip.unscale_clip_(scaler, opt, 1.0, norm_type="bogus"),
        "clip_into_ max_norm": lambda: fusedclip.clip_into_(fused, "x"),
        "clip_into_ norm_type": lambda: fusedclip.clip_into_(fused, 1.0, float("nan")),
        "clip_agc_ eps": lambda: fusedclip.clip_agc_(params, 0.01, float("nan")),
        "ZClip alpha": lambda: fusedclip.ZClip(alpha=2.0),
        "ZClip backend": lambda: fusedclip.ZClip(backend="bogus"),
        "ZClip.step expanded": lambda: fusedclip.ZClip().step([expanded]),
    }


@pytest.mark.parametrize("name", list(_bad_calls()))
def test_public_entry_points_prefix_once(name):
    with pytest.raises((TypeError, ValueError, RuntimeError, NotImplementedError)) as e:
        _bad_calls()[name]()
    assert ONCE.match(message(e)), message(e)


def test_zclip_layout_is_checked_against_the_built_module(monkeypatch):
    """ZClip's config and state layouts (fusedclip/ops.py ZCLIP_CONFIG / ZCLIP_STATE) match the built kernels'
    (csrc/common/zclip_rule.h, through build_info); a stale build with another layout makes ZClip refuse to be made
    (backend='torch' still runs), rather than its kernels reading the settings from the wrong slots."""
    from fusedclip import _ext, ops
    from fusedclip import zclip as zclip_module
    if not _ext.LOADED:
        pytest.skip("the extension did not load")
    assert ops.zclip_layout_mismatch() is None
    info = _ext.build_info()
    monkeypatch.setattr(_ext, "build_info", lambda: dict(info, zclip_config_len="11"))
    why = ops.zclip_layout_mismatch()
    assert why and "config of 11 values" in why and "rebuild" in why, why
    monkeypatch.setattr(zclip_module, "_LAYOUT_MISMATCH", why)
    with pytest.raises(RuntimeError, match="ZClip layout"):
        fusedclip.ZClip()
    fusedclip.ZClip(backend="torch")


def test_zclip_names_a_non_tensor_item():
    """ZClip.step and apply_in_place_clipping say which item is not a tensor (as clip_ does), before anything is
    written or any state moves."""
    g = torch.Generator().manual_seed(31)
    p = torch.nn.Parameter(torch.randn(8, generator=g))
    p.grad = torch.randn(8, generator=g) * 10
    before = p.grad.clone()
    z = fusedclip.ZClip(warmup_steps=1)
    for call in (lambda: z.step([p, "x"]), lambda: z.apply_in_place_clipping([p, "x"], 10.0, 1.0)):
        with pytest.raises(TypeError, match=r"ZClip\.\w+: parameters must be Tensors, but item 1 is a str"):
            call()
    assert torch.equal(p.grad, before) and z.steps == 0
