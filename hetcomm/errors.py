"""Exceptions raised by hetcomm, one per C status code that a caller may handle."""
from __future__ import annotations


class HetcommError(RuntimeError):
    """A collective or communicator failed; ``status`` is the C status name."""

    def __init__(self, message: str, status: str = "HC_ERR_UNKNOWN") -> None:
        super().__init__(message)
        self.status = status


class CommTimeoutError(HetcommError, TimeoutError):
    """A peer did not answer within the timeout."""


class PeerLostError(HetcommError, ConnectionError):
    """A peer was lost: its connection closed without a goodbye (it exited,
    crashed or was killed), or it stayed silent for a heartbeat interval.

    ``failed_ranks`` lists the ranks the survivors agreed had failed, as far
    as that agreement had come when the op failed (``Communicator.failed_ranks``
    waits for it); pass it to ``Communicator.shrink``.
    """

    failed_ranks: list[int]

    def __init__(self, message: str, status: str = "HC_ERR_PEER_LOST", failed_ranks: list[int] | None = None) -> None:
        super().__init__(message, status)
        self.failed_ranks = list(failed_ranks or [])


class MismatchError(HetcommError):
    """Ranks issued different collectives, or different sizes, as the same call."""


class ProtocolError(HetcommError):
    """A message that is not hetcomm's, or one out of sequence."""


class AbortedError(HetcommError):
    """The communicator was aborted, here or on another rank, or broken by an earlier error."""


class AuthError(HetcommError, PermissionError):
    """A peer was refused by CURVE authentication."""


_BY_STATUS: dict[str, type[Exception]] = {
    "HC_ERR_INVALID_ARGUMENT": ValueError,
    "HC_ERR_UNSUPPORTED": TypeError,
    "HC_ERR_NO_MEMORY": MemoryError,
    "HC_ERR_TIMEOUT": CommTimeoutError,
    "HC_ERR_PEER_LOST": PeerLostError,
    "HC_ERR_MISMATCH": MismatchError,
    "HC_ERR_PROTOCOL": ProtocolError,
    "HC_ERR_ABORTED": AbortedError,
    "HC_ERR_AUTH": AuthError,
}


def error_for(status: str, message: str) -> Exception:
    """The exception to raise for a C status name and its detailed message."""
    cls = _BY_STATUS.get(status, HetcommError)
    if issubclass(cls, HetcommError):
        return cls(message, status)
    return cls(message)
