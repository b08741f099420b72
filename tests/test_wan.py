"""hetcomm on the emulated WAN: 2 sites x 2 ranks in network namespaces joined
by tbf-limited links (hetcomm.testbed.netns). Needs root; skipped otherwise."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap
import time

import pytest

from hetcomm.testbed import netns

pytestmark = [pytest.mark.netns]

ok, why = netns.available()
if not ok:
    pytest.skip(f"network namespaces unavailable: {why}", allow_module_level=True)

RANK = os.path.join(os.path.dirname(__file__), "wan_rank.py")


def run_job(bed: netns.WanTestbed, case: str, tmp_path, env=None, timeout: float = 90) -> list[dict]:
    """Runs tests/wan_rank.py CASE on every rank; ``env`` is a dict or a function of the rank."""
    tag = secrets.token_hex(3)
    outs = [tmp_path / f"{case}-{tag}-{r}.json" for r in range(bed.world_size)]
    env_for = env if callable(env) else (lambda r: env or {})
    procs = bed.spawn_ranks(lambda r: [sys.executable, RANK, case, str(outs[r])], env_for,
                            master_port=29000 + secrets.randbelow(900), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    logs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            bed.kill_processes()
            raise AssertionError(f"{case}: ranks did not finish within {timeout} s")
        logs.append(out.decode(errors="replace"))
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r][-3000:]}"
    return [json.loads(o.read_text()) for o in outs]


@pytest.mark.timeout(180)
def test_hierarchical_equals_flat_ring_and_halves_wan_bytes(tmp_path):
    with netns.WanTestbed(sites=2, ranks_per_site=2, wan_rate="400mbit") as bed:
        res = run_job(bed, "algos", tmp_path, {"WAN_COUNT": str(2 << 20)})
    for r in res:
        assert r["sites"] == 2 and r["order"] == [0, 1, 2, 3]
        assert r["hier"]["exact"] and r["ring"]["exact"]
    assert len({r["hier"]["digest"] for r in res} | {r["ring"]["digest"] for r in res}) == 1
    # Flat ring: the two ranks at site borders each send 2(n-1)/n = 1.5x the
    # tensor across; hierarchical: every rank sends its shard (1/2) across, so
    # each site sends the tensor once instead of 1.5 times.
    tensor = 4 * (2 << 20)
    flat = sum(r["ring"]["intersite"] for r in res)
    hier = sum(r["hier"]["intersite"] for r in res)
    assert abs(flat - 2 * 1.5 * tensor) < 0.01 * tensor, flat
    assert abs(hier - 2 * 1.0 * tensor) < 0.01 * tensor, hier


@pytest.mark.timeout(180)
def test_compressed_hierarchical_is_identical_and_within_bound(tmp_path):
    with netns.WanTestbed(sites=2, ranks_per_site=2, wan_rate="400mbit") as bed:
        res = run_job(bed, "codec", tmp_path, {"WAN_COUNT": str(1 << 20)})
    assert all(r["within_bound"] for r in res)
    assert len({r["digest"] for r in res}) == 1


CAPTURE = textwrap.dedent("""
    import json, socket, sys, time
    ifname, marker, stop = sys.argv[1], bytes.fromhex(sys.argv[2]), sys.argv[3]
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(3))
    s.bind((ifname, 0))
    s.settimeout(0.2)
    print("ready", flush=True)
    seen = hits = 0
    deadline = time.time() + 120
    import os
    while not os.path.exists(stop) and time.time() < deadline:
        try:
            pkt = s.recv(65536)
        except socket.timeout:
            continue
        seen += len(pkt)
        hits += marker in pkt
    print(json.dumps({"bytes": seen, "hits": hits}))
""")


def capture_while(bed, tmp_path, marker: bytes, job) -> dict:
    stop = tmp_path / f"stop-{secrets.token_hex(4)}"
    wan = next(i for i in bed.wan_interfaces() if i.netns == bed.site_netns(0))
    cap = subprocess.Popen(["ip", "netns", "exec", wan.netns, sys.executable, "-c", CAPTURE, wan.ifname,
                            marker.hex(), str(stop)], stdout=subprocess.PIPE)
    assert cap.stdout.readline().strip() == b"ready"  # capturing before the job starts
    try:
        job()
    finally:
        stop.touch()
        out, _ = cap.communicate(timeout=10)
    return json.loads(out)


@pytest.mark.timeout(240)
def test_curve_leaves_no_plaintext_on_the_wan(tmp_path):
    from hetcomm.security import keygen

    allow = tmp_path / "allow"
    allow.mkdir()
    for site in ("s0", "s1"):
        public, _ = keygen(str(tmp_path / site), site)
        os.link(public, allow / f"{site}.key")
    marker = secrets.token_bytes(16)
    env = {"WAN_COUNT": str(1 << 20), "WAN_MARKER": marker.hex()}
    with netns.WanTestbed(sites=2, ranks_per_site=2, wan_rate="400mbit") as bed:
        plain = capture_while(bed, tmp_path, marker, lambda: run_job(bed, "curve", tmp_path, env))
        secret = lambda r: str(tmp_path / f"s{r // 2}" / f"s{r // 2}.key_secret")
        secure_env = lambda r: dict(env, WAN_CURVE_ALLOW=str(allow), WAN_CURVE_SECRET=secret(r))
        results = []
        secure = capture_while(bed, tmp_path, marker, lambda: results.extend(run_job(bed, "curve", tmp_path, secure_env)))
    # The control run proves the capture sees tensor bytes on this link (a
    # raw socket may miss some packets under load, hence no exact count).
    assert plain["hits"] > 0 and plain["bytes"] > 256 << 10, plain
    assert len(results) == 4 and all(r["ok"] for r in results)
    assert secure["bytes"] > 256 << 10 and secure["hits"] == 0, secure
