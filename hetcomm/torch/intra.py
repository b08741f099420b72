"""The in-site phases on the site's own library: ``HETCOMM_INTRA=nccl|hccl|gloo|hetcomm``.

With ``intra`` other than "hetcomm", a hetcomm process group whose sites all
hold the same number of ranks gets two more groups on every rank: its site's
group of the ``intra`` backend (NCCL, HCCL; gloo stands in on CPUs) and a
hetcomm communicator of the ranks at its position in every site (its
"column"). Allreduce and broadcast then run reduce-scatter/allgather/
broadcast inside the site on the vendor group and only the inter-site leg on
hetcomm, with the group's codec, streams and CURVE (see csrc/torch/sites.cpp).
Every other collective stays on hetcomm.
"""
from __future__ import annotations

import dataclasses
import logging
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from hetcomm import _native
from hetcomm import comm as _comm
from hetcomm._capi import ffi, lib
from hetcomm.config import Options, env_str

log = logging.getLogger("hetcomm.torch")

DEFAULT = "hetcomm"


def intra_backend(opts: Options) -> str:
    """The in-site library named by the options' ``intra``, else ``HETCOMM_INTRA``, else "hetcomm"."""
    name = (getattr(opts, "intra", None) or env_str("HETCOMM_INTRA", DEFAULT)).strip().lower()
    if name in (DEFAULT, "gloo", "nccl"):
        return name
    if name.upper() in getattr(dist.Backend, "_plugins", {}):
        return name
    raise ValueError(f"hetcomm: intra={name!r} (HETCOMM_INTRA) is not a torch.distributed backend here; use "
                     f"hetcomm, gloo, nccl, or a registered backend such as hccl (import torch_npu first)")


def site_layout(handle: Any, size: int) -> tuple[list[int], list[int], int]:
    """(site index of every rank, position of every rank in its site, ranks per site or 0 if uneven)
    of the connected communicator ``handle`` of ``size`` ranks."""
    site_of = [lib.hc_comm_site_of(handle, r) for r in range(size)]
    ring = ffi.new("int[]", size)
    _native.check(lib.hc_comm_ring_order(handle, ring, size))
    position_of = [0] * size
    members: dict[int, int] = {}
    # The ring visits a site's ranks in this order: positions follow it, as
    # in the core's hierarchical algorithm.
    for r in ring:
        position_of[r] = members.get(site_of[r], 0)
        members[site_of[r]] = position_of[r] + 1
    counts = set(members.values())
    return site_of, position_of, counts.pop() if len(counts) == 1 else 0


def _vendor_group(name: str, store: Any, rank: int, size: int, timeout: float) -> Any:
    delta = timedelta(seconds=timeout)
    if name == "gloo":
        return dist.ProcessGroupGloo(store, rank, size, delta)
    if name == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = delta
        return dist.ProcessGroupNCCL(store, rank, size, opts)
    plugin = dist.Backend._plugins[name.upper()]
    if plugin.extended_api:
        from torch.distributed.distributed_c10d import _DistributedBackendOptions

        o = _DistributedBackendOptions()
        o.store, o.group_rank, o.group_size, o.timeout = store, rank, size, delta
        return plugin.creator_fn(o, None)
    return plugin.creator_fn(store, rank, size, delta)


def attach(backend: Any, store: Any, opts: Options) -> bool:
    """Gives ``backend`` (a HetcommBackend) its site group of the in-site library ``opts`` name and its
    column communicator; False where that library is hetcomm itself or the sites are uneven.

    Collective over the group: every member calls it with a store they share,
    for a new group as for one made from another (shrunk, grown). The
    subgroups meet in the store under the group's communicator name, so a
    group's never meet its predecessor's. A failure aborts ``backend``.
    """
    intra = intra_backend(opts)
    if intra == DEFAULT:
        return False
    try:
        return _attach(backend, store, opts, intra)
    except BaseException:
        backend.abort()
        raise


def _attach(backend: Any, store: Any, opts: Options, intra: str) -> bool:
    from hetcomm.torch.backend import handle_of, wrap_handle

    name, rank, size = backend.comm_name, backend.rank(), backend.size()
    site_of, position_of, per_site = site_layout(ffi.cast("hc_comm *", backend.comm_address), size)
    if not per_site:
        log.warning("%s: intra=%s needs the same number of ranks in every site (%s); every phase stays on "
                    "hetcomm", name, intra, site_of)
        return False
    nsites = size // per_site
    site, position = site_of[rank], position_of[rank]
    base = f"hetcomm-intra/{name}"
    vendor = _vendor_group(intra, dist.PrefixStore(f"{base}/site{site}", store), position, per_site,
                           float(opts.timeout))
    # The inter-site leg is the core's ring over the column, as in its
    # hierarchical allreduce, so that sums are taken in the same order.
    column_name, column_opts = f"{name}.col{position}", dataclasses.replace(opts, algo="ring")
    column = _comm.Communicator(site, nsites, store=dist.PrefixStore(f"{base}/col{position}", store),
                                name=column_name, options=column_opts)
    backend.set_site_split(vendor, wrap_handle(handle_of(column), site, nsites, column_opts, column_name),
                           site_of, position_of)
    log.info("%s: rank %d: in-site phases on %s (site %d, position %d of %d), inter-site on hetcomm across %d "
             "sites", name, rank, intra, site, position, per_site, nsites)
    return True
