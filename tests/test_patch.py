"""fusedclip.patch: torch.nn.utils' clipping names routed to fusedclip and restored exactly, in plain
training loops and, where installed, through Accelerate and Lightning."""
import math
import threading

import pytest
import torch
import torch.nn.utils.clip_grad

import fusedclip
import fusedclip.clip
from fusedclip.testing import TOL, grads_of, ref_norm, rel_err
from fusedclip import patch

NAMES = ["clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_", "clip_grad_value_"]
MODULES = {"torch.nn.utils": torch.nn.utils, "torch.nn.utils.clip_grad": torch.nn.utils.clip_grad}
# Everything clipping-related in both modules, captured before any test patches anything.
ORIGINALS = {(mname, n): getattr(m, n) for mname, m in MODULES.items() for n in dir(m)
             if "clip" in n or "norm" in n}


def assert_torch_intact():
    for (mname, n), obj in ORIGINALS.items():
        assert getattr(MODULES[mname], n) is obj, f"{mname}.{n} is not torch's original object"


@pytest.fixture(autouse=True)
def restore_torch():
    assert not patch.is_patched()
    yield
    patch.unpatch_torch()
    assert_torch_intact()


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls that reach fusedclip's public functions (the patched names call them by module
    attribute, so a spy there sees exactly what got routed) and records what they return."""
    calls = {"clip_": [], "get_total_norm": [], "clip_grads_with_norm_": [], "clip_value_": [], "clip_agc_": []}
    for name in calls:
        module = fusedclip.agc if name == "clip_agc_" else fusedclip.clip
        real = getattr(module, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            calls[_name].append(None)  # counted even when the call raises
            calls[_name][-1] = out = _real(*args, **kwargs)
            return out

        monkeypatch.setattr(module, name, wrapper)
    return calls


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
                               torch.nn.Linear(32, 4))


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 16, generator=g) * 4, torch.randn(8, 4, generator=g)


def torch_style_loop(steps=5, max_norm=0.05):
    """A nanoGPT-style loop written against torch's names only. Returns the per-step norms (from each of
    the four functions, reached in the ways real code reaches them), the float64 reference of each clipped
    norm, and the final parameters."""
    from torch.nn.utils import clip_grad_norm_  # looked up when the loop runs: sees the patch if installed

    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    log = []
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        ref = ref_norm(grads_of(model.parameters()), 2.0)
        if step % 3 == 0:
            norm = torch.nn.utils.clip_grad_norm_((p for p in model.parameters()), max_norm=max_norm)
        elif step % 3 == 1:
            norm = torch.nn.utils.clip_grad.clip_grad_norm_(model.parameters(), max_norm, norm_type=2.0,
                                                           error_if_nonfinite=True, foreach=None)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()], norm_type=2.0)
            torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm=max_norm, total_norm=norm)
        after = clip_grad_norm_(model.parameters(), max_norm=math.inf, norm_type=math.inf)  # does not clip
        torch.nn.utils.clip_grad_value_(model.parameters(), clip_value=0.01)
        opt.step()
        log.append((norm, ref, after))
    return log, [p.detach().clone() for p in model.parameters()]


def test_loop_patched_matches_fusedclip_and_torch(spy):
    unpatched_log, unpatched_params = torch_style_loop()
    assert not any(spy.values()), "unpatched torch called fusedclip"

    patch.patch_torch()
    patched_log, patched_params = torch_style_loop()
    patch.unpatch_torch()
    # every call went through fusedclip: 2 clip_grad_norm_ + 1 get_total_norm/clip_grads_with_norm_ pair per
    # 3 steps, the inf-norm check and the value clip every step
    assert len(spy["clip_"]) == 5 + 4 and len(spy["get_total_norm"]) == 1
    assert len(spy["clip_grads_with_norm_"]) == 1 and len(spy["clip_value_"]) == 5

    rtol, atol = TOL[torch.float32]
    for (norm, ref, after), (tnorm, _, tafter) in zip(patched_log, unpatched_log):
        assert norm.dim() == 0 and norm.dtype == torch.float32
        assert rel_err(norm, ref) <= 2e-6  # fusedclip's norm is float64-accurate to fp32 rounding
        assert float(norm) > 0.05  # the loop really clips
        assert float(after) <= 0.05 * (1 + 1e-5)  # the inf norm after clipping is at most the 2-norm
        torch.testing.assert_close(norm, tnorm, rtol=1e-5, atol=atol)
        torch.testing.assert_close(after, tafter, rtol=1e-5, atol=atol)
    for p, q in zip(patched_params, unpatched_params):
        torch.testing.assert_close(p, q, rtol=10 * rtol, atol=10 * atol)


def test_loop_patched_is_fusedclip_called_directly():
    """The patched loop gives bit-for-bit what the same loop gives calling fusedclip itself."""
    with patch.patched():
        log, params = torch_style_loop()
    assert_torch_intact()
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(len(log)):
        x, y = batch(step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if step % 3 == 2:
            norm = fusedclip.get_total_norm([p.grad for p in model.parameters()])
            fusedclip.clip_grads_with_norm_(model.parameters(), 0.05, norm)
        else:
            norm = fusedclip.clip_(model.parameters(), 0.05)
        after = fusedclip.clip_(model.parameters(), math.inf, math.inf)
        fusedclip.clip_value_(model.parameters(), 0.01)
        opt.step()
        assert torch.equal(norm, log[step][0]) and torch.equal(after, log[step][2])
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p.detach(), q)


def test_unpatch_restores_identity():
    patch.patch_torch()
    assert patch.is_patched()
    for name in NAMES:
        assert getattr(torch.nn.utils, name) is getattr(patch, name)
    assert torch.nn.utils.clip_grad.clip_grad_norm_ is patch.clip_grad_norm_
    assert torch.nn.utils.clip_grad.clip_grad_value_ is patch.clip_grad_value_
    # torch's private helpers (what backend="torch" runs) and the deprecated clip_grad_norm stay torch's
    assert torch.nn.utils.clip_grad._get_total_norm is ORIGINALS[("torch.nn.utils.clip_grad", "_get_total_norm")]
    assert torch.nn.utils.clip_grad_norm is ORIGINALS[("torch.nn.utils", "clip_grad_norm")]
    patch.unpatch_torch()
    assert not patch.is_patched()
    assert_torch_intact()
    patch.unpatch_torch()  # unpatching when not patched is a no-op
    assert_torch_intact()


def test_patching_twice_is_harmless(spy):
    patch.patch_torch()
    patch.patch_torch()
    assert torch.nn.utils.clip_grad_norm_ is patch.clip_grad_norm_  # installed once, not wrapped twice
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    assert float(torch.nn.utils.clip_grad_norm_(p, 1.0)) == pytest.approx(5.0)
    assert len(spy["clip_"]) == 1
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8, 0.0]), rtol=1e-5, atol=1e-6)
    patch.unpatch_torch()  # one unpatch restores
    assert_torch_intact()


def test_context_manager_restores_on_exception():
    with pytest.raises(KeyError):
        with patch.patched():
            assert torch.nn.utils.clip_grad_norm_ is patch.clip_grad_norm_
            raise KeyError("boom")
    assert not patch.is_patched()
    assert_torch_intact()


def test_context_manager_as_decorator():
    @patch.patched()
    def step():
        return torch.nn.utils.clip_grad_norm_ is patch.clip_grad_norm_

    assert step() and step()
    assert_torch_intact()


def test_nesting(spy):
    p = torch.nn.Parameter(torch.zeros(2))
    with patch.patched():
        with patch.patched(backend="torch"):
            assert patch._backend == "torch"
        assert patch.is_patched() and patch._backend == "auto"  # the outer block's state comes back
        patch.patch_torch()  # an explicit patch made inside a block outlives it
    assert patch.is_patched()
    p.grad = torch.ones(2)
    torch.nn.utils.clip_grad_norm_(p, 1.0)
    assert len(spy["clip_"]) == 1
    with patch.patched():
        patch.unpatch_torch()  # the hard off switch, even inside a block
        assert_torch_intact()
    assert_torch_intact()  # and the block's exit does not re-patch


def test_backend_torch_does_not_recurse_and_matches_torch():
    """patched(backend="torch") hands calls to torch's original functions: no recursion through the patch,
    and the results are torch's to the bit."""
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(s, generator=g) * 3 for s in [(5, 7), (130,), ()]]
    params, ref_params = [], []
    for gr in grads:
        for lst in (params, ref_params):
            q = torch.nn.Parameter(torch.zeros_like(gr))
            q.grad = gr.clone()
            lst.append(q)
    with patch.patched(backend="torch"):
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        total = torch.nn.utils.get_total_norm([q.grad for q in params])
        torch.nn.utils.clip_grad_value_(params, 0.1)
    ref = ORIGINALS[("torch.nn.utils", "clip_grad_norm_")](ref_params, 1.0)
    ref_total = ORIGINALS[("torch.nn.utils", "get_total_norm")]([q.grad for q in ref_params])
    ORIGINALS[("torch.nn.utils", "clip_grad_value_")](ref_params, 0.1)
    assert torch.equal(norm, ref) and torch.equal(total, ref_total)
    for q, r in zip(params, ref_params):
        assert torch.equal(q.grad, r.grad)


def test_torch_signature_and_semantics(spy):
    g = torch.Generator().manual_seed(2)
    params = [torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.bfloat16)) for _ in range(3)]
    for q in params:
        q.grad = (torch.randn(4, 4, generator=g) * 10).to(torch.bfloat16)
    ref = ref_norm(grads_of(params), 2.0)
    with patch.patched():
        norm = torch.nn.utils.clip_grad_norm_(parameters=(q for q in params), max_norm=1.0, norm_type=2,
                                              error_if_nonfinite=True, foreach=True)
        assert norm.dim() == 0 and norm.dtype == torch.bfloat16
        # fusedclip accumulates bf16 grads in fp32 and rounds the norm once
        assert rel_err(norm, ref) <= 2.0**-8
        params[0].grad[0, 0] = float("nan")
        before = [q.grad.clone() for q in params]
        with pytest.raises(RuntimeError, match="is non-finite, so it cannot be clipped"):
            torch.nn.utils.clip_grad_norm_(params, max_norm=1.0, error_if_nonfinite=True)
        for q, b in zip(params, before):  # nothing changed
            assert torch.equal(q.grad.view(torch.int16), b.view(torch.int16))
        with pytest.warns(UserWarning, match="empty generator"):
            empty = torch.nn.utils.clip_grad_norm_((q for q in []), 1.0)
        assert empty.dim() == 0 and float(empty) == 0.0
        torch.nn.utils.clip_grad_value_(params[1:], clip_value=0.5)
        assert all(float(q.grad.abs().max()) <= 0.5 for q in params[1:])
    assert len(spy["clip_"]) == 3 and len(spy["clip_value_"]) == 1


def test_deprecated_clip_grad_norm_routes_with_its_warning(spy):
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    with patch.patched():
        with pytest.warns(FutureWarning, match="deprecated"):
            norm = torch.nn.utils.clip_grad_norm(p, max_norm=1.0)
    assert float(norm) == pytest.approx(5.0) and len(spy["clip_"]) == 1


def test_foreign_replacement_is_left_alone():
    def theirs(*args, **kwargs):
        raise AssertionError("not called")

    patch.patch_torch()
    torch.nn.utils.clip_grad_value_ = theirs
    try:
        patch.unpatch_torch()
        assert torch.nn.utils.clip_grad_value_ is theirs  # someone else's patch: not overwritten
        assert torch.nn.utils.clip_grad_norm_ is ORIGINALS[("torch.nn.utils", "clip_grad_norm_")]
    finally:
        torch.nn.utils.clip_grad_value_ = ORIGINALS[("torch.nn.utils", "clip_grad_value_")]


def test_unknown_backend_is_refused_before_patching():
    with pytest.raises(ValueError, match="unknown backend"):
        patch.patch_torch(backend="cudnn")
    with pytest.raises(ValueError, match="unknown backend"):
        with patch.patched(backend="nope"):
            pass
    assert_torch_intact()


def test_blocks_in_several_threads():
    """Blocks opened and closed concurrently: inside each, torch is patched whatever the other threads do;
    after the last one closes, torch's objects are back."""
    errors = []
    barrier = threading.Barrier(4)

    def worker(seed):
        try:
            barrier.wait()
            for i in range(300):
                with patch.patched(backend="torch" if (seed + i) % 2 else "auto"):
                    if torch.nn.utils.clip_grad_norm_ is not patch.clip_grad_norm_:
                        errors.append(f"thread {seed}, iteration {i}: not patched inside a block")
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert not patch.is_patched()
    assert_torch_intact()


# ---- the frameworks, where installed -------------------------------------------------------------------


def test_accelerate_clip_grad_norm_goes_through_fusedclip(spy):
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    x, y = batch(0)
    loss = torch.nn.functional.mse_loss(model(x), y)
    accelerator.backward(loss)
    ref = ref_norm(grads_of(model.parameters()), 2.0)
    with patch.patched():
        norm = accelerator.clip_grad_norm_(model.parameters(), max_norm=0.05)
        accelerator.clip_grad_value_(model.parameters(), clip_value=2.0**-10)
    assert len(spy["clip_"]) == 1 and len(spy["clip_value_"]) == 1
    assert norm is spy["clip_"][0] and rel_err(norm, ref) <= 2e-6 and float(ref) > 0.05
    assert max(float(p.grad.abs().max()) for p in model.parameters()) <= 2.0**-10
    opt.step()


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_lightning_trainer_gradient_clipping_goes_through_fusedclip(spy, algorithm):
    pl = pytest.importorskip("lightning.pytorch")

    clip_val = 0.05 if algorithm == "norm" else 0.001
    seen = {}

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tiny_model()

        def training_step(self, xy, _):
            x, y = xy
            return torch.nn.functional.mse_loss(self.net(x), y)

        def on_before_optimizer_step(self, optimizer):  # runs before Lightning clips
            seen.setdefault("pre", []).append(ref_norm(grads_of(self.parameters()), 2.0))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = [batch(i) for i in range(3)]
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", devices=1, gradient_clip_val=clip_val,
                         gradient_clip_algorithm=algorithm, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with patch.patched():
        trainer.fit(Module(), train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    if algorithm == "norm":
        assert len(spy["clip_"]) == 3 and not spy["clip_value_"]
        for norm, ref in zip(spy["clip_"], seen["pre"]):  # the norms of the gradients Lightning clipped
            assert rel_err(norm, ref) <= 2e-6 and float(ref) > clip_val
    else:
        assert len(spy["clip_value_"]) == 3 and not spy["clip_"]
