"""CurveZMQ between sites: the job runs with allowed keys; an unknown key is refused on both sides."""
from __future__ import annotations

import os

import numpy as np
import pytest

from harness import run_ranks


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    from hetcomm.security import keygen

    root = tmp_path_factory.mktemp("keys")
    allow = root / "allow"
    allow.mkdir()
    for name in ("site_a", "site_b", "intruder"):
        public, _ = keygen(str(root / name), name)
        if name != "intruder":
            os.link(public, allow / f"{name}.key")
    return root


def _curve_job(rank: int, size: int, root: str, secret_of: list[str]) -> tuple:
    import hetcomm

    site = "a" if rank < size // 2 else "b"
    name = secret_of[rank]
    opts = hetcomm.Options(site=site, curve_secret=f"{root}/{name}/{name}.key_secret", curve_allow=f"{root}/allow")
    try:
        with hetcomm.Communicator(rank, size, timeout=10, options=opts) as comm:
            x = np.full(100_000, rank + 1, np.float32)
            comm.allreduce(x, codec="int8")
            assert (x == sum(range(1, size + 1))).all()
            return "ok", comm.bytes_sent_intersite
    except hetcomm.HetcommError as exc:
        return f"{type(exc).__name__}: {exc}", 0


@pytest.mark.timeout(90)
def test_curve_between_sites(keys):
    results = run_ranks(_curve_job, 4, str(keys), ["site_a", "site_a", "site_b", "site_b"], timeout=60)
    assert all(r[0] == "ok" for r in results), results
    assert all(r[1] > 0 for r in results)


@pytest.mark.timeout(90)
def test_unknown_key_is_refused_on_both_sides(keys):
    results = run_ranks(_curve_job, 2, str(keys), ["site_a", "intruder"], timeout=60)
    texts = [r[0] for r in results]
    # Rank 0 does not trust the intruder's key: its authenticator turns the
    # intruder's connection away and it says which rank had which key; the
    # intruder learns that its key was refused.
    assert texts[0].startswith("AuthError: rank 1 published CURVE key"), texts[0]
    assert "not in this rank's allow-list" in texts[0] and "refused a connection" in texts[0], texts[0]
    assert texts[1].startswith("AuthError") and "refused this rank's CURVE key" in texts[1], texts[1]
