"""Site labels from a topology file (HETCOMM_TOPOLOGY / Options.topology)."""
import os

import numpy as np
import pytest

from harness import run_ranks
from hetcomm.config import Options
from hetcomm.topology import read_topology, site_of_host

TOPOLOGY = """\
# hosts     site
bj-gpu-*    beijing   # NVIDIA
sh-npu-*    shanghai
*           elsewhere
"""


@pytest.fixture
def topo(tmp_path):
    path = tmp_path / "topology"
    path.write_text(TOPOLOGY)
    return str(path)


def test_first_matching_line_wins(topo):
    assert read_topology(topo) == [("bj-gpu-*", "beijing"), ("sh-npu-*", "shanghai"), ("*", "elsewhere")]
    assert site_of_host(topo, "bj-gpu-07") == "beijing"
    assert site_of_host(topo, "sh-npu-1") == "shanghai"
    assert site_of_host(topo, "laptop") == "elsewhere"


def test_unmatched_host_and_bad_lines_are_named(tmp_path):
    path = tmp_path / "topology"
    path.write_text("bj-* beijing\n")
    with pytest.raises(ValueError, match=r"host 'sh-1' matches no line"):
        site_of_host(path, "sh-1")
    path.write_text("bj-* beijing\nsh-* shanghai extra\n")
    with pytest.raises(ValueError, match=r"line 2: expected 'HOST_PATTERN SITE'"):
        read_topology(path)
    with pytest.raises(ValueError, match=r"topology file .*missing.*cannot read it"):
        read_topology(tmp_path / "missing")


def test_explicit_site_wins_over_the_file(topo, monkeypatch):
    monkeypatch.delenv("HETCOMM_SITE", raising=False)
    monkeypatch.setenv("HETCOMM_TOPOLOGY", topo)
    assert Options(host="bj-gpu-1").resolved().site == "beijing"
    assert Options(host="bj-gpu-1", site="here").resolved().site == "here"
    monkeypatch.setenv("HETCOMM_SITE", "env-site")
    assert Options(host="bj-gpu-1").resolved().site == "env-site"
    monkeypatch.delenv("HETCOMM_TOPOLOGY")
    monkeypatch.delenv("HETCOMM_SITE")
    assert Options(host="bj-gpu-1").resolved().site == ""


def _sites_from_file(rank: int, size: int) -> tuple:
    import hetcomm

    os.environ["HETCOMM_HOST"] = ["bj-gpu-1", "sh-npu-1", "bj-gpu-2", "sh-npu-2"][rank]
    with hetcomm.Communicator() as comm:
        x = np.full(1 << 16, rank + 1, np.float32)
        comm.allreduce(x, algo="hier")
        return comm.site_count, comm.ring_order(), float(x[0])


@pytest.mark.timeout(120)
def test_ranks_placed_by_the_file_run_hierarchically(topo):
    results = run_ranks(_sites_from_file, 4, env={"HETCOMM_TOPOLOGY": topo}, timeout=90)
    for site_count, order, value in results:
        assert site_count == 2
        assert order in ([0, 2, 1, 3], [1, 3, 0, 2])  # each site's ranks adjacent
        assert value == 10.0


def _allreduce_choice(rank: int, size: int) -> tuple:
    import logging

    import hetcomm

    seen = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("hetcomm").addHandler(handler)
    with hetcomm.Communicator(options=hetcomm.Options(site=f"dc{rank // 2}")) as comm:
        x = np.full(1 << 18, rank + 1, np.float32)  # 1 MiB: above the 64 KiB small-message threshold
        comm.allreduce(x)
        rtts = [comm.link_rtt(p) for p in range(size) if p != rank]
    choice = [m.split(": ")[-1] for m in seen if "allreduce #" in m]
    return choice, rtts, float(x[0]), float(x[-1])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("bandwidth,expected", [(None, "hierarchical"), ("100000gbit", "recursive doubling")])
def test_measured_round_trips_and_wan_bandwidth_pick_the_algorithm(bandwidth, expected):
    # A WAN holding more than the message in one trip makes the allreduce
    # latency-bound: recursive doubling. Every rank must choose the same.
    env = {"HETCOMM_LOG_LEVEL": "DEBUG", **({"HETCOMM_WAN_BANDWIDTH": bandwidth} if bandwidth else {})}
    results = run_ranks(_allreduce_choice, 4, env=env, timeout=90)
    for choice, rtts, first, last in results:
        assert choice == [expected]
        assert all(0 < t < 5 for t in rtts)
        assert first == last == 10.0
