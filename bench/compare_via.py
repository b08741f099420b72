"""hetcomm through torch.distributed against hetcomm's own Communicator.

Runs ``hetcomm-bench --via numpy`` and ``--via torch`` alternately, several
rounds (timings on a shared 2-core VM swing by tens of percent from run to
run), and prints per op and size the best and the median algbw of each path
and their ratios. Noise on a shared machine only ever slows a run down, so
the best of several rounds is the steadier figure of what each path can do.

    python bench/compare_via.py --rounds 3 --sizes 1M,16M,64M,256M
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile


def run(via: str, ops: str, sizes: str, world: int) -> dict[tuple[str, int], float]:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([sys.executable, "-m", "hetcomm.bench.cli", "--via", via, "--ops", ops, "--sizes", sizes,
                        "-n", str(world), "--json", f.name, "-q"], check=True, stdout=subprocess.DEVNULL)
        rows = json.load(open(f.name))["rows"]
    return {(r["op"], r["size"]): r["algbw_GBps"] for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ops", default="allreduce,allgather,reduce_scatter,broadcast")
    ap.add_argument("--sizes", default="1M,16M,64M,256M")
    ap.add_argument("-n", "--world-size", type=int, default=2)
    args = ap.parse_args()
    samples: dict[str, dict[tuple[str, int], list[float]]] = {"numpy": {}, "torch": {}}
    for _ in range(args.rounds):
        for via in ("numpy", "torch"):
            for key, bw in run(via, args.ops, args.sizes, args.world_size).items():
                samples[via].setdefault(key, []).append(bw)
    print(f"# algbw (GB/s) over {args.rounds} alternating rounds, {args.world_size} ranks: best and median")
    print(f"{'op':>15} {'size(B)':>11} {'best numpy':>11} {'best torch':>11} {'torch/numpy':>12} "
          f"{'median numpy':>13} {'median torch':>13} {'torch/numpy':>12}")
    for key in sorted(samples["numpy"]):
        a, b = max(samples["numpy"][key]), max(samples["torch"][key])
        ma, mb = statistics.median(samples["numpy"][key]), statistics.median(samples["torch"][key])
        print(f"{key[0]:>15} {key[1]:>11} {a:11.2f} {b:11.2f} {b / a:12.2f} {ma:13.2f} {mb:13.2f} {mb / ma:12.2f}")


if __name__ == "__main__":
    main()
