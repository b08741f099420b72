"""Throughput of hc_reduce_kernel SUM on 64 MiB operands, beside np.copyto.

    pytest bench/test_bench_reduce.py                          # dispatched path (AVX2 here)
    HETCOMM_SIMD=scalar pytest bench/test_bench_reduce.py      # portable path

The SIMD level is fixed per process, hence the environment variable; each
result carries it in extra_info["simd"].

extra_info["GB/s"] is input consumed: both operands (2 x 64 MiB) per call
for the reduction, the 64 MiB source for the copy. "traffic GB/s" counts
every stream (reduce: 2 reads + 1 write, copy: 1 read + 1 write), which is
what memory bandwidth limits.
"""
import numpy as np
import pytest

from hetcomm._capi import ffi, lib

NBYTES = 64 << 20

# name: (hc dtype, element bytes, maker of a random operand of n elements)
def _f32(rng, n):
    return rng.standard_normal(n, dtype=np.float32)


def _bf16(rng, n):
    return (_f32(rng, n).view(np.uint32) >> 16).astype(np.uint16)


DTYPES = {
    "float32": (lib.HC_FLOAT32, _f32),
    "float16": (lib.HC_FLOAT16, lambda rng, n: _f32(rng, n).astype(np.float16)),
    "bfloat16": (lib.HC_BFLOAT16, _bf16),
    "int32": (lib.HC_INT32, lambda rng, n: rng.integers(-2**20, 2**20, n, dtype=np.int32)),
}


def _simd():
    return ffi.string(lib.hc_simd_level()).decode()


def _report(benchmark, input_bytes, streams):
    if benchmark.stats is None:  # --benchmark-disable
        return
    t = benchmark.stats.stats.median
    benchmark.extra_info["simd"] = _simd()
    benchmark.extra_info["GB/s"] = round(input_bytes / t / 1e9, 2)
    benchmark.extra_info["traffic GB/s"] = round(streams * NBYTES / t / 1e9, 2)


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("name", list(DTYPES))
def test_bench_reduce_sum(benchmark, name, inplace):
    dtype, make = DTYPES[name]
    rng = np.random.default_rng(0)
    n = NBYTES // lib.hc_dtype_size(dtype)
    a, b = make(rng, n), make(rng, n)
    dst = a if inplace else np.zeros_like(a)
    dst.fill(1)  # fault the pages in now, not in the first timed round
    pd, pa, pb = ffi.from_buffer(dst), ffi.from_buffer(a), ffi.from_buffer(b)
    benchmark.group = "reduce SUM, 64 MiB operands"

    def run():
        # In place, the values drift between rounds; throughput does not.
        return lib.hc_reduce_kernel(pd, pa, pb, n, dtype, lib.HC_SUM)

    assert benchmark(run) == lib.HC_OK
    _report(benchmark, 2 * NBYTES, 3)


def test_bench_copyto(benchmark):
    src = np.random.default_rng(0).integers(0, 255, NBYTES, dtype=np.uint8)
    dst = np.empty_like(src)
    benchmark.group = "reduce SUM, 64 MiB operands"
    benchmark(np.copyto, dst, src)
    _report(benchmark, NBYTES, 2)
