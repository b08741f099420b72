"""bench/wan_training.py end to end at small size: 2 emulated sites x 2 ranks (root, netns)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
from hetcomm.testbed.netns import available  # noqa: E402

OK, WHY = available("hctrain")
BENCH = os.path.join(os.path.dirname(__file__), "..", "bench", "wan_training.py")


@pytest.mark.slow
@pytest.mark.skipif(not OK, reason=f"WAN test bed unavailable: {WHY}")
@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["ddp", "diloco", "fsdp"])
def test_bench_prints_the_runs_json_line(mode):
    out = subprocess.run([sys.executable, BENCH, "--rate", "1gbit", "--params", "300K", "--steps", "6",
                          "--mode", mode, "--codec", "int8", "--compare", "gloo", "--inner-steps", "2",
                          "--fragments", "2"], capture_output=True, text=True, timeout=540)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = json.loads(out.stdout.strip().splitlines()[-1])["runs"]
    assert [(r["backend"], r["mode"]) for r in runs] == [("gloo", "ddp"), ("hetcomm", mode)]
    for r in runs:
        assert {"name", "backend", "mode", "codec", "step_s", "final_loss", "wan_bytes", "samples"} <= set(r)
        assert r["samples"] == 6 * 32 * 4 and r["step_s"] > 0
        assert r["wan_bytes"] > r["wan_bytes_train"] > 0  # counted on the links, start-up included in the first
    if mode != "fsdp":  # FSDP's per-layer shards of this small model are below the codec's minimum size
        assert runs[1]["wan_bytes_train"] < runs[0]["wan_bytes_train"]  # compressed (and, for DiLoCo, rarer)
    assert abs(runs[1]["final_loss"] - runs[0]["final_loss"]) < 0.05 * runs[0]["final_loss"]
