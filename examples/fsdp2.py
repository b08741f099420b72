"""FSDP2 (``fully_shard``) over hetcomm, checked against training without sharding.

    python examples/fsdp2.py                          # 2 ranks on this machine
    python examples/fsdp2.py --world-size 4 --steps 50
    torchrun --nproc-per-node 2 examples/fsdp2.py     # torchrun starts the ranks instead

Every parameter is sharded over the ranks: forward and backward all-gather
the shards of each layer, and gradients are reduce-scattered, all through the
hetcomm process group. Each rank trains on its own part of a global batch. At
the end every rank gathers the full parameters and compares them with a model
trained in the same process without sharding on the whole global batch; they
agree to float32 rounding.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=32, help="samples per rank and step")
    return p.parse_args(argv)


def make_model():
    import torch

    torch.manual_seed(0)  # the same initial weights on every rank and in the reference
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                               torch.nn.ReLU(), torch.nn.Linear(64, 4))


def global_batch(step: int, world: int, batch: int):
    """The whole step's data; rank r trains on rows [r*batch, (r+1)*batch)."""
    import torch

    g = torch.Generator().manual_seed(step)
    x = torch.randn(world * batch, 16, generator=g)
    return x, torch.sin(x[:, :4]) + 0.1 * x[:, 4:8]


def train(args: argparse.Namespace) -> None:
    """One rank: env:// rendezvous (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import hetcomm  # noqa: F401  (registers the "hetcomm" backend)

    dist.init_process_group("hetcomm")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model = make_model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    reference = make_model()  # unsharded, whole global batch, same process
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-2)

    lo, hi = rank * args.batch, (rank + 1) * args.batch
    for step in range(args.steps):
        x, y = global_batch(step, world, args.batch)
        loss = torch.nn.functional.mse_loss(model(x[lo:hi]), y[lo:hi])
        opt.zero_grad()
        loss.backward()  # gradients reduce-scattered (averaged) over the ranks
        opt.step()
        ref_loss = torch.nn.functional.mse_loss(reference(x), y)
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss on rank 0's part {loss.item():.4f}  (unsharded reference, "
                  f"whole batch: {ref_loss.item():.4f})", flush=True)

    worst = 0.0
    for (name, shard), ref in zip(model.state_dict().items(), reference.state_dict().values()):
        full = shard.full_tensor()  # all-gather of the shards
        worst = max(worst, (full - ref).abs().max().item())
    ok = worst < 1e-4  # float32 sums in another order; Adam's step normalisation magnifies them a little
    if rank == 0:
        print(f"{world} ranks: largest difference from the unsharded reference {worst:.2e} "
              f"({'ok' if ok else 'TOO LARGE'})", flush=True)
    dist.destroy_process_group()
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    arguments = parse_args()
    if "RANK" in os.environ:
        train(arguments)
    else:
        from _ranks import run_local_ranks

        sys.exit(run_local_ranks(__file__, sys.argv[1:], arguments.world_size))
