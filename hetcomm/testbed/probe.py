"""Measuring an emulated WAN (:class:`hetcomm.testbed.netns.WanTestbed`): raw link
throughput between two sites, and gloo's all_reduce across the bed as a baseline.

    python -m hetcomm.testbed check       # can a bed be built here?
    python -m hetcomm.testbed cleanup     # remove namespaces of crashed runs
    python -m hetcomm.testbed measure --rate 1gbit
    python -m hetcomm.testbed allreduce --rate 1gbit --mib 64
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from typing import IO, Any

from hetcomm.testbed import netns
from hetcomm.testbed.netns import NetnsError, WanTestbed, available, cleanup_stale, netem_available

logger = logging.getLogger("hetcomm.netns")

# --------------------------------------------------------------------------
# Throughput measurement
# --------------------------------------------------------------------------

_RECEIVER = r"""
import json, socket, sys, time
host, limit, omit = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, 0)); srv.listen(1); srv.settimeout(limit)
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept(); conn.settimeout(limit)
buf = bytearray(1 << 20)
n = 0; t0 = t1 = None; n_mark = t_mark = None
while True:
    k = conn.recv_into(buf)
    if not k:
        break
    now = time.perf_counter()
    if t0 is None:
        t0 = now
    if t_mark is None and now - t0 >= omit:
        n_mark, t_mark = n, now  # bytes before this recv arrived before t_mark
    n += k; t1 = now
conn.close()
if t_mark is None:  # too short to omit anything: fall back to first..last byte
    n_mark, t_mark = 0, t0
print(json.dumps({"bytes": n, "timed_bytes": n - n_mark, "seconds": (t1 - t_mark) if t0 is not None else 0.0}),
      flush=True)
"""

_SENDER = r"""
import socket, sys, time
host, port, nbytes, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.create_connection((host, port), timeout=seconds + 30)
chunk = memoryview(bytes(1 << 20))
sent = 0; deadline = time.perf_counter() + seconds
while sent < nbytes and time.perf_counter() < deadline:
    m = min(len(chunk), nbytes - sent)
    s.sendall(chunk[:m]); sent += m
s.shutdown(socket.SHUT_WR)
while s.recv(65536):
    pass
s.close()
print(sent, flush=True)
"""


@dataclasses.dataclass(frozen=True)
class LinkMeasurement:
    """Result of :func:`measure_link_stats`."""

    src_site: int
    dst_site: int
    bytes: int
    """Bytes received in the timed interval."""
    seconds: float
    """The timed interval: from ``omit`` seconds after the first byte to the last byte."""
    total_bytes: int
    """All bytes received, including the omitted start."""

    @property
    def gbit_per_s(self) -> float:
        """Throughput in Gbit/s (10^9 bit/s)."""
        return self.bytes * 8 / self.seconds / 1e9 if self.seconds > 0 else 0.0


def measure_link_stats(testbed: WanTestbed, src_site: int = 0, dst_site: int = 1,
                       seconds: float = 2.0, max_bytes: int | None = None,
                       omit: float | None = None) -> LinkMeasurement:
    """One TCP stream from ``src_site`` to ``dst_site``, bounded in bytes and time.

    The sender (in ``src_site``) sends until ``max_bytes`` are sent or
    ``seconds`` elapse; the receiver (in ``dst_site``, on the site address)
    times from ``omit`` seconds after its first byte to its last byte (like
    iperf's ``--omit``), so connection setup, slow start and the initial
    full-bucket burst of tbf (``burst`` bytes at line speed) are left out,
    while the queue draining after the sender stops is counted. ``omit``
    defaults to 10% of ``seconds`` (at most 0.5 s). ``src_site == dst_site``
    measures the unshaped same-site path. The default byte bound is 1.5x
    what the shaped rate could carry in ``seconds`` (1 GiB unshaped).

    Note: the rate is TCP goodput, while tbf counts whole Ethernet frames;
    with a 1500-byte MTU (1448 payload bytes in 1514 with TCP timestamps)
    goodput cannot exceed ~95.6% of the tbf rate.
    """
    if max_bytes is None:
        max_bytes = int(testbed.tbf.rate_bps / 8 * seconds * 1.5) if testbed.tbf else 1 << 30
    if omit is None:
        omit = min(0.5, 0.1 * seconds)
    limit = seconds + 30.0
    recv = testbed.popen_python(dst_site, _RECEIVER, [testbed.site_address(dst_site), limit, omit],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    send: subprocess.Popen[Any] | None = None
    try:
        assert recv.stdout is not None
        port_line = _readline_timeout(recv.stdout, 30.0)
        if not port_line.strip().isdigit():
            recv.kill()
            raise NetnsError(f"receiver did not start: {port_line!r} {recv.communicate()[1]!r}")
        send = testbed.popen_python(src_site, _SENDER,
                                    [testbed.site_address(dst_site), port_line.strip(), max_bytes, seconds],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        s_out, s_err = send.communicate(timeout=limit)
        r_out, r_err = recv.communicate(timeout=limit)
        if send.returncode != 0 or recv.returncode != 0:
            raise NetnsError(f"measure_link failed: sender rc={send.returncode} {s_err.strip()!r}; "
                             f"receiver rc={recv.returncode} {r_err.strip()!r}")
        stats = json.loads(r_out.strip().splitlines()[-1])
    except BaseException:
        for p in (recv, send):
            if p is not None:
                netns._kill_group(p)
        raise
    res = LinkMeasurement(src_site, dst_site, int(stats["timed_bytes"]), float(stats["seconds"]),
                          int(stats["bytes"]))
    logger.info("%s: site %d -> %d: %d bytes in %.3fs = %.3f Gbit/s", testbed.name, src_site,
                dst_site, res.bytes, res.seconds, res.gbit_per_s)
    return res


def measure_link(testbed: WanTestbed, src_site: int = 0, dst_site: int = 1,
                 seconds: float = 2.0, max_bytes: int | None = None, omit: float | None = None) -> float:
    """Single-stream TCP throughput from ``src_site`` to ``dst_site`` in Gbit/s.

    See :func:`measure_link_stats` for the method.
    """
    return measure_link_stats(testbed, src_site, dst_site, seconds, max_bytes, omit).gbit_per_s


def _readline_timeout(f: IO[str], timeout: float) -> str:
    """Read one line from a pipe, giving up after ``timeout`` seconds."""
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(f, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return f.readline()


# --------------------------------------------------------------------------
# gloo all_reduce across the bed
# --------------------------------------------------------------------------

_GLOO_WORKER = r"""
import datetime, json, os, sys, time
import torch
import torch.distributed as dist
numel, iters, warmup, tmo = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
torch.set_num_threads(1)
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=tmo))
rank, world = dist.get_rank(), dist.get_world_size()
# A known pattern: small integers, so float sums are exact in any order.
base = (torch.arange(numel, dtype=torch.int64) % 1024).to(torch.float32)
x = base * (rank + 1) + rank
expected = base * (world * (world + 1) // 2) + (world * (world - 1) // 2)
times, ok = [], True
for i in range(warmup + iters):
    y = x.clone()
    dist.barrier()
    t = time.perf_counter()
    dist.all_reduce(y)
    dt = time.perf_counter() - t
    ok = ok and bool(torch.equal(y, expected))
    if i >= warmup:
        times.append(dt)
head = y[:8].tolist()
dist.barrier()
dist.destroy_process_group()
print(json.dumps({"rank": rank, "site": int(os.environ.get("HETCOMM_SITE", -1)),
                  "ok": ok, "times": times, "head": head}), flush=True)
"""


@dataclasses.dataclass(frozen=True)
class AllreduceResult:
    """Result of :func:`run_gloo_allreduce`."""

    nbytes: int
    """Tensor size in bytes (fp32)."""
    world_size: int
    correct: bool
    """Every rank got the exact expected sum in every iteration."""
    times: list[float]
    """Per iteration, the slowest rank's all_reduce time (s)."""
    per_rank: list[dict[str, Any]]
    """Each rank's JSON report (rank, site, ok, times, head = first 8 values)."""

    @property
    def median_s(self) -> float:
        """Median iteration time (s)."""
        t = sorted(self.times)
        return t[len(t) // 2] if t else float("nan")

    @property
    def algbw_gbyte_s(self) -> float:
        """nccl-tests algbw: bytes / median time, in GB/s (10^9)."""
        return self.nbytes / self.median_s / 1e9

    @property
    def busbw_gbyte_s(self) -> float:
        """nccl-tests busbw for all_reduce: algbw * 2 (n-1) / n."""
        n = self.world_size
        return self.algbw_gbyte_s * 2 * (n - 1) / n


def run_gloo_allreduce(testbed: WanTestbed, nbytes: int = 4096, iters: int = 3, warmup: int = 1,
                       timeout: float = 120.0, master_port: int = netns.DEFAULT_MASTER_PORT) -> AllreduceResult:
    """Spawn one gloo rank per testbed rank, all_reduce a known fp32 tensor of ``nbytes``.

    Ranks rendezvous over ``env://`` at rank 0's site address and check the
    result against the exact expected sum. Needs torch in this interpreter.
    Raises :class:`NetnsError` if a rank fails or ``timeout`` expires.
    """
    numel = max(1, nbytes // 4)
    files: list[tuple[IO[bytes], IO[bytes]]] = []
    try:
        for _ in range(testbed.world_size):
            files.append((tempfile.TemporaryFile(), tempfile.TemporaryFile()))
        procs = []
        for r in range(testbed.world_size):
            out, err = files[r]
            env = testbed.rank_env(r, master_port)
            procs.append(testbed.popen(testbed.rank_site(r),
                                       [sys.executable, "-c", _GLOO_WORKER, numel, iters, warmup, timeout],
                                       env=env, stdout=out, stderr=err))
        deadline = time.monotonic() + timeout
        failed = None
        for r, p in enumerate(procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                failed = f"timed out after {timeout}s"
                break
            if p.returncode != 0:
                failed = f"rank {r} exited with {p.returncode}"
                break
        if failed:
            for p in procs:
                netns._kill_group(p)
            errs = []
            for r, (_, err) in enumerate(files):
                err.seek(0)
                tail = err.read().decode(errors="replace").strip().splitlines()[-5:]
                errs.append(f"rank {r}: " + " | ".join(tail))
            raise NetnsError(f"gloo all_reduce {failed}:\n" + "\n".join(errs))
        reports = []
        for out, _ in files:
            out.seek(0)
            reports.append(json.loads(out.read().decode().strip().splitlines()[-1]))
    finally:
        for a, b in files:
            a.close()
            b.close()
    times = [max(rep["times"][i] for rep in reports) for i in range(iters)]
    res = AllreduceResult(numel * 4, testbed.world_size, all(rep["ok"] for rep in reports), times, reports)
    logger.info("%s: gloo all_reduce %d B x%d: median %.4fs algbw %.3f GB/s correct=%s", testbed.name,
                res.nbytes, testbed.world_size, res.median_s, res.algbw_gbyte_s, res.correct)
    return res


# --------------------------------------------------------------------------
# Command line: python -m hetcomm.testbed {check,cleanup,measure,allreduce}
# --------------------------------------------------------------------------


def main(argv: Iterable[str] | None = None) -> int:
    """Small CLI: ``check`` (available?), ``cleanup`` (stale namespaces),
    ``measure`` (link throughput) and ``allreduce`` (gloo baseline)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m hetcomm.testbed", description=__doc__.split("\n")[0])
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--prefix", default="hc")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="can a test bed be built here?")
    sub.add_parser("cleanup", help="remove namespaces of dead runs")
    for name in ("measure", "allreduce"):
        p = sub.add_parser(name)
        p.add_argument("--sites", type=int, default=2)
        p.add_argument("--ranks-per-site", type=int, default=2)
        p.add_argument("--rate", default="1gbit", help="tc rate, or 'none' for unshaped")
        p.add_argument("--burst", default=None)
        p.add_argument("--limit", default=None)
        p.add_argument("--delay", default=None)
        p.add_argument("--mtu", type=int, default=1500)
        p.add_argument("--repeat", type=int, default=3)
        if name == "measure":
            p.add_argument("--seconds", type=float, default=3.0)
        else:
            p.add_argument("--mib", type=float, default=64.0)
            p.add_argument("--iters", type=int, default=5)
            p.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    out = sys.stdout.write
    if args.cmd == "check":
        ok, why = available(args.prefix)
        nok, nwhy = netem_available(args.prefix)
        out(f"testbed: {'yes' if ok else 'no'} ({why})\nnetem delay: {'yes' if nok else 'no'} ({nwhy})\n")
        return 0 if ok else 1
    if args.cmd == "cleanup":
        removed = cleanup_stale(args.prefix)
        out(f"removed {len(removed)}: {' '.join(removed)}\n")
        return 0
    rate = None if str(args.rate).lower() == "none" else args.rate
    with WanTestbed(args.sites, args.ranks_per_site, rate, args.burst, args.limit, args.delay,
                    args.prefix, args.mtu) as tb:
        out(f"{tb}\n")
        if tb.tbf:
            out(f"tbf: rate={tb.tbf.rate_bps}bit burst={tb.tbf.burst}B limit={tb.tbf.limit}B\n")
        if args.cmd == "measure":
            for _ in range(args.repeat):
                m = measure_link_stats(tb, 0, min(1, tb.sites - 1), args.seconds)
                pct = f" ({100 * m.gbit_per_s * 1e9 / tb.tbf.rate_bps:.1f}% of rate)" if tb.tbf else ""
                out(f"site 0 -> {m.dst_site}: {m.bytes} B in {m.seconds:.3f} s = {m.gbit_per_s:.4f} Gbit/s{pct}\n")
        else:
            nbytes = int(args.mib * 2**20)
            for _ in range(args.repeat):
                wan0 = tb.wan_tx_bytes()
                r = run_gloo_allreduce(tb, nbytes, args.iters, args.warmup, timeout=600.0)
                wan = (tb.wan_tx_bytes() - wan0) / (args.iters + args.warmup)
                out(f"gloo all_reduce {r.nbytes} B fp32, {tb.sites}x{tb.ranks_per_site} ranks: "
                    f"correct={r.correct} times={[round(t, 4) for t in r.times]} median={r.median_s:.4f} s "
                    f"algbw={r.algbw_gbyte_s:.4f} GB/s busbw={r.busbw_gbyte_s:.4f} GB/s "
                    f"WAN upload/op={wan / 1e6:.1f} MB\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
