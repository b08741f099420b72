"""hetcomm.balance: batch sizes by measured speed, gradients weighted by samples."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from hetcomm.balance import split_batch

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from torch_ranks import free_port, run_ranks  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_split_batch_is_proportional_exact_and_deterministic() -> None:
    assert split_batch(12, [1, 1, 1]) == [4, 4, 4]
    assert split_batch(300, [2.0, 2.0, 1.0, 1.0]) == [100, 100, 50, 50]
    counts = split_batch(101, [3.0, 1.0, 1.0])
    assert sum(counts) == 101 and counts[0] > 2.9 * counts[1] and abs(counts[1] - counts[2]) <= 1
    # Ties in the remainder go to the lower rank, so every rank computes the same split.
    assert split_batch(5, [1.0, 1.0]) == [3, 2]
    # Every rank gets its minimum, however slow.
    assert split_batch(10, [1000.0, 1.0], minimum=2) == [8, 2]


@pytest.mark.parametrize("batch,speeds,minimum,match", [
    (3, [1, 1], 2, "cannot give 2 ranks 2 samples"),
    (10, [1.0, 0.0], 1, r"rank\(s\) \[1\]"),
    (10, [1.0, float("nan")], 1, r"rank\(s\) \[1\]"),
    (10, [], 1, "no ranks"),
])
def test_split_batch_refuses_bad_input(batch: int, speeds: list, minimum: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        split_batch(batch, speeds, minimum)


# ---- the update equals one uniform global batch ------------------------------------------------


def _model() -> "torch.nn.Module":
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def _data(steps: int, batch: int) -> list:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(batch, 16, generator=g), torch.randn(batch, 4, generator=g)) for _ in range(steps)]


def _uniform(steps: int, batch: int) -> list["torch.Tensor"]:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in _data(steps, batch):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach() for p in model.parameters()]


def _balanced(rank: int, ws: int, steps: int, batch: int, speeds: list[list[float]]) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from hetcomm.balance import Balancer

    dist.init_process_group("hetcomm")
    model = DDP(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    balancer = Balancer(batch, interval=2, warmup=0, smoothing=1.0)
    model.register_comm_hook(None, balancer.ddp_hook())
    splits = []
    for step, (x, y) in enumerate(_data(steps, batch)):
        lo, n = balancer.share()
        splits.append(list(balancer.counts))
        torch.nn.functional.mse_loss(model(x[lo:lo + n]), y[lo:lo + n]).backward()
        opt.step()
        opt.zero_grad()
        # Speeds are given (per phase of the run) rather than timed, so that
        # the split is known; the timing path has its own test below.
        per_sample = 1.0 / speeds[min(step * len(speeds) // steps, len(speeds) - 1)][rank]
        balancer.record(per_sample * n, n)
    # numpy, not tensors: tensors would travel through shared memory that dies with the rank.
    return {"splits": splits, "params": [p.detach().numpy().copy() for p in model.module.parameters()]}


@pytest.mark.timeout(300)
def test_balanced_ddp_matches_the_uniform_global_batch_and_follows_drift() -> None:
    steps, batch = 12, 60
    # Rank 0 is 3x faster than the others, then rank 2 becomes the fastest.
    speeds = [[3.0, 1.0, 1.0], [1.0, 1.0, 4.0]]
    results = run_ranks(_balanced, 3, steps, batch, speeds, timeout=240)
    splits = results[0]["splits"]
    assert all(r["splits"] == splits for r in results), "ranks disagree on the split"
    assert splits[0] == [20, 20, 20]
    assert splits[5] == [36, 12, 12]                    # measured after the first interval
    assert splits[-1] == [10, 10, 40]                   # re-measured after the drift
    for r in results:
        for p, q in zip(r["params"], _uniform(steps, batch)):
            torch.testing.assert_close(torch.from_numpy(p), q, rtol=1e-5, atol=1e-6)


# ---- real speeds: CPU quotas (cgroup v1) ------------------------------------------------------


def _timed(rank: int, ws: int, cgroup: list[str]) -> list[int]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from hetcomm.balance import Balancer

    with open(os.path.join(cgroup[rank], "cgroup.procs"), "w") as f:
        f.write(f"{os.getpid()}\n")
    torch.set_num_threads(1)
    dist.init_process_group("hetcomm")
    # Tens of ms of compute a step at full speed, so that the quotas (per 100 ms
    # period) throttle inside the timed part of a step, not only between steps.
    model = DDP(torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 8)))
    balancer = Balancer(1024, interval=4, warmup=1)
    model.register_comm_hook(None, balancer.ddp_hook())
    x, y = torch.randn(1024, 256), torch.randn(1024, 8)
    for _ in range(9):
        lo, n = balancer.share()
        with balancer.step():
            torch.nn.functional.mse_loss(model(x[lo:lo + n]), y[lo:lo + n]).backward()
        model.zero_grad()
    return balancer.counts


@pytest.mark.timeout(300)
def test_balancer_gives_the_throttled_rank_fewer_samples() -> None:
    from hetcomm.testbed.cpuquota import CpuQuota, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    quotas = [CpuQuota(f"hetcomm-test-balance-{os.getpid()}-r{r}", share) for r, share in enumerate((0.4, 0.1))]
    try:
        counts = run_ranks(_timed, 2, [str(q.path) for q in quotas], timeout=240)
        throttled = quotas[1].throttled_s()
    finally:
        for q in quotas:
            q.close()
    assert not any(q.path.exists() for q in quotas)
    assert counts[0] == counts[1], counts
    assert throttled > 0, "the slow rank's cgroup was never throttled"
    # A 4x quota difference: the fast rank must end with clearly more samples.
    assert counts[0][0] > 1.5 * counts[0][1], counts


# ---- the example ------------------------------------------------------------------------------------


# Large enough that the slow rank's repeated forwards (milliseconds) stand well above
# the scheduling noise of two ranks on two cores; with 64 samples they took tens of
# microseconds and about one run in six split the wrong way.
EXAMPLE_BATCH = 4096


@pytest.mark.timeout(300)
def test_example_mixed_speed_runs_and_matches_the_uniform_update() -> None:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                          os.path.join(ROOT, "examples", "mixed_speed.py"), "--steps", "12", "--interval", "3",
                          "--global-batch", str(EXAMPLE_BATCH), "--slow-ranks", "1", "--slow-factor", "4"],
                         env=env, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    done = re.search(r"done: (\d+) re-splits, final split \[(\d+), (\d+)\], parameter checksum (\S+)", out.stdout)
    assert done, out.stdout
    fast, slow = int(done.group(2)), int(done.group(3))
    assert fast + slow == EXAMPLE_BATCH and fast > slow, out.stdout
    # The same 12 global batches on one process, plain SGD: the same parameters.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = torch.Generator().manual_seed(1)
    for _ in range(12):
        x, y = torch.randn(EXAMPLE_BATCH, 64, generator=data), torch.randn(EXAMPLE_BATCH, 8, generator=data)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    checksum = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().sum().item()
    assert abs(float(done.group(4)) - checksum) < 1e-3, (done.group(4), checksum)
