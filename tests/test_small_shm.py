"""Small collectives through the shared-memory arena (csrc/algo/small.c).

Allreduce, allgather, reduce_scatter and barrier below ``small_bytes``
between ranks of one host skip the sockets. These tests check that they do
take that path (the core's debug log says so), that results equal numpy's
and are bit-identical across ranks for every dtype and reduction, in place
too, and that the safety of the socket path is kept: mismatched calls,
ranks on different paths, stray messages of an earlier mismatch, a dead
peer and an abort all end in a clear error on every rank, never a hang.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from harness import run_ranks, watch_log
from test_collectives import DTYPES, check_allreduce, check_reduce_scatter_allgather, digest, exact_input, ops_for, reference

PATH_NOTE = "shared-memory arena"
COUNTS = [0, 1, 7, 300]


def _watch_path():
    return watch_log(PATH_NOTE)


def _matrix(rank: int, size: int) -> tuple[dict, int, int]:
    import hetcomm

    notes = _watch_path()
    hashes: dict = {}
    calls = 0
    with hetcomm.Communicator(rank, size, timeout=60) as comm:
        for dtype in DTYPES:
            for op in ops_for(dtype):
                for count in COUNTS:
                    tag = (np.dtype(dtype).name, op, count)
                    inputs = [exact_input(r, count * size, dtype, op) for r in range(size)]
                    want = reference(inputs, op, dtype)
                    buf = check_allreduce(comm, inputs, want, op, tag)
                    # reduce_scatter of the whole, allgather of the first `count`
                    mine, gathered = check_reduce_scatter_allgather(comm, inputs, want, op, count, tag)
                    comm.barrier()
                    calls += 7
                    hashes[tag] = (digest(buf), digest(mine), digest(gathered))
    return hashes, calls, notes.count


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_small_collectives_every_dtype_and_op_match_numpy(world_size):
    results = run_ranks(_matrix, world_size, timeout=280)
    for rank, (hashes, calls, small) in enumerate(results):
        assert small == calls, f"rank {rank}: {small} of {calls} calls took the arena"
    # allreduce must be bit-identical on every rank (reduce_scatter and
    # allgather results differ per rank by design and are checked above)
    assert all({k: v[0] for k, v in r[0].items()} == {k: v[0] for k, v in results[0][0].items()}
               for r in results)


def _nan_floats(rank: int, size: int) -> list[str]:
    import hetcomm

    out = []
    with hetcomm.Communicator(rank, size, timeout=60) as comm:
        for dtype in (np.float16, np.float32, np.float64):
            x = np.random.default_rng(rank).uniform(-1, 1, 257).astype(dtype)
            x[rank::7] = [np.nan, np.inf, -np.inf][rank % 3]
            for op in ("sum", "avg", "prod", "min", "max"):
                buf = x.copy()
                comm.allreduce(buf, op)
                out.append(digest(buf))
    return out


@pytest.mark.timeout(120)
def test_random_floats_with_nan_and_inf_end_bit_identical():
    results = run_ranks(_nan_floats, 3, timeout=100)
    assert all(r == results[0] for r in results)


def _bigger_than_small_bytes(rank: int, size: int) -> tuple[int, bool]:
    import hetcomm

    notes = _watch_path()
    with hetcomm.Communicator(rank, size, timeout=60) as comm:
        buf = np.full(16 * 1024 + 1, rank + 1, np.float32)  # 64 KiB + 4 B: the socket algorithms
        comm.allreduce(buf)
        ok = bool(np.all(buf == size * (size + 1) / 2))
    return notes.count, ok


@pytest.mark.timeout(60)
def test_above_small_bytes_the_socket_algorithms_run():
    assert run_ranks(_bigger_than_small_bytes, 2, timeout=50) == [(0, True), (0, True)]


def _between_socket_ops(rank: int, size: int, rounds: int) -> tuple[int, int]:
    """Small collectives with socket-path collectives between them that let
    some ranks finish early (a broadcast root, a gather's senders): a rank
    that runs ahead must not refill an arena region another rank still reads."""
    import hetcomm

    notes = _watch_path()
    wrong = 0
    with hetcomm.Communicator(rank, size, timeout=60) as comm:
        for i in range(rounds):
            root = i % size
            b = np.full(3, rank * 1000 + i, np.int64)
            comm.broadcast(b, root=root)
            wrong += int(not (b == root * 1000 + i).all())
            g = comm.allgather(np.full(5, rank + i, np.int32))
            wrong += int(not (g == (np.arange(size) + i)[:, None]).all())
            comm.gather(np.full(2, rank, np.float32), root=root)
            x = np.full(7, float(rank + i), np.float64)
            comm.allreduce(x)
            wrong += int(not (x == sum(range(size)) + size * i).all())
            rs = comm.reduce_scatter(np.arange(size * 4, dtype=np.int64) + i)
            wrong += int(not (rs == size * (np.arange(rank * 4, rank * 4 + 4) + i)).all())
    return wrong, notes.count


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [2, 4])
def test_small_collectives_between_socket_collectives_that_end_early(world_size):
    rounds = 150
    for rank, (wrong, small) in enumerate(run_ranks(_between_socket_ops, world_size, rounds, timeout=100)):
        assert wrong == 0, f"rank {rank}: {wrong} wrong results"
        assert small == 3 * rounds, f"rank {rank}: {small} of {3 * rounds} small calls took the arena"


def _beside_busy_processes(rank: int, size: int, calls: int) -> tuple[int, str, int]:
    import hetcomm

    notes = watch_log("a yield kept the core")
    rng = np.random.default_rng(7)  # the same inputs on every rank
    inputs = rng.standard_normal((calls, size, 5)).astype(np.float32)
    wrong, h = 0, hashlib.sha256()
    with hetcomm.Communicator(rank, size, timeout=60) as comm:
        for i in range(calls):
            got = comm.allreduce(inputs[i, rank].copy())
            # The arena folds in rank order 0..n-1, as this does.
            want = inputs[i, 0].copy()
            for r in range(1, size):
                want += inputs[i, r]
            wrong += int(got.tobytes() != want.tobytes())
            wrong += int(not np.array_equal(comm.allgather(inputs[i, rank]).reshape(size, 5), inputs[i]))
            h.update(got.tobytes())
    return wrong, h.hexdigest(), notes.count


@pytest.mark.timeout(180)
def test_small_collectives_beside_busy_processes_stay_exact_and_stop_yielding():
    """With more ranks than cores a waiting rank yields its core; beside
    processes that never sleep a yield hands them a whole time slice, and the
    core turns yielding off for a while (its debug log says so). Results stay
    exact and bit-identical either way."""
    cores = os.cpu_count() or 1
    if cores > 7:
        pytest.skip(f"needs more ranks than cores; this host has {cores} cores")
    size = max(4, cores + 1)  # more ranks than cores: the yielding wait
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        results = run_ranks(_beside_busy_processes, size, 150, timeout=160)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    for rank, (wrong, _, _) in enumerate(results):
        assert wrong == 0, f"rank {rank}: {wrong} results differ from numpy's"
    assert len({h for _, h, _ in results}) == 1, "allreduce results differ across ranks"
    assert sum(b for _, _, b in results) > 0, "no rank stopped yielding beside busy processes"


def _mismatched(rank: int, size: int, case: str) -> str:
    import hetcomm

    opts = hetcomm.Options(small_bytes=1024 if (case == "paths" and rank == 0) else None)
    comm = None
    try:
        comm = hetcomm.Communicator(rank, size, timeout=20, options=opts)
        if case == "count":
            comm.allreduce(np.ones(100 + (rank == 1), np.float32))
        elif case == "kind":
            if rank == 0:
                comm.allgather(np.ones(100, np.float32))
            else:
                comm.allreduce(np.ones(100, np.float32))
        elif case == "paths":  # rank 0's threshold sends 4 KiB over the sockets, the others' not
            comm.allreduce(np.ones(1024, np.float32))
        elif case == "stray":  # broadcast roots disagree: only stray socket messages show it
            comm.broadcast(np.ones(10, np.float32), root=rank % 2)
        comm.barrier()
    except hetcomm.HetcommError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        if comm:
            comm.close()
    return "no error"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("case", ["count", "kind", "paths", "stray"])
def test_mismatched_small_calls_fail_on_every_rank(case):
    t0 = time.monotonic()
    results = run_ranks(_mismatched, 3, case, timeout=60)
    assert time.monotonic() - t0 < 18  # before the 20 s timeout would fire
    for rank, text in enumerate(results):
        assert text.split(":")[0] in ("MismatchError", "ProtocolError", "AbortedError"), f"rank {rank}: {text}"
        assert ("differs across ranks" in text or "different numbers of collectives" in text
                or "differ across ranks" in text), text


def _error_of(rank: int, size: int, body, timeout: float) -> str:
    """"SECONDSs ErrorClass: message" of what ``body(comm, rank)`` raised, or "no error"."""
    import hetcomm

    comm = hetcomm.Communicator(rank, size, timeout=timeout)
    t0 = time.monotonic()
    try:
        body(comm, rank)
    except hetcomm.HetcommError as exc:
        return f"{time.monotonic() - t0:.1f}s {type(exc).__name__}: {exc}"
    finally:
        comm.close()
    return "no error"


def _die_in_a_loop(comm, rank: int) -> None:
    comm.barrier()
    if rank == 2:
        os._exit(3)
    for _ in range(1000):
        comm.allreduce(np.ones(4, np.float32))


def _dies(rank: int, size: int) -> str:
    return _error_of(rank, size, _die_in_a_loop, 60)


@pytest.mark.timeout(60)
def test_dead_peer_in_a_small_collective_is_reported_naming_it():
    results = run_ranks(_dies, 3, timeout=50, allow_failures=True)
    assert "exited with code 3" in results[2]
    for text in results[:2]:
        assert "rank 2" in text, text
        assert "PeerLostError" in text or "AbortedError" in text, text
        assert float(text.split("s ")[0]) < 10, text


def _abort_while_waiting(comm, rank: int) -> None:
    if rank == 0:  # rank 1 is asleep: rank 0 sleeps in its arena wait until the abort
        threading.Timer(0.5, comm.abort, args=("user pressed stop",)).start()
        comm.allreduce(np.ones(10, np.float32))
    else:
        time.sleep(2)
        comm.allreduce(np.ones(10, np.float32))
        comm.barrier()


def _aborted(rank: int, size: int) -> str:
    return _error_of(rank, size, _abort_while_waiting, 30)


@pytest.mark.timeout(60)
def test_abort_wakes_a_small_collective_here_and_on_peers():
    results = run_ranks(_aborted, 2, timeout=40)
    assert all("AbortedError" in r and "user pressed stop" in r for r in results), results
    assert float(results[0].split("s ")[0]) < 2, results[0]


def _late_peer(comm, rank: int) -> None:
    """Rank 2 comes to a small allreduce after the others gave up waiting for
    it: its call fails too, instead of folding slots the others let go of."""
    comm.allreduce(np.ones(10, np.float32))
    if rank == 2:
        time.sleep(4)
    comm.allreduce(np.ones(10, np.float32))


@pytest.mark.timeout(60)
def test_late_peer_in_a_small_collective_fails_there_too():
    results = run_ranks(_error_of, 3, _late_peer, 2, timeout=50)
    for rank, text in enumerate(results):
        assert "timed out" in text and "waiting for rank 2 (host" in text, (rank, text)


def _torch_small(rank: int, size: int) -> list:
    import torch
    import torch.distributed as dist

    dist.init_process_group("hetcomm", rank=rank, world_size=size)
    t = torch.arange(5, dtype=torch.float32) + rank
    dist.all_reduce(t)
    out = [t.tolist()]
    # Async ops nobody calls wait() on still complete (the worker takes them
    # after leaving them a moment to a waiting caller).
    u = torch.full((3,), float(rank + 1))
    fut = dist.all_reduce(u, async_op=True).get_future()
    out.append(fut.wait()[0].tolist())
    v = torch.full((2,), float(rank))
    w = dist.all_reduce(v, async_op=True)
    while not w.is_completed():
        time.sleep(0.001)
    out.append(v.tolist())
    g = [torch.empty(2) for _ in range(size)]
    dist.all_gather(g, torch.full((2,), float(rank)))
    out.append([x.tolist() for x in g])
    r = torch.empty(2)
    dist.reduce_scatter(r, [torch.full((2,), float(rank + k)) for k in range(size)])
    out.append(r.tolist())
    dist.barrier()
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world_size", [2, 4])
def test_torch_small_collectives_sync_and_async(world_size):
    pytest.importorskip("torch")
    import torch_ranks

    n = world_size
    results = torch_ranks.run_ranks(_torch_small, n, timeout=200)
    base = sum(range(n))
    for rank, out in enumerate(results):
        assert out[0] == [5.0 * 0 + base + n * i for i in range(5)]
        assert out[1] == [n * (n + 1) / 2] * 3
        assert out[2] == [float(base)] * 2
        assert out[3] == [[float(k)] * 2 for k in range(n)]
        assert out[4] == [float(base + n * rank)] * 2


def _abort_a_blocking_torch_call(rank: int, size: int, numel: int) -> float | None:
    """A synchronous torch collective runs on the calling thread; aborting the
    group from another thread must still end it at once."""
    import threading

    import torch
    import torch.distributed as dist

    from datetime import timedelta

    dist.init_process_group("hetcomm", rank=rank, world_size=size)
    dist.barrier()
    store = dist.distributed_c10d._get_default_store()
    if rank == 1:  # never joins the collective; stays up until rank 0 is done
        store.wait(["aborted"], timedelta(seconds=60))
        return None
    threading.Timer(0.5, dist.group.WORLD.abort).start()
    t0 = time.monotonic()
    with pytest.raises(Exception, match="abort"):
        dist.all_reduce(torch.ones(numel))
    elapsed = time.monotonic() - t0
    store.set("aborted", "1")
    return elapsed


@pytest.mark.timeout(120)
@pytest.mark.parametrize("numel", [4, 1 << 20], ids=["small", "large"])
def test_aborting_the_group_ends_a_blocking_torch_collective(numel):
    pytest.importorskip("torch")
    import torch_ranks

    elapsed = torch_ranks.run_ranks(_abort_a_blocking_torch_call, 2, numel, timeout=100)[0]
    assert elapsed < 10.0, f"the aborted all_reduce returned only after {elapsed:.1f} s"
