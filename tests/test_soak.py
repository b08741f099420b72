"""Random soak: a long run of every collective, every numpy dtype, odd sizes,
with a codec set on the communicator. Every result is checked against numpy
(exactly where the op is exact, within the codec's bound where it quantizes),
and everything every rank must hold alike is hashed and compared across ranks.

The default suite runs 1,000 ops per world size; the 10,000-op run is slow.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from harness import run_ranks
from test_compressed import bound

CODEC = "int8"
OPS = ("allreduce", "broadcast", "reduce", "allgather", "reduce_scatter", "gather", "scatter", "alltoall",
       "alltoallv", "barrier")
DTYPES = (np.float32, np.float64, np.float16, np.int8, np.int16, np.int32, np.int64, np.uint8, np.bool_)
FLOAT_OPS = ("sum", "avg", "prod", "min", "max")
INT_OPS = ("sum", "avg", "prod", "min", "max", "band", "bor", "bxor")
BOOL_OPS = ("min", "max", "band", "bor", "bxor")


def _size(rng: np.random.Generator) -> int:
    pick = rng.random()
    if pick < 0.05:
        return 0
    if pick < 0.6:
        return int(rng.integers(0, 130)) * 2 + 1  # odd, small: latency paths
    if pick < 0.95:
        return int(rng.integers(500, 12_000)) * 2 + 1
    return int(rng.integers(40_000, 150_000)) * 2 + 1  # odd, large: pipelined and compressed paths


def _data(dtype: type, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == np.bool_:
        return rng.random(n) < 0.5
    if np.issubdtype(dtype, np.floating):
        if dtype == np.float16:  # small enough that a product of three stays finite
            return (rng.standard_normal(n) * 4).astype(dtype)
        x = rng.standard_normal(n) * 100
        x[rng.random(n) < 0.01] *= 50  # outliers inside quantization blocks
        return x.astype(dtype)
    return rng.integers(-3 if dtype != np.uint8 else 0, 4, n).astype(dtype)  # small: products stay in range


def _reference(xs: list[np.ndarray], op: str) -> np.ndarray:
    dtype = xs[0].dtype
    wide = [x.astype(np.float64) if dtype.kind == "f" else x for x in xs]
    if op in ("sum", "avg"):
        r = np.sum(wide, axis=0, dtype=np.float64 if dtype.kind == "f" else dtype)
        if op == "avg":
            r = r / len(xs) if dtype.kind == "f" else (r / len(xs)).astype(np.int64)  # truncating, as C
        return r
    if op == "prod":
        return np.prod(wide, axis=0, dtype=np.float64 if dtype.kind == "f" else dtype)
    fn = {"min": np.minimum, "max": np.maximum, "band": np.bitwise_and, "bor": np.bitwise_or,
          "bxor": np.bitwise_xor}[op]
    r = wide[0]
    for x in wide[1:]:
        r = fn(r, x)
    return r


def _check_reduced(got: np.ndarray, xs: list[np.ndarray], op: str, compressed: bool, what: str) -> None:
    exact = _reference(xs, op)
    if got.dtype.kind != "f":
        if op == "avg":  # C truncates toward zero
            exact = np.trunc(np.sum(xs, axis=0, dtype=np.float64) / len(xs))
        assert np.array_equal(got.astype(exact.dtype), exact.astype(got.dtype).astype(exact.dtype)), what
        return
    g = got.astype(np.float64)
    if op in ("min", "max"):
        assert np.array_equal(g, exact.astype(got.dtype).astype(np.float64)), what
        return
    # Sums and products of floats depend on order; with the codec, on quantization.
    eps = {np.dtype(np.float16): 2.0**-10, np.dtype(np.float32): 2.0**-22, np.dtype(np.float64): 2.0**-50}[got.dtype]
    tol = eps * len(xs) * np.abs(exact) + eps * np.sum([np.abs(x.astype(np.float64)) for x in xs], axis=0)
    if compressed:
        b = bound(CODEC, [x.astype(np.float32) for x in xs], len(xs))
        tol = tol + (b / len(xs) if op == "avg" else b)
    tol = tol + (6e-8 if got.dtype == np.float16 else 1e-300)  # fp16 subnormal spacing
    err = np.abs(g - exact)
    worst = int(np.argmax(err - tol)) if err.size else 0
    assert np.all(err <= tol), f"{what}: err {err[worst]} > {tol[worst]} at {worst}"


def _soak(rank: int, size: int, ops: int, seed: int) -> str:
    import hetcomm

    opts = hetcomm.Options(codec=CODEC, codec_min_bytes=0)
    shared = hashlib.sha256()
    plan = np.random.default_rng(seed)  # same on every rank: the same calls in the same order
    with hetcomm.Communicator(rank, size, timeout=120, options=opts) as comm:
        for step in range(ops):
            kind = OPS[plan.integers(len(OPS))]
            dtype = DTYPES[plan.integers(len(DTYPES))]
            n = _size(plan)
            root = int(plan.integers(size))
            redops = BOOL_OPS if dtype == np.bool_ else FLOAT_OPS if np.issubdtype(dtype, np.floating) else INT_OPS
            op = redops[plan.integers(len(redops))]
            what = f"step {step}: {kind}({n} x {np.dtype(dtype).name}, op={op}, root={root}) on {size} ranks"
            xs = [_data(dtype, n, seed * 1_000_003 + step * 101 + r) for r in range(size)]
            mine = xs[rank].copy()
            compressed = n > 0 and np.issubdtype(dtype, np.floating) and op in ("sum", "avg")
            if kind == "allreduce":
                comm.allreduce(mine, op)
                _check_reduced(mine, xs, op, compressed, what)
                shared.update(mine.tobytes())
            elif kind == "broadcast":
                comm.broadcast(mine, root=root)
                assert np.array_equal(mine, xs[root]), what
            elif kind == "reduce":
                out = comm.reduce(mine, root=root, op=op)
                if rank == root:
                    _check_reduced(out, xs, op, False, what)
            elif kind == "allgather":
                g = comm.allgather(mine)
                assert np.array_equal(g, np.stack(xs)), what
            elif kind == "reduce_scatter":
                big = [_data(dtype, n * size, seed + step * 7 + r) for r in range(size)]
                out = comm.reduce_scatter(big[rank], op)
                parts = [np.split(b, size)[rank] for b in big]
                if compressed:  # a quantization block may span two ranks' blocks: twice the bound
                    exact = _reference(parts, op)
                    b = bound(CODEC, [p.astype(np.float32) for p in parts], size) * 2
                    b = b / size if op == "avg" else b
                    tol = b + np.abs(exact) * (2.0**-10 if dtype == np.float16 else 1e-6) + 6e-8
                    assert np.all(np.abs(out.astype(np.float64) - exact) <= tol), what
                else:
                    _check_reduced(out, parts, op, False, what)
            elif kind == "gather":
                g = comm.gather(mine, root=root)
                if rank == root:
                    assert np.array_equal(g, np.stack(xs)), what
            elif kind == "scatter":
                out = np.empty(n, dtype)
                comm.scatter(np.concatenate(xs) if rank == root else None, out, root=root)
                assert np.array_equal(out, xs[rank]), what
            elif kind == "alltoall":
                blocks = [_data(dtype, n * size, seed + step * 13 + r) for r in range(size)]
                out = comm.alltoall(blocks[rank])
                assert np.array_equal(out, np.concatenate([np.split(b, size)[rank] for b in blocks])), what
            elif kind == "alltoallv":
                counts = np.random.default_rng(seed + step).integers(0, 50, (size, size))  # counts[src][dst]
                send = [_data(dtype, int(counts[r].sum()), seed + step * 17 + r) for r in range(size)]
                recv = np.empty(int(counts[:, rank].sum()), dtype)
                comm.alltoallv(send[rank], list(counts[rank]), recv, list(counts[:, rank]))
                pieces = [np.split(send[s], np.cumsum(counts[s])[:-1])[rank] for s in range(size)]
                assert np.array_equal(recv, np.concatenate(pieces)), what
            else:
                comm.barrier()
            shared.update(kind.encode())
    return shared.hexdigest()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world_size", [2, 3])
def test_random_soak_with_a_codec(world_size):
    results = run_ranks(_soak, world_size, 1000, 20 + world_size, timeout=580)
    assert len(set(results)) == 1, "ranks hold different results"


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("world_size", [2, 3])
def test_random_soak_10000_ops(world_size):
    results = run_ranks(_soak, world_size, 10_000, 40 + world_size, timeout=3500)
    assert len(set(results)) == 1, "ranks hold different results"
