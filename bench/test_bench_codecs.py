"""Throughput of the gradient codec kernels, beside np.copyto of the same bytes.

    pytest bench/test_bench_codecs.py                     # table at the end
    HETCOMM_SIMD=scalar pytest bench/test_bench_codecs.py # the portable path

GB/s is fp32 bytes per second: count * 4 over the time of one call, whatever
the op (decode "consumes" the fp32 it produces), so the numbers compare
directly with the copy and with a link's rate. Two sizes: 64 MiB (streams
from DRAM) and 512 KiB (a ring chunk, as the collectives pipeline it; stays
in L2). Each result is in benchmark.extra_info: "GB/s" from the median time,
"GB/s_best" from the fastest round (the steadier figure on a shared machine).
"""
import numpy as np
import pytest

from hetcomm._capi import ffi, lib

SIZES = {"64MiB": 16 << 20, "512KiB": 128 << 10}
CODECS = ["none", "fp16", "bf16", "int8", "int4", "1bit"]
OPS = ["encode", "decode", "decode_add", "hop", "encode_ef", "encode_sr"]
_results = {}


def _codec(name):
    return {"none": lib.HC_CODEC_NONE, "fp16": lib.HC_CODEC_FP16, "bf16": lib.HC_CODEC_BF16,
            "int8": lib.HC_CODEC_INT8, "int4": lib.HC_CODEC_INT4, "1bit": lib.HC_CODEC_1BIT}[name]


def _fp(a):
    return ffi.from_buffer("float[]", a)


@pytest.fixture(scope="module")
def data():
    out = {}
    rng = np.random.default_rng(0)
    for size, n in SIZES.items():
        x = rng.standard_normal(n).astype(np.float32)
        out[size] = dict(n=n, x=x, local=rng.standard_normal(n).astype(np.float32),
                         res=np.zeros(n, np.float32), out=np.zeros(n, np.float32),
                         copy=np.empty_like(x))
    return out


def _timing(size):
    # whole-call rounds of ~10 ms at 64 MiB; batch the 512 KiB calls
    return dict(rounds=12, iterations=1, warmup_rounds=2) if size == "64MiB" else \
        dict(rounds=30, iterations=40, warmup_rounds=2)


def _record(benchmark, size, name, op, nbytes):
    stats = getattr(benchmark, "stats", None)
    if not stats:  # --benchmark-disable
        return
    med, best = stats.stats.median, stats.stats.min
    benchmark.extra_info.update({"GB/s": nbytes / med / 1e9, "GB/s_best": nbytes / best / 1e9,
                                 "simd": ffi.string(lib.hc_simd_level()).decode(), "size": size})
    _results[(size, name, op)] = (nbytes / med / 1e9, nbytes / best / 1e9)


@pytest.mark.parametrize("size", SIZES)
def test_copyto(benchmark, data, size):
    d = data[size]
    benchmark.pedantic(np.copyto, args=(d["copy"], d["x"]), **_timing(size))
    _record(benchmark, size, "np.copyto", "copy", d["x"].nbytes)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("size", SIZES)
def test_codec(benchmark, data, size, name, op):
    codec, d = _codec(name), data[size]
    if op == "encode_sr" and name not in ("int8", "int4"):
        pytest.skip("stochastic rounding is int8/int4 only")
    n, x = d["n"], d["x"]
    p = ffi.new("hc_codec_params *")
    lib.hc_codec_params_init(p)
    if op == "encode_sr":
        p.sr_seed = 12345
    enc = np.empty(lib.hc_codec_encoded_size(codec, n, p), np.uint8)
    dst = np.empty_like(enc)
    assert lib.hc_codec_encode(codec, _fp(x), n, ffi.from_buffer(enc), ffi.NULL, p) == lib.HC_OK
    X, E, D = _fp(x), ffi.from_buffer(enc), ffi.from_buffer(dst)
    O, L, R = _fp(d["out"]), _fp(d["local"]), _fp(d["res"])
    d["res"][:] = 0
    fn = {
        "encode": lambda: lib.hc_codec_encode(codec, X, n, D, ffi.NULL, p),
        "encode_sr": lambda: lib.hc_codec_encode(codec, X, n, D, ffi.NULL, p),
        "encode_ef": lambda: lib.hc_codec_encode(codec, X, n, D, R, p),
        "decode": lambda: lib.hc_codec_decode(codec, E, n, O, p),
        "decode_add": lambda: lib.hc_codec_decode_add(codec, E, n, O, p),
        "hop": lambda: lib.hc_codec_hop(codec, E, L, n, D, ffi.NULL, p),
    }[op]
    assert fn() == lib.HC_OK
    benchmark.pedantic(fn, **_timing(size))
    _record(benchmark, size, name, op, x.nbytes)


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    """Prints GB/s (median / best) per codec and op, plus the round trip
    1 / (1/encode + 1/decode) and its ratio to np.copyto."""
    yield
    if not _results:
        return
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        _print_table()


def _print_table():
    write = print
    write("")
    simd = ffi.string(lib.hc_simd_level()).decode()
    write(f"codec GB/s (fp32 bytes/s; median/best), simd={simd}")
    cols = OPS + ["roundtrip", "rt/copy"]
    for size in SIZES:
        copy = _results.get((size, "np.copyto", "copy"))
        if not copy:
            continue
        write(f"-- {size}: np.copyto {copy[0]:.2f}/{copy[1]:.2f}")
        write("codec " + "".join(f"{c:>13}" for c in cols))
        for name in CODECS:
            cells = []
            for op in OPS:
                r = _results.get((size, name, op))
                cells.append(f"{r[0]:6.2f}/{r[1]:<6.2f}" if r else f"{'-':>13}")
            e, dd = _results.get((size, name, "encode")), _results.get((size, name, "decode"))
            if e and dd:
                rt = [1 / (1 / e[k] + 1 / dd[k]) for k in (0, 1)]
                cells.append(f"{rt[0]:6.2f}/{rt[1]:<6.2f}")
                cells.append(f"{rt[0] / copy[0]:6.2f}/{rt[1] / copy[1]:<6.2f}")
            write(f"{name:5} " + "".join(f"{c:>13}" for c in cells))
