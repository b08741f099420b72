"""Helpers for the torch backend tests: run a function on N real processes.

Each rank is a fresh process (as torchrun would give), talking over
loopback. A rank's return value comes back to the test; an exception in any
rank fails the test with that rank's traceback; a rank that never finishes
fails it too (the pytest-timeout on each test is the outer bound).
"""
from __future__ import annotations

import os
import socket
import tempfile
import traceback
from typing import Any, Callable, Sequence

from harness import rank_context, take_environment


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable[..., Any], rank: int, world_size: int, env: dict[str, str], args: tuple,
           queue: Any) -> None:
    take_environment(env)
    import torch

    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    os.environ["RANK"] = str(rank)
    os.environ["LOCAL_RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    # A rank still running shortly before the parent gives up prints where it is.
    import faulthandler

    faulthandler.dump_traceback_later(float(env.get("HETCOMM_TEST_DUMP_AFTER", "0")) or 1e9, exit=False)
    try:
        import hetcomm  # noqa: F401  registers the backend, as a user's `import hetcomm` does

        result = fn(rank, world_size, *args)
        queue.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, env: dict[str, str] | None = None,
              timeout: float = 240.0, lost: Sequence[int] = ()) -> list[Any]:
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` processes; returns the results by rank.

    MASTER_ADDR/MASTER_PORT are set (env:// works); ``env`` adds variables.
    Ranks in ``lost`` are expected to die without reporting (their result is
    None); a report from one of them is an error.
    """
    ctx = rank_context()
    queue = ctx.Queue()
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    base.update(env or {})
    base.setdefault("HETCOMM_TEST_DUMP_AFTER", str(max(timeout - 15, 5)))
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, base, args, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size - len(lost)):
            rank, ok, value = queue.get(timeout=timeout)
            if rank in lost:
                errors.append(f"rank {rank} was to die but reported:\n{value}")
            elif ok:
                results[rank] = value
            else:
                errors.append(f"rank {rank} failed:\n{value}")
    except Exception as exc:  # queue.Empty: some rank hung or died
        missing = sorted(set(range(world_size)) - set(results) - set(lost))
        errors.append(f"ranks {missing} did not report within {timeout} s ({type(exc).__name__})")
    finally:
        for p in procs:
            p.join(timeout=20)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results.get(r) for r in range(world_size)]


def temp_file() -> str:
    """A fresh path for a FileStore / file:// init (the file must not exist yet)."""
    fd, path = tempfile.mkstemp(prefix="hetcomm-test-")
    os.close(fd)
    os.unlink(path)
    return path
