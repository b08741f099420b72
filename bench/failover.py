"""Failover: kill one of N ranks at a random moment; time until the survivors
have shrunk the communicator and finished their first correct allreduce.

Each trial starts N fresh rank processes (numpy Communicator, one host)
that loop over allreduces, checking every result; the parent SIGKILLs a
random rank after a random delay. The survivors catch PeerLostError, shrink
to the agreed failed set and run one allreduce on the new communicator,
checked against the exact sum. Reported per trial: detection (kill to the
last survivor's exception) and recovery (kill to the last survivor's first
correct allreduce on the shrunk group), then the distribution, hangs and
wrong results. With --gloo, the same kill is done to a gloo process group
in the same run, for its detection time (gloo cannot shrink).

    flock /tmp/hetcomm-bench.lock python bench/failover.py --trials 20 --ranks 4 --gloo
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import random
import signal
import socket
import statistics
import time

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hetcomm_rank(rank: int, size: int, port: int, count: int, out: "mp.Queue") -> None:
    import hetcomm
    from hetcomm.store import Store

    store = Store("127.0.0.1", port, False, 60)
    comm = hetcomm.Communicator(rank, size, store=store, timeout=60, name="failover")
    expected = size * (size + 1) / 2
    out.put(("ready", rank, os.getpid()))
    try:
        while True:
            buf = np.full(count, rank + 1, np.float32)
            comm.allreduce(buf)
            if not (buf == expected).all():
                out.put(("wrong", rank, "before the kill"))
                return
    except hetcomm.PeerLostError as exc:
        detected = time.time()
        failed = exc.failed_ranks or comm.failed_ranks()
        new = comm.shrink(failed)
        buf = np.full(count, new.rank + 1, np.float32)
        new.allreduce(buf)
        recovered = time.time()
        ok = bool((buf == new.size * (new.size + 1) / 2).all())
        out.put(("done", rank, detected, recovered, ok, failed))
        new.close()
        comm.close()


def _gloo_rank(rank: int, size: int, port: int, count: int, out: "mp.Queue") -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    out.put(("ready", rank, os.getpid()))
    try:
        while True:
            dist.all_reduce(torch.ones(count))
    except Exception:  # noqa: BLE001 - gloo raises RuntimeError subclasses
        out.put(("done", rank, time.time(), float("nan"), True, []))
        out.close()
        out.join_thread()
        os._exit(0)  # a gloo group with a dead member cannot be torn down cleanly


def trial(target, size: int, count: int, rng: random.Random, deadline_s: float) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    server = None
    if target is _hetcomm_rank:
        from hetcomm.store import Store

        server = Store("127.0.0.1", port, True, 60)  # outlives any rank, so any rank may die
    procs = [ctx.Process(target=target, args=(r, size, port, count, out), daemon=True) for r in range(size)]
    for p in procs:
        p.start()
    result: dict = {"hang": False, "wrong": 0}
    try:
        pids = {}
        while len(pids) < size:
            kind, rank, *rest = out.get(timeout=deadline_s)
            if kind == "ready":
                pids[rank] = rest[0]
        time.sleep(rng.uniform(0.1, 1.0))  # a random moment inside the allreduce loop
        victim = rng.randrange(size)
        killed = time.time()
        os.kill(pids[victim], signal.SIGKILL)
        result["victim"] = victim
        done = []
        end = time.monotonic() + deadline_s
        while len(done) < size - 1:
            try:
                kind, rank, *rest = out.get(timeout=max(0.1, end - time.monotonic()))
            except queue.Empty:
                result["hang"] = True
                break
            if kind == "wrong":
                result["wrong"] += 1
            elif kind == "done":
                detected, recovered, ok, failed = rest
                done.append((detected, recovered))
                result["wrong"] += int(not ok or (target is _hetcomm_rank and failed != [victim]))
        if done:
            result["detect"] = max(d for d, _ in done) - killed
            result["recover"] = max(r for _, r in done) - killed
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        if server:
            server.close()
    return result


def _summary(name: str, values: list[float]) -> str:
    if not values:
        return f"{name}: no value"
    q = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else values
    return (f"{name}: median {statistics.median(values) * 1e3:.0f} ms, min {min(values) * 1e3:.0f}, "
            f"p90 {q[-1] * 1e3:.0f}, max {max(values) * 1e3:.0f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--count", type=int, default=1 << 18, help="float32 elements per allreduce (default 1 MiB)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--deadline", type=float, default=60.0, help="seconds before a trial counts as a hang")
    ap.add_argument("--gloo", action="store_true", help="also time gloo's detection of the same kill")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    targets = [("hetcomm", _hetcomm_rank)] + ([("gloo", _gloo_rank)] if args.gloo else [])
    rows: dict[str, list[dict]] = {name: [] for name, _ in targets}
    for i in range(args.trials):
        for name, target in targets:  # interleaved, so both see the same machine load
            r = trial(target, args.ranks, args.count, rng, args.deadline)
            rows[name].append(r)
            print(f"trial {i + 1:2d} {name:7s} victim {r.get('victim')}: detect "
                  f"{r.get('detect', float('nan')) * 1e3:7.1f} ms, recover {r.get('recover', float('nan')) * 1e3:7.1f} ms"
                  f"{'  HANG' if r['hang'] else ''}{'  WRONG' if r['wrong'] else ''}", flush=True)
    for name, rs in rows.items():
        print(f"--- {name}: {args.ranks} ranks, {args.count * 4} B allreduce, {len(rs)} trials, "
              f"{sum(r['hang'] for r in rs)} hangs, {sum(r['wrong'] > 0 for r in rs)} with wrong results")
        print("  " + _summary("detection", [r["detect"] for r in rs if "detect" in r]))
        if name == "hetcomm":
            print("  " + _summary("kill to first correct allreduce on the shrunk group",
                                  [r["recover"] for r in rs if "recover" in r]))


if __name__ == "__main__":
    main()
