"""Sending training state (model, optimizer, loop counters) from one rank to the others.

What a newcomer needs before it can take a step with the others, and what
survivors that stopped at different steps need to agree again. The state's
structure (keys, shapes, dtypes, plain values) goes as one small object
broadcast; the tensors go flattened, one broadcast per dtype, through the
group's backend, never pickled.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = ["broadcast_state"]


class _Slot:
    """Where a tensor sat in the state: its index in the tensor list, shape and dtype."""

    __slots__ = ("index", "shape", "dtype")

    def __init__(self, index: int, shape: torch.Size, dtype: torch.dtype) -> None:
        self.index, self.shape, self.dtype = index, tuple(shape), dtype

    def __getstate__(self) -> tuple:
        return self.index, self.shape, self.dtype

    def __setstate__(self, state: tuple) -> None:
        self.index, self.shape, self.dtype = state


def _strip(value: Any, tensors: list[torch.Tensor]) -> Any:
    """``value`` with every tensor replaced by a _Slot; the tensors are appended to ``tensors``."""
    if isinstance(value, torch.Tensor):
        tensors.append(value.detach())
        return _Slot(len(tensors) - 1, value.shape, value.dtype)
    if isinstance(value, dict):
        return type(value)((k, _strip(v, tensors)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_strip(v, tensors) for v in value)
    return value


def _fill(value: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(value, _Slot):
        return tensors[value.index]
    if isinstance(value, dict):
        return type(value)((k, _fill(v, tensors)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_fill(v, tensors) for v in value)
    return value


def _slots(value: Any, out: list[_Slot]) -> list[_Slot]:
    if isinstance(value, _Slot):
        out.append(value)
    elif isinstance(value, dict):
        for v in value.values():
            _slots(v, out)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _slots(v, out)
    return out


def broadcast_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, extra: Any = None, *,
                    src: int = 0, group: Any = None) -> Any:
    """Copies ``src``'s model and optimizer state into every rank's; returns ``src``'s ``extra``.

    Collective over ``group`` (None: the default group); ``src`` is a group
    rank. ``extra`` is any small picklable value without tensors of its own
    worth sending (the step counter, the data position). The receivers'
    model must have the same structure; their optimizer may be fresh (its
    state, momentum buffers included, is replaced by src's).
    """
    rank = dist.get_rank(group)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer is not None else None,
             "extra": extra}
    tensors: list[torch.Tensor] = []
    box = [_strip(state, tensors) if rank == src else None]
    dist.broadcast_object_list(box, group_src=src, group=group)
    skeleton = box[0]
    slots = _slots(skeleton, [])
    if rank != src:
        tensors = [torch.empty(s.shape, dtype=s.dtype) for s in slots]
    by_dtype: dict[torch.dtype, list[int]] = {}
    for s in slots:
        by_dtype.setdefault(s.dtype, []).append(s.index)
    # In a fixed order (dtype names, sorted), so that every rank issues the
    # same broadcasts in the same order.
    for dtype in sorted(by_dtype, key=str):
        members = [tensors[i].to("cpu") for i in by_dtype[dtype]]
        flat = _flatten_dense_tensors(members) if rank == src else torch.empty(
            sum(t.numel() for t in members), dtype=dtype)
        dist.broadcast(flat, group_src=src, group=group)
        if rank != src:
            for i, t in zip(by_dtype[dtype], _unflatten_dense_tensors(flat, members)):
                tensors[i] = t
    received = _fill(skeleton, tensors)
    if rank != src:
        model.load_state_dict(received["model"])
        if optimizer is not None and received["optimizer"] is not None:
            optimizer.load_state_dict(received["optimizer"])
    return received["extra"]
