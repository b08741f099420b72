"""hetcomm through torch.distributed against hetcomm's own Communicator.

All paths run in the same rank processes, on the same memory (the
Communicator works on numpy views of the torch tensors), alternating in
short blocks: on a shared 2-core VM, timings of separate runs swing by tens
of percent, which would swamp the few percent the torch path may cost. For
each op and size it prints the median over rounds of the slowest rank's
mean time per call through the Communicator, through torch.distributed's
functions ("dist") and through the process group's methods ("backend", the
way DDP and FSDP call it), and the ratios.

    python bench/compare_via.py --rounds 9 --sizes 1M,16M,64M,256M
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

OPS = ("allreduce", "allgather", "reduce_scatter", "broadcast", "alltoall")


def _calls(op: str, n: int, world: int, comm, dist, torch) -> dict:
    """The calls of each path for ``op`` on ``n`` float32 elements per rank, all on the same buffers.

    "dist": torch.distributed's Python functions, as user code calls them;
    "backend": the process group's own methods, as DDP and FSDP reach the
    backend (from C++, without the Python wrapper's checks and logging);
    "numpy": hetcomm's Communicator on numpy views of the same tensors.
    """
    pg = dist.distributed_c10d._get_default_group()
    x = torch.zeros(n)  # zeros: repeated sums stay finite
    big = torch.zeros(n * world)
    y = torch.empty(n)
    xv, bigv, yv = x.numpy(), big.numpy(), y.numpy()
    if op == "allreduce":
        return {"dist": lambda: dist.all_reduce(x), "backend": lambda: pg.allreduce(x).wait(),
                "numpy": lambda: comm.allreduce(xv)}
    if op == "broadcast":
        return {"dist": lambda: dist.broadcast(x, 0), "backend": lambda: pg.broadcast(x, 0).wait(),
                "numpy": lambda: comm.broadcast(xv, 0)}
    if op == "allgather":  # n elements in, n * world out
        return {"dist": lambda: dist.all_gather_into_tensor(big, x),
                "backend": lambda: pg._allgather_base(big, x).wait(),
                "numpy": lambda: comm.allgather(xv, out=bigv)}
    if op == "reduce_scatter":  # n * world in, n out
        return {"dist": lambda: dist.reduce_scatter_tensor(x, big),
                "backend": lambda: pg._reduce_scatter_base(x, big).wait(),
                "numpy": lambda: comm.reduce_scatter(bigv, out=xv)}
    return {"dist": lambda: dist.all_to_all_single(y, x), "backend": lambda: pg.alltoall_base(y, x, [], []).wait(),
            "numpy": lambda: comm.alltoall(xv, out=yv)}


def rank_main(ops: list[str], sizes: list[int], rounds: int) -> None:
    """One rank: times every path, prints {op/size: {path: [mean seconds per round]}} as JSON."""
    import warnings

    import torch
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _get_default_store

    import hetcomm

    warnings.simplefilter("ignore", FutureWarning)  # all_gather_into_tensor's rename notice
    torch.set_num_threads(1)
    dist.init_process_group("hetcomm")
    rank, world = dist.get_rank(), dist.get_world_size()
    times: dict[str, dict[str, list[float]]] = {}
    with hetcomm.Communicator(rank, world, store=_get_default_store()) as comm:
        for op in ops:
            for size in sizes:
                # size is the buffer of the op as hetcomm-bench counts it
                n = size // 4 // (world if op in ("allgather", "reduce_scatter") else 1)
                calls = _calls(op, n, world, comm, dist, torch)
                iters = max(3, min(50, (256 << 20) // size))
                rec = times.setdefault(f"{op}/{size}", {path: [] for path in calls})
                for _ in range(rounds):
                    for path, call in calls.items():
                        call()
                        comm.barrier()
                        t0 = time.perf_counter()
                        for _ in range(iters):
                            call()
                        rec[path].append((time.perf_counter() - t0) / iters)
    dist.destroy_process_group()
    print(json.dumps(times), flush=True)


def main() -> None:
    from hetcomm.bench.launcher import free_port
    from hetcomm.bench.sizes import parse_size_list

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--sizes", default="1M,16M,64M,256M")
    ap.add_argument("-n", "--world-size", type=int, default=2)
    args = ap.parse_args()
    ops = args.ops.split(",")
    sizes = parse_size_list(args.sizes)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(args.world_size))
    procs = [subprocess.Popen([sys.executable, __file__, "--rank-main", args.ops, args.sizes, str(args.rounds)],
                              env=dict(env, RANK=str(r)), stdout=subprocess.PIPE) for r in range(args.world_size)]
    results = []
    for r, p in enumerate(procs):
        out, _ = p.communicate(timeout=3600)
        if p.returncode != 0:
            sys.exit(f"rank {r} failed with exit status {p.returncode}")
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    print(f"# {args.world_size} ranks, {args.rounds} alternating rounds; time = median over rounds of the slowest "
          "rank's mean per call; ratios above 1: faster than the Communicator")
    print(f"{'op':>15} {'size(B)':>11} {'numpy (us)':>11} {'dist (us)':>11} {'backend (us)':>13} "
          f"{'dist/numpy':>11} {'backend/numpy':>14}")
    for op in ops:
        for size in sizes:
            key = f"{op}/{size}"
            med = {path: statistics.median(max(res[key][path][i] for res in results) for i in range(args.rounds))
                   for path in ("numpy", "dist", "backend")}
            print(f"{op:>15} {size:>11} {med['numpy'] * 1e6:11.1f} {med['dist'] * 1e6:11.1f} "
                  f"{med['backend'] * 1e6:13.1f} {med['numpy'] / med['dist']:11.2f} "
                  f"{med['numpy'] / med['backend']:14.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-main":
        from hetcomm.bench.sizes import parse_size_list

        rank_main(sys.argv[2].split(","), parse_size_list(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
