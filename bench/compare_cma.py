"""Large collectives on one host: reading the peers' buffers (HETCOMM_CMA=1)
against the shared-memory lanes (HETCOMM_CMA=0), in alternating rounds.

On a shared 2-core VM separate runs swing by tens of percent, so the two
paths run one after the other in every round, each in fresh ranks, and the
table gives the median busbw over rounds (nccl-tests' definition) beside the
median one-core memcpy rate measured between them.

    python bench/compare_cma.py -n 2 --sizes 16M,64M --rounds 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import numpy as np  # noqa: E402

from hetcomm.bench.results import memcpy_gbps  # noqa: E402
from hetcomm.bench.sizes import parse_size_list  # noqa: E402

ITERS = 8


def _rank(rank: int, size: int, sizes: list[int], cma: bool) -> dict:
    import hetcomm

    times = {}
    with hetcomm.Communicator(rank, size, timeout=120, options=hetcomm.Options(cma=cma)) as comm:
        for nbytes in sizes:
            whole = np.zeros(nbytes // 4, np.float32)  # zeros: repeated sums stay finite
            part = np.zeros(nbytes // 4 // size, np.float32)
            for op, call in (("allreduce", lambda: comm.allreduce(whole)),
                             ("allgather", lambda: comm.allgather(part, out=whole[:part.size * size]))):
                call()
                comm.barrier()
                t0 = time.perf_counter()
                for _ in range(ITERS):
                    call()
                times[(op, nbytes)] = (time.perf_counter() - t0) / ITERS
    return times


def main() -> None:
    from harness import run_ranks

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--world-size", type=int, default=2)
    ap.add_argument("--sizes", default="16M,64M")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    n, sizes = args.world_size, parse_size_list(args.sizes)
    busbw: dict = {}
    memcpy = []
    for _ in range(args.rounds):
        for cma in (True, False):
            memcpy.append(memcpy_gbps())
            ranks = run_ranks(_rank, n, sizes, cma, timeout=600)
            for key in ranks[0]:
                t = max(r[key] for r in ranks)
                factor = 2 * (n - 1) / n if key[0] == "allreduce" else (n - 1) / n
                busbw.setdefault((cma,) + key, []).append(factor * key[1] / t / 1e9)
    print(f"# {n} ranks, {args.rounds} alternating rounds, load average {os.getloadavg()[0]:.2f} at the end, "
          f"memcpy median {statistics.median(memcpy):.2f} GB/s (one core, 64 MiB)")
    print(f"{'op':>10} {'size(B)':>10} {'direct':>8} {'lanes':>8} {'direct/lanes':>13} {'direct/memcpy':>14}")
    for op in ("allreduce", "allgather"):
        for nbytes in sizes:
            d = statistics.median(busbw[(True, op, nbytes)])
            lanes = statistics.median(busbw[(False, op, nbytes)])
            print(f"{op:>10} {nbytes:>10} {d:>8.2f} {lanes:>8.2f} {d / lanes:>13.2f} "
                  f"{d / statistics.median(memcpy):>14.2f}")


if __name__ == "__main__":
    main()
