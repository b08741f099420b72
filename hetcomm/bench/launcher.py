"""Starting and supervising the rank processes of hetcomm-bench.

The seam: a :class:`Launcher` decides *where* ranks run (which host or
network namespace, which rendezvous address, which extra environment);
:func:`run_world` starts ``python -m hetcomm.bench.runner`` through it for
every rank and supervises them: it forwards their messages, enforces the
no-progress timeout, and on any failure, timeout or Ctrl-C kills every rank
and raises :class:`RankFailure` naming the rank and its error.

:class:`LocalLauncher` runs all ranks on this host over 127.0.0.1. The WAN
testbed (``--sites N --wan-rate R``) is :class:`hetcomm.bench.wan.WanLauncher`,
whose ``spawn`` starts each rank inside its site's network namespace. A
launcher's ``spawn`` returns a :class:`subprocess.Popen` with ``stdin``,
``stdout`` and ``stderr`` all pipes; the protocol on them is described in
:mod:`hetcomm.bench.runner`.
"""
from __future__ import annotations

import collections
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable

from .runner import MARKER, WATCH_STDIN_ENV, RankConfig

log = logging.getLogger("hetcomm.bench.launcher")


class LauncherUnavailable(RuntimeError):
    """The requested way of starting ranks cannot run here."""


class RankFailure(RuntimeError):
    """A rank failed, crashed or stalled; every rank has been stopped.

    Attributes:
        rank: the rank that failed first (None for a world-wide timeout).
        detail: the rank's traceback or the tail of its stderr.
    """

    def __init__(self, message: str, rank: int | None = None, detail: str = ""):
        super().__init__(message)
        self.rank = rank
        self.detail = detail


class Launcher(ABC):
    """Where and how the ranks of one world are started. Use as a context manager."""

    #: one line for the table header, e.g. "local, 127.0.0.1"
    description: str = ""

    def __enter__(self) -> "Launcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abstractmethod
    def rendezvous(self, world_size: int) -> tuple[str, int]:
        """``(MASTER_ADDR, MASTER_PORT)`` for a new world; rank 0 hosts the store there."""

    def rank_env(self, rank: int, world_size: int) -> dict[str, str]:
        """Extra environment for ``rank`` (site labels, interface names ...)."""
        return {}

    @abstractmethod
    def spawn(self, rank: int, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        """Start one rank: ``argv`` with ``env``, stdin/stdout/stderr as pipes."""

    def info(self) -> dict[str, Any]:
        """What to record about the testbed in the JSON results."""
        return {"launcher": type(self).__name__, "description": self.description}

    def close(self) -> None:
        """Tear down whatever the launcher set up (no-op for local runs)."""


class LocalLauncher(Launcher):
    """All ranks on this host, rendezvous on 127.0.0.1 at a free port."""

    host = "127.0.0.1"
    description = "local, 127.0.0.1"

    def rendezvous(self, world_size: int) -> tuple[str, int]:
        return self.host, free_port(self.host)

    def rank_env(self, rank: int, world_size: int) -> dict[str, str]:
        env = {"LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size)}
        # gloo picks its interface from the hostname unless told; keep it on loopback.
        if sys.platform.startswith("linux") and "GLOO_SOCKET_IFNAME" not in os.environ:
            env["GLOO_SOCKET_IFNAME"] = "lo"
        return env

    def spawn(self, rank: int, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        # A session of its own: a terminal's Ctrl-C reaches only us, and we stop the ranks.
        return subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def make_launcher(sites: int | None = None, wan_rate: str | None = None, world_size: int = 2) -> Launcher:
    """The launcher for these options: local, or the netns WAN testbed for ``--sites``/``--wan-rate``.

    Raises:
        LauncherUnavailable: the WAN testbed cannot run here (no root, no ``ip``, bad shape).
    """
    if sites is None and wan_rate is None:
        return LocalLauncher()
    from .wan import WanLauncher  # imports this module

    return WanLauncher(sites if sites is not None else 1, wan_rate, world_size)


class _Rank:
    """One started rank: its process, reader threads and stderr tail."""

    def __init__(self, rank: int, proc: subprocess.Popen, events: queue.Queue):
        self.rank = rank
        self.proc = proc
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=40)
        self.eof = False
        self.done = False
        self.last = "nothing yet"  # what the rank last reported, for error messages
        self.threads = [
            threading.Thread(target=self._read_stdout, args=(events,), daemon=True,
                             name=f"hetcomm-bench-rank{rank}-out"),
            threading.Thread(target=self._read_stderr, daemon=True, name=f"hetcomm-bench-rank{rank}-err"),
        ]
        for t in self.threads:
            t.start()

    def _read_stdout(self, events: queue.Queue) -> None:
        import json

        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if line.startswith(MARKER):
                try:
                    events.put(("msg", self.rank, json.loads(line[len(MARKER):])))
                    continue
                except ValueError:
                    pass
            log.warning("[rank %d stdout] %s", self.rank, line)
        events.put(("eof", self.rank, None))

    def _read_stderr(self) -> None:
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.stderr_tail.append(line)
            log.info("[rank %d] %s", self.rank, line)

    def tail(self) -> str:
        """The last lines the rank wrote to stderr."""
        return "\n".join(self.stderr_tail)


def _exit_text(rc: int | None) -> str:
    if rc is None:
        return "is still running"
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with code {rc}"


def _stop(ranks: list[_Rank], grace: float) -> None:
    """Let ranks exit for up to ``grace`` s, then terminate, then kill the rest."""
    deadline = time.monotonic() + grace
    for r in ranks:
        try:
            r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    alive = [r for r in ranks if r.proc.poll() is None]
    for r in alive:
        log.debug("terminating rank %d (pid %d)", r.rank, r.proc.pid)
        r.proc.terminate()
    deadline = time.monotonic() + 3.0
    for r in alive:
        try:
            r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.debug("killing rank %d (pid %d)", r.rank, r.proc.pid)
            r.proc.kill()
            r.proc.wait()
    for r in ranks:
        for t in r.threads:
            t.join(timeout=1.0)
        for stream in (r.proc.stdin, r.proc.stdout, r.proc.stderr):
            try:
                if stream:
                    stream.close()
            except OSError:
                pass


def rank_argv() -> list[str]:
    """The command that runs one rank (without its ``--config``)."""
    return [sys.executable, "-m", "hetcomm.bench.runner"]


def run_world(launcher: Launcher, world_size: int, cfg: RankConfig, timeout: float,
              on_message: Callable[[dict], None]) -> None:
    """Run one world of ``world_size`` ranks to completion.

    Args:
        launcher: where ranks run.
        world_size: number of ranks.
        cfg: what every rank runs.
        timeout: seconds without any message from any rank before the world
            is declared stuck and killed.
        on_message: called (in this thread) with every ``ready``/``row`` message.

    Raises:
        RankFailure: a rank reported an error, crashed or the world stalled.
        KeyboardInterrupt: after every rank has been killed.
    """
    addr, port = launcher.rendezvous(world_size)
    pkg_root = str(Path(__file__).resolve().parent.parent.parent)
    pythonpath = os.pathsep.join([pkg_root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    base_env = dict(os.environ, PYTHONPATH=pythonpath, MASTER_ADDR=addr, MASTER_PORT=str(port),
                    WORLD_SIZE=str(world_size), PYTHONUNBUFFERED="1", **{WATCH_STDIN_ENV: "1"})
    argv = rank_argv() + ["--config", cfg.to_json()]
    log.info("starting %d ranks of %s via %s (rendezvous %s:%d)", world_size, cfg.backend, cfg.via, addr, port)
    events: queue.Queue = queue.Queue()
    ranks: list[_Rank] = []
    ok = False
    try:
        for r in range(world_size):
            env = dict(base_env, RANK=str(r), **launcher.rank_env(r, world_size))
            ranks.append(_Rank(r, launcher.spawn(r, argv, env), events))
        _supervise(ranks, events, timeout, on_message)
        ok = True
    finally:
        # After success give ranks time to exit on their own; otherwise stop them now.
        _stop(ranks, grace=10.0 if ok else 0.0)


def _supervise(ranks: list[_Rank], events: queue.Queue, timeout: float,
               on_message: Callable[[dict], None]) -> None:
    last = time.monotonic()
    while not all(r.done for r in ranks):
        try:
            kind, rank, msg = events.get(timeout=0.25)
        except queue.Empty:
            for r in ranks:
                if r.eof and not r.done and r.proc.poll() is not None:
                    raise RankFailure(f"rank {r.rank} {_exit_text(r.proc.returncode)} before finishing",
                                      r.rank, r.tail())
            if time.monotonic() - last > timeout:
                pending = "; ".join(f"rank {r.rank} last reported {r.last}" for r in ranks if not r.done)
                raise RankFailure(f"no progress from any rank for {timeout:g} s ({pending}); "
                                  "stopped them all (raise --timeout for slow runs)")
            continue
        last = time.monotonic()
        r = ranks[rank]
        if kind == "eof":
            r.eof = True
            if not r.done:
                try:
                    r.proc.wait(timeout=5.0)
                except subprocess.TimeoutExpired:
                    pass
            continue
        mtype = msg.get("type")
        r.last = _describe(msg)
        if mtype == "done":
            r.done = True
        elif mtype == "error":
            _raise_errors(ranks, events, rank, msg)
        else:
            on_message(msg)


def _describe(msg: dict) -> str:
    """A rank's message in a few words: "ready", "allreduce 1024 B" ..."""
    if msg.get("type") == "row":
        return f"{msg.get('op')} {msg.get('size')} B done"
    return str(msg.get("type"))


def _raise_errors(ranks: list[_Rank], events: queue.Queue, rank: int, first: dict) -> None:
    """Raise :class:`RankFailure` for the root cause among the ranks' errors.

    Waits a moment for more errors (peers of a failed rank fail too) and for
    crashed processes to exit; a rank that died without a word is the likelier
    cause than the peers that then lost their connection to it, so it is
    named first.
    """
    errors = {rank: first}
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            kind, r, msg = events.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if kind == "msg" and msg.get("type") == "error":
            errors.setdefault(r, msg)
    crashed = [r for r in ranks if r.rank not in errors and not r.done and r.proc.poll() not in (None, 0)]
    lines = [f"rank {r.rank} {_exit_text(r.proc.returncode)} before finishing" for r in crashed]
    lines += [f"rank {r} failed: {m.get('error')}" for r, m in errors.items()]
    lines += [f"rank {r.rank} was still running without an error (last reported {r.last})"
              for r in ranks if r.rank not in errors and not r.done and r.proc.poll() is None]
    text = lines[0] + ("\n  then " + "\n  then ".join(lines[1:]) if len(lines) > 1 else "")
    if crashed:
        raise RankFailure(text, crashed[0].rank, crashed[0].tail())
    raise RankFailure(text, rank, first.get("traceback") or ranks[rank].tail())
