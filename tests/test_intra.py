"""HETCOMM_INTRA: the in-site phases on another library (gloo standing in for NCCL/HCCL).

Two sites of two ranks each on loopback (site labels per rank). With
intra="gloo", allreduce and broadcast run reduce-scatter/allgather/broadcast
inside each site on a gloo group and only the inter-site leg on hetcomm;
every result must be bit-identical to hetcomm alone, on every rank.
"""
from __future__ import annotations

import os
import sys

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from torch_ranks import run_ranks  # noqa: E402

SIZES = (1, 7, 1000, 65_537, 600_001)  # odd sizes: shards of unequal length


def _data(rank: int, n: int, dtype: "torch.dtype", salt: int) -> "torch.Tensor":
    g = torch.Generator().manual_seed(1000 * salt + rank)
    if dtype.is_floating_point:
        return (torch.randn(n, generator=g, dtype=torch.float64) * 10 ** (rank % 3)).to(dtype)
    return torch.randint(-1000, 1000, (n,), generator=g, dtype=dtype)


def _cases() -> list[tuple[int, "torch.dtype", "dist.ReduceOp", int]]:
    cases = []
    for n in SIZES:
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.int64):
            ops = [dist.ReduceOp.SUM, dist.ReduceOp.MAX] + ([dist.ReduceOp.AVG] if dtype.is_floating_point else [])
            cases += [(n, dtype, op, len(cases) + i + 1) for i, op in enumerate(ops)]
    return cases


def _raw(t: "torch.Tensor") -> bytes:
    """The tensor's bytes (tensors would travel back through shared memory that dies with the rank)."""
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def _run(rank: int, ws: int, intra: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from hetcomm.torch import ProcessGroupOptions

    site = "a" if rank < ws // 2 else "b"
    # The split composes only what the core runs hierarchically (not the
    # small allreduces, below small_bytes): a low threshold puts most cases
    # and DDP's buckets through it.
    dist.init_process_group("hetcomm", pg_options=ProcessGroupOptions(site=site, intra=intra, small_bytes=256))
    backend = dist.group.WORLD._get_backend(torch.device("cpu"))
    out: dict = {"split": backend.has_site_split}
    for n, dtype, op, salt in _cases():
        t = _data(rank, n, dtype, salt)
        dist.all_reduce(t, op=op)
        out[f"allreduce {n} {dtype} {op}"] = _raw(t)
    # Non-contiguous, and several in flight at once (issue order kept).
    nc = torch.arange(20.0).reshape(4, 5).t() * (rank + 1)
    dist.all_reduce(nc)
    out["non-contiguous"] = _raw(nc)
    flight = [_data(rank, 5000 + i, torch.float32, 900 + i) for i in range(6)]
    works = [dist.all_reduce(t, async_op=True) for t in flight]
    for w in works:
        w.wait()
    out["in flight"] = _raw(torch.cat(flight))
    for root in range(ws):
        t = _data(rank, 3001, torch.float32, 500 + root)
        dist.broadcast(t, src=root)
        out[f"broadcast {root}"] = _raw(t)
    # DDP (its bucket allreduces and the initial broadcast).
    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)),
                bucket_cap_mb=0.01)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)
    for _ in range(3):
        torch.nn.functional.mse_loss(model(torch.randn(8, 32, generator=g)), torch.randn(8, 4, generator=g)).backward()
        opt.step()
        opt.zero_grad()
    out["ddp"] = _raw(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return out


@pytest.mark.timeout(600)
def test_intra_gloo_is_bit_identical_to_hetcomm_alone() -> None:
    alone = run_ranks(_run, 4, "hetcomm", timeout=500)
    split = run_ranks(_run, 4, "gloo", timeout=500)
    assert not any(r["split"] for r in alone) and all(r["split"] for r in split)
    for key in alone[0]:
        if key == "split":
            continue
        for rank in range(4):
            # Bit for bit: across ranks and against hetcomm alone.
            assert split[rank][key] == alone[rank][key], f"{key}: rank {rank} differs from hetcomm alone"
            assert split[rank][key] == split[0][key], f"{key}: rank {rank} differs from rank 0"
    # And the values are right: against an fp64 reference.
    for n, dtype, op, salt in _cases():
        inputs = torch.stack([_data(r, n, dtype, salt).double() for r in range(4)])
        ref = {dist.ReduceOp.SUM: inputs.sum(0), dist.ReduceOp.MAX: inputs.max(0).values,
               dist.ReduceOp.AVG: inputs.mean(0)}[op]
        tol = {torch.bfloat16: 2e-2, torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype, 0)
        got = torch.frombuffer(bytearray(split[0][f"allreduce {n} {dtype} {op}"]), dtype=dtype).double()
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol * 100)


def test_intra_refuses_an_unknown_backend() -> None:
    from hetcomm.torch.intra import intra_backend
    from hetcomm.torch.options import ProcessGroupOptions

    with pytest.raises(ValueError, match="intra='nosuch'"):
        intra_backend(ProcessGroupOptions(intra="nosuch"))
    assert intra_backend(ProcessGroupOptions()) in ("hetcomm", os.environ.get("HETCOMM_INTRA", "hetcomm"))
