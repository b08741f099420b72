"""Rendezvous: agree on a communicator's identity and learn every peer's endpoints.

Each rank publishes one small JSON record under the communicator's prefix in
a key-value store and reads everyone else's; rank 0 also publishes a random
session token that every greeting must carry, so a stray process from
another job on a recycled port is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
from typing import Any, Protocol


class KeyValueStore(Protocol):
    """What hetcomm needs of a store: torch's Store and hetcomm.store.Store fit."""

    def set(self, key: str, value: str | bytes) -> None: ...

    def get(self, key: str) -> bytes: ...


def _as_bytes(value: Any) -> bytes:
    return bytes(value) if not isinstance(value, str) else value.encode()


def agree_identity(store: KeyValueStore, prefix: str, rank: int) -> tuple[int, int]:
    """(comm_id, session_token), equal on every rank of this communicator."""
    if rank == 0:
        store.set(f"{prefix}/token", str(secrets.randbits(63) | 1))
    token = int(_as_bytes(store.get(f"{prefix}/token")))
    digest = hashlib.blake2b(f"{prefix}/{token}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little"), token


def exchange(store: KeyValueStore, prefix: str, rank: int, size: int, record: dict[str, Any]) -> list[dict[str, Any]]:
    """Publishes this rank's record and returns every rank's, in rank order."""
    store.set(f"{prefix}/peer/{rank}", json.dumps(record))
    records = []
    for r in range(size):
        if r == rank:
            records.append(record)
            continue
        try:
            records.append(json.loads(_as_bytes(store.get(f"{prefix}/peer/{r}"))))
        except Exception as exc:
            if "timeout" not in type(exc).__name__.lower() and "timed out" not in str(exc).lower() \
                    and "no answer" not in str(exc):
                raise
            from hetcomm.errors import CommTimeoutError

            raise CommTimeoutError(
                f"rank {rank}: rank {r} did not join communicator {prefix!r} in time (did it start, with the "
                f"same MASTER_ADDR/MASTER_PORT and communicator name?): {exc}", "HC_ERR_TIMEOUT") from exc
    return records


def machine_id() -> str:
    """Equal for processes that share a kernel (and so can share ipc:// sockets)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def address_towards(target: str | None) -> str:
    """The local IP address the kernel would use to reach ``target``.

    Connecting a UDP socket sends nothing; it only asks the routing table.
    """
    if not target:
        target = socket.gethostname()
    try:
        infos = socket.getaddrinfo(target, None, socket.AF_INET)
        ip = infos[0][4][0]
    except OSError:
        return "127.0.0.1"
    if ip.startswith("127."):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((ip, 9))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def interface_address(ifname: str) -> str:
    """IPv4 address of a network interface, by name."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", ifname[:15].encode()))  # SIOCGIFADDR
        except OSError as exc:
            raise ValueError(f"network interface {ifname!r} has no IPv4 address ({exc})") from None
    return socket.inet_ntoa(packed[20:24])


def ipc_directory() -> str:
    """A private directory for this user's ipc:// sockets."""
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"hetcomm-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path
