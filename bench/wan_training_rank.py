"""One rank of bench/wan_training.py: trains the bench's MLP and writes its timings.

Run by wan_training.py inside a site's namespace with torch's env://
variables set; not meant to be started by hand.
"""
from __future__ import annotations

import datetime
import json
import os
import time

import torch
import torch.distributed as dist

IN_FEATURES, CLASSES, DEPTH = 256, 10, 3  # DEPTH hidden layers of the same width
EVAL_SAMPLES = 2048


def hidden_for(params: int) -> int:
    """Hidden width whose MLP (IN -> H x DEPTH -> CLASSES, with biases) has about `params` parameters."""
    # (DEPTH-1) H^2 + (IN + CLASSES + DEPTH) H + CLASSES = params
    a, b, c = DEPTH - 1, IN_FEATURES + CLASSES + DEPTH, CLASSES - params
    return max(8, int((-b + (b * b - 4 * a * c) ** 0.5) / (2 * a)))


def make_model(params: int) -> torch.nn.Module:
    width = hidden_for(params)
    layers: list[torch.nn.Module] = [torch.nn.Linear(IN_FEATURES, width), torch.nn.ReLU()]
    for _ in range(DEPTH - 1):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    layers.append(torch.nn.Linear(width, CLASSES))
    return torch.nn.Sequential(*layers)


class Task:
    """Labels from a fixed random teacher network; each rank draws its own batches."""

    def __init__(self, rank: int):
        g = torch.Generator().manual_seed(4321)
        self.teacher = torch.nn.Sequential(torch.nn.Linear(IN_FEATURES, 64), torch.nn.Tanh(),
                                           torch.nn.Linear(64, CLASSES))
        for p in self.teacher.parameters():
            torch.nn.init.normal_(p, std=0.3, generator=g)
        self.eval_x, self.eval_y = self._labelled(torch.randn(EVAL_SAMPLES, IN_FEATURES, generator=g))
        self.gen = torch.Generator().manual_seed(1000 + rank)

    def _labelled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return x, self.teacher(x).argmax(dim=1)

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._labelled(torch.randn(size, IN_FEATURES, generator=self.gen))

    def eval_loss(self, model: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(self.eval_x), self.eval_y))


def _compute_floor(model: torch.nn.Module, task: Task, batch: int, lr: float, steps: int = 4) -> float:
    """Seconds of forward+backward+SGD of one step with no communication at all
    (on a copy, while the other ranks do the same: the CPU share is the real one)."""
    import copy

    local = copy.deepcopy(model)
    opt = torch.optim.SGD(local.parameters(), lr=lr, momentum=0.9)
    times = []
    for _ in range(steps):
        x, y = task.batch(batch)
        t0 = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(local(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def _wan_bytes() -> int | None:
    """Bytes both ways on this site's WAN link so far (its veth counters); with two
    sites that is everything that crossed between them."""
    stats = f"/sys/class/net/{os.environ.get('GLOO_SOCKET_IFNAME', 'wan0')}/statistics"
    try:
        return sum(int(open(f"{stats}/{k}_bytes").read()) for k in ("tx", "rx"))
    except OSError:
        return None


def train(cfg: dict) -> dict:
    """One rank of one run; returns per-step times and losses."""
    rank = int(os.environ["RANK"])
    import hetcomm

    if cfg["mode"] == "fsdp" and cfg["backend"] == "hetcomm":
        # FSDP2 calls reduce_scatter itself: the group's default codec compresses it.
        os.environ["HETCOMM_CODEC"] = cfg["codec"]
    dist.init_process_group(cfg["backend"], timeout=datetime.timedelta(seconds=600))
    torch.manual_seed(0)
    torch.set_num_threads(1)
    task = Task(rank)
    model = make_model(cfg["params"])
    cfg["params_exact"] = sum(p.numel() for p in model.parameters())
    batch, lr = cfg["batch"], cfg["lr"]
    compute_s = _compute_floor(model, task, batch, lr)
    dist.barrier()
    diloco = None
    if cfg["mode"] == "ddp":
        net = torch.nn.parallel.DistributedDataParallel(model)  # default arguments
        if cfg["backend"] == "hetcomm" and cfg["codec"] != "none":
            net.register_comm_hook(None, hetcomm.ddp_hook(cfg["codec"]))
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    elif cfg["mode"] == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        settings = {"reshard_after_forward": cfg["fsdp_reshard"]}
        if cfg["fsdp_param_dtype"] == "bf16":
            settings["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, **settings)
        net = fully_shard(model, **settings)
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    else:
        from hetcomm.diloco import DiLoCo, site_group

        site = site_group(int(os.environ["LOCAL_WORLD_SIZE"]), cfg["inner_backend"])
        net = torch.nn.parallel.DistributedDataParallel(model, process_group=site)
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
        diloco = DiLoCo(model, opt, inner_steps=cfg["inner_steps"], codec=cfg["codec"],
                        fragments=cfg["fragments"], overlap_steps=int(cfg["fragments"] > 1),
                        outer_lr=cfg["outer_lr"])
    dist.barrier()
    times, losses, phases, elapsed = [], [], [], []
    wan_start = _wan_bytes()
    start = time.perf_counter()
    for _ in range(cfg["steps"]):
        x, y = task.batch(batch)
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        t1 = time.perf_counter()
        loss.backward()  # DDP's bucket allreduces (FSDP's reduce-scatters) run and are waited for here
        t2 = time.perf_counter()
        if diloco is not None:
            diloco.step()
        else:
            opt.step()
        t3 = time.perf_counter()
        times.append(t3 - t0)
        phases.append((t1 - t0, t2 - t1, t3 - t2))
        losses.append(loss.item())
        elapsed.append(t3 - start)
    if diloco is not None:
        diloco.finish()  # the last outer step: every rank ends on the averaged parameters
    dist.barrier()
    wan_end = _wan_bytes()
    out = {"wan_bytes_train": None if wan_start is None else wan_end - wan_start, "total_s": time.perf_counter() - start,"times": times, "phases": phases, "losses": losses, "elapsed": elapsed, "compute_s": compute_s,
           "eval_loss": task.eval_loss(model), "params": cfg["params_exact"]}
    dist.destroy_process_group()
    return out


if __name__ == "__main__":
    import sys

    config = json.loads(sys.argv[1])
    result = train(config)
    with open(config["out"], "w") as f:
        json.dump(result, f)
