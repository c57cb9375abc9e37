"""fusedclip.patch_torch() under the frameworks people train with, on CPU: Hugging Face transformers.Trainer
(max_grad_norm), timm's dispatch_clip_grad, and FSDP1's FullyShardedDataParallel.clip_grad_norm_ (Gloo,
2 processes). Each checks that the clipping reaches fusedclip (a spy on fusedclip.clip) and that the
result is torch's (or FSDP's own). The frameworks are installed by `make setup`; a missing one is skipped."""
import datetime
import functools
import math
import os
import warnings

import pytest
import torch
import torch.distributed as dist

import fusedclip
import fusedclip.clip
from fusedclip.testing import clone_params, grads_of, make_params, ref_norm, rel_err, run_cases, run_ranks
from fusedclip import patch
from test_patch import batch, restore_torch, spy, tiny_model  # noqa: F401  (restore_torch, spy: fixtures)

INF = math.inf


# ---- Hugging Face transformers.Trainer -------------------------------------------------------------------


def hf_train(tmp_path, max_grad_norm, steps=4):
    """A seeded Trainer run of a tiny GPT-2 built from a config (no download) on in-memory token batches.
    Returns the logged grad_norm of every step and the final parameters."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 64, (4 * steps, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
        max_grad_norm=max_grad_norm, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
        disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(norms) == steps
    return norms, [p.detach().clone() for p in model.parameters()]


def test_hf_trainer_max_grad_norm_goes_through_fusedclip(spy, monkeypatch, tmp_path):  # noqa: F811
    max_grad_norm = 0.5
    torch_norms, torch_params = hf_train(tmp_path / "torch", max_grad_norm)
    assert not spy["clip_"], "unpatched torch called fusedclip"

    refs = []  # the float64 norm of the gradients each call is about to clip
    spied = fusedclip.clip.clip_

    def recording(parameters, *args, **kwargs):
        parameters = list(parameters)
        refs.append(ref_norm(grads_of(parameters), 2.0))
        return spied(parameters, *args, **kwargs)

    monkeypatch.setattr(fusedclip.clip, "clip_", recording)
    with patch.patched():
        norms, params = hf_train(tmp_path / "fused", max_grad_norm)
    assert len(spy["clip_"]) == len(norms)  # one clip per optimizer step, and it is fusedclip's
    for logged, returned, ref, theirs in zip(norms, spy["clip_"], refs, torch_norms):
        assert logged == float(returned)  # what the Trainer logged is what fusedclip returned
        assert rel_err(returned, ref) <= 2e-6 and float(ref) > max_grad_norm  # float64-accurate; clipping
        assert logged == pytest.approx(theirs, rel=1e-5)  # torch's logged norm, same seeded run
    for p, q in zip(params, torch_params):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


# ---- timm ------------------------------------------------------------------------------------------------

# mode -> the fusedclip function it must reach ("agc": timm's adaptive_clip_grad, which patch_torch() replaces
# in timm's modules when timm.utils is imported).
TIMM_MODES = {"norm": "clip_", "value": "clip_value_", "agc": "clip_agc_"}


@pytest.mark.parametrize("mode, value, norm_type", [("norm", 0.5, 2.0), ("norm", 0.05, INF), ("value", 0.01, 2.0),
                                                    ("agc", 0.01, 2.0), ("agc", 0.01, INF)])
def test_timm_dispatch_clip_grad_goes_through_fusedclip(spy, mode, value, norm_type):  # noqa: F811
    timm_utils = pytest.importorskip("timm.utils")
    params = make_params([(5, 7), (130,), (), (33, 129)], [torch.float32], seed=3)
    theirs = clone_params(params)
    ref = ref_norm(grads_of(params), norm_type)
    timm_utils.dispatch_clip_grad(theirs, value, mode=mode, norm_type=norm_type)  # torch's
    assert not any(spy.values())
    with patch.patched():
        timm_utils.dispatch_clip_grad(params, value, mode=mode, norm_type=norm_type)
    assert {name for name, calls in spy.items() if calls} == {TIMM_MODES[mode]} and len(spy[TIMM_MODES[mode]]) == 1
    if mode == "norm":
        assert float(ref) > value and rel_err(spy["clip_"][0], ref) <= 2e-6
    for p, q in zip(params, theirs):
        if mode == "value":
            assert torch.equal(p.grad, q.grad)
        elif mode == "agc":
            torch.testing.assert_close(p.grad, q.grad, rtol=2e-5, atol=0)
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_timm_native_scaler_step_goes_through_fusedclip(spy):  # noqa: F811
    """timm's training-script path: NativeScaler (a GradScaler) unscales, then dispatch_clip_grad."""
    timm_utils = pytest.importorskip("timm.utils")
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = timm_utils.NativeScaler(device="cpu")
    x, y = batch(0)
    with patch.patched():
        scaler(torch.nn.functional.mse_loss(model(x), y), opt, clip_grad=0.05, clip_mode="norm",
               parameters=model.parameters())
    assert len(spy["clip_"]) == 1 and float(spy["clip_"][0]) > 0.05  # the unscaled gradients' norm


# ---- FSDP1 ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not dist.is_available(), reason="no torch.distributed")
def test_unpatch_restores_fsdp_method():
    import fusedclip.distributed.fsdp
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    original = FSDP.__dict__["clip_grad_norm_"]
    with patch.patched():
        assert FSDP.clip_grad_norm_ is patch.fsdp_clip_grad_norm_
    assert FSDP.__dict__["clip_grad_norm_"] is original
    patch.patch_torch()
    patch.patch_torch()
    patch.unpatch_torch()
    assert FSDP.__dict__["clip_grad_norm_"] is original
    assert fusedclip.distributed.fsdp._fsdp_clip_grad_norm_ is original  # what backend="torch" runs
    import fusedclip.fsdp  # the documented name of the same function
    assert fusedclip.fsdp.clip_grad_norm_ is fusedclip.distributed.fsdp.clip_grad_norm_


# The cases below run inside each of 2 Gloo ranks (one spawn for all; see _run_fsdp). Each builds the same
# model twice, runs the same backward on both, clips one with FSDP's own method (unpatched) and the other
# with the patched method, and compares the norms, their dtype and the gradients.
FSDP_CASES = {}


def fsdp_case(fn):
    FSDP_CASES[fn.__name__] = fn
    return fn


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(7, 5), torch.nn.Linear(5, 33), torch.nn.Linear(33, 3)
        self.unused = torch.nn.Linear(3, 3)  # its own FSDP unit, never run: a flat parameter without a grad

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def wrap(dtype=torch.float32, inner=None, **kw):
    """Net wrapped in FSDP1 on CPU: b and unused as nested units (with `inner` options), the root around it."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    torch.manual_seed(0)
    net = Net().to(dtype)
    opts = dict(device_id=torch.device("cpu"), **kw)
    net.b = FSDP(net.b, **(opts | (inner or {})))
    net.unused = FSDP(net.unused, **(opts | (inner or {})))
    return FSDP(net, **opts)


def backward(model, rank, dtype=torch.float32, scale=30.0):
    x = torch.randn(6, 7, generator=torch.Generator().manual_seed(rank), dtype=torch.float64) * scale
    model(x.to(dtype)).pow(2).sum().backward()


CALLS = []  # (fusedclip.clip function, process_group) of every call that reached fusedclip.clip in this rank


def _count_calls():
    for name in ["clip_", "get_total_norm", "clip_grads_with_norm_"]:
        real = getattr(fusedclip.clip, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            CALLS.append((_name, kwargs.get("process_group")))
            return _real(*args, **kwargs)

        setattr(fusedclip.clip, name, wrapper)


def compare(make, rank, max_norm, p, dtype=torch.float32, expect=("clip_", True), step=backward):
    """Clips two equal models, one with FSDP's own method, one with the patched one; they must agree."""
    theirs, ours = make(), make()
    step(theirs, rank)
    step(ours, rank)
    assert not patch.is_patched()
    ref = theirs.clip_grad_norm_(max_norm, p)
    del CALLS[:]
    with patch.patched():
        norm = ours.clip_grad_norm_(max_norm, p)
    name, sharded = expect
    assert CALLS and CALLS[0][0] == name, CALLS
    assert (CALLS[0][1] is ours.process_group) == sharded, (CALLS, ours.sharding_strategy)
    assert norm.dtype == ref.dtype and norm.device == ref.device and norm.dim() == 0
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-5)
    torch.testing.assert_close(norm, ref, **tol)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            if float(ref) <= max_norm:  # not clipping: both leave the gradients as they are
                assert torch.equal(a.grad, b.grad)
            torch.testing.assert_close(a.grad, b.grad, **tol)
    return ref


@fsdp_case
def strategies(rank, world):
    """FULL_SHARD, SHARD_GRAD_OP, NO_SHARD and HYBRID_SHARD (sharded over both ranks, replica groups of one:
    FSDP turns a shard group of one into NO_SHARD), flat or original parameters, p = 2 and inf, clipping
    and not."""
    from torch.distributed.fsdp import ShardingStrategy as S
    singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    hybrid = {"process_group": (dist.new_group(list(range(world))), singles[rank])}
    for strategy, extra in [(S.FULL_SHARD, {}), (S.SHARD_GRAD_OP, {}), (S.NO_SHARD, {}), (S.HYBRID_SHARD, hybrid)]:
        for orig in [False, True]:
            for p in [2.0, INF]:
                for max_norm in [0.5, 1e9]:
                    def make():
                        return wrap(sharding_strategy=strategy, use_orig_params=orig, **extra)
                    ref = compare(make, rank, max_norm, p, expect=("clip_", strategy != S.NO_SHARD))
                    assert (float(ref) > max_norm) == (max_norm == 0.5)


@fsdp_case
def unsharded_parts(rank, world):
    """A NO_SHARD unit inside a FULL_SHARD root, and an ignored parameter FSDP does not manage (its grad is not
    synchronized, so the ranks' differ): counted as FSDP's method counts them, locally for p = 2, in the MAX
    all_reduce for inf."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy as S

    def make():
        torch.manual_seed(0)
        net = Net()
        net.extra = torch.nn.Linear(2, 2)
        opts = dict(device_id=torch.device("cpu"))
        net.b = FSDP(net.b, sharding_strategy=S.NO_SHARD, **opts)
        return FSDP(net, ignored_states=list(net.extra.parameters()), **opts)

    def step(model, r):
        backward(model, r)
        model.module.extra(torch.full((3, 2), float(r + 1))).sum().backward()  # differs per rank

    for p in [2.0, INF]:
        for max_norm in [0.5, 1e9]:
            compare(make, rank, max_norm, p, expect=("get_total_norm" if p != INF else "clip_", True), step=step)


@fsdp_case
def bf16_gradients(rank, world):
    """A bf16 model: the norm is returned in bf16, as FSDP's is."""
    for p in [2.0, INF]:
        ref = compare(lambda: wrap(torch.bfloat16), rank, 0.5, p, dtype=torch.bfloat16,
                      step=lambda m, r: backward(m, r, torch.bfloat16))
        assert ref.dtype == torch.bfloat16


@fsdp_case
def no_sync_accumulation(rank, world):
    """Gradient accumulation: one backward inside no_sync(), one outside, then the clip."""
    from torch.distributed.fsdp import ShardingStrategy as S

    def step(model, r):
        with model.no_sync():
            backward(model, r)
        backward(model, r + 10)

    for strategy in [S.FULL_SHARD, S.NO_SHARD]:
        compare(lambda: wrap(sharding_strategy=strategy), rank, 0.5, 2.0, step=step,
                expect=("clip_", strategy != S.NO_SHARD))


@fsdp_case
def no_gradients_and_root_only(rank, world):
    """Before any backward: norm 0 in float32 and FSDP's warning. A nested unit is refused, as by FSDP.
    backend="torch" runs FSDP's own method."""
    import fusedclip.distributed.fsdp
    model = wrap()
    with patch.patched():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            norm = model.clip_grad_norm_(1.0)
        assert norm.dtype == torch.float32 and float(norm) == 0.0
        assert any("no gradients" in str(w.message) for w in caught)
        backward(model, rank)
        try:
            model.module.b.clip_grad_norm_(1.0)
        except RuntimeError as e:
            assert "root" in str(e)
        else:
            raise AssertionError("a nested FSDP unit's clip_grad_norm_ did not raise")
        torch.testing.assert_close(model.clip_grad_norm_(1e9, INF),
                                   fusedclip.distributed.fsdp._fsdp_clip_grad_norm_(model, 1e9, INF))
        patch.patch_torch(backend="torch")  # runs FSDP's own method
        del CALLS[:]
        model.clip_grad_norm_(1e9)
        assert not CALLS
    patch.unpatch_torch()


def _fsdp_worker(rank, world, port, out_dir):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # FSDP1's deprecation and CPU notes, once per model
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=20))
    _count_calls()
    run_cases(rank, out_dir, [(name, functools.partial(fn, rank, world)) for name, fn in FSDP_CASES.items()],
              after_each=patch.unpatch_torch)
    dist.destroy_process_group()


_FSDP_RUN = {}
SPAWN_TIMEOUT = 120  # seconds, start-up included


def _run_fsdp(world=2):
    """Runs every FSDP case on `world` Gloo ranks once per session: ({rank: {case: "ok" | traceback}}, error)."""
    if world not in _FSDP_RUN:
        _FSDP_RUN[world] = run_ranks(_fsdp_worker, world, SPAWN_TIMEOUT)
    return _FSDP_RUN[world]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no Gloo")
@pytest.mark.parametrize("name", list(FSDP_CASES))
def test_fsdp1_clip_grad_norm_matches_fsdp(name):
    results, error = _run_fsdp()
    assert len(results) == 2, error or "some ranks wrote no results"
    failures = {r: res.get(name, f"not run ({error})") for r, res in results.items() if res.get(name) != "ok"}
    assert not failures, "\n".join(f"rank {r}:\n{tb}" for r, tb in failures.items())
