"""DiLoCo: low-communication training across sites, on hetcomm.

Each site trains on its own for ``inner_steps`` (H) steps with any inner
optimizer (inner data parallelism inside the site is the user's DDP on the
site's process group). Then the sites average their *pseudo-gradients*
(outer parameters minus the local ones) with one compressed allreduce across
sites, with error feedback, and an outer optimizer (Nesterov SGD) moves the
outer parameters; every rank restarts from them. WAN traffic falls by a factor
of about H times the codec's compression.

Streaming (``fragments`` > 1): the parameters are cut into fragments that
synchronise in turn, fragment f at inner steps ``f * H / fragments`` modulo
H, and (``overlap_steps`` > 0) the fragment's allreduce runs in the core
while the next inner steps compute; the arriving outer parameters are then
mixed with the local ones that moved on meanwhile.

Every rank holds bit-identical outer parameters: the compressed allreduce
ends bit-identical on all ranks and the outer update is the same arithmetic
on the same bits. Membership changes (a site dropped or back) go through
:meth:`DiLoCo.on_membership_change`; with ``elastic=True`` a sync that fails
because a site was lost shrinks the outer group past it (the survivors
average without it), and :meth:`DiLoCo.grow_if_pending` takes a restarted
site back at a step boundary with the current outer state.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterable

import torch
import torch.distributed as dist

from hetcomm.comm import codec_code

log = logging.getLogger("hetcomm.diloco")

# Error-feedback residual keys: one per fragment, in a range of DiLoCo's own
# (the DDP hook uses another).
_KEY_BASE = 0x44494C4F00000000  # "DILO"


@dataclasses.dataclass(eq=False)
class _Fragment:
    index: int
    params: list[torch.Tensor]
    outer: torch.Tensor       # flat fp32 outer parameters, identical on every rank
    momentum: torch.Tensor
    delta: torch.Tensor       # pseudo-gradient being averaged
    offset: int               # inner step (mod H) at which it syncs
    work: Any = None          # the allreduce in flight, if any
    due: int = 0              # inner step at which its result is applied


def site_group(ranks_per_site: int, backend: str | None = "gloo") -> Any:
    """This rank's in-site process group, for DiLoCo's inner data parallelism.

    Ranks ``[k * ranks_per_site, (k + 1) * ranks_per_site)`` form site k (the
    order torchrun and hetcomm.testbed give). Every rank creates every
    site's group, as ``dist.new_group`` requires; ``backend`` is the site's
    own library (gloo stands in for NCCL/HCCL on CPU).
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if ranks_per_site < 1 or world % ranks_per_site:
        raise ValueError(f"site_group: ranks_per_site={ranks_per_site} does not divide the world size {world}")
    mine = None
    for first in range(0, world, ranks_per_site):
        group = dist.new_group(list(range(first, first + ranks_per_site)), backend=backend)
        if first <= rank < first + ranks_per_site:
            mine = group
    return mine


def _split(params: list[torch.Tensor], parts: int) -> list[list[torch.Tensor]]:
    """Contiguous runs of whole tensors with about equal element counts."""
    total = sum(p.numel() for p in params)
    out: list[list[torch.Tensor]] = [[] for _ in range(parts)]
    seen = 0
    for p in params:
        out[min(parts - 1, seen * parts // max(total, 1))].append(p)
        seen += p.numel()
    return [f for f in out if f]


def _flat(params: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in params])


@torch.no_grad()
def _assign(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    for p, v in zip(params, torch.split(flat, [p.numel() for p in params])):
        p.copy_(v.view_as(p))


class DiLoCo:
    """Outer-optimizer wrapper: call :meth:`step` where ``inner_optimizer.step()`` was.

    Args:
        model: the module whose parameters train (the DDP-wrapped module or
            the DDP wrapper itself; DDP on the site's group keeps a site's
            replicas equal between outer steps).
        inner_optimizer: any torch optimizer over the model's parameters.
        inner_steps: H, inner steps between two syncs of each fragment.
        outer_lr, outer_momentum, nesterov: the outer SGD.
        codec: codec of the pseudo-gradient across sites ("none", "fp16",
            "bf16", "int8", "int4", "1bit"); needs a "hetcomm" group unless "none".
        error_feedback: keep what the codec dropped (per fragment, in the
            core) and add it to the next sync.
        fragments: streaming fragments (1: plain DiLoCo).
        overlap_steps: inner steps a fragment's allreduce may run behind
            compute before its result is applied (0: applied at once).
        mix: with overlap, local = mix * local + (1 - mix) * outer on arrival.
        group: the outer process group (default: the default group); the
            pseudo-gradient is averaged over its ranks, so every site should
            have the same number of ranks in it.
        elastic: when a sync fails because ranks of the outer group were
            lost (a site went down), shrink the group past them
            (``hetcomm.torch.shrink_lost``) and redo the sync on the
            survivors, instead of raising. Needs a "hetcomm" outer group.

    Example::

        site = site_group(ranks_per_site=2)              # gloo/NCCL inside a site
        ddp = DDP(model, process_group=site)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
        diloco = DiLoCo(model, opt, inner_steps=50, codec="int4")  # from hetcomm.diloco
        for x, y in data:
            opt.zero_grad(); loss_fn(ddp(x), y).backward(); diloco.step()
        diloco.finish()
    """

    def __init__(self, model: torch.nn.Module, inner_optimizer: torch.optim.Optimizer, *, inner_steps: int = 50,
                 outer_lr: float = 0.7, outer_momentum: float = 0.9, nesterov: bool = True, codec: str = "int4",
                 error_feedback: bool = True, fragments: int = 1, overlap_steps: int = 0, mix: float = 0.5,
                 group: Any = None, elastic: bool = False) -> None:
        if inner_steps < 1:
            raise ValueError(f"DiLoCo: inner_steps must be at least 1, got {inner_steps}")
        if not 1 <= fragments <= inner_steps:
            raise ValueError(f"DiLoCo: fragments must be in [1, inner_steps={inner_steps}], got {fragments}")
        if not 0 <= overlap_steps < inner_steps:  # a fragment's result lands before its next sync starts
            raise ValueError(f"DiLoCo: overlap_steps must be in [0, inner_steps={inner_steps}), got {overlap_steps}")
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"DiLoCo: mix must be in [0, 1], got {mix}")
        self.inner_optimizer = inner_optimizer
        self.inner_steps, self.outer_lr, self.outer_momentum, self.nesterov = inner_steps, outer_lr, outer_momentum, nesterov
        self.codec, self.code, self.error_feedback = codec, codec_code(codec), error_feedback
        self.overlap_steps, self.mix, self.elastic = overlap_steps, mix, elastic
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("DiLoCo: the model has no trainable parameters")
        self.fragments: list[_Fragment] = []
        for i, frag in enumerate(_split(params, fragments)):
            outer = _flat(frag)
            self.fragments.append(_Fragment(i, frag, outer, torch.zeros_like(outer), torch.empty_like(outer),
                                            offset=i * inner_steps // fragments))
        self.step_count = 0
        self.outer_steps = 0
        # Every site starts from rank 0's parameters (a site joining a running
        # job after hetcomm.torch.join_group: from the current outer state).
        self.on_membership_change(group, source_rank=0)
        if elastic and self.backend is None:
            raise ValueError("DiLoCo: elastic=True needs a 'hetcomm' outer group")

    # ---- the training loop -----------------------------------------------------

    def step(self) -> None:
        """One inner step (``inner_optimizer.step()``), then whatever fragment syncs fall due."""
        self.inner_optimizer.step()
        self.step_count += 1
        for frag in self.fragments:
            if frag.work is not None and self.step_count >= frag.due:
                self._apply(frag, self.mix)
        for frag in self.fragments:
            if frag.work is None and (self.step_count - frag.offset) % self.inner_steps == 0:
                self._start(frag)
                if self.overlap_steps == 0:
                    self._apply(frag, 0.0)

    def finish(self) -> None:
        """Ends training: a last sync of every fragment; all ranks then hold the same parameters."""
        for frag in self.fragments:
            if frag.work is not None:
                self._apply(frag, self.mix)
            self._start(frag)
            self._apply(frag, 0.0)

    # ---- membership ---------------------------------------------------------------

    def on_membership_change(self, group: Any = None, source_rank: int | None = 0) -> None:
        """Switches the outer allreduce to ``group`` (a shrunk or grown outer group).

        Syncs in flight on the old group are dropped: their fragments' local
        progress stays and joins the next sync, so a site that fell out of an
        outer step is simply left out of that average. With ``source_rank``
        (a group rank that holds current state, e.g. a survivor), the outer
        parameters and momentum are broadcast from it and every rank restarts
        from them, with the step counters (so every rank syncs the same
        fragments at the same steps): how a site that comes back rejoins.
        Error-feedback residuals restart empty (they live in the group's
        communicator).
        """
        self.group = group if group is not None else dist.distributed_c10d._get_default_group()
        self.backend = self._hetcomm_backend(self.group)
        if self.code > 0 and self.backend is None:
            raise ValueError(f"DiLoCo: codec {self.codec!r} needs a 'hetcomm' outer group; "
                             f"this group's backend is {dist.get_backend(self.group)!r}")
        for frag in self.fragments:
            if frag.work is not None:
                # An op of the old group may still write its buffer: the next sync gets a new one.
                frag.work, frag.delta = None, torch.empty_like(frag.delta)
        if source_rank is None:
            return
        src = dist.get_global_rank(self.group, source_rank)
        counters = torch.tensor([self.step_count, self.outer_steps], dtype=torch.int64)
        dist.broadcast(counters, src, group=self.group)
        self.step_count, self.outer_steps = (int(v) for v in counters)
        for frag in self.fragments:
            dist.broadcast(frag.outer, src, group=self.group)
            dist.broadcast(frag.momentum, src, group=self.group)
            _assign(frag.params, frag.outer)
        log.info("DiLoCo: outer group now has %d ranks; state taken from its rank %d",
                 dist.get_world_size(self.group), source_rank)

    def grow_if_pending(self, store: Any, *, name: str = "world", wait_for: int = 0,
                        timeout: float | None = None) -> bool:
        """At a step boundary, on every rank of the outer group: takes back the sites waiting to join.

        ``hetcomm.torch.grow_if_pending`` on the outer group (which must be
        the default group); when it grew, the outer parameters, momentum and
        step counters go from rank 0 to every rank (the newcomers receive
        them in their own ``DiLoCo(...)``, made after
        ``hetcomm.torch.join_group(store, name=name)``). One small broadcast
        when nobody waits: call it at outer-step boundaries. Returns whether
        the group grew.
        """
        from hetcomm.torch import elastic

        grown = elastic.grow_if_pending(store, self.group, name=name, wait_for=wait_for, timeout=timeout)
        if grown is None:
            return False
        self.on_membership_change(grown, source_rank=0)
        return True

    # ---- internals ------------------------------------------------------------------

    @staticmethod
    def _hetcomm_backend(group: Any) -> Any:
        if dist.get_backend(group) != "hetcomm":
            return None
        from hetcomm.torch.hooks import _backend_of

        return _backend_of(group, torch.device("cpu"))

    def _start(self, frag: _Fragment) -> None:
        try:
            self._launch(frag)
        except RuntimeError as exc:
            self._recover(frag, exc)

    def _recover(self, frag: _Fragment, exc: RuntimeError) -> None:
        """A sync failed. With ``elastic`` and ranks of the outer group lost: shrinks the
        group past them and starts the fragment's sync again on the survivors."""
        if not self.elastic:
            raise exc
        from hetcomm.torch import elastic

        if not elastic.failed_ranks(self.group):
            raise exc
        before = dist.get_world_size(self.group)
        self.on_membership_change(elastic.shrink_lost(self.group), source_rank=None)
        log.warning("DiLoCo: a sync failed (%s); outer group shrunk from %d to %d ranks, syncing without the lost ones",
                    exc, before, dist.get_world_size(self.group))
        self._launch(frag)

    def _launch(self, frag: _Fragment) -> None:
        """Starts averaging the fragment's pseudo-gradient (outer - local) across the outer group."""
        torch.sub(frag.outer, _flat(frag.params), out=frag.delta)
        frag.due = self.step_count + self.overlap_steps
        if self.backend is not None:
            key = _KEY_BASE + frag.index + 1 if self.error_feedback and self.code > 0 else 0
            frag.work = self.backend.allreduce_compressed(frag.delta, self.code, key, 0, 1)  # 1: HC_AVG
        else:  # averaged in _apply
            frag.work = dist.all_reduce(frag.delta, group=self.group, async_op=True)

    @torch.no_grad()
    def _apply(self, frag: _Fragment, mix: float) -> None:
        """Waits for the fragment's average, takes one outer step, and sets the local
        parameters to ``mix * local + (1 - mix) * outer``."""
        while True:
            try:
                frag.work.wait()
                break
            except RuntimeError as exc:
                self._recover(frag, exc)
        frag.work = None
        if self.backend is None:
            frag.delta.div_(dist.get_world_size(self.group))
        delta = frag.delta
        if self.outer_momentum:
            frag.momentum.mul_(self.outer_momentum).add_(delta)
            delta = delta.add(frag.momentum, alpha=self.outer_momentum) if self.nesterov else frag.momentum
        frag.outer.sub_(delta, alpha=self.outer_lr)
        if mix:
            _assign(frag.params, _flat(frag.params).mul_(mix).add_(frag.outer, alpha=1 - mix))
        else:
            _assign(frag.params, frag.outer)
        if frag is self.fragments[-1]:
            self.outer_steps += 1
