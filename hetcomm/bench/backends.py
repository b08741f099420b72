"""Backends for hetcomm-bench: one rank's handle on a communication library.

Two implementations sit behind :class:`Backend`:

* :class:`HetcommNumpyBackend` (``--backend hetcomm --via numpy``, the default):
  hetcomm's plain ``Communicator`` on numpy arrays, out of place where the
  API allows it (allreduce, allgather, reduce_scatter, alltoall with ``out=``;
  broadcast is in place), codecs passed per call, ``bytes_sent`` read for the
  wire-bytes figure.
* :class:`TorchDistBackend` (``--via torch``): any ``torch.distributed``
  backend by name (``gloo`` today, ``hetcomm`` once its process group lands),
  through ``init_process_group(name)`` and the public collective functions.
  ``all_reduce`` and ``broadcast`` are in place there.

Both rendezvous through the ``MASTER_ADDR``/``MASTER_PORT`` environment the
launcher sets. Nothing here imports torch or hetcomm at module import time.
"""
from __future__ import annotations

import importlib
import importlib.util
from abc import ABC, abstractmethod
from typing import Any, Callable

import numpy as np

from .collectives import DType

#: torch.distributed backends that ship with torch (no module to import for them).
TORCH_BUILTIN_BACKENDS = {"gloo", "nccl", "mpi", "ucc", "xccl"}

#: dtypes a torch.distributed backend is known to refuse ("Invalid scalar type").
TORCH_UNSUPPORTED_DTYPES = {"gloo": {"int16"}}


class BackendUnavailable(RuntimeError):
    """The requested backend/path cannot run here (missing module, unsupported option)."""


def hetcomm_unavailable_reason() -> str | None:
    """Why ``hetcomm.Communicator`` cannot be used, or None when it can."""
    try:
        import hetcomm
    except Exception as exc:  # a broken native build raises more than ImportError
        return f"import hetcomm failed: {type(exc).__name__}: {exc}"
    return None


class Backend(ABC):
    """One rank's side of a communication library, as the per-rank loop drives it.

    Buffers are whatever the library works on (numpy arrays, torch tensors);
    the loop only moves them through these methods, so a backend is free in
    its buffer type. All buffers are 1-D and contiguous.
    """

    #: backend name (``hetcomm``, ``gloo`` ...)
    name: str
    #: ``numpy`` or ``torch``
    via: str

    @abstractmethod
    def setup(self, rank: int, world_size: int, timeout: float) -> None:
        """Join the group (rendezvous via ``MASTER_ADDR``/``MASTER_PORT``)."""

    @abstractmethod
    def inplace(self, op: str) -> bool:
        """True when ``op`` writes its result into the send buffer."""

    @abstractmethod
    def from_numpy(self, data: np.ndarray, dtype: DType) -> Any:
        """A new buffer of ``dtype`` holding ``data`` (which is in ``dtype.check``)."""

    @abstractmethod
    def full(self, count: int, value: float | int | bool, dtype: DType) -> Any:
        """A new buffer of ``count`` elements, all ``value``."""

    @abstractmethod
    def assign(self, buf: Any, data: np.ndarray) -> None:
        """Overwrite ``buf`` with ``data`` (same length, in ``dtype.check``)."""

    @abstractmethod
    def read(self, buf: Any, start: int, stop: int) -> np.ndarray:
        """Elements ``[start, stop)`` of ``buf`` as numpy (bfloat16 widened to float32)."""

    @abstractmethod
    def raw(self, buf: Any) -> Any:
        """``buf``'s bytes as a contiguous buffer object (for the cross-rank digest)."""

    @abstractmethod
    def make_call(self, op: str, send: Any, recv: Any, *, root: int, codec: str) -> Callable[[], object]:
        """A zero-argument callable that runs one ``op`` (blocking) on these buffers."""

    @abstractmethod
    def barrier(self) -> None:
        """Block until every rank has reached this point."""

    def bytes_sent(self) -> int | None:
        """Payload bytes this rank has put on the wire so far, or None if unknown."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Leave the group and free its resources."""

    def versions(self) -> dict[str, str]:
        """Library versions worth recording in the results."""
        return {}


class HetcommNumpyBackend(Backend):
    """hetcomm's numpy ``Communicator``."""

    name = "hetcomm"
    via = "numpy"

    def __init__(self) -> None:
        self.comm: Any = None
        self.world_size = 0

    def setup(self, rank: int, world_size: int, timeout: float) -> None:
        import hetcomm

        self.world_size = world_size
        self.comm = hetcomm.Communicator(rank, world_size, timeout=timeout)

    def inplace(self, op: str) -> bool:
        return op == "broadcast"

    def from_numpy(self, data: np.ndarray, dtype: DType) -> np.ndarray:
        if dtype.numpy is None:
            raise BackendUnavailable(f"{dtype.name} has no numpy type; use --via torch")
        return np.array(data, dtype=dtype.numpy, copy=True)

    def full(self, count: int, value: float | int | bool, dtype: DType) -> np.ndarray:
        return np.full(count, value, dtype=dtype.numpy)

    def assign(self, buf: np.ndarray, data: np.ndarray) -> None:
        np.copyto(buf, data)

    def read(self, buf: np.ndarray, start: int, stop: int) -> np.ndarray:
        return buf[start:stop]

    def raw(self, buf: np.ndarray) -> np.ndarray:
        return buf.view(np.uint8)

    def make_call(self, op: str, send: np.ndarray, recv: np.ndarray, *, root: int,
                  codec: str) -> Callable[[], object]:
        comm = self.comm
        kw = {} if codec == "none" else {"codec": codec}
        if op == "allreduce":
            return lambda: comm.allreduce(send, op="sum", out=recv, **kw)
        if op == "broadcast":
            return lambda: comm.broadcast(send, root=root)
        if op == "allgather":
            out = recv.reshape(self.world_size, -1)
            return lambda: comm.allgather(send, out=out)
        if op == "reduce_scatter":
            return lambda: comm.reduce_scatter(send, op="sum", out=recv, **kw)
        if op == "alltoall":
            return lambda: comm.alltoall(send, out=recv)
        raise ValueError(f"unknown op {op!r}")

    def barrier(self) -> None:
        self.comm.barrier()

    def bytes_sent(self) -> int | None:
        value = getattr(self.comm, "bytes_sent", None)
        return None if value is None else int(value)

    def close(self) -> None:
        if self.comm is not None:
            self.comm.close()
            self.comm = None

    def versions(self) -> dict[str, str]:
        import hetcomm

        return {"hetcomm": str(getattr(hetcomm, "__version__", _dist_version("hetcomm")))}


class TorchDistBackend(Backend):
    """Any ``torch.distributed`` backend by name, on CPU tensors."""

    via = "torch"

    def __init__(self, name: str, codec: str = "none") -> None:
        self.name = name
        self.codec = codec
        self.dist: Any = None
        self.torch: Any = None

    def setup(self, rank: int, world_size: int, timeout: float) -> None:
        import datetime

        import torch
        import torch.distributed as dist

        ensure_torch_backend(self.name)
        self.torch, self.dist = torch, dist
        options = None
        if self.codec != "none":  # the group's default codec: float sum/avg allreduce and reduce_scatter
            from hetcomm.torch import ProcessGroupOptions

            options = ProcessGroupOptions(codec=self.codec)
        dist.init_process_group(backend=self.name, init_method="env://", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout), pg_options=options)

    def inplace(self, op: str) -> bool:
        return op in ("allreduce", "broadcast")

    def _tdtype(self, dtype: DType) -> Any:
        return getattr(self.torch, dtype.name)

    def from_numpy(self, data: np.ndarray, dtype: DType) -> Any:
        t = self.torch.from_numpy(np.ascontiguousarray(data))
        # .to() of a different dtype copies; clone() when it would not, so
        # the caller's array and the buffer never share memory.
        return t.to(self._tdtype(dtype)) if dtype.numpy is None else t.clone()

    def full(self, count: int, value: float | int | bool, dtype: DType) -> Any:
        return self.torch.full((count,), value, dtype=self._tdtype(dtype))

    def assign(self, buf: Any, data: np.ndarray) -> None:
        buf.copy_(self.torch.from_numpy(np.ascontiguousarray(data)))

    def read(self, buf: Any, start: int, stop: int) -> np.ndarray:
        part = buf[start:stop]
        if part.dtype == self.torch.bfloat16:
            part = part.float()
        return part.numpy()

    def raw(self, buf: Any) -> np.ndarray:
        return buf.view(self.torch.uint8).numpy()

    def make_call(self, op: str, send: Any, recv: Any, *, root: int, codec: str) -> Callable[[], object]:
        if codec != self.codec:
            raise BackendUnavailable(f"this {self.name} group was made for codec {self.codec}, not {codec}")
        dist = self.dist
        SUM = dist.ReduceOp.SUM
        if op == "allreduce":
            return lambda: dist.all_reduce(send, op=SUM)
        if op == "broadcast":
            return lambda: dist.broadcast(send, src=root)
        if op == "allgather":
            ag = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            return lambda: ag(recv, send)
        if op == "reduce_scatter":
            rs = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
            return lambda: rs(recv, send, op=SUM)
        if op == "alltoall":
            return lambda: dist.all_to_all_single(recv, send)
        raise ValueError(f"unknown op {op!r}")

    def barrier(self) -> None:
        self.dist.barrier()

    def close(self) -> None:
        if self.dist is not None and self.dist.is_initialized():
            self.dist.destroy_process_group()

    def versions(self) -> dict[str, str]:
        out = {"torch": str(self.torch.__version__)}
        if self.name not in TORCH_BUILTIN_BACKENDS:
            out[self.name] = _dist_version(self.name)
        return out


def ensure_torch_backend(name: str) -> None:
    """Make sure ``torch.distributed`` knows backend ``name``.

    Built-in names need nothing. Any other name is expected to register itself
    when its package (``name``, else ``name.torch``) is imported, as
    ``import hetcomm`` does for ``"hetcomm"``.

    Raises:
        BackendUnavailable: torch is missing, or the backend is not registered.
    """
    if importlib.util.find_spec("torch") is None:
        raise BackendUnavailable("torch is not installed; --via torch and --backend gloo need it")
    import torch.distributed as dist

    if not dist.is_available():
        raise BackendUnavailable("this torch build has no torch.distributed")
    if name == "gloo":
        if not dist.is_gloo_available():
            raise BackendUnavailable("this torch build has no gloo backend")
        return
    if name in TORCH_BUILTIN_BACKENDS:
        return
    errors = []
    for module in (name, f"{name}.torch"):
        if name.lower() in dist.Backend.backend_list:
            return
        try:
            importlib.import_module(module)
        except Exception as exc:
            errors.append(f"import {module}: {type(exc).__name__}: {exc}")
    if name.lower() in dist.Backend.backend_list:
        return
    detail = f" ({'; '.join(errors)})" if errors else ""
    raise BackendUnavailable(f"torch.distributed has no backend {name!r}{detail}")


def check_backend(name: str, via: str, dtype: DType, codec: str) -> None:
    """Fail early, in the launching process, if ``name`` via ``via`` cannot run as asked.

    Raises:
        BackendUnavailable: with a message meant for the user.
    """
    if via == "numpy":
        if name != "hetcomm":
            raise BackendUnavailable(f"--via numpy is hetcomm's Communicator only; {name} runs via torch")
        if dtype.numpy is None:
            raise BackendUnavailable(f"--dtype {dtype.name} has no numpy type: use --via torch")
        reason = hetcomm_unavailable_reason()
        if reason:
            raise BackendUnavailable(f"the hetcomm backend cannot run: {reason}; try --backend gloo")
        return
    if codec != "none" and name != "hetcomm":
        raise BackendUnavailable(f"--codec {codec} with {name}: only hetcomm has codecs")
    ensure_torch_backend(name)
    if dtype.name in TORCH_UNSUPPORTED_DTYPES.get(name, set()):
        raise BackendUnavailable(f"torch's {name} backend does not support {dtype.name}")


def make_backend(name: str, via: str, codec: str = "none") -> Backend:
    """The backend object for ``name`` reached through ``via`` (``numpy`` or ``torch``).

    Through torch, a ``codec`` is the process group's default (hetcomm only);
    the Communicator takes it per call instead.
    """
    if via == "numpy":
        if name != "hetcomm":
            raise BackendUnavailable(f"--via numpy is hetcomm's Communicator only, not {name}")
        return HetcommNumpyBackend()
    if via == "torch":
        return TorchDistBackend(name, codec)
    raise ValueError(f"unknown path {via!r}")


def _dist_version(package: str) -> str:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return "unknown"
