"""The cffi binding of the C core: loading, libzmq wiring, logging, errors.

The core resolves libzmq at run time from the copy pyzmq already loaded
(``zmq.backend.cython._zmq``), so the process never holds two libzmq copies
and no system libzmq is needed.
"""
from __future__ import annotations

import atexit
import logging
import os
import threading

import zmq
import zmq.backend.cython._zmq as _zmq_backend

from hetcomm._capi import ffi, lib
from hetcomm.errors import error_for

log = logging.getLogger("hetcomm")

_init_lock = threading.Lock()
_initialized = False


@ffi.def_extern()
def hc_python_log(level: int, message, user) -> None:  # noqa: ANN001 - cffi callback
    log.log(level, ffi.string(message).decode(errors="replace"))


def _effective_level() -> int:
    level = log.getEffectiveLevel()
    return level if level > 0 else logging.WARNING


def _apply_env_log_level() -> None:
    """HETCOMM_LOG_LEVEL=DEBUG|INFO|... sets the "hetcomm" logger's level and,
    when the program configured no logging, prints hetcomm's records to stderr."""
    level = os.environ.get("HETCOMM_LOG_LEVEL")
    if not level:
        return
    value = logging.getLevelName(level.upper())
    if not isinstance(value, int):
        raise ValueError(f"HETCOMM_LOG_LEVEL={level!r} is not a logging level (DEBUG, INFO, WARNING, ERROR)")
    log.setLevel(value)
    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        log.addHandler(handler)


def init() -> None:
    """Resolves libzmq and installs the log bridge once; every call passes the
    "hetcomm" logger's current level down to C, so logging configured after
    ``import hetcomm`` applies to communicators made afterwards."""
    global _initialized
    with _init_lock:
        if not _initialized:
            _apply_env_log_level()
            path = _zmq_backend.__file__.encode()
            check(lib.hc_init(path, 0), "hc_init")
            atexit.register(lib.hc_set_logger, ffi.NULL, ffi.NULL, 0)
            _initialized = True
        lib.hc_set_logger(lib.hc_python_log, ffi.NULL, _effective_level())


def status_name(status: int) -> str:
    return ffi.string(lib.hc_status_name(status)).decode()


def check(status: int, what: str = "") -> None:
    """Raises the matching exception for a failed C call (message from hc_last_error)."""
    if status == lib.HC_OK:
        return
    detail = ffi.string(lib.hc_last_error()).decode(errors="replace")
    raise error_for(status_name(status), detail or f"{what} failed with {status_name(status)}")


def zmq_context() -> zmq.Context:
    """The process-wide ZeroMQ context hetcomm's sockets live in.

    Shared with pyzmq so a ZAP authenticator (CURVE allow-list) can serve it.
    """
    return _context_holder.get()


class _ContextHolder:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ctx: zmq.Context | None = None

    def get(self) -> zmq.Context:
        with self._lock:
            if self._ctx is None:
                from hetcomm.config import env_int

                self._ctx = zmq.Context(io_threads=env_int("HETCOMM_IO_THREADS", 1))
            return self._ctx


_context_holder = _ContextHolder()
