"""The racing workload of tests/test_threads.py, run in a child process (a crash must fail that test, not kill
pytest):

    python tests/thread_race.py --backend native --seconds 2 [--params 2000]

Writer threads keep replacing the parameters' .grad with new tensors: of the same size and dtype (p.grad = ...),
and of other sizes and dtypes (p.data = ... then p.grad = ..., since torch takes only a grad of the parameter's
size and dtype), so freed gradients' memory is soon reused by tensors of other sizes. Reader threads meanwhile
run fusedclip.clip_, get_total_norm, clip_value_ and ZClip.step (one ZClip per thread) on the same parameters.
The numbers are racy by design; what must hold is the memory: no crash, no heap corruption, no error. Exits 0
when every thread ran to the end without an exception (printing how many calls each made), 1 otherwise (the
tracebacks on stderr); a crash is the child's signal. Gradients are never set to None (torch's own .grad
getter crashes under that race, with or without fusedclip)."""
import argparse
import random
import sys
import threading
import time
import traceback

import torch

import fusedclip
from fusedclip import _ext

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


class Race:
    """Threads that each repeat a body until the race's time is up; an exception in any is a failure."""

    def __init__(self, seconds):
        self.stop, self.errors, self.counts = time.monotonic() + seconds, [], {}

    def thread(self, name, body):
        def loop():
            n = 0
            try:
                while time.monotonic() < self.stop:
                    body()
                    n += 1
            except BaseException:  # noqa: B902  every error is a failure here: the race must not raise
                self.errors.append(f"{name}:\n{traceback.format_exc()}")
            self.counts[name] = n
        return threading.Thread(target=loop, name=name)

    def run_all(self, threads):
        """Starts the threads, waits for them, prints how many calls each made; exits 1 if any raised."""
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print(" ".join(f"{k}={v}" for k, v in sorted(self.counts.items())), flush=True)
        if self.errors:
            print("\n".join(self.errors), file=sys.stderr, flush=True)
            sys.exit(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="native")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--params", type=int, default=2000)
    ap.add_argument("--numel", type=int, default=1000)
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--dtensor", action="store_true",
                    help="DTensor parameters and gradients (Shard(0) on a 1-rank Gloo mesh, as FSDP2's): the writers "
                         "replace gradients with new DTensors (new specs too) and swap their local tensors' "
                         "storages; the readers are clip_ and get_total_norm, which read DTensors in C++")
    ap.add_argument("--data-swaps", action="store_true",
                    help="the writers also replace the storage of gradients in place (p.grad.data = new), and the "
                         "readers are the fast path's ops only (clip_, get_total_norm, ZClip.step): it holds the "
                         "storages; torch's own ops, and so the op path, hold the tensors only")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the threads race each other, not OpenMP's workers
    if args.dtensor:
        dtensor_race(args)
        return
    rng = random.Random(0)
    params = []
    for i in range(args.params):
        dtype = DTYPES[i % len(DTYPES)] if i % 5 == 4 else torch.float32
        p = torch.nn.Parameter(torch.zeros(rng.randint(1, 2 * args.numel), dtype=dtype))
        p.grad = torch.randn(p.shape, dtype=dtype)
        params.append(p)
    be = args.backend
    print("fusedclip:", fusedclip.__file__, flush=True)
    if be == "native":  # the readers' calls take the fast path (csrc/python_module.cpp): the code under test
        assert _ext._C.clip_grads(params, 1e30, 2.0) is not None
        assert _ext._C.total_norm([p.grad for p in params], 2.0) is not None
    race = Race(args.seconds)
    run = race.thread

    def writer(seed):
        r = random.Random(seed)

        mine = params[seed::args.writers]  # each writer its own parameters: p.data then p.grad is one change

        def body():
            for _ in range(64):
                p = mine[r.randrange(len(mine))]
                if args.data_swaps and r.random() < 0.5:  # a new storage under the same gradient tensor
                    p.grad.data = torch.randn(p.shape, dtype=p.dtype)
                elif r.random() < 0.8:  # a new gradient, same size and dtype
                    p.grad = torch.randn(p.shape, dtype=p.dtype)
                else:  # another size and dtype: the parameter's first (torch checks the grad against it)
                    n, dtype = r.randint(1, 2 * args.numel), r.choice(DTYPES)
                    p.data = torch.zeros(n, dtype=dtype)
                    p.grad = torch.randn(n, dtype=dtype)
                if r.random() < 0.1:  # churn: memory of other sizes, allocated and freed
                    torch.empty(r.randint(1, 8 * args.numel), dtype=torch.uint8).fill_(0xFF)
        return body

    zclips = [fusedclip.ZClip(warmup_steps=3, backend=be) for _ in range(2)]
    for z in zclips:  # the first step (which creates the state) takes the op path; the later ones the fast path
        z.step(params)
    threads = [run(f"writer{i}", writer(i)) for i in range(args.writers)]
    threads += [
        run("clip_", lambda: fusedclip.clip_(params, 1.0, backend=be)),
        run("clip_inf", lambda: fusedclip.clip_(params, 1.0, float("inf"), backend=be)),
        run("get_total_norm", lambda: fusedclip.get_total_norm([p.grad for p in params], backend=be)),
        run("zclip0", lambda: zclips[0].step(params)),
        run("zclip1", lambda: zclips[1].step(params)),
    ]
    if not args.data_swaps:
        threads.append(run("clip_value_", lambda: fusedclip.clip_value_(params, 0.5, backend=be)))
    race.run_all(threads)


def dtensor_race(args):
    import tempfile

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    store = tempfile.NamedTemporaryFile(delete=False).name
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    rng = random.Random(0)

    def dt(local):
        return DTensor.from_local(local, mesh, [Shard(0)], run_check=False)

    params = []
    for i in range(args.params):
        dtype = DTYPES[i % len(DTYPES)] if i % 5 == 4 else torch.float32
        p = torch.nn.Parameter(dt(torch.zeros(rng.randint(1, 2 * args.numel), dtype=dtype)))
        p.grad = dt(torch.randn(p.shape, dtype=dtype))
        params.append(p)
    print("fusedclip:", fusedclip.__file__, flush=True)
    from fusedclip.distributed import dtensor as fd
    assert fd.fast_norm(params, True, 2.0, "clip_") is not None  # the readers take the C++ path: what is tested
    race = Race(args.seconds)
    run = race.thread

    def writer(seed):
        r = random.Random(seed)
        mine = params[seed::args.writers]

        def body():
            for _ in range(64):
                p = mine[r.randrange(len(mine))]
                if r.random() < 0.5:  # a new storage under the same local tensor
                    p.grad.to_local().data = torch.randn(p.shape, dtype=p.dtype)
                else:  # a new gradient DTensor (a new local tensor and a new spec)
                    p.grad = dt(torch.randn(p.shape, dtype=p.dtype))
                if r.random() < 0.1:  # churn: memory of other sizes, allocated and freed
                    torch.empty(r.randint(1, 8 * args.numel), dtype=torch.uint8).fill_(0xFF)
        return body

    threads = [run(f"writer{i}", writer(i)) for i in range(args.writers)]
    threads += [run("clip_", lambda: fusedclip.clip_(params, 1.0)),
                run("clip_inf", lambda: fusedclip.clip_(params, 1.0, float("inf"))),
                run("get_total_norm", lambda: fusedclip.get_total_norm([p.grad for p in params]))]
    race.run_all(threads)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
