"""Results of hetcomm-bench: per-rank rows folded into table rows, machine info, JSON."""
from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .collectives import COLLECTIVES, DType


@dataclass
class Row:
    """One (op, size) result of one backend, over all ranks.

    ``time_us`` is the max over ranks of each rank's mean time per op (what the
    slowest rank saw); ``wrong`` the sum of wrong elements over ranks (None
    when not checked); ``identical`` whether every rank's output was bit-equal
    (None for collectives whose outputs differ by rank, or unchecked);
    ``wire_bytes`` the most payload bytes a rank sent per op, where the backend
    counts them.
    """

    op: str
    size: int
    count: int
    dtype: str
    redop: str
    root: int
    backend: str
    time_us: float
    algbw: float
    busbw: float
    wrong: int | None
    max_err: float | None
    identical: bool | None
    wire_bytes: float | None
    iters: int
    warmup: int
    rank_time_us: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (bandwidths in GB/s, 1 GB = 1e9 B)."""
        d = asdict(self)
        d["algbw_GBps"] = d.pop("algbw")
        d["busbw_GBps"] = d.pop("busbw")
        return d


class Collector:
    """Folds the ranks' ``row`` messages into :class:`Row` s as soon as every rank reported one."""

    def __init__(self, world_size: int, dtype: DType, root: int, label: str,
                 on_row: Callable[[Row], None] | None = None):
        self.world_size = world_size
        self.dtype = dtype
        self.root = root
        self.label = label
        self.on_row = on_row
        self.rows: list[Row] = []
        self.ranks: dict[int, dict] = {}
        self._pending: dict[tuple[str, int], dict[int, dict]] = {}

    def feed(self, msg: dict) -> None:
        """Take one message from a rank (``ready`` or ``row``)."""
        if msg.get("type") == "ready":
            self.ranks[msg["rank"]] = {k: v for k, v in msg.items() if k != "type"}
            return
        if msg.get("type") != "row":
            return
        key = (msg["op"], msg["size"])
        got = self._pending.setdefault(key, {})
        got[msg["rank"]] = msg
        if len(got) == self.world_size:
            del self._pending[key]
            row = self._fold([got[r] for r in sorted(got)])
            self.rows.append(row)
            if self.on_row:
                self.on_row(row)

    def _fold(self, per_rank: list[dict]) -> Row:
        first = per_rank[0]
        coll = COLLECTIVES[first["op"]]
        n = self.world_size
        times = [m["time_us"] for m in per_rank]
        t = max(times)
        size = first["size"]
        algbw = size / t / 1e3 if t > 0 else 0.0
        checked = all(m["wrong"] is not None for m in per_rank)
        wrong = sum(m["wrong"] for m in per_rank) if checked else None
        errs = [m["max_err"] for m in per_rank if m.get("max_err") is not None]
        digests = [m.get("digest") for m in per_rank]
        identical = None
        if checked and coll.identical and all(d is not None for d in digests):
            identical = len(set(digests)) == 1
        wires = [m["wire_bytes"] for m in per_rank if m.get("wire_bytes") is not None]
        return Row(
            op=coll.name, size=size, count=size // self.dtype.itemsize, dtype=self.dtype.name,
            redop=coll.redop, root=self.root if coll.name == "broadcast" else -1, backend=self.label,
            time_us=t, algbw=algbw, busbw=algbw * coll.busbw_factor(n), wrong=wrong,
            max_err=max(errs) if errs else None, identical=identical,
            wire_bytes=max(wires) if len(wires) == n else None,
            iters=first["iters"], warmup=first["warmup"], rank_time_us=times,
        )


def _read_first(path: str, key: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return None


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def memcpy_gbps(nbytes: int = 64 << 20, repeats: int = 7) -> float:
    """One core's copy rate here and now, GB/s (bytes copied / s, median of ``repeats``).

    Large-message bandwidth is judged against it: a collective on one host
    cannot beat the memory it has to copy through.
    """
    import time

    import numpy

    src = numpy.ones(nbytes, numpy.uint8)
    dst = numpy.empty_like(src)
    numpy.copyto(dst, src)  # fault the pages in first
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        numpy.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return nbytes / sorted(times)[repeats // 2] / 1e9


def machine_info() -> dict[str, Any]:
    """Host, CPU, memory and software versions, for the JSON results."""
    import numpy

    mem = _read_first("/proc/meminfo", "MemTotal")
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _read_first("/proc/cpuinfo", "model name") or platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "mem_total": mem,
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "memcpy_gbps_at_start": round(memcpy_gbps(), 2),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "torch": _version("torch"),
        "pyzmq": _version("pyzmq"),
        "hetcomm": _version("hetcomm"),
        "hetcomm_git": _git_commit(),
    }


def now_iso() -> str:
    """Current local time, ISO 8601 with offset."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def write_json(path: str, doc: dict[str, Any]) -> None:
    """Write ``doc`` to ``path`` atomically (``-`` writes to stdout)."""
    text = json.dumps(doc, indent=2, default=str) + "\n"
    if path == "-":
        import sys

        sys.stdout.write(text)
        return
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, target)
