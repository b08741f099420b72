"""hetcomm.diloco.DiLoCo across real processes and sites (loopback)."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch_ranks import run_ranks  # noqa: E402

STEPS = 4


def _init(rank: int, ws: int, sites: int) -> None:
    import torch.distributed as dist

    import hetcomm  # noqa: F401
    from hetcomm.torch.options import ProcessGroupOptions

    dist.init_process_group("hetcomm", pg_options=ProcessGroupOptions(site=f"dc{rank * sites // ws}"))


def _net() -> "torch.nn.Module":
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))


def _equals_ddp(rank: int, ws: int) -> list[float]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from hetcomm.diloco import DiLoCo

    _init(rank, ws, 2)
    sites = [dist.new_group([0, 1], backend="gloo"), dist.new_group([2, 3], backend="gloo")]
    reference, local = _net(), _net()
    ddp = DDP(reference)  # over all ranks, the hetcomm default group
    inner = DDP(local, process_group=sites[rank // 2])  # inside the site only
    ref_opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    opt = torch.optim.SGD(inner.parameters(), lr=0.1)
    diloco = DiLoCo(local, opt, inner_steps=1, outer_lr=1.0, outer_momentum=0.0, codec="none")
    data = torch.Generator().manual_seed(rank)
    for _ in range(STEPS):
        x, y = torch.randn(8, 12, generator=data), torch.randint(0, 3, (8,), generator=data)
        for net, o in ((ddp, ref_opt), (inner, opt)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
        ref_opt.step()
        diloco.step()
    return [float((a - b).abs().max()) for a, b in zip(reference.parameters(), local.parameters())]


@pytest.mark.timeout(240)
def test_h1_sgd_outer_lr1_equals_ddp():
    # H=1, outer SGD lr 1 without momentum: the average of the sites' one-step
    # moves is DDP's step (up to fp32 rounding of theta - (theta - lr g)).
    for diffs in run_ranks(_equals_ddp, 4, timeout=200):
        assert max(diffs) < 1e-6, diffs


def _fixed_delta(rank: int, ws: int, codec: str, error_feedback: bool, rounds: int) -> tuple[bytes, float, float]:
    from hetcomm.diloco import DiLoCo

    _init(rank, ws, ws)
    model = torch.nn.Linear(256, 64)
    diloco = DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.0), inner_steps=1, outer_lr=1.0,
                    outer_momentum=0.0, codec=codec, error_feedback=error_feedback)
    frag = diloco.fragments[0]
    start = frag.outer.clone()
    # Every round each rank moves by the same fixed pseudo-gradient d_rank; the
    # exact outer move is the average of the d's, every round.
    ds = [torch.randn(start.numel(), generator=torch.Generator().manual_seed(10 + r)) for r in range(ws)]
    exact_avg = torch.stack(ds).sum(0) / ws
    for _ in range(rounds):
        from hetcomm.diloco import _assign

        _assign(frag.params, frag.outer - ds[rank])
        diloco.step()
    err = float((frag.outer - (start - rounds * exact_avg)).abs().max())
    # One int8 quantization of a fragment whose blocks reach max|d|: half a step of 1/127.
    one_step = float(torch.stack(ds).abs().max()) / 127
    return frag.outer.numpy().tobytes(), err, one_step


@pytest.mark.timeout(240)
def test_outer_step_uses_the_codec_with_error_feedback():
    rounds = 16
    with_ef = run_ranks(_fixed_delta, 2, "int8", True, rounds, timeout=200)
    without = run_ranks(_fixed_delta, 2, "int8", False, rounds, timeout=200)
    for runs in (with_ef, without):
        assert runs[0][0] == runs[1][0]  # bit-identical outer parameters on every rank
    err_ef, one_step = with_ef[0][1], with_ef[0][2]
    assert 0 < err_ef <= 2 * one_step  # compressed, and the error does not pile up over the rounds
    assert without[0][1] > 4 * err_ef  # without feedback the same rounding error repeats every round


def _streaming(rank: int, ws: int) -> tuple[bytes, list[float], int]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from hetcomm.diloco import DiLoCo

    _init(rank, ws, 2)
    sites = [dist.new_group([0, 1], backend="gloo"), dist.new_group([2, 3], backend="gloo")]
    torch.manual_seed(rank)  # different initial weights: DiLoCo must start every site from rank 0's
    # Fragments of the same number of tensors (a regression: fragments were told apart by value).
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
                                torch.nn.Linear(32, 3))
    net = DDP(model, process_group=sites[rank // 2])
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    diloco = DiLoCo(model, opt, inner_steps=4, codec="int4", fragments=2, overlap_steps=1)
    assert [len(f.params) for f in diloco.fragments] == [3, 3]
    data = torch.Generator().manual_seed(rank)
    w = torch.randn(12, 3, generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(40):
        x = torch.randn(16, 12, generator=data)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), (x @ w).argmax(1))
        loss.backward()
        diloco.step()
        losses.append(loss.item())
    diloco.finish()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return flat.numpy().tobytes(), losses, diloco.outer_steps


@pytest.mark.timeout(240)
def test_streaming_fragments_overlapped_train_and_end_identical():
    results = run_ranks(_streaming, 4, timeout=200)
    assert len({r[0] for r in results}) == 1  # bit-identical parameters on every rank after finish()
    for _, losses, outer_steps in results:
        assert outer_steps == 40 // 4 + 1
        assert sum(losses[-5:]) < 0.7 * sum(losses[:5])


def _drop_and_rejoin(rank: int, ws: int) -> tuple[bytes, float]:
    import torch.distributed as dist

    from hetcomm.diloco import DiLoCo, _assign

    _init(rank, ws, ws)
    alone = dist.new_group([0])  # what a shrink would leave if site 1 dropped out
    model = torch.nn.Linear(8, 4)
    diloco = DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.0), inner_steps=1, outer_lr=1.0,
                    outer_momentum=0.0, codec="none")
    frag = diloco.fragments[0]
    gap = 0.0
    if rank == 0:
        diloco.on_membership_change(alone, source_rank=None)  # site 1 is gone for this outer step
        before = frag.outer.clone()
        d = torch.full_like(before, 0.25)
        _assign(frag.params, before - d)
        diloco.step()
        gap = float((frag.outer - (before - d)).abs().max())  # only rank 0's pseudo-gradient counted
    else:
        _assign(frag.params, frag.outer + 5.0)  # stale state from before the drop
    diloco.on_membership_change(None, source_rank=0)  # site 1 rejoins with the current outer parameters
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return flat.numpy().tobytes() + frag.outer.numpy().tobytes(), gap


@pytest.mark.timeout(240)
def test_membership_change_leaves_out_and_rejoins():
    results = run_ranks(_drop_and_rejoin, 2, timeout=200)
    assert results[0][0] == results[1][0]
    assert results[0][1] == 0.0


def _site_down_and_back(rank: int, ws: int, port: int) -> dict:
    """Sites a (rank 0) and b (rank 1) train with DiLoCo; b is SIGKILLed during
    inner steps; a finishes that outer step alone; b restarts (rank 2 here)
    and rejoins with the current outer state; both end bit-identical."""
    import os
    import signal
    from datetime import timedelta

    import torch.distributed as dist

    import hetcomm.torch as ht
    from hetcomm.diloco import DiLoCo, _flat

    H, lost_at, back_at, end = 4, 6, 12, 16
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    os.environ["HETCOMM_SITE"] = "dc-a" if rank == 0 else "dc-b"
    torch.manual_seed(rank)  # different weights everywhere: each start takes the outer state
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    kw = dict(inner_steps=H, codec="int8", outer_lr=1.0, outer_momentum=0.0, elastic=True)
    out: dict = {}
    if rank < 2:
        dist.init_process_group("hetcomm", store=dist.PrefixStore("job", store), rank=rank, world_size=2,
                                timeout=timedelta(seconds=60))
        diloco = DiLoCo(model, opt, **kw)
    else:
        store.wait(["site-b-down"], timedelta(seconds=60))  # restarted after the loss was seen
        ht.join_group(store, timeout=60)
        diloco = DiLoCo(model, opt, **kw)
        frag = diloco.fragments[0]
        out["joined_at"] = diloco.step_count
        out["joined_outer"] = frag.outer.numpy().tobytes()
        out["params_are_outer"] = torch.equal(_flat(frag.params), frag.outer)
    local_after_inner: list[torch.Tensor] = []
    opt.register_step_post_hook(lambda *_: local_after_inner.append(_flat(model.parameters())))
    data = torch.Generator().manual_seed(100 + rank)
    w = torch.randn(12, 3, generator=torch.Generator().manual_seed(0))
    while diloco.step_count < end:
        if rank == 1 and diloco.step_count == lost_at:
            os.kill(os.getpid(), signal.SIGKILL)  # site b loses power in the middle of an outer period
        x = torch.randn(16, 12, generator=data)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), (x @ w).argmax(1)).backward()
        outer_before = diloco.fragments[0].outer.clone()
        diloco.step()
        if rank == 0 and diloco.step_count == 2 * H:  # the outer step site b dropped out of
            # outer - (outer - local) with outer lr 1: rank 0's pseudo-gradient alone, bit for bit.
            expected = outer_before.sub(outer_before - local_after_inner[-1])
            out["alone_exact"] = torch.equal(diloco.fragments[0].outer, expected)
            out["size_after_loss"] = dist.get_world_size(diloco.group)
            store.set("site-b-down", "1")
        if rank == 0 and diloco.step_count == back_at:
            assert diloco.grow_if_pending(store, wait_for=1, timeout=60)
            out["outer_at_join"] = diloco.fragments[0].outer.numpy().tobytes()
    diloco.finish()
    out["size"] = dist.get_world_size(diloco.group)
    out["final"] = (_flat(model.parameters()).numpy().tobytes(), diloco.outer_steps)
    return out


@pytest.mark.timeout(240)
def test_site_lost_in_inner_steps_is_left_out_and_rejoins_with_current_outer_state():
    from datetime import timedelta

    import torch.distributed as dist

    from torch_ranks import free_port

    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                           timeout=timedelta(seconds=60))
    a, _, b = run_ranks(_site_down_and_back, 3, port, lost=[1], timeout=200)
    del server
    assert a["size_after_loss"] == 1 and a["alone_exact"]
    assert b["joined_at"] == 12 and b["params_are_outer"]
    assert b["joined_outer"] == a["outer_at_join"]  # the current outer parameters, not a stale copy
    assert a["size"] == b["size"] == 2
    assert a["final"] == b["final"]  # trained on together: bit-identical parameters and outer step count
