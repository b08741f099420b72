"""Compressed collectives across real ranks: error within the codec's bound,
bit-identical results on every rank, fewer bytes on the wire, error feedback."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from harness import run_ranks

# Largest quantization step relative to the block's absmax, per codec.
QMAX = {"int8": 127, "int4": 7}
UNIT = {"fp16": 2.0**-11, "bf16": 2.0**-8}


def inputs(size: int, count: int, kind: str) -> list[np.ndarray]:
    xs = []
    for r in range(size):
        rng = np.random.default_rng(100 + r)
        x = rng.standard_normal(count).astype(np.float32)
        if kind == "outliers":
            x[::256] *= 1000.0  # one huge value per block
        elif kind == "zeros":
            x[:] = 0.0
        elif kind == "denormals":
            x *= np.float32(1e-39)
        xs.append(x)
    return xs


def bound(codec: str, xs: list[np.ndarray], quantizations: int) -> np.ndarray:
    """Largest error per element the codec allows.

    Every value that crosses a link is quantized once per hop; over a ring
    allreduce each element is quantized `quantizations` times (n-1 hops of
    the reduce-scatter, then the owner's final encoding), each time on a
    partial sum whose magnitude is at most sum_r |x_r|. For blockwise absmax
    codecs the error of one quantization is at most scale/2 = absmax/(2 qmax);
    the block can start anywhere, so the absmax is taken over the whole
    tensor. Casts err by at most one unit roundoff of the value.
    """
    total_absmax = sum(float(np.abs(x).max()) for x in xs)
    if codec in QMAX:
        per = total_absmax / (2 * QMAX[codec])
        return np.full(xs[0].shape, quantizations * per * 1.001 + 1e-30)
    partial = np.sum([np.abs(x.astype(np.float64)) for x in xs], axis=0)
    return quantizations * UNIT[codec] * partial * 1.001 + 1e-30


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(a.tobytes()).hexdigest()


def _codec_allreduce(rank: int, size: int, codec: str, kind: str, count: int, algo: str, sites: int) -> tuple:
    import hetcomm

    site = f"dc{rank * sites // size}" if sites > 1 else ""
    opts = hetcomm.Options(algo=algo, site=site, codec_min_bytes=0)
    with hetcomm.Communicator(rank, size, timeout=60, options=opts) as comm:
        xs = inputs(size, count, kind)
        buf = xs[rank].copy()
        before = comm.bytes_sent
        comm.allreduce(buf, "sum", codec=codec)
        sent = comm.bytes_sent - before
        exact = np.sum([x.astype(np.float64) for x in xs], axis=0)
        err = np.abs(buf.astype(np.float64) - exact)
        n_q = (size // sites if sites > 1 else size)  # quantizing ring: the whole world, or one rank per site
        n_q = sites if sites > 1 else size
        if codec != "1bit":
            b = bound(codec, xs, n_q)
            worst = int(np.argmax(err - b))
            assert np.all(err <= b), f"{codec} {kind}: err {err[worst]} > bound {b[worst]} at {worst}"
        assert np.all(np.isfinite(buf))
        return digest(buf), sent


@pytest.mark.timeout(180)
@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8", "int4", "1bit"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_compressed_allreduce_within_bound_and_identical(codec, world_size):
    count = 300_007
    results = run_ranks(_codec_allreduce, world_size, codec, "normal", count, "ring", 1, timeout=120)
    assert len({d for d, _ in results}) == 1, "ranks ended with different bits"
    # Bytes on the wire shrink by the codec's ratio (a ring sends 2(n-1)/n of the tensor).
    ring_bytes = 2 * (world_size - 1) / world_size * count
    per_elem = {"fp16": 2, "bf16": 2, "int8": 1 + 4 / 256, "int4": 0.5 + 4 / 256, "1bit": 1 / 8 + 4 / 256}[codec]
    sent = results[0][1]
    assert sent <= ring_bytes * per_elem * 1.02 + 4096, (sent, ring_bytes * per_elem)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["outliers", "zeros", "denormals"])
def test_adversarial_inputs(kind):
    results = run_ranks(_codec_allreduce, 3, "int8", kind, 100_003, "ring", 1, timeout=120)
    assert len({d for d, _ in results}) == 1


@pytest.mark.timeout(180)
@pytest.mark.parametrize("codec", ["none", "int8"])
def test_hierarchical_across_two_sites(codec):
    # 2 sites x 2 ranks on loopback: compression on the inter-site leg only.
    results = run_ranks(_codec_allreduce if codec != "none" else _hier_exact, 4, codec, "normal", 200_003,
                        "hier", 2, timeout=120)
    assert len({r[0] for r in results}) == 1


def _hier_pipelined(rank: int, size: int, codec: str, count: int, sites: int) -> tuple:
    import hetcomm

    # The smallest chunk size cuts the buffer into many pipeline chunks (of
    # 1024 floats x ranks) and `count` into a ragged last one.
    opts = hetcomm.Options(algo="hier", site=f"dc{rank * sites // size}", codec_min_bytes=0, chunk_bytes=4096)
    with hetcomm.Communicator(rank, size, timeout=60, options=opts) as comm:
        assert comm.site_count == sites
        xs = inputs(size, count, "normal")
        exact = np.sum([x.astype(np.float64) for x in xs], axis=0)
        b = bound(codec, xs, sites)  # quantized once per hop of the column ring and once by its owner
        buf = xs[rank].copy()
        comm.allreduce(buf, "sum", codec=codec)
        err = np.abs(buf - exact)
        assert np.all(err <= b), f"{codec}: err {err.max()} > bound {b[int(np.argmax(err - b))]}"
        avg = xs[rank].copy()
        comm.allreduce(avg, "avg", codec=codec)
        assert np.all(np.abs(avg - exact / size) <= b / size * 1.001)
        # Error feedback: the same input every step; what quantization drops
        # is carried into the next step, so the running sum stays within one
        # step's bound (its residuals; the carried residual may raise a
        # block's scale by up to half a step) where without feedback it
        # drifts `steps` times as far (measured: 2.5x this bound and more).
        acc = np.zeros(count, np.float64)
        steps = 6
        for _ in range(steps):
            step = xs[rank].copy()
            comm.allreduce(step, "sum", codec=codec, residual_key=11)
            acc += step
        drift = np.abs(acc - steps * exact)
        limit = b * (1 + 1 / QMAX[codec])
        assert np.all(drift <= limit), f"{codec}: running sum off by {drift.max()} after {steps} steps (limit {limit[0]})"
        return digest(buf), digest(avg), digest(acc)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("codec", ["int8", "int4"])
@pytest.mark.parametrize("sites,per_site,count", [(2, 2, 50_003), (2, 1, 20_011), (2, 3, 40_009), (3, 2, 30_001)])
def test_pipelined_hierarchical_within_bound_and_identical(codec, sites, per_site, count):
    """The compressed hierarchical allreduce runs its phases pipelined over
    chunks; sizes that are no multiple of a chunk (or of the ranks) still end
    within the codec's bound of the exact sum and bit-identical everywhere,
    with error feedback as tight as unpipelined."""
    results = run_ranks(_hier_pipelined, sites * per_site, codec, count, sites, timeout=150)
    assert len(set(results)) == 1, "ranks ended with different bits"


def _hier_exact(rank: int, size: int, codec: str, kind: str, count: int, algo: str, sites: int) -> tuple:
    import hetcomm

    opts = hetcomm.Options(algo=algo, site=f"dc{rank * sites // size}")
    with hetcomm.Communicator(rank, size, timeout=60, options=opts) as comm:
        assert comm.site_count == sites
        assert comm.ring_order() == [0, 1, 2, 3]
        xs = [np.round(x * 8) for x in inputs(size, count, kind)]  # exact sums in fp32
        buf = xs[rank].copy()
        comm.allreduce(buf)
        np.testing.assert_array_equal(buf, np.sum(xs, axis=0))
        avg = xs[rank].copy()
        comm.allreduce(avg, "avg")
        np.testing.assert_array_equal(avg, (np.sum(xs, axis=0) / size).astype(np.float32))
        # Half the bytes cross sites compared to a flat ring.
        return digest(buf), comm.bytes_sent_intersite


def _nonfinite(rank: int, size: int) -> str:
    import hetcomm

    with hetcomm.Communicator(rank, size, timeout=30, options=hetcomm.Options(codec_min_bytes=0)) as comm:
        x = np.ones(4096, np.float32)
        if rank == 1:
            x[300] = np.nan
            x[3000] = np.inf
        comm.allreduce(x, codec="int8")
        # The blocks holding NaN/Inf decode to NaN, never to finite numbers;
        # the blocks without them are exact (all ones -> sum exactly representable).
        assert np.isnan(x[300]) and np.isnan(x[3000])
        finite = np.isfinite(x)
        assert finite.sum() >= 4096 - 2 * 512
        np.testing.assert_allclose(x[finite], size, rtol=1 / 127)
        return digest(x)


@pytest.mark.timeout(60)
def test_nan_and_inf_are_never_silently_finite():
    results = run_ranks(_nonfinite, 2, timeout=50)
    assert results[0] == results[1]


def _error_feedback(rank: int, size: int, codec: str, steps: int) -> tuple:
    import hetcomm

    comm = hetcomm.Communicator(rank, size, timeout=60, options=hetcomm.Options(codec_min_bytes=0))
    gen = lambda r: np.random.default_rng(r).standard_normal(50_000).astype(np.float32) * (r + 1)
    x, exact = gen(rank), sum(gen(r) for r in range(size))
    acc_ef = np.zeros_like(x, np.float64)
    acc_plain = np.zeros_like(x, np.float64)
    errors = []
    for step in range(1, steps + 1):
        b = x.copy()
        comm.allreduce(b, codec=codec, residual_key=7)
        acc_ef += b
        b = x.copy()
        comm.allreduce(b, codec=codec)
        acc_plain += b
        if step in (steps // 4, steps):
            errors.append((float(np.linalg.norm(acc_ef - step * exact)), float(np.linalg.norm(acc_plain - step * exact))))
    comm.close()
    return errors


@pytest.mark.timeout(120)
@pytest.mark.parametrize("codec,growth", [("int4", 1.2), ("1bit", 2.5)])
def test_error_feedback_keeps_the_running_sum_on_track(codec, growth):
    """Without feedback the running sum drifts linearly (the codec's bias adds
    up); with it the drift is what the residuals hold: bounded for a
    contracting codec (int4), growing like sqrt(steps) for 1-bit sign, whose
    mean-|x| scale grows with the residual it carries. Measured in the L2 norm,
    where the feedback guarantee holds."""
    (ef_q, plain_q), (ef, plain) = run_ranks(_error_feedback, 2, codec, 40, timeout=100)[0]
    assert plain / plain_q > 3.5, (plain_q, plain)  # linear drift without feedback
    assert ef < plain / 4, (ef, plain)
    assert ef / ef_q < growth, (ef_q, ef)


def _rs_ag(rank: int, size: int) -> tuple:
    import hetcomm

    with hetcomm.Communicator(rank, size, timeout=30, options=hetcomm.Options(codec_min_bytes=0)) as comm:
        xs = inputs(size, 30_000 * size, "normal")
        out = comm.reduce_scatter(xs[rank], codec="int8")
        exact = np.split(np.sum([x.astype(np.float64) for x in xs], axis=0), size)[rank]
        b = bound("int8", [np.split(x, size)[rank] for x in xs], size)
        assert np.all(np.abs(out - exact) <= b * 2)  # blocks may span two ranks' blocks
        g = comm.allgather(xs[rank][:30_000], codec="int8")
        for r in range(size):
            ref = xs[r][:30_000]
            assert np.all(np.abs(g[r] - ref) <= np.abs(ref).max() / 254 * 1.001)
        return digest(g)


@pytest.mark.timeout(60)
def test_compressed_reduce_scatter_and_allgather():
    results = run_ranks(_rs_ag, 3, timeout=50)
    assert len(set(results)) == 1


def _mismatched_codec(rank: int, size: int) -> str:
    import hetcomm

    with hetcomm.Communicator(rank, size, timeout=20, options=hetcomm.Options(codec_min_bytes=0)) as comm:
        try:
            comm.allreduce(np.ones(10_000, np.float32), codec="int8" if rank else "int4")
        except hetcomm.HetcommError as exc:
            return f"{type(exc).__name__}: {exc}"
    return "no error"


@pytest.mark.timeout(60)
def test_ranks_with_different_codecs_get_a_clear_error():
    for text in run_ranks(_mismatched_codec, 2, timeout=50):
        assert "codec=int" in text and "differs across ranks" in text, text
