"""Sharded clipping on torch.distributed, with Gloo on CPU: several processes (2 and 4 ranks).

Process start-up is the expensive part (seconds per rank on a small machine), so each world size is one
spawn: every rank runs every case below in turn on one process group and records, per case, "ok" or
its traceback; the pytest tests then read those records. Everything is bounded: the process group
times out after 20 s, the whole spawn is killed after SPAWN_TIMEOUT.

References are computed in each process on the unsharded data: float64 norms of the concatenated
gradients, fusedclip.clip_ / torch.nn.utils.clip_grad_norm_ without a process group, DDP with its default
hook, and torch's own clip_grad_norm_ on DTensors (total_norm.full_tensor()).
"""
import datetime
import functools
import math
import os

import pytest
import torch
import torch.distributed as dist

import fusedclip
from conftest import TORCH
from fusedclip.testing import (exact_norm, fp32_ulps, make_grads, mixed_tensors, params_with, ref_norm, run_cases,
                               run_ranks)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with Gloo is not available")

SPAWN_TIMEOUT = 150  # seconds, for one world size (start-up included)
INF = math.inf
CASES = {}  # name -> function(rank, world_size, group)


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def only_on(*worlds):
    """Runs a case at these world sizes only (compiling is slow with more ranks than cores)."""
    def mark(fn):
        fn.worlds = worlds
        return fn
    return mark


def needs_torch(version, why):
    """Runs a case only on torch >= version (a limit of the older torch itself, said in `why`)."""
    def mark(fn):
        fn.skip_why = None if TORCH >= version else f"needs torch >= {version[0]}.{version[1]}: {why}"
        return fn
    return mark


def _runs(fn, world):
    return world in getattr(fn, "worlds", (world,)) and getattr(fn, "skip_why", None) is None


# ---------------------------------------------------------------------------------------------------------
# Helpers (run inside the ranks)
# ---------------------------------------------------------------------------------------------------------

def full_grads(seed, dtype=torch.float32, scale=1.0):
    """The unsharded gradients, the same on every rank: odd sizes, one empty, one > 16K elements."""
    return make_grads([(7,), (3, 5), (0,), (33, 129), (), (20001,), (4, 4)], dtype, seed=seed, scale=scale)


def shard(full, rank, world, seed):
    """This rank's shards: each flattened tensor cut at random (uneven) points, so some ranks get empty
    pieces, as FSDP1 flat parameters and ZeRO partitions are. Returns views into `full`'s flat copies."""
    g = torch.Generator().manual_seed(seed + 1)
    flats, mine = [t.reshape(-1) for t in full], []
    for f in flats:
        cuts = sorted(torch.randint(0, f.numel() + 1, (world - 1,), generator=g).tolist())
        bounds = [0] + cuts + [f.numel()]
        mine.append(f[bounds[rank]:bounds[rank + 1]])
    return flats, mine


def close(actual, expected, **kw):
    torch.testing.assert_close(actual.double(), expected.double(), **({"rtol": 2e-6, "atol": 1e-6} | kw))


# ---------------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------------

@case
def sharded_lists(rank, world, group):
    """Uneven shards of the same gradients on every rank: the global norm and the clipped shards equal the
    unsharded clip_, for p = 2, inf, 1 (and -inf, 3), clipping and not."""
    for p in [2.0, INF, 1.0, -INF, 3.0]:
        for max_norm in [0.5, 1e9]:
            full = full_grads(seed=7)
            ref = [t.clone() for t in full]
            expected = ref_norm(full, p)
            ref_total = fusedclip.clip_(params_with(ref), max_norm, p)  # single process, unsharded
            close(ref_total, expected)
            flats, mine = shard(full, rank, world, seed=7)
            before = [t.clone() for t in mine]
            total = fusedclip.clip_(params_with([t.clone() for t in mine]), max_norm, p, process_group=group)
            close(total, expected)
            assert total.dtype == torch.float32
            params = params_with(mine)  # views into flats: scaling in place shows in flats
            fusedclip.clip_(params, max_norm, p, process_group=group)
            for got, r_full, f in zip(mine, ref, flats):  # each shard is a view: compare its piece
                off = got.storage_offset() - f.storage_offset()
                close(got, r_full.reshape(-1)[off:off + got.numel()])
            if max_norm == 1e9:  # no clipping: bit-identical
                for a, b in zip(mine, before):
                    assert torch.equal(a, b)
            close(fusedclip.get_total_norm(before, p, process_group=group), expected)


@case
def dtypes_and_torch_backend(rank, world, group):
    """fp64 on one rank and bf16 on another still reduce together (the partial is float64 on every rank);
    backend="torch" with a process group gives the same norm."""
    full = full_grads(seed=3)
    dtypes = [torch.float64, torch.bfloat16, torch.float32, torch.float16]
    every = [[t.to(dtypes[r % 4]) for t in shard(full, r, world, seed=3)[1]] for r in range(world)]
    mine, dtype = every[rank], dtypes[rank % 4]
    expected = ref_norm([t for shards in every for t in shards], 2.0)  # the same on every rank
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype in (torch.float32, torch.float64) else {"rtol": 1e-2, "atol": 1e-2}
    close(fusedclip.get_total_norm(mine, process_group=group), expected, **tol)  # returned in its dtype
    # backend="torch" rounds the bf16/fp16 ranks' local norms to their dtype (as torch does): looser
    loose = {"rtol": 1e-2, "atol": 1e-2}
    close(fusedclip.get_total_norm(mine, backend="torch", process_group=group), expected, **loose)
    grads = [t.clone() for t in mine]
    fusedclip.clip_(params_with(grads), 0.1, backend="torch", process_group=group)
    coef = 0.1 / (expected + 1e-6)
    for a, b in zip(grads, mine):
        close(a, b.double() * coef, **loose)


@case
def empty_ranks(rank, world, group):
    """Rank 0 has no gradients at all, rank 1 only empty ones; the others hold everything. Every rank gets
    the global norm (and the -inf norm is not spoilt by ranks without elements)."""
    full = full_grads(seed=11)
    if rank == 0:
        mine = []
    elif rank == 1:
        mine = [torch.zeros(0), torch.zeros(0, 3)]
    else:
        mine = [t.clone() for t in full]
    holders = max(world - 2, 0)
    for p in [2.0, INF, 1.0, -INF]:
        if holders == 0:
            expected = torch.tensor(0.0) if p != -INF else torch.tensor(0.0)
        else:
            expected = ref_norm(full * holders, p)
        grads = [t.clone() for t in mine]
        total = fusedclip.clip_(params_with(grads), 1.0, p, process_group=group)
        close(total, expected)
        coef = min(1.0, 1.0 / (float(expected) + 1e-6))
        for a, b in zip(grads, mine):
            close(a, b * coef)
    assert fusedclip.clip_([], 1.0, process_group=group).dtype == torch.float32 or rank != 0


@case
def count_norm(rank, world, group):
    """norm_type=0 with a process group: the tensors are the shards, so the count adds up over the ranks."""
    mine = [torch.zeros(3), torch.ones(rank + 1), torch.zeros(0)]
    total = fusedclip.get_total_norm(mine, 0, process_group=group)
    close(total, torch.tensor(float(world)))


@case
def nonfinite(rank, world, group):
    """A non-finite shard on one rank: with error_if_nonfinite every rank raises and no gradient changes on
    any rank; without it every rank returns the non-finite norm (NaN survives the MAX of p=inf)."""
    bad_rank = world - 1
    for bad in [math.nan, math.inf]:
        for p in [2.0, INF, 1.0]:
            full = full_grads(seed=5, scale=10.0)
            _, mine = shard(full, rank, world, seed=5)
            mine = [t.clone() for t in mine] + [torch.full((3,), bad if rank == bad_rank else 1.0)]
            before = [t.clone() for t in mine]
            with_error = True
            try:
                fusedclip.clip_(params_with(mine), 0.1, p, error_if_nonfinite=True, process_group=group)
                with_error = False
            except RuntimeError as e:
                assert "non-finite" in str(e)
            assert with_error, f"rank {rank} did not raise for {bad} with p={p}"
            for a, b in zip(mine, before):
                torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # nothing changed, NaN too
            try:
                fusedclip.get_total_norm(mine, p, error_if_nonfinite=True, process_group=group)
                raise AssertionError("get_total_norm did not raise")
            except RuntimeError as e:
                assert "non-finite" in str(e)
            total = fusedclip.get_total_norm(mine, p, process_group=group)
            assert (math.isnan(bad) and torch.isnan(total)) or (math.isinf(bad) and torch.isinf(total)), total


def _ddp_pair(seed, bucket_cap_mb):
    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 3))
    copy = type(base)(*[type(m)(m.in_features, m.out_features) if isinstance(m, torch.nn.Linear) else type(m)()
                        for m in base])
    copy.load_state_dict(base.state_dict())
    ref = torch.nn.parallel.DistributedDataParallel(base, bucket_cap_mb=bucket_cap_mb)
    hooked = torch.nn.parallel.DistributedDataParallel(copy, bucket_cap_mb=bucket_cap_mb)
    return ref, hooked


@case
def ddp_hook(rank, world, group):
    """fusedclip.ddp_norm_hook against DDP's default reduction + fusedclip.clip_: same averaged gradients
    (bit for bit), same norm, same clipped gradients, over several steps (the state resets itself) and
    several buckets."""
    ref, hooked = _ddp_pair(seed=0, bucket_cap_mb=0.01)  # ~2.6K floats per bucket: several buckets
    state = fusedclip.DDPNormState()
    hooked.register_comm_hook(state, fusedclip.ddp_norm_hook)
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_h = torch.optim.SGD(hooked.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(100 + rank)  # different data on every rank
    for step in range(3):
        x, y = torch.randn(8, 16, generator=g) * (step + 1), torch.randn(8, 3, generator=g)
        for model in (ref, hooked):
            torch.nn.functional.mse_loss(model(x), y).backward()
        for a, b in zip(ref.parameters(), hooked.parameters()):
            assert torch.equal(a.grad, b.grad)  # the hook averages exactly as DDP does
        max_norm = 0.05 if step != 1 else 1e9
        n_ref = fusedclip.clip_(ref.parameters(), max_norm)
        close(state.total_norm(), n_ref)
        n_h = state.clip_(hooked.parameters(), max_norm)
        close(n_h, n_ref)
        assert n_h.dtype == torch.float32
        for a, b in zip(ref.parameters(), hooked.parameters()):
            close(b.grad, a.grad)
        for opt in (opt_r, opt_h):
            opt.step()
            opt.zero_grad()
        with torch.no_grad():  # the norms differ in the last bits, so would the weights: keep them equal
            for a, b in zip(ref.parameters(), hooked.parameters()):
                b.copy_(a)
    state.reset()
    try:
        state.total_norm()
        raise AssertionError("total_norm after reset() did not raise")
    except RuntimeError as e:
        assert "no complete DDP backward" in str(e)


@case
def ddp_hook_into_fused_step(rank, world, group):
    """DDPNormState.clip_(..., optimizer=fused AdamW): the recorded norm goes into the fused step (no scaling pass:
    the gradients are left as DDP averaged them), and the step equals fusedclip.clip_into_ after DDP's default hook
    (the same coefficient, handed over the same way) bit for bit when the two norms agree, closely otherwise; a
    non-fused optimizer, or one over other parameters, gets the scaling pass."""
    from fusedclip.testing import same_bits

    ref, hooked = _ddp_pair(seed=1, bucket_cap_mb=0.01)
    state = fusedclip.DDPNormState()
    hooked.register_comm_hook(state, fusedclip.ddp_norm_hook)
    opt_r = torch.optim.AdamW(ref.parameters(), lr=0.1, fused=True)
    opt_h = torch.optim.AdamW(hooked.parameters(), lr=0.1, fused=True)
    g = torch.Generator().manual_seed(200 + rank)
    for step in range(3):
        x, y = torch.randn(8, 16, generator=g) * (step + 1), torch.randn(8, 3, generator=g)
        for model in (ref, hooked):
            torch.nn.functional.mse_loss(model(x), y).backward()
        before = [p.grad.clone() for p in hooked.parameters()]
        max_norm = 0.05 if step != 1 else 1e9
        n_ref = fusedclip.clip_into_(opt_r, max_norm)
        n_h = state.clip_(hooked.parameters(), max_norm, optimizer=opt_h)
        close(n_h, n_ref)
        assert all(same_bits(p.grad, b) for p, b in zip(hooked.parameters(), before))  # not written: handed over
        assert opt_h.grad_scale is not None
        for opt in (opt_r, opt_h):
            opt.step()
            opt.zero_grad()
        for a, b in zip(ref.parameters(), hooked.parameters()):
            if same_bits(n_h, n_ref):
                assert same_bits(a, b), step
            else:
                close(b, a)
        with torch.no_grad():  # keep the weights equal for the next step
            for a, b in zip(ref.parameters(), hooked.parameters()):
                b.copy_(a)
    # the scaling pass for an optimizer that cannot take the coefficient (not fused; not the same parameters)
    for opt in (torch.optim.AdamW(hooked.parameters(), lr=0.1),
                torch.optim.AdamW(list(hooked.parameters())[:1], lr=0.1, fused=True)):
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 3, generator=g)
        torch.nn.functional.mse_loss(hooked(x), y).backward()
        grads = [p.grad.clone() for p in hooked.parameters()]
        n = state.clip_(hooked.parameters(), 1e-3, optimizer=opt)
        coef = 1e-3 / (float(n) + 1e-6)
        for p, b in zip(hooked.parameters(), grads):
            close(p.grad, b * coef)
        assert getattr(opt, "grad_scale", None) is None
        hooked.zero_grad()


def _mlp(seed):
    torch.manual_seed(seed)
    # out_features 3 and 1: with 4 ranks some shards are empty
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3), torch.nn.Tanh(),
                               torch.nn.Linear(3, 1))


@case
@needs_torch((2, 11), "torch 2.6's FSDP2 cannot run on CPU ('Stream' object has no attribute 'record_event')")
def fsdp2(rank, world, group):
    """FSDP2 (fully_shard, DTensor grads sharded on dim 0, uneven and empty shards): fusedclip.clip_ equals
    the unsharded float64 reference and torch.nn.utils.clip_grad_norm_ on the same model (norm.full_tensor(),
    clipped grads); for inf/-inf torch itself raises on the empty shard, so only the reference is compared."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world,))
    models = []
    for _ in range(2):
        m = _mlp(seed=1)
        for layer in m:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
        models.append(m)
    with pytest.raises(ValueError, match="DTensor parameters"):  # its hooks would see shards: no global norm
        fusedclip.ClipInBackward(models[0], 1.0)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(5, 6, generator=g) * 3
    for p in [2.0, INF, 1.0, 0.0, -INF]:
        for m in models:
            m.zero_grad()
            m(x).pow(2).sum().backward()
        ours, theirs = models
        assert all(isinstance(q.grad, DTensor) for q in ours.parameters())
        full = [q.grad.full_tensor() for q in ours.parameters()]
        expected = ref_norm(full, p) if p != 0.0 else torch.tensor(float(sum(bool((t != 0).any()) for t in full)))
        n_o = fusedclip.clip_(ours.parameters(), 0.5, p)
        assert isinstance(n_o, DTensor)
        close(n_o.full_tensor(), expected, rtol=1e-5)
        coef = min(1.0, 0.5 / (float(expected) + 1e-6))
        for q, t in zip(ours.parameters(), full):
            close(q.grad.full_tensor(), t * coef, rtol=1e-5)
        if math.isinf(p) and world > 1:
            # torch 2.14's _foreach_norm raises for inf/-inf on the empty shard (Linear(3, 1) has one row)
            continue
        n_t = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.5, p)
        close(n_o.full_tensor(), n_t.full_tensor(), rtol=1e-5)
        for a, b in zip(ours.parameters(), theirs.parameters()):
            close(a.grad.full_tensor(), b.grad.full_tensor(), rtol=1e-5)
        n2 = fusedclip.get_total_norm([q.grad for q in theirs.parameters()], p)  # theirs: clipped the same
        close(n2.full_tensor(), torch.nn.utils.get_total_norm([q.grad for q in theirs.parameters()], p).full_tensor(),
              rtol=1e-5)
    # the two-step API: get_total_norm, then clip_grads_with_norm_ with the (DTensor) norm
    for m in models:
        m.zero_grad()
        m(x).pow(2).sum().backward()
    ours, theirs = models
    n_o = fusedclip.get_total_norm([q.grad for q in ours.parameters()])
    fusedclip.clip_grads_with_norm_(ours.parameters(), 0.1, n_o)
    torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.1)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        close(a.grad.full_tensor(), b.grad.full_tensor(), rtol=1e-5)


@case
def dtensor_placements(rank, world, group):
    """Tensor-parallel style DTensors: Shard(0), Shard(1) and Replicate on a 1-D mesh, and at 4 ranks a 2-D
    mesh with (Shard, Replicate) and (Replicate, Shard); replicas are counted once. Against the unsharded
    float64 norm and torch's get_total_norm(...).full_tensor()."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    full = full_grads(seed=9)
    full = [t for t in full if t.dim() == 2] + [torch.randn(5, 2), torch.randn(1, 7)]
    meshes = [(init_device_mesh("cpu", (world,)), [[Shard(0)], [Shard(1)], [Replicate()]])]
    if world == 4:
        meshes.append((init_device_mesh("cpu", (2, 2)), [[Shard(0), Replicate()], [Replicate(), Shard(1)],
                                                         [Replicate(), Replicate()], [Shard(0), Shard(1)]]))
    for mesh, layouts in meshes:
        for p in [2.0, INF, 1.0, 0.0]:
            dts = [distribute_tensor(t.clone(), mesh, layouts[i % len(layouts)]) for i, t in enumerate(full)]
            expected = ref_norm(full, p) if p != 0.0 else torch.tensor(float(len(full)))
            n = fusedclip.get_total_norm(dts, p)
            close(n.full_tensor(), expected, rtol=1e-5)
            # torch 2.14's own inf norm raises on empty shards and, on the 2-D mesh over Gloo, times out; torch
            # 2.6's DTensor norm has no p=0 (NotImplementedError; 2.11 has it)
            if not math.isinf(p) and not (p == 0.0 and TORCH < (2, 11)):
                close(n.full_tensor(), torch.nn.utils.get_total_norm(dts, p).full_tensor(), rtol=1e-5)
            if p == 0.0:
                continue
            total = fusedclip.clip_(params_with(dts), 0.5, p)
            close(total.full_tensor(), expected, rtol=1e-5)
            coef = 0.5 / (expected + 1e-6)
            for d, t in zip(dts, full):
                close(d.full_tensor(), t.double() * coef, rtol=1e-5)


@case
def exact_norm_over_ranks(rank, world, group):
    """Within 1 ulp of the exact norm when the tensors are spread over ranks (each rank's partial travels as
    float64 computed from the unrounded local norm, never from an fp32 one): 10^4 tensors of mixed sizes and
    scales, split tensor by tensor (ZeRO-style lists) and cut unevenly (FSDP1 flat shards), with a process
    group; and as Shard(0) DTensors of a 1-D mesh. p = 2 and 1."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    full = mixed_tensors(10_000, 4096, seed=11)
    big = mixed_tensors(2, 64, seed=12, big=(1_000_003, 300_000))
    mesh = init_device_mesh("cpu", (world,))
    for p in [2.0, 1.0]:
        exact = exact_norm(full, p)
        listed = fusedclip.get_total_norm(full[rank::world], p, process_group=group)
        assert listed.dtype == torch.float32
        assert fp32_ulps(listed, exact) <= 1.0, (p, fp32_ulps(listed, exact))
        _, mine = shard(big, rank, world, seed=12)
        exact_big = exact_norm(big, p)
        cut = fusedclip.get_total_norm(mine, p, process_group=group)
        assert fp32_ulps(cut, exact_big) <= 1.0, (p, fp32_ulps(cut, exact_big))
        dts = [distribute_tensor(t, mesh, [Shard(0)]) for t in big]
        n = fusedclip.get_total_norm(dts, p).full_tensor()
        assert fp32_ulps(n, exact_big) <= 1.0, (p, fp32_ulps(n, exact_big))


# ---------------------------------------------------------------------------------------------------------
# Mixes (issue 24): several meshes, DTensors with plain tensors, pipeline stages. Every rank builds the same
# unsharded gradients from a seed; the reference is their float64 norm (each gradient counted once).
# ---------------------------------------------------------------------------------------------------------

class CountingCollectives:
    """Counts the all_reduces fusedclip.distributed issues (a stand-in for reduce.py's funcol module)."""

    def __init__(self, real):
        self.real, self.calls = real, 0

    def all_reduce(self, *args, **kw):
        self.calls += 1
        return self.real.all_reduce(*args, **kw)

    def __getattr__(self, name):
        return getattr(self.real, name)


def counting_collectives():
    import fusedclip.distributed.reduce as fd
    counter = CountingCollectives(fd.funcol)
    fd.funcol = counter
    return counter, lambda: setattr(fd, "funcol", counter.real)


def mix_grads(seed, n, scale=1.0):
    """n unsharded gradients of odd shapes (dim 0 of 1, 3, 5, 8 rows: empty shards at 4 ranks), the same on every
    rank for a seed."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, 3), (3, 5), (5, 2), (8, 4), (7,), (2, 2, 3)]
    return [torch.randn(shapes[i % len(shapes)], generator=g) * scale * (1 + i % 3) for i in range(n)]


def check_clip(rank, grads, full, p, max_norm=0.5, **kw):
    """fusedclip.clip_ and get_total_norm on `grads` (DTensors and plain tensors) against the float64 norm of
    `full` (the unsharded gradients, each once): the norm on every rank, and every local value scaled by the
    reference coefficient (each DTensor's full_tensor() against its unsharded gradient)."""
    from torch.distributed.tensor import DTensor

    expected = ref_norm(full, p)
    n = fusedclip.get_total_norm(grads, p, **kw)
    n = n.full_tensor() if isinstance(n, DTensor) else n
    close(n, expected, rtol=1e-5)
    if p == 0.0:
        return
    before = [g.full_tensor().clone() if isinstance(g, DTensor) else g.clone() for g in grads]
    total = fusedclip.clip_(params_with(grads), max_norm, p, **kw)
    assert isinstance(total, DTensor) == any(isinstance(g, DTensor) for g in grads)
    close(total.full_tensor() if isinstance(total, DTensor) else total, expected, rtol=1e-5)
    coef = min(1.0, max_norm / (float(expected) + 1e-6))
    assert coef < 1.0  # the case clips: a scaling pass that did nothing would fail it
    for g, b in zip(grads, before):
        close(g.full_tensor() if isinstance(g, DTensor) else g, b.double() * coef, rtol=1e-5)


@case
def mixed_meshes(rank, world, group):
    """Dense gradients on the world mesh, expert gradients on a (dp, ep) mesh of the same ranks (each ep rank holds
    other experts, replicated over dp), and at 4 ranks tensor-parallel gradients on the tp rows of a (dp, tp) mesh
    (a 2-rank sub-mesh: each row its own rank set, reduced on its own): the norm of the unsharded model, each once,
    for p = 2, inf, 1, 0 (torch raises on such a list). The dense and expert gradients share one all_reduce."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dense_mesh = init_device_mesh("cpu", (world,))
    ep = 2
    moe = init_device_mesh("cpu", (world // ep, ep), mesh_dim_names=("dp", "ep"))
    dense = mix_grads(seed=30, n=7)
    experts = [torch.randn(4, 6, generator=torch.Generator().manual_seed(31 + i)) for i in range(3)]  # dim 0: expert
    tp = []
    if world == 4:
        tp_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))["tp"]
        # the same gradient on both tp rows (dp replicas): each row's ranks count it once, not once per row
        tp = [torch.randn(6, 3, generator=torch.Generator().manual_seed(40))]
    for p in [2.0, INF, 1.0, 0.0]:
        grads = ([distribute_tensor(t.clone(), dense_mesh, [Shard(0)]) for t in dense]
                 + [distribute_tensor(t.clone(), moe, [Replicate(), Shard(0)]) for t in experts]
                 + [distribute_tensor(t.clone(), tp_mesh, [Shard(1)]) for t in tp])
        counter, restore = counting_collectives()
        try:
            check_clip(rank, grads, dense + experts + tp, p)
        finally:
            restore()
        if p != 0.0:
            # get_total_norm and clip_: one all_reduce each for the world-spanning rank set, one for the tp row
            assert counter.calls == 2 * (1 + bool(tp)), counter.calls


@case
def fsdp_tp_2x2(rank, world, group):
    """FSDP x TP on a (dp, tp) mesh (2x2 at 4 ranks, 1x2 at 2): (Shard(0), Shard(1)) weights, (Shard(0), Replicate)
    norms' scales replicated over tp, a (Replicate, Partial) gradient (a row-parallel bias before its reduction),
    uneven and empty shards; p = 2, inf, 1, 0 against the unsharded float64 norm."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
    full = mix_grads(seed=50, n=6)
    layouts = [[Shard(0), Shard(1)], [Shard(0), Replicate()], [Shard(0), Shard(0)]]
    bias = torch.randn(5, generator=torch.Generator().manual_seed(51))
    for p in [2.0, INF, 1.0, 0.0]:
        grads = [distribute_tensor(t.clone(), mesh, layouts[i % 3] if t.dim() > 1 else [Shard(0), Replicate()])
                 for i, t in enumerate(full)]
        # Partial over tp: each tp rank holds a part, the gradient is their sum (bias = 0.25 * bias + 0.75 * bias)
        part = bias * (0.25 if mesh.get_coordinate()[1] == 0 else 0.75)
        grads.append(DTensor.from_local(part, mesh, [Replicate(), Partial()], run_check=False))
        check_clip(rank, grads, full + [bias], p)


@case
def dtensor_with_plain(rank, world, group):
    """DTensors with plain gradients: replicated by default (the same on every rank, counted once), or with
    plain_group= this rank's shards of that group (different on every rank, each counted once); also the group
    of expert-parallel shards replicated over dp (at 4 ranks: plain_group is the 2-rank ep group)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    dense = mix_grads(seed=60, n=5)
    shared = mix_grads(seed=61, n=3, scale=2.0)  # replicated plain gradients
    every = [mix_grads(seed=70 + r, n=2, scale=3.0) for r in range(world)]  # rank r's own plain shards
    ep = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "ep"))
    ep_group, ep_rank = ep.get_group("ep"), ep.get_coordinate()[1]
    experts = [mix_grads(seed=80 + e, n=2, scale=0.5) for e in range(2)]  # expert shard e, the same on every dp
    for p in [2.0, INF, 1.0, 0.0]:
        dts = lambda: [distribute_tensor(t.clone(), mesh, [Shard(0)]) for t in dense]  # noqa: E731
        check_clip(rank, dts() + [t.clone() for t in shared], dense + shared, p)
        check_clip(rank, dts() + [t.clone() for t in every[rank]], dense + [t for ts in every for t in ts], p,
                   plain_group=group)
        check_clip(rank, dts() + [t.clone() for t in experts[ep_rank]], dense + experts[0] + experts[1], p,
                   plain_group=ep_group)
        # plain shards only, with plain_group: the same as process_group
        check_clip(rank, [t.clone() for t in every[rank]], [t for ts in every for t in ts], p, plain_group=group)


@case
@only_on(4)
def mesh_without_this_rank(rank, world, group):
    """A DTensor gradient on a mesh of ranks 0 and 1 passed on ranks 2 and 3 too: those raise (they hold no shard
    and cannot join the mesh's reduction), ranks 0 and 1 clip."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = DeviceMesh("cpu", [0, 1])
    local = torch.full((2, 3), float(rank + 1)) if rank < 2 else torch.zeros(0, 3)
    g = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size((4, 3)), stride=(3, 1))
    if rank < 2:
        close(fusedclip.get_total_norm([g]).full_tensor(), torch.tensor(30.0).sqrt())
        return
    try:
        fusedclip.get_total_norm([g])
        raise AssertionError("no error on a rank outside the mesh")
    except ValueError as e:
        assert "does not include this rank" in str(e), e


def _stage_grads(stage):
    return mix_grads(seed=90 + stage, n=4, scale=1.0 + stage)


@case
def pipeline_stages(rank, world, group):
    """Pipeline stages: a (pp, dp) mesh, stage s's gradients Shard(0) DTensors on its dp row, process_group the pp
    group (one rank of each stage): the norm of all stages' gradients on every rank, with a replicated plain
    gradient per stage too; inf and -inf; a NaN or inf in one stage makes every rank of every stage non-finite,
    and with error_if_nonfinite every rank raises and nothing changes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("pp", "dp"))
    stage = mesh.get_coordinate()[0]
    dp, pp_group = mesh["dp"], mesh.get_group("pp")
    extra = [torch.full((3,), 0.5 + s) for s in range(2)]  # a replicated plain gradient per stage
    everything = _stage_grads(0) + _stage_grads(1) + extra
    for p in [2.0, INF, 1.0, 0.0, -INF]:
        grads = [distribute_tensor(t.clone(), dp, [Shard(0)]) for t in _stage_grads(stage)] + [extra[stage].clone()]
        if p == -INF:
            close(fusedclip.get_total_norm(grads, p, process_group=pp_group).full_tensor(), ref_norm(everything, p))
        else:
            check_clip(rank, grads, everything, p, process_group=pp_group)
    for bad in [math.nan, math.inf]:
        grads = [distribute_tensor(t.clone(), dp, [Shard(0)]) for t in _stage_grads(stage)]
        if stage == 1:
            local = grads[1].to_local()
            if local.numel():
                local.view(-1)[0] = bad
            else:
                grads[2].to_local().view(-1)[0] = bad
        for p in [2.0, INF]:
            n = fusedclip.get_total_norm(grads, p, process_group=pp_group).full_tensor()
            assert (torch.isnan(n) if math.isnan(bad) else torch.isinf(n)), (bad, p, n)
            before = [g.to_local().clone() for g in grads]
            try:
                fusedclip.clip_(params_with(grads), 0.1, p, error_if_nonfinite=True, process_group=pp_group)
                raise AssertionError(f"rank {rank} did not raise for {bad}, p={p}")
            except RuntimeError as e:
                assert "non-finite" in str(e)
            for g, b in zip(grads, before):
                torch.testing.assert_close(g.to_local(), b, rtol=0, atol=0, equal_nan=True)


@case
def patched_torch_mixes(rank, world, group):
    """With fusedclip.patch_torch(), torch.nn.utils.clip_grad_norm_ on mixed meshes and on DTensor + plain lists
    (where torch itself raises) returns a replicated DTensor whose full_tensor() is the reference norm."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    moe = init_device_mesh("cpu", (world // 2, 2))
    dense, experts, plain = mix_grads(seed=100, n=3), mix_grads(seed=101, n=2), mix_grads(seed=102, n=2)

    def grads():
        return ([distribute_tensor(t.clone(), mesh, [Shard(0)]) for t in dense]
                + [distribute_tensor(t.clone(), moe, [Replicate(), Shard(0)]) for t in experts])

    with fusedclip.patched():
        for gs, full in [(grads(), dense + experts), (grads() + [t.clone() for t in plain], dense + experts + plain)]:
            n = torch.nn.utils.clip_grad_norm_(params_with(gs), 0.5)
            assert isinstance(n, DTensor)
            close(n.full_tensor(), ref_norm(full, 2.0), rtol=1e-5)
            n2 = torch.nn.utils.get_total_norm(gs)
            close(n2.full_tensor(), torch.tensor(0.5), rtol=1e-5)  # clipped to max_norm
    try:  # torch's own fails on both (the reason for item 5)
        torch.nn.utils.clip_grad_norm_(params_with(grads() + [t.clone() for t in plain]), 0.5)
        torch_mixed = "ran"
    except Exception:
        torch_mixed = "raised"
    assert torch_mixed == "raised" or TORCH >= (2, 15), torch_mixed


class CountingAotEager:
    """A torch.compile backend that counts compiles (graphs) and runs each with aot_eager: AOT tracing, as
    Inductor's, with the functional collectives in the graph, without a C++ compile per rank."""

    def __init__(self):
        self.compiles = 0

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.debugging import aot_eager
        self.compiles += 1
        return aot_eager(gm, example_inputs)


@case
@only_on(2)
def compiled_sharded(rank, world, group):
    """torch.compile(fullgraph=True) of clip_ on DTensor gradients: the mesh reduction is a functional
    collective, so it is traced into the graph (no graph break). On a 1-D mesh and on a 2-D mesh spanning the
    world, for p=2 and inf, three steps on one compile each, equal to torch.nn.utils.clip_grad_norm_; the
    compiled get_total_norm equals the eager one, on DTensors and with a process group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    # the same gradients on every rank, with no empty shards (torch's own inf norm raises on them)
    g = torch.Generator().manual_seed(13)
    full = [torch.randn(8, 4, generator=g), torch.randn(3, 8, generator=g), torch.randn(7, generator=g)]
    meshes = [(init_device_mesh("cpu", (world,)), [[Shard(0)], [Shard(1)], [Replicate()]]),
              (init_device_mesh("cpu", (1, world)), [[Replicate(), Shard(0)], [Shard(0), Shard(1)],
                                                     [Replicate(), Replicate()]])]
    for mesh, layouts in meshes:
        ours, theirs = ([torch.nn.Parameter(distribute_tensor(torch.zeros_like(t), mesh, layouts[i]))
                         for i, t in enumerate(full)] for _ in range(2))
        for p in [2.0, INF]:
            torch._dynamo.reset()
            counter = CountingAotEager()
            compiled = torch.compile(lambda ps: fusedclip.clip_(ps, 0.5, p), fullgraph=True, backend=counter)
            for step in range(3):
                for i, (a, b) in enumerate(zip(ours, theirs)):
                    g = full[i] * (step + 1)
                    a.grad, b.grad = (distribute_tensor(g.clone(), mesh, layouts[i]) for _ in range(2))
                n = compiled(ours)
                n_t = torch.nn.utils.clip_grad_norm_(theirs, 0.5, p)
                close(n.full_tensor(), n_t.full_tensor(), rtol=1e-5)
                for a, b in zip(ours, theirs):
                    close(a.grad.full_tensor(), b.grad.full_tensor(), rtol=1e-5)
            assert counter.compiles == 1, counter.compiles
            grads = [q.grad for q in ours]
            n_c = torch.compile(lambda ts: fusedclip.get_total_norm(ts, p), fullgraph=True,
                                backend="aot_eager")(grads)
            close(n_c.full_tensor(), fusedclip.get_total_norm(grads, p).full_tensor(), rtol=0, atol=0)
    mine = [t.clone() for t in shard(full_grads(seed=17), rank, world, seed=17)[1]]
    n_c = torch.compile(lambda ts: fusedclip.get_total_norm(ts, process_group=group), fullgraph=True,
                        backend="aot_eager")(mine)
    close(n_c, fusedclip.get_total_norm(mine, process_group=group), rtol=0, atol=0)


class SpyDTensorNorm:
    """Wraps the extension's dtensor_norm (the C++ DTensor path): counts the calls it took and declined."""

    def __init__(self):
        from fusedclip import _ext
        self.ext, self.real, self.taken, self.declined = _ext._C, _ext._C.dtensor_norm, 0, 0

    def __call__(self, *args):
        r = self.real(*args)
        self.taken += r is not None
        self.declined += r is None
        return r

    def __enter__(self):
        self.ext.dtensor_norm = self
        return self

    def __exit__(self, *exc):
        self.ext.dtensor_norm = self.real


@case
def dtensor_fast_path(rank, world, group):
    """The C++ DTensor path (DTensors only, read without dispatch) against the plan path on the same gradients: the
    same norm and the same clipped shards, bit for bit, for fp32/bf16/fp16/fp64 Shard(0) and Shard(1) gradients with
    uneven and empty shards on the world mesh, Replicate ones (counted once), and at 4 ranks gradients on the tp
    rows of a (dp, tp) mesh (another rank set); p = 2, inf, 1, 3, clipping and not; parameters without gradients
    skipped; every call on new spec objects as well as on the same ones (its spec cache). It is taken for these
    (a spy counts it) and declined, nothing written, for a mix with plain tensors, a Partial gradient, and p = 0
    or -inf. The clipped shards' version counters move only when they are written."""
    import fusedclip.distributed.dtensor as fd
    from fusedclip.testing import same_bits
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    full = [t.to(dtypes[i % 4]) for i, t in enumerate(mix_grads(seed=110, n=12, scale=3.0))]
    layouts = [[Shard(0)], [Shard(0)], [Replicate()], [Shard(1)]]
    tp_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))["tp"] if world == 4 else None
    tp = [torch.randn(6, 5, generator=torch.Generator().manual_seed(111))] if tp_mesh is not None else []

    def dts(fresh_specs):
        out = []
        for i, t in enumerate(full):
            lay = layouts[i % 4] if t.dim() > 1 or i % 4 != 3 else [Shard(0)]
            d = distribute_tensor(t.clone(), mesh, lay)
            out.append(d)
        out += [distribute_tensor(t.clone(), tp_mesh, [Shard(0)]) for t in tp]
        if not fresh_specs:  # the same spec objects as the last call's list
            out = [DTensor(d._local_tensor, spec, requires_grad=False) for d, spec in zip(out, dts.specs)]
        dts.specs = [d._spec for d in out]
        return out

    dts.specs = None
    for p in [2.0, INF, 1.0, 3.0]:
        for max_norm in [0.5, 1e9]:
            for fresh in [True, False]:
                results = []
                for fast in [True, False]:
                    fd.FAST_DTENSOR = fast
                    try:
                        with SpyDTensorNorm() as spy:
                            grads = dts(fresh)
                            params = params_with(grads)
                            params.insert(3, torch.nn.Parameter(torch.zeros_like(grads[0])))  # no gradient
                            before = [g._local_tensor._version for g in grads]
                            n = fusedclip.clip_(params, max_norm, p)
                            n2 = fusedclip.get_total_norm(grads, p)
                    finally:
                        fd.FAST_DTENSOR = True
                    # torch 2.6 gives a rank an uneven Shard(1) shard as a strided view, not dense: that rank
                    # takes the plan path (dtensor_paths_differ checks the ranks still agree); declined, clip_
                    # asks twice (its own fast entry, then the sharded one), get_total_norm once
                    dense = all(g._local_tensor.is_contiguous() for g in grads)
                    assert (spy.taken, spy.declined) == ((2, 0) if fast and dense else (0, 3) if fast else (0, 0)), (
                        spy.taken, spy.declined, dense)
                    bumped = [g._local_tensor._version > b for g, b in zip(grads, before)]
                    assert all(bumped) if max_norm == 0.5 else not any(bumped), (max_norm, bumped)
                    results.append((n, n2, [g._local_tensor for g in grads]))
                (a, a2, ga), (b, b2, gb) = results
                assert isinstance(a, DTensor) and a.placements == b.placements and a.device_mesh is b.device_mesh
                assert same_bits(a.to_local(), b.to_local()) and same_bits(a2.to_local(), b2.to_local()), (p, a, b)
                assert all(same_bits(x, y) for x, y in zip(ga, gb)), p
                # and right: against the unsharded float64 norm
                full_a = [t.double() for t in full + tp]
                close(a.full_tensor(), ref_norm(full_a, p), rtol=1e-3 if p != INF else 0, atol=1e-6)
    # declined, nothing written: then the plan path clips as before
    with SpyDTensorNorm() as spy:
        grads = dts(True)
        mixed = grads + [torch.randn(3, generator=torch.Generator().manual_seed(112))]
        part = DTensor.from_local(torch.ones(4) * (rank + 1), mesh, [Partial()], run_check=False)
        for gs, p in [(mixed, 2.0), (grads + [part], 2.0), (grads, 0.0), (grads, -INF)]:
            fusedclip.get_total_norm(gs, p)
        assert spy.taken == 0 and spy.declined == 4, (spy.taken, spy.declined)


@case
def dtensor_paths_differ(rank, world, group):
    """The last rank's local shard is a strided view (not dense: the C++ DTensor path declines it and that rank
    takes the plan path) while the other ranks take the C++ path: every rank still issues the same collectives on
    the same groups, so the norm is right and the same everywhere, the shards scaled by it. With gradients on two
    rank sets at 4 ranks, and (at 4 ranks) two 1-D mesh objects of the same ranks whose gradients come in the
    opposite order from the first call's: each rank set reduces on the one mesh every rank registered first."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(120)
    full = [torch.randn(2 * world, 6, generator=g) * (1 + i) for i in range(3)]

    def shard(t, m, ranks_rows, here):
        rows = t[here * ranks_rows:(here + 1) * ranks_rows]
        local = rows.clone()
        if rank == world - 1:  # a view of a wider buffer: non-overlapping but not dense
            local = torch.empty(rows.shape[0], rows.shape[1] + 2)[:, :rows.shape[1]].copy_(rows)
        return DTensor.from_local(local, m, [Shard(0)], run_check=False)

    sets = [(mesh, 2, rank)]
    if world == 4:  # the tp rows of two (dp, tp) meshes: rank sets {0, 1} and {2, 3}, two mesh objects each
        tp_a = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))["tp"]
        tp_b = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))["tp"]
        sets += [(tp_a, 4, rank % 2), (tp_b, 4, rank % 2)]
    for order in [1, -1]:
        grads = [shard(t, m, rows, here) for (m, rows, here), t in list(zip(sets, full))[::order]]
        with SpyDTensorNorm() as spy:
            before = [d._local_tensor.clone() for d in grads]
            n = fusedclip.clip_(params_with(grads), 0.5)
        last = rank == world - 1  # declined (clip_ tries twice: its own fast entry, then the sharded one)
        assert spy.taken == (0 if last else 1) and (spy.declined > 0) == last, (spy.taken, spy.declined)
        # the reference: every unsharded tensor once (both dp rows' tp ranks hold the same tp tensors, replicas
        # over dp: each row's rank set adds them to the world set's)
        expected = ref_norm([t.double() for t in full[:len(sets)]], 2.0)
        close(n.to_local(), expected, rtol=1e-6)
        coef = 0.5 / (float(expected) + 1e-6)
        for d, b in zip(grads, before):
            close(d._local_tensor, b.double() * coef, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# The spawn
# ---------------------------------------------------------------------------------------------------------

@case
def zclip_sharded(rank, world, group):
    """fusedclip.ZClip on this rank's shards (process_group=) and on DTensor gradients: the same norms, the
    same decisions and the same clipped values as ZClip on the unsharded gradients in one process, step by
    step through the warm-up, spikes included; the state is the same on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    kw = dict(warmup_steps=3, max_grad_norm=2.0, on_spike="clip")
    ref, pg, dt = fusedclip.ZClip(**kw), fusedclip.ZClip(**kw, process_group=group), fusedclip.ZClip(**kw)
    ref_mixed, mixed = fusedclip.ZClip(**kw), fusedclip.ZClip(**kw)
    changed = []
    for t in range(10):
        full = full_grads(seed=20 + t, scale=(12.0 if t in (5, 8) else 0.01 * (1 + t / 10)))
        expected = [g.clone() for g in full]
        n_ref = ref.step(params_with(expected))
        flats, mine = shard([g.clone() for g in full], rank, world, seed=20 + t)
        n_pg = pg.step(params_with(mine))
        close(n_pg, n_ref, rtol=1e-6, atol=0)
        for got, r_full, f in zip(mine, expected, flats):
            off = got.storage_offset() - f.storage_offset()
            close(got, r_full.reshape(-1)[off:off + got.numel()], rtol=1e-6, atol=1e-9)
        big = [g for g in full if g.dim() >= 1 and g.shape[0] >= world]
        dts = [distribute_tensor(g.clone(), mesh, [Shard(0)]) for g in big]
        n_dt = dt.step(params_with(dts))
        close(n_dt, ref_norm(big, 2.0), rtol=1e-5, atol=0)
        # a plain (replicated) gradient first, then DTensors: sharded all the same (issue 24: grads[0] alone
        # decided), the norm and the clipped values of the unsharded list
        plain = full[0].clone()
        unsharded = [plain.clone()] + [g.clone() for g in big]
        n_ref_mixed = ref_mixed.step(params_with(unsharded))
        dts = [distribute_tensor(g.clone(), mesh, [Shard(0)]) for g in big]
        n_mixed = mixed.step(params_with([plain] + dts))
        close(n_mixed, n_ref_mixed, rtol=1e-5, atol=0)
        close(plain, unsharded[0], rtol=1e-5, atol=1e-9)
        for d, u in zip(dts, unsharded[1:]):
            close(d.full_tensor(), u, rtol=1e-5, atol=1e-9)
        changed.append(not all(torch.equal(a, b) for a, b in zip(expected, full)))
    assert changed[5] and changed[8] and not all(changed), changed
    # every rank holds the same state
    for clipper in (pg, dt, mixed):
        sd = clipper.state_dict()
        state = torch.stack([sd["mean"], sd["var"], torch.tensor(float(sd["steps"]), dtype=torch.float64)])
        gathered = [torch.empty_like(state) for _ in range(world)]
        dist.all_gather(gathered, state, group=group)
        assert all(torch.equal(g, state) for g in gathered)
    close(pg.state_dict()["mean"], ref.state_dict()["mean"], rtol=1e-6, atol=0)


def _worker(rank, world, port, out_dir):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=20))
    group = dist.new_group(list(range(world)))  # an explicit group, not only the default one
    run_cases(rank, out_dir, [(name, functools.partial(fn, rank, world, group)) for name, fn in CASES.items()
                              if _runs(fn, world)])
    dist.destroy_process_group()


_RUNS = {}


def _run(world):
    """Runs every case on `world` ranks once per test session; returns ({rank: {case: "ok" | traceback}}, error)."""
    if world not in _RUNS:
        _RUNS[world] = run_ranks(_worker, world, SPAWN_TIMEOUT)
    return _RUNS[world]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_distributed(world, name):
    if world not in getattr(CASES[name], "worlds", (world,)):
        pytest.skip(f"{name} runs only on {CASES[name].worlds} ranks")
    if getattr(CASES[name], "skip_why", None):
        pytest.skip(CASES[name].skip_why)
    results, error = _run(world)
    assert len(results) == world, error or "some ranks wrote no results"
    failures = {r: res.get(name, f"not run ({error})") for r, res in results.items() if res.get(name) != "ok"}
    assert not failures, "\n".join(f"rank {r}:\n{tb}" for r, tb in failures.items())
