"""FSDP2 training steps on one host, hetcomm beside gloo: the time a user's step takes.

Each rank trains a stack of ``--layers`` Linear(dim, dim) layers, each
wrapped with ``fully_shard``: every step all-gathers each layer's weights in
forward and again in backward, and reduce-scatters its gradients, so a step
is many collectives of one layer's size (dim = 1024: 4 MiB), the sizes the
single-copy path and its control through the arena serve. One thread a rank
(as torchrun sets it with more than one rank a node). The backends run one
after the other, alternating over ``--rounds``; the table gives each
round's median step time over the timed steps (the slowest rank's) and
the ratio to gloo in the same round.

    python bench/fsdp_step.py -n 2 --rounds 3
    python bench/fsdp_step.py -n 4 --dim 512 --layers 16

Run under ``flock /tmp/hetcomm-bench.lock`` beside other benchmarks.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time


def _rank(rank: int, world: int, backend: str, args: argparse.Namespace, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if backend == "hetcomm":
        import hetcomm  # noqa: F401  (registers the backend)
    torch.set_num_threads(1)
    dist.init_process_group(backend)
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    layers = []
    for _ in range(args.layers):
        layers += [torch.nn.Linear(args.dim, args.dim), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(args.batch, args.dim, generator=g), torch.randn(args.batch, args.dim, generator=g)
    times = []
    for step in range(args.warmup + args.steps):
        dist.barrier()
        t0 = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    results.put((rank, times))
    dist.destroy_process_group()


def run(backend: str, args: argparse.Namespace) -> float:
    """Median over steps of the slowest rank's step time, ms."""
    from hetcomm.bench.launcher import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, args.world_size, backend, args, port, results))
             for r in range(args.world_size)]
    for p in procs:
        p.start()
    rows = sorted(results.get(timeout=900) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    slowest = [max(step) for step in zip(*(r[1] for r in rows))]
    return statistics.median(slowest) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--world-size", type=int, default=2)
    ap.add_argument("--backends", default="hetcomm,gloo")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8, help="samples per rank and step")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    backends = args.backends.split(",")
    mib = args.dim * (args.dim + 1) * 4 / 2**20
    print(f"# FSDP2, {args.world_size} ranks, {args.layers} x Linear({args.dim}, {args.dim}) ({mib:.1f} MiB a layer), "
          f"batch {args.batch} a rank; median step time (ms) of the slowest rank over {args.steps} steps")
    print(f"{'round':>5} " + " ".join(f"{b:>12}" for b in backends) + "".join(
        f" {b + '/gloo':>14}" for b in backends if b != "gloo" and "gloo" in backends))
    for i in range(args.rounds):
        times = {}
        for b in backends:
            times[b] = run(b, args)
        ratios = "".join(f" {times['gloo'] / times[b]:13.2f}x" for b in backends if b != "gloo" and "gloo" in times)
        print(f"{i + 1:>5} " + " ".join(f"{times[b]:12.1f}" for b in backends) + ratios, flush=True)


if __name__ == "__main__":
    main()
