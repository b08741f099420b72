"""Slower "vendors" on one machine: CPU quotas through cgroup v1's cpu controller.

A :class:`CpuQuota` is one cgroup ``/sys/fs/cgroup/cpu/<name>`` holding its
processes to ``fraction`` of one core (``cpu.cfs_quota_us`` over a 100 ms
period). Needs root and a cgroup v1 cpu hierarchy; :func:`unavailable_reason`
says why not where they are missing. The cgroup is removed on close (its
processes must have exited or moved out first).
"""
from __future__ import annotations

import os
import pathlib
import time

ROOT = pathlib.Path(os.environ.get("HETCOMM_CGROUP_CPU_ROOT", "/sys/fs/cgroup/cpu"))
PERIOD_US = 100_000


def unavailable_reason() -> str | None:
    """None if CPU quotas can be set here, else why not."""
    if not (ROOT / "cpu.cfs_quota_us").is_file():
        return f"no cgroup v1 cpu controller at {ROOT} (cpu.cfs_quota_us missing)"
    if not os.access(ROOT, os.W_OK):
        return f"{ROOT} is not writable (needs root)"
    return None


class CpuQuota:
    """A cgroup limiting its member processes to ``fraction`` of a core.

    Args:
        name: the cgroup's name (unique to the caller: other jobs may use cgroups).
        fraction: share of one core, e.g. 0.5 (above 1.0: several cores).
    """

    def __init__(self, name: str, fraction: float) -> None:
        reason = unavailable_reason()
        if reason:
            raise PermissionError(f"CpuQuota({name!r}): {reason}")
        if not 0.01 <= fraction <= 64:
            raise ValueError(f"CpuQuota({name!r}): fraction must be in [0.01, 64], got {fraction}")
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"CpuQuota: bad cgroup name {name!r}")
        self.path = ROOT / name
        self.fraction = fraction
        self.path.mkdir(exist_ok=True)
        (self.path / "cpu.cfs_period_us").write_text(f"{PERIOD_US}\n")
        (self.path / "cpu.cfs_quota_us").write_text(f"{int(PERIOD_US * fraction)}\n")

    def add(self, pid: int) -> None:
        """Moves process ``pid`` (all its threads) into the cgroup."""
        (self.path / "cgroup.procs").write_text(f"{pid}\n")

    def throttled_s(self) -> float:
        """Seconds the cgroup's processes were held back so far (cpu.stat)."""
        for line in (self.path / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "throttled_time":
                return int(value) / 1e9
        return 0.0

    def close(self) -> None:
        """Removes the cgroup; processes still in it go back to the root group first."""
        if not self.path.exists():
            return
        for pid in (self.path / "cgroup.procs").read_text().split():
            try:
                (ROOT / "cgroup.procs").write_text(f"{pid}\n")
            except OSError:
                pass  # exited meanwhile
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.02)  # the kernel frees an emptied cgroup shortly after its last task exits
        self.path.rmdir()

    def __enter__(self) -> "CpuQuota":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
