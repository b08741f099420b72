"""Ranks of different speeds: plain DDP against hetcomm.balance, in one job.

Two sites of two ranks each over init_process_group("hetcomm"); every rank
runs in a cgroup v1 CPU quota of its own, the ranks of the "slow" site at
half the quota of the "fast" site's ranks (default 0.5 and 0.25 of a core:
4 ranks need 1.5 of the machine's 2 cores, so the quota, not the neighbours,
sets each rank's speed; torch runs one thread per rank). Both runs train the
same MLP from the same initialisation on the same global batches:

- plain: every rank takes global_batch / 4 samples (DDP's mean);
- balanced: hetcomm.balance.Balancer splits each global batch by measured
  speed and weights the gradient sum by samples.

Prints one JSON line last:
``{"runs": [{"name": "plain", "step_s": ...}, {"name": "balanced", "step_s": ...,
"max_param_diff_vs_uniform": ...}], ...}``; step_s is the mean wall time of
the steps after the balancer's first re-split (the same steps for both runs).
Needs root and cgroup v1 (/sys/fs/cgroup/cpu); run under
``flock /tmp/hetcomm-bench.lock`` so that benchmarks do not overlap.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _model(dims: list[int]) -> Any:
    import torch

    torch.manual_seed(0)
    layers: list[Any] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def _batches(cfg: dict) -> Any:
    import torch

    g = torch.Generator().manual_seed(1)
    for _ in range(cfg["steps"]):
        yield (torch.randn(cfg["global_batch"], cfg["dims"][0], generator=g),
               torch.randn(cfg["global_batch"], cfg["dims"][-1], generator=g))


def _train(rank: int, ws: int, cfg: dict, balanced: bool) -> dict:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from hetcomm.balance import Balancer

    model = DDP(_model(cfg["dims"]), bucket_cap_mb=cfg["bucket_mb"])
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"])
    balancer = Balancer(cfg["global_batch"], interval=cfg["interval"], warmup=cfg["warmup"])
    if balanced:
        model.register_comm_hook(None, balancer.ddp_hook())
    times, losses, splits = [], [], []
    for x, y in _batches(cfg):
        lo, n = balancer.share() if balanced else (rank * cfg["global_batch"] // ws, cfg["global_batch"] // ws)
        t0 = time.perf_counter()
        with balancer.step() if balanced else _null():
            loss = torch.nn.functional.mse_loss(model(x[lo:lo + n]), y[lo:lo + n])
            loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
        # The global-batch loss, outside the timed part: sample-weighted mean.
        total = torch.tensor([loss.item() * n])
        dist.all_reduce(total)
        losses.append(total.item() / cfg["global_batch"])
        splits.append(list(balancer.counts) if balanced else [cfg["global_batch"] // ws] * ws)
    # numpy, not tensors: tensors would travel through shared memory that dies with the rank.
    params = [p.detach().numpy().copy() for p in model.module.parameters()]
    return {"times": times, "losses": losses, "splits": splits, "params": params, "rebalances": balancer.rebalances}


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _rank(rank: int, ws: int, cfg: dict, cgroups: list[str]) -> dict:
    import torch
    import torch.distributed as dist

    # Join this rank's quota before doing any work.
    with open(os.path.join(cgroups[rank], "cgroup.procs"), "w") as f:
        f.write(f"{os.getpid()}\n")
    torch.set_num_threads(1)
    os.environ["HETCOMM_SITE"] = "fast" if rank < ws // 2 else "slow"
    import hetcomm  # noqa: F401

    dist.init_process_group("hetcomm")
    out = {"plain": _train(rank, ws, cfg, False), "balanced": _train(rank, ws, cfg, True)}
    dist.destroy_process_group()
    return out


def _uniform(cfg: dict) -> list[Any]:
    import torch

    model = _model(cfg["dims"])
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"])
    for x, y in _batches(cfg):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach() for p in model.parameters()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fast-share", type=float, default=0.5, help="CPU quota of a fast rank, in cores")
    ap.add_argument("--slow-ratio", type=float, default=0.5, help="a slow rank's quota over a fast rank's")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--global-batch", type=int, default=16384)
    ap.add_argument("--dims", default="256,512,512,64", help="MLP layer widths")
    ap.add_argument("--interval", type=int, default=4, help="balancer: steps between measurements")
    ap.add_argument("--timeout", type=float, default=900.0)
    args = ap.parse_args(argv)

    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    from torch_ranks import run_ranks

    from hetcomm.testbed.cpuquota import CpuQuota, unavailable_reason

    reason = unavailable_reason()
    if reason:
        print(json.dumps({"skipped": reason}))
        return 2
    ws = 4
    cfg = {"steps": args.steps, "global_batch": args.global_batch, "dims": [int(d) for d in args.dims.split(",")],
           "lr": 0.05, "interval": args.interval, "warmup": 1, "bucket_mb": 0.5}
    shares = [args.fast_share] * (ws // 2) + [args.fast_share * args.slow_ratio] * (ws // 2)
    quotas = [CpuQuota(f"hetcomm-mixed-{os.getpid()}-r{r}", s) for r, s in enumerate(shares)]
    try:
        results = run_ranks(_rank, ws, cfg, [str(q.path) for q in quotas], timeout=args.timeout)
        throttled = [round(q.throttled_s(), 2) for q in quotas]
    finally:
        for q in quotas:
            q.close()
    reference = _uniform(cfg)
    # Steady state: the steps after the balancer's first measurement interval.
    start = cfg["warmup"] + cfg["interval"]
    runs = []
    for name in ("plain", "balanced"):
        per_rank = [r[name] for r in results]
        step = [max(r["times"][i] for r in per_rank) for i in range(start, cfg["steps"])]
        diff = max(float(abs(p - q.numpy()).max()) for p, q in zip(per_rank[0]["params"], reference))
        runs.append({"name": name, "step_s": sum(step) / len(step), "max_param_diff_vs_uniform": diff,
                     "final_split": per_rank[0]["splits"][-1], "rebalances": per_rank[0]["rebalances"],
                     "losses": [round(x, 6) for x in per_rank[0]["losses"]]})
    loss_diff = max(abs(a - b) for a, b in zip(runs[0]["losses"], runs[1]["losses"]))
    print(json.dumps({"runs": runs, "speedup": runs[0]["step_s"] / runs[1]["step_s"], "max_loss_diff": loss_diff,
                      "cpu_shares": shares, "throttled_s": throttled, "steps": cfg["steps"], "steady_from": start}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
