"""Runs a function as N real ranks (fresh processes) on loopback.

Every run has a deadline: ranks still alive at the deadline are killed and the
test fails, so a hang is a failure, never a stuck CI job.
"""
from __future__ import annotations

import faulthandler
import logging
import multiprocessing as mp
import os
import queue
import signal
import socket
import time
import traceback
from typing import Any, Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def interruptible() -> None:
    """``preexec_fn`` for a child that a test stops with SIGINT: a shell's
    background job (``cmd &`` without job control) starts with SIGINT
    ignored, and Python then never turns it into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def rank_context() -> Any:
    """Ranks fork from a server that imported numpy and torch once: spawning
    each rank afresh costs ~2.5 s of CPU for `import torch`, most of the
    suite's time on two cores. Nothing in the preload starts a thread (hetcomm
    makes its ZeroMQ context on first use), so forking from it is safe."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["numpy", "hetcomm", "torch", "torch.distributed", "torch.nn", "torch.optim"])
    return ctx


def take_environment(env: dict[str, str]) -> None:
    """The fork server's environment is the one it started with: a rank takes
    the parent's as it was at the call, as a spawned rank would."""
    os.environ.clear()
    os.environ.update(env)


def _rank_main(fn: Callable, rank: int, world_size: int, env: dict[str, str], results: Any, args: tuple,
               all_done: Any, timeout: float) -> None:
    take_environment({**env, "RANK": str(rank), "WORLD_SIZE": str(world_size)})
    faulthandler.enable()  # a rank killed by SIGSEGV/SIGABRT prints where its threads were
    try:
        results.put((rank, True, fn(rank, world_size, *args)))
    except BaseException as exc:  # report everything, including SystemExit, to the parent
        results.put((rank, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    if rank == 0:
        # Rank 0 serves the env:// store: a rank 0 that is done first must not
        # take it away from ranks still waiting on it (they would hang).
        all_done.wait(timeout)


class RankFailure(AssertionError):
    """One or more ranks raised; ``errors`` maps rank to its traceback text."""

    def __init__(self, errors: dict[int, str]) -> None:
        self.errors = errors
        super().__init__("\n".join(f"--- rank {r} ---\n{t}" for r, t in sorted(errors.items())))


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 60.0,
              env: dict[str, str] | None = None, allow_failures: bool = False) -> list[Any]:
    """Runs ``fn(rank, world_size, *args)`` in ``world_size`` processes.

    Returns the ranks' return values in rank order. Raises RankFailure if a
    rank raised (unless ``allow_failures``: then its entry is the
    traceback text wrapped in a RankError), TimeoutError if the ranks are
    not all done by ``timeout`` seconds.
    """
    ctx = rank_context()
    results = ctx.Queue()
    all_done = ctx.Event()
    full_env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), **(env or {})}
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, full_env, results, args, all_done, timeout),
                         daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    got: dict[int, tuple[bool, Any]] = {}
    try:
        while len(got) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(got))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout} s")
            try:
                rank, ok, value = results.get(timeout=min(left, 1.0))
                got[rank] = (ok, value)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode is not None]
                if dead:
                    # A rank that died without reporting (killed, os._exit): give
                    # the queue a moment for a report in flight, then record it.
                    time.sleep(0.2)
                    while not results.empty():
                        rank, ok, value = results.get()
                        got[rank] = (ok, value)
                    for r in dead:
                        got.setdefault(r, (False, RankExited(procs[r].exitcode)))
    finally:
        all_done.set()
        for p in procs:
            p.join(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            if p.is_alive():
                p.kill()
                p.join()
    errors = {r: v for r, (ok, v) in got.items() if not ok}
    if errors and not allow_failures:
        raise RankFailure({r: str(v) for r, v in errors.items()})
    return [got[r][1] if got[r][0] else RankError(str(got[r][1])) for r in range(world_size)]


class RankError(str):
    """A failed rank's traceback text (returned with ``allow_failures``)."""


class RankExited(str):
    """How a rank that died without reporting ended, from ``Process.exitcode``
    (negative: the signal that killed it)."""

    def __new__(cls, code: int | None) -> "RankExited":
        if code is not None and code < 0:
            try:
                how = f"was killed by signal {signal.Signals(-code).name} ({-code})"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        return super().__new__(cls, f"{how} without reporting")


class LogNotes(logging.Handler):
    """Keeps the "hetcomm" log records (the core's included) that contain
    ``phrase``, e.g. the debug line saying which path a collective took."""

    def __init__(self, phrase: str) -> None:
        super().__init__(logging.DEBUG)
        self.phrase = phrase
        self.messages: list[str] = []

    @property
    def count(self) -> int:
        return len(self.messages)

    def emit(self, record: logging.LogRecord) -> None:
        if self.phrase in record.getMessage():
            self.messages.append(record.getMessage())


def watch_log(phrase: str) -> LogNotes:
    """Starts keeping the "hetcomm" log records containing ``phrase`` (the
    logger goes to DEBUG; call it before creating the communicator)."""
    notes = LogNotes(phrase)
    log = logging.getLogger("hetcomm")
    log.addHandler(notes)
    log.setLevel(logging.DEBUG)
    return notes
