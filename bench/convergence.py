"""Does compressed DDP still train? An MLP on fixed synthetic data, DDP over
hetcomm, each codec with error feedback against uncompressed allreduce.

    python bench/convergence.py --steps 300 --out convergence.json

Every run starts from the same weights and sees the same batches; the only
difference is the gradient codec. Writes the loss curves (train loss per
step, held-out loss every 10 steps) to JSON and prints the final held-out
losses and their gap to the uncompressed run.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys

CODECS = ["none", "int8", "int4", "1bit"]


def _data(rank: int, world: int, steps: int, batch: int):
    import torch

    g = torch.Generator().manual_seed(1234)
    teacher = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
    for p in teacher.parameters():
        torch.nn.init.normal_(p, std=1.0, generator=g)
    x = torch.randn(steps * batch * world + 2048, 32, generator=g)
    with torch.no_grad():
        y = teacher(x).argmax(dim=1)
    train_x, train_y = x[:-2048], y[:-2048]
    # Each rank gets its own slice of every global batch.
    idx = torch.arange(steps * batch * world).view(steps, world, batch)[:, rank]
    return train_x, train_y, idx, x[-2048:], y[-2048:]


def train(rank: int, world: int, codec: str, steps: int, batch: int = 64) -> dict:
    """One rank of one run; returns the loss curves."""
    import torch
    import torch.distributed as dist

    import hetcomm

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 10))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    if codec != "none":
        ddp.register_comm_hook(None, hetcomm.ddp_hook(codec, error_feedback=True))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    xs, ys, idx, test_x, test_y = _data(rank, world, steps, batch)
    loss_fn = torch.nn.CrossEntropyLoss()
    train_curve, test_curve = [], []
    for step in range(steps):
        opt.zero_grad()
        loss = loss_fn(ddp(xs[idx[step]]), ys[idx[step]])
        loss.backward()
        opt.step()
        train_curve.append(loss.item())
        if step % 10 == 9 or step == steps - 1:
            with torch.no_grad():
                test_curve.append((step + 1, float(loss_fn(model(test_x), test_y))))
    # All ranks hold the same weights (bit-identical allreduce results).
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    identical = all(torch.equal(gathered[0], g) for g in gathered)
    return {"codec": codec, "train": train_curve, "test": test_curve, "identical": identical}


def run_all(rank: int, world: int, codecs: list[str], steps: int) -> list[dict]:
    """Every codec in turn in one process group (ranks spawned by the caller)."""
    import datetime

    import torch.distributed as dist

    import hetcomm  # noqa: F401  registers the backend

    dist.init_process_group("hetcomm", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        return [train(rank, world, codec, steps) for codec in codecs]
    finally:
        dist.destroy_process_group()


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Final held-out loss per codec and its relative gap to uncompressed."""
    ref = runs[0]["test"][-1][1]
    return {r["codec"]: {"final_test_loss": r["test"][-1][1], "gap": (r["test"][-1][1] - ref) / ref,
                         "identical_across_ranks": r["identical"]} for r in runs}


def _rank_main(rank: int, world: int, port: int, codecs: list[str], steps: int, q) -> None:
    import traceback

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        q.put((rank, run_all(rank, world, codecs, steps)))
    except BaseException:
        q.put((rank, traceback.format_exc()))


def main() -> None:
    import multiprocessing as mp

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--codecs", default=",".join(CODECS))
    ap.add_argument("--out", default="convergence.json")
    args = ap.parse_args()
    codecs = args.codecs.split(",")
    if codecs[0] != "none":
        codecs.insert(0, "none")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, args.world_size, port, codecs, args.steps, q))
             for r in range(args.world_size)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    failed = {r: v for r, v in results.items() if isinstance(v, str)}
    if failed:
        sys.exit("\n".join(f"rank {r} failed:\n{v}" for r, v in failed.items()))
    runs = results[0]
    summary = summarize(runs)
    with open(args.out, "w") as f:
        json.dump({"steps": args.steps, "world_size": args.world_size, "summary": summary, "runs": runs}, f)
    print(f"{'codec':>6} {'final held-out loss':>20} {'vs none':>9}  identical")
    for codec, s in summary.items():
        print(f"{codec:>6} {s['final_test_loss']:20.4f} {100 * s['gap']:+8.2f}%  {s['identical_across_ranks']}")
    print(f"curves: {args.out}")


if __name__ == "__main__":
    sys.exit(main())
