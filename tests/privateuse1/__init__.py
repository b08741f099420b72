"""The test-only "hcdev" PrivateUse1 device (see hcdev.cpp), built on first use.

``load()`` compiles the extension (once per torch version and source hash,
into the same cache as hetcomm's shim), renames PrivateUse1 to "hcdev" and
registers a small ``torch.hcdev`` module, so that ``tensor.to("hcdev")``,
DDP and FSDP2 see an accelerator whose copies run asynchronously on streams.
"""
from __future__ import annotations

import hashlib
import pathlib
import sys
import threading
import types
from typing import Any

NAME = "hcdev"
_SRC = pathlib.Path(__file__).resolve().parent / "hcdev.cpp"
_lock = threading.Lock()
_ext: Any = None


def _device_module(ext: Any) -> types.ModuleType:
    import torch

    mod = types.ModuleType(f"torch.{NAME}")
    mod.is_available = lambda: True  # type: ignore[attr-defined]
    mod.device_count = lambda: 1  # type: ignore[attr-defined]
    mod.current_device = lambda: 0  # type: ignore[attr-defined]
    mod.set_device = lambda device: None  # type: ignore[attr-defined]
    mod.synchronize = lambda device=None: ext.synchronize()  # type: ignore[attr-defined]
    mod.is_initialized = lambda: True  # type: ignore[attr-defined]
    mod._is_in_bad_fork = lambda: False  # type: ignore[attr-defined]
    mod.manual_seed = lambda seed: None  # type: ignore[attr-defined]
    mod.manual_seed_all = lambda seed: None  # type: ignore[attr-defined]
    mod.get_rng_state = lambda device=None: torch.get_rng_state()  # type: ignore[attr-defined]
    mod.set_rng_state = lambda state, device=None: None  # type: ignore[attr-defined]
    # Streams and events are torch's generic ones over the device guard.
    mod.Stream = lambda device=None, priority=0: torch.Stream(NAME, priority=priority)  # type: ignore[attr-defined]
    mod.Event = lambda enable_timing=False, **kw: torch.Event(NAME, enable_timing=enable_timing)  # type: ignore
    mod.current_stream = lambda device=None: torch.accelerator.current_stream(torch.device(NAME, 0))  # type: ignore
    mod.stream = lambda s: s  # type: ignore[attr-defined]  # torch.Stream is its own context manager
    return mod


def load() -> Any:
    """Builds/loads the extension and registers the "hcdev" device; returns the extension."""
    global _ext
    with _lock:
        if _ext is not None:
            return _ext
        import torch
        from torch.utils import cpp_extension

        from hetcomm.torch import _build

        digest = hashlib.sha256(_SRC.read_bytes() + torch.__version__.encode()).hexdigest()[:16]
        build_dir = _build.cache_root() / f"hcdev-{torch.__version__.replace('+', '_')}-{digest}"
        build_dir.mkdir(parents=True, exist_ok=True)
        _build._ensure_ninja()
        with _build.build_lock(build_dir):
            _ext = cpp_extension.load(name=f"hcdev_{digest}", sources=[str(_SRC)], build_directory=str(build_dir),
                                      extra_cflags=["-O1"], verbose=False)
        if torch._C._get_privateuse1_backend_name() != NAME:
            torch.utils.rename_privateuse1_backend(NAME)
            torch._register_device_module(NAME, _device_module(_ext))
            torch.utils.generate_methods_for_privateuse1_backend(for_storage=True)
        return _ext


def counters() -> dict[str, int]:
    """The device's copy/synchronisation/allocation counters since the last reset."""
    return dict(load().counters())


def reset_counters() -> None:
    load().reset_counters()


def synchronize() -> None:
    load().synchronize()


if __name__ == "__main__":
    ext = load()
    sys.stdout.write(f"{NAME} loaded: {ext.counters()}\n")
