"""pytest-benchmark suite for collectives: hetcomm beside gloo, 2 ranks on this host.

This process is rank 0; a spawned peer is rank 1 and runs the same ops on
command. For each (op, size) gloo runs first, then hetcomm, and hetcomm's
entry carries ``x_gloo`` (gloo's mean time / hetcomm's) in extra_info.

    python -m pytest bench/test_bench_collectives.py --benchmark-columns=mean,median,rounds

Sizes are total buffer bytes per rank (allgather: the output). busbw uses the
nccl-tests factors for 2 ranks.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
from datetime import timedelta

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

WORLD = 2
SIZES = [4, 64 << 10, 1 << 20, 16 << 20, 64 << 20]
OPS = ["allreduce", "broadcast", "allgather", "reduce_scatter", "alltoall"]
BUSBW = {"allreduce": 2 * (WORLD - 1) / WORLD, "broadcast": 1.0, "allgather": (WORLD - 1) / WORLD,
         "reduce_scatter": (WORLD - 1) / WORLD, "alltoall": (WORLD - 1) / WORLD}
_means: dict[tuple[str, int], float] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ops:
    """Builds one op of each backend on preallocated buffers (float32)."""

    def __init__(self, rank: int, comm) -> None:
        self.rank, self.comm = rank, comm

    def make(self, backend: str, op: str, nbytes: int):
        n = max(1, nbytes // 4)
        n -= n % WORLD or 0
        n = max(n, WORLD) if op in ("allgather", "reduce_scatter", "alltoall") else n
        if backend == "gloo":
            x = torch.ones(n)
            if op == "allreduce":
                return lambda: dist.all_reduce(x)
            if op == "broadcast":
                return lambda: dist.broadcast(x, 0)
            if op == "allgather":
                part = x[: n // WORLD]
                return lambda: dist.all_gather_into_tensor(x, part)
            if op == "reduce_scatter":
                out = torch.empty(n // WORLD)
                return lambda: dist.reduce_scatter_tensor(out, x)
            out = torch.empty(n)
            return lambda: dist.all_to_all_single(out, x)
        x = np.ones(n, np.float32)
        c = self.comm
        if op == "allreduce":
            return lambda: c.allreduce(x)
        if op == "broadcast":
            return lambda: c.broadcast(x, 0)
        if op == "allgather":
            part = x[: n // WORLD].copy()
            return lambda: c.allgather(part, out=x)
        if op == "reduce_scatter":
            out = np.empty(n // WORLD, np.float32)
            return lambda: c.reduce_scatter(x, out=out)
        out = np.empty(n, np.float32)
        return lambda: c.alltoall(x, out=out)


def _setup(rank: int, gloo_port: int, hc_port: int):
    import hetcomm

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(hc_port))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{gloo_port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    return Ops(rank, hetcomm.Communicator(rank, WORLD, timeout=120))


def _peer(gloo_port: int, hc_port: int, conn) -> None:
    ops = _setup(1, gloo_port, hc_port)
    while (msg := conn.recv()) is not None:
        backend, op, nbytes, times = msg
        fn = ops.make(backend, op, nbytes)
        for _ in range(times):
            fn()
        conn.send("done")
    ops.comm.close()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ops():
    gloo_port, hc_port = _free_port(), _free_port()
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    peer = ctx.Process(target=_peer, args=(gloo_port, hc_port, there), daemon=True)
    peer.start()
    o = _setup(0, gloo_port, hc_port)
    o.conn = here
    yield o
    here.send(None)
    peer.join(timeout=30)
    o.comm.close()
    dist.destroy_process_group()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("nbytes", SIZES, ids=lambda b: f"{b}B")
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", ["gloo", "hetcomm"])
def test_collective(benchmark, ops, backend, op, nbytes):
    rounds = 5 if nbytes >= 16 << 20 else 20
    warmup = 2
    ops.conn.send((backend, op, nbytes, rounds + warmup))
    fn = ops.make(backend, op, nbytes)
    benchmark.group = f"{op} {nbytes} B"
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=1)
    assert ops.conn.recv() == "done"
    mean = benchmark.stats.stats.mean
    benchmark.extra_info["busbw_GBps"] = round(BUSBW[op] * nbytes / mean / 1e9, 3)
    _means[(op, nbytes, backend)] = mean
    if backend == "hetcomm" and (op, nbytes, "gloo") in _means:
        benchmark.extra_info["x_gloo"] = round(_means[(op, nbytes, "gloo")] / mean, 2)
