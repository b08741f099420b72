"""``hetcomm doctor``: is this host ready for a job across sites, and what does the link to another site give?

Checks, each a :class:`Finding`:

* the site this host resolves to (``HETCOMM_SITE`` / ``HETCOMM_TOPOLOGY``);
* kernel socket-buffer limits against the bandwidth-delay product of the WAN
  (``HETCOMM_WAN_BANDWIDTH`` x ``HETCOMM_WAN_RTT``, or the measured round trip);
* the CURVE keys (``HETCOMM_CURVE_SECRET``, ``HETCOMM_CURVE_ALLOW``);
* whether the torch shim builds against the installed torch.

With ``--peer HOST[:PORT]`` (and ``hetcomm doctor --serve`` on HOST) it
measures the link: the round trip, and the throughput of 1, 2, 4 and 8 parallel
TCP streams, then suggests ``HETCOMM_STREAMS``, ``HETCOMM_WAN_BANDWIDTH`` and
``HETCOMM_WAN_RTT``. The measurement uses plain TCP sockets, not a hetcomm
communicator: it needs no rendezvous, store or keys (so it works on a host
whose configuration is still wrong), and it shows what the path itself carries
per stream, which is the ceiling hetcomm's striped streams work against and
what the stream count must be chosen for.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import stat
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .config import Options, bdp_buffer, parse_duration, parse_rate

log = logging.getLogger("hetcomm.doctor")

DEFAULT_PORT = 29556
#: round trip the buffer check assumes when none is configured or measured (a cross-country link)
ASSUMED_RTT = "50ms"
STREAM_COUNTS = (1, 2, 4, 8)
#: fewest streams reaching this share of the best throughput is the suggestion
ENOUGH_OF_BEST = 0.9
_HELLO_LIMIT = 1024
_BLOCK = 1 << 20


@dataclass
class Finding:
    """One result of the doctor: ``level`` is ``ok``, ``warn``, ``fail`` or ``info``."""

    level: str
    topic: str
    text: str

    def __str__(self) -> str:
        return f"[{self.level:>4}] {self.topic}: {self.text}"


# ---------------------------------------------------------------- host checks


def check_site(opts: Options) -> Finding:
    """The host name and the site it resolves to."""
    host = opts.host or socket.gethostname()
    if not opts.site:
        return Finding("warn", "site", f"host {host} has no site label: every rank without one is in a single "
                                       "site; set HETCOMM_SITE or HETCOMM_TOPOLOGY for a job across sites")
    source = "HETCOMM_SITE" if os.environ.get("HETCOMM_SITE") else f"topology file {opts.topology}"
    return Finding("ok", "site", f"host {host} is in site {opts.site!r} (from {source})")


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


def kernel_buffer_limits(proc: str = "/proc/sys/net") -> dict[str, int | None]:
    """``net.core.[rw]mem_max`` and the maxima of ``net.ipv4.tcp_[rw]mem`` in bytes (None: unreadable)."""
    return {"net.core.rmem_max": _read_int(f"{proc}/core/rmem_max"),
            "net.core.wmem_max": _read_int(f"{proc}/core/wmem_max"),
            "net.ipv4.tcp_rmem": _read_int(f"{proc}/ipv4/tcp_rmem"),
            "net.ipv4.tcp_wmem": _read_int(f"{proc}/ipv4/tcp_wmem")}


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def check_socket_buffers(opts: Options, rtt: str | None = None, bandwidth: str | None = None,
                         limits: dict[str, int | None] | None = None) -> list[Finding]:
    """Kernel limits against what one WAN stream needs in flight.

    ``bandwidth``/``rtt`` (e.g. measured by :func:`measure_link`) stand in
    for ``HETCOMM_WAN_BANDWIDTH``/``HETCOMM_WAN_RTT`` when those are unset.
    With explicit buffers (``HETCOMM_SOCKET_BUFFER``, or both WAN variables set)
    the kernel caps them at ``net.core.[rw]mem_max``; otherwise TCP autotunes up
    to the third field of ``net.ipv4.tcp_[rw]mem``.
    """
    limits = limits if limits is not None else kernel_buffer_limits()
    bw = opts.wan_bandwidth or bandwidth
    if not bw:
        known = ", ".join(f"{k} = {_mib(v)}" for k, v in limits.items() if v is not None)
        return [Finding("info", "socket buffers", "HETCOMM_WAN_BANDWIDTH is not set and no link was measured: "
                                                  f"nothing to size buffers against (set it, or run --peer); "
                                                  f"{known or 'kernel limits unreadable'}")]
    rtt_text = opts.wan_rtt or rtt or ASSUMED_RTT
    rtt_why = ("HETCOMM_WAN_RTT" if opts.wan_rtt else "measured" if rtt else
               "assumed; set HETCOMM_WAN_RTT or measure with --peer")
    need = bdp_buffer(bw, rtt_text, opts.streams)
    bdp = int(parse_rate(bw) * parse_duration(rtt_text))
    head = (f"{bw} x {rtt_text} ({rtt_why}) = {_mib(bdp)} in flight, over {opts.streams} streams: "
            f"{_mib(need)} per socket (2 x its share)")
    explicit = bool(opts.socket_buffer)
    keys = ("net.core.rmem_max", "net.core.wmem_max") if explicit else ("net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem")
    mode = (f"hetcomm sets SO_SNDBUF/SO_RCVBUF to {_mib(opts.socket_buffer)}, capped by net.core.[rw]mem_max"
            if explicit else "buffers left to TCP autotuning, capped by the 3rd field of net.ipv4.tcp_[rw]mem")
    wanted = opts.socket_buffer if explicit else need
    short = [k for k in keys if limits.get(k) is not None and limits[k] < wanted]
    unknown = [k for k in keys if limits.get(k) is None]
    found = [Finding("info", "socket buffers", f"{head}; {mode}")]
    if short:
        fix = (" ".join(f"{k}={wanted}" for k in short) if explicit else
               " ".join(f"{k}='4096 131072 {wanted}'" for k in short))
        got = ", ".join(f"{k} = {_mib(limits[k])}" for k in short)
        found.append(Finding("warn", "socket buffers", f"{got}: below {_mib(wanted)}, one stream cannot fill "
                                                       f"the link; raise with: sysctl -w {fix}"))
    elif unknown:
        found.append(Finding("warn", "socket buffers", f"cannot read {', '.join(unknown)} (not Linux?)"))
    else:
        found.append(Finding("ok", "socket buffers", ", ".join(f"{k} = {_mib(limits[k])}" for k in keys)
                             + f" >= {_mib(wanted)}"))
    return found


def check_keys(opts: Options) -> list[Finding]:
    """The CURVE secret and allow-list: present, readable, private, and this host's key allowed."""
    from .security import load_allow_list, load_secret

    if not opts.curve_secret and not opts.curve_allow:
        return [Finding("info", "keys", "no CURVE keys configured: links between sites are not encrypted "
                                        "(hetcomm keygen DIR; then HETCOMM_CURVE_SECRET and HETCOMM_CURVE_ALLOW)")]
    found: list[Finding] = []
    public = None
    if not opts.curve_secret:
        found.append(Finding("fail", "keys", "HETCOMM_CURVE_ALLOW is set but HETCOMM_CURVE_SECRET is not"))
    else:
        try:
            public, _ = load_secret(opts.curve_secret)
            mode = stat.S_IMODE(os.stat(opts.curve_secret).st_mode)
            if mode & 0o077:
                found.append(Finding("warn", "keys", f"{opts.curve_secret} is readable by others (mode {mode:o}): "
                                                     f"chmod 600 it"))
            else:
                found.append(Finding("ok", "keys", f"secret key {opts.curve_secret} readable, mode {mode:o}"))
        except (OSError, ValueError) as exc:
            found.append(Finding("fail", "keys", f"HETCOMM_CURVE_SECRET: {exc}"))
    if not opts.curve_allow:
        found.append(Finding("fail", "keys", "HETCOMM_CURVE_SECRET is set but HETCOMM_CURVE_ALLOW is not"))
    else:
        try:
            allow = load_allow_list(opts.curve_allow)
            found.append(Finding("ok", "keys", f"allow-list {opts.curve_allow}: {len(allow)} public key(s)"))
            if public is not None and public not in allow:
                found.append(Finding("warn", "keys", f"this host's public key is not in {opts.curve_allow}: "
                                                     "peers with the same allow-list will refuse it"))
        except (OSError, ValueError) as exc:
            found.append(Finding("fail", "keys", f"HETCOMM_CURVE_ALLOW: {exc}"))
    return found


def check_torch_shim() -> Finding:
    """Whether the torch backend's C++ shim builds (or loads from its cache) here."""
    try:
        import torch
    except ImportError:
        return Finding("info", "torch", "torch is not installed: Communicator and C ABI only")
    from .torch import _build

    t0 = time.monotonic()
    try:
        _build.load()
    except Exception as exc:  # a compiler error surfaces as many types
        last_line = (str(exc).strip().splitlines() or [""])[-1]  # compiler output ends with the cause
        return Finding("fail", "torch", f"the shim does not build against torch {torch.__version__}: "
                                        f"{type(exc).__name__}: {last_line}")
    return Finding("ok", "torch", f"shim for torch {torch.__version__} ready in {time.monotonic() - t0:.1f} s "
                                  f"({_build.cache_root()})")


# ---------------------------------------------------------------- the link


def _recv_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        piece = conn.recv(1)
        if not piece:
            break
        data += piece
        if len(data) > _HELLO_LIMIT:
            raise ValueError("request line too long")
    return data


def _handle(conn: socket.socket, peer: str, timeout: float) -> None:
    """One client connection: ``{"mode": "echo"}`` echoes, ``{"mode": "sink"}`` counts until EOF."""
    with conn:
        conn.settimeout(timeout)
        try:
            hello = json.loads(_recv_line(conn) or b"null")
            mode = hello.get("mode") if isinstance(hello, dict) else None
        except (ValueError, OSError):
            mode = None
        if mode == "echo":
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                data = conn.recv(64)
                if not data:
                    return
                conn.sendall(data)
        elif mode == "sink":
            buf = bytearray(_BLOCK)
            n, first, last = 0, None, None
            while True:
                k = conn.recv_into(buf)
                if not k:
                    break
                last = time.perf_counter()
                if first is None:
                    first = last
                else:
                    n += k  # bytes after the first read, timed from it
            secs = (last - first) if first is not None and last is not None else 0.0
            conn.sendall(json.dumps({"bytes": n, "seconds": secs}).encode() + b"\n")
        else:
            log.warning("doctor --serve: dropped a connection from %s that did not speak the doctor's protocol",
                        peer)


class DoctorServer:
    """The other end of ``hetcomm doctor --peer``: one thread per connection.

    ``serve_forever`` blocks in ``accept``; :meth:`close` (from another thread
    or a signal handler) ends it.
    """

    def __init__(self, bind: str = "0.0.0.0", port: int = DEFAULT_PORT, timeout: float = 60.0):
        self.sock = socket.create_server((bind, port))
        self.port: int = self.sock.getsockname()[1]
        self.timeout = timeout

    def serve_forever(self) -> None:
        """Answer link tests until :meth:`close`."""
        while True:
            try:
                conn, addr = self.sock.accept()
            except OSError:  # closed
                return
            threading.Thread(target=_handle, args=(conn, f"{addr[0]}:{addr[1]}", self.timeout), daemon=True,
                             name="hetcomm-doctor-conn").start()

    def close(self) -> None:
        """Stop accepting (connections in progress finish on their own threads)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _connect(host: str, port: int, mode: str, timeout: float) -> socket.socket:
    s = socket.create_connection((host, port), timeout=timeout)
    s.sendall(json.dumps({"mode": mode}).encode() + b"\n")
    return s


def measure_rtt(host: str, port: int, rounds: int = 50, timeout: float = 10.0) -> float:
    """Median seconds of a 1-byte TCP round trip to the doctor server."""
    with _connect(host, port, "echo", timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            s.sendall(b"x")
            if not s.recv(64):
                raise ConnectionError(f"{host}:{port} closed the connection during the round-trip test")
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_throughput(host: str, port: int, streams: int, seconds: float, timeout: float = 30.0) -> float:
    """Bytes per second the server received over ``streams`` parallel TCP connections for ``seconds``."""
    socks = [_connect(host, port, "sink", timeout) for _ in range(streams)]
    block = memoryview(bytes(_BLOCK))
    results: list[dict] = [{} for _ in socks]
    errors: list[BaseException] = []

    def pump(i: int, s: socket.socket) -> None:
        try:
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                s.sendall(block)
            s.shutdown(socket.SHUT_WR)
            results[i] = json.loads(_recv_line(s) or b"{}")
        except (OSError, ValueError) as exc:
            errors.append(exc)

    threads = [threading.Thread(target=pump, args=(i, s), daemon=True) for i, s in enumerate(socks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in socks:
        s.close()
    if errors or not all(r.get("seconds") for r in results):
        raise ConnectionError(f"throughput test to {host}:{port} with {streams} stream(s) failed: "
                              f"{errors[0] if errors else 'the server reported nothing'}")
    return sum(r["bytes"] for r in results) / max(r["seconds"] for r in results)


@dataclass
class LinkReport:
    """What :func:`measure_link` found: round trip and throughput per stream count."""

    host: str
    port: int
    rtt_s: float
    rate_Bps: dict[int, float] = field(default_factory=dict)

    def best_streams(self) -> int:
        """Fewest streams reaching :data:`ENOUGH_OF_BEST` of the best throughput."""
        best = max(self.rate_Bps.values())
        return min(k for k, r in self.rate_Bps.items() if r >= ENOUGH_OF_BEST * best)

    def suggestions(self) -> dict[str, str]:
        """``HETCOMM_*`` settings for this link."""
        best = max(self.rate_Bps.values())
        return {"HETCOMM_STREAMS": str(self.best_streams()),
                "HETCOMM_WAN_BANDWIDTH": format_rate(best),
                "HETCOMM_WAN_RTT": format_duration(self.rtt_s)}


def format_rate(bytes_per_s: float) -> str:
    """Bytes/s as the ``HETCOMM_WAN_BANDWIDTH`` syntax, rounded down to 3 digits (``940mbit``)."""
    bits = bytes_per_s * 8
    for suffix, unit in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bits >= unit:
            value = bits / unit
            digits = 2 if value < 10 else 1 if value < 100 else 0
            return f"{int(value * 10 ** digits) / 10 ** digits:g}{suffix}"
    return f"{int(bits)}bit"


def format_duration(seconds: float) -> str:
    """Seconds as the ``HETCOMM_WAN_RTT`` syntax (``40ms``, ``85us``)."""
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g}ms"
    return f"{max(seconds * 1e6, 1):.3g}us"


def measure_link(host: str, port: int = DEFAULT_PORT, seconds: float = 2.0,
                 stream_counts: Iterable[int] = STREAM_COUNTS) -> LinkReport:
    """Round trip and throughput with each stream count to a ``hetcomm doctor --serve``."""
    report = LinkReport(host, port, measure_rtt(host, port))
    for k in stream_counts:
        report.rate_Bps[k] = measure_throughput(host, port, k, seconds)
    return report


def parse_peer(text: str) -> tuple[str, int]:
    """``HOST[:PORT]`` (``[v6addr]:PORT`` too) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or "]" in port or (host.count(":") and not host.startswith("[")):
        host, port = text, str(DEFAULT_PORT)
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--peer {text!r}: expected HOST or HOST:PORT with PORT in 1..65535")
    return host, int(port)


# ---------------------------------------------------------------- the whole run


def diagnose(peer: str | None = None, seconds: float = 2.0, torch: bool = True,
             out: Callable[[str], None] = print) -> int:
    """Run every check (and the link test with ``peer``); print findings; return 1 if any failed, else 0."""
    findings: list[Finding] = []

    def say(items: Iterable[Finding]) -> None:
        for f in items:
            findings.append(f)
            out(str(f))

    try:
        opts = Options().resolved()
    except ValueError as exc:
        say([Finding("fail", "configuration", str(exc))])
        return 1
    say([check_site(opts)])
    link = None
    if peer:
        host, port = parse_peer(peer)
        try:
            link = measure_link(host, port, seconds)
        except OSError as exc:
            say([Finding("fail", "link", f"{host}:{port}: {exc} (is `hetcomm doctor --serve` running there, "
                                         "and the port open?)")])
        else:
            rates = ", ".join(f"{k}: {format_rate(r)}" for k, r in link.rate_Bps.items())
            say([Finding("ok", "link", f"{host}:{port} round trip {format_duration(link.rtt_s)}; "
                                       f"throughput by TCP streams {rates}")])
    say(check_socket_buffers(opts, rtt=format_duration(link.rtt_s) if link else None,
                             bandwidth=format_rate(max(link.rate_Bps.values())) if link else None))
    say(check_keys(opts))
    if torch:
        say([check_torch_shim()])
    if link:
        env = " ".join(f"{k}={v}" for k, v in link.suggestions().items())
        say([Finding("info", "suggest", f"export {env}")])
    failed = [f for f in findings if f.level == "fail"]
    out(f"doctor: {len(failed)} problem(s), {sum(f.level == 'warn' for f in findings)} warning(s)")
    return 1 if failed else 0
