"""``hetcomm doctor``: host checks, and the link test between --serve and --peer (loopback, netns)."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hetcomm.config import Options, parse_duration, parse_rate
from hetcomm.doctor import LinkReport, check_keys, check_socket_buffers, format_rate, parse_peer

ROOT = Path(__file__).resolve().parent.parent
CLEAN = {k: "" for k in ("HETCOMM_SITE", "HETCOMM_TOPOLOGY", "HETCOMM_WAN_BANDWIDTH", "HETCOMM_WAN_RTT",
                         "HETCOMM_SOCKET_BUFFER", "HETCOMM_STREAMS", "HETCOMM_CURVE", "HETCOMM_CURVE_SECRET",
                         "HETCOMM_CURVE_ALLOW")}


def env(**extra: str) -> dict[str, str]:
    pp = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    return {**os.environ, **CLEAN, "PYTHONPATH": pp, **extra}


def hetcomm(*args: str, timeout: float = 120, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hetcomm.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env(**extra))


def start_server(prefix: list[str] | None = None, bind: str = "127.0.0.1") -> tuple[subprocess.Popen, int]:
    """``hetcomm doctor --serve`` on a free port (optionally inside a namespace); returns it and its port."""
    proc = subprocess.Popen([*(prefix or []), sys.executable, "-m", "hetcomm.cli", "doctor", "--serve",
                             "--port", "0", "--bind", bind], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env())
    line = proc.stdout.readline()
    m = re.search(r"serving link tests on \S+:(\d+)", line)
    if not m:
        proc.kill()
        raise AssertionError(f"no port announced: {line!r} {proc.stderr.read()}")
    return proc, int(m.group(1))


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- units


@pytest.mark.timeout(30)
def test_socket_buffers_against_the_bandwidth_delay_product():
    small = {"net.core.rmem_max": 4 << 20, "net.core.wmem_max": 4 << 20,
             "net.ipv4.tcp_rmem": 6 << 20, "net.ipv4.tcp_wmem": 4 << 20}
    # both WAN variables: hetcomm sets the buffers itself, net.core.*mem_max caps them
    opts = Options(wan_bandwidth="10gbit", wan_rtt="40ms", streams=4).resolved()
    found = check_socket_buffers(opts, limits=small)
    need = int(2 * 10e9 / 8 * 0.040 / 4)
    assert opts.socket_buffer == need
    assert found[-1].level == "warn" and f"sysctl -w net.core.rmem_max={need} net.core.wmem_max={need}" \
        in found[-1].text
    # bandwidth alone: autotuning with the assumed round trip, limited by tcp_[rw]mem
    opts = Options(wan_bandwidth="100mbit", streams=4).resolved()
    found = check_socket_buffers(opts, limits=small)
    assert "assumed" in found[0].text and found[-1].level == "ok"
    found = check_socket_buffers(Options(wan_bandwidth="1gbit", streams=1).resolved(), limits=small)
    assert found[-1].level == "warn" and "net.ipv4.tcp_rmem='4096 131072" in found[-1].text
    # measured figures stand in for unset variables
    found = check_socket_buffers(Options(streams=2).resolved(), rtt="100ms", bandwidth="1gbit", limits=small)
    assert "(measured)" in found[0].text and found[-1].level == "warn"
    assert check_socket_buffers(Options().resolved(), limits=small)[0].level == "info"


@pytest.mark.timeout(30)
def test_keys_checked(tmp_path):
    from hetcomm.security import keygen

    keygen(str(tmp_path / "a"), "a")
    keygen(str(tmp_path / "b"), "b")
    allow = tmp_path / "allow"
    allow.mkdir()
    (allow / "a.key").write_text((tmp_path / "a" / "a.key").read_text())
    ok = check_keys(Options(curve_secret=str(tmp_path / "a" / "a.key_secret"), curve_allow=str(allow)))
    assert [f.level for f in ok] == ["ok", "ok"] and "1 public key(s)" in ok[1].text
    stranger = check_keys(Options(curve_secret=str(tmp_path / "b" / "b.key_secret"), curve_allow=str(allow)))
    assert stranger[-1].level == "warn" and "not in" in stranger[-1].text
    os.chmod(tmp_path / "a" / "a.key_secret", 0o644)
    loose = check_keys(Options(curve_secret=str(tmp_path / "a" / "a.key_secret"), curve_allow=str(allow)))
    assert loose[0].level == "warn" and "chmod 600" in loose[0].text
    missing = check_keys(Options(curve_secret=str(tmp_path / "nope"), curve_allow=str(tmp_path / "none")))
    assert [f.level for f in missing] == ["fail", "fail"]
    assert check_keys(Options())[0].level == "info"


@pytest.mark.timeout(30)
def test_peer_parsing_and_suggestions():
    assert parse_peer("dc2-gw") == ("dc2-gw", 29556)
    assert parse_peer("10.0.0.2:4000") == ("10.0.0.2", 4000)
    assert parse_peer("[::1]:4000") == ("::1", 4000)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_peer("h:99999")
    assert format_rate(117.5e6) == "940mbit" and format_rate(1.25e9) == "10gbit"
    rep = LinkReport("h", 1, 0.0401, {1: 50e6, 2: 85e6, 4: 100e6, 8: 101e6})
    assert rep.suggestions() == {"HETCOMM_STREAMS": "4", "HETCOMM_WAN_BANDWIDTH": "808mbit",
                                 "HETCOMM_WAN_RTT": "40.1ms"}
    s = rep.suggestions()  # every suggestion parses back as hetcomm reads it
    opts = Options(streams=int(s["HETCOMM_STREAMS"]), wan_bandwidth=s["HETCOMM_WAN_BANDWIDTH"],
                   wan_rtt=s["HETCOMM_WAN_RTT"]).resolved()
    assert opts.socket_buffer == pytest.approx(2 * 101e6 * 0.0401 / 4, abs=2)


# ---------------------------------------------------------------- the command


@pytest.mark.timeout(120)
def test_doctor_on_this_host(tmp_path):
    topo = tmp_path / "topology"
    topo.write_text("bj-* beijing\n")
    p = hetcomm("doctor", "--no-torch", HETCOMM_TOPOLOGY=str(topo), HETCOMM_HOST="bj-gpu-1",
                HETCOMM_WAN_BANDWIDTH="10gbit", HETCOMM_WAN_RTT="40ms")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "[  ok] site: host bj-gpu-1 is in site 'beijing' (from topology file" in p.stdout
    assert "10gbit x 40ms (HETCOMM_WAN_RTT)" in p.stdout
    assert "[info] keys: no CURVE keys configured" in p.stdout
    assert p.stdout.rstrip().splitlines()[-1].startswith("doctor: 0 problem(s)")
    bad = hetcomm("doctor", "--no-torch", HETCOMM_CURVE_SECRET=str(tmp_path / "missing.key_secret"),
                  HETCOMM_CURVE_ALLOW=str(tmp_path))
    assert bad.returncode == 1 and "[fail] keys: HETCOMM_CURVE_SECRET" in bad.stdout
    unreachable = hetcomm("doctor", "--no-torch", "--peer", "127.0.0.1:1", "--seconds", "0.2")
    assert unreachable.returncode == 1 and "is `hetcomm doctor --serve` running there" in unreachable.stdout


@pytest.mark.timeout(120)
def test_doctor_torch_shim_check():
    pytest.importorskip("torch")
    p = hetcomm("doctor", timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert re.search(r"\[  ok\] torch: shim for torch \S+ ready", p.stdout), p.stdout


@pytest.mark.timeout(120)
def test_serve_and_peer_over_loopback():
    server, port = start_server()
    try:
        with socket.create_connection(("127.0.0.1", port)) as junk:  # garbage on the port is dropped
            junk.sendall(b"GET / HTTP/1.0\r\n\r\n")
        p = hetcomm("doctor", "--no-torch", "--peer", f"127.0.0.1:{port}", "--seconds", "0.3",
                    HETCOMM_SITE="a")
        assert p.returncode == 0, p.stdout + p.stderr
        link = re.search(r"\[  ok\] link: 127.0.0.1:\d+ round trip ([\d.]+)(us|ms); throughput by TCP streams "
                         r"1: (\S+), 2: (\S+), 4: (\S+), 8: (\S+)", p.stdout)
        assert link, p.stdout
        rtt = parse_duration(link.group(1) + link.group(2))
        assert 0 < rtt < 0.05
        rates = [parse_rate(r.rstrip(",")) for r in link.groups()[2:]]
        assert all(r > 10e6 for r in rates)  # loopback carries far more than 80 Mbit/s
        suggest = re.search(r"export HETCOMM_STREAMS=(\d) HETCOMM_WAN_BANDWIDTH=(\S+) HETCOMM_WAN_RTT=(\S+)",
                            p.stdout)
        assert suggest and int(suggest.group(1)) in (1, 2, 4, 8)
        assert parse_rate(suggest.group(2)) == pytest.approx(max(rates), rel=0.02)
        assert "(measured)" in p.stdout  # the buffer check used the measured link
        assert server.poll() is None
    finally:
        stop(server)
    assert "did not speak the doctor's protocol" in server.stderr.read()


@pytest.mark.netns
@pytest.mark.timeout(180)
def test_peer_measures_a_shaped_link_in_the_testbed():
    from hetcomm.testbed import netns

    ok, why = netns.available()
    if not ok:
        pytest.skip(f"WAN test bed unavailable: {why}")
    rate = 100e6 / 8
    with netns.WanTestbed(sites=2, ranks_per_site=1, wan_rate="100mbit", prefix="hcdoc") as bed:
        server, port = start_server(bed.exec_prefix(1), bind=bed.site_address(1))
        try:
            p = bed.run(0, [sys.executable, "-m", "hetcomm.cli", "doctor", "--no-torch", "--peer",
                            f"{bed.site_address(1)}:{port}", "--seconds", "1.5"], env=env(), timeout=120,
                        text=True)
        finally:
            stop(server)
    assert p.returncode == 0, p.stdout + p.stderr
    bw = re.search(r"HETCOMM_WAN_BANDWIDTH=(\S+)", p.stdout)
    assert bw, p.stdout
    # tbf counts Ethernet frames: TCP goodput tops out near 95.6 % of the rate
    assert 0.8 * rate <= parse_rate(bw.group(1)) <= 1.0 * rate, p.stdout


@pytest.mark.timeout(60)
def test_a_shim_that_does_not_build_is_a_failure(monkeypatch):
    pytest.importorskip("torch")
    from hetcomm import doctor
    from hetcomm.torch import _build

    def broken():
        raise RuntimeError("Error building extension 'hetcomm_torch':\nbackend.cpp:12: error: no member named 'x'")

    monkeypatch.setattr(_build, "load", broken)
    found = doctor.check_torch_shim()
    assert found.level == "fail" and "RuntimeError: backend.cpp:12: error: no member named 'x'" in found.text
