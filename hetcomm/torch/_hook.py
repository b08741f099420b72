"""Registers the torch backend as soon as ``torch.distributed`` exists, without importing torch.

``import hetcomm`` must cost numpy-only users nothing, yet
``import hetcomm; import torch.distributed as dist;
dist.init_process_group("hetcomm")`` must work in either import order. So:
when torch is already imported, register now; otherwise put a finder on
``sys.meta_path`` that registers right after ``torch`` finishes importing
(``import torch`` imports torch.distributed; registering halfway through
torch's own import trips over its circular imports). This module never
imports torch itself.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
from types import ModuleType
from typing import Any, Sequence

log = logging.getLogger("hetcomm.torch")

_TARGET = "torch"


def _register_quietly() -> None:
    # A failure here must never break `import torch`: log it instead; the
    # user sees "unknown backend hetcomm" later and the log says why.
    try:
        from hetcomm.torch.backend import register

        register()
    except Exception:  # noqa: BLE001
        log.warning("hetcomm: could not register the torch.distributed backend", exc_info=True)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        uninstall()
        _register_quietly()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    # Stays installed until torch is actually executed: importlib.util.find_spec
    # ("torch") also calls finders, without importing anything.
    _searching = False

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != _TARGET or self._searching:
            return None
        self._searching = True  # the lookup below goes through sys.meta_path, this finder too
        try:
            for finder in sys.meta_path:
                spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
                if spec is not None:
                    if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                        spec.loader = _Loader(spec.loader)
                    return spec
        finally:
            self._searching = False
        return None


_finder = _Finder()


def install() -> None:
    """Registers now if torch is loaded, else right after it gets imported."""
    dist = sys.modules.get("torch.distributed")
    if _TARGET in sys.modules and dist is not None and hasattr(dist, "Backend"):
        _register_quietly()
    elif _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def uninstall() -> None:
    """Removes the pending import hook (registration already done stays)."""
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
