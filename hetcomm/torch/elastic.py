"""Elastic hetcomm process groups: go on without lost ranks, take returning ranks back.

After a peer is lost, every collective of the group raises a
``torch.distributed.DistBackendError`` naming the lost rank, its host and its
site, and the survivors agree on one set of failed ranks. They then shrink
the group past it, over the connections they already hold::

    try:
        train_step()
    except RuntimeError:
        if not hetcomm.torch.failed_ranks():
            raise
        group = hetcomm.torch.shrink_lost()      # torch.distributed.shrink_group underneath

Ranks that start later (a restarted rank, a whole site back from a power
cut) join the running job at one of its step boundaries: the newcomer calls
:func:`join_group`, the members call :func:`grow_if_pending` at every step
boundary; both get the same new default group, of the full size, in which
the members keep their ranks and the newcomers come after them. Model and
optimizer state then go to the newcomers with
:func:`hetcomm.torch.state.broadcast_state`.

Growing meets in a store every rank reaches and that outlives any rank (the
launcher's, as torchrun's agent keeps one), under ``hetcomm/elastic/<name>/``:

- ``requests``: join requests so far (a newcomer's ticket is the count after its own),
  ``request/<n>`` set once request n is counted;
- ``admitted``: requests the members have taken in;
- ``ticket/<n>``: newcomer n's rank, the new size, and the group's settings;
- the rendezvous of each growth (its token and every rank's endpoints).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import socket
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from hetcomm import _native, rendezvous
from hetcomm._capi import ffi, lib
from hetcomm.comm import Communicator, connect_peers
from hetcomm.torch import _build
from hetcomm.torch.backend import BACKEND_NAME, handle_of, process_group_over, settings_of, wrap_handle
from hetcomm.torch.intra import attach as attach_site_groups
from hetcomm.torch.options import ProcessGroupOptions

log = logging.getLogger("hetcomm.torch")

__all__ = ["failed_ranks", "shrink_lost", "grow_if_pending", "join_group"]

# Settings that belong to a process (where it runs, its keys), not to the
# group: a newcomer keeps its own; every other setting it takes from the group.
_PER_PROCESS = frozenset({"site", "host", "topology", "bind_address", "ifname", "curve_secret", "curve_allow",
                          "extra"})


def _backend_of(group: Any) -> tuple[Any, Any]:
    """(process group, its hetcomm backend) for ``group`` (None: the default group)."""
    pg = group if group is not None else c10d._get_default_group()
    backend = pg._get_backend(torch.device("cpu"))
    if not isinstance(backend, _build.load().HetcommBackend):
        raise TypeError(f"hetcomm.torch.elastic: process group {c10d._get_process_group_name(pg)!r} is not a "
                        f"{BACKEND_NAME!r} group (its backend is {backend.name()!r})")
    return pg, backend


def failed_ranks(group: Any = None, timeout: float = 10.0) -> list[int]:
    """The ranks of ``group`` (group ranks) the survivors agree are lost; [] while none is.

    Waits up to ``timeout`` seconds for the survivors to agree on the set
    (they do within a few round trips of the failure); raises
    ``DistBackendError`` naming the ranks held failed so far if they do not.
    """
    _, backend = _backend_of(group)
    return list(backend.failed_ranks(timeout))


def shrink_lost(group: Any = None, *, abort: bool = True, timeout: float = 10.0) -> Any:
    """Shrinks ``group`` (None: the default group) past its lost ranks; returns the new group.

    ``torch.distributed.shrink_group(failed_ranks(group), group, flags)``:
    with ``abort`` (SHRINK_ABORT) the old group's queued and running ops are
    failed first, otherwise (SHRINK_DEFAULT) they finish or fail on their
    own. A shrunk default group becomes the new default group.
    """
    lost = failed_ranks(group, timeout)
    if not lost:
        raise ValueError("hetcomm.torch.shrink_lost: no rank of the group is lost")
    flags = c10d.SHRINK_ABORT if abort else c10d.SHRINK_DEFAULT
    log.info("shrinking process group %s without lost ranks %s", c10d._get_process_group_name(
        group if group is not None else c10d._get_default_group()), lost)
    return c10d.shrink_group(lost, group, flags)


# ---- growing -------------------------------------------------------------------------


def _keys(name: str) -> str:
    return f"hetcomm/elastic/{name}"


def _growth_name(name: str, admitted: int) -> str:
    """The communicator of the growth that admits requests after the first ``admitted``."""
    return f"elastic.{name}.{admitted}"


def _rendezvous_prefix(comm_name: str) -> str:
    """Where the members and the newcomers of a growth meet in the store."""
    return f"hetcomm/{comm_name}"


def grow_if_pending(store: Any, group: Any = None, *, name: str = "world", wait_for: int = 0,
                    timeout: float | None = None) -> Any | None:
    """At a step boundary, on every member: admits the ranks waiting in :func:`join_group`.

    Collective over the default group (``group`` must be it or None): one
    small broadcast tells every member how many newcomers wait. With none it
    returns None; otherwise the members grow the group through the C core
    (each keeps its rank and its connections; the newcomers take the next
    ranks), the old default group is destroyed and the grown one, returned,
    is the new default group.

    Args:
        store: the job's store (a ``torch.distributed.Store`` all ranks reach).
        name: the job's name in the store; newcomers pass the same.
        wait_for: on the group's rank 0 (ignored elsewhere): first wait until
            this many newcomers have asked to join (up to ``timeout``), to take
            back a restarted site at a chosen step rather than whenever it is ready.
        timeout: seconds to wait for the newcomers (default: the group's timeout).
    """
    pg, backend = _backend_of(group)
    if pg is not c10d._get_default_group():
        raise ValueError("hetcomm.torch.grow_if_pending: only the default group grows")
    rank, size = pg.rank(), pg.size()
    base = _keys(name)
    news = torch.zeros(2, dtype=torch.int64)
    if rank == 0:
        admitted = store.add(f"{base}/admitted", 0)
        if wait_for > 0:
            seconds = timeout if timeout is not None else backend.timeout.total_seconds()
            store.wait([f"{base}/request/{admitted + wait_for}"], timedelta(seconds=seconds))
        news[0] = store.add(f"{base}/requests", 0) - admitted
        news[1] = admitted
    dist.broadcast(news, group_src=0, group=pg)
    joining, admitted = int(news[0]), int(news[1])
    if joining <= 0:
        return None
    return _grow(store, pg, backend, name, admitted, joining, timeout)


def _grow(store: Any, pg: Any, backend: Any, name: str, admitted: int, joining: int,
          timeout: float | None) -> Any:
    rank, size = pg.rank(), pg.size()
    new_size = size + joining
    base = _keys(name)
    comm_name = _growth_name(name, admitted)
    settings = json.loads(backend.settings or "{}")
    opts = settings_of(backend)
    if timeout is not None:
        opts.timeout = float(timeout)
    if rank == 0:
        group_settings = {k: v for k, v in settings.items() if k not in _PER_PROCESS}
        for i in range(joining):
            store.set(f"{base}/ticket/{admitted + 1 + i}",
                      json.dumps({"rank": size + i, "size": new_size, "comm": comm_name, "settings": group_settings}))
        store.add(f"{base}/admitted", joining)
    log.info("%s: rank %d: growing from %d to %d ranks", comm_name, rank, size, new_size)
    prefix = _rendezvous_prefix(comm_name)
    comm_id, token = rendezvous.agree_identity(store, prefix, rank)
    out = ffi.new("hc_comm **")
    _native.check(lib.hc_comm_grow(ffi.cast("hc_comm *", backend.comm_address), new_size, comm_id, token, out),
                  "hc_comm_grow")
    handle = out[0]
    try:
        curve, allow = None, set()
        if opts.curve:
            from hetcomm import security

            curve = security.load_secret(opts.curve_secret)
            allow = security.load_allow_list(opts.curve_allow)
        record = {"endpoint": ffi.string(lib.hc_comm_endpoint(handle)).decode(), "site": opts.site or "",
                  "host": opts.host or socket.gethostname(), "machine": rendezvous.machine_id(),
                  "curve": curve[0] if curve else None}
        records = rendezvous.exchange(store, prefix, rank, new_size, record)
        connect_peers(handle, rank, records, range(size, new_size), record, curve, allow)
    except BaseException:
        lib.hc_comm_destroy(handle)
        raise
    grown = wrap_handle(handle, rank, new_size, opts, comm_name)
    attach_site_groups(grown, store, opts)
    # The old group's communicator only fails ops now; its links live on in the grown one.
    c10d.destroy_process_group(pg)
    return _install_default(grown, store, comm_name)


def join_group(store: Any, *, name: str = "world", options: ProcessGroupOptions | None = None,
               timeout: float = 600.0) -> Any:
    """A newcomer joins the running job named ``name``; returns the grown default group.

    Asks to be admitted, waits (up to ``timeout`` seconds) until the members
    reach a step boundary and grow the group (:func:`grow_if_pending`), then
    connects to every member. The group's settings (codec, streams, ...) come
    from the members; ``options`` (or ``HETCOMM_*``) give only what belongs
    to this process: its site, host, addresses and keys. The process must not
    have a default group yet.
    """
    if dist.is_initialized():
        raise RuntimeError("hetcomm.torch.join_group: this process already has a default process group")
    base = _keys(name)
    ticket = store.add(f"{base}/requests", 1)
    store.set(f"{base}/request/{ticket}", socket.gethostname())  # what grow_if_pending(wait_for=) waits on
    key = f"{base}/ticket/{ticket}"
    log.info("job %r: join request %d sent, waiting to be admitted", name, ticket)
    store.wait([key], timedelta(seconds=timeout))
    admission = json.loads(store.get(key))
    own = dataclasses.asdict(options) if options is not None else {}
    merged = {**admission["settings"], **{k: v for k, v in own.items() if k in _PER_PROCESS}}
    opts = ProcessGroupOptions(**merged).resolved()
    rank, size, comm_name = int(admission["rank"]), int(admission["size"]), admission["comm"]
    # The shim first, so that a slow first build cannot eat into the connect timeout.
    _build.load()
    communicator = Communicator(rank, size, store=store, name=comm_name, options=opts,
                                _prefix=_rendezvous_prefix(comm_name))
    backend = wrap_handle(handle_of(communicator), rank, size, opts, comm_name)
    attach_site_groups(backend, store, opts)
    log.info("%s: joined as rank %d of %d", comm_name, rank, size)
    return _install_default(backend, store, comm_name)


def _install_default(backend: Any, store: Any, group_name: str) -> Any:
    """A ProcessGroup over ``backend``, registered with torch as the default group."""
    # Groups made later with new_group() rendezvous under this prefix, the
    # same on every rank of the grown group.
    group_store = c10d.PrefixStore(f"hetcomm-elastic/{group_name}", store)
    pg = process_group_over(backend, group_store, group_name, "default:grown")
    c10d._update_default_pg(pg)
    c10d._register_pg_in_world(pg=pg, backend_name=BACKEND_NAME, store=group_store, group_name=group_name,
                               backend_config=str(c10d.BackendConfig(c10d.Backend(BACKEND_NAME))),
                               rank_mapping={r: r for r in range(backend.size())})
    return pg
