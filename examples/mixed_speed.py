"""Data-parallel training where ranks run at different speeds (hetcomm.balance).

Run under torchrun (any number of ranks)::

    torchrun --nproc-per-node 4 examples/mixed_speed.py --steps 50

Each step draws one global batch; the Balancer gives every rank a slice in
proportion to its measured speed and weights the gradient sum by samples, so
the model follows exactly the updates of that global batch on one device,
while no rank idles waiting for a slower one. ``--slow-ranks 2,3
--slow-factor 2`` makes those ranks do their compute twice, to see the split
move without a real slower vendor.
"""
from __future__ import annotations

import argparse
import logging

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import hetcomm  # noqa: F401  registers the "hetcomm" backend
from hetcomm.balance import Balancer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--global-batch", type=int, default=256)
    ap.add_argument("--interval", type=int, default=5, help="steps between speed measurements")
    ap.add_argument("--slow-ranks", default="", help="comma-separated ranks that emulate a slower device")
    ap.add_argument("--slow-factor", type=int, default=2, help="how many times a slow rank repeats its compute")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    dist.init_process_group("hetcomm")
    rank = dist.get_rank()
    slow = rank in {int(r) for r in args.slow_ranks.split(",") if r}
    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    balancer = Balancer(args.global_batch, interval=args.interval)
    model.register_comm_hook(None, balancer.ddp_hook())
    data = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        x = torch.randn(args.global_batch, 64, generator=data)
        y = torch.randn(args.global_batch, 8, generator=data)
        lo, n = balancer.share()
        with balancer.step():
            if slow:  # the extra work a slower device would take, without touching the gradient
                with torch.no_grad():
                    for _ in range(args.slow_factor - 1):
                        model.module(x[lo:lo + n])
            loss = torch.nn.functional.mse_loss(model(x[lo:lo + n]), y[lo:lo + n])
            loss.backward()
        opt.step()
        opt.zero_grad()
        if rank == 0 and (step % args.interval == 0 or step == args.steps - 1):
            print(f"step {step}: split {balancer.counts}, loss on rank 0's slice {loss.item():.4f}", flush=True)
    checksum = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().sum().item()
    if rank == 0:
        print(f"done: {balancer.rebalances} re-splits, final split {balancer.counts}, "
              f"parameter checksum {checksum:.6f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
