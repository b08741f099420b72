"""examples/diloco.py runs at small size: 2 sites x 2 ranks on loopback."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("torch")

from torch_ranks import free_port  # noqa: E402

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "diloco.py")


@pytest.mark.timeout(240)
def test_diloco_example_trains():
    port = str(free_port())
    procs = []
    try:
        for r in range(4):
            env = {**os.environ, "HETCOMM_SITE": f"dc{r // 2}", "RANK": str(r), "WORLD_SIZE": "4",
                   "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
            procs.append(subprocess.Popen([sys.executable, EXAMPLE, "--steps", "48"], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs = [p.communicate(timeout=200)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), outs
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", outs[0])]
    assert len(losses) >= 3 and losses[-1] < 0.8 * losses[0], outs[0]
    assert "done: 7 outer steps" in outs[0], outs[0]
