"""Options of a communicator: arguments first, ``HETCOMM_*`` environment second.

Every field left at ``None`` is filled from its environment variable, then
from the default. The README lists each variable.
"""
from __future__ import annotations

import dataclasses
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any

from .topology import site_of_host

CODECS = ("none", "fp16", "bf16", "int8", "int4", "1bit")
ALGOS = ("auto", "ring", "rd", "tree", "hier")
TRANSPORTS = ("auto", "tcp", "ipc")


def env_str(name: str, default: str | None = None) -> str | None:
    """The variable's value, or ``default`` when it is unset or empty."""
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def env_int(name: str, default: int) -> int:
    """The variable as an integer (size suffixes K/M/G allowed), or ``default``."""
    value = env_str(name)
    if value is None:
        return default
    try:
        return parse_size(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not a non-negative integer "
                         "(K/M/G suffixes allowed)") from None


def env_float(name: str, default: float) -> float:
    """The variable as a number, or ``default``."""
    value = env_str(name)
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not a number") from None


def env_bool(name: str, default: bool) -> bool:
    """The variable as a boolean (1/0, on/off, true/false, yes/no), or ``default``."""
    value = env_str(name)
    if value is None:
        return default
    if value.lower() in ("1", "on", "true", "yes"):
        return True
    if value.lower() in ("0", "off", "false", "no"):
        return False
    raise ValueError(f"environment variable {name}={value!r} is not a boolean (1/0, on/off)")


def parse_rate(text: str) -> float:
    """'10gbit' -> bytes per second (also mbit, kbit, bit; gbps/mbps)."""
    s = text.strip().lower().replace("bps", "bit")
    for suffix, factor in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)):
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * factor / 8
    raise ValueError(f"rate {text!r} needs a unit: gbit, mbit, kbit or bit")


def parse_duration(text: str) -> float:
    """'40ms' -> 0.04 seconds (also us, s)."""
    s = text.strip().lower()
    for suffix, factor in (("ms", 1e-3), ("us", 1e-6), ("s", 1.0)):
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * factor
    raise ValueError(f"duration {text!r} needs a unit: s, ms or us")


def bdp_buffer(bandwidth: str, rtt: str, streams: int) -> int:
    """Socket buffer per stream for a link: twice its share of the
    bandwidth-delay product, so a stream never stalls waiting for ACKs."""
    bdp = parse_rate(bandwidth) * parse_duration(rtt)
    return max(256 << 10, int(2 * bdp / max(1, streams)))


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes from ``4``, ``1K``, ``64M`` or ``1GiB`` (binary suffixes: K = 1024); integers pass through.

    Raises:
        ValueError: not a non-negative integer with an optional K/M/G/T suffix.
    """
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    m = _SIZE_RE.match(text) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"invalid size {text!r}: expected bytes with an optional K/M/G suffix, e.g. 4, 1K, 64M")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]


@dataclass
class Options:
    """Settings of one communicator (or process group).

    Attributes left ``None`` take their ``HETCOMM_*`` environment variable or
    the default shown in the README.
    """

    timeout: float | None = None          # seconds, every blocking wait (HETCOMM_TIMEOUT)
    heartbeat: float | None = None        # seconds of silence that make a peer lost; 0: off (HETCOMM_HEARTBEAT)
    site: str | None = None               # data-centre label (HETCOMM_SITE)
    topology: str | None = None           # file of "HOST_PATTERN SITE" lines, for an unset site (HETCOMM_TOPOLOGY)
    host: str | None = None               # host name (HETCOMM_HOST, default gethostname())
    bind_address: str | None = None       # "tcp://10.0.0.5" or "tcp://..;ipc://dir" (HETCOMM_BIND_ADDR)
    ifname: str | None = None             # network interface to bind (HETCOMM_IFNAME)
    transport: str | None = None          # auto|tcp|ipc for ranks on one host (HETCOMM_TRANSPORT)
    streams: int | None = None            # TCP streams per peer in another site (HETCOMM_STREAMS)
    chunk_bytes: int | None = None        # pipeline granule (HETCOMM_CHUNK_BYTES)
    small_bytes: int | None = None        # below: latency algorithms (HETCOMM_SMALL_BYTES)
    algo: str | None = None               # allreduce algorithm (HETCOMM_ALGO)
    codec: str | None = None              # default codec for float sum/avg (HETCOMM_CODEC)
    codec_min_bytes: int | None = None    # never compress below (HETCOMM_CODEC_MIN_BYTES)
    codec_block: int | None = None        # quantization block, elements (HETCOMM_CODEC_BLOCK)
    codec_scale: str | None = None        # fp32|fp16 block scales (HETCOMM_CODEC_SCALE)
    socket_buffer: int | None = None      # SO_SNDBUF/SO_RCVBUF between sites (HETCOMM_SOCKET_BUFFER)
    wan_bandwidth: str | None = None      # e.g. "10gbit": with wan_rtt, sizes socket buffers (HETCOMM_WAN_BANDWIDTH)
    wan_rtt: str | None = None            # e.g. "40ms" (HETCOMM_WAN_RTT)
    shm: bool | None = None               # shared-memory lanes on one host (HETCOMM_SHM)
    shm_bytes: int | None = None          # bytes per lane (HETCOMM_SHM_BYTES)
    spin_us: int | None = None            # small ops on one host: poll (spin or yield) before sleeping, -1 auto (HETCOMM_SPIN_US)
    cma: bool | None = None               # large ops on one host read peers' buffers directly (HETCOMM_CMA)
    hugepages: bool | None = None         # ... and back this rank's buffers with huge pages (HETCOMM_HUGEPAGES)
    curve: bool | None = None             # CurveZMQ between sites; default: on when a secret is set (HETCOMM_CURVE)
    curve_secret: str | None = None       # this rank's NAME.key_secret from `hetcomm keygen` (HETCOMM_CURVE_SECRET)
    curve_allow: str | None = None        # directory of trusted public *.key files (HETCOMM_CURVE_ALLOW)
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> "Options":
        """A copy with every ``None`` replaced by the environment or the default."""
        o = dataclasses.replace(self)
        o.timeout = o.timeout if o.timeout is not None else env_float("HETCOMM_TIMEOUT", 300.0)
        o.heartbeat = o.heartbeat if o.heartbeat is not None else env_float("HETCOMM_HEARTBEAT", 5.0)
        o.host = o.host if o.host is not None else env_str("HETCOMM_HOST")
        o.topology = o.topology or env_str("HETCOMM_TOPOLOGY")
        o.site = o.site if o.site is not None else env_str("HETCOMM_SITE")
        if o.site is None:
            o.site = site_of_host(o.topology, o.host or socket.gethostname()) if o.topology else ""
        o.bind_address = o.bind_address or env_str("HETCOMM_BIND_ADDR")
        o.ifname = o.ifname or env_str("HETCOMM_IFNAME")
        o.transport = (o.transport or env_str("HETCOMM_TRANSPORT", "auto")).lower()
        o.streams = o.streams if o.streams is not None else env_int("HETCOMM_STREAMS", 4)
        o.chunk_bytes = (parse_size(o.chunk_bytes) if o.chunk_bytes is not None
                         else env_int("HETCOMM_CHUNK_BYTES", 2 << 20))
        o.small_bytes = (parse_size(o.small_bytes) if o.small_bytes is not None
                         else env_int("HETCOMM_SMALL_BYTES", 64 << 10))
        o.algo = (o.algo or env_str("HETCOMM_ALGO", "auto")).lower()
        o.codec = (o.codec or env_str("HETCOMM_CODEC", "none")).lower()
        o.codec_min_bytes = (parse_size(o.codec_min_bytes) if o.codec_min_bytes is not None
                             else env_int("HETCOMM_CODEC_MIN_BYTES", 64 << 10))
        o.codec_block = o.codec_block if o.codec_block is not None else env_int("HETCOMM_CODEC_BLOCK", 256)
        o.codec_scale = (o.codec_scale or env_str("HETCOMM_CODEC_SCALE", "fp32")).lower()
        o.wan_bandwidth = o.wan_bandwidth or env_str("HETCOMM_WAN_BANDWIDTH")
        o.wan_rtt = o.wan_rtt or env_str("HETCOMM_WAN_RTT")
        o.socket_buffer = (parse_size(o.socket_buffer) if o.socket_buffer is not None
                           else env_int("HETCOMM_SOCKET_BUFFER", 0))
        if not o.socket_buffer and o.wan_bandwidth and o.wan_rtt:
            o.socket_buffer = bdp_buffer(o.wan_bandwidth, o.wan_rtt, o.streams)
        if o.shm is None:
            o.shm = env_bool("HETCOMM_SHM", True)
        o.shm_bytes = parse_size(o.shm_bytes) if o.shm_bytes is not None else env_int("HETCOMM_SHM_BYTES", 16 << 20)
        if o.spin_us is None:  # "-1" (auto, the documented default) is no size, so env_int refuses it
            o.spin_us = -1 if env_str("HETCOMM_SPIN_US") == "-1" else env_int("HETCOMM_SPIN_US", -1)
        if o.cma is None:
            o.cma = env_bool("HETCOMM_CMA", True)
        if o.hugepages is None:
            o.hugepages = env_bool("HETCOMM_HUGEPAGES", True)
        o.curve_secret = o.curve_secret or env_str("HETCOMM_CURVE_SECRET")
        o.curve_allow = o.curve_allow or env_str("HETCOMM_CURVE_ALLOW")
        if o.curve is None:
            o.curve = env_bool("HETCOMM_CURVE", bool(o.curve_secret))
        o.validate()
        return o

    def validate(self) -> None:
        """Raises ValueError naming the first option out of range."""
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"timeout must be positive seconds, got {self.timeout}")
        if self.heartbeat is not None and self.heartbeat < 0:
            raise ValueError(f"heartbeat must be seconds >= 0 (0: off), got {self.heartbeat}")
        if self.transport not in (None, *TRANSPORTS):
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.algo not in (None, *ALGOS):
            raise ValueError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        if self.codec not in (None, *CODECS):
            raise ValueError(f"codec must be one of {CODECS}, got {self.codec!r}")
        if self.codec_scale not in (None, "fp32", "fp16"):
            raise ValueError(f"codec_scale must be 'fp32' or 'fp16', got {self.codec_scale!r}")
        if self.streams is not None and not 1 <= self.streams <= 64:
            raise ValueError(f"streams must be in 1..64, got {self.streams}")
        if self.chunk_bytes is not None and self.chunk_bytes < 4096:
            raise ValueError(f"chunk_bytes must be at least 4096, got {self.chunk_bytes}")
        if self.spin_us is not None and self.spin_us < -1:
            raise ValueError(f"spin_us must be -1 (auto) or a number of microseconds >= 0, got {self.spin_us}")
        if self.codec_block is not None and self.codec_block <= 0:
            raise ValueError(f"codec_block must be positive, got {self.codec_block}")
        if self.curve and not (self.curve_secret and self.curve_allow):
            raise ValueError("CURVE needs both curve_secret (HETCOMM_CURVE_SECRET, a NAME.key_secret file) and "
                             "curve_allow (HETCOMM_CURVE_ALLOW, a directory of trusted *.key files)")
