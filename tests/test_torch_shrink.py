"""torch.distributed.shrink_group on hetcomm groups, after a rank is SIGKILLed.

Real processes on loopback; one rank kills itself with SIGKILL in the middle
of a run of collectives. The survivors must see a DistBackendError naming the
lost rank, its host and its site, agree on the failed set, shrink (default
group or subgroup, SHRINK_DEFAULT or SHRINK_ABORT) without a new rendezvous,
and then get exact, bit-identical results on the shrunk group, codecs included.
"""
from __future__ import annotations

import os
import signal
import socket
from datetime import timedelta

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

from torch_ranks import run_ranks  # noqa: E402

pytestmark = pytest.mark.timeout(240)

WORLD = 4
SITES = {"HETCOMM_SITE_OF_RANK": "dc-a,dc-a,dc-b,dc-b"}


def _init(rank: int) -> None:
    # Two sites, so that the shrunk group still has a WAN leg to keep.
    site = os.environ["HETCOMM_SITE_OF_RANK"].split(",")[rank]
    os.environ["HETCOMM_SITE"] = site
    dist.init_process_group("hetcomm", timeout=timedelta(seconds=60))


def _die_after_others_pass(rank: int, victim: int, point: str) -> None:
    """The victim SIGKILLs itself once every other rank has passed ``point``.

    A rank that has finished a collective may still have bytes in flight to
    the others, so "after my last op" is not "after everyone's"; the store says so.
    """
    store = dist.distributed_c10d._get_default_store()
    if rank != victim:
        store.set(f"{point}/{rank}", "1")
        return
    store.wait([f"{point}/{r}" for r in range(dist.get_world_size()) if r != victim], timedelta(seconds=60))
    os.kill(os.getpid(), signal.SIGKILL)


def _values(rank: int, n: int) -> "torch.Tensor":
    # Not exactly representable sums: order of summation would show.
    g = torch.Generator().manual_seed(1234 + rank)
    return torch.randn(n, generator=g, dtype=torch.float32)


def _same_bytes(t: "torch.Tensor", group: object) -> None:
    raw = t.contiguous().view(-1).view(torch.uint8)
    out = [torch.empty_like(raw) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, raw, group=group)
    for r, o in enumerate(out):
        assert torch.equal(o, raw), f"group rank {r} holds different bytes"


def _expect_loss(op: object, victim: int, site: str) -> str:
    """Runs ``op`` until it raises; checks that the error names the lost (group) rank, its host and site."""
    with pytest.raises(dist.DistBackendError) as info:
        for _ in range(1000):
            op()
    text = str(info.value)
    assert f"rank {victim}" in text, text
    assert site in text, text
    assert socket.gethostname() in text, text
    return text


# ---- default group ------------------------------------------------------------------------


def _default_group(rank: int, ws: int, flags: int, codec: str) -> dict:
    import hetcomm.torch as ht

    _init(rank)
    victim = 2
    n = 1 << 16
    t = torch.ones(n)
    for _ in range(3):
        dist.all_reduce(t)
    _die_after_others_pass(rank, victim, "warm")
    # The victim dies between collectives of a busy loop; every survivor raises.
    _expect_loss(lambda: dist.all_reduce(torch.ones(n)), victim, "dc-b")
    lost = ht.failed_ranks()
    assert lost == [victim]
    pg = dist.shrink_group(lost, shrink_flags=flags)
    assert pg is dist.group.WORLD and dist.get_world_size() == ws - 1
    survivors = [r for r in range(ws) if r != victim]
    assert dist.get_rank() == survivors.index(rank)
    # Exact results against a float64 reference summed in any order.
    x = _values(rank, n)
    ref = sum(_values(r, n).double() for r in survivors)
    dist.all_reduce(x)
    assert torch.allclose(x.double(), ref, rtol=0, atol=1e-5)
    _same_bytes(x, None)
    ints = torch.arange(1000, dtype=torch.int64) * (rank + 1)
    dist.all_reduce(ints)
    assert torch.equal(ints, torch.arange(1000, dtype=torch.int64) * sum(r + 1 for r in survivors))
    gathered = [torch.empty(3, dtype=torch.int32) for _ in survivors]
    dist.all_gather(gathered, torch.full((3,), rank, dtype=torch.int32))
    assert [int(g[0]) for g in gathered] == survivors
    # DDP on the shrunk group (torch would register it as a gloo backend, which DDP trips over).
    torch.manual_seed(0)
    ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
    ddp(torch.full((3, 4), float(rank))).sum().backward()
    _same_bytes(ddp.module.weight.grad, None)
    b = torch.full((5,), float(rank)) if dist.get_rank() == 1 else torch.zeros(5)
    dist.broadcast(b, src=1)
    assert torch.equal(b, torch.full((5,), float(survivors[1])))
    if codec != "none":
        # A lossy codec on the shrunk group: still bit-identical everywhere and
        # within the codec's bound (see test_compressed.bound: each of at most
        # one quantization per rank errs by half a step of the summed absmax).
        from hetcomm.comm import codec_code

        backend = pg._get_backend(torch.device("cpu"))
        y = _values(rank, n)
        backend.allreduce_compressed(y, codec_code(codec), 0, 0, 0).wait()
        _same_bytes(y, None)
        total_absmax = sum(_values(r, n).abs().max().item() for r in survivors)
        assert (y.double() - ref).abs().max().item() <= len(survivors) * total_absmax / (2 * 127) * 1.001
    return {"lost": lost, "size": dist.get_world_size()}


@pytest.mark.parametrize("flags,codec", [(0, "none"), (1, "int8")], ids=["default", "abort+int8"])
def test_shrink_default_group_after_sigkill(flags: int, codec: str) -> None:
    out = run_ranks(_default_group, WORLD, flags, codec, env=SITES, lost=[2])
    assert [o and o["size"] for o in out] == [3, 3, None, 3]


# ---- a subgroup, and an op in flight at the time of shrink -------------------------------


def _subgroup(rank: int, ws: int) -> dict:
    import hetcomm.torch as ht

    _init(rank)
    sub = dist.new_group([1, 2, 3], backend="hetcomm")
    victim = 3  # group rank 2 of `sub`
    if rank in (1, 2, 3):
        dist.all_reduce(torch.ones(4), group=sub)
    dist.barrier()
    _die_after_others_pass(rank, victim, "barrier")
    result: dict = {}
    if rank in (1, 2):
        # An op in flight on the subgroup when the peer dies: it must fail, not hang.
        work = dist.all_reduce(torch.ones(1 << 20), group=sub, async_op=True)
        # Errors name the group's own rank numbers, as failed_ranks does.
        _expect_loss(lambda: dist.all_reduce(torch.ones(8), group=sub), 2, "dc-b")
        with pytest.raises(dist.DistBackendError):
            work.wait()
        assert ht.failed_ranks(sub) == [2]
        small = dist.shrink_group([2], group=sub, shrink_flags=dist.distributed_c10d.SHRINK_ABORT)
        assert small.size() == 2 and small.rank() == rank - 1
        x = torch.full((100,), float(rank))
        dist.all_reduce(x, group=small)
        assert torch.equal(x, torch.full((100,), 3.0))
        result["sub"] = small.size()
    # The default group lost rank 3 as well: every survivor shrinks it.
    _expect_loss(lambda: dist.all_reduce(torch.ones(8)), victim, "dc-b")
    assert ht.shrink_lost() is dist.group.WORLD
    x = torch.full((10,), float(rank))
    dist.all_reduce(x)
    assert torch.equal(x, torch.full((10,), 3.0))
    result["world"] = dist.get_world_size()
    return result


def test_shrink_subgroup_then_default_group() -> None:
    out = run_ranks(_subgroup, WORLD, env=SITES, lost=[3])
    assert out[:3] == [{"world": 3}, {"sub": 2, "world": 3}, {"sub": 2, "world": 3}]


# ---- a shrunk group with the in-site phases on another library (HETCOMM_INTRA) ----------------------


def _shrink_intra(rank: int, ws: int, intra: str) -> dict:
    """Three sites of one rank; the third site is lost: the two left are again sites of equal size."""
    import hetcomm.torch as ht
    from hetcomm.torch import ProcessGroupOptions

    os.environ["HETCOMM_SITE"] = ("dc-a", "dc-b", "dc-c")[rank]
    dist.init_process_group("hetcomm", timeout=timedelta(seconds=60),
                            pg_options=ProcessGroupOptions(intra=intra, small_bytes=256))
    victim = 2
    dist.all_reduce(torch.ones(4))
    _die_after_others_pass(rank, victim, "warm")
    _expect_loss(lambda: dist.all_reduce(torch.ones(1 << 12)), victim, "dc-c")
    assert ht.shrink_lost() is dist.group.WORLD and dist.get_world_size() == 2
    out: dict = {"split": dist.group.WORLD._get_backend(torch.device("cpu")).has_site_split}
    survivors = [0, 1]
    for n in (1000, 65_537):
        x = _values(rank, n)
        dist.all_reduce(x)
        ref = sum(_values(r, n).double() for r in survivors)
        assert torch.allclose(x.double(), ref, rtol=0, atol=1e-5)
        _same_bytes(x, None)
        out[f"allreduce {n}"] = x.view(torch.uint8).numpy().tobytes()
    b = torch.full((5,), float(rank))
    dist.broadcast(b, src=1)
    assert torch.equal(b, torch.full((5,), 1.0))
    return out


def test_shrunk_group_reattaches_intra_site_groups() -> None:
    runs = {intra: run_ranks(_shrink_intra, 3, intra, lost=[2]) for intra in ("hetcomm", "gloo")}
    assert [r and r["split"] for r in runs["hetcomm"]] == [False, False, None]
    assert [r and r["split"] for r in runs["gloo"]] == [True, True, None]
    for rank in (0, 1):
        for key in set(runs["gloo"][rank]) - {"split"}:
            assert runs["gloo"][rank][key] == runs["hetcomm"][rank][key], f"{key}: rank {rank} differs"


# ---- what is refused ------------------------------------------------------------------------------


def _refusals(rank: int, ws: int) -> None:
    _init(rank)
    backend = dist.group.WORLD._get_backend(torch.device("cpu"))
    assert backend.supports_shrinking
    assert backend.failed_ranks(0.0) == []
    with pytest.raises(RuntimeError, match="cannot exclude itself|exclusion list"):
        dist.shrink_group([rank])
    with pytest.raises(ValueError, match="out of bounds"):
        dist.shrink_group([ws])
    import hetcomm.torch as ht

    with pytest.raises(ValueError, match="no rank of the group is lost"):
        ht.shrink_lost()


def test_shrink_refusals() -> None:
    run_ranks(_refusals, 2, env={"HETCOMM_SITE_OF_RANK": "a,b"})
