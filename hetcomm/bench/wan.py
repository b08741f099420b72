"""Ranks of hetcomm-bench on the emulated WAN: ``--sites N --wan-rate R``.

Adapts :class:`hetcomm.testbed.netns.WanTestbed` to the bench's Launcher: rank r
runs in site r // (world_size / N), rendezvous is on rank 0's site address,
and ranks get HETCOMM_SITE (so hetcomm knows the topology) and
GLOO_SOCKET_IFNAME (so gloo binds the site's WAN interface).
"""
from __future__ import annotations

import secrets
import subprocess
from typing import Any

from .launcher import Launcher, LauncherUnavailable
from hetcomm.testbed.netns import WanTestbed, available


class WanLauncher(Launcher):
    """Starts each rank inside its site's network namespace."""

    def __init__(self, sites: int, wan_rate: str | None, world_size: int) -> None:
        ok, why = available()
        if not ok:
            raise LauncherUnavailable(f"--sites/--wan-rate: network namespaces unavailable here: {why}")
        if world_size % sites:
            raise LauncherUnavailable(f"--sites {sites} must divide the world size {world_size}")
        self.bed = WanTestbed(sites=sites, ranks_per_site=world_size // sites, wan_rate=wan_rate).start()
        self.port = 20000 + secrets.randbelow(20000)
        self.description = (f"{sites} sites x {world_size // sites} ranks in network namespaces, "
                            f"WAN {wan_rate or 'unshaped'} per direction (tbf)")

    def rendezvous(self, world_size: int) -> tuple[str, int]:
        self.port += 1
        return self.bed.master_addr, self.port

    def rank_env(self, rank: int, world_size: int) -> dict[str, str]:
        env = self.bed.rank_env(rank, self.port)
        for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
            env.pop(name, None)  # the bench sets these itself
        return env

    def spawn(self, rank: int, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        return self.bed.popen(self.bed.rank_site(rank), argv, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "sites": self.bed.sites, "ranks_per_site": self.bed.ranks_per_site,
                "wan_rate_bps": self.bed.tbf.rate_bps if self.bed.tbf else None}

    def close(self) -> None:
        self.bed.close()
