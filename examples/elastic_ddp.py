"""Elastic DDP across two sites: lose a whole site, go on, take it back.

2 sites x 2 ranks train one MLP with DDP over hetcomm. At step ``--kill-step``
every rank of site ``--kill-site`` is SIGKILLed; the other site shrinks the
group past them (``hetcomm.torch.shrink_lost``, i.e. ``dist.shrink_group``)
and goes on with its own samples only. At step ``--rejoin-step`` the lost site
is started again: its ranks join the running job (``hetcomm.torch.join_group``),
the survivors grow the group back at a step boundary
(``hetcomm.torch.grow_if_pending``) and send them the model and optimizer
state (``hetcomm.torch.broadcast_state``). The same job is also run
undisturbed on the same data, and the two final losses are compared.

    sudo python examples/elastic_ddp.py                 # netns test bed: 2 sites, 1 Gbit/s WAN
    python examples/elastic_ddp.py --loopback           # the same on loopback, sites as labels

The job's store (what the ranks rendezvous through, and what newcomers find
the job by) lives outside every rank, as a launcher's would: in the test
bed's hub namespace, or in this process with --loopback.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

HIDDEN = 512
FEATURES = 256
CLASSES = 10
BATCH = 128       # samples per rank and step
EVAL_SAMPLES = 4096
JOB = "elastic-example"
EVENT = "@event "  # stdout lines the ranks report on


# ---- one rank ----------------------------------------------------------------------------


def _emit(kind: str, **fields: Any) -> None:
    print(EVENT + json.dumps({"ev": kind, "t": time.time(), **fields}), flush=True)


def _model() -> "Any":
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, HIDDEN),
                               torch.nn.ReLU(), torch.nn.Linear(HIDDEN, CLASSES))


def _teacher() -> "Any":
    import torch

    return torch.randn(FEATURES, CLASSES, generator=torch.Generator().manual_seed(99))


def batch(worker: int, step: int, n: int = BATCH) -> tuple["Any", "Any"]:
    """Worker ``worker``'s samples of step ``step``: the same in every run."""
    import torch

    g = torch.Generator().manual_seed(1_000_003 * (worker + 1) + step)
    x = torch.randn(n, FEATURES, generator=g)
    return x, (x @ _teacher()).argmax(dim=1)


def eval_loss(model: "Any") -> float:
    """Loss on a fixed held-out set (the figure the runs are compared by)."""
    import torch

    x, y = batch(-1, 0, EVAL_SAMPLES)
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(x), y))


def _resync(model: "Any", opt: "Any", step: int, group: "Any") -> int:
    """After a shrink: survivors that stopped at different steps take the most advanced one's state."""
    import torch
    import torch.distributed as dist

    import hetcomm.torch as ht

    span = torch.tensor([step, -step], dtype=torch.int64)
    dist.all_reduce(span, op=dist.ReduceOp.MAX, group=group)
    newest, oldest = int(span[0]), -int(span[1])
    if newest == oldest:
        return step
    have = torch.tensor([dist.get_rank(group) if step == newest else dist.get_world_size(group)])
    dist.all_reduce(have, op=dist.ReduceOp.MIN, group=group)
    return int(ht.broadcast_state(model, opt, newest, src=int(have[0]), group=group))


def _members(worker: int, group: "Any") -> list[int]:
    """The worker ids of the group's ranks, in rank order."""
    import torch
    import torch.distributed as dist

    ids = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size(group))]
    dist.all_gather(ids, torch.tensor([worker]), group=group)
    return [int(i) for i in ids]


def _grad_error(model: "Any", members: list[int], step: int) -> float:
    """Largest relative difference between the DDP gradient and the gradient of the
    mean loss over the members' samples (computed here, on one rank)."""
    import copy

    import torch

    ref = copy.deepcopy(model)
    ref.zero_grad()
    xs, ys = zip(*(batch(w, step) for w in members))
    torch.nn.functional.cross_entropy(ref(torch.cat(xs)), torch.cat(ys)).backward()
    err = 0.0
    for p, q in zip(model.parameters(), ref.parameters()):
        err = max(err, float((p.grad - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-12)))
    return err


def rank_main(args: argparse.Namespace) -> None:
    import datetime
    import hashlib

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import hetcomm
    import hetcomm.torch as ht

    torch.set_num_threads(1)
    host, port = args.store.rsplit(":", 1)
    store = dist.TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=args.timeout))
    worker, world = args.worker, int(os.environ["WORLD_SIZE"])
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    if args.join:
        _emit("joining", worker=worker)
        pg = ht.join_group(store, name=JOB, timeout=args.timeout)
        step = int(ht.broadcast_state(model, opt, None, src=0, group=pg))
        _emit("joined", worker=worker, rank=pg.rank(), size=pg.size(), step=step)
    else:
        dist.init_process_group("hetcomm", store=dist.PrefixStore("job", store), rank=int(os.environ["RANK"]),
                                world_size=world,
                                timeout=datetime.timedelta(seconds=args.timeout))
        pg, step = dist.group.WORLD, 0

    def wrap() -> Any:
        ddp = DDP(model, process_group=pg)
        if args.codec != "none":
            ddp.register_comm_hook(pg, hetcomm.ddp_hook(args.codec, error_feedback=True))
        return ddp

    ddp = wrap()
    done: list[int] = []
    while step < args.steps:
        try:
            # A step boundary: take in ranks that asked to join.
            while True:
                # At the rejoin step a shrunk group may wait for its missing ranks.
                wait = world - pg.size() if args.rejoin_wait and step == args.rejoin_step else 0
                grown = ht.grow_if_pending(store, name=JOB, wait_for=wait, timeout=args.timeout)
                if grown is None:
                    break
                pg = grown
                step = int(ht.broadcast_state(model, opt, step, src=0, group=pg))
                ddp = wrap()
                _emit("grown", worker=worker, rank=pg.rank(), size=pg.size(), step=step)
            _emit("step_begin", worker=worker, step=step, size=pg.size())
            x, y = batch(worker, step)
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(ddp(x), y)
            loss.backward()
            grad_err = None
            if args.check_grads and pg.rank() == 0:
                grad_err = _grad_error(model, _members(worker, pg), step)
            elif args.check_grads:
                _members(worker, pg)
            opt.step()
            done.append(step)
            _emit("step", worker=worker, step=step, size=pg.size(), loss=loss.item(), grad_err=grad_err)
            step += 1
        except RuntimeError as exc:
            raised = time.time()
            lost = ht.failed_ranks(pg)  # the survivors' agreed set
            if not lost:
                raise
            _emit("failure", worker=worker, step=step, lost=lost, raised=raised,
                  error=str(exc).splitlines()[0][:300])
            pg = ht.shrink_lost(pg)
            _emit("shrunk", worker=worker, rank=pg.rank(), size=pg.size())
            behind = step
            step = _resync(model, opt, step, pg)
            # Steps another survivor finished before the failure: this rank now holds their result.
            done.extend(range(behind, step))
            ddp = wrap()
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    _emit("done", worker=worker, steps=done, params=digest, eval_loss=eval_loss(model), rank=pg.rank(),
          size=pg.size())
    dist.destroy_process_group()


# ---- the driver ----------------------------------------------------------------------------


class Cluster:
    """Starts ranks (in the test bed's site namespaces, or plain processes) and collects their events."""

    def __init__(self, args: argparse.Namespace, bed: Any, store_addr: str) -> None:
        self.args, self.bed, self.store_addr = args, bed, store_addr
        self.events: "queue.Queue[dict]" = queue.Queue()
        self.procs: dict[int, subprocess.Popen] = {}
        self.logs: dict[int, list[str]] = {}

    def site_of(self, worker: int) -> int:
        return worker // self.args.ranks_per_site

    def start(self, worker: int, join: bool, world: int) -> None:
        a = self.args
        argv = [sys.executable, os.path.abspath(__file__), "--rank-main", "--worker", str(worker), "--store",
                self.store_addr, "--steps", str(a.steps), "--rejoin-step", str(a.rejoin_step), "--rejoin-wait",
                str(a.rejoin_wait), "--codec", a.codec, "--lr", str(a.lr),
                "--timeout", str(a.timeout)] + (["--join"] if join else []) + (
                    ["--check-grads"] if a.check_grads else [])
        site = self.site_of(worker)
        env = {"RANK": str(worker), "WORLD_SIZE": str(world), "HETCOMM_SITE": f"site{site}", "OMP_NUM_THREADS": "1",
               "PYTHONUNBUFFERED": "1"}
        if self.bed is not None:
            env = {**self.bed.rank_env(worker), **env}
            proc = self.bed.popen(site, argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        else:
            env = {**os.environ, "MASTER_ADDR": "127.0.0.1", **env}
            proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True, stdin=subprocess.DEVNULL)
        self.procs[worker] = proc
        self.logs[worker] = log = []
        threading.Thread(target=self._read, args=(worker, proc, log), daemon=True).start()

    def _read(self, worker: int, proc: subprocess.Popen, log: list[str]) -> None:
        for line in proc.stdout:
            if line.startswith(EVENT):
                self.events.put(json.loads(line[len(EVENT):]))
            else:
                log.append(line.rstrip())
        proc.wait()
        self.events.put({"ev": "exit", "worker": worker, "code": proc.returncode, "t": time.time(), "pid": proc.pid})

    def kill(self, workers: list[int]) -> float:
        t = time.time()
        for w in workers:
            os.kill(self.procs[w].pid, signal.SIGKILL)
        return t

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def run_job(args: argparse.Namespace, bed: Any, store_addr: str, disturb: bool) -> dict:
    """One training run; returns its events and the figures taken from them."""
    world = args.sites * args.ranks_per_site
    cluster = Cluster(args, bed, store_addr)
    victims = [w for w in range(world) if cluster.site_of(w) == args.kill_site] if disturb else []
    events: list[dict] = []
    marks: dict[str, float] = {}
    finished: dict[int, dict] = {}
    live = set(range(world))
    for w in range(world):
        cluster.start(w, join=False, world=world)
    deadline = time.monotonic() + args.deadline
    try:
        while len(finished) < len(live):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the job did not finish within {args.deadline} s (finished: {sorted(finished)})")
            try:
                ev = cluster.events.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            events.append(ev)
            kind = ev["ev"]
            if kind == "step_begin" and disturb and ev["step"] == args.kill_step and ev["worker"] in victims \
                    and "kill" not in marks:
                marks["kill"] = cluster.kill(victims)
                live -= set(victims)
            elif kind == "step" and disturb and ev["step"] >= args.rejoin_step - 1 and "kill" in marks \
                    and "restart" not in marks and ev["worker"] not in victims:
                # The survivors reached the rejoin step's boundary.
                marks["restart"] = time.time()
                for w in victims:
                    cluster.start(w, join=True, world=world)
                live |= set(victims)
            elif kind == "done":
                finished[ev["worker"]] = ev
            elif kind == "exit" and ev["code"] != 0 and not (ev["worker"] in victims and "restart" not in marks):
                out = "\n".join(cluster.logs[ev["worker"]][-40:])
                raise RuntimeError(f"worker {ev['worker']} exited with {ev['code']}:\n{out}")
    finally:
        cluster.stop_all()
    return {"events": events, "marks": marks, "finished": finished, "victims": victims}


def figures(run: dict, args: argparse.Namespace) -> dict:
    """Recovery times and checks from a disturbed run's events."""
    ev, marks, victims = run["events"], run["marks"], run["victims"]
    kill, restart = marks["kill"], marks["restart"]
    survivors = sorted(set(run["finished"]) - set(victims))
    failures = {e["worker"]: e for e in ev if e["ev"] == "failure"}
    raised = [failures[w]["raised"] - kill for w in survivors]
    agreed = [failures[w]["t"] - kill for w in survivors]
    shrunk = [next(e["t"] for e in ev if e["ev"] == "shrunk" and e["worker"] == w) - kill for w in survivors]
    small = min(e["size"] for e in ev if e["ev"] == "shrunk")
    resumed = [min(e["t"] for e in ev if e["ev"] == "step" and e["worker"] == w and e["t"] > kill
                   and e["size"] == small) - kill for w in survivors]
    full = args.sites * args.ranks_per_site
    rejoined = [min(e["t"] for e in ev if e["ev"] == "step" and e["worker"] == w and e["t"] > restart
                    and e["size"] == full) - restart for w in victims]
    joined_step = min(e["step"] for e in ev if e["ev"] == "joined")
    # Of the rejoin time, what the newcomers spent starting (interpreter, torch) before asking to join.
    asked = max(e["t"] for e in ev if e["ev"] == "joining" and e["t"] > restart)
    first_full = max(min(e["t"] for e in ev if e["ev"] == "step" and e["worker"] == w and e["t"] > restart
                         and e["size"] == full) for w in victims)
    return {"raised_s": max(raised), "agreed_s": max(agreed), "shrunk_s": max(shrunk), "resumed_s": max(resumed), "rejoined_s": max(rejoined),
            "startup_s": asked - restart, "join_to_full_step_s": first_full - asked, "rejoin_step": joined_step,
            "survivors": survivors}


def replay(run: dict, args: argparse.Namespace) -> float:
    """The same training in one process: each step on exactly the samples of the
    workers that took part in it (from the events); returns its final eval loss."""
    import torch

    members: dict[int, set[int]] = {}
    for e in run["events"]:
        if e["ev"] == "step":
            members.setdefault(e["step"], set()).add(e["worker"])
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    for step in range(args.steps):
        xs, ys = zip(*(batch(w, step) for w in sorted(members[step])))
        opt.zero_grad()
        # Equal batches: the mean over all of them is DDP's average of the ranks' means.
        torch.nn.functional.cross_entropy(model(torch.cat(xs)), torch.cat(ys)).backward()
        opt.step()
    return eval_loss(model)


def check(run: dict, args: argparse.Namespace) -> list[str]:
    """What must hold for a disturbed run; returns the violations."""
    problems = []
    fin = run["finished"]
    victims = set(run["victims"])
    digests = {e["params"] for e in fin.values()}
    if len(digests) != 1:
        problems.append(f"ranks ended with different parameters: {digests}")
    for w, e in fin.items():
        if w in victims:
            start = min(e["steps"]) if e["steps"] else args.steps
            if e["steps"] != list(range(start, args.steps)):
                problems.append(f"rejoined worker {w} ran steps {e['steps']}")
        elif e["steps"] != list(range(args.steps)):
            problems.append(f"survivor {w} ran steps {e['steps']} (not each of 0..{args.steps - 1} once)")
    if args.codec == "none":
        # The elastic run must be the plain mathematics of its schedule (fp32
        # sums in another order aside).
        ours, exact = fin[min(fin)]["eval_loss"], replay(run, args)
        if abs(ours / exact - 1) > 1e-3:
            problems.append(f"final loss {ours:.6f} differs from a one-process replay of the schedule ({exact:.6f})")
    errs = [e["grad_err"] for e in run["events"] if e["ev"] == "step" and e.get("grad_err") is not None]
    if args.check_grads and max(errs, default=1.0) > 1e-4:
        problems.append(f"a DDP gradient differs from the members' mean gradient by {max(errs):.2e} (relative)")
    return problems


def serve_store(port: int) -> None:
    """Hosts the job's TCPStore until stdin closes."""
    import datetime

    import torch.distributed as dist

    store = dist.TCPStore("0.0.0.0", port, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=3600))
    print("ready", flush=True)
    sys.stdin.read()
    del store


def _store_process(bed: Any, port: int) -> subprocess.Popen:
    argv = [sys.executable, os.path.abspath(__file__), "--serve-store", str(port)]
    if bed is not None:
        argv = ["ip", "netns", "exec", bed.hub_netns] + argv
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError("the store did not start")
    return proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loopback", action="store_true", help="no network namespaces: ranks on loopback, site labels")
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--ranks-per-site", type=int, default=2)
    ap.add_argument("--rate", default="1gbit", help="WAN rate of the test bed")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--kill-step", type=int, default=20)
    ap.add_argument("--kill-site", type=int, default=1)
    ap.add_argument("--rejoin-step", type=int, default=40)
    ap.add_argument("--rejoin-wait", type=int, default=1,
                    help="1: the survivors wait at --rejoin-step for the restarted site; 0: they go on and take "
                         "it back at the first step boundary after it is ready")
    ap.add_argument("--codec", default="none")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--check-grads", action="store_true", help="check every DDP gradient against the reference")
    ap.add_argument("--no-baseline", action="store_true", help="skip the undisturbed run")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--deadline", type=float, default=900.0, help="seconds a run may take in all")
    ap.add_argument("--json", help="write figures and events here")
    ap.add_argument("--port", type=int, default=29870)
    args = ap.parse_args()
    bed = None
    if not args.loopback:
        from hetcomm.testbed.netns import WanTestbed, available

        ok, why = available()
        if not ok:
            sys.exit(f"network namespaces unavailable ({why}); use --loopback")
        bed = WanTestbed(sites=args.sites, ranks_per_site=args.ranks_per_site, wan_rate=args.rate,
                         prefix="hcel").start()
    report: dict[str, Any] = {}
    try:
        runs = [("disturbed", True)] + ([] if args.no_baseline else [("undisturbed", False)])
        for i, (label, disturb) in enumerate(runs):
            store = _store_process(bed, args.port + i)
            host = bed.hub_address(0) if bed is not None else "127.0.0.1"
            try:
                report[label] = run_job(args, bed, f"{host}:{args.port + i}", disturb)
            finally:
                store.stdin.close()
                store.wait()
    finally:
        if bed is not None:
            bed.close()
    disturbed = report["disturbed"]
    fig = figures(disturbed, args)
    problems = check(disturbed, args)
    loss = statistics.mean(e["eval_loss"] for e in disturbed["finished"].values())
    fig["final_eval_loss"] = loss
    if "undisturbed" in report:
        base = statistics.mean(e["eval_loss"] for e in report["undisturbed"]["finished"].values())
        fig["undisturbed_eval_loss"] = base
        fig["loss_vs_undisturbed"] = loss / base - 1
        if abs(loss / base - 1) > 0.02:
            problems.append(f"final loss {loss:.4f} is {100 * (loss / base - 1):+.2f}% off the undisturbed {base:.4f}")
    where = "loopback (site labels)" if bed is None else f"netns test bed, WAN {args.rate}"
    print(f"# elastic DDP, {args.sites} sites x {args.ranks_per_site} ranks, {where}, {args.steps} steps; "
          f"site {args.kill_site} SIGKILLed at step {args.kill_step}, restarted at step {args.rejoin_step}")
    print(f"every survivor raised            {fig['raised_s']:.3f} s after the kill")
    print(f"failed set agreed on everywhere  {fig['agreed_s']:.3f} s after the kill")
    print(f"group shrunk on every survivor   {fig['shrunk_s']:.3f} s after the kill")
    print(f"first step of the shrunk group   {fig['resumed_s']:.3f} s after the kill")
    print(f"site back, first full-size step  {fig['rejoined_s']:.3f} s after its restart (joined at step "
          f"{fig['rejoin_step']}): {fig['startup_s']:.3f} s starting the processes, "
          f"{fig['join_to_full_step_s']:.3f} s from the last join request to the first full-size step")
    if "undisturbed_eval_loss" in fig:
        print(f"final loss {loss:.4f} vs undisturbed {fig['undisturbed_eval_loss']:.4f} "
              f"({100 * fig['loss_vs_undisturbed']:+.2f}%)")
    print("checks: " + ("all passed" if not problems else "; ".join(problems)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"figures": fig, "problems": problems, "args": vars(args), "runs": report}, f, indent=1)
    sys.exit(1 if problems else 0)


def _rank_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank-main", action="store_true")
    ap.add_argument("--worker", type=int, required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--rejoin-step", type=int, required=True)
    ap.add_argument("--rejoin-wait", type=int, required=True)
    ap.add_argument("--codec", required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--timeout", type=float, required=True)
    ap.add_argument("--join", action="store_true")
    ap.add_argument("--check-grads", action="store_true")
    return ap.parse_args()


if __name__ == "__main__":
    if "--rank-main" in sys.argv:
        rank_main(_rank_args())
    elif len(sys.argv) == 3 and sys.argv[1] == "--serve-store":
        serve_store(int(sys.argv[2]))
    else:
        main()
