"""FSDP2 (fully_shard) training with fused clipping: the gradients are DTensors sharded over the ranks;
fusedclip.clip_ clips each rank's shards by the global norm (one all_reduce of a scalar over the mesh),
with the result of torch.nn.utils.clip_grad_norm_.

    torchrun --nproc_per_node=2 examples/fsdp_train.py   # Gloo on CPU, NCCL when CUDA is visible

Shards that are lists of plain tensors (FSDP1 flat parameters, ZeRO partitions) take
fusedclip.clip_(shards, max_norm, process_group=group) instead.
"""
import argparse

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import fusedclip


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-norm", type=float, default=0.1)
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    device_type = "cuda" if cuda else "cpu"
    mesh = init_device_mesh(device_type, (world,))

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 128),
                                torch.nn.GELU(), torch.nn.Linear(128, 4)).to(device_type)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    gen = torch.Generator().manual_seed(1 + rank)
    for step in range(args.steps):
        x = torch.randn(64, 32, generator=gen).to(device_type)
        y = x[:, :4].sin()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        norm = fusedclip.clip_(model.parameters(), args.max_norm)  # a replicated DTensor, like torch's
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 5 == 0 or step == args.steps - 1:
            value = norm.full_tensor().item()  # no communication: already global
            if rank == 0:
                print(f"step {step:3d}  loss {loss.item():.4f}  grad norm {value:.4f}", flush=True)
    if rank == 0:
        print(f"done: {world} ranks ({dist.get_backend()}), parameters sharded with fully_shard")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
