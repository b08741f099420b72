"""The hierarchical reduce_scatter and allgather across sites (numpy ranks on
loopback, sites given by label): exact without a codec, within the codec's
bound with one (quantized only on the inter-site leg), error feedback, every
layout of sites, ragged counts, and the bytes that cross between sites."""
from __future__ import annotations

import numpy as np
import pytest

from harness import run_ranks
from test_compressed import QMAX, bound, digest, inputs

# (sites, ranks per site, sites interleaved in rank order)
LAYOUTS = [(2, 2, False), (2, 1, False), (2, 3, True), (3, 2, True)]


def _site(rank: int, size: int, sites: int, interleaved: bool) -> int:
    return rank % sites if interleaved else rank * sites // size


def _blocks(x: np.ndarray, size: int) -> list[np.ndarray]:
    return np.split(x, size)


def _exact_ops(comm, rank: int, size: int, sites: int, count: int) -> str:
    """Uncompressed: integer-valued data sums exactly in fp32, so the result
    must equal numpy's bit for bit whatever the order."""
    xs = [np.round(x * 8) for x in inputs(size, count * size, "normal")]
    total = np.sum(xs, axis=0)
    wan = comm.bytes_sent_intersite
    out = comm.reduce_scatter(xs[rank])
    wan = comm.bytes_sent_intersite - wan
    np.testing.assert_array_equal(out, _blocks(total, size)[rank])
    # Only the column's exchange crosses sites: S-1 blocks sent by each rank.
    assert wan == (sites - 1) * count * 4, (wan, count)
    avg = comm.reduce_scatter(xs[rank], "avg")
    np.testing.assert_array_equal(avg, (_blocks(total, size)[rank] / size).astype(np.float32))
    # In place (recvbuf inside sendbuf), as torch's reduce_scatter_tensor may pass it.
    buf = xs[rank].copy()
    comm.reduce_scatter(buf, out=buf[rank * count:(rank + 1) * count])
    np.testing.assert_array_equal(buf[rank * count:(rank + 1) * count], _blocks(total, size)[rank])

    mine = xs[rank][:count].copy()
    wan = comm.bytes_sent_intersite
    g = comm.allgather(mine)
    wan = comm.bytes_sent_intersite - wan
    np.testing.assert_array_equal(g, np.stack([x[:count] for x in xs]))
    assert wan == (sites - 1) * count * 4, (wan, count)
    return digest(g)


def _codec_ops(comm, rank: int, size: int, sites: int, count: int, codec: str, steps: int) -> None:
    """With a codec: each element is quantized S-1 times (the column ring's
    sends and hops; the in-site leg is fp32), on partial sums of the rank's
    block only."""
    xs = inputs(size, count * size, "normal")
    exact = _blocks(np.sum([x.astype(np.float64) for x in xs], axis=0), size)[rank]
    b = bound(codec, [_blocks(x, size)[rank] for x in xs], sites - 1)
    out = comm.reduce_scatter(xs[rank], codec=codec)
    err = np.abs(out - exact)
    assert np.all(err <= b), f"{codec}: err {err.max()} > bound {b[0]}"
    # Error feedback: the value quantized carries the last residual, whose
    # size is at most half a step: the scale grows by 1/(2 qmax) at most, one
    # call's error is the difference of two residuals, and the running sum's
    # error is what the residuals hold at the end, however many calls.
    grow = 1 + 1 / (2 * QMAX[codec])
    running = np.zeros(count)
    for _ in range(steps):
        out = comm.reduce_scatter(xs[rank], codec=codec, residual_key=11)
        assert np.all(np.abs(out - exact) <= 2 * b * grow)
        running += out - exact
    assert np.all(np.abs(running) <= b * grow), f"{codec} with error feedback: drift {np.abs(running).max()}"


def _half_codec(comm, rank: int, size: int, sites: int, count: int) -> None:
    """float16 with int8: summed in float16 inside the site (one rounding per
    addition, m-1 of them), quantized S-1 times in fp32 across sites, rounded
    to float16 once at the end."""
    xs = [x.astype(np.float16) for x in inputs(size, count * size, "normal")]
    mine = [_blocks(x.astype(np.float64), size)[rank] for x in xs]
    exact = np.sum(mine, axis=0)
    q = bound("int8", [x.astype(np.float32) for x in mine], sites - 1)
    u = 2.0**-11
    per_site = size // sites
    limit = q + (per_site - 1) * u * np.sum(np.abs(mine), axis=0) + u * (np.abs(exact) + q)
    out = comm.reduce_scatter(xs[rank], codec="int8")
    assert out.dtype == np.float16
    err = np.abs(out.astype(np.float64) - exact)
    assert np.all(err <= limit * 1.001), f"float16 int8: err {err.max()}"
    # The hierarchical allreduce stages float16 through fp32 for the codec
    # (sums in fp32, S quantizations: S-1 hops and the owner's final one).
    buf = xs[rank][:count].copy()
    comm.allreduce(buf, codec="int8")
    part = [x[:count].astype(np.float64) for x in xs]
    exact = np.sum(part, axis=0)
    q = bound("int8", [x.astype(np.float32) for x in part], sites)
    err = np.abs(buf.astype(np.float64) - exact)
    assert np.all(err <= (q + u * (np.abs(exact) + q)) * 1.001), f"float16 allreduce int8: err {err.max()}"


def _hier(rank: int, size: int, sites: int, interleaved: bool, counts: list[int]) -> list[str]:
    import hetcomm

    opts = hetcomm.Options(site=f"dc{_site(rank, size, sites, interleaved)}", codec_min_bytes=0)
    digests = []
    with hetcomm.Communicator(rank, size, timeout=60, options=opts) as comm:
        assert comm.site_count == sites
        for count in counts:
            digests.append(_exact_ops(comm, rank, size, sites, count))
            for codec in ("int8", "int4"):
                _codec_ops(comm, rank, size, sites, count, codec, 6)
        _half_codec(comm, rank, size, sites, counts[0])
    return digests


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sites,per_site,interleaved", LAYOUTS, ids=[f"{s}x{m}" for s, m, _ in LAYOUTS])
def test_hierarchical_reduce_scatter_and_allgather(sites, per_site, interleaved):
    # Ragged counts: not a multiple of the codec block, the pieces, or the ranks.
    results = run_ranks(_hier, sites * per_site, sites, interleaved, [20_011, 70_001], timeout=200)
    assert len({tuple(r) for r in results}) == 1, "allgather results differ across ranks"


def _flat_named(rank: int, size: int) -> None:
    import hetcomm

    opts = hetcomm.Options(site=f"dc{rank // 2}", algo="ring", codec_min_bytes=0)
    with hetcomm.Communicator(rank, size, timeout=60, options=opts) as comm:
        _codec_ops(comm, rank, size, size, 20_011, "int8", 0)  # the flat ring quantizes n-1 times
        # Ring 0 1 | 2 3: ranks 1 and 3 send every block but their own across sites.
        x = np.ones(20_011 * size, np.float32)
        wan = comm.bytes_sent_intersite
        comm.reduce_scatter(x)
        assert comm.bytes_sent_intersite - wan == (3 * 20_011 * 4 if rank % 2 else 0)


@pytest.mark.timeout(120)
def test_a_named_algorithm_keeps_the_flat_ring():
    run_ranks(_flat_named, 4, timeout=100)


def _uneven(rank: int, size: int) -> None:
    import hetcomm

    opts = hetcomm.Options(site="dc0" if rank < 2 else "dc1", codec_min_bytes=0)
    with hetcomm.Communicator(rank, size, timeout=60, options=opts) as comm:
        _codec_ops(comm, rank, size, size, 20_011, "int8", 0)
        xs = [np.round(x * 8) for x in inputs(size, 20_011 * size, "normal")]
        np.testing.assert_array_equal(comm.reduce_scatter(xs[rank]), _blocks(np.sum(xs, axis=0), size)[rank])
        np.testing.assert_array_equal(comm.allgather(xs[rank][:999]), np.stack([x[:999] for x in xs]))


@pytest.mark.timeout(120)
def test_unequal_sites_use_the_flat_ring():
    run_ranks(_uneven, 3, timeout=100)
