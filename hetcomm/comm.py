"""``Communicator``: hetcomm's collectives on numpy arrays and buffers, without torch.

Every op runs in the C core on the communicator's worker thread, in issue
order, with the GIL released; ``async_op=True`` returns a :class:`Work` at
once. Inputs must stay unchanged, and outputs untouched, until the op is done.
"""
from __future__ import annotations

import atexit
import enum
import itertools
import json
import logging
import threading
import weakref
from datetime import timedelta
from typing import Any, Sequence

import numpy as np

from hetcomm import _native, rendezvous
from hetcomm._capi import ffi, lib
from hetcomm.config import CODECS, Options, parse_rate
from hetcomm.errors import AuthError, HetcommError, PeerLostError, error_for

log = logging.getLogger("hetcomm")

_WAIT_SLICE_MS = 200  # waits return to Python this often, so Ctrl-C works


class ReduceOp(enum.IntEnum):
    """Reductions; strings ("sum", "avg", ...) are accepted wherever these are."""

    SUM = 0
    AVG = 1
    PROD = 2
    MIN = 3
    MAX = 4
    BAND = 5
    BOR = 6
    BXOR = 7


_OP_NAMES = {"sum": 0, "avg": 1, "mean": 1, "prod": 2, "product": 2, "min": 3, "max": 4,
             "band": 5, "bor": 6, "bxor": 7}
_DTYPES = {np.dtype(np.float32): 0, np.dtype(np.float64): 1, np.dtype(np.float16): 2,
           np.dtype(np.int8): 4, np.dtype(np.int16): 5, np.dtype(np.int32): 6, np.dtype(np.int64): 7,
           np.dtype(np.uint8): 8, np.dtype(np.bool_): 9}
_ALGOS = {"auto": 0, "ring": 1, "rd": 2, "tree": 3, "hier": 4}


def reduce_op_code(op: str | int | ReduceOp) -> int:
    """The C code of a reduction given by name or enum."""
    if isinstance(op, str):
        try:
            return _OP_NAMES[op.lower()]
        except KeyError:
            raise ValueError(f"op must be one of {sorted(set(_OP_NAMES))}, got {op!r}") from None
    code = int(op)
    if not 0 <= code < len(ReduceOp):
        raise ValueError(f"op {op!r} is not a ReduceOp")
    return code


def codec_code(codec: str | None) -> int:
    """The C code of a codec name; None means "the communicator's default" (-1)."""
    if codec is None:
        return -1
    try:
        return CODECS.index(codec.lower())
    except ValueError:
        raise ValueError(f"codec must be one of {CODECS}, got {codec!r}") from None


def dtype_code(dtype: np.dtype, what: str) -> int:
    """The C code of a numpy dtype (bfloat16 via ml_dtypes' dtype name)."""
    code = _DTYPES.get(dtype)
    if code is not None:
        return code
    if dtype.name == "bfloat16":
        return 3
    try:
        return _DTYPES[dtype]
    except KeyError:
        supported = ", ".join(sorted(d.name for d in _DTYPES)) + ", bfloat16"
        raise TypeError(f"{what} has dtype {dtype}; supported: {supported}") from None


def _array(buf: Any, what: str, writable: bool) -> np.ndarray:
    arr = buf if isinstance(buf, np.ndarray) else np.asarray(memoryview(buf))
    if not arr.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous (got strides {arr.strides} for shape {arr.shape})")
    if writable and not arr.flags.writeable:
        raise ValueError(f"{what} must be writable")
    return arr


def _ptr(arr: np.ndarray) -> Any:
    # __array_interface__ is several times cheaper than arr.ctypes.
    return ffi.cast("void *", arr.__array_interface__["data"][0]) if arr.size else ffi.NULL


class Work:
    """An op in flight. ``wait()`` returns its result or raises its error."""

    def __init__(self, comm: "Communicator", op: Any, keep: tuple, result: Any, what: str) -> None:
        self._comm = comm
        self._op = op
        self._keep = keep
        self._result = result
        self._what = what
        self._error: Exception | None = None
        self._done = False
        self._lock = threading.Lock()

    def _finish(self, status: int) -> None:
        if status != lib.HC_OK:
            message = ffi.string(lib.hc_op_error(self._op)).decode(errors="replace")
            self._error = self._comm._error(status, f"{self._what}: {message}")
        self.source = lib.hc_op_source(self._op)
        lib.hc_op_release(self._op)
        self._op = None
        self._keep = ()
        self._done = True

    def is_completed(self) -> bool:
        """True once the op finished (successfully or not)."""
        with self._lock:
            if not self._done:
                status = lib.hc_op_status(self._op)
                if status != lib.HC_IN_PROGRESS:
                    self._finish(status)
            return self._done

    def wait(self, timeout: float | timedelta | None = None) -> Any:
        """Blocks until the op is done; returns its result or raises its error.

        ``timeout`` (seconds) bounds this wait only: on expiry TimeoutError is
        raised and the op keeps running (its own timeout still applies).
        """
        seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
        remaining_ms = None if seconds is None else int(seconds * 1000)
        handle = self._comm._handle
        if not self._done and seconds is None and handle != ffi.NULL:
            # Run it here if the worker is idle (not with a deadline: an op
            # running inline cannot stop at it).
            lib.hc_comm_progress(handle)
        with self._lock:
            while not self._done:
                slice_ms = _WAIT_SLICE_MS if remaining_ms is None else min(_WAIT_SLICE_MS, remaining_ms)
                status = lib.hc_op_wait(self._op, slice_ms)
                if status != lib.HC_IN_PROGRESS:
                    self._finish(status)
                    break
                if remaining_ms is not None:
                    remaining_ms -= slice_ms
                    if remaining_ms <= 0:
                        raise TimeoutError(f"{self._what} still running after {seconds} s")
        if self._error is not None:
            raise self._error
        return self._result

    def result(self) -> Any:
        """Same as ``wait()``."""
        return self.wait()


def _warn_if_capped(wanted: int) -> None:
    """Linux silently caps SO_SNDBUF/SO_RCVBUF at net.core.[wr]mem_max, and an
    explicit size also turns off TCP's own buffer tuning."""
    for name in ("wmem_max", "rmem_max"):
        try:
            with open(f"/proc/sys/net/core/{name}") as f:
                cap = int(f.read())
        except (OSError, ValueError):
            continue
        if wanted > cap:
            log.warning("socket buffers of %d bytes asked for, but net.core.%s is %d: the kernel caps them; "
                        "raise it (sysctl -w net.core.%s=%d) or leave the buffers to TCP autotuning",
                        wanted, name, cap, name, wanted)


def connect_peers(handle: Any, rank: int, records: list[dict[str, Any]], ranks: Sequence[int],
                  own: dict[str, Any], curve: tuple[str, str] | None, allow: set[str]) -> None:
    """Tells the core where ``ranks`` listen (from their rendezvous records) and connects.

    ``own`` is this rank's record, ``curve`` its (public, secret) keys when
    CURVE is on, ``allow`` the public keys it trusts from other sites.
    """
    untrusted: list[str] = []
    for r in ranks:
        peer = records[r]
        endpoint = peer["endpoint"]
        if peer["machine"] != own["machine"]:
            # ipc:// only works between processes that share a kernel.
            endpoint = ";".join(e for e in endpoint.split(";") if not e.startswith("ipc="))
        key = ffi.NULL
        if curve and peer["site"] != own["site"]:
            from hetcomm.security import check_peer_key

            try:
                check_peer_key(r, peer.get("curve"), allow)
            except AuthError as exc:
                # Connect anyway, so that both sides see the refusal (our
                # authenticator turns its key away); only greetings, never
                # data, can cross before the handshake fails.
                untrusted.append(str(exc))
            key = (peer.get("curve") or "").encode() or ffi.NULL
        _native.check(lib.hc_comm_set_peer(handle, r, endpoint.encode(), peer["site"].encode(),
                                           peer["host"].encode(), key), "hc_comm_set_peer")
    try:
        _native.check(lib.hc_comm_connect(handle), "hc_comm_connect")
    except HetcommError as exc:
        if untrusted:
            raise AuthError(f"{'; '.join(untrusted)} ({exc})", "HC_ERR_AUTH") from None
        if curve and exc.status == "HC_ERR_AUTH":
            from hetcomm.security import recently_denied

            denied = recently_denied()
            if denied:
                raise AuthError(f"{exc} (keys refused here: {', '.join(denied)})", exc.status) from None
        raise
    if untrusted:
        raise AuthError("; ".join(untrusted), "HC_ERR_AUTH")
    log.debug("rank %d connected to ranks %s", rank, list(ranks))


_live: "weakref.WeakSet[Communicator]" = weakref.WeakSet()


@atexit.register
def _close_all_at_exit() -> None:
    for comm in list(_live):
        comm.close(abort=True)


class Communicator:
    """A group of ranks doing collectives together.

    Args:
        rank, world_size: this rank and the group size; from RANK/WORLD_SIZE when None.
        store: a key-value store for rendezvous (torch's TCPStore/FileStore, or
            hetcomm.store.Store); None: hetcomm's own, served by rank 0 on
            MASTER_ADDR:MASTER_PORT.
        name: the communicator's name; ranks must create communicators of one
            name in the same order.
        timeout: seconds for rendezvous and for every wait inside an op.
        codec: default compression for float sum/avg allreduce ("int8", ...).
        options: every other setting (see hetcomm.config.Options).
    """

    _generations: dict[str, itertools.count] = {}
    _generations_lock = threading.Lock()

    def __init__(self, rank: int | None = None, world_size: int | None = None, *, store: Any = None,
                 name: str = "world", timeout: float | timedelta | None = None, codec: str | None = None,
                 site: str | None = None, options: Options | None = None, _prefix: str | None = None) -> None:
        _native.init()
        opts = options or Options()
        if timeout is not None:
            opts.timeout = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
        if codec is not None:
            opts.codec = codec
        if site is not None:
            opts.site = site
        self.options = opts = opts.resolved()
        if store is None:
            store, rank, world_size = self._env_store(rank, world_size, opts.timeout)
        if rank is None or world_size is None:
            raise ValueError("rank and world_size are required when a store is given")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.rank, self.size, self.name = rank, world_size, name
        self._handle = ffi.NULL
        self._inflight: set[Work] = set()
        self._inflight_lock = threading.Lock()
        if _prefix is None:
            with Communicator._generations_lock:
                gen = next(Communicator._generations.setdefault(name, itertools.count()))
            _prefix = f"hetcomm/{name}/{gen}"
        self._prefix = _prefix
        self._store = store
        try:
            self._connect(store, opts)
        except BaseException:
            self._destroy()
            raise
        _live.add(self)

    # ---- construction -------------------------------------------------

    @staticmethod
    def _env_store(rank: int | None, size: int | None, timeout: float) -> tuple[Any, int, int]:
        import os

        from hetcomm.store import shared_store

        if rank is None or size is None:
            missing = [v for v in ("RANK", "WORLD_SIZE") if not os.environ.get(v)]
            if missing:
                raise ValueError(f"rank/world_size not given and {', '.join(missing)} not set in the environment")
            rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        return shared_store(rank, timeout), rank, size

    def _bind_address(self, opts: Options) -> str:
        import os

        if opts.bind_address:
            return opts.bind_address
        ip = (rendezvous.interface_address(opts.ifname) if opts.ifname
              else rendezvous.address_towards(os.environ.get("MASTER_ADDR")))
        bases = [f"tcp://{ip}"]
        if opts.transport in ("auto", "ipc"):
            bases.append(f"ipc://{rendezvous.ipc_directory()}")
        return ";".join(bases)

    def _config(self, opts: Options, comm_id: int, token: int) -> tuple[Any, list]:
        cfg = ffi.new("hc_config *")
        lib.hc_config_init(cfg)
        keep = []

        def s(text: str) -> Any:
            keep.append(ffi.new("char[]", text.encode()))
            return keep[-1]

        import socket

        cfg.rank, cfg.size = self.rank, self.size
        cfg.name = s(self.name)
        cfg.comm_id, cfg.session_token = comm_id, token
        cfg.zmq_context = ffi.cast("void *", _native.zmq_context().underlying)
        cfg.bind_address = s(self._bind_address(opts))
        cfg.site = s(opts.site or "")
        cfg.host = s(opts.host or socket.gethostname())
        cfg.timeout_ms = int(opts.timeout * 1000)
        cfg.heartbeat_ms = int(opts.heartbeat * 1000)
        cfg.streams = opts.streams
        cfg.chunk_bytes = opts.chunk_bytes
        cfg.small_bytes = opts.small_bytes
        cfg.algo = _ALGOS[opts.algo]
        cfg.codec = codec_code(opts.codec)
        cfg.codec_min_bytes = opts.codec_min_bytes
        cfg.codec_block = opts.codec_block
        cfg.codec_scale_fp32 = 1 if opts.codec_scale == "fp32" else 0
        cfg.sndbuf_bytes = cfg.rcvbuf_bytes = opts.socket_buffer
        _warn_if_capped(opts.socket_buffer)
        cfg.shm_enable = int(opts.shm)
        cfg.shm_bytes = opts.shm_bytes
        cfg.spin_us = opts.spin_us
        cfg.cma_enable = int(opts.cma)
        cfg.hugepages = int(opts.hugepages)
        cfg.wan_bandwidth = parse_rate(opts.wan_bandwidth) if opts.wan_bandwidth else 0.0
        if self._curve:
            cfg.curve_enable = 1
            cfg.curve_public_key = s(self._curve[0])
            cfg.curve_secret_key = s(self._curve[1])
        return cfg, keep

    def _connect(self, store: Any, opts: Options) -> None:
        self._curve = None
        allow: set[str] = set()
        if opts.curve:
            from hetcomm import security

            self._curve = security.load_secret(opts.curve_secret)
            allow = security.load_allow_list(opts.curve_allow)
            security.start_authenticator(_native.zmq_context(), allow)
        comm_id, token = rendezvous.agree_identity(store, self._prefix, self.rank)
        cfg, keep = self._config(opts, comm_id, token)
        handle = ffi.new("hc_comm **")
        _native.check(lib.hc_comm_create(cfg, handle), "hc_comm_create")
        self._handle = handle[0]
        self._record = {"endpoint": ffi.string(lib.hc_comm_endpoint(self._handle)).decode(),
                        "site": opts.site or "", "host": ffi.string(cfg.host).decode(),
                        "machine": rendezvous.machine_id(), "curve": self._curve[0] if self._curve else None}
        self._allow = allow
        del keep
        peers = rendezvous.exchange(store, self._prefix, self.rank, self.size, self._record)
        self._connect_peers(peers, [r for r in range(self.size) if r != self.rank])
        log.debug("%s: rank %d/%d connected", self.name, self.rank, self.size)

    def _connect_peers(self, peers: list[dict[str, Any]], ranks: Sequence[int]) -> None:
        """Tells the core where ranks ``ranks`` listen (from their rendezvous records), then connects."""
        connect_peers(self._handle, self.rank, peers, ranks, self._record, self._curve, self._allow)

    # ---- lifecycle ------------------------------------------------------

    def _destroy(self) -> None:
        if self._handle != ffi.NULL:
            lib.hc_comm_destroy(self._handle)
            self._handle = ffi.NULL

    def close(self, abort: bool = False) -> None:
        """Finishes queued ops (or fails them, with ``abort``) and releases the sockets."""
        if self._handle == ffi.NULL:
            return
        if abort:
            with self._inflight_lock:
                pending = any(not w.is_completed() for w in self._inflight)
            if pending:
                lib.hc_comm_abort(self._handle, b"closed with ops in flight")
        with self._inflight_lock:
            works = list(self._inflight)
            self._inflight.clear()
        self._destroy()
        for w in works:
            w.is_completed()
        _live.discard(self)

    def abort(self, reason: str = "aborted by the user") -> None:
        """Fails the running and queued ops here and on every peer."""
        if self._handle != ffi.NULL:
            lib.hc_comm_abort(self._handle, reason.encode())

    def __enter__(self) -> "Communicator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(abort=exc[0] is not None)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter teardown
            pass

    # ---- introspection --------------------------------------------------

    @property
    def bytes_sent(self) -> int:
        """Payload bytes this rank has put on the wire."""
        return lib.hc_comm_bytes_sent(self._live_handle())

    @property
    def bytes_sent_intersite(self) -> int:
        """Of ``bytes_sent``, those that went to another site."""
        return lib.hc_comm_bytes_sent_intersite(self._live_handle())

    @property
    def endpoint(self) -> str:
        """Where this rank listens ("tcp=tcp://host:port;ipc=...")."""
        return ffi.string(lib.hc_comm_endpoint(self._live_handle())).decode()

    @property
    def site_count(self) -> int:
        """How many distinct sites the ranks of this communicator are in."""
        return lib.hc_comm_site_count(self._live_handle())

    def link_rtt(self, peer: int) -> float:
        """Round trip to rank ``peer`` in seconds, measured once when connecting."""
        if not isinstance(peer, (int, np.integer)) or not 0 <= peer < self.size or peer == self.rank:
            raise ValueError(f"peer {peer!r} is not another rank of this communicator (rank {self.rank} "
                             f"of {self.size})")
        return lib.hc_comm_peer_rtt_ns(self._live_handle(), int(peer)) / 1e9

    def ring_order(self) -> list[int]:
        """The rank order the ring algorithms use (sites kept adjacent)."""
        out = ffi.new("int[]", self.size)
        _native.check(lib.hc_comm_ring_order(self._live_handle(), out, self.size))
        return list(out)

    # ---- membership: failures, shrink, grow -----------------------------

    def _error(self, status: int, message: str) -> Exception:
        """The exception for a failed op; a PeerLostError carries the failed ranks known now."""
        exc = error_for(_native.status_name(status), message)
        if isinstance(exc, PeerLostError) and self._handle != ffi.NULL:
            exc.failed_ranks = self._failed_ranks(0)[0]
        return exc

    def _failed_ranks(self, timeout_ms: int) -> tuple[list[int], int]:
        out = ffi.new("int[]", self.size)
        count = ffi.new("int *")
        status = lib.hc_comm_failed_ranks(self._live_handle(), timeout_ms, out, self.size, count)
        return [out[i] for i in range(min(count[0], self.size))], status

    def failed_ranks(self, timeout: float | None = None) -> list[int]:
        """The ranks that failed (died, or went silent for a heartbeat interval), ascending.

        Waits up to ``timeout`` seconds (default: the communicator's timeout;
        0: not at all) until the survivors agree on that set, so every
        survivor gets the same list. Raises CommTimeoutError if they have not
        agreed in time (the message holds this rank's own view). An empty list
        means nothing failed.
        """
        seconds = self.options.timeout if timeout is None else timeout
        ranks, status = self._failed_ranks(int(seconds * 1000))
        if status == lib.HC_ERR_TIMEOUT and seconds > 0:
            raise error_for("HC_ERR_TIMEOUT", f"{self.name} rank {self.rank}: the survivors did not agree on the "
                                              f"failed ranks within {seconds} s (this rank holds {ranks} failed)")
        return ranks

    def _derived(self, handle: Any) -> "Communicator":
        """A Communicator around a handle the core made from this one (shrink, grow)."""
        new = object.__new__(Communicator)
        new.rank, new.size, new.name = lib.hc_comm_rank(handle), lib.hc_comm_size(handle), self.name
        new.options, new._handle = self.options, handle
        new._inflight, new._inflight_lock = set(), threading.Lock()
        new._prefix, new._store = self._prefix, self._store
        new._record, new._allow, new._curve = self._record, self._allow, self._curve
        _live.add(new)
        return new

    def shrink(self, exclude: Sequence[int], *, abort: bool = False) -> "Communicator":
        """A new communicator of every rank but ``exclude``, over the links this one holds.

        Every remaining rank calls it with the same ``exclude`` (usually
        ``failed_ranks()``, or ``PeerLostError.failed_ranks``); the excluded
        ranks do not call it. No rendezvous: the ranks are renumbered in
        order (rank r becomes r minus the excluded ranks below it), and the
        sites, topology, keys and settings stay. Works on a communicator
        broken by a lost peer and on a healthy one. Queued ops finish first
        (or, with ``abort``, fail at once here and on the peers). Error-feedback
        residuals start from zero in the new communicator.

        Afterwards this communicator only fails ops (close it as usual).
        Raises MismatchError if the ranks passed different sets, PeerLostError
        if a rank kept was lost meanwhile (shrink again without it), and
        CommTimeoutError if a kept rank never called shrink.
        """
        excluded = sorted({int(r) for r in exclude})
        if len(excluded) != len(list(exclude)):
            raise ValueError(f"exclude lists a rank twice: {list(exclude)}")
        for r in excluded:
            if not 0 <= r < self.size or r == self.rank:
                raise ValueError(f"exclude holds {r}: not another rank of this communicator (rank {self.rank} "
                                 f"of {self.size})")
        ranks = ffi.new("int[]", excluded or [0])
        out = ffi.new("hc_comm **")
        flags = lib.HC_SHRINK_ABORT if abort else lib.HC_SHRINK_DEFAULT
        status = lib.hc_comm_shrink(self._live_handle(), ranks, len(excluded), flags, out)
        if status != lib.HC_OK:
            detail = ffi.string(lib.hc_last_error()).decode(errors="replace")
            raise self._error(status, f"{self.name} rank {self.rank}: shrink: {detail}")
        return self._derived(out[0])

    def grow(self, new_size: int) -> "Communicator":
        """A new communicator of ``new_size`` ranks: these ranks keep their rank
        and links, and ranks ``size .. new_size-1`` are newcomers that call
        :meth:`Communicator.join` on the same store. If a newcomer never
        connects (the rendezvous times out), the error is raised and this
        communicator goes on with its members (shrunk back over their links).

        Every rank of this communicator calls it at the same point (a step
        boundary, no op in flight). It returns once every newcomer has
        connected; typically the members then broadcast the model state from
        rank 0, which the newcomers receive with the same broadcast. This
        communicator only fails ops afterwards (close it as usual).
        """
        if not isinstance(new_size, (int, np.integer)) or new_size <= self.size:
            raise ValueError(f"new_size must be above the current size {self.size}, got {new_size!r}")
        base = f"hetcomm/{self.name}/grow"
        number = np.zeros(1, np.int64)
        if self.rank == 0:
            number[0] = self._store.add(f"{base}s", 1)
            self._store.set(f"{base}/{int(number[0])}", json.dumps({"size": int(new_size), "members": self.size}))
        self.broadcast(number, root=0)
        prefix = f"{base}/{int(number[0])}"
        comm_id, token = rendezvous.agree_identity(self._store, prefix, self.rank)
        out = ffi.new("hc_comm **")
        status = lib.hc_comm_grow(self._live_handle(), int(new_size), comm_id, token, out)
        if status != lib.HC_OK:
            detail = ffi.string(lib.hc_last_error()).decode(errors="replace")
            raise self._error(status, f"{self.name} rank {self.rank}: grow: {detail}")
        new = self._derived(out[0])
        new._prefix = prefix
        try:
            peers = rendezvous.exchange(self._store, prefix, self.rank, int(new_size), self._record)
            new._connect_peers(peers, range(self.size, int(new_size)))
        except BaseException as exc:
            self._fall_back(new, exc)
            raise
        log.info("%s: rank %d grew from %d to %d ranks", self.name, self.rank, self.size, new_size)
        return new

    def _fall_back(self, grown: "Communicator", exc: BaseException) -> None:
        """After a grow whose newcomers did not all connect: this communicator
        goes on with its members only (the grown one shrunk back over their
        links), so the caller can carry on at the old size."""
        try:
            back = grown.shrink(range(self.size, grown.size))
        except HetcommError as again:
            log.error("%s: rank %d: grow failed (%s) and going back to %d ranks failed too: %s", self.name,
                      self.rank, exc, self.size, again)
            grown.close(abort=True)
            return
        grown.close()
        _live.discard(back)
        lib.hc_comm_destroy(self._handle)
        self._handle, back._handle = back._handle, ffi.NULL
        log.warning("%s: rank %d: grow failed (%s); going on with the %d members", self.name, self.rank, exc,
                    self.size)

    @classmethod
    def join(cls, store: Any = None, *, name: str = "world", timeout: float | timedelta | None = None,
             codec: str | None = None, site: str | None = None, options: Options | None = None) -> "Communicator":
        """Joins a running group as a newcomer, when its members call :meth:`grow`.

        ``store`` is the group's store (None: the env:// one at
        MASTER_ADDR:MASTER_PORT, as a client). Blocks until the members grow
        (up to the store's timeout); the newcomer gets the next free rank of
        that grow (the group's size before it, and up). Pass the settings the
        members use (codec, options).
        """
        if store is None:
            import os

            from hetcomm.store import Store

            store = Store(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"]), False,
                          Options(timeout=timeout if isinstance(timeout, (int, float)) else None).resolved().timeout)
        base = f"hetcomm/{name}/grow"
        number = store.add(f"{base}s", 0)
        if number == 0:
            number = 1  # no grow yet: wait for the first one
        while True:
            # Blocks until the members publish grow `number`.
            info = json.loads(bytes(store.get(f"{base}/{number}")))
            ticket = store.add(f"{base}/{number}/ticket", 1)
            if ticket <= info["size"] - info["members"]:
                break
            number += 1  # that grow is full: wait for the next one
        rank = info["members"] + ticket - 1
        return cls(rank, info["size"], store=store, name=name, timeout=timeout, codec=codec, site=site,
                   options=options, _prefix=f"{base}/{number}")

    def _live_handle(self) -> Any:
        if self._handle == ffi.NULL:
            raise ValueError(f"communicator {self.name!r} is closed")
        return self._handle

    # ---- op plumbing ----------------------------------------------------

    def _submit(self, fn: Any, args: tuple, keep: tuple, result: Any, what: str, async_op: bool,
                codec: str | None = None, residual_key: int | None = None, sr_seed: int | None = None,
                algo: str | None = None) -> Any:
        opts = ffi.new("hc_call_opts *")
        lib.hc_call_opts_init(opts)
        opts.codec = codec_code(codec)
        if algo is not None:
            if algo not in _ALGOS:
                raise ValueError(f"algo must be one of {sorted(_ALGOS)}, got {algo!r}")
            opts.algo = _ALGOS[algo]
        if residual_key is not None:
            if not 0 < residual_key < 2**64:
                raise ValueError(f"residual_key must be a positive 64-bit integer, got {residual_key}")
            opts.residual_key = residual_key
        if sr_seed is not None:
            opts.sr_seed = sr_seed & (2**64 - 1) or 1
        if not async_op:
            # Blocking: the core may run it on this thread (GIL released),
            # and the buffers in `keep` live until it returns.
            status = fn(self._live_handle(), *args, opts, ffi.NULL)
            if status != lib.HC_OK:
                detail = ffi.string(lib.hc_last_error()).decode(errors="replace")
                raise self._error(status, f"{self.name} rank {self.rank}: {what}: {detail}")
            return result
        out = ffi.new("hc_op **")
        _native.check(fn(self._live_handle(), *args, opts, out), what)
        work = Work(self, out[0], keep, result, f"{self.name} rank {self.rank}: {what}")
        with self._inflight_lock:
            self._inflight = {w for w in self._inflight if not w._done}
            self._inflight.add(work)
        return work

    def _check_root(self, root: int) -> None:
        if not isinstance(root, (int, np.integer)) or not 0 <= root < self.size:
            raise ValueError(f"root {root!r} is not a rank in [0, {self.size})")

    def _out(self, out: Any, like: np.ndarray, count: int, what: str) -> np.ndarray:
        if out is None:
            return np.empty(count, dtype=like.dtype)
        arr = _array(out, what, True)
        if arr.dtype != like.dtype:
            raise TypeError(f"{what} has dtype {arr.dtype}, expected {like.dtype}")
        if arr.size != count:
            raise ValueError(f"{what} holds {arr.size} elements, expected {count}")
        return arr

    # ---- collectives ----------------------------------------------------

    def allreduce(self, buf: Any, op: str | int = "sum", *, out: Any = None, codec: str | None = None,
                  residual_key: int | None = None, sr_seed: int | None = None, algo: str | None = None,
                  async_op: bool = False) -> Any:
        """Reduces ``buf`` across ranks; the result goes to ``out`` or, by default, back into ``buf``.

        ``codec`` compresses float sum/avg on the wire ("fp16", "bf16", "int8", "int4",
        "1bit"; default: the communicator's); ``residual_key`` turns on error feedback
        with a residual kept under that key; ``sr_seed`` turns on stochastic rounding;
        ``algo`` ("ring", "rd", "hier") overrides the algorithm choice where it can run.
        """
        src = _array(buf, "buf", out is None)
        dst = src if out is None else self._out(out, src, src.size, "out")
        dt = dtype_code(src.dtype, "buf")
        return self._submit(lib.hc_allreduce, (_ptr(src), _ptr(dst), src.size, dt, reduce_op_code(op)),
                            (src, dst), dst, "allreduce", async_op, codec, residual_key, sr_seed, algo)

    def broadcast(self, buf: Any, root: int = 0, *, async_op: bool = False) -> Any:
        """Copies root's ``buf`` into every rank's ``buf``."""
        self._check_root(root)
        arr = _array(buf, "buf", True)
        return self._submit(lib.hc_broadcast, (_ptr(arr), arr.size, dtype_code(arr.dtype, "buf"), root),
                            (arr,), arr, "broadcast", async_op)

    def reduce(self, buf: Any, root: int = 0, op: str | int = "sum", *, out: Any = None,
               async_op: bool = False) -> Any:
        """Reduces to ``root``: its ``out`` (or ``buf``) gets the result; other ranks' buffers are unchanged."""
        self._check_root(root)
        src = _array(buf, "buf", out is None and self.rank == root)
        dst = (src if out is None else self._out(out, src, src.size, "out")) if self.rank == root else None
        ptr = _ptr(dst) if dst is not None else ffi.NULL
        return self._submit(lib.hc_reduce, (_ptr(src), ptr, src.size, dtype_code(src.dtype, "buf"),
                                            reduce_op_code(op), root), (src, dst), dst, "reduce", async_op)

    def allgather(self, buf: Any, out: Any = None, *, codec: str | None = None, async_op: bool = False) -> Any:
        """Every rank's ``buf``, stacked: shape ``(size, *buf.shape)`` (or ``out``, size*len elements).

        A ``codec`` here is lossy for every rank's data (each decodes the same bytes).
        """
        src = _array(buf, "buf", False)
        dst = self._out(out, src, src.size * self.size, "out")
        if out is None:
            dst = dst.reshape((self.size, *src.shape))
        return self._submit(lib.hc_allgather, (_ptr(src), _ptr(dst), src.size, dtype_code(src.dtype, "buf")),
                            (src, dst), dst, "allgather", async_op, codec)

    def reduce_scatter(self, buf: Any, op: str | int = "sum", *, out: Any = None, codec: str | None = None,
                       residual_key: int | None = None, async_op: bool = False) -> Any:
        """Reduces ``buf`` (size equal blocks) across ranks; rank r gets block r."""
        src = _array(buf, "buf", False)
        if src.size % self.size:
            raise ValueError(f"buf holds {src.size} elements, not a multiple of the world size {self.size}")
        count = src.size // self.size
        dst = self._out(out, src, count, "out")
        return self._submit(lib.hc_reduce_scatter, (_ptr(src), _ptr(dst), count, dtype_code(src.dtype, "buf"),
                                                    reduce_op_code(op)), (src, dst), dst, "reduce_scatter",
                            async_op, codec, residual_key)

    def gather(self, buf: Any, root: int = 0, out: Any = None, *, async_op: bool = False) -> Any:
        """Root gets every rank's ``buf`` stacked (shape ``(size, *buf.shape)``); others get None."""
        self._check_root(root)
        src = _array(buf, "buf", False)
        dst = None
        if self.rank == root:
            dst = self._out(out, src, src.size * self.size, "out")
            if out is None:
                dst = dst.reshape((self.size, *src.shape))
        return self._submit(lib.hc_gather, (_ptr(src), _ptr(dst) if dst is not None else ffi.NULL, src.size,
                                            dtype_code(src.dtype, "buf"), root), (src, dst), dst, "gather", async_op)

    def scatter(self, buf: Any, out: Any, root: int = 0, *, async_op: bool = False) -> Any:
        """Root's ``buf`` holds size equal blocks; rank r receives block r into ``out``."""
        self._check_root(root)
        dst = _array(out, "out", True)
        src = None
        if self.rank == root:
            src = _array(buf, "buf", False)
            if src.dtype != dst.dtype or src.size != dst.size * self.size:
                raise ValueError(f"root's buf ({src.size} x {src.dtype}) must hold size ({self.size}) x "
                                 f"out ({dst.size} x {dst.dtype})")
        return self._submit(lib.hc_scatter, (_ptr(src) if src is not None else ffi.NULL, _ptr(dst), dst.size,
                                             dtype_code(dst.dtype, "out"), root), (src, dst), dst, "scatter", async_op)

    def alltoall(self, buf: Any, out: Any = None, *, async_op: bool = False) -> Any:
        """``buf`` holds size equal blocks; block r goes to rank r; ``out`` block r came from rank r."""
        src = _array(buf, "buf", False)
        if src.size % self.size:
            raise ValueError(f"buf holds {src.size} elements, not a multiple of the world size {self.size}")
        dst = self._out(out, src, src.size, "out")
        if out is None:
            dst = dst.reshape(src.shape)
        return self._submit(lib.hc_alltoall, (_ptr(src), _ptr(dst), src.size // self.size,
                                              dtype_code(src.dtype, "buf")), (src, dst), dst, "alltoall", async_op)

    def alltoallv(self, buf: Any, send_counts: Sequence[int], out: Any, recv_counts: Sequence[int], *,
                  async_op: bool = False) -> Any:
        """All-to-all with per-rank element counts; blocks are packed in rank order."""
        src, dst = _array(buf, "buf", False), _array(out, "out", True)
        if len(send_counts) != self.size or len(recv_counts) != self.size:
            raise ValueError(f"send_counts and recv_counts need {self.size} entries, got "
                             f"{len(send_counts)} and {len(recv_counts)}")
        if any(c < 0 for c in (*send_counts, *recv_counts)):
            raise ValueError("counts must not be negative")
        if sum(send_counts) != src.size or sum(recv_counts) != dst.size:
            raise ValueError(f"send_counts sum to {sum(send_counts)} (buf holds {src.size}); recv_counts sum "
                             f"to {sum(recv_counts)} (out holds {dst.size})")
        if src.dtype != dst.dtype:
            raise TypeError(f"buf is {src.dtype} but out is {dst.dtype}")
        sc = ffi.new("size_t[]", list(send_counts))
        rc = ffi.new("size_t[]", list(recv_counts))
        sd = ffi.new("size_t[]", list(itertools.accumulate([0, *send_counts[:-1]])))
        rd = ffi.new("size_t[]", list(itertools.accumulate([0, *recv_counts[:-1]])))
        return self._submit(lib.hc_alltoallv, (_ptr(src), sc, sd, _ptr(dst), rc, rd, dtype_code(src.dtype, "buf")),
                            (src, dst, sc, rc, sd, rd), dst, "alltoallv", async_op)

    def barrier(self, *, async_op: bool = False) -> Any:
        """Returns once every rank has entered the barrier."""
        return self._submit(lib.hc_barrier, (), (), None, "barrier", async_op)

    def send(self, buf: Any, dst: int, tag: int = 0, *, async_op: bool = False) -> Any:
        """Sends ``buf`` to rank ``dst``; matched by the receiver's (source, tag)."""
        arr = _array(buf, "buf", False)
        return self._submit(lib.hc_send, (_ptr(arr), arr.size, dtype_code(arr.dtype, "buf"), int(dst), int(tag)),
                            (arr,), None, f"send to {dst}", async_op)

    def recv(self, buf: Any, src: int | None = None, tag: int = 0, *, async_op: bool = False) -> Any:
        """Receives into ``buf`` from ``src`` (any rank when None); returns the sender's rank."""
        arr = _array(buf, "buf", True)
        peer = lib.HC_ANY_SOURCE if src is None else int(src)
        work = self._submit(lib.hc_recv, (_ptr(arr), arr.size, dtype_code(arr.dtype, "buf"), peer, int(tag)),
                            (arr,), None, f"recv from {'any' if src is None else src}", True)
        if async_op:
            return work
        work.wait()
        return work.source
