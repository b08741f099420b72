"""Test data and result checking for hetcomm-bench.

Every rank fills its input with a periodic sequence of small integers, a
different one per rank: period :data:`PERIOD` (61, a prime, so that blocks of
power-of-two sizes never line up with the period and a swapped block shows),
values in ``[-2, 2]`` (``[0, 2]`` unsigned, ``{0, 1}`` bool). Sums over up to
63 ranks are then exact in every dtype, fp16 and int8 included, so results are
compared exactly unless a lossy codec is in use
(:func:`hetcomm.bench.collectives.tolerance`).

The expected output of each collective is periodic too, so it is generated
piecewise and compared chunk by chunk without a second full-size buffer.
Receive buffers start "poisoned" (NaN for floats, the dtype's maximum for
integers) so that elements a backend never wrote count as wrong.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .collectives import DATA_MAX_ABS, Collective, DType

PERIOD = 61
CHUNK = 1 << 20  # elements compared / generated at a time


def base_pattern(rank: int, dtype: DType) -> np.ndarray:
    """One period (int64) of rank ``rank``'s input values."""
    rng = np.random.default_rng([0x6863, rank])
    if dtype.kind == "bool":
        return rng.integers(0, 2, PERIOD)
    if dtype.kind == "unsigned":
        return rng.integers(0, DATA_MAX_ABS + 1, PERIOD)
    return rng.integers(-DATA_MAX_ABS, DATA_MAX_ABS + 1, PERIOD)


class Periodic:
    """A periodic sequence (one period given) materialized in a numpy dtype."""

    def __init__(self, base: np.ndarray, np_dtype: str):
        self.period = len(base)
        self.np_dtype = np.dtype(np_dtype)
        reps = CHUNK // self.period + 2
        self.tile = np.tile(base.astype(self.np_dtype), reps)

    def slice(self, start: int, length: int) -> np.ndarray:
        """Read-only view of elements ``[start, start+length)``; ``length <= CHUNK``."""
        o = start % self.period
        return self.tile[o:o + length]

    def materialize(self, start: int, length: int) -> np.ndarray:
        """A new array holding elements ``[start, start+length)``."""
        out = np.empty(length, dtype=self.np_dtype)
        for s in range(0, length, CHUNK):
            n = min(CHUNK, length - s)
            out[s:s + n] = self.slice(start + s, n)
        return out


def rank_pattern(rank: int, dtype: DType) -> Periodic:
    """Rank ``rank``'s input sequence, in ``dtype.check`` (float32 stands in for bfloat16)."""
    return Periodic(base_pattern(rank, dtype), dtype.check)


def sum_pattern(world_size: int, dtype: DType) -> Periodic:
    """The elementwise sum over all ranks' inputs (logical or for bool)."""
    total = sum(base_pattern(r, dtype) for r in range(world_size))
    if dtype.kind == "bool":
        total = total > 0
    return Periodic(np.asarray(total), dtype.check)


def poison_value(dtype: DType) -> float | int | bool:
    """Fill value for receive buffers: NaN, the integer maximum, or True for bool."""
    if dtype.is_float:
        return float("nan")
    if dtype.kind == "bool":
        return True
    return int(np.iinfo(np.dtype(dtype.check)).max)


def send_data(coll: Collective, rank: int, world_size: int, send_count: int, root: int,
              dtype: DType) -> np.ndarray:
    """This rank's input buffer contents (in ``dtype.check``)."""
    if coll.name == "broadcast" and rank != root:
        return np.full(send_count, poison_value(dtype), dtype=dtype.check)
    return rank_pattern(rank, dtype).materialize(0, send_count)


@dataclass
class Segment:
    """Output elements ``[out_start, out_start+length)`` must equal ``pattern`` from ``pattern_start``."""

    out_start: int
    length: int
    pattern: Periodic
    pattern_start: int


def expected_segments(coll: Collective, rank: int, world_size: int, count: int, root: int,
                      dtype: DType) -> list[Segment]:
    """What this rank's receive buffer must hold after ``coll`` on ``count`` elements."""
    n = world_size
    m = count // n if coll.split else count
    if coll.name == "allreduce":
        return [Segment(0, count, sum_pattern(n, dtype), 0)]
    if coll.name == "reduce_scatter":
        return [Segment(0, m, sum_pattern(n, dtype), rank * m)]
    if coll.name == "broadcast":
        return [Segment(0, count, rank_pattern(root, dtype), 0)]
    if coll.name == "allgather":
        return [Segment(q * m, m, rank_pattern(q, dtype), 0) for q in range(n)]
    if coll.name == "alltoall":
        return [Segment(q * m, m, rank_pattern(q, dtype), rank * m) for q in range(n)]
    raise ValueError(f"no reference for {coll.name}")


def check(read: Callable[[int, int], np.ndarray], segments: list[Segment], tol: float,
          is_float: bool) -> tuple[int, float]:
    """Compare an output against its expected segments.

    Args:
        read: ``read(start, stop)`` returns output elements ``[start, stop)`` as numpy
            (in the same dtype as the patterns).
        segments: from :func:`expected_segments`.
        tol: absolute tolerance; 0 means exact.
        is_float: compute the maximum absolute error (floats only).

    Returns:
        (number of wrong elements, maximum absolute error; inf if any NaN/inf
        appeared; 0.0 for non-float types).
    """
    wrong = 0
    max_err = 0.0
    for seg in segments:
        for s in range(0, seg.length, CHUNK):
            n = min(CHUNK, seg.length - s)
            got = read(seg.out_start + s, seg.out_start + s + n)
            exp = seg.pattern.slice(seg.pattern_start + s, n)
            if tol == 0.0:
                bad = np.count_nonzero(got != exp)
                if bad and is_float:
                    max_err = max(max_err, _max_abs_diff(got, exp))
            else:
                diff = np.abs(got.astype(np.float64) - exp.astype(np.float64))
                bad = n - np.count_nonzero(diff <= tol)  # NaN counts as wrong
                max_err = max(max_err, float(np.max(diff)) if not np.isnan(diff).any() else float("inf"))
            wrong += int(bad)
    return wrong, max_err


def _max_abs_diff(got: np.ndarray, exp: np.ndarray) -> float:
    diff = np.abs(got.astype(np.float64) - exp.astype(np.float64))
    return float("inf") if np.isnan(diff).any() else float(np.max(diff))
