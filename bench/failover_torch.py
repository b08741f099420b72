"""Failover through torch.distributed: SIGKILL one of N ranks at a random moment,
time how long the survivors take to raise and to finish a correct allreduce on
the shrunk group.

Each trial starts N fresh ranks (2 sites of N/2 on this machine) that run
allreduces back to back; after a random delay one random rank is SIGKILLed.
hetcomm survivors then catch the DistBackendError, read the agreed failed set
(``hetcomm.torch.failed_ranks``), call ``torch.distributed.shrink_group`` and
run one allreduce whose exact result is checked. gloo, run the same way, can
only raise (it does not support shrinking): its time to raise is the
reference for detection. The job's store is hosted here, so that losing rank
0 loses no store.

    python bench/failover_torch.py --trials 20            # hetcomm and gloo
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from datetime import timedelta

ELEMENTS = 1 << 16  # per allreduce: 256 KiB of fp32


def rank_main(backend: str, rank: int, world: int, store_addr: str) -> None:
    import torch
    import torch.distributed as dist

    import hetcomm  # noqa: F401  registers the backend

    torch.set_num_threads(1)
    host, port = store_addr.rsplit(":", 1)
    store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group(backend, store=dist.PrefixStore("job", store), rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    x = torch.ones(ELEMENTS)
    for _ in range(3):
        dist.all_reduce(x)
    store.set(f"ready/{rank}", "1")
    try:
        while True:
            dist.all_reduce(x)
    except RuntimeError as exc:
        raised = time.time()
        error = str(exc).splitlines()[0][:200]
    report = {"rank": rank, "raised": raised, "error": error}
    if backend == "hetcomm":
        import hetcomm.torch as ht

        lost = ht.failed_ranks()
        dist.shrink_group(lost)
        survivors = [r for r in range(world) if r not in lost]
        y = torch.full((ELEMENTS,), float(rank + 1))
        dist.all_reduce(y)
        report.update(lost=lost, done=time.time(),
                      correct=bool(torch.equal(y, torch.full((ELEMENTS,), float(sum(r + 1 for r in survivors))))))
    print("@report " + json.dumps(report), flush=True)
    os._exit(0)  # the old group's peer is gone: skip the exit-time teardown


def trial(backend: str, world: int, rng: random.Random, deadline_s: float) -> dict:
    import torch.distributed as dist

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    port = server.port
    procs = []
    for r in range(world):
        env = {**os.environ, "HETCOMM_SITE": f"site{r * 2 // world}", "MASTER_ADDR": "127.0.0.1",
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--rank-main", backend, str(r),
                                       str(world), f"127.0.0.1:{port}"], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    try:
        server.wait([f"ready/{r}" for r in range(world)], timedelta(seconds=120))
        victim = rng.randrange(world)
        time.sleep(rng.uniform(0.0, 0.3))  # a random moment inside the allreduce loop
        killed = time.time()
        os.kill(procs[victim].pid, signal.SIGKILL)
        reports, hung = [], []
        for r, p in enumerate(procs):
            if r == victim:
                p.wait()
                continue
            try:
                out, _ = p.communicate(timeout=max(0.1, killed + deadline_s - time.time()))
            except subprocess.TimeoutExpired:
                hung.append(r)
                continue
            line = next((ln for ln in out.splitlines() if ln.startswith("@report ")), None)
            if line is None:
                raise RuntimeError(f"{backend} rank {r} exited {p.returncode} without a report:\n{out[-3000:]}")
            reports.append(json.loads(line[len("@report "):]))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    result = {"victim": victim, "hung": hung, "raise_s": max((r["raised"] - killed for r in reports), default=None)}
    if backend == "hetcomm" and reports:
        result.update(shrunk_allreduce_s=max(r["done"] - killed for r in reports),
                      wrong=sum(not r["correct"] or r["lost"] != [victim] for r in reports),
                      error=reports[0]["error"])
    return result


def _dist(values: list[float]) -> str:
    v = sorted(values)
    q = lambda p: v[min(len(v) - 1, int(p * len(v)))]  # noqa: E731
    return f"median {statistics.median(v):.3f} s, p90 {q(0.9):.3f} s, min {v[0]:.3f} s, max {v[-1]:.3f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--backends", default="hetcomm,gloo")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--deadline", type=float, default=30.0,
                    help="seconds after the kill before a survivor counts as hung")
    ap.add_argument("--json", help="write every trial here")
    args = ap.parse_args()
    results = {}
    for backend in args.backends.split(","):
        rng = random.Random(args.seed)
        results[backend] = [trial(backend, args.ranks, rng, args.deadline) for _ in range(args.trials)]
    print(f"# failover, {args.ranks} ranks (2 sites) on loopback, one rank SIGKILLed at a random moment, "
          f"{args.trials} trials, allreduce of {ELEMENTS * 4 // 1024} KiB fp32 in a loop")
    for backend, trials in results.items():
        raised = [t["raise_s"] for t in trials if t["raise_s"] is not None]
        hung = sum(len(t["hung"]) > 0 for t in trials)
        print(f"{backend:8} survivors raise:               {_dist(raised)}; trials with a hang: {hung}")
        if backend == "hetcomm":
            done = [t["shrunk_allreduce_s"] for t in trials if "shrunk_allreduce_s" in t]
            wrong = sum(t.get("wrong", 0) for t in trials)
            print(f"{backend:8} kill -> correct shrunk allreduce: {_dist(done)}; wrong results: {wrong}")
            print(f"{'':8} error seen: {trials[0].get('error')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-main":
        rank_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        main()
