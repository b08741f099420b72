"""DDP training with hetcomm reaches gloo's parameters.

The same small model (with BatchNorm buffers, so buffer sync matters) is
trained on fixed synthetic data for a few steps twice in the same ranks:
once over a hetcomm group, once over a gloo group. Ranks start from
different random weights, so DDP's initial broadcast matters too. After
training, hetcomm's parameters must match gloo's to fp32 rounding (the two
sum gradients in different orders) and be bit-identical across ranks.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch_ranks import run_ranks  # noqa: E402

STEPS = 6


def _net() -> "torch.nn.Module":
    return torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))


def _train(rank: int, ws: int, group: object, variant: str) -> tuple[list["torch.Tensor"], list["torch.Tensor"]]:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(100 + rank)  # different on every rank: DDP's init sync must fix it
    model = _net()
    kwargs = {"gradient_as_bucket_view": True} if variant == "bucket_view" else {}
    ddp = DDP(model, process_group=group, **kwargs)  # otherwise default arguments
    if variant == "fp16_hook":
        ddp.register_comm_hook(group, default_hooks.fp16_compress_hook)
    elif variant == "custom_hook":
        # No annotations: DDP checks them, and this module's are strings.
        def hook(state, bucket):  # type: ignore[no-untyped-def]
            buf = bucket.buffer().div_(dist.get_world_size(group))
            fut = dist.all_reduce(buf, group=group, async_op=True).get_future()
            return fut.then(lambda f: f.value()[0])

        ddp.register_comm_hook(None, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    data = torch.Generator().manual_seed(7 + rank)
    for step in range(STEPS):
        x = torch.randn(16, 10, generator=data)
        y = torch.randint(0, 3, (16,), generator=data)
        if variant == "no_sync" and step % 2 == 0:
            with ddp.no_sync():
                torch.nn.functional.cross_entropy(ddp(x), y).backward()
            continue
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
    params = [p.detach().clone() for p in model.parameters()]
    # Buffers: synced from rank 0 before each forward, then updated locally by it.
    buffers = [b.detach().clone() for b in model.buffers() if b.is_floating_point()]
    return params, buffers


VARIANTS = ("default", "fp16_hook", "custom_hook", "no_sync", "bucket_view")


def _ddp(rank: int, ws: int, variants: tuple[str, ...]) -> str:
    import torch.distributed as dist

    dist.init_process_group("hetcomm")
    gloo = dist.new_group(backend="gloo")
    for variant in variants:
        ours, our_buffers = _train(rank, ws, dist.group.WORLD, variant)
        theirs, their_buffers = _train(rank, ws, gloo, variant)
        tol = {"rtol": 2e-3, "atol": 2e-4} if variant == "fp16_hook" else {"rtol": 1e-5, "atol": 1e-6}
        for i, (a, b) in enumerate(zip(ours + our_buffers, theirs + their_buffers)):
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{variant}: tensor {i}: {m}")
        # Bit-identical across ranks (compared over gloo, which is not under test).
        for i, a in enumerate(ours):
            gathered = [torch.empty_like(a) for _ in range(ws)]
            dist.all_gather(gathered, a, group=gloo)
            for r, g in enumerate(gathered):
                assert torch.equal(g, a), f"{variant}: tensor {i} differs between rank {rank} and rank {r}"
    return "ok"


@pytest.mark.timeout(300)
def test_ddp_matches_gloo() -> None:
    """Default DDP, fp16_compress_hook, a custom hook, no_sync and gradient_as_bucket_view."""
    assert run_ranks(_ddp, 2, VARIANTS) == ["ok", "ok"]
