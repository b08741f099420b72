"""Tests of the emulated WAN test bed (hetcomm.testbed.netns).

The netns tests need root, iproute2 and the veth/tbf kernel features; they
are skipped with the reason from ``netns.available()`` otherwise.
Run from the repository root: ``python -m pytest tests/test_netns.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness import interruptible
from hetcomm.testbed import netns
from hetcomm.testbed import probe as netns_probe

ROOT = Path(netns.__file__).resolve().parents[2]
OK, WHY = netns.available()
skip_no_netns = pytest.mark.skipif(not OK, reason=f"WAN test bed unavailable: {WHY}")


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line.strip()}


def _ours(name: str) -> set[str]:
    return {n for n in _netns_names() if n.startswith(name + "-")}


def _gone(pid: int) -> bool:
    """The process no longer exists, or is a zombie waiting for its (new) parent."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.02)
    return _gone(pid)


def _assert_no_residue(tb: netns.WanTestbed, links_before: set[str]) -> None:
    assert _ours(tb.name) == set(), "namespaces left behind"
    for ns in tb.namespaces():
        assert ns not in _netns_names()
    # Nothing was ever created in the root namespace.
    assert _root_links() == links_before
    assert not {"wan0", "s0", "s1", "s2"} & _root_links()


@pytest.fixture(scope="module", autouse=True)
def _clean_stale():
    """Remove what crashed earlier runs left (never touches live runs)."""
    if OK:
        netns.cleanup_stale("hc")
    yield


# ---------------------------------------------------------------------------
# Pure helpers (no root needed)
# ---------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_parse_units() -> None:
    assert netns.parse_rate("1gbit") == 10**9
    assert netns.parse_rate("200mbit") == 200 * 10**6
    assert netns.parse_rate("125mbps") == 10**9  # tc: bps = bytes/s
    assert netns.parse_rate(5e6) == 5 * 10**6
    assert netns.parse_size("64kb") == 65536
    assert netns.parse_size(1500) == 1500
    assert netns.parse_delay("20ms") == pytest.approx(0.02)
    for bad in ("fast", "-1mbit", "0bit"):
        with pytest.raises(ValueError):
            netns.parse_rate(bad)


@pytest.mark.timeout(10)
def test_tbf_sizing() -> None:
    p = netns.tbf_params("1gbit")
    # Burst holds a 64 KiB GSO packet plus two 4 ms ticks of tokens at 1 Gbit/s.
    assert p.burst == 65536 + 1_000_000
    assert p.limit >= p.burst + int(125e6 * 0.020)
    # A delay grows the queue to about a bandwidth-delay product.
    q = netns.tbf_params("1gbit", delay_s=0.05)
    assert q.limit >= 125e6 * 0.1
    assert netns.tbf_params("1gbit", burst="2mb", limit=5_000_000).tc_args() == [
        "tbf", "rate", "1000000000bit", "burst", str(2 << 20), "limit", "5000000"]


@pytest.mark.timeout(10)
def test_addressing_without_building() -> None:
    tb = netns.WanTestbed(sites=3, ranks_per_site=2, prefix="hcx")
    assert tb.world_size == 6
    assert [tb.rank_site(r) for r in range(6)] == [0, 0, 1, 1, 2, 2]
    assert tb.master_addr == tb.site_address(0) == "10.77.0.2"
    assert tb.rank_address(5) == "10.77.2.2"
    env = tb.rank_env(3, master_port=1234)
    assert env["RANK"] == "3" and env["WORLD_SIZE"] == "6" and env["LOCAL_RANK"] == "1"
    assert env["MASTER_ADDR"] == "10.77.0.2" and env["MASTER_PORT"] == "1234"
    assert env["HETCOMM_SITE"] == "1" and env["GLOO_SOCKET_IFNAME"] == "wan0"
    wis = tb.wan_interfaces()
    assert len(wis) == 6 and {w.side for w in wis} == {"site", "hub"}
    assert tb.name.startswith(f"hcx-{os.getpid()}-")
    with pytest.raises(netns.NetnsError):
        tb.popen(0, ["true"])  # not started


# ---------------------------------------------------------------------------
# Build / teardown
# ---------------------------------------------------------------------------


@pytest.mark.netns
@skip_no_netns
@pytest.mark.parametrize("sites", [2, 3])
@pytest.mark.timeout(60)
def test_build_and_teardown_leave_nothing(sites: int) -> None:
    links_before = _root_links()
    with netns.WanTestbed(sites=sites, ranks_per_site=1, wan_rate="100mbit") as tb:
        assert _ours(tb.name) == set(tb.namespaces())
        for wi in tb.wan_interfaces():
            qd = subprocess.run(["tc", "-n", wi.netns, "qdisc", "show", "dev", wi.ifname],
                                capture_output=True, text=True, check=True).stdout
            assert "tbf" in qd and "rate 100Mbit" in qd, qd
        # Every site reaches every site (itself over lo, the others through
        # the hub): a connect to a closed port is refused, not unreachable.
        probe = ("import errno, socket, sys; c = socket.socket(); c.settimeout(5); "
                 "sys.exit(c.connect_ex((sys.argv[1], 9)) != errno.ECONNREFUSED)")
        for s in range(sites):
            for t in range(sites):
                r = tb.run(s, [sys.executable, "-c", probe, tb.site_address(t)], timeout=20)
                assert r.returncode == 0, (s, t, r.stderr)
    _assert_no_residue(tb, links_before)


@pytest.mark.netns
@skip_no_netns
@pytest.mark.timeout(60)
def test_teardown_when_body_raises() -> None:
    links_before = _root_links()
    tb = netns.WanTestbed(sites=2, ranks_per_site=1, wan_rate="50mbit")
    with pytest.raises(RuntimeError, match="boom"):
        with tb:
            p = tb.popen(0, ["sleep", "1000"])
            raise RuntimeError("boom")
    assert _wait_gone(p.pid)
    _assert_no_residue(tb, links_before)
    assert not tb.active
    with pytest.raises(KeyboardInterrupt):
        with netns.WanTestbed(sites=2, ranks_per_site=1) as tb2:
            raise KeyboardInterrupt
    _assert_no_residue(tb2, links_before)


@pytest.mark.netns
@skip_no_netns
@pytest.mark.parametrize("exc", [netns.NetnsError("injected"), KeyboardInterrupt()])
@pytest.mark.timeout(60)
def test_setup_failing_halfway_leaves_nothing(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    links_before = _root_links()
    real_run = netns._run

    def flaky(argv, *a, **kw):  # fail when the second site's link is being set up
        if "route" in argv and any(str(x).endswith("-s1") for x in argv):
            raise exc
        return real_run(argv, *a, **kw)

    monkeypatch.setattr(netns, "_run", flaky)
    tb = netns.WanTestbed(sites=3, ranks_per_site=1)
    with pytest.raises(type(exc)):
        with tb:
            pass
    monkeypatch.setattr(netns, "_run", real_run)
    _assert_no_residue(tb, links_before)


@pytest.mark.netns
@skip_no_netns
@pytest.mark.timeout(30)
def test_delay_requires_netem() -> None:
    ok, why = netns.netem_available()
    tb = netns.WanTestbed(sites=2, ranks_per_site=1, wan_rate="100mbit", delay="5ms")
    if ok:
        with tb:
            qd = subprocess.run(["tc", "-n", tb.site_netns(0), "qdisc", "show", "dev", "wan0"],
                                capture_output=True, text=True, check=True).stdout
            assert "netem" in qd and "tbf" in qd
    else:
        with pytest.raises(netns.NetemUnavailableError, match="netem"):
            tb.start()
        assert _ours(tb.name) == set()


# ---------------------------------------------------------------------------
# Shaping
# ---------------------------------------------------------------------------


@pytest.mark.netns
@skip_no_netns
@pytest.mark.timeout(90)
def test_wan_rate_and_unshaped_same_site() -> None:
    rate = 200e6
    with netns.WanTestbed(sites=2, ranks_per_site=2, wan_rate="200mbit") as tb:
        before = tb.wan_counters()
        fwd = netns_probe.measure_link_stats(tb, 0, 1, seconds=2.0)
        back = netns_probe.measure_link(tb, 1, 0, seconds=1.5)
        local = netns_probe.measure_link(tb, 0, 0, seconds=1.0)
        after = tb.wan_counters()
    for g in (fwd.gbit_per_s, back):
        assert 0.90 * rate <= g * 1e9 <= 1.05 * rate, g
    # Same-site traffic goes over the namespace's loopback: not limited.
    assert local * 1e9 > 4 * rate, local
    # The bytes crossed site 0's uplink and the hub's egress towards site 1.
    up0 = after[0].tx_bytes - before[0].tx_bytes
    down1 = after[3].tx_bytes - before[3].tx_bytes
    assert after[0].interface.side == "site" and after[3].interface == tb.wan_interfaces()[3]
    assert up0 >= fwd.total_bytes and down1 >= fwd.total_bytes


@pytest.mark.netns
@skip_no_netns
@pytest.mark.timeout(60)
def test_three_sites_each_link_shaped() -> None:
    with netns.WanTestbed(sites=3, ranks_per_site=1, wan_rate="100mbit") as tb:
        g = netns_probe.measure_link(tb, 2, 0, seconds=1.5)
    assert 0.90e8 <= g * 1e9 <= 1.05e8, g


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------


@pytest.mark.netns
@skip_no_netns
@pytest.mark.timeout(60)
def test_processes_killed_on_teardown() -> None:
    code = textwrap.dedent("""
        import subprocess, sys, time
        a = subprocess.Popen(["sleep", "1000"])                           # same process group
        b = subprocess.Popen(["sleep", "1000"], start_new_session=True)   # escapes the group
        print(a.pid, b.pid, flush=True)
        time.sleep(1000)
    """)
    with netns.WanTestbed(sites=2, ranks_per_site=1, wan_rate="100mbit") as tb:
        p0 = tb.popen(0, ["sleep", "1000"])
        p1 = tb.popen_python(1, code, stdout=subprocess.PIPE, text=True)
        kids = [int(x) for x in p1.stdout.readline().split()]
        # Ignoring SIGTERM does not save it either.
        p2 = tb.popen_python(0, "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                "print('ready', flush=True); time.sleep(1000)", stdout=subprocess.PIPE, text=True)
        assert p2.stdout.readline().strip() == "ready"
        pids = [p0.pid, p1.pid, p2.pid, *kids]
        assert all(not _gone(p) for p in pids)
        assert set(pids) <= set(netns._netns_pids(tb.site_netns(0))) | set(netns._netns_pids(tb.site_netns(1)))
    for pid in pids:
        assert _wait_gone(pid), pid
    assert all(p.returncode is not None for p in (p0, p1, p2))


@pytest.mark.netns
@skip_no_netns
@pytest.mark.timeout(60)
def test_spawn_ranks_places_ranks_in_sites() -> None:
    code = textwrap.dedent("""
        import json, os, socket
        s = socket.socket(); s.bind((os.environ["MASTER_ADDR"] if os.environ["HETCOMM_SITE"] == "0"
                                     else "10.77.%s.2" % os.environ["HETCOMM_SITE"], 0))
        print(json.dumps({k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "HETCOMM_SITE",
                                                     "MASTER_ADDR", "MASTER_PORT", "EXTRA")}))
    """)
    with netns.WanTestbed(sites=2, ranks_per_site=2, wan_rate="100mbit") as tb:
        procs = tb.spawn_ranks(lambda r: [sys.executable, "-c", code], lambda r: {"EXTRA": f"x{r}"},
                               master_port=29999, stdout=subprocess.PIPE, text=True)
        outs = [json.loads(p.communicate(timeout=30)[0]) for p in procs]
    for r, o in enumerate(outs):
        assert o == {"RANK": str(r), "WORLD_SIZE": "4", "LOCAL_RANK": str(r % 2), "HETCOMM_SITE": str(r // 2),
                     "MASTER_ADDR": "10.77.0.2", "MASTER_PORT": "29999", "EXTRA": f"x{r}"}


def _child(code: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=interruptible)


_CHILD_BED = """
    import sys, time
    from hetcomm.testbed.netns import WanTestbed
    tb = WanTestbed(2, 1, "100mbit", prefix=sys.argv[1] if len(sys.argv) > 1 else "{prefix}").start()
    p = tb.popen(0, ["sleep", "1000"])
    print(tb.name, p.pid, flush=True)
    {tail}
"""


@pytest.mark.netns
@skip_no_netns
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
@pytest.mark.timeout(60)
def test_signal_tears_down(sig: int) -> None:
    child = _child(_CHILD_BED.format(prefix="hcsig", tail="time.sleep(1000)"))
    name, pid = child.stdout.readline().split()
    assert _ours(name)
    child.send_signal(sig)
    rc = child.wait(timeout=30)
    # SIGTERM/SIGHUP: our handler tears down and exits 128+sig. SIGINT: an
    # uncaught KeyboardInterrupt; atexit tears down, Python dies by SIGINT.
    assert rc == (-sig if sig == signal.SIGINT else 128 + sig), child.stderr.read()
    assert _ours(name) == set()
    assert _wait_gone(int(pid))


@pytest.mark.netns
@skip_no_netns
@pytest.mark.timeout(60)
def test_atexit_fallback() -> None:
    child = _child(_CHILD_BED.format(prefix="hcexit", tail="sys.exit(3)"))
    name, pid = child.stdout.readline().split()
    assert child.wait(timeout=30) == 3
    assert _ours(name) == set()
    assert _wait_gone(int(pid))


@pytest.mark.netns
@skip_no_netns
@pytest.mark.timeout(60)
def test_cleanup_stale_after_kill9() -> None:
    child = _child(_CHILD_BED.format(prefix="hcstale", tail="time.sleep(1000)"))
    name, pid = child.stdout.readline().split()
    child.kill()  # SIGKILL: no handler, no atexit
    child.wait(timeout=10)
    left = _ours(name)
    assert len(left) == 3  # hub + 2 sites survive a kill -9 ...
    assert not _gone(int(pid))  # ... and so does what ran in them
    # A live run's namespaces are never touched.
    with netns.WanTestbed(sites=2, ranks_per_site=1, prefix="hcstale") as live:
        removed = netns.cleanup_stale("hcstale")
        # (A parallel test run may have removed ours, or we theirs: only
        # namespaces of dead pids may ever be removed.)
        assert all(not netns._pid_alive(int(n.split("-")[1])) for n in removed)
        assert _ours(live.name) == set(live.namespaces())
    assert _ours(name) == set()
    assert _wait_gone(int(pid))


# ---------------------------------------------------------------------------
# A real distributed job
# ---------------------------------------------------------------------------


@pytest.mark.netns
@skip_no_netns
@pytest.mark.timeout(180)
def test_gloo_allreduce_2_sites_x_2_ranks() -> None:
    pytest.importorskip("torch")
    with netns.WanTestbed(sites=2, ranks_per_site=2, wan_rate="200mbit") as tb:
        wan_before = tb.wan_tx_bytes()
        res = netns_probe.run_gloo_allreduce(tb, nbytes=64 * 1024, iters=2, warmup=1, timeout=150)
        wan_after = tb.wan_tx_bytes()
    assert res.correct
    assert [rep["rank"] for rep in res.per_rank] == [0, 1, 2, 3]
    assert [rep["site"] for rep in res.per_rank] == [0, 0, 1, 1]
    # Rank r holds (i % 1024) * (r + 1) + r: the sum is (i % 1024) * 10 + 6.
    for rep in res.per_rank:
        assert rep["head"] == [i * 10.0 + 6.0 for i in range(8)]
    # The job really crossed the emulated WAN (3 all_reduces of 64 KiB, ring over 2 sites).
    assert wan_after - wan_before > 3 * 64 * 1024
