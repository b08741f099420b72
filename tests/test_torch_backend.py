"""The "hetcomm" torch.distributed backend on real processes over loopback.

Values are checked against references computed locally (fp32/fp64 sums,
exact integer results) and, where it matters, for bit-identity across ranks.
Each test spawns fresh ranks, so each costs a few seconds of imports.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from datetime import timedelta

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

from torch_ranks import run_ranks, temp_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _value(rank: int, n: int, dtype: "torch.dtype") -> "torch.Tensor":
    """Rank-dependent test data; small integers so that every op is exact."""
    base = torch.arange(n, dtype=torch.int64) % 3 + 1 + rank
    if dtype == torch.bool:
        return (base + rank) % 2 == 0
    return base.to(dtype)


def _reference(op: "dist.ReduceOp", tensors: list["torch.Tensor"]) -> "torch.Tensor":
    stack = torch.stack([t.double() if t.is_floating_point() else t.long() for t in tensors])
    if op == dist.ReduceOp.SUM:
        out = stack.sum(0)
    elif op == dist.ReduceOp.AVG:
        out = stack.mean(0)
    elif op == dist.ReduceOp.PRODUCT:
        out = stack.prod(0)
    elif op == dist.ReduceOp.MIN:
        out = stack.min(0).values
    elif op == dist.ReduceOp.MAX:
        out = stack.max(0).values
    else:
        out = stack[0]
        for t in stack[1:]:
            out = {dist.ReduceOp.BAND: out & t, dist.ReduceOp.BOR: out | t, dist.ReduceOp.BXOR: out ^ t}[op]
    return out.to(tensors[0].dtype)


def _same_on_all_ranks(t: "torch.Tensor", ws: int) -> None:
    """Bit-identity across ranks, checked over the bytes."""
    raw = t.contiguous().view(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    gathered = [torch.empty_like(raw) for _ in range(ws)]
    dist.all_gather(gathered, raw)
    for r, g in enumerate(gathered):
        assert torch.equal(g, raw), f"rank {r} ended with different bytes"


# ---- collectives --------------------------------------------------------------------


def _collectives(rank: int, ws: int) -> str:
    import torch
    import torch.distributed as dist

    dist.init_process_group("hetcomm", timeout=timedelta(seconds=60))  # env://
    assert dist.get_backend() == "hetcomm"
    assert dist.get_rank() == rank and dist.get_world_size() == ws
    ops = [dist.ReduceOp.SUM, dist.ReduceOp.PRODUCT, dist.ReduceOp.MIN, dist.ReduceOp.MAX]
    int_ops = ops + [dist.ReduceOp.BAND, dist.ReduceOp.BOR, dist.ReduceOp.BXOR]

    # allreduce: every dtype and op the core reduces, sync and async.
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int16,
                  torch.int32, torch.int64, torch.uint8):
        for op in (int_ops if not dtype.is_floating_point else ops + [dist.ReduceOp.AVG]):
            t = _value(rank, 37, dtype)
            expect = _reference(op, [_value(r, 37, dtype) for r in range(ws)])
            work = dist.all_reduce(t, op=op, async_op=True)
            work.wait()
            assert work.is_completed()
            tol = {"rtol": 1e-2, "atol": 1e-2} if dtype in (torch.float16, torch.bfloat16) else {}
            torch.testing.assert_close(t, expect, **tol, msg=lambda m: f"{dtype} {op}: {m}")
            _same_on_all_ranks(t, ws)
    for op in (dist.ReduceOp.MIN, dist.ReduceOp.MAX, dist.ReduceOp.BAND, dist.ReduceOp.BOR):
        t = _value(rank, 9, torch.bool)
        dist.all_reduce(t, op=op)
        assert torch.equal(t, _reference(op, [_value(r, 9, torch.bool) for r in range(ws)])), op

    # Large fp32 sum (ring path, pipelined): close to the fp64 reference, identical bytes everywhere.
    g = torch.Generator().manual_seed(1234 + rank)
    big = torch.randn(300_000, generator=g)
    ref = sum(torch.randn(300_000, generator=torch.Generator().manual_seed(1234 + r)).double() for r in range(ws))
    dist.all_reduce(big)
    torch.testing.assert_close(big.double(), ref, rtol=1e-5, atol=1e-5)
    _same_on_all_ranks(big, ws)

    # Futures: value, then(), and completion seen from another thread's view.
    t = torch.ones(5) * (rank + 1)
    fut = dist.all_reduce(t, async_op=True).get_future()
    doubled = fut.then(lambda f: f.value()[0] * 2).wait()
    assert torch.equal(doubled, torch.full((5,), 2.0 * sum(range(1, ws + 1))))

    # Non-contiguous, complex, empty and 0-dim tensors.
    nc = (torch.arange(12.0).reshape(3, 4) + rank).t()
    dist.all_reduce(nc)
    assert torch.equal(nc, sum(torch.arange(12.0).reshape(3, 4) + r for r in range(ws)).t())
    c = torch.tensor([1 + 2j, 3 - 1j]) * (rank + 1)
    dist.all_reduce(c)
    assert torch.equal(c, torch.tensor([1 + 2j, 3 - 1j]) * sum(range(1, ws + 1)))
    e = torch.empty(0)
    dist.all_reduce(e)
    s = torch.tensor(float(rank))
    dist.all_reduce(s, op=dist.ReduceOp.MAX)
    assert s.item() == ws - 1

    # PREMUL_SUM is refused with a clear error.
    try:
        dist.all_reduce(torch.ones(2), op=dist._make_nccl_premul_sum(2.0))
    except RuntimeError as exc:
        assert "PREMUL_SUM" in str(exc)
    else:
        raise AssertionError("PREMUL_SUM did not raise")

    # broadcast from every root; reduce to every root.
    for root in range(ws):
        t = torch.full((6,), float(rank)) + torch.arange(6.0)
        dist.broadcast(t, src=root)
        assert torch.equal(t, torch.full((6,), float(root)) + torch.arange(6.0))
        t = _value(rank, 11, torch.int32)
        dist.reduce(t, dst=root, op=dist.ReduceOp.SUM)
        if rank == root:
            assert torch.equal(t, _reference(dist.ReduceOp.SUM, [_value(r, 11, torch.int32) for r in range(ws)]))
        else:
            assert torch.equal(t, _value(rank, 11, torch.int32)), "reduce changed a non-root input"

    # all_gather (list and into one tensor), async.
    outs = [torch.empty(3, 2) for _ in range(ws)]
    dist.all_gather(outs, torch.full((3, 2), float(rank)), async_op=True).wait()
    assert all(torch.equal(o, torch.full((3, 2), float(r))) for r, o in enumerate(outs))
    out = torch.empty(ws * 4, dtype=torch.int64)
    dist.all_gather_into_tensor(out, torch.arange(4) + 10 * rank)
    assert torch.equal(out, torch.cat([torch.arange(4) + 10 * r for r in range(ws)]))
    inplace = torch.zeros(ws * 2)
    inplace[rank * 2:(rank + 1) * 2] = rank + 1
    dist.all_gather_into_tensor(inplace, inplace[rank * 2:(rank + 1) * 2])
    assert torch.equal(inplace, torch.arange(1, ws + 1).float().repeat_interleave(2))

    # reduce_scatter (list and tensor).
    inputs = [torch.full((4,), float(rank * 10 + r)) for r in range(ws)]
    out = torch.empty(4)
    dist.reduce_scatter(out, inputs)
    assert torch.equal(out, torch.full((4,), float(sum(q * 10 + rank for q in range(ws)))))
    out = torch.empty(2)
    dist.reduce_scatter_tensor(out, torch.arange(2.0 * ws) * (rank + 1), op=dist.ReduceOp.SUM)
    assert torch.equal(out, torch.arange(2.0 * rank, 2.0 * rank + 2) * sum(range(1, ws + 1)))
    out = torch.empty(2)
    dist.reduce_scatter_tensor(out, torch.arange(2.0 * ws) * (rank + 1), op=dist.ReduceOp.AVG)
    torch.testing.assert_close(out, torch.arange(2.0 * rank, 2.0 * rank + 2) * sum(range(1, ws + 1)) / ws)

    # gather / scatter at every root.
    for root in range(ws):
        gl = [torch.empty(3) for _ in range(ws)] if rank == root else None
        dist.gather(torch.full((3,), float(rank)), gl, dst=root)
        if rank == root:
            assert all(torch.equal(x, torch.full((3,), float(r))) for r, x in enumerate(gl))
        out = torch.empty(2, dtype=torch.int16)
        sl = [torch.full((2,), r * 7, dtype=torch.int16) for r in range(ws)] if rank == root else None
        dist.scatter(out, sl, src=root)
        assert torch.equal(out, torch.full((2,), rank * 7, dtype=torch.int16))

    # all_to_all (uneven list) and all_to_all_single (equal and with splits).
    ins = [torch.full((r + 1,), float(rank * 100 + r)) for r in range(ws)]
    outs = [torch.empty(rank + 1) for _ in range(ws)]
    dist.all_to_all(outs, ins)
    assert all(torch.equal(o, torch.full((rank + 1,), float(q * 100 + rank))) for q, o in enumerate(outs))
    src = torch.arange(ws * 2.0) + 100 * rank
    dst = torch.empty(ws * 2)
    dist.all_to_all_single(dst, src)
    assert torch.equal(dst, torch.cat([torch.arange(2.0 * rank, 2.0 * rank + 2) + 100 * q for q in range(ws)]))
    in_splits = [r + 1 for r in range(ws)]               # rank sends r+1 rows to rank r
    out_splits = [rank + 1] * ws                          # and gets rank+1 rows from each
    src = torch.cat([torch.full((r + 1, 2), float(rank * 10 + r)) for r in range(ws)])
    dst = torch.empty(sum(out_splits), 2)
    dist.all_to_all_single(dst, src, out_splits, in_splits)
    assert torch.equal(dst, torch.cat([torch.full((rank + 1, 2), float(q * 10 + rank)) for q in range(ws)]))

    # Data movement of dtypes the core cannot reduce travels as bytes.
    u = (torch.arange(5) + rank).to(torch.uint16)
    dist.broadcast(u, src=ws - 1)
    assert torch.equal(u.to(torch.int64), torch.arange(5) + ws - 1)

    dist.barrier()
    dist.barrier(async_op=True).wait()
    return "ok"


@pytest.mark.timeout(300)
def test_collectives_world3() -> None:
    assert run_ranks(_collectives, 3) == ["ok"] * 3


# ---- point-to-point, objects, coalescing, subgroups --------------------------------------------


def _p2p_and_groups(rank: int, ws: int) -> str:
    import torch
    import torch.distributed as dist

    dist.init_process_group("hetcomm")
    right, left = (rank + 1) % ws, (rank - 1) % ws

    # send/recv around the ring, tags kept apart.
    for tag in (0, 5):
        got = torch.empty(3)
        if rank % 2 == 0:
            dist.send(torch.full((3,), float(rank + tag)), right, tag=tag)
            dist.recv(got, left, tag=tag)
        else:
            dist.recv(got, left, tag=tag)
            dist.send(torch.full((3,), float(rank + tag)), right, tag=tag)
        assert torch.equal(got, torch.full((3,), float(left + tag)))
    # isend/irecv, receive before the matching send is posted.
    got = torch.empty(4, dtype=torch.int64)
    r = dist.irecv(got, src=left)
    s = dist.isend(torch.arange(4) * rank, dst=right)
    s.wait()
    r.wait()
    assert torch.equal(got, torch.arange(4) * left)
    # Receive from any source reports the sender. (Its own tag: an any-source
    # receive may match any rank's next message with the same tag, and the
    # senders go straight on to the batch below.)
    if rank == 0:
        senders = set()
        for _ in range(ws - 1):
            t = torch.empty(1)
            senders.add(dist.recv(t, tag=3))
            assert t.item() == 10.0
        assert senders == set(range(1, ws))
    else:
        dist.send(torch.tensor([10.0]), 0, tag=3)
    # batch_isend_irecv.
    got = torch.empty(2)
    reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, torch.full((2,), float(rank)), right),
                                   dist.P2POp(dist.irecv, got, left)])
    for req in reqs:
        req.wait()
    assert torch.equal(got, torch.full((2,), float(left)))

    # Object collectives.
    objs = [None] * ws
    dist.all_gather_object(objs, {"rank": rank, "s": "x" * rank})
    assert objs == [{"rank": r, "s": "x" * r} for r in range(ws)]
    lst = [rank, "a"] if rank == 1 else [None, None]
    dist.broadcast_object_list(lst, src=1)
    assert lst == [1, "a"]
    gl = [None] * ws if rank == 0 else None
    dist.gather_object(("g", rank), gl, dst=0)
    if rank == 0:
        assert gl == [("g", r) for r in range(ws)]
    out = [None]
    dist.scatter_object_list(out, [f"s{r}" for r in range(ws)] if rank == 0 else None, src=0)
    assert out == [f"s{rank}"]

    # Coalescing: the manager, and the deprecated all_reduce_coalesced.
    ts = [torch.ones(3) * (rank + 1), torch.ones(5) * (rank + 2)]
    with dist._coalescing_manager(async_ops=True) as cm:
        for t in ts:
            dist.all_reduce(t)
    cm.wait()
    total = sum(range(1, ws + 1))
    assert torch.equal(ts[0], torch.full((3,), float(total))) and torch.equal(ts[1], torch.full((5,), total + ws * 1.0))
    ts = [torch.ones(2) * rank, torch.arange(3.0) * rank]
    dist.all_reduce_coalesced(ts)
    assert torch.equal(ts[0], torch.full((2,), float(sum(range(ws))))) and \
        torch.equal(ts[1], torch.arange(3.0) * sum(range(ws)))

    # Subgroups: a pair, the rest as non-members, and new_subgroups.
    pair = dist.new_group([0, 2], backend="hetcomm")
    t = torch.tensor([float(rank)])
    if rank in (0, 2):
        dist.all_reduce(t, group=pair)
        assert t.item() == 2.0
        dist.broadcast(t, group_src=1, group=pair)   # group rank 1 is global rank 2
        assert dist.get_rank(pair) == (0 if rank == 0 else 1)
    subgroup, _ = dist.new_subgroups(group_size=1)
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=subgroup)
    assert t.item() == rank
    even = dist.new_group([r for r in range(ws) if r % 2 == 0])  # the default backend: hetcomm
    if rank % 2 == 0:
        assert dist.get_backend(even) == "hetcomm"
        objs = [None] * dist.get_world_size(even)
        dist.all_gather_object(objs, rank, group=even)
        assert objs == [r for r in range(ws) if r % 2 == 0]

    # monitored_barrier through torch's own function.
    dist.monitored_barrier(timeout=timedelta(seconds=30))
    dist.monitored_barrier(timeout=timedelta(seconds=30), wait_all_ranks=True)

    # The dispatcher path and the per-device backend.
    t = torch.ones(2)
    backend = dist.group.WORLD._get_backend(torch.device("cpu"))
    assert backend.name() == "hetcomm" and backend.comm_name == "pg0", (backend.name(), backend.comm_name)
    out = torch.ops._c10d_functional.all_reduce(t, "sum", dist.group.WORLD.group_name)
    out = torch.ops._c10d_functional.wait_tensor(out)
    assert torch.equal(out, torch.full((2,), float(ws)))
    return "ok"


@pytest.mark.timeout(300)
def test_p2p_objects_coalescing_subgroups_world3() -> None:
    assert run_ranks(_p2p_and_groups, 3) == ["ok"] * 3


# ---- init methods -------------------------------------------------------------------------------


def _init_methods(rank: int, ws: int, port: int, file_a: str, file_b: str) -> str:
    import torch
    import torch.distributed as dist

    def check() -> None:
        t = torch.tensor([rank + 1.0])
        dist.all_reduce(t)
        assert t.item() == ws * (ws + 1) / 2
        dist.destroy_process_group()

    dist.init_process_group("hetcomm", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ws)
    check()
    dist.init_process_group("hetcomm", init_method=f"file://{file_a}", rank=rank, world_size=ws)
    check()
    store = dist.FileStore(file_b, ws)
    dist.init_process_group("hetcomm", store=store, rank=rank, world_size=ws)
    check()
    dist.init_process_group(backend="hetcomm")  # env:// from RANK/WORLD_SIZE/MASTER_*
    check()
    return "ok"


@pytest.mark.timeout(300)
def test_init_methods() -> None:
    from torch_ranks import free_port

    assert run_ranks(_init_methods, 2, free_port(), temp_file(), temp_file()) == ["ok"] * 2


# ---- timeouts and errors ----------------------------------------------------------------------


def _errors(rank: int, ws: int) -> str:
    import time

    import torch
    import torch.distributed as dist

    dist.init_process_group("hetcomm", timeout=timedelta(seconds=60))
    store = dist.distributed_c10d._get_default_store()

    # A rank that never joins: the waiting rank fails after the group's timeout, naming a rank.
    slow = dist.new_group([0, 1], timeout=timedelta(seconds=2))
    if rank == 0:
        t0 = time.monotonic()
        try:
            dist.all_reduce(torch.ones(4), group=slow)
        except dist.DistBackendError as exc:
            elapsed = time.monotonic() - t0
            assert "rank" in str(exc).lower() and "Timed out" in str(exc), str(exc)
            assert 1.5 < elapsed < 20, elapsed
        else:
            raise AssertionError("no timeout")
        store.set("timeout-done", "1")
    else:
        store.wait(["timeout-done"])

    # Mismatched sizes become an error on both ranks, not corrupted tensors.
    mism = dist.new_group([0, 1], timeout=timedelta(seconds=10))
    try:
        dist.all_reduce(torch.ones(4 if rank == 0 else 8), group=mism)
    except dist.DistBackendError as exc:
        assert "rank" in str(exc).lower(), str(exc)
    else:
        raise AssertionError("no mismatch error")

    # monitored_barrier names the rank that did not come.
    mb = dist.new_group([0, 1])
    if rank == 0:
        try:
            dist.monitored_barrier(mb, timeout=timedelta(seconds=1))
        except RuntimeError as exc:
            assert "Rank 1 failed to pass monitoredBarrier" in str(exc), str(exc)
        else:
            raise AssertionError("monitored_barrier passed without rank 1")
        store.set("mb-done", "1")
    else:
        store.wait(["mb-done"])

    # Work.wait(timeout) on an op that cannot finish raises without ending the op.
    wg = dist.new_group([0, 1], timeout=timedelta(seconds=30))
    if rank == 0:
        work = dist.all_reduce(torch.ones(1), group=wg, async_op=True)
        try:
            work.wait(timeout=timedelta(milliseconds=200))
        except RuntimeError as exc:
            assert "Timed out" in str(exc)
        else:
            raise AssertionError("Work.wait(timeout) did not raise")
        assert not work.is_completed()
        store.set("late", "1")
        work.wait()
    else:
        store.wait(["late"])
        dist.all_reduce(torch.ones(1), group=wg)

    # The world group is still healthy.
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == ws
    return "ok"


@pytest.mark.timeout(300)
def test_timeouts_and_errors() -> None:
    assert run_ranks(_errors, 2) == ["ok"] * 2


# ---- debug mode, FSDP2, DTensor, functional collectives -----------------------------------------


def _debug_detail(rank: int, ws: int) -> str:
    import torch
    import torch.distributed as dist

    dist.init_process_group("hetcomm")
    t = torch.ones(3)
    for _ in range(3):
        dist.all_reduce(t)
    dist.barrier()
    out = [torch.empty(3) for _ in range(ws)]
    dist.all_gather(out, t)
    assert torch.equal(t, torch.full((3,), float(ws ** 3)))
    return "ok"


@pytest.mark.timeout(240)
def test_debug_detail_mode() -> None:
    assert run_ranks(_debug_detail, 2, env={"TORCH_DISTRIBUTED_DEBUG": "DETAIL"}) == ["ok"] * 2


def _fsdp_dtensor(rank: int, ws: int) -> str:
    import torch
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("hetcomm")
    mesh = init_device_mesh("cpu", (ws,))

    # DTensor: shard, then all-gather back; shard on another dim (all-to-all).
    full = torch.arange(24.0).reshape(6, 4)
    dt = distribute_tensor(full, mesh, [Shard(0)])
    assert torch.equal(dt.redistribute(mesh, [Replicate()]).to_local(), full)
    assert torch.equal(dt.redistribute(mesh, [Shard(1)]).full_tensor(), full)

    # Functional collectives (also what torch.compile traces to).
    r = funcol.all_reduce(torch.ones(4) * (rank + 1), "sum", mesh)
    assert torch.equal(r, torch.full((4,), float(sum(range(1, ws + 1)))))
    g = funcol.all_gather_tensor(torch.full((2,), float(rank)), 0, mesh)
    assert torch.equal(g, torch.arange(ws).float().repeat_interleave(2))

    # FSDP2: train a tiny MLP; compare with the same steps on the full batch, locally.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    reference = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    reference.load_state_dict(model.state_dict())
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    data = torch.Generator().manual_seed(7)
    for _ in range(3):
        x = torch.randn(ws * 4, 8, generator=data)
        y = torch.randn(ws * 4, 4, generator=data)
        loss = torch.nn.functional.mse_loss(model(x[rank * 4:(rank + 1) * 4]), y[rank * 4:(rank + 1) * 4])
        loss.backward()
        opt.step()
        opt.zero_grad()
        ref_loss = torch.nn.functional.mse_loss(reference(x), y)
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    return "ok"


@pytest.mark.timeout(300)
def test_fsdp2_dtensor_funcol() -> None:
    assert run_ranks(_fsdp_dtensor, 2) == ["ok"] * 2


# ---- registration ----------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_import_registers_lazily() -> None:
    code = textwrap.dedent("""
        import sys
        import hetcomm
        assert "torch" not in sys.modules, "import hetcomm imported torch"
        import torch.distributed as dist
        assert "hetcomm" in dist.Backend.backend_list
        assert dist.Backend.default_device_backend_map["cpu"] == "gloo"
        caps = dist.Backend.backend_capability["hetcomm"]
        assert "cpu" in caps and "cuda" in caps, caps
        print("ok")
    """)
    reverse = "import torch.distributed as dist\nimport hetcomm\nassert 'hetcomm' in dist.Backend.backend_list\nprint('ok')"
    # Looking torch up without importing it (as tools do) must not spend the hook.
    probe = ("import importlib.util, hetcomm\nassert importlib.util.find_spec('torch')\n"
             "import torch.distributed as dist\nassert 'hetcomm' in dist.Backend.backend_list\nprint('ok')")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for snippet in (code, reverse, probe):
        out = subprocess.run([sys.executable, "-c", snippet], env=env, capture_output=True, text=True, timeout=100)
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.timeout(240)
def test_torchrun_job(tmp_path: "os.PathLike[str]") -> None:
    """A script written for gloo/nccl runs under torchrun with only the backend name changed."""
    from torch_ranks import free_port

    script = os.path.join(str(tmp_path), "train.py")
    with open(script, "w") as f:
        f.write(textwrap.dedent("""
            import os
            import hetcomm
            import torch
            import torch.distributed as dist

            dist.init_process_group("hetcomm")
            rank, ws = dist.get_rank(), dist.get_world_size()
            assert rank == int(os.environ["RANK"]) and ws == int(os.environ["WORLD_SIZE"])
            model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
            model(torch.ones(2, 4) * (rank + 1)).sum().backward()
            grads = [torch.empty_like(model.module.weight.grad) for _ in range(ws)]
            dist.all_gather(grads, model.module.weight.grad)
            assert all(torch.equal(g, grads[0]) for g in grads)
            dist.destroy_process_group()
            print(f"rank {rank} ok")
        """))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-addr", "127.0.0.1", "--master-port", str(free_port()), script],
                         env=env, capture_output=True, text=True, timeout=200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "rank 0 ok" in out.stdout and "rank 1 ok" in out.stdout
