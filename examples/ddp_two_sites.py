"""DDP across two data centres, emulated on this machine.

    python examples/ddp_two_sites.py                       # 4 ranks on loopback, 2 sites by label
    python examples/ddp_two_sites.py --netns --wan-rate 100mbit   # each site in a network namespace (root)
    torchrun --nproc-per-node 4 examples/ddp_two_sites.py  # torchrun starts the ranks instead

Each rank gets a site label (``HETCOMM_SITE``): the first half of the ranks is
site ``dc-a``, the second ``dc-b``. hetcomm keeps each site's ranks adjacent in
its rings, reduces inside a site first and sends only the compressed (int8,
with error feedback) shard across the "WAN". On loopback the WAN is only a
label (shared memory and ipc are never used between sites, so the bytes do go
through TCP); with ``--netns`` the sites are network namespaces joined by a
``tc tbf`` link of ``--wan-rate`` (see ``hetcomm.testbed``).

The model is a small MLP fitted to a fixed random linear target; each rank
trains on its own shard of the data. At the end every rank checks that its
parameters are bit-identical to every other rank's.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks-per-site", type=int, default=2)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--codec", default="int8", help="codec of the gradient allreduce (none, fp16, int8, ...)")
    p.add_argument("--netns", action="store_true", help="run each site in its own network namespace (root)")
    p.add_argument("--wan-rate", default="100mbit", help="with --netns: rate of the link between the sites")
    return p.parse_args(argv)


def train(args: argparse.Namespace) -> None:
    """One rank: env:// rendezvous (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # torchrun sets no site: put the first half of the ranks in one site, the rest in the other.
    os.environ.setdefault("HETCOMM_SITE", "dc-a" if rank < world // 2 else "dc-b")

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import hetcomm

    dist.init_process_group("hetcomm")
    sites = [None] * world
    dist.all_gather_object(sites, os.environ["HETCOMM_SITE"])
    if rank == 0:
        print(f"{world} ranks in sites {sites}", flush=True)

    torch.manual_seed(0)  # same target and initial weights everywhere (DDP broadcasts rank 0's anyway)
    target = torch.randn(32, 1)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)))
    if args.codec != "none":
        model.register_comm_hook(None, hetcomm.ddp_hook(codec=args.codec))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = torch.Generator().manual_seed(1000 + rank)  # each rank its own shard
    losses = []
    for step in range(args.steps):
        x = torch.randn(64, 32, generator=data)
        loss = torch.nn.functional.mse_loss(model(x), x @ target)
        opt.zero_grad()
        loss.backward()  # DDP averages the gradients over all ranks through hetcomm
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean, op=dist.ReduceOp.AVG)
        losses.append(mean.item())
        if rank == 0 and (step % 20 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {losses[-1]:.4f}", flush=True)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(everyone, flat)
    same = all(torch.equal(flat, other) for other in everyone)
    if rank == 0:
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; parameters "
              f"{'bit-identical on all' if same else 'DIFFER between'} {world} ranks", flush=True)
    dist.destroy_process_group()
    if not same:
        sys.exit(1)


def launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Start ``2 x ranks-per-site`` copies of this script as ranks; return the worst exit status."""
    world = 2 * args.ranks_per_site
    me = [sys.executable, os.path.abspath(__file__), *argv]
    if args.netns:
        from hetcomm.testbed.netns import WanTestbed

        with WanTestbed(sites=2, ranks_per_site=args.ranks_per_site, wan_rate=args.wan_rate) as bed:
            # rank_env gives env://, HETCOMM_SITE (the site index) and the site's interface per rank
            procs = bed.spawn_ranks(lambda rank: me, master_port=29500)
            return max(p.wait() for p in procs)
    from _ranks import run_local_ranks

    return run_local_ranks(__file__, argv, world,
                           lambda rank: {"HETCOMM_SITE": "dc-a" if rank < args.ranks_per_site else "dc-b"})


if __name__ == "__main__":
    arguments = parse_args()
    if "RANK" in os.environ:
        train(arguments)
    else:
        sys.exit(launch(arguments, sys.argv[1:]))
