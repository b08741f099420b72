"""The per-rank loop of hetcomm-bench, and the entry point each rank process runs.

A rank is started as ``python -m hetcomm.bench.runner --config JSON`` with
``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in its
environment (see :mod:`hetcomm.bench.launcher`). It reports to the launcher
through its standard output, one JSON message per line behind
:data:`MARKER`; everything else it or its libraries print goes to stderr (the
runner moves file descriptor 1 onto 2 at start, so stray prints from C code
cannot corrupt the message stream). Messages:

* ``{"type": "ready", "rank", "pid", "host", "versions"}`` after the rendezvous;
* ``{"type": "row", "rank", "op", "size", "time_us", "wrong", "max_err",
  "digest", "wire_bytes", "iters", "warmup"}`` per case;
* ``{"type": "error", "rank", "error", "traceback"}`` on failure (then exit 1);
* ``{"type": "done", "rank"}`` at the end.

Per case: fill the input, run the op once and check it (untimed), refill,
warm up, barrier, then time ``iters`` back-to-back ops; the rank reports its
mean, and the launcher takes the max over ranks. In-place floating-point
allreduce (torch's ``all_reduce``) multiplies the data by ``n`` at every call,
so there the loop restores the input (untimed, behind a barrier) before the
values could overflow; every other case runs all its iterations back to back.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import sys
import threading
import time
import traceback
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, TextIO

from .backends import Backend, make_backend
from .collectives import COLLECTIVES, DATA_MAX_ABS, Case, DType, parse_dtype, tolerance
from .data import check, expected_segments, poison_value, send_data

MARKER = "@hetcomm-bench@ "
#: set by the launcher: exit when stdin closes (the launcher died)
WATCH_STDIN_ENV = "HETCOMM_BENCH_WATCH_STDIN"

log = logging.getLogger("hetcomm.bench.runner")


@dataclass
class RankConfig:
    """Everything a rank needs besides its rank/world environment (travels as JSON)."""

    backend: str
    via: str
    dtype: str
    codec: str = "none"
    root: int = 0
    check: bool = True
    timeout: float = 300.0
    log_level: str = "WARNING"
    cases: list[dict] = field(default_factory=list)

    def to_json(self) -> str:
        """Serialize for the command line."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "RankConfig":
        """Inverse of :meth:`to_json`."""
        return cls(**json.loads(text))


def growth_chunk(dtype: DType, world_size: int) -> int:
    """In-place sum allreduces that can run before the data may overflow.

    After ``j`` calls every element is at most ``M * n**j`` in magnitude
    (``M`` = :data:`DATA_MAX_ABS`); keep that under half the dtype's largest
    finite value. Integers just wrap, which costs nothing, so they need no
    limit (a very large number is returned).
    """
    if not dtype.is_float or world_size <= 1:
        return 1 << 62
    return max(1, int(math.log(dtype.max_finite / (2 * DATA_MAX_ABS)) / math.log(world_size)))


def _run_loop(call: Callable[[], object], iters: int, chunk: int, reset: Callable[[], None] | None) -> float:
    """Run ``call`` ``iters`` times; return the seconds spent in calls.

    With ``reset``, every ``chunk`` calls the loop stops the clock, calls
    ``reset`` (restore the input, barrier) and goes on.
    """
    if reset is None or iters <= chunk:
        t0 = time.perf_counter()
        for _ in range(iters):
            call()
        return time.perf_counter() - t0
    total = 0.0
    done = 0
    while done < iters:
        if done:
            reset()
        k = min(chunk, iters - done)
        t0 = time.perf_counter()
        for _ in range(k):
            call()
        total += time.perf_counter() - t0
        done += k
    return total


def run_case(backend: Backend, case: Case, cfg: RankConfig, rank: int, world_size: int) -> dict[str, Any]:
    """Check and time one case on this rank; return its ``row`` message."""
    dtype = parse_dtype(cfg.dtype)
    coll = COLLECTIVES[case.op]
    send_count, recv_count = coll.counts(case.count, world_size)
    data = send_data(coll, rank, world_size, send_count, cfg.root, dtype)
    send = backend.from_numpy(data, dtype)
    inplace = backend.inplace(case.op)
    recv = send if inplace else backend.full(recv_count, poison_value(dtype), dtype)
    call = backend.make_call(case.op, send, recv, root=cfg.root, codec=cfg.codec)
    # Only an in-place reduction changes its own input.
    restore = inplace and coll.reduces
    if not restore:
        del data

    wrong, max_err, digest = None, None, None
    if cfg.check:
        call()
        segments = expected_segments(coll, rank, world_size, case.count, cfg.root, dtype)
        tol = tolerance(coll, dtype, cfg.codec, world_size)
        wrong, max_err = check(lambda a, b: backend.read(recv, a, b), segments, tol, dtype.is_float)
        if coll.identical:
            digest = zlib.crc32(backend.raw(recv))

    reset = None
    chunk = 1 << 62
    if restore:
        def reset() -> None:
            backend.assign(send, data)
            backend.barrier()

        chunk = growth_chunk(dtype, world_size)
        backend.assign(send, data)
    _run_loop(call, case.warmup, chunk, reset)
    if restore:
        backend.assign(send, data)
    backend.barrier()
    b0 = backend.bytes_sent()
    elapsed = _run_loop(call, case.iters, chunk, reset)
    b1 = backend.bytes_sent()
    wire = None if b0 is None or b1 is None else (b1 - b0) / case.iters
    return {
        "type": "row", "rank": rank, "op": case.op, "size": case.size,
        "time_us": elapsed / case.iters * 1e6, "wrong": wrong, "max_err": max_err,
        "digest": digest, "wire_bytes": wire, "iters": case.iters, "warmup": case.warmup,
    }


def run_rank(cfg: RankConfig, rank: int, world_size: int, emit: Callable[[dict], None]) -> None:
    """Join the group, run every case in ``cfg.cases`` in order, emit one row each, leave."""
    backend = make_backend(cfg.backend, cfg.via, cfg.codec)
    t0 = time.perf_counter()
    backend.setup(rank, world_size, cfg.timeout)
    log.info("rank %d/%d joined %s via %s in %.2f s", rank, world_size, cfg.backend, cfg.via,
             time.perf_counter() - t0)
    emit({"type": "ready", "rank": rank, "pid": os.getpid(), "host": socket.gethostname(),
          "versions": backend.versions()})
    for d in cfg.cases:
        case = Case.from_dict(d)
        log.debug("rank %d: %s %d B x %d", rank, case.op, case.size, case.iters)
        emit(run_case(backend, case, cfg, rank, world_size))
    backend.barrier()
    backend.close()
    emit({"type": "done", "rank": rank})


def _claim_stdout() -> TextIO:
    """Keep the real stdout for messages; send fd 1 (and ``sys.stdout``) to stderr."""
    sys.stdout.flush()
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(fd, "w", buffering=1)


def _watch_stdin() -> None:
    """Exit at once when stdin reaches EOF: the launcher is gone, so nobody waits for us."""
    def watch() -> None:
        # os.read on the descriptor, not sys.stdin: a daemon thread blocked inside the
        # buffered reader holds its lock, and the interpreter's exit then dies trying to
        # take it ("Fatal Python error: _enter_buffered_busy").
        try:
            while os.read(sys.stdin.fileno(), 4096):
                pass
        except Exception:
            pass
        os._exit(75)

    threading.Thread(target=watch, name="hetcomm-bench-parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """Entry point of one rank (``python -m hetcomm.bench.runner --config JSON``)."""
    parser = argparse.ArgumentParser(prog="hetcomm.bench.runner",
                                     description="one rank of hetcomm-bench (started by hetcomm-bench)")
    parser.add_argument("--config", required=True, help="RankConfig as JSON")
    args = parser.parse_args(argv)
    cfg = RankConfig.from_json(args.config)
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    out = _claim_stdout()
    logging.basicConfig(stream=sys.stderr, level=cfg.log_level,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    if os.environ.get(WATCH_STDIN_ENV) == "1":
        _watch_stdin()

    lock = threading.Lock()

    def emit(msg: dict) -> None:
        line = MARKER + json.dumps(msg) + "\n"
        with lock:
            out.write(line)
            out.flush()

    try:
        run_rank(cfg, rank, world_size, emit)
    except BaseException as exc:  # report everything, KeyboardInterrupt included
        emit({"type": "error", "rank": rank, "error": f"{type(exc).__name__}: {exc}",
              "traceback": traceback.format_exc()})
        sys.stderr.flush()
        # Skip interpreter shutdown: library threads blocked on dead peers could hang it.
        os._exit(1)
    out.flush()
    sys.stderr.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
