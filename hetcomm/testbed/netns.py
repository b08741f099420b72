"""Emulated WAN test bed: sites as Linux network namespaces behind tbf-limited links.

A :class:`WanTestbed` builds one network namespace per *site* (data centre) and
one *hub* namespace that routes between them::

       site 0 netns                    hub netns                   site 1 netns
    +----------------+           +------------------+           +----------------+
    | lo (same-site) |           |  ip_forward = 1  |           | lo (same-site) |
    | wan0 10.77.0.2 |==veth=====| s0 10.77.0.1     |           |                |
    |   tbf egress   |           |   tbf egress     |           |                |
    +----------------+           | s1 10.77.1.1     |=====veth==| wan0 10.77.1.2 |
                                 |   tbf egress     |           |   tbf egress   |
                                 +------------------+           +----------------+

Every site has one WAN *access link* (a veth pair to the hub) shaped by a
``tc tbf`` qdisc on the egress of **both** ends, so its upload and its download
are each limited to ``wan_rate``. Traffic from site *i* to site *j* therefore
crosses site *i*'s uplink shaper and site *j*'s downlink shaper; with two
sites that is simply a ``wan_rate`` pipe in each direction, and with N sites
it is a star in which each site's access link is the bottleneck (several
peers sending to one site share its downlink, as they would in practice).

All ranks of a site run inside the site's namespace and share its address
(``10.77.<site>.2``) on distinct ports. Traffic between them, and to the
site's own address, is routed over the namespace's loopback and is **not**
rate limited. The ``10.77.0.0/16`` range exists only inside these namespaces:
there is no route to anything outside them.

Latency: only bandwidth is emulated with tbf. Latency needs the ``netem``
qdisc (``sch_netem``, CONFIG_NET_SCH_NETEM). Where the kernel has it,
``delay=...`` adds that one-way delay on each site's uplink (RTT between two
sites = 2 * delay), with netem as root qdisc and the tbf as its child, and
grows tbf's queue to a bandwidth-delay product. Whether netem exists is
checked by trying it (:func:`netem_available`); if it is missing,
:meth:`WanTestbed.start` raises :class:`NetemUnavailableError` before creating
anything. The development machines have no netem, so that path is untested
there. Without netem the RTT between sites is tens of microseconds.

Throughput ceiling: tbf counts Ethernet frames, so one TCP stream over a
1500-byte MTU delivers at most 1448/1514 = 95.6% of ``wan_rate`` as goodput
(``wan_mtu=9000``: ~99%).

Everything created is torn down on context exit, on an exception or
``KeyboardInterrupt``, on ``SIGTERM``/``SIGHUP`` while a bed is active, and by an
``atexit`` fallback; a bed that failed halfway through setup is torn down too.
Names carry the owning pid (``<prefix>-<pid>-<seq>-<role>``), so parallel
runs do not collide and :func:`cleanup_stale` can remove what a crashed run
(``kill -9``) left behind.

Needs root (``CAP_SYS_ADMIN`` and ``CAP_NET_ADMIN``), iproute2 (``ip``, ``tc``)
and the ``veth`` and ``tbf`` kernel features; :func:`available` says whether
they are all there and, if not, why.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "NetnsError",
    "NetemUnavailableError",
    "WanInterface",
    "WanCounters",
    "TbfParams",
    "WanTestbed",
    "available",
    "netem_available",
    "cleanup_stale",
    "parse_rate",
    "parse_size",
    "parse_delay",
    "tbf_params",
]

logger = logging.getLogger("hetcomm.netns")

#: First two octets of the private range used inside the namespaces.
SUBNET_PREFIX = "10.77"
#: Interface name of a site's end of its WAN link (inside the site namespace).
SITE_IFNAME = "wan0"
#: Default port for torch.distributed rendezvous (MASTER_PORT).
DEFAULT_MASTER_PORT = 29500
#: Kernel timer frequency assumed when sizing tbf's bucket (CONFIG_HZ; 250 on
#: the development machines, 100..1000 elsewhere).
ASSUMED_HZ = 250

_IP = "ip"
_TC = "tc"
_CMD_TIMEOUT_S = 30.0


class NetnsError(RuntimeError):
    """Setting up, using or tearing down the emulated WAN failed."""


class NetemUnavailableError(NetnsError):
    """A ``delay`` was requested but the kernel has no ``sch_netem`` qdisc."""


# --------------------------------------------------------------------------
# Units
# --------------------------------------------------------------------------

# tc(8) units: "bit" suffixes are bits per second, "bps" suffixes are BYTES per
# second; SI prefixes are powers of 1000, IEC ("kibit") powers of 1024.
_RATE_UNITS: dict[str, float] = {
    "": 1, "bit": 1,
    "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
    "kibit": 2**10, "mibit": 2**20, "gibit": 2**30, "tibit": 2**40,
    "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9, "tbps": 8e12,
    "kibps": 8 * 2**10, "mibps": 8 * 2**20, "gibps": 8 * 2**30, "tibps": 8 * 2**40,
}
# tc(8) sizes: bare numbers and "b" are bytes, "k"/"kb" KiB, "m"/"mb" MiB,
# "g"/"gb" GiB, "kbit"/"mbit"/"gbit" are (binary) kilo/mega/giga bits.
_SIZE_UNITS: dict[str, float] = {
    "": 1, "b": 1,
    "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30, "gb": 2**30,
    "kbit": 2**10 / 8, "mbit": 2**20 / 8, "gbit": 2**30 / 8,
}
_NUM_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_rate(rate: str | int | float) -> int:
    """Parse a tc-style rate (``"1gbit"``, ``"200mbit"``, ``"125mbps"``) into bit/s.

    Numbers are taken as bit/s. As in tc, ``bps`` means **bytes** per second.
    """
    if isinstance(rate, bool):
        raise ValueError(f"invalid rate {rate!r}")
    if isinstance(rate, (int, float)):
        value = float(rate)
    else:
        m = _NUM_UNIT.match(rate)
        unit = m.group(2).lower() if m else None
        if not m or unit not in _RATE_UNITS:
            raise ValueError(f"invalid rate {rate!r} (use e.g. '1gbit', '200mbit', '500kbit')")
        value = float(m.group(1)) * _RATE_UNITS[unit]
    if not value > 0:
        raise ValueError(f"rate must be positive, got {rate!r}")
    return int(round(value))


def parse_size(size: str | int) -> int:
    """Parse a tc-style size (``"512kb"``, ``"2mb"``, ``1500``) into bytes."""
    if isinstance(size, bool):
        raise ValueError(f"invalid size {size!r}")
    if isinstance(size, int):
        value = float(size)
    else:
        m = _NUM_UNIT.match(size)
        unit = m.group(2).lower() if m else None
        if not m or unit not in _SIZE_UNITS:
            raise ValueError(f"invalid size {size!r} (use bytes or e.g. '512kb', '2mb')")
        value = float(m.group(1)) * _SIZE_UNITS[unit]
    if not value > 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return int(round(value))


def parse_delay(delay: str | int | float) -> float:
    """Parse a delay (``"20ms"``, ``"1.5s"``, ``"500us"``, or seconds as a number) into seconds."""
    if isinstance(delay, bool):
        raise ValueError(f"invalid delay {delay!r}")
    if isinstance(delay, (int, float)):
        value = float(delay)
    else:
        m = _NUM_UNIT.match(delay)
        units = {"": 1.0, "s": 1.0, "sec": 1.0, "ms": 1e-3, "msec": 1e-3, "us": 1e-6, "usec": 1e-6}
        unit = m.group(2).lower() if m else None
        if not m or unit not in units:
            raise ValueError(f"invalid delay {delay!r} (use e.g. '20ms')")
        value = float(m.group(1)) * units[unit]
    if value < 0:
        raise ValueError(f"delay must not be negative, got {delay!r}")
    return value


# --------------------------------------------------------------------------
# tbf sizing
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TbfParams:
    """Parameters of one ``tc tbf`` qdisc."""

    rate_bps: int
    """Token rate in bit/s."""
    burst: int
    """Bucket size in bytes."""
    limit: int
    """Bytes that may wait in the queue for tokens before tbf drops."""

    def tc_args(self) -> list[str]:
        """The ``tbf ...`` part of a ``tc qdisc add`` command line."""
        return ["tbf", "rate", f"{self.rate_bps}bit", "burst", str(self.burst), "limit", str(self.limit)]


def tbf_params(rate: str | int | float, burst: str | int | None = None,
               limit: str | int | None = None, delay_s: float = 0.0) -> TbfParams:
    """Choose tbf burst and limit for ``rate`` so one TCP stream gets >= 95% of it.

    Sizing, with R the rate in bytes/s and HZ the kernel tick rate:

    * **burst** (the bucket) = 64 KiB + 2 * R / HZ. The classic rule is
      burst >= R / HZ: tokens are credited when tbf dequeues, and its
      watchdog timer and the softirq that runs it can be a tick late, so the
      bucket must hold at least a tick's worth of tokens or the tokens of a
      late tick overflow and the link idles. On top of that the bucket must
      hold the largest packet tbf sees, a GSO super-packet of up to 64 KiB
      on veth: tokens only count once a whole packet fits. We budget two
      ticks, because on the 2-core development machines the sender, the
      receiver and the softirqs share the CPUs: measured there (HZ=250,
      one TCP stream, goodput as % of rate), burst = R/HZ gave 92-95% at
      200 Mbit/s and a 70 KB burst gave 83% at 1 Gbit/s, while
      64 KiB + 2R/HZ gave 95.5-96% from 50 Mbit/s to 1 Gbit/s. The price: up
      to ``burst`` bytes (8 ms of traffic, 1.07 MB at 1 Gbit/s) may leave at
      line speed after an idle period.
    * **limit** (the queue) = burst + R * max(20 ms, 2 * delay), about a
      bandwidth-delay product. A single TCP stream keeps the bottleneck busy
      through a loss only if the queue in front of it holds about one BDP, so
      that halving cwnd drains the queue without emptying the pipe. Without
      netem the RTT between namespaces is tens of microseconds, but the RTT
      TCP sees is stretched by scheduling on few cores, so we keep a floor of
      20 ms of traffic; with a one-way ``delay`` d the RTT is 2d. More is not
      better: each queued byte is latency for small messages (bufferbloat),
      and 20 ms at 1 Gbit/s is already 2.5 MB.

    Goodput ceiling: tbf counts Ethernet frames, TCP delivers 1448 payload
    bytes per 1514-byte frame at MTU 1500, so ~95.6% is the most one stream
    can show; 95% therefore means "the link is full".
    """
    rate_bps = parse_rate(rate)
    rate_Bps = rate_bps / 8.0
    if burst is None:
        burst_b = 64 * 1024 + int(2 * rate_Bps / ASSUMED_HZ)
    else:
        burst_b = parse_size(burst)
    if limit is None:
        limit_b = burst_b + int(rate_Bps * max(0.020, 2.0 * delay_s))
    else:
        limit_b = parse_size(limit)
    return TbfParams(rate_bps=rate_bps, burst=burst_b, limit=limit_b)


# --------------------------------------------------------------------------
# Running ip/tc
# --------------------------------------------------------------------------


def _run(argv: Sequence[str], check: bool = True,
         timeout: float = _CMD_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run a short command, capture its output, log it, raise NetnsError on failure."""
    logger.debug("run: %s", " ".join(argv))
    try:
        res = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True,
                             text=True, timeout=timeout, check=False)
    except FileNotFoundError as e:
        raise NetnsError(f"command not found: {argv[0]}") from e
    except subprocess.TimeoutExpired as e:
        raise NetnsError(f"command timed out after {timeout}s: {' '.join(argv)}") from e
    if check and res.returncode != 0:
        raise NetnsError(f"command failed (rc={res.returncode}): {' '.join(argv)}: "
                         f"{(res.stderr or res.stdout).strip()}")
    return res


def _list_netns() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    out = _run([_IP, "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(ns: str) -> list[int]:
    res = _run([_IP, "netns", "pids", ns], check=False)
    if res.returncode != 0:
        return []
    return [int(tok) for tok in res.stdout.split() if tok.isdigit()]


def _kill_netns_pids(ns: str, sig: int = signal.SIGKILL) -> int:
    """Send ``sig`` to every process living in namespace ``ns``; return how many."""
    n = 0
    for pid in _netns_pids(ns):
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, sig)
            n += 1
        except ProcessLookupError:
            pass
    return n


def _delete_netns(ns: str) -> None:
    """Kill what runs in ``ns`` and delete it; missing namespaces are fine."""
    if _kill_netns_pids(ns):
        # Give the kernel a moment to reap them so the netns (and its veths)
        # actually goes away once its name is removed.
        deadline = time.monotonic() + 2.0
        while _netns_pids(ns) and time.monotonic() < deadline:
            time.sleep(0.02)
    res = _run([_IP, "netns", "delete", ns], check=False)
    if res.returncode != 0 and ns in _list_netns():
        raise NetnsError(f"could not delete netns {ns}: {res.stderr.strip()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(prefix: str = "hc") -> list[str]:
    """Delete namespaces named ``<prefix>-<pid>-...`` whose owning pid no longer exists.

    Processes still running inside them are killed first (deleting a netns
    that holds processes would only remove its name). Namespaces of live
    processes are left alone, so this is safe while other test runs are
    active. Returns the names deleted. Caveat: a reused pid protects a stale
    namespace until that pid exits too.
    """
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)-")
    removed: list[str] = []
    for ns in _list_netns():
        m = pattern.match(ns)
        if not m or _pid_alive(int(m.group(1))):
            continue
        logger.info("removing stale netns %s (pid %s is gone)", ns, m.group(1))
        try:
            _delete_netns(ns)
            removed.append(ns)
        except NetnsError as e:
            logger.warning("%s", e)
    return removed


# --------------------------------------------------------------------------
# Capability probes
# --------------------------------------------------------------------------

_probe_seq = 0
_probe_lock = threading.Lock()


def _probe_name(prefix: str) -> str:
    global _probe_seq
    with _probe_lock:
        _probe_seq += 1
        return f"{prefix}-{os.getpid()}-p{_probe_seq}"


def _try_qdisc(qdisc_args: Sequence[str], prefix: str, veth: bool = False) -> tuple[bool, str]:
    """Create a throwaway namespace and try to attach a qdisc to its ``lo``
    (and, with ``veth``, to create a veth pair inside it)."""
    ns = _probe_name(prefix)
    try:
        res = _run([_IP, "netns", "add", ns], check=False)
        if res.returncode != 0:
            return False, f"'ip netns add' failed: {res.stderr.strip()}"
        if veth:
            res = _run([_IP, "-n", ns, "link", "add", "name", "v0", "type", "veth", "peer", "name", "v1"],
                       check=False)
            if res.returncode != 0:
                return False, f"cannot create a veth pair: {res.stderr.strip()}"
        res = _run([_TC, "-n", ns, "qdisc", "add", "dev", "lo", "root", *qdisc_args], check=False)
        if res.returncode != 0:
            return False, f"'tc qdisc add ... {qdisc_args[0]}' failed: {res.stderr.strip()}"
        return True, "ok"
    except NetnsError as e:
        return False, str(e)
    finally:
        _run([_IP, "netns", "delete", ns], check=False)


_available_cache: tuple[bool, str] | None = None
_netem_cache: tuple[bool, str] | None = None


def available(prefix: str = "hc") -> tuple[bool, str]:
    """Whether a :class:`WanTestbed` can be built here, and if not, why.

    Checks: running as root, ``ip`` and ``tc`` on PATH, and, tried in a
    throwaway namespace: ``ip netns add`` works, a veth pair can be created
    and a ``tbf`` qdisc attached. The answer is cached for the process.
    """
    global _available_cache
    if _available_cache is not None:
        return _available_cache
    if not sys.platform.startswith("linux"):
        result = (False, "network namespaces need Linux")
    elif os.geteuid() != 0:
        result = (False, "needs root (CAP_SYS_ADMIN/CAP_NET_ADMIN) to create network namespaces")
    elif shutil.which(_IP) is None or shutil.which(_TC) is None:
        result = (False, "iproute2 'ip' and 'tc' must be on PATH")
    else:
        ok, why = _try_qdisc(["tbf", "rate", "1mbit", "burst", "32kb", "limit", "64kb"], prefix, veth=True)
        result = (True, "ok") if ok else (False, f"netns/tbf unavailable: {why}")
    _available_cache = result
    logger.debug("available: %s", result)
    return result


def netem_available(prefix: str = "hc") -> tuple[bool, str]:
    """Whether the ``netem`` qdisc (needed for ``delay``) works here, tried in a throwaway namespace."""
    global _netem_cache
    if _netem_cache is not None:
        return _netem_cache
    ok, why = available(prefix)
    if ok:
        ok, why = _try_qdisc(["netem", "delay", "1ms"], prefix)
    _netem_cache = (ok, "ok" if ok else why)
    return _netem_cache


# --------------------------------------------------------------------------
# Global teardown: atexit and signals
# --------------------------------------------------------------------------

_active: list[WanTestbed] = []
_active_lock = threading.RLock()
_prev_handlers: dict[int, Any] = {}
_TEARDOWN_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _close_all(why: str) -> None:
    with _active_lock:
        beds = list(_active)
    for bed in beds:
        if bed._owner_pid != os.getpid():  # a forked child must not tear down its parent's bed
            continue
        logger.warning("tearing down %s (%s)", bed.name, why)
        try:
            bed.close()
        except BaseException as e:  # noqa: BLE001 - keep tearing down the others
            logger.error("teardown of %s failed: %s", bed.name, e)


def _on_signal(signum: int, frame: Any) -> None:
    _close_all(f"signal {signal.Signals(signum).name}")
    prev = _prev_handlers.get(signum, signal.SIG_DFL)
    if callable(prev):
        prev(signum, frame)
    elif prev == signal.SIG_IGN:
        return
    else:
        # Default action of SIGTERM/SIGHUP is to terminate: exit the same way
        # but through Python, so finally blocks and atexit still run.
        raise SystemExit(128 + signum)


def _install_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        logger.debug("not in the main thread: no signal handlers, relying on atexit")
        return
    for sig in _TEARDOWN_SIGNALS:
        if sig in _prev_handlers:
            continue
        try:
            _prev_handlers[sig] = signal.signal(sig, _on_signal)
        except (ValueError, OSError) as e:  # pragma: no cover - exotic embedders
            logger.debug("cannot install handler for %s: %s", sig, e)


def _restore_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, prev in list(_prev_handlers.items()):
        try:
            if signal.getsignal(sig) is _on_signal:  # someone else may have replaced ours
                signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        except (ValueError, OSError):  # pragma: no cover
            pass
        del _prev_handlers[sig]


def _register(bed: WanTestbed) -> None:
    with _active_lock:
        _active.append(bed)
        _install_handlers()


def _unregister(bed: WanTestbed) -> None:
    with _active_lock:
        if bed in _active:
            _active.remove(bed)
        if not _active:
            _restore_handlers()


atexit.register(_close_all, "interpreter exit")


# --------------------------------------------------------------------------
# The test bed
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WanInterface:
    """One end of a site's shaped WAN link (for packet capture, counters, ...)."""

    site: int
    """Site whose access link this is."""
    netns: str
    """Namespace holding this end (capture with ``ip netns exec NETNS tcpdump -i IFNAME``)."""
    ifname: str
    """Interface name inside ``netns``."""
    side: str
    """``"site"``: the site's end (its egress is the site's upload);
    ``"hub"``: the hub's end (its egress is the site's download)."""
    address: str
    """IPv4 address of this end."""


@dataclasses.dataclass(frozen=True)
class WanCounters:
    """Traffic counters of one :class:`WanInterface` (since the bed was built)."""

    interface: WanInterface
    tx_bytes: int
    """Bytes sent out of this end, whole Ethernet frames (``ip -s link``)."""
    tx_packets: int
    """Frames sent out of this end."""
    qdisc_drops: int
    """Packets the shaper dropped because its queue (``limit``) was full."""
    qdisc_overlimits: int
    """Times the shaper had to hold packets back for lack of tokens."""


_bed_seq = 0
_bed_seq_lock = threading.Lock()


def _next_seq() -> int:
    global _bed_seq
    with _bed_seq_lock:
        _bed_seq += 1
        return _bed_seq


class WanTestbed:
    """N sites in network namespaces joined through a hub over tbf-shaped veth links.

    Use as a context manager::

        with WanTestbed(sites=2, ranks_per_site=2, wan_rate="1gbit") as tb:
            procs = tb.spawn_ranks(lambda r: [sys.executable, "train.py"])
            for p in procs:
                p.wait()

    Rank ``r`` lives in site ``r // ranks_per_site``. Ranks of one site share
    the site's address and talk over the namespace's loopback, unshaped.

    Args:
        sites: number of sites (namespaces), 1..254.
        ranks_per_site: ranks per site, for :meth:`spawn_ranks` and the rank helpers.
        wan_rate: rate of each site's WAN link, each direction (tc syntax, e.g.
            ``"1gbit"``, or bit/s); ``None`` leaves the links unshaped.
        wan_burst: tbf bucket size (bytes or tc size); default from :func:`tbf_params`.
        wan_limit: tbf queue limit (bytes or tc size); default from :func:`tbf_params`.
        delay: one-way delay between two sites (``"20ms"`` or seconds), applied
            with netem on each site's uplink; RTT is ``2 * delay``. Raises
            :class:`NetemUnavailableError` at start if ``sch_netem`` is missing.
        prefix: namespace name prefix; names are ``<prefix>-<pid>-<seq>-<role>``.
        wan_mtu: MTU of the WAN links (1500 like most real WANs; 9000 lifts
            the TCP goodput ceiling from ~95.6% to ~99% of ``wan_rate``).
    """

    def __init__(self, sites: int = 2, ranks_per_site: int = 2,
                 wan_rate: str | int | float | None = "1gbit",
                 wan_burst: str | int | None = None, wan_limit: str | int | None = None,
                 delay: str | int | float | None = None, prefix: str = "hc",
                 wan_mtu: int = 1500) -> None:
        if not 1 <= int(sites) <= 254:
            raise ValueError("sites must be in 1..254")
        if int(ranks_per_site) < 1:
            raise ValueError("ranks_per_site must be >= 1")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,15}", prefix):
            raise ValueError("prefix must be 1-16 letters, digits or '_' starting with a letter")
        self.sites = int(sites)
        self.ranks_per_site = int(ranks_per_site)
        self.prefix = prefix
        if not 576 <= int(wan_mtu) <= 65535:
            raise ValueError("wan_mtu must be in 576..65535")
        self.wan_mtu = int(wan_mtu)
        self.delay_s = parse_delay(delay) if delay is not None else 0.0
        self._want_delay = delay is not None and self.delay_s > 0
        self.tbf: TbfParams | None = (
            tbf_params(wan_rate, wan_burst, wan_limit, self.delay_s) if wan_rate is not None else None)
        self._owner_pid = os.getpid()
        self.name = f"{prefix}-{self._owner_pid}-{_next_seq()}"
        self._created: list[str] = []  # namespaces, in creation order
        self._procs: list[subprocess.Popen[Any]] = []
        self._procs_lock = threading.Lock()
        self._started = False
        self._closing = False
        self._closed = False

    # ---- naming and addressing ---------------------------------------------

    @property
    def hub_netns(self) -> str:
        """Name of the hub (router) namespace."""
        return f"{self.name}-hub"

    def site_netns(self, site: int) -> str:
        """Name of site ``site``'s namespace."""
        self._check_site(site)
        return f"{self.name}-s{site}"

    def site_address(self, site: int) -> str:
        """The address all ranks of ``site`` share and listen on."""
        self._check_site(site)
        return f"{SUBNET_PREFIX}.{site}.2"

    def hub_address(self, site: int) -> str:
        """The hub's address on ``site``'s link (the site's next hop)."""
        self._check_site(site)
        return f"{SUBNET_PREFIX}.{site}.1"

    def site_ifname(self, site: int) -> str:
        """Name of the WAN interface inside the site namespace (for GLOO_SOCKET_IFNAME etc.)."""
        self._check_site(site)
        return SITE_IFNAME

    @property
    def world_size(self) -> int:
        """``sites * ranks_per_site``."""
        return self.sites * self.ranks_per_site

    def rank_site(self, rank: int) -> int:
        """Site of ``rank`` (``rank // ranks_per_site``)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} out of range 0..{self.world_size - 1}")
        return rank // self.ranks_per_site

    def rank_address(self, rank: int) -> str:
        """Address of ``rank`` (its site's address)."""
        return self.site_address(self.rank_site(rank))

    @property
    def master_addr(self) -> str:
        """Rendezvous address: rank 0's site address (MASTER_ADDR)."""
        return self.site_address(0)

    def wan_interfaces(self) -> list[WanInterface]:
        """Both ends of every site's shaped WAN link, site end first."""
        out: list[WanInterface] = []
        for s in range(self.sites):
            out.append(WanInterface(s, self.site_netns(s), SITE_IFNAME, "site", self.site_address(s)))
            out.append(WanInterface(s, self.hub_netns, f"s{s}", "hub", self.hub_address(s)))
        return out

    def wan_counters(self) -> list[WanCounters]:
        """Counters of every :meth:`wan_interfaces` end, in the same order.

        The site end's ``tx_bytes`` is what the site uploaded to the WAN, the
        hub end's what it downloaded: diff two snapshots to count the bytes
        a collective put on the WAN (this includes a few bytes of IPv6
        neighbour discovery and ARP).
        """
        self._check_active()
        out: list[WanCounters] = []
        for wi in self.wan_interfaces():
            link = json.loads(_run([_IP, "-n", wi.netns, "-j", "-s", "link", "show", "dev", wi.ifname]).stdout)
            tx = link[0]["stats64"]["tx"]
            qdiscs = json.loads(_run([_TC, "-n", wi.netns, "-j", "-s", "qdisc", "show", "dev", wi.ifname]).stdout)
            # Shaping stats: the tbf (child of netem when there is a delay).
            tbf = [q for q in qdiscs if q.get("kind") == "tbf"] or [q for q in qdiscs if q.get("root")]
            drops = sum(int(q.get("drops", 0)) for q in tbf)
            over = sum(int(q.get("overlimits", 0)) for q in tbf)
            out.append(WanCounters(wi, int(tx["bytes"]), int(tx["packets"]), drops, over))
        return out

    def wan_tx_bytes(self) -> int:
        """Total bytes all sites have uploaded to the WAN so far (Ethernet frames)."""
        return sum(c.tx_bytes for c in self.wan_counters() if c.interface.side == "site")

    def namespaces(self) -> list[str]:
        """All namespaces this bed has (or would) create: the hub, then the sites."""
        return [self.hub_netns] + [self.site_netns(s) for s in range(self.sites)]

    def _check_site(self, site: int) -> None:
        if not 0 <= site < self.sites:
            raise ValueError(f"site {site} out of range 0..{self.sites - 1}")

    # ---- lifecycle ---------------------------------------------------------

    def __enter__(self) -> WanTestbed:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        rate = f"{self.tbf.rate_bps}bit" if self.tbf else "unshaped"
        return (f"WanTestbed({self.name!r}, sites={self.sites}, ranks_per_site={self.ranks_per_site}, "
                f"rate={rate}, delay={self.delay_s}s, mtu={self.wan_mtu})")

    def start(self) -> WanTestbed:
        """Create namespaces, links, addresses, routes and shapers.

        On any failure (including KeyboardInterrupt) everything created so far
        is removed before the exception propagates.
        """
        if self._started or self._closed:
            raise NetnsError(f"{self.name}: a WanTestbed can be started once")
        ok, why = available(self.prefix)
        if not ok:
            raise NetnsError(f"cannot build a WAN test bed here: {why}")
        if self._want_delay:
            ok, why = netem_available(self.prefix)
            if not ok:
                raise NetemUnavailableError(
                    "delay= needs the netem qdisc (kernel module sch_netem, CONFIG_NET_SCH_NETEM), "
                    f"which this kernel lacks ({why}); only bandwidth can be emulated here")
        self._started = True
        _register(self)
        t0 = time.monotonic()
        try:
            self._build()
        except BaseException:
            logger.error("%s: setup failed, tearing down", self.name)
            self.close()
            raise
        logger.info("%s: up in %.2fs (%s)", self.name, time.monotonic() - t0, self)
        return self

    def _ns_add(self, ns: str) -> None:
        # Record the name *before* creating it so a failure or interrupt
        # right after the syscall still gets it deleted.
        self._created.append(ns)
        _run([_IP, "netns", "add", ns])
        _run([_IP, "-n", ns, "link", "set", "lo", "up"])

    def _sysctl(self, ns: str, key: str, value: str) -> None:
        # /proc/sys/net shows the namespace of the process that opens it, so
        # this must run inside ``ns``.
        path = "/proc/sys/" + key.replace(".", "/")
        _run([_IP, "netns", "exec", ns, sys.executable, "-c",
              f"open({path!r}, 'w').write({value!r})"])

    def _shape(self, ns: str, ifname: str, with_delay: bool) -> None:
        tc = [_TC, "-n", ns, "qdisc", "add", "dev", ifname]
        if with_delay:
            # netem (root) delays, its child tbf shapes. netem's own queue must
            # hold everything in flight during the delay: ~R*delay in packets.
            rate_Bps = (self.tbf.rate_bps / 8.0) if self.tbf else 125e6
            pkts = max(1000, int(2 * rate_Bps * self.delay_s / 1500) + 100)
            _run(tc + ["root", "handle", "1:", "netem", "delay", f"{self.delay_s * 1e6:.0f}us",
                       "limit", str(pkts)])
            if self.tbf:
                _run(tc + ["parent", "1:1", "handle", "10:", *self.tbf.tc_args()])
        elif self.tbf:
            _run(tc + ["root", "handle", "1:", *self.tbf.tc_args()])

    def _build(self) -> None:
        hub = self.hub_netns
        self._ns_add(hub)
        self._sysctl(hub, "net.ipv4.ip_forward", "1")
        for s in range(self.sites):
            ns = self.site_netns(s)
            self._ns_add(ns)
            hub_if = f"s{s}"
            # Create the pair directly inside both namespaces: nothing ever
            # appears in the root namespace, so nothing can be left there.
            mtu = str(self.wan_mtu)
            _run([_IP, "link", "add", "name", SITE_IFNAME, "mtu", mtu, "netns", ns, "type", "veth",
                  "peer", "name", hub_if, "mtu", mtu, "netns", hub])
            _run([_IP, "-n", ns, "addr", "add", f"{self.site_address(s)}/24", "dev", SITE_IFNAME])
            _run([_IP, "-n", hub, "addr", "add", f"{self.hub_address(s)}/24", "dev", hub_if])
            _run([_IP, "-n", ns, "link", "set", SITE_IFNAME, "up"])
            _run([_IP, "-n", hub, "link", "set", hub_if, "up"])
            # Only the emulated range is routed, and only via the hub.
            _run([_IP, "-n", ns, "route", "add", f"{SUBNET_PREFIX}.0.0/16", "via", self.hub_address(s)])
            # Shape both directions of the access link: site egress = upload
            # (plus the one-way delay, if any), hub egress = download.
            self._shape(ns, SITE_IFNAME, self._want_delay)
            self._shape(hub, hub_if, False)

    def close(self) -> None:
        """Kill every process started here and delete every namespace created.

        Idempotent. Each step runs even if an earlier one fails or is
        interrupted; an interrupt (KeyboardInterrupt, SystemExit) received
        during teardown is re-raised once teardown is complete.
        """
        if self._closed or self._closing:
            return
        if self._owner_pid != os.getpid():
            return
        self._closing = True
        pending: BaseException | None = None
        try:
            try:
                self.kill_processes()
            except BaseException as e:  # noqa: BLE001
                pending = pending or e
            for ns in reversed(self._created):
                # _delete_netns also kills anything still inside.
                for _attempt in range(3):
                    try:
                        _delete_netns(ns)
                        break
                    except Exception as e:  # noqa: BLE001 - log, go on with the others
                        logger.error("%s: deleting %s: %s", self.name, ns, e)
                        pending = pending or e
                        break
                    except BaseException as e:  # noqa: BLE001 - interrupted: retry this one
                        pending = pending or e
            # Final check: names this bed may have created but not recorded.
            try:
                ours = re.compile(rf"^{re.escape(self.name)}-")
                for ns in _list_netns():
                    if ours.match(ns):
                        logger.warning("%s: removing unrecorded netns %s", self.name, ns)
                        _delete_netns(ns)
            except BaseException as e:  # noqa: BLE001
                pending = pending or e
        finally:
            self._closed = True
            self._closing = False
            _unregister(self)
            logger.info("%s: torn down", self.name)
        if isinstance(pending, (KeyboardInterrupt, SystemExit)) or (
                pending is not None and not isinstance(pending, Exception)):
            raise pending
        if pending is not None:
            raise NetnsError(f"{self.name}: teardown incomplete: {pending}") from pending

    @property
    def active(self) -> bool:
        """Started and not yet closed."""
        return self._started and not self._closed and not self._closing

    # ---- processes -----------------------------------------------------------

    def _check_active(self) -> None:
        if not self.active:
            raise NetnsError(f"{self.name} is not active (use it inside 'with' or call start())")

    def exec_prefix(self, site: int) -> list[str]:
        """``["ip", "netns", "exec", <site netns>]``: prepend to run a command in ``site``."""
        return [_IP, "netns", "exec", self.site_netns(site)]

    def popen(self, site: int, argv: Sequence[str], env: Mapping[str, str] | None = None,
              **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``site``'s namespace; it is killed on teardown.

        ``env`` is *added to* the current environment (not a replacement).
        The process gets its own session (process group) so teardown can kill
        its children too; other keyword arguments go to :class:`subprocess.Popen`.
        ``ip netns exec`` execs the command, so ``Popen.pid`` is the command's pid.
        """
        self._check_active()
        full_env = dict(os.environ)
        if env:
            full_env.update({str(k): str(v) for k, v in env.items()})
        kwargs.setdefault("start_new_session", True)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        cmd = self.exec_prefix(site) + [str(a) for a in argv]
        if logger.isEnabledFor(logging.DEBUG):
            shown = " ".join(a if len(a) <= 80 and "\n" not in a else a[:40].split("\n")[0] + "..." for a in cmd)
            logger.debug("%s: popen in site %d: %s", self.name, site, shown)
        with self._procs_lock:
            proc = subprocess.Popen(cmd, env=full_env, **kwargs)
            self._procs.append(proc)
        return proc

    def run(self, site: int, argv: Sequence[str], env: Mapping[str, str] | None = None,
            timeout: float | None = 60.0, check: bool = False,
            **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` in ``site`` to completion (killed after ``timeout`` s)."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        proc = self.popen(site, argv, env=env, **kwargs)
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            _kill_group(proc)
            proc.communicate()
            raise
        res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check:
            res.check_returncode()
        return res

    def popen_python(self, site: int, code: str, args: Sequence[str] = (),
                     env: Mapping[str, str] | None = None, **kwargs: Any) -> subprocess.Popen[Any]:
        """Run Python source ``code`` (``python -c``) with this interpreter in ``site``."""
        return self.popen(site, [sys.executable, "-c", code, *[str(a) for a in args]], env=env, **kwargs)

    def rank_env(self, rank: int, master_port: int = DEFAULT_MASTER_PORT) -> dict[str, str]:
        """torch.distributed ``env://`` variables for ``rank``, plus site information.

        Sets MASTER_ADDR/MASTER_PORT (rank 0's site), RANK, WORLD_SIZE,
        LOCAL_RANK/LOCAL_WORLD_SIZE (within the site), GLOO_SOCKET_IFNAME
        (the site's WAN interface, so gloo binds the site address; same-site
        peers still reach it over loopback), and HETCOMM_SITE / HETCOMM_NUM_SITES.
        """
        site = self.rank_site(rank)
        return {
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(master_port),
            "RANK": str(rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(rank % self.ranks_per_site),
            "LOCAL_WORLD_SIZE": str(self.ranks_per_site),
            "GLOO_SOCKET_IFNAME": self.site_ifname(site),
            "HETCOMM_SITE": str(site),
            "HETCOMM_NUM_SITES": str(self.sites),
        }

    def spawn_ranks(self, argv_for_rank: Callable[[int], Sequence[str]] | Sequence[str],
                    env_for_rank: Callable[[int], Mapping[str, str]] | None = None,
                    master_port: int = DEFAULT_MASTER_PORT,
                    **kwargs: Any) -> list[subprocess.Popen[Any]]:
        """Start ``world_size`` ranks, rank ``r`` in site ``r // ranks_per_site``.

        ``argv_for_rank`` is a function of the rank or one argv for all. Each
        rank's environment is the current one plus :meth:`rank_env` plus
        ``env_for_rank(rank)``. ``kwargs`` go to :meth:`popen` (e.g.
        ``stdout=``); if a launch fails, ranks already started are killed.
        """
        procs: list[subprocess.Popen[Any]] = []
        try:
            for r in range(self.world_size):
                argv = argv_for_rank(r) if callable(argv_for_rank) else argv_for_rank
                env = self.rank_env(r, master_port)
                if env_for_rank is not None:
                    env.update(env_for_rank(r))
                procs.append(self.popen(self.rank_site(r), argv, env=env, **kwargs))
        except BaseException:
            for p in procs:
                _kill_group(p)
            raise
        return procs

    @property
    def processes(self) -> list[subprocess.Popen[Any]]:
        """Every process started through this bed (running or not)."""
        with self._procs_lock:
            return list(self._procs)

    def kill_processes(self, grace_s: float = 2.0) -> None:
        """SIGTERM every process group started here, SIGKILL what is left after
        ``grace_s``, then SIGKILL anything else still inside the namespaces.

        Process groups are signalled only while their leader is unreaped (so
        its pid, which is the group id, cannot have been reused); children
        that outlive their leader, or left its group, are caught by the sweep
        of the namespaces, where everything started here lives.
        """
        with self._procs_lock:
            procs = list(self._procs)
        for p in procs:
            if p.returncode is None:
                _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in procs:
            if p.returncode is None:
                _signal_group(p, signal.SIGKILL)
        for p in procs:
            try:
                p.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                logger.error("%s: pid %d did not die", self.name, p.pid)
            for f in (p.stdout, p.stderr, p.stdin):
                if f is not None:
                    try:
                        f.close()
                    except OSError:
                        pass
        for ns in self._created:
            n = _kill_netns_pids(ns, signal.SIGKILL)
            if n:
                logger.warning("%s: killed %d stray process(es) in %s", self.name, n, ns)


def _signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    if proc.returncode is None:  # leader unreaped: its pid (= group id) is still ours
        _signal_group(proc, signal.SIGKILL)
    try:
        proc.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        pass
