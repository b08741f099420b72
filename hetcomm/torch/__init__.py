"""hetcomm as a torch.distributed backend.

``import hetcomm`` registers the backend named "hetcomm" once torch.distributed
is imported (in either order), so that::

    import hetcomm
    import torch.distributed as dist
    dist.init_process_group("hetcomm")          # env://, tcp://, file:// or store=

works, as do ``dist.new_group(backend="hetcomm")``, DDP, FSDP2, DeviceMesh,
functional collectives and ``dist.shrink_group``; :func:`failed_ranks`,
:func:`shrink_lost`, :func:`grow_if_pending`, :func:`join_group` and
:func:`broadcast_state` make a job elastic (see docs/elastic.md). Settings go in ``pg_options=ProcessGroupOptions(...)``
or ``HETCOMM_*`` environment variables.

Importing this package does not import torch; its torch-facing names load on
first use.
"""
from __future__ import annotations

from typing import Any

from hetcomm.torch.options import ProcessGroupOptions

__all__ = ["ProcessGroupOptions", "register", "is_registered", "monitored_barrier", "BACKEND_NAME", "failed_ranks",
           "shrink_lost", "grow_if_pending", "join_group", "broadcast_state"]

BACKEND_NAME = "hetcomm"


def register() -> None:
    """Registers the "hetcomm" backend with torch.distributed now (idempotent)."""
    from hetcomm.torch.backend import register as _register

    _register()


def is_registered() -> bool:
    """Whether the backend is registered (False while torch.distributed is not imported)."""
    import sys

    backend = sys.modules.get("hetcomm.torch.backend")
    return bool(backend and backend.is_registered())


def monitored_barrier(group: Any = None, timeout: Any = None, wait_all_ranks: bool = False) -> None:
    """gloo's ``monitored_barrier`` for hetcomm groups (see hetcomm.torch.backend.monitored_barrier)."""
    from hetcomm.torch.backend import monitored_barrier as _mb

    return _mb(group, timeout, wait_all_ranks)


# Elastic training: these import torch, so they load on first use.
_LAZY = {"failed_ranks": "hetcomm.torch.elastic", "shrink_lost": "hetcomm.torch.elastic",
         "grow_if_pending": "hetcomm.torch.elastic", "join_group": "hetcomm.torch.elastic",
         "broadcast_state": "hetcomm.torch.state"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hetcomm.torch' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
