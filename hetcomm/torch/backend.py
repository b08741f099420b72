"""The "hetcomm" torch.distributed backend: registration and the creator torch calls.

For each process group torch calls :func:`create_backend` with the group's
store (already prefixed with the group's name and device), rank, size and
timeout. The creator connects a hetcomm communicator through that store
(the same rendezvous as :class:`hetcomm.Communicator`) and wraps its handle
in the C++ shim, which from then on owns it. Every op afterwards goes from
c10d straight into C++ and the C core: no Python in the op path.
"""
from __future__ import annotations

import atexit
import dataclasses
import functools
import hashlib
import json
import logging
import os
import threading
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from hetcomm import comm as _comm
from hetcomm import rendezvous
from hetcomm._capi import ffi, lib
from hetcomm.config import Options, env_str
from hetcomm.torch import _build
from hetcomm.torch.intra import attach as attach_site_groups
from hetcomm.torch.intra import intra_backend
from hetcomm.torch.options import ProcessGroupOptions

log = logging.getLogger("hetcomm.torch")

BACKEND_NAME = "hetcomm"

_register_lock = threading.Lock()
_registered = False
_exit_hook = False


def _device_types() -> list[str]:
    """Device types whose tensors route to this backend.

    Every tensor is staged through host memory, so any device type torch can
    copy to and from the CPU works; "privateuseone" stands for whatever
    out-of-tree device (npu, ...) claims PrivateUse1, even if it is renamed
    after this registration.
    """
    names = ["cpu", "cuda", "xpu", "mps", "hpu", "mtia", "privateuseone"]
    ok = []
    for name in names:
        try:
            torch.device(name)
        except (RuntimeError, ValueError):
            continue
        ok.append(name)
    return ok


def register() -> None:
    """Registers "hetcomm" with torch.distributed (idempotent).

    ``import hetcomm`` calls this as soon as torch.distributed is imported.
    """
    global _registered
    with _register_lock:
        if _registered:
            return
        if not dist.is_available():
            log.debug("torch.distributed is not available; hetcomm backend not registered")
            return
        # register_backend also makes the new backend the default for every
        # listed device that has none yet; hetcomm should never be picked
        # unless asked for by name, so the defaults are put back.
        defaults = dict(dist.Backend.default_device_backend_map)
        dist.Backend.register_backend(BACKEND_NAME, create_backend, extended_api=True, devices=_device_types())
        dist.Backend.default_device_backend_map.clear()
        dist.Backend.default_device_backend_map.update(defaults)
        _install_monitored_barrier()
        _install_shrunk_group_maker()
        _registered = True
        log.debug("registered the %r torch.distributed backend", BACKEND_NAME)


def is_registered() -> bool:
    """Whether the backend is registered with torch.distributed."""
    return _registered


# ---- the creator ---------------------------------------------------------------


def _resolve_options(pg_options: Any, timeout: timedelta | None) -> Options:
    if pg_options is None:
        opts: Options = ProcessGroupOptions()
    elif isinstance(pg_options, Options):
        opts = dataclasses.replace(pg_options)
    elif isinstance(pg_options, dict):
        opts = ProcessGroupOptions(**pg_options)
    else:
        raise TypeError(f"hetcomm: pg_options must be hetcomm.torch.ProcessGroupOptions (or a dict of its "
                        f"fields), got {type(pg_options).__name__}")
    if opts.timeout is None and timeout is not None:
        seconds = timeout.total_seconds()
        # torch always passes a timeout; its default one (30 min) yields to an
        # explicit HETCOMM_TIMEOUT, an explicit init_process_group(timeout=)
        # wins over the environment.
        if not (env_str("HETCOMM_TIMEOUT") and abs(seconds - dist.default_pg_timeout.total_seconds()) < 1e-6):
            opts.timeout = seconds
    return opts.resolved()


def _store_host(store: Any) -> str | None:
    """The host of the TCPStore under torch's PrefixStores, if that is what it is."""
    for _ in range(16):
        inner = getattr(store, "underlying_store", None)
        if inner is None:
            break
        store = inner
    host = getattr(store, "host", None)
    return host if isinstance(host, str) and host else None


def _bind_address(opts: Options, store: Any) -> str | None:
    # The Communicator picks the interface that routes to MASTER_ADDR; a
    # tcp:// init sets no MASTER_ADDR, so the TCPStore's host stands in.
    if opts.bind_address or opts.ifname or os.environ.get("MASTER_ADDR"):
        return None
    host = _store_host(store)
    if host is None:
        return None
    bases = [f"tcp://{rendezvous.address_towards(host)}"]
    if opts.transport in ("auto", "ipc"):
        bases.append(f"ipc://{rendezvous.ipc_directory()}")
    return ";".join(bases)


def _comm_name(group_id: str, global_ranks: list[int]) -> str:
    # Ranks may recreate a group under a recycled name (destroy, then init
    # again); the member list keeps two such groups apart in the store.
    if not global_ranks:
        return f"pg{group_id}"
    digest = hashlib.blake2b(",".join(map(str, global_ranks)).encode(), digest_size=4).hexdigest()
    return f"pg{group_id}.{digest}"


def handle_of(communicator: _comm.Communicator) -> Any:
    """Takes the connected handle away from a Communicator (the shim owns it now)."""
    handle = communicator._handle
    communicator._handle = ffi.NULL
    _comm._live.discard(communicator)
    return handle


def wrap_handle(handle: Any, rank: int, size: int, opts: Options, name: str) -> Any:
    """The shim's backend, owning ``handle`` (a connected hc_comm, destroyed if this fails).

    The backend keeps ``opts`` as its settings (HetcommBackend.settings),
    which the groups shrunk from it inherit and newcomers adopt.
    """
    global _exit_hook
    ext = _build.load()
    try:
        backend = ext.HetcommBackend(int(ffi.cast("uintptr_t", lib.hc_get_api())),
                                     int(ffi.cast("uintptr_t", handle)), rank, size, float(opts.timeout), name)
    except BaseException:
        lib.hc_comm_destroy(handle)
        raise
    backend.settings = json.dumps(dataclasses.asdict(opts))
    if not _exit_hook:
        # At exit, close what is still open; groups with ops in flight are
        # aborted so that their peers hear of it at once.
        atexit.register(ext.shutdown_all)
        _exit_hook = True
    return backend


def settings_of(backend: Any) -> ProcessGroupOptions:
    """The settings a HetcommBackend was made with (see :func:`wrap_handle`)."""
    return ProcessGroupOptions(**json.loads(backend.settings or "{}")).resolved()


def create_backend(dist_opts: Any, pg_options: Any = None) -> Any:
    """The creator torch.distributed calls for each hetcomm process group.

    Args:
        dist_opts: torch's ``_DistributedBackendOptions`` (store, group_rank,
            group_size, timeout, group_id, global_ranks_in_group).
        pg_options: ``pg_options`` given to init_process_group/new_group: a
            :class:`ProcessGroupOptions` (or dict of its fields), or None.

    Returns:
        The C++ backend (a ``torch._C._distributed_c10d.Backend``).
    """
    opts = _resolve_options(pg_options, dist_opts.timeout)
    store = dist_opts.store
    bind = _bind_address(opts, store)
    if bind is not None:
        opts = dataclasses.replace(opts, bind_address=bind)
    rank, size = int(dist_opts.group_rank), int(dist_opts.group_size)
    name = _comm_name(str(dist_opts.group_id), list(dist_opts.global_ranks_in_group))
    # Build (or load) the shim before connecting, so that a slow first build
    # cannot eat into the connect timeout.
    _build.load()
    intra_backend(opts)  # a wrong in-site library fails before connecting
    communicator = _comm.Communicator(rank, size, store=store, name=name, options=opts)
    backend = wrap_handle(handle_of(communicator), rank, size, opts, name)
    attach_site_groups(backend, store, opts)
    log.debug("%s: rank %d/%d ready (timeout %.1f s)", name, rank, size, opts.timeout)
    return backend


# ---- monitored_barrier -------------------------------------------------------------


def monitored_barrier(group: Any = None, timeout: timedelta | float | None = None,
                      wait_all_ranks: bool = False) -> None:
    """``torch.distributed.monitored_barrier`` for hetcomm groups (gloo's semantics).

    Rank 0 waits up to ``timeout`` for every other rank and raises naming the
    first rank that did not arrive (every such rank with ``wait_all_ranks``).
    torch's own function accepts only gloo groups; registering hetcomm routes
    hetcomm groups through here.
    """
    from torch.distributed import distributed_c10d as c10d

    if c10d._rank_not_in_group(group):
        c10d._warn_not_in_group("monitored_barrier")
        return None
    if timeout is None:
        timeout = c10d._get_default_timeout(c10d.get_backend(group))
    elif isinstance(timeout, (int, float)):
        timeout = timedelta(seconds=timeout)
    c10d._check_valid_timeout(timeout)
    group_to_use = c10d._get_default_group() if group is None else group
    return group_to_use.monitored_barrier(timeout, wait_all_ranks=wait_all_ranks)


def _install_monitored_barrier() -> None:
    from torch.distributed import distributed_c10d as c10d

    original = c10d.monitored_barrier
    if getattr(original, "_hetcomm_wrapper", False):
        return

    @functools.wraps(original)
    def wrapper(group: Any = None, timeout: Any = None, wait_all_ranks: bool = False) -> Any:
        # Only hetcomm groups take the new path; everything else, errors
        # included, is torch's own function.
        try:
            ours = not c10d._rank_not_in_group(group) and c10d.get_backend(group) == BACKEND_NAME
        except (ValueError, RuntimeError):
            ours = False
        if ours:
            return monitored_barrier(group, timeout, wait_all_ranks)
        return original(group, timeout, wait_all_ranks)

    wrapper._hetcomm_wrapper = True  # type: ignore[attr-defined]
    c10d.monitored_barrier = wrapper
    dist.monitored_barrier = wrapper


# ---- process groups over a backend made outside init_process_group ------------------


def process_group_over(backend: Any, store: Any, group_name: str, group_desc: str,
                       bound_device: Any = None) -> Any:
    """A ProcessGroup running every device type on ``backend`` (a HetcommBackend),
    as init_process_group builds one for a "hetcomm" group; not registered with torch."""
    from torch.distributed import distributed_c10d as c10d

    pg = c10d.ProcessGroup(c10d.PrefixStore(f"{group_name}/", store), backend.rank(), backend.size())
    backend_type = c10d.ProcessGroup.BackendType.CUSTOM
    for device in c10d.BackendConfig(c10d.Backend(BACKEND_NAME)).get_device_backend_map():
        pg._register_backend(torch.device(device), backend_type, backend)
    pg._set_default_backend(backend_type)
    if bound_device is not None:
        pg.bound_device_id = bound_device
    pg._set_group_name(group_name)
    pg._set_group_desc(group_desc)
    return pg


def _install_shrunk_group_maker() -> None:
    # torch's shrink_group registers the shrunk backend of any device but
    # cuda as a gloo backend; DDP (its logger) then takes ours for gloo's and
    # crashes. Groups shrunk from hetcomm groups are made as init_process_group
    # makes them instead.
    from torch.distributed import distributed_c10d as c10d

    original = getattr(c10d, "_create_shrunk_process_group", None)
    if original is None or getattr(original, "_hetcomm_wrapper", False):
        return

    @functools.wraps(original)
    def wrapper(new_backend: Any, remaining_ranks: list[int], metadata: dict, is_default_group: bool) -> Any:
        if not isinstance(new_backend, _build.load().HetcommBackend):
            return original(new_backend, remaining_ranks, metadata, is_default_group)
        desc = "default:shrunken" if is_default_group else f"{metadata['original_group_name']}:shrunk"
        store = metadata["store"].clone()
        # The shrunk group's own site groups and column, where its settings ask for an in-site library.
        attach_site_groups(new_backend, store, settings_of(new_backend))
        pg = process_group_over(new_backend, store, metadata["new_group_name"], desc,
                                metadata.get("bound_device_id"))
        if metadata.get("backend_config") is not None:
            c10d._world.pg_backend_config[pg] = metadata["backend_config"]
        return pg

    wrapper._hetcomm_wrapper = True  # type: ignore[attr-defined]
    c10d._create_shrunk_process_group = wrapper
