"""FSDP2 across two sites (2 x 2 torch ranks on loopback) with HETCOMM_CODEC=int8:
gradients go through the hierarchical reduce-scatter (int8 across sites only),
parameters through the exact hierarchical allgather. Each step is checked
against an fp32 step taken from the same parameters, within the bound the
codec gives the averaged gradient."""
from __future__ import annotations

import pytest

pytest.importorskip("torch")
from torch_ranks import run_ranks  # noqa: E402

QMAX_INT8 = 127
SITES = 2
LR = 0.5
BATCH = 8  # per rank


def _fsdp_across_sites(rank: int, ws: int, steps: int) -> list[float]:
    import copy
    import os

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ["HETCOMM_SITE"] = f"dc{rank * SITES // ws}"
    dist.init_process_group("hetcomm")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 256), torch.nn.Tanh(), torch.nn.Linear(256, 8))
    reference = copy.deepcopy(model)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    data = torch.Generator().manual_seed(7)
    worst = []
    for _ in range(steps):
        x = torch.randn(ws * BATCH, 16, generator=data)
        y = torch.randn(ws * BATCH, 8, generator=data)
        before = [p.full_tensor().detach().clone() for p in model.parameters()]
        mine = slice(rank * BATCH, (rank + 1) * BATCH)
        torch.nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
        opt.step()
        opt.zero_grad()
        # Every rank's gradient, in fp32 from the same parameters.
        with torch.no_grad():
            for p, b in zip(reference.parameters(), before):
                p.copy_(b)
        grads = []
        for r in range(ws):
            reference.zero_grad()
            part = slice(r * BATCH, (r + 1) * BATCH)
            torch.nn.functional.mse_loss(reference(x[part]), y[part]).backward()
            grads.append([p.grad.clone() for p in reference.parameters()])
        for i, (p, b) in enumerate(zip(model.parameters(), before)):
            g = [gr[i].double() for gr in grads]
            avg = sum(g) / ws
            # One int8 quantization (the inter-site leg of 2 sites) of a partial
            # sum of at most every rank's gradient: half a step of the block's
            # absmax / 127, then divided by the ranks; fp32 rounding of the update.
            bound = LR * sum(float(t.abs().max()) for t in g) / ws / (2 * QMAX_INT8) * 1.001
            expected = b.double() - LR * avg
            err = (p.full_tensor().double() - expected).abs()
            limit = bound + 2.0**-22 * (b.double().abs() + LR * avg.abs())
            assert bool((err <= limit).all()), f"param {i}: error {float(err.max())} > bound {bound}"
            worst.append(float(err.max()) / bound)
    return worst


@pytest.mark.timeout(300)
def test_fsdp2_int8_across_sites_within_the_codec_bound():
    env = {"HETCOMM_CODEC": "int8", "HETCOMM_CODEC_MIN_BYTES": "0"}
    for worst in run_ranks(_fsdp_across_sites, 4, 4, env=env, timeout=240):
        assert max(worst) > 0.01  # the codec did run (an exact result would be 0)
