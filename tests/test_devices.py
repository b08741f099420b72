"""Tensors on accelerators through init_process_group("hetcomm"): the device staging path.

"hcdev" is a test-only PrivateUse1 device (tests/privateuse1): host memory
behind asynchronous streams, so a missing synchronisation shows up as wrong
data. Every collective, DDP and FSDP2 run with tensors on it, also in groups
where one rank holds CPU tensors and another device tensors. The same tests
run on CUDA where a GPU is present.
"""
from __future__ import annotations

import os
import sys

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_torch_backend import _reference, _value  # noqa: E402
from torch_ranks import run_ranks  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_skip() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device here (torch.cuda.is_available() is False)"
    return None


def _hcdev_skip() -> str | None:
    try:
        import privateuse1

        privateuse1.load()
    except Exception as exc:  # noqa: BLE001 - any build failure is the reason to skip
        return f"the test device extension does not build here: {exc}"
    return None


# Each case: the device type of every rank.
CASES = {
    "hcdev": ["hcdev", "hcdev"],
    "cpu+hcdev": ["cpu", "hcdev"],
    "cuda": ["cuda", "cuda"],
    "cpu+cuda": ["cpu", "cuda"],
}


def _skip_reason(kinds: list[str]) -> str | None:
    if "cuda" in kinds:
        return _cuda_skip()
    if "hcdev" in kinds:
        return _hcdev_skip()
    return None


def _run_case(fn, case: str) -> None:
    """Runs `fn` on one rank per device kind of `case`, or skips naming why."""
    kinds = CASES[case]
    reason = _skip_reason(kinds)
    if reason:
        pytest.skip(reason)
    assert run_ranks(fn, len(kinds), kinds, timeout=500) == ["ok"] * len(kinds)


def _device(kind: str, rank: int) -> "torch.device":
    """Sets up this rank's device of type ``kind``."""
    if kind == "hcdev":
        import privateuse1

        ext = privateuse1.load()
        # Copies land 1 ms late: a copy the staging path forgot to wait for
        # leaves stale bytes behind instead of passing by luck.
        ext.set_copy_delay_us(1000)
        return torch.device("hcdev", 0)
    if kind == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check(t: "torch.Tensor", expect: "torch.Tensor", dev: "torch.device", what: str) -> None:
    assert t.device == dev, f"{what}: result moved to {t.device}"
    torch.testing.assert_close(t.cpu(), expect, msg=lambda m: f"{what}: {m}")


def _collectives(rank: int, ws: int, kinds: list[str]) -> str:
    dev = _device(kinds[rank], rank)
    dist.init_process_group("hetcomm")

    def on(t: "torch.Tensor") -> "torch.Tensor":
        return t.to(dev)

    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64,
                  torch.uint8):
        ops = [dist.ReduceOp.SUM, dist.ReduceOp.MAX] + ([dist.ReduceOp.AVG] if dtype.is_floating_point else [])
        for op in ops:
            t = on(_value(rank, 37, dtype))
            work = dist.all_reduce(t, op=op, async_op=True)
            work.wait()
            _check(t, _reference(op, [_value(r, 37, dtype) for r in range(ws)]), dev, f"all_reduce {dtype} {op}")
    # A large one: several pipeline chunks; a non-contiguous device tensor.
    big = on(torch.arange(600_000, dtype=torch.float32) % 97 + rank)
    dist.all_reduce(big)
    _check(big, sum(torch.arange(600_000, dtype=torch.float32) % 97 + r for r in range(ws)), dev, "large")
    nc = on(torch.arange(12.0).reshape(3, 4) + rank).t()
    dist.all_reduce(nc)
    _check(nc, sum(torch.arange(12.0).reshape(3, 4) + r for r in range(ws)).t(), dev, "non-contiguous")

    ts = [on(torch.full((n,), float(rank + n))) for n in (3, 5, 7)]
    dist.all_reduce_coalesced(ts)
    for n, t in zip((3, 5, 7), ts):
        _check(t, torch.full((n,), float(sum(r + n for r in range(ws)))), dev, "all_reduce_coalesced")
    with dist._coalescing_manager(async_ops=True) as cm:
        for t in ts:
            dist.all_reduce(t)
    cm.wait()
    for n, t in zip((3, 5, 7), ts):
        _check(t, torch.full((n,), float(ws * sum(r + n for r in range(ws)))), dev, "coalescing manager")

    for root in range(ws):
        t = on(torch.arange(6.0) + rank)
        dist.broadcast(t, src=root)
        _check(t, torch.arange(6.0) + root, dev, f"broadcast from {root}")
        t = on(_value(rank, 11, torch.int32))
        dist.reduce(t, dst=root)
        expect = _reference(dist.ReduceOp.SUM, [_value(r, 11, torch.int32) for r in range(ws)])
        _check(t, expect if rank == root else _value(rank, 11, torch.int32), dev, f"reduce to {root}")

    outs = [on(torch.empty(3, 2)) for _ in range(ws)]
    dist.all_gather(outs, on(torch.full((3, 2), float(rank))))
    for r, o in enumerate(outs):
        _check(o, torch.full((3, 2), float(r)), dev, "all_gather")
    out = on(torch.empty(ws * 4, dtype=torch.int64))
    dist.all_gather_into_tensor(out, on(torch.arange(4) + 10 * rank))
    _check(out, torch.cat([torch.arange(4) + 10 * r for r in range(ws)]), dev, "all_gather_into_tensor")

    out = on(torch.empty(4))
    dist.reduce_scatter(out, [on(torch.full((4,), float(rank * 10 + r))) for r in range(ws)])
    _check(out, torch.full((4,), float(sum(q * 10 + rank for q in range(ws)))), dev, "reduce_scatter")
    out = on(torch.empty(2))
    dist.reduce_scatter_tensor(out, on(torch.arange(2.0 * ws) * (rank + 1)))
    _check(out, torch.arange(2.0 * rank, 2.0 * rank + 2) * sum(range(1, ws + 1)), dev, "reduce_scatter_tensor")

    for root in range(ws):
        gl = [on(torch.empty(3)) for _ in range(ws)] if rank == root else None
        dist.gather(on(torch.full((3,), float(rank))), gl, dst=root)
        if rank == root:
            for r, x in enumerate(gl):
                _check(x, torch.full((3,), float(r)), dev, "gather")
        out = on(torch.empty(2, dtype=torch.int16))
        sl = [on(torch.full((2,), r * 7, dtype=torch.int16)) for r in range(ws)] if rank == root else None
        dist.scatter(out, sl, src=root)
        _check(out, torch.full((2,), rank * 7, dtype=torch.int16), dev, "scatter")

    outs = [on(torch.empty(rank + 1)) for _ in range(ws)]
    dist.all_to_all(outs, [on(torch.full((r + 1,), float(rank * 100 + r))) for r in range(ws)])
    for q, o in enumerate(outs):
        _check(o, torch.full((rank + 1,), float(q * 100 + rank)), dev, "all_to_all")
    in_splits, out_splits = [r + 1 for r in range(ws)], [rank + 1] * ws
    src = on(torch.cat([torch.full((r + 1, 2), float(rank * 10 + r)) for r in range(ws)]))
    dst = on(torch.empty(sum(out_splits), 2))
    dist.all_to_all_single(dst, src, out_splits, in_splits)
    _check(dst, torch.cat([torch.full((rank + 1, 2), float(q * 10 + rank)) for q in range(ws)]), dev,
           "all_to_all_single")

    nxt, prv = (rank + 1) % ws, (rank - 1) % ws
    # batch_isend_irecv returns one coalesced Work: its wait() must also
    # order the caller's stream behind the receive's copy back (it did not).
    for step in range(5):
        got = on(torch.full((5,), -1.0))
        reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, on(torch.full((5,), float(10 * step + rank))), nxt),
                                       dist.P2POp(dist.irecv, got, prv)])
        for req in reqs:
            req.wait()
        _check(got, torch.full((5,), float(10 * step + prv)), dev, f"send/recv {step}")
    dist.barrier()
    return "ok"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", list(CASES))
def test_collectives_on_devices(case: str) -> None:
    _run_case(_collectives, case)


# ---- staging properties -------------------------------------------------------------------------------


def _staging(rank: int, ws: int) -> dict:
    import privateuse1

    from hetcomm.torch import _build

    dev = _device("hcdev", rank)
    dist.init_process_group("hetcomm")
    shim = _build.load()
    ts = [torch.full((1000 + 10 * i,), float(rank + i)).to(dev) for i in range(8)]
    # Warm-up: two calls in flight at once leave two blocks in the staging
    # pool, what a loop needs in steady state (a call finds the previous
    # call's block still fenced by its copies back, the one before free).
    spare = [[t.clone() for t in ts] for _ in range(2)]
    works = [dist.all_reduce_coalesced(s, async_op=True) for s in spare]
    for w in works:
        w.wait()
    privateuse1.synchronize()
    privateuse1.reset_counters()
    before = shim.staging_stats()
    calls = 5
    for _ in range(calls):
        dist.all_reduce_coalesced(ts)
    counters = privateuse1.counters()  # before the checks' own copies
    for i, t in enumerate(ts):
        expect = float(sum(r + i for r in range(ws))) * ws ** (calls - 1)
        _check(t, torch.full((1000 + 10 * i,), expect), dev, f"tensor {i}")
    after = shim.staging_stats()
    return {"counters": counters, "allocations": after["allocations"] - before["allocations"],
            "reuses": after["reuses"] - before["reuses"], "calls": calls, "tensors": len(ts)}


@pytest.mark.timeout(600)
def test_staging_is_async_synchronises_once_per_call_and_reuses_buffers() -> None:
    reason = _hcdev_skip()
    if reason:
        pytest.skip(reason)
    for got in run_ranks(_staging, 2, timeout=500):
        c, calls, n = got["counters"], got["calls"], got["tensors"]
        # Every tensor goes down and back up with the device's asynchronous copy ...
        assert c["copy_d2h_async"] == calls * n and c["copy_h2d_async"] == calls * n, c
        assert c["copy_d2h_sync"] == 0 and c["copy_h2d_sync"] == 0, c
        # ... and each call waits once for all its tensors, not once per tensor ...
        assert c["event_syncs"] + c["stream_syncs"] + c["device_syncs"] == calls, c
        # ... through host buffers taken from the staging pool, not allocated anew.
        assert got["allocations"] == 0 and c["pinned_allocs"] == 0, got
        assert got["reuses"] >= calls, got


# ---- DDP and FSDP2 ---------------------------------------------------------------------------------------


def _model() -> "torch.nn.Module":
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def _batches(ws: int, steps: int) -> list[tuple["torch.Tensor", "torch.Tensor"]]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(ws * 4, 8, generator=g), torch.randn(ws * 4, 4, generator=g)) for _ in range(steps)]


def _reference_params(ws: int, steps: int) -> list["torch.Tensor"]:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in _batches(ws, steps):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def _ddp(rank: int, ws: int, kinds: list[str]) -> str:
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = _device(kinds[rank], rank)
    dist.init_process_group("hetcomm")
    model = DDP(_model().to(dev), bucket_cap_mb=0.0005)  # several buckets
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in _batches(ws, 3):
        xs, ys = x[rank * 4:(rank + 1) * 4].to(dev), y[rank * 4:(rank + 1) * 4].to(dev)
        torch.nn.functional.mse_loss(model(xs), ys).backward()
        opt.step()
        opt.zero_grad()
    for p, q in zip(model.parameters(), _reference_params(ws, 3)):
        assert p.device == dev
        torch.testing.assert_close(p.detach().cpu(), q, rtol=1e-5, atol=1e-6)
    return "ok"


def _fsdp(rank: int, ws: int, kinds: list[str]) -> str:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dev = _device(kinds[rank], rank)
    dist.init_process_group("hetcomm")
    mesh = init_device_mesh(dev.type, (ws,))
    model = _model().to(dev)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in _batches(ws, 3):
        xs, ys = x[rank * 4:(rank + 1) * 4].to(dev), y[rank * 4:(rank + 1) * 4].to(dev)
        torch.nn.functional.mse_loss(model(xs), ys).backward()
        opt.step()
        opt.zero_grad()
    for p, q in zip(model.parameters(), _reference_params(ws, 3)):
        full = p.full_tensor()
        assert full.device == dev
        torch.testing.assert_close(full.detach().cpu(), q, rtol=1e-5, atol=1e-6)
    return "ok"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", list(CASES))
def test_ddp_on_devices(case: str) -> None:
    _run_case(_ddp, case)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", list(CASES))
def test_fsdp2_on_devices(case: str) -> None:
    _run_case(_fsdp, case)
