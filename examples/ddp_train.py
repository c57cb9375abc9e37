"""DDP training with fused clipping, two ways: fusedclip.clip_ after backward (replicated gradients: every
rank clips its identical copy), or the DDP communication hook that computes the norm while backward runs,
so clipping is only the scale pass.

    torchrun --nproc_per_node=2 examples/ddp_train.py            # Gloo on CPU, NCCL when CUDA is visible
    torchrun --nproc_per_node=2 examples/ddp_train.py --no-hook  # clip_ after backward instead
"""
import argparse

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import fusedclip


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-norm", type=float, default=0.1)
    ap.add_argument("--no-hook", action="store_true", help="clip_ after backward instead of the norm hook")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 128),
                                torch.nn.GELU(), torch.nn.Linear(128, 4)).to(device)
    model = DDP(model, device_ids=[device.index] if cuda else None)
    if not args.no_hook:
        state = fusedclip.DDPNormState()
        model.register_comm_hook(state, fusedclip.ddp_norm_hook)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    gen = torch.Generator().manual_seed(1 + rank)  # different data on every rank
    for step in range(args.steps):
        x = torch.randn(64, 32, generator=gen).to(device)
        y = x[:, :4].sin().to(device)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if args.no_hook:
            norm = fusedclip.clip_(model.parameters(), args.max_norm)  # the same on every rank
        else:
            norm = state.clip_(model.parameters(), args.max_norm)  # norm from the hook: scale pass only
        opt.step()
        opt.zero_grad(set_to_none=True)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}  grad norm {norm.item():.4f}", flush=True)

    # every rank holds the same weights (DDP) after clipping
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    ws = [torch.empty_like(w) for _ in range(dist.get_world_size())]
    dist.all_gather(ws, w)
    assert all(torch.equal(w, other) for other in ws), "ranks diverged"
    if rank == 0:
        print(f"done: {dist.get_world_size()} ranks ({dist.get_backend()}), weights identical on all ranks")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
