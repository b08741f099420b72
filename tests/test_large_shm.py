"""Large collectives between ranks of one host, read straight from the peers'
buffers with process_vm_readv (csrc/algo/single_copy.c).

Allreduce, allgather, reduce_scatter and broadcast larger than the arena's
64 KiB take that path when every rank shares the host. These tests check that they do
(the core's debug log says so), that results equal numpy's and are
bit-identical across ranks, in place too, on both sides of the threshold,
that the lanes (HETCOMM_CMA=0, or a kernel that refuses the reads) give the
same results, and that a rank dying mid-collective is a PeerLostError on the
survivors, never a hang.
"""
from __future__ import annotations

import ctypes
import os
import threading
import time

import numpy as np
import pytest

from harness import run_ranks, watch_log
from test_collectives import check_allreduce, check_reduce_scatter_allgather, digest, exact_input, reference
from test_small_shm import _error_of

PATH_NOTE = "single copy from the peers' buffers"
MIN_BYTES = 64 << 10  # the path takes what the arena does not: above HETCOMM_SMALL_BYTES (default 64 KiB)
BLOCKS_BYTES = 1 << 20  # several of the allreduce's 128 KiB fold blocks a rank
DTYPES = [np.float32, np.float64, np.float16, np.int8, np.int64, np.bool_]


def _watch_path():
    return watch_log(PATH_NOTE)


def _ops(dtype) -> list[str]:
    if dtype == np.bool_:
        return ["max"]
    return ["sum", "max", "avg"] if dtype == np.float32 else ["sum", "max"]


def _counts(dtype) -> list[int]:
    """Above the threshold, and above several fold blocks a rank, by an odd
    count that no rank count divides; for float32 also just below the
    threshold (the arena)."""
    es = np.dtype(dtype).itemsize
    above = [MIN_BYTES // es + 7, BLOCKS_BYTES // es + 7]
    return [MIN_BYTES // es - 1] + above if dtype == np.float32 else above


def _matrix(rank: int, size: int) -> tuple[dict, int, int]:
    """Every collective of the path against numpy; returns digests, the calls
    that should have taken the path and those that did."""
    import hetcomm

    notes = _watch_path()
    hashes: dict = {}
    expected = 0
    with hetcomm.Communicator(rank, size, timeout=60) as comm:
        for dtype in DTYPES:
            es = np.dtype(dtype).itemsize
            for count in _counts(dtype):
                big = count * es > MIN_BYTES
                for op in _ops(dtype):
                    tag = (np.dtype(dtype).name, op, count)
                    inputs = [exact_input(r, count, dtype, op) for r in range(size)]
                    want = reference(inputs, op, dtype)
                    buf = check_allreduce(comm, inputs, want, op, tag)
                    expected += 2 * big
                    hashes[tag] = digest(buf)
                # reduce_scatter and allgather: `block` elements a rank, the
                # whole buffer on both sides of the threshold too
                block = count // size + 1
                whole = block * size * es > MIN_BYTES
                inputs = [exact_input(r, block * size, dtype, "sum") for r in range(size)]
                want = reference(inputs, "sum", dtype)
                mine, gathered = check_reduce_scatter_allgather(comm, inputs, want, "sum", block, (dtype, block))
                expected += 4 * whole
                root = size - 1
                b = inputs[rank].copy() if rank == root else np.zeros(block * size, dtype)
                comm.broadcast(b, root=root)
                np.testing.assert_array_equal(b, inputs[root], err_msg=f"broadcast {dtype} {block * size}")
                expected += whole
                hashes[(np.dtype(dtype).name, "gathers", count)] = (digest(mine), digest(gathered), digest(b))
    return hashes, expected, notes.count


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world_size", [2, 3, pytest.param(4, marks=pytest.mark.slow)])
def test_large_collectives_match_numpy_and_read_peers_directly(world_size):
    results = run_ranks(_matrix, world_size, timeout=160)
    for rank, (_, expected, took) in enumerate(results):
        assert expected > 0 and took == expected, f"rank {rank}: {took} of {expected} calls read the peers directly"
    allreduced = [{k: v for k, v in r[0].items() if k[1] != "gathers"} for r in results]
    assert all(a == allreduced[0] for a in allreduced)


@pytest.mark.timeout(180)
def test_lanes_forced_on_give_the_same_results():
    """The same matrix, every result checked against numpy (exactly: the
    inputs are small integers), with the path turned off."""
    lanes = run_ranks(_matrix, 3, timeout=160, env={"HETCOMM_CMA": "0"})
    for rank in range(3):
        assert lanes[rank][2] == 0, f"rank {rank} read peers directly with HETCOMM_CMA=0"


def _random_floats(rank: int, size: int) -> list[str]:
    import hetcomm

    out = []
    with hetcomm.Communicator(rank, size, timeout=60) as comm:
        for dtype in (np.float32, np.float16, np.float64):
            x = np.random.default_rng(rank).standard_normal(MIN_BYTES // 2 + 13).astype(dtype)
            x[rank::997] = [np.nan, np.inf, -np.inf, 0.0][rank % 4]
            for op in ("sum", "avg", "max"):
                buf = x.copy()
                comm.allreduce(buf, op)
                out.append(digest(buf))
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [3, pytest.param(4, marks=pytest.mark.slow)])
def test_random_floats_end_bit_identical(world_size):
    results = run_ranks(_random_floats, world_size, timeout=100)
    assert all(r == results[0] for r in results)


def _drop_ptrace_capability() -> None:
    """Leaves this thread (and the threads it starts) without CAP_SYS_PTRACE,
    so that reading a non-dumpable process is refused as for any non-root user."""

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()
    assert libc.capget(ctypes.byref(header), data) == 0
    data[0].effective &= ~(1 << 19)  # CAP_SYS_PTRACE
    assert libc.capset(ctypes.byref(header), data) == 0, os.strerror(ctypes.get_errno())


def _refused(rank: int, size: int) -> tuple[int, list[str], bool]:
    """Rank 1 forbids reads of its memory: every rank must take the lanes."""
    import hetcomm

    _drop_ptrace_capability()
    if rank == 1:
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
    notes = _watch_path()
    warned = watch_log("cannot read").messages
    ok = True
    with hetcomm.Communicator(rank, size, timeout=60) as comm:
        for _ in range(2):
            buf = np.full(MIN_BYTES // 4 + 5, rank + 1, np.float32)
            comm.allreduce(buf)
            ok &= bool(np.all(buf == size * (size + 1) / 2))
            g = comm.allgather(np.full(MIN_BYTES // 4, rank, np.int32))
            ok &= all(bool(np.all(g[r] == r)) for r in range(size))
    return notes.count, warned, ok


@pytest.mark.timeout(60)
def test_refused_reads_fall_back_to_the_lanes_with_one_warning():
    results = run_ranks(_refused, 3, timeout=50)
    for rank, (took, warned, ok) in enumerate(results):
        assert ok and took == 0, (rank, took, ok)
        # the ranks that cannot read rank 1 say so once; rank 1 reads the others fine
        assert len(warned) == (0 if rank == 1 else 1), (rank, warned)
    assert "rank 1's memory" in results[0][1][0]


def _die_mid_allreduce(rank: int, size: int) -> tuple[str, bool, int]:
    """Rank 2 dies in the middle of a large allreduce; the survivors shrink
    and run large collectives on the same path again."""
    import hetcomm

    notes = _watch_path()
    comm = hetcomm.Communicator(rank, size, timeout=60)
    buf = np.ones(16 << 18, np.float32)  # 16 MiB
    comm.allreduce(buf)
    comm.barrier()
    if rank == 2:  # dies in the middle of one of the next allreduces
        threading.Timer(0.05, os._exit, args=(3,)).start()
    error = "no error"
    try:
        for _ in range(200):
            comm.allreduce(buf)
    except hetcomm.HetcommError as exc:
        error = f"{type(exc).__name__}: {exc}"
    new = comm.shrink(comm.failed_ranks(timeout=10))
    before = notes.count
    x = np.full(MIN_BYTES // 4 + 1, new.rank + 1, np.float32)
    new.allreduce(x)
    g = new.allgather(np.full(MIN_BYTES // 4, new.rank, np.int32))
    ok = bool(np.all(x == 3)) and all(bool(np.all(g[r] == r)) for r in range(new.size))
    new.close()
    comm.close()
    return error, ok, notes.count - before


@pytest.mark.timeout(60)
def test_rank_killed_mid_large_allreduce_is_peer_lost_on_survivors():
    results = run_ranks(_die_mid_allreduce, 3, timeout=50, allow_failures=True)
    assert "exited with code 3" in results[2]
    for error, ok, took in results[:2]:
        assert error.startswith("PeerLostError") and "rank 2" in error, error
        assert ok and took == 2, (ok, took)


def _torch_large(rank: int, size: int) -> list:
    import torch
    import torch.distributed as dist

    notes = _watch_path()
    dist.init_process_group("hetcomm", rank=rank, world_size=size)
    n = MIN_BYTES // 4 + 3
    t = torch.arange(n, dtype=torch.float32) + rank
    dist.all_reduce(t)
    ok = bool(torch.equal(t, torch.arange(n, dtype=torch.float32) * size + sum(range(size))))
    b = torch.full((2 * n,), float(rank + 1), dtype=torch.bfloat16)
    dist.all_reduce(b, op=dist.ReduceOp.MAX)
    ok &= bool(torch.all(b == size))
    g = [torch.empty(n) for _ in range(size)]
    dist.all_gather(g, torch.full((n,), float(rank)))
    ok &= all(bool(torch.all(x == k)) for k, x in enumerate(g))
    flat = torch.empty(n * size)
    dist.all_gather_into_tensor(flat, torch.full((n,), float(rank)))
    ok &= bool(torch.equal(flat, torch.arange(size, dtype=torch.float32).repeat_interleave(n)))
    dist.barrier()
    took = notes.count
    dist.destroy_process_group()
    return ok, took


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world_size", [2, 4])
def test_torch_large_allreduce_and_allgather(world_size):
    pytest.importorskip("torch")
    import torch_ranks

    results = torch_ranks.run_ranks(_torch_large, world_size, timeout=200)
    assert all(r == (True, 4) for r in results), results


def _mismatched(rank: int, size: int, case: str, warm: bool) -> str:
    """The mismatch on the communicator's first large op (which also agrees
    on the path) or, with `warm`, after a good one."""
    import hetcomm

    options = hetcomm.Options(cma=not (case == "paths" and rank == 0))
    if warm and case == "paths" and rank == 0:  # 128 KiB: rings on rank 0, the single copy on the others
        options = hetcomm.Options(small_bytes=4 << 20)
    try:  # the others may fail the first op, and the communicator, while this rank still connects
        comm = hetcomm.Communicator(rank, size, timeout=20, options=options)
    except hetcomm.HetcommError as exc:
        return f"{type(exc).__name__}: {exc}"
    try:
        if warm:
            comm.allreduce(np.ones(2 * MIN_BYTES, np.float32))
            if case == "paths":
                comm.allreduce(np.ones(MIN_BYTES // 2, np.float32))
        if case == "count":
            comm.allreduce(np.ones(MIN_BYTES + (rank == 1), np.float32))
        elif case == "kind":
            if rank == 0:
                comm.allgather(np.ones(MIN_BYTES // size, np.float32))
            else:
                comm.allreduce(np.ones(MIN_BYTES, np.float32))
        else:  # rank 0 has the path off: it runs the rings
            comm.allreduce(np.ones(MIN_BYTES, np.float32))
        comm.barrier()
    except hetcomm.HetcommError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        comm.close()
    return "no error"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("warm", [False, True], ids=["first-op", "after-one"])
@pytest.mark.parametrize("case", ["count", "kind", "paths"])
def test_mismatched_large_calls_fail_on_every_rank(case, warm):
    results = run_ranks(_mismatched, 3, case, warm, timeout=50)
    for rank, text in enumerate(results):
        assert text.split(":")[0] in ("MismatchError", "AbortedError"), f"rank {rank}: {text}"
    assert any(text.startswith("MismatchError") for text in results), results
    if case == "paths":
        assert any("HETCOMM_CMA" in text for text in results), results


def _abort_mid_large(comm, rank: int) -> None:
    """Rank 0 waits in a large allreduce for a rank that comes late, and aborts."""
    buf = np.ones(2 * MIN_BYTES, np.float32)
    comm.allreduce(buf)
    comm.barrier()
    if rank == 0:
        threading.Timer(0.5, comm.abort, args=("user pressed stop",)).start()
    else:
        time.sleep(2)
    comm.allreduce(buf)
    comm.barrier()


@pytest.mark.timeout(60)
def test_abort_wakes_a_large_collective_here_and_on_peers():
    results = run_ranks(_error_of, 3, _abort_mid_large, 30, timeout=50)
    assert all("AbortedError" in text and "user pressed stop" in text for text in results), results
    assert float(results[0].split("s ")[0]) < 2, results[0]


def _late_peer(comm, rank: int) -> None:
    """Rank 2 joins the second large allreduce after the others' timeout: they
    time out naming it, and rank 2 learns of it when it calls."""
    buf = np.ones(2 * MIN_BYTES, np.float32)
    comm.allreduce(buf)
    if rank == 2:
        time.sleep(4)
    comm.allreduce(buf)


@pytest.mark.timeout(60)
def test_silent_peer_in_a_large_collective_times_out_naming_it():
    results = run_ranks(_error_of, 3, _late_peer, 2, timeout=50)
    for rank, text in enumerate(results):
        took, error = text.split("s ", 1)
        # rank 2 reads the others' slots of the op, but learns they gave up before reading their buffers
        assert error.split(":")[0] in ("CommTimeoutError", "AbortedError"), (rank, text)
        assert "timed out" in error and "waiting for rank 2 (host" in error, (rank, text)
        assert rank == 2 or float(took) < 4, (rank, text)


MADV_COLLAPSE = 25


def _collapse_refused() -> str | None:
    """Why this kernel cannot collapse pages into huge ones, or None."""
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    with mmap.mmap(-1, 4 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as area:
        area[:] = b"\1" * len(area)
        view = ctypes.c_char.from_buffer(area)
        aligned = (ctypes.addressof(view) + (2 << 20) - 1) & ~((2 << 20) - 1)
        failed = libc.madvise(ctypes.c_void_p(aligned), ctypes.c_size_t(2 << 20), MADV_COLLAPSE)
        errno = ctypes.get_errno()
        del view  # the mapping cannot close while ctypes holds it
    return f"madvise(MADV_COLLAPSE): {os.strerror(errno)}" if failed else None


def _anon_huge_kb(address: int) -> int:
    """AnonHugePages of this process's mapping that holds ``address``."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def _reused_buffer(rank: int, size: int, hugepages: bool) -> tuple[int, int, int]:
    """Three in-place allreduces of one 16 MiB buffer; returns the huge KiB
    under it before and after them (before: none where THP is "madvise" or
    "never", maybe some under "always") and the elements that differ from
    the reference."""
    import mmap

    import hetcomm

    count = 4 << 20
    area = mmap.mmap(-1, count * 4, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    x = np.frombuffer(area, np.float32)
    base = (np.arange(count) % 1024).astype(np.float32)
    expected = base * size + sum(range(size))
    wrong = 0
    x[:] = base
    before = _anon_huge_kb(x.ctypes.data)
    with hetcomm.Communicator(rank, size, timeout=60, options=hetcomm.Options(hugepages=hugepages)) as comm:
        for _ in range(3):
            x[:] = base + rank
            comm.allreduce(x)
            wrong += int(np.count_nonzero(x != expected))
        huge = _anon_huge_kb(x.ctypes.data)
    del x
    area.close()
    return before, huge, wrong


@pytest.mark.timeout(120)
def test_reused_buffers_get_huge_pages_and_stay_exact():
    why = _collapse_refused()
    if why:
        pytest.skip(f"this kernel cannot collapse pages into huge ones ({why})")
    results = run_ranks(_reused_buffer, 2, True, timeout=90)
    # The first call marks the buffer, the second collapses at least the
    # 14 MiB of it that 2 MiB pages can cover wherever it starts.
    for rank, (_, huge, wrong) in enumerate(results):
        assert wrong == 0, f"rank {rank}: {wrong} elements differ from numpy's sum"
        assert huge >= 14 << 10, f"rank {rank}: only {huge} KiB of the buffer in huge pages"
    off = run_ranks(_reused_buffer, 2, False, timeout=90)
    for rank, (before, huge, wrong) in enumerate(off):
        assert wrong == 0 and huge == before, f"rank {rank}, hugepages off: {before} -> {huge} KiB huge, {wrong} wrong"
