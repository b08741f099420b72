"""Compressed DDP still trains: same model, data and seeds, gradients through
hetcomm.ddp_hook with error feedback, against uncompressed allreduce."""
from __future__ import annotations

import os
import sys

import pytest

from harness import run_ranks

pytest.importorskip("torch")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import convergence  # noqa: E402

# The bars: final loss within 1% (int8), 3% (int4), 5% (1-bit) of uncompressed.
LIMITS = {"int8": 0.01, "int4": 0.03, "1bit": 0.05}


@pytest.mark.timeout(600)
def test_compressed_ddp_reaches_the_uncompressed_loss():
    runs = run_ranks(convergence.run_all, 2, ["none", *LIMITS], 300, timeout=500)
    summary = convergence.summarize(runs[0])
    for codec, limit in LIMITS.items():
        assert abs(summary[codec]["gap"]) <= limit, (codec, summary)
    for per_rank in runs:
        assert all(run["identical"] for run in per_rank)  # every rank holds the same weights
    # Every rank computed the same held-out losses.
    assert [r["test"] for r in runs[0]] == [r["test"] for r in runs[1]]
