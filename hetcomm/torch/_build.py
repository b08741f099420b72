"""Builds (on first use) and loads the C++ c10d shim against the installed torch.

There is no stable ABI for c10d, so the shim must be compiled against the
exact torch that runs it. It is built with ``torch.utils.cpp_extension.load``
into a directory keyed by the torch version, the Python version and a hash
of the sources: a torch upgrade or a source change gets a fresh build, never
a stale library. Ranks that import at the same time on a cold cache take
turns on an ``flock`` in that directory and build once.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import pathlib
import shutil
import sys
import threading
from types import ModuleType

log = logging.getLogger("hetcomm.torch")

_PACKAGE = pathlib.Path(__file__).resolve().parent.parent
_lock = threading.Lock()
_module: ModuleType | None = None


def source_dir() -> pathlib.Path:
    """Where the shim's sources are: the repository's ``csrc/`` (a checkout or
    editable install) first, then the copy a wheel carries in ``hetcomm/_csrc/``."""
    for candidate in (_PACKAGE.parent / "csrc", _PACKAGE / "_csrc"):
        if (candidate / "torch").is_dir() and (candidate / "hetcomm.h").is_file():
            return candidate
    raise RuntimeError(f"hetcomm: the torch shim's sources are missing (looked in {_PACKAGE.parent / 'csrc'} "
                       f"and {_PACKAGE / '_csrc'}); reinstall hetcomm")


def cache_root() -> pathlib.Path:
    """``HETCOMM_TORCH_BUILD_DIR``, else ``$XDG_CACHE_HOME/hetcomm/torch`` (``~/.cache/...``)."""
    explicit = os.environ.get("HETCOMM_TORCH_BUILD_DIR")
    if explicit:
        return pathlib.Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "hetcomm" / "torch"


def _ensure_ninja() -> None:
    # torch's builder runs `ninja` from PATH; the PyPI wheel (the `torch`
    # extra) puts it in a venv's bin/, which is not on PATH unless the venv
    # is activated.
    if shutil.which("ninja"):
        return
    candidates = [os.path.dirname(sys.executable)]
    try:
        import ninja  # type: ignore[import-not-found]

        candidates.insert(0, ninja.BIN_DIR)
    except ImportError:
        pass
    for directory in candidates:
        if shutil.which("ninja", path=directory):
            os.environ["PATH"] = directory + os.pathsep + os.environ.get("PATH", "")
            return
    raise RuntimeError("hetcomm: building the torch shim needs ninja: pip install 'hetcomm[torch]' (or ninja)")


def _fingerprint(src: pathlib.Path, files: list[pathlib.Path]) -> str:
    import torch

    h = hashlib.sha256()
    h.update(f"torch={torch.__version__};git={getattr(torch.version, 'git_version', '')};"
             f"py={sys.version_info[:2]};abi={torch._C._GLIBCXX_USE_CXX11_ABI}".encode())
    for f in files:
        h.update(str(f.relative_to(src)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _stage_sources(src: pathlib.Path, files: list[pathlib.Path], dest: pathlib.Path) -> None:
    # torch's builder rebuilds whenever the source paths or include flags
    # change, so the build compiles copies kept inside the (content-keyed)
    # build directory: every checkout of the same sources shares one build.
    # Each copy is written aside and renamed, so ranks copying at once never
    # see a half-written file.
    for f in files:
        target = dest / f.relative_to(src)
        data = f.read_bytes()
        if target.is_file() and target.read_bytes() == data:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)


def load() -> ModuleType:
    """The compiled shim module (built on the first call in a fresh cache)."""
    global _module
    with _lock:
        if _module is not None:
            return _module
        import torch

        src = source_dir()
        sources = sorted((src / "torch").glob("*.cpp"))
        files = [src / "hetcomm.h", *sorted((src / "torch").glob("*.hpp")), *sources]
        digest = _fingerprint(src, files)
        version = torch.__version__.replace("+", "_")
        build_dir = cache_root() / f"torch-{version}-py{sys.version_info[0]}{sys.version_info[1]}-{digest}"
        build_dir.mkdir(parents=True, exist_ok=True)
        name = f"hetcomm_torch_{digest}"
        built = build_dir / f"{name}.so"
        marker = build_dir / "hetcomm-build-ok"
        with build_lock(build_dir):
            if marker.is_file() and built.is_file():
                # The directory is keyed by the sources, so a finished build there
                # is the right one: import it without asking ninja (~1 s a rank).
                _module = _import_built(name, built)
                return _module
            from torch.utils import cpp_extension

            _ensure_ninja()
            staged = build_dir / "src"
            _stage_sources(src, files, staged)
            log.info("hetcomm: building the torch shim in %s (once per torch version and source change)", build_dir)
            _module = cpp_extension.load(
                name=name,
                sources=[str(staged / s.relative_to(src)) for s in sources],
                extra_include_paths=[str(staged), str(staged / "torch")],
                extra_cflags=["-O2", "-fvisibility=hidden"],
                build_directory=str(build_dir),
                verbose=log.isEnabledFor(logging.DEBUG),
            )
            marker.write_text(f"{name}\n")
            return _module


@contextlib.contextmanager
def build_lock(build_dir: pathlib.Path):
    """One builder per build directory, across processes.

    torch's own lock is a file whose existence is the lock: a build killed
    half-way leaves it behind and every later build waits on it forever. An
    flock dies with its process, so whoever holds this one knows any torch
    lock file there is a leftover and removes it.
    """
    with open(build_dir / "hetcomm-build.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            with contextlib.suppress(FileNotFoundError):
                (build_dir / "lock").unlink()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _import_built(name: str, path: pathlib.Path) -> ModuleType:
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"hetcomm: cannot load the torch shim from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module
