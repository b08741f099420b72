"""Per-call cost of small collectives through torch.distributed on one host.

Each rank calls the collective back to back and reports its mean wall time
per call, the CPU its process spent per call (all threads) and its context
switches per call, so what a call costs the machine shows beside how long it
takes (with more ranks than cores the two differ).

    python bench/small_loop.py -n 4 --backend hetcomm --ops allreduce,allgather --sizes 4,4096
    HETCOMM_SPIN_US=0 python bench/small_loop.py -n 4      # sleep at once instead of yielding
    python bench/small_loop.py -n 4 --alone                 # the same calls, each process in a group of one

Run under ``flock /tmp/hetcomm-bench.lock`` beside other benchmarks.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import time


def _rank(rank: int, world: int, backend: str, op: str, size: int, iters: int, port: int, alone: bool,
          results) -> None:
    if alone:  # a group of one on a port of its own
        from hetcomm.bench.launcher import free_port

        port, rank, world = free_port(), 0, 1
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if backend == "hetcomm":
        import hetcomm  # noqa: F401  (registers the backend)
    dist.init_process_group(backend)
    count = max(1, size // 4)
    tensor, gathered = torch.ones(count), torch.empty(count * world)
    calls = {"allreduce": lambda: dist.all_reduce(tensor),
             "allgather": lambda: dist.all_gather_into_tensor(gathered, tensor),
             "reduce_scatter": lambda: dist.reduce_scatter_tensor(tensor, gathered)}
    call = calls[op]
    for _ in range(min(300, iters)):
        call()
    dist.barrier()
    usage0, cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
    for _ in range(iters):
        call()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    results.put((os.getpid(), wall / iters * 1e6, cpu / iters * 1e6, (usage.ru_nvcsw - usage0.ru_nvcsw) / iters,
                 (usage.ru_nivcsw - usage0.ru_nivcsw) / iters))
    dist.destroy_process_group()


def main() -> None:
    from hetcomm.bench.launcher import free_port

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--world-size", type=int, default=4)
    ap.add_argument("--backend", default="hetcomm", help="hetcomm or gloo")
    ap.add_argument("--ops", default="allreduce,allgather,reduce_scatter")
    ap.add_argument("--sizes", default="4,4096", help="bytes per rank's input, comma-separated")
    ap.add_argument("--iters", type=int, default=3000)
    ap.add_argument("--alone", action="store_true",
                    help="each process calls in a group of its own: what the calls cost without any exchange, "
                         "with as many processes sharing the cores")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    print(f"{'op':<15} {'bytes':>6} {'wall us/call':>13} {'CPU us/call, all ranks':>23} {'switches/call':>14}")
    for op in args.ops.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            results = ctx.Queue()
            port = free_port()
            procs = [ctx.Process(target=_rank, args=(r, args.world_size, args.backend, op, size, args.iters, port,
                                                     args.alone, results)) for r in range(args.world_size)]
            for p in procs:
                p.start()
            rows = sorted(results.get(timeout=600) for _ in procs)
            for p in procs:
                p.join(timeout=60)
            wall = max(r[1] for r in rows)
            print(f"{op:<15} {size:>6} {wall:13.1f} {sum(r[2] for r in rows):23.1f} "
                  f"{sum(r[3] + r[4] for r in rows) / len(rows):14.2f}", flush=True)


if __name__ == "__main__":
    main()
