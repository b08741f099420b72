"""What HETCOMM_INTRA costs: allreduce and broadcast with the in-site phases on gloo.

Four ranks on loopback in two sites of two (site labels per rank), three
set-ups timed in one job, one after the other:

- gloo: a plain gloo world group (the reference every figure is divided by);
- hetcomm: init_process_group("hetcomm"), every phase in hetcomm's core;
- hetcomm+intra=gloo: the in-site reduce-scatter/allgather/broadcast on a gloo
  group per site, the inter-site leg on hetcomm.

On one machine gloo is no faster inside a "site" than hetcomm, so this
measures the composition's overhead (three library calls and the hand-overs
between them), not the gain a vendor library brings on its own hardware.
Prints a table, then one JSON line. Run under ``flock /tmp/hetcomm-bench.lock``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

SETUPS = (("gloo", "gloo", None), ("hetcomm", "hetcomm", "hetcomm"), ("hetcomm+intra=gloo", "hetcomm", "gloo"))


def _rank(rank: int, ws: int, backend: str, intra: str | None, sizes: list[int], iters: int) -> dict:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    site = "a" if rank < ws // 2 else "b"
    if backend == "hetcomm":
        from hetcomm.torch import ProcessGroupOptions

        dist.init_process_group("hetcomm", pg_options=ProcessGroupOptions(site=site, intra=intra))
    else:
        dist.init_process_group(backend)
    out = {}
    for size in sizes:
        t = torch.ones(size // 4)
        for op in ("allreduce", "broadcast"):
            def call() -> None:
                if op == "allreduce":
                    dist.all_reduce(t)
                else:
                    dist.broadcast(t, src=0)
            for _ in range(2):
                call()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                call()
            out[f"{op} {size}"] = (time.perf_counter() - t0) / iters
    dist.destroy_process_group()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="4K,1M,16M", help="buffer sizes in bytes (K/M suffixes)")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args(argv)
    from hetcomm.config import parse_size
    from torch_ranks import run_ranks

    sizes = [parse_size(s) for s in args.sizes.split(",")]
    times = {}
    for name, backend, intra in SETUPS:
        per_rank = run_ranks(_rank, 4, backend, intra, sizes, args.iters, timeout=900)
        times[name] = {k: max(r[k] for r in per_rank) for k in per_rank[0]}
    rows = []
    print(f"{'op':<10} {'size(B)':>10} " + " ".join(f"{n + ' (us)':>22}" for n, _, _ in SETUPS)
          + f" {'x gloo (intra)':>15} {'intra/hetcomm':>14}")
    for key in times["gloo"]:
        op, size = key.split()
        t = {n: times[n][key] for n, _, _ in SETUPS}
        row = {"op": op, "size": int(size), **{f"{n}_s": v for n, v in t.items()},
               "x_gloo_intra": t["gloo"] / t["hetcomm+intra=gloo"],
               "intra_over_hetcomm": t["hetcomm+intra=gloo"] / t["hetcomm"]}
        rows.append(row)
        print(f"{op:<10} {size:>10} " + " ".join(f"{v * 1e6:>22.1f}" for v in t.values())
              + f" {row['x_gloo_intra']:>15.2f} {row['intra_over_hetcomm']:>14.2f}")
    print(json.dumps({"rows": rows, "ranks": 4, "sites": 2, "iters": args.iters}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
