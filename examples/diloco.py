"""DiLoCo across sites with hetcomm: DDP inside each site, a compressed outer step across sites.

Run one process per rank with torchrun-style variables and a site per rank,
e.g. 2 sites x 2 ranks on one machine:

    for r in 0 1 2 3; do
        HETCOMM_SITE=dc$((r / 2)) RANK=$r WORLD_SIZE=4 LOCAL_WORLD_SIZE=2 \\
        MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 python examples/diloco.py --steps 64 &
    done; wait

Each site trains with its own DDP group (gloo here, NCCL/HCCL on real
accelerators) and AdamW; every --inner-steps steps the sites average their
pseudo-gradients with an int4 allreduce over hetcomm (error feedback on), in
--fragments pieces overlapped with the next inner steps.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import hetcomm  # noqa: F401  registers the "hetcomm" backend
from hetcomm.diloco import DiLoCo, site_group


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--inner-steps", type=int, default=8)
    ap.add_argument("--fragments", type=int, default=2)
    ap.add_argument("--codec", default="int4")
    args = ap.parse_args()
    dist.init_process_group("hetcomm")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    net = DDP(model, process_group=site_group(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), "gloo"))
    inner = torch.optim.AdamW(net.parameters(), lr=3e-3)
    diloco = DiLoCo(model, inner, inner_steps=args.inner_steps, codec=args.codec, fragments=args.fragments,
                    overlap_steps=1 if args.fragments > 1 else 0)
    teacher = torch.randn(32, 10, generator=torch.Generator().manual_seed(1))
    data = torch.Generator().manual_seed(100 + rank)
    for step in range(args.steps):
        x = torch.randn(64, 32, generator=data)
        inner.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), (x @ teacher).argmax(1))
        loss.backward()
        diloco.step()
        if rank == 0 and (step % 16 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}  outer steps {diloco.outer_steps}", flush=True)
    diloco.finish()
    if rank == 0:
        print(f"done: {diloco.outer_steps} outer steps; parameters are identical on every rank")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
