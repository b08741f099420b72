"""Membership: a lost rank is found fast (closed links) or by heartbeat
(silence), the survivors agree on who failed, shrink over the live links and
go on; a newcomer joins a running group through grow/join."""
from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest

from harness import RankError, run_ranks
from test_compressed import bound, digest, inputs


def _store(rank: int):
    from hetcomm.store import shared_store

    return shared_store(rank)


def _die_after_the_others_passed(store, rank: int, size: int, how: str = "exit") -> None:
    """Exits abruptly once every other rank got past the last collective: its
    last messages may sit in this process's queues until then."""
    store.wait([f"passed/{r}" for r in range(size) if r != rank])
    store.set("victim/died_at", repr(time.time()))
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(3)


def _check_collectives(comm, tag: int, codec: str | None = "int8") -> tuple:
    """Every collective on `comm`, checked against numpy; returns digests to compare across ranks."""
    rank, size = comm.rank, comm.size
    rng = np.random.default_rng(tag)
    xs = [rng.standard_normal(10_007).astype(np.float32) for _ in range(size)]
    out = []
    buf = xs[rank].copy()
    comm.allreduce(buf)
    np.testing.assert_allclose(buf, np.sum(xs, axis=0, dtype=np.float64), rtol=1e-5, atol=1e-5)
    out.append(digest(buf))
    ints = np.arange(1001, dtype=np.int64) * (rank + 1)
    comm.allreduce(ints, "max")
    assert (ints == np.arange(1001) * size).all()
    b = np.full(333, rank, np.int32) if rank else np.arange(333, dtype=np.int32)
    comm.broadcast(b, root=0)
    assert (b == np.arange(333)).all()
    g = comm.allgather(np.full(5, rank, np.float64))
    assert (g == np.arange(size)[:, None]).all()
    rs = comm.reduce_scatter(np.ones(size * 7, np.float32))
    assert (rs == size).all()
    comm.barrier()
    if codec:
        big = inputs(size, 200_003, "normal")
        buf = big[rank].copy()
        comm.allreduce(buf, codec=codec)
        exact = np.sum([x.astype(np.float64) for x in big], axis=0)
        assert np.all(np.abs(buf - exact) <= bound(codec, big, size)), f"{codec} outside its bound"
        out.append(digest(buf))
    return tuple(out)


# ---- detection and agreement -------------------------------------------


def _killed(rank: int, size: int, victim: int, how: str) -> tuple:
    import hetcomm

    store = _store(rank)
    comm = hetcomm.Communicator(rank, size, timeout=60)
    comm.barrier()
    if rank == victim:
        comm.allreduce(np.ones(10, np.float32))
        _die_after_the_others_passed(store, rank, size, how)
    comm.allreduce(np.ones(10, np.float32))
    store.set(f"passed/{rank}", "1")
    if rank == 1:
        # An idle rank (no op running) still serves the agreement, which the
        # others' failing ops wait for.
        store.wait(["survivor/caught"])
        failed = comm.failed_ranks(timeout=10)
        pending_error = None
    else:
        # A pending op: it waits for the dead rank.
        work = comm.allreduce(np.ones(1 << 20, np.float32), async_op=True)
        with pytest.raises(hetcomm.PeerLostError) as info:
            work.wait()
        caught = time.time()
        store.set("survivor/caught", "1")
        pending_error = str(info.value), info.value.failed_ranks, caught - float(store.get("victim/died_at"))
        failed = comm.failed_ranks(timeout=10)
    # The next op fails at once, naming the lost rank.
    t0 = time.monotonic()
    with pytest.raises(hetcomm.PeerLostError, match=f"rank {victim}") as info:
        comm.allreduce(np.ones(10, np.float32))
    assert time.monotonic() - t0 < 1.0
    assert info.value.failed_ranks == [victim]
    comm.close()
    return failed, pending_error


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["kill", "exit"])
def test_dead_rank_fails_pending_and_next_op_and_survivors_agree(how):
    size, victim = 4, 2
    results = run_ranks(_killed, size, victim, how, timeout=80, allow_failures=True)
    for rank in range(size):
        if rank == victim:
            continue
        failed, pending = results[rank]
        assert failed == [victim], (rank, results[rank])
        if pending:
            text, agreed, latency = pending
            # Found here or by another survivor first.
            assert f"rank {victim} (host " in text and "was lost" in text, text
            assert agreed == [victim], text
            # Found by the closed connection, not by a timeout (60 s) or heartbeat (5 s);
            # the figure to quote (<= 0.25 s) comes from bench/failover.py.
            assert latency < 2.0, f"rank {rank} raised {latency:.2f} s after the kill"


def _silent(rank: int, size: int, victim: int) -> tuple:
    import hetcomm

    store = _store(rank)
    opts = hetcomm.Options(heartbeat=2.0)
    comm = hetcomm.Communicator(rank, size, timeout=60, options=opts)
    if rank == victim:
        store.set("victim/pid", str(os.getpid()))
        comm.barrier()
        # Once the others are past the barrier (its last messages may still
        # be in this process's queues): alive, sockets open, but silent.
        store.wait([f"passed/{r}" for r in range(size) if r != victim])
        os.kill(os.getpid(), signal.SIGSTOP)
        return None
    comm.barrier()
    store.set(f"passed/{rank}", "1")
    victim_pid = int(store.get("victim/pid"))
    try:
        t0 = time.monotonic()
        # Found here by its silence, or told by the other survivor, who found it so.
        with pytest.raises(hetcomm.PeerLostError, match=f"rank {victim} .* was lost") as info:
            for _ in range(100_000):
                comm.allreduce(np.ones(1000, np.float32))
        elapsed = time.monotonic() - t0
        text = str(info.value)
        failed = comm.failed_ranks(timeout=10)
        assert info.value.failed_ranks == failed
        new = comm.shrink(failed)
        result = _check_collectives(new, 7, codec=None)
        new.close()
        comm.close()
    finally:
        try:
            os.kill(victim_pid, signal.SIGKILL)
        except ProcessLookupError:  # the other survivor was first
            pass
    return elapsed, failed, result, text


@pytest.mark.timeout(90)
def test_silent_rank_is_found_by_heartbeat_and_the_rest_go_on():
    size, victim = 3, 1
    results = run_ranks(_silent, size, victim, timeout=80, allow_failures=True)
    survivors = [results[r] for r in range(size) if r != victim]
    assert all(isinstance(r, tuple) for r in survivors), survivors
    for elapsed, failed, _, _ in survivors:
        assert failed == [victim]
        assert elapsed < 10, f"found after {elapsed:.1f} s (heartbeat 2 s, op timeout 60 s)"
    # At least one survivor found the silence itself (the other may have been told).
    assert any("nothing came from it for" in text for *_, text in survivors), survivors
    assert len({r for _, _, r, _ in survivors}) == 1


def _idle_cpu(rank: int, size: int) -> float:
    import hetcomm

    comm = hetcomm.Communicator(rank, size, timeout=30, options=hetcomm.Options(heartbeat=0.5))
    comm.barrier()
    t0, w0 = os.times(), time.monotonic()
    time.sleep(3)  # idle on purpose: the worker alone serves heartbeats meanwhile
    t1 = os.times()
    busy = (t1.user + t1.system - t0.user - t0.system) / (time.monotonic() - w0)
    x = np.ones(10, np.float32)
    comm.allreduce(x)  # nobody was held failed while idle
    assert (x == size).all()
    comm.close()
    return busy


@pytest.mark.timeout(60)
def test_idle_ranks_serve_heartbeats_without_spinning():
    for busy in run_ranks(_idle_cpu, 3, timeout=50):
        assert busy < 0.05, f"an idle rank used {busy:.0%} of a core"


# ---- shrink ------------------------------------------------------------------


def _shrink_after_failure(rank: int, size: int, victim: int) -> tuple:
    import hetcomm

    comm = hetcomm.Communicator(rank, size, timeout=60)
    store = _store(rank)
    comm.barrier()
    if rank == victim:
        _die_after_the_others_passed(store, rank, size)
    store.set(f"passed/{rank}", "1")
    try:
        for _ in range(1000):
            comm.allreduce(np.ones(50_000, np.float32))
        raise AssertionError("the dead rank was never noticed")
    except hetcomm.PeerLostError as exc:
        exclude = exc.failed_ranks
    assert comm.failed_ranks() == exclude == [victim]
    new = comm.shrink(exclude)
    assert (new.rank, new.size) == (rank - (rank > victim), size - 1)
    with pytest.raises(hetcomm.HetcommError, match="shrunk into a new one"):
        comm.allreduce(np.ones(4, np.float32))
    result = _check_collectives(new, 11)
    new.close()
    comm.close()
    return result


@pytest.mark.timeout(120)
def test_shrink_after_a_failure_keeps_collectives_correct_and_identical():
    size, victim = 4, 1
    results = run_ranks(_shrink_after_failure, size, victim, timeout=110, allow_failures=True)
    survivors = [results[r] for r in range(size) if r != victim]
    assert not any(isinstance(s, RankError) for s in survivors), survivors
    assert len(set(survivors)) == 1, survivors


def _small_after_shrink(rank: int, size: int, victim: int) -> tuple:
    """A rank dies while the others wait for it in the shared-memory arena; the
    three survivors (one host) shrink and run small collectives again."""
    import hetcomm
    from test_small_shm import _watch_path

    notes = _watch_path()
    comm = hetcomm.Communicator(rank, size, timeout=60)
    comm.barrier()
    if rank == victim:
        os._exit(3)
    t0 = time.monotonic()
    with pytest.raises(hetcomm.PeerLostError, match=f"rank {victim}") as info:
        for _ in range(100_000):
            comm.allreduce(np.ones(10, np.float32))
    assert time.monotonic() - t0 < 5.0, "a dead peer was waited on too long"
    assert notes.count > 0, "the small allreduce did not take the arena"
    assert info.value.failed_ranks == comm.failed_ranks(timeout=10) == [victim]
    new = comm.shrink([victim])
    assert (new.rank, new.size) == (rank - (rank > victim), size - 1)
    rng = np.random.default_rng(23)
    xs = [rng.standard_normal(1000).astype(np.float32) for _ in range(new.size)]  # 4000 bytes
    buf = xs[new.rank].copy()
    new.allreduce(buf)
    np.testing.assert_allclose(buf, np.sum(xs, axis=0, dtype=np.float64), rtol=1e-5, atol=1e-5)
    ints = np.arange(500, dtype=np.int64) + new.rank
    new.allreduce(ints, "max")
    assert (ints == np.arange(500) + new.size - 1).all()
    g = new.allgather(np.full(100, new.rank, np.float32))
    assert (g == np.arange(new.size)[:, None]).all()
    rs = new.reduce_scatter(np.arange(new.size * 64, dtype=np.float32))
    assert (rs == new.size * np.arange(new.rank * 64, (new.rank + 1) * 64)).all()
    new.barrier()
    new.close()
    comm.close()
    return digest(buf)


@pytest.mark.timeout(120)
def test_small_collectives_after_a_shrink_on_one_host_are_correct():
    size, victim = 4, 1
    results = run_ranks(_small_after_shrink, size, victim, timeout=110, allow_failures=True)
    survivors = [results[r] for r in range(size) if r != victim]
    assert not any(isinstance(s, RankError) for s in survivors), survivors
    assert len(set(survivors)) == 1, survivors


def _shrink_abort_wakes_small(rank: int, size: int) -> list | None:
    """Ranks 0 and 1 wait in a small allreduce for rank 2 in the arena (rank 2
    never calls it); shrinking with abort fails that op at once."""
    import hetcomm

    store = _store(rank)
    comm = hetcomm.Communicator(rank, size, timeout=60)
    comm.barrier()
    if rank == 2:
        store.wait(["shrunk/0", "shrunk/1"])
        comm.close()
        return None
    work = comm.allreduce(np.ones(10, np.float32), async_op=True)
    time.sleep(0.5)  # the worker is asleep in the arena wait by now
    t0 = time.monotonic()
    new = comm.shrink([2], abort=True)
    with pytest.raises(hetcomm.AbortedError, match="HC_SHRINK_ABORT|shrunk"):
        work.wait()
    elapsed = time.monotonic() - t0
    store.set(f"shrunk/{rank}", "1")
    buf = np.full(100, rank + 1, np.float32)
    new.allreduce(buf)
    assert (buf == 3).all()
    new.close()
    comm.close()
    return [elapsed < 5.0]


@pytest.mark.timeout(90)
def test_shrink_with_abort_wakes_a_small_collective_waiting_in_the_arena():
    results = run_ranks(_shrink_abort_wakes_small, 3, timeout=80)
    assert results[:2] == [[True], [True]], results


def _voluntary(rank: int, size: int) -> tuple | None:
    import hetcomm

    opts = hetcomm.Options(site=f"dc{rank % 2}")
    comm = hetcomm.Communicator(rank, size, timeout=60, options=opts)
    comm.allreduce(np.ones(10, np.float32))
    if rank == 2:
        comm.close()  # leaves on purpose; the others go on without it
        return None
    new = comm.shrink([2])
    assert new.site_count == 2
    result = _check_collectives(new, 5, codec="int4")
    new.close()
    comm.close()
    return result


@pytest.mark.timeout(120)
def test_voluntary_shrink_of_a_healthy_communicator():
    results = run_ranks(_voluntary, 3, timeout=110)
    assert results[0] == results[1]


def _mismatched_shrink(rank: int, size: int) -> str:
    import hetcomm

    comm = hetcomm.Communicator(rank, size, timeout=30)
    comm.barrier()
    try:
        comm.shrink([2] if rank == 0 else [])
    except hetcomm.MismatchError as exc:
        return str(exc)
    finally:
        comm.close()
    return "no error"


@pytest.mark.timeout(90)
def test_shrink_with_different_exclude_sets_is_a_mismatch_everywhere():
    t0 = time.monotonic()
    results = run_ranks(_mismatched_shrink, 3, timeout=80)
    assert time.monotonic() - t0 < 25  # at once, not at the 30 s timeout
    for text in results:
        assert "differs across ranks" in text and "excludes [2]" in text, text


def _bad_shrink(rank: int, size: int) -> None:
    import hetcomm

    with hetcomm.Communicator(rank, size, timeout=30) as comm:
        with pytest.raises(ValueError, match="not another rank"):
            comm.shrink([rank])
        with pytest.raises(ValueError, match="not another rank"):
            comm.shrink([size])
        with pytest.raises(ValueError, match="twice"):
            comm.shrink([1 - rank, 1 - rank])
        assert comm.failed_ranks(timeout=0) == []
        x = np.ones(3, np.float32)
        comm.allreduce(x)
        assert (x == size).all()


@pytest.mark.timeout(60)
def test_bad_shrink_arguments_harm_nothing():
    run_ranks(_bad_shrink, 2, timeout=50)


# ---- grow ----------------------------------------------------------------------


def _rejoin(rank: int, size: int) -> tuple:
    """Ranks 0-2 start; 2 dies; 0 and 1 shrink, then grow back to 3 with
    process 3 as the newcomer, which receives the state by broadcast."""
    import hetcomm

    if rank == 3:  # the restarted rank
        comm = hetcomm.Communicator.join(timeout=60)
        assert (comm.rank, comm.size) == (2, 3)
    else:
        first = hetcomm.Communicator(rank, 3, timeout=60)
        store = _store(rank)
        first.barrier()
        if rank == 2:
            _die_after_the_others_passed(store, rank, 3)
        store.set(f"passed/{rank}", "1")
        with pytest.raises(hetcomm.PeerLostError) as info:
            first.allreduce(np.ones(1 << 18, np.float32))
        small = first.shrink(info.value.failed_ranks)
        state = np.arange(1000, dtype=np.float64) * 3.0
        small.allreduce(state, "max")  # the job goes on at size 2
        comm = small.grow(3)
        assert (comm.rank, comm.size) == (rank, 3)
        small.close()
        first.close()
    state = np.zeros(1000, np.float64) if comm.rank == 2 else np.arange(1000, dtype=np.float64) * 3.0
    comm.broadcast(state, root=0)
    assert (state == np.arange(1000) * 3.0).all()
    result = _check_collectives(comm, 3)
    comm.close()
    return result


@pytest.mark.timeout(120)
def test_a_restarted_rank_rejoins_through_grow_and_join():
    results = run_ranks(_rejoin, 4, timeout=110, allow_failures=True)
    assert "exited with code 3" in results[2]
    assert not any(isinstance(results[r], RankError) for r in (0, 1, 3)), results
    assert results[0] == results[1] == results[3], results


def _grow_without_newcomer(rank: int, size: int) -> float:
    import hetcomm

    comm = hetcomm.Communicator(rank, size, timeout=4)
    comm.barrier()
    t0 = time.monotonic()
    with pytest.raises(hetcomm.CommTimeoutError, match="did not join"):
        comm.grow(size + 1)  # nobody calls join
    elapsed = time.monotonic() - t0
    # The members go on at the old size, over the same links.
    x = np.full(1000, rank + 1.0, np.float32)
    comm.allreduce(x)
    assert (x == size * (size + 1) / 2).all()
    comm.close()
    return elapsed


@pytest.mark.timeout(60)
def test_a_grow_whose_newcomer_never_comes_leaves_the_members_working():
    for elapsed in run_ranks(_grow_without_newcomer, 2, timeout=50):
        assert elapsed < 20


# ---- a cut link on the WAN test bed -----------------------------------------

_CUT_RANK = """
import json, os, signal, time
import numpy as np
import hetcomm

rank = int(os.environ["RANK"])
comm = hetcomm.Communicator(timeout=60, options=hetcomm.Options(heartbeat=2.0))
comm.barrier()
print("ready", flush=True)
if rank == 2:
    signal.pause()  # stays up; the test cuts its link
t0 = time.monotonic()
try:
    while True:
        comm.allreduce(np.ones(10_000, np.float32))
except hetcomm.PeerLostError as exc:
    found, text, failed = time.monotonic() - t0, str(exc), exc.failed_ranks
new = comm.shrink(failed)
x = np.full(10_000, new.rank + 1.0, np.float32)
new.allreduce(x)
print(json.dumps({"found": found, "text": text, "failed": failed, "ok": bool((x == 3.0).all())}), flush=True)
new.close()
comm.close()
"""


@pytest.mark.netns
@pytest.mark.timeout(120)
def test_a_cut_wan_link_is_found_by_heartbeat():
    import subprocess
    import sys

    from hetcomm.testbed import netns

    ok, why = netns.available()
    if not ok:
        pytest.skip(f"WAN test bed unavailable: {why}")
    with netns.WanTestbed(sites=3, ranks_per_site=1, wan_rate=None, prefix="hcft") as tb:
        procs = tb.spawn_ranks([sys.executable, "-c", _CUT_RANK], stdout=subprocess.PIPE, text=True)
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        # Rank 2's site loses its WAN link: nothing closes, everything goes silent.
        subprocess.run(["ip", "-n", tb.site_netns(2), "link", "set", tb.site_ifname(2), "down"], check=True)
        results = [json.loads(procs[r].communicate(timeout=60)[0].strip().splitlines()[-1]) for r in (0, 1)]
    for r in results:
        assert r["failed"] == [2] and r["ok"], r
        assert r["found"] < 10, r  # heartbeat 2 s; the op timeout is 60 s
    assert any("nothing came from it for" in r["text"] for r in results), results
