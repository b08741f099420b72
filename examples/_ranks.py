"""Starting the ranks of an example on this machine (what torchrun would do): shared by the examples."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Callable


def run_local_ranks(script: str, argv: list[str], world_size: int,
                    env_for_rank: Callable[[int], dict[str, str]] = lambda rank: {}) -> int:
    """Run ``world_size`` copies of ``script`` with env:// variables set; return the worst exit status."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   **env_for_rank(rank))
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(script), *argv], env=env))
    return max(p.wait() for p in procs)
