"""Ranks of different speeds: batch sizes in proportion to measured speed.

In a job that mixes vendors, a data-parallel step waits for the slowest
rank. :class:`Balancer` measures how many samples per second each rank
computes, splits a fixed global batch in proportion (faster ranks take more
samples), re-measures as speeds drift, and weights the gradient average by
samples so that the update is exactly that of one uniform global batch::

    balancer = hetcomm.balance.Balancer(global_batch=256)
    model = DDP(model)
    model.register_comm_hook(None, balancer.ddp_hook())
    for step, (x, y) in enumerate(loader):          # x, y: the global batch
        lo, n = balancer.share()                     # this rank's slice
        with balancer.step():
            loss = loss_fn(model(x[lo:lo + n]), y[lo:lo + n])   # mean over n
            loss.backward()
        opt.step(); opt.zero_grad()

Each rank's loss is a mean over its own ``n`` samples; the hook scales its
gradient by ``n / global_batch`` and sums, which equals the mean over the
global batch whatever the split. A rank's speed is the time from entering
``step()`` to the moment its last gradient bucket is ready (its own compute,
before it waits for slower peers), so a fast rank does not look slow because
it waited.
"""
# No postponed annotations: DDP checks the hook's annotations at registration.
import contextlib
import logging
import time
from typing import Any, Callable, Iterator, Sequence

log = logging.getLogger("hetcomm.balance")


def split_batch(global_batch: int, speeds: Sequence[float], minimum: int = 1) -> list[int]:
    """Splits ``global_batch`` samples in proportion to ``speeds`` (largest remainder).

    Every rank gets at least ``minimum`` samples; the counts add up to
    ``global_batch`` exactly, and the same speeds always give the same split.
    """
    n = len(speeds)
    if n == 0:
        raise ValueError("split_batch: no ranks")
    if global_batch < minimum * n:
        raise ValueError(f"split_batch: global_batch={global_batch} cannot give {n} ranks {minimum} samples each")
    bad = [i for i, s in enumerate(speeds) if not (s > 0 and s < float("inf"))]
    if bad:
        raise ValueError(f"split_batch: speeds must be positive and finite; rank(s) {bad} reported "
                         f"{[speeds[i] for i in bad]}")
    total = float(sum(speeds))
    exact = [global_batch * s / total for s in speeds]
    counts = [int(e) for e in exact]
    # Ties go to the lower rank so that every rank computes the same split.
    order = sorted(range(n), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:global_batch - sum(counts)]:
        counts[i] += 1
    # Ranks under the minimum take it from the largest shares.
    for i in range(n):
        while counts[i] < minimum:
            donor = max(range(n), key=lambda j: (counts[j], -j))
            counts[donor] -= 1
            counts[i] += 1
    return counts


class Balancer:
    """Per-rank batch sizes in proportion to measured speed, for one process group.

    Args:
        global_batch: samples per step over all ranks (what one uniform
            global batch would hold).
        group: the process group (None: the default group).
        interval: steps between re-measurements (each costs one small
            all-gather).
        warmup: steps measured but not used (first-step allocations, caches).
        smoothing: weight of the newest measurement in the running average
            of each rank's seconds per sample (1.0: no averaging).
        threshold: re-split only if the new split would shorten the
            predicted step by more than this fraction (avoids flapping).
        minimum: fewest samples any rank gets.
    """

    def __init__(self, global_batch: int, group: Any = None, interval: int = 10, warmup: int = 1,
                 smoothing: float = 0.5, threshold: float = 0.03, minimum: int = 1) -> None:
        import torch.distributed as dist

        if interval < 1:
            raise ValueError(f"Balancer: interval must be >= 1, got {interval}")
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"Balancer: smoothing must be in (0, 1], got {smoothing}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.global_batch = int(global_batch)
        self.interval = interval
        self.warmup = warmup
        self.smoothing = smoothing
        self.threshold = threshold
        self.minimum = minimum
        self.counts = split_batch(self.global_batch, [1.0] * self.world, minimum)
        self.steps = 0
        self.rebalances = 0
        self._per_sample: float | None = None  # this rank's smoothed seconds per sample
        self._window: list[float] = []         # seconds per sample, this interval
        self._t0: float | None = None
        self._ready: float | None = None

    # ---- the split ---------------------------------------------------------------------

    def share(self, rank: int | None = None) -> tuple[int, int]:
        """(offset, count) of ``rank``'s (default: this rank's) slice of the global batch."""
        r = self.rank if rank is None else rank
        return sum(self.counts[:r]), self.counts[r]

    @property
    def batch_size(self) -> int:
        """This rank's samples per step."""
        return self.counts[self.rank]

    @property
    def weight(self) -> float:
        """This rank's share of the gradient sum: its samples over the global batch."""
        return self.counts[self.rank] / self.global_batch

    # ---- measuring -----------------------------------------------------------------------

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Times one step's forward and backward on this rank (wrap both in it).

        With :meth:`ddp_hook` the step ends when the last gradient bucket is
        ready; otherwise at the end of the block. Every ``interval`` steps the
        ranks exchange their speeds and may re-split (a collective: every rank
        must use ``step()`` the same number of times).
        """
        self._t0 = time.perf_counter()
        self._ready = None
        yield
        end = self._ready if self._ready is not None else time.perf_counter()
        self.record(end - self._t0, self.counts[self.rank])

    def record(self, seconds: float, samples: int) -> None:
        """Records one step's compute time by hand (instead of :meth:`step`)."""
        self.steps += 1
        if self.steps > self.warmup and samples > 0:
            self._window.append(seconds / samples)
        if self.steps > self.warmup and self.steps % self.interval == 0:
            self._rebalance()

    def _rebalance(self) -> None:
        import torch
        import torch.distributed as dist

        if self._window:
            # The median of the interval: one descheduled step does not move the split.
            latest = sorted(self._window)[len(self._window) // 2]
            a = self.smoothing
            self._per_sample = latest if self._per_sample is None else a * latest + (1 - a) * self._per_sample
        self._window.clear()
        mine = torch.tensor([self._per_sample or 0.0], dtype=torch.float64)
        every = torch.empty(self.world, dtype=torch.float64)
        dist.all_gather_into_tensor(every, mine, group=self.group)
        per_sample = every.tolist()
        if any(p <= 0 for p in per_sample):
            return  # some rank has no measurement yet
        speeds = [1.0 / p for p in per_sample]
        proposal = split_batch(self.global_batch, speeds, self.minimum)
        now = max(c * p for c, p in zip(self.counts, per_sample))
        then = max(c * p for c, p in zip(proposal, per_sample))
        if proposal != self.counts and then < now * (1.0 - self.threshold):
            log.info("rank %d: re-split the global batch of %d: %s -> %s (speeds %s samples/s; predicted "
                     "step %.1f -> %.1f ms)", self.rank, self.global_batch, self.counts, proposal,
                     [round(s, 1) for s in speeds], now * 1e3, then * 1e3)
            self.counts = proposal
            self.rebalances += 1

    # ---- the weighted average ------------------------------------------------------------

    def ddp_hook(self) -> Callable[..., Any]:
        """A DDP comm hook: gradient sum weighted by samples (= the global-batch mean).

        Register with ``model.register_comm_hook(group_or_None, balancer.ddp_hook())``;
        it also marks the end of this rank's compute for :meth:`step`.
        """
        import torch
        import torch.distributed as dist

        def hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
            if bucket.is_last():
                self._ready = time.perf_counter()
            tensor = bucket.buffer()
            tensor.mul_(self.weight)
            group = state if state is not None else self.group
            work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group, async_op=True)
            return work.get_future().then(lambda fut: fut.value()[0])

        hook.__name__ = "hetcomm_balanced_hook"
        return hook

    def weight_gradients(self, parameters: Any) -> None:
        """Without DDP: sums ``parameters``' gradients over the group, weighted by samples."""
        import torch.distributed as dist

        self._ready = time.perf_counter()
        for p in parameters:
            if p.grad is not None:
                p.grad.mul_(self.weight)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=self.group)
