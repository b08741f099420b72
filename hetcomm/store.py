"""A small key-value store for rendezvous without torch.

Rank 0 serves it on ``MASTER_ADDR:MASTER_PORT``; every rank (rank 0 too) is a
client. It speaks the subset of torch's ``Store`` interface hetcomm uses
(``set``, ``get``, ``add``, ``wait``), so a ``torch.distributed.TCPStore`` or
``FileStore`` can be passed wherever this one is accepted. Only rendezvous
goes through it: endpoints and keys, never tensor data.
"""
from __future__ import annotations

import logging
import os
import threading
import uuid
from datetime import timedelta

import zmq

from hetcomm.errors import CommTimeoutError

log = logging.getLogger("hetcomm.store")

_OPS = (b"SET", b"GET", b"ADD", b"CHECK")


class _Server(threading.Thread):
    """Serves the store on a ROUTER socket; a GET for a missing key is held
    until some client sets it."""

    def __init__(self, ctx: zmq.Context, port: int, bind_host: str) -> None:
        super().__init__(name="hetcomm-store", daemon=True)
        self._sock = ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(f"tcp://{bind_host}:{port}")
        self._wake = ctx.socket(zmq.PAIR)
        self._wake_addr = f"inproc://hetcomm-store-stop-{uuid.uuid4().hex}"
        self._wake.bind(self._wake_addr)
        self._data: dict[bytes, bytes] = {}
        self._waiting: dict[bytes, list[tuple[bytes, bytes]]] = {}

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake, zmq.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._wake in events:
                break
            frames = self._sock.recv_multipart()
            if len(frames) not in (4, 5) or frames[2] not in _OPS:
                log.warning("store: dropped a malformed request (%d frames)", len(frames))
                continue
            client, req_id, op, key, *rest = frames
            try:
                self._handle(client, req_id, op, key, rest[0] if rest else b"")
            except ValueError as exc:  # ADD on a non-integer value
                self._sock.send_multipart([client, req_id, b"ERR", str(exc).encode()])
        self._sock.close()
        self._wake.close()

    def _handle(self, client: bytes, req_id: bytes, op: bytes, key: bytes, value: bytes) -> None:
        if op == b"SET":
            self._data[key] = value
            self._sock.send_multipart([client, req_id, b"OK"])
            for waiter, wid in self._waiting.pop(key, []):
                self._sock.send_multipart([waiter, wid, b"OK", value])
        elif op == b"GET":
            if key in self._data:
                self._sock.send_multipart([client, req_id, b"OK", self._data[key]])
            else:
                self._waiting.setdefault(key, []).append((client, req_id))
        elif op == b"ADD":
            total = int(self._data.get(key, b"0")) + int(value)
            self._data[key] = str(total).encode()
            self._sock.send_multipart([client, req_id, b"OK", self._data[key]])
            for waiter, wid in self._waiting.pop(key, []):
                self._sock.send_multipart([waiter, wid, b"OK", self._data[key]])
        elif op == b"CHECK":
            self._sock.send_multipart([client, req_id, b"OK", b"1" if key in self._data else b"0"])

    def stop(self) -> None:
        sock = self._wake.context.socket(zmq.PAIR)
        sock.connect(self._wake_addr)
        sock.send(b"stop")
        sock.close()
        self.join(timeout=5)


class Store:
    """Client of a hetcomm store (and its server, on the rank that hosts it).

    Args:
        host: address of the serving rank.
        port: its port.
        is_server: host the store in this process.
        timeout: default wait for ``get``/``wait``, seconds or timedelta.
    """

    def __init__(self, host: str, port: int, is_server: bool, timeout: float | timedelta = 300.0) -> None:
        from hetcomm._native import zmq_context

        self._ctx = zmq_context()
        self.timeout = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
        self._server = _Server(self._ctx, port, "*") if is_server else None
        if self._server:
            self._server.start()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(f"tcp://{host}:{port}")
        self._addr = f"{host}:{port}"
        self._lock = threading.Lock()
        self._next_id = 0

    def _request(self, op: bytes, key: str, value: bytes = b"", timeout: float | None = None) -> bytes:
        wait_s = self.timeout if timeout is None else timeout
        with self._lock:
            self._next_id += 1
            req_id = str(self._next_id).encode()
            self._sock.send_multipart([req_id, op, key.encode(), value])
            deadline_ms = int(wait_s * 1000)
            while True:
                if not self._sock.poll(deadline_ms):
                    raise CommTimeoutError(
                        f"store at {self._addr}: no answer to {op.decode()} {key!r} within {wait_s:.1f} s "
                        f"(is rank 0 running and MASTER_ADDR/MASTER_PORT right?)", "HC_ERR_TIMEOUT")
                frames = self._sock.recv_multipart()
                # Answers to requests that timed out earlier are skipped.
                if len(frames) >= 2 and frames[0] == req_id:
                    if frames[1] != b"OK":
                        raise ValueError(f"store: {op.decode()} {key!r} failed: {frames[-1].decode()}")
                    return frames[2] if len(frames) > 2 else b""

    def set(self, key: str, value: str | bytes) -> None:
        """Sets ``key``; wakes every ``get`` waiting for it."""
        self._request(b"SET", key, value.encode() if isinstance(value, str) else bytes(value))

    def get(self, key: str) -> bytes:
        """The value of ``key``, waiting up to the timeout for it to be set."""
        return self._request(b"GET", key)

    def add(self, key: str, amount: int) -> int:
        """Adds to an integer key (0 when unset) and returns the new value."""
        return int(self._request(b"ADD", key, str(int(amount)).encode()))

    def check(self, keys: list[str]) -> bool:
        """Whether every key is set, without waiting."""
        return all(self._request(b"CHECK", k) == b"1" for k in keys)

    def wait(self, keys: list[str], timeout: timedelta | float | None = None) -> None:
        """Waits until every key is set."""
        seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
        for k in keys:
            self._request(b"GET", k, timeout=seconds)

    def close(self) -> None:
        """Closes the client and, on the hosting rank, stops the server."""
        self._sock.close()
        if self._server:
            self._server.stop()
            self._server = None


_shared: dict[tuple[str, int], Store] = {}
_shared_lock = threading.Lock()


def shared_store(rank: int, timeout: float = 300.0) -> Store:
    """The process's store for MASTER_ADDR:MASTER_PORT (env:// rendezvous, as
    torchrun sets it), served by rank 0; one per address, shared by every
    communicator of the process."""
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ValueError(f"env:// rendezvous needs {', '.join(missing)} in the environment")
    key = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    with _shared_lock:
        store = _shared.get(key)
        if store is None:
            store = _shared[key] = Store(key[0], key[1], rank == 0, timeout)
        return store
