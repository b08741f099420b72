"""Gradient codec kernels (hc_codec_*): layout, error bounds, NaN/Inf rules,
error feedback, the fused hop, stochastic rounding, and bit-identity of the
scalar and AVX2 paths.

Every bound below is derived from the codec's arithmetic (see the helpers'
docstrings), not tuned to pass. References are numpy, mostly in fp64; where a
kernel's result is defined exactly (a decode is level * scale in fp32, a hop
is encode(decode + local)) the test asks for equality, bit for bit.

Run as a script (``python test_codecs.py --digest OUT``) it writes digests of
every kernel's output over a grid of cases; the bit-identity test runs that
twice, once with HETCOMM_SIMD=scalar, and compares.
"""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hetcomm._capi import ffi, lib

NONE, FP16, BF16 = lib.HC_CODEC_NONE, lib.HC_CODEC_FP16, lib.HC_CODEC_BF16
INT8, INT4, BIT1 = lib.HC_CODEC_INT8, lib.HC_CODEC_INT4, lib.HC_CODEC_1BIT
ALL = [NONE, FP16, BF16, INT8, INT4, BIT1]
BLOCKED = [INT8, INT4, BIT1]
QMAX = {INT8: 127, INT4: 7}
NAMES = {NONE: "none", FP16: "fp16", BF16: "bf16", INT8: "int8", INT4: "int4", BIT1: "1bit"}
U = 2.0 ** -24          # fp32 unit roundoff
FLT_MIN = np.float32(2.0 ** -126)
F16_MAX = 65504.0


# ---- calling the kernels ------------------------------------------------

def params(block=256, fp32=1, seed=0, offset=0):
    p = ffi.new("hc_codec_params *")
    lib.hc_codec_params_init(p)
    p.block, p.scale_fp32, p.sr_seed, p.sr_offset = block, fp32, seed, offset
    return p


def fptr(a):
    return ffi.NULL if a is None else ffi.from_buffer("float[]", a)


def last_error():
    return ffi.string(lib.hc_last_error()).decode()


def encode(codec, x, p, residual=None):
    buf = np.empty(lib.hc_codec_encoded_size(codec, x.size, p), np.uint8)
    rc = lib.hc_codec_encode(codec, fptr(x), x.size, ffi.from_buffer(buf), fptr(residual), p)
    assert rc == lib.HC_OK, last_error()
    return buf


def decode(codec, buf, n, p):
    out = np.empty(n, np.float32)
    assert lib.hc_codec_decode(codec, ffi.from_buffer(buf), n, fptr(out), p) == lib.HC_OK
    return out


def decode_add(codec, buf, acc, p):
    acc = acc.copy()
    assert lib.hc_codec_decode_add(codec, ffi.from_buffer(buf), acc.size, fptr(acc), p) == lib.HC_OK
    return acc


def hop(codec, buf, local, p, want_sum=True):
    dst = np.empty(lib.hc_codec_encoded_size(codec, local.size, p), np.uint8)
    s = np.empty_like(local) if want_sum else None
    rc = lib.hc_codec_hop(codec, ffi.from_buffer(buf), fptr(local), local.size,
                          ffi.from_buffer(dst), fptr(s), p)
    assert rc == lib.HC_OK, last_error()
    return dst, s


# ---- reading the layout (scales first, then the value stream) ------------

def split(codec, buf, n, p):
    """(scales as fp32, integer levels / bits) of an encoded block run."""
    nb = -(-n // p.block)
    ss = 4 if p.scale_fp32 else 2
    scales = buf[:nb * ss].view(np.float32 if p.scale_fp32 else np.float16).astype(np.float32)
    vals = buf[nb * ss:]
    if codec == INT8:
        assert vals.size == n
        lv = vals.view(np.int8).astype(np.int32)
    elif codec == INT4:
        assert vals.size == (n + 1) // 2
        nib = np.empty(2 * vals.size, np.int32)
        nib[0::2], nib[1::2] = vals & 15, vals >> 4
        assert n % 2 == 0 or nib[n] == 0, "padding nibble must be 0"
        lv = (nib[:n] ^ 8) - 8
    else:
        assert vals.size == (n + 7) // 8
        bits = np.unpackbits(vals, bitorder="little").astype(np.int32)
        assert not bits[n:].any(), "padding bits must be 0"
        lv = bits[:n]
    return scales, lv


def per_elem(per_block, n, block):
    return np.repeat(per_block, block)[:n]


def blocks_of(v, block, fill=0.0):
    """v padded to whole blocks, shape (nblocks, block)."""
    pad = (-v.size) % block
    return np.concatenate([v, np.full(pad, fill, v.dtype)]).reshape(-1, block)


def ref_decode(codec, scales, lv, n, block):
    s = per_elem(scales, n, block)
    if codec == BIT1:
        return np.where(lv == 1, s, -s).astype(np.float32)
    return lv.astype(np.float32) * s   # fp32 multiply, as the kernel does


def assert_same(a, b, what=""):
    """Equal bit for bit, except that any NaN equals any NaN."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, what
    if a.dtype.kind != "f":
        assert np.array_equal(a, b), what
        return
    na, nb = np.isnan(a), np.isnan(b)
    assert np.array_equal(na, nb), f"{what}: NaN positions differ"
    bits = np.dtype(f"u{a.dtype.itemsize}")
    ok = na | (a.view(bits) == b.view(bits))
    bad = np.flatnonzero(~ok)[:5]
    assert ok.all(), f"{what}: first mismatches at {bad}: {a[bad]} vs {b[bad]}"


# ---- reference scales -----------------------------------------------------

def f16_round_up(s32):
    """Smallest fp16 >= s32, saturated at 65504 (the kernel's fp16 scale rule)."""
    h = s32.astype(np.float16)
    up = h.astype(np.float32) < s32
    h[up] = np.nextafter(h[up], np.float16(np.inf))
    h[np.isinf(h) | (h > np.float16(F16_MAX))] = np.float16(F16_MAX)
    return h.astype(np.float32)


def ref_int_scales(codec, v, block, fp32):
    """absmax/qmax per block in fp32, at least FLT_MIN when absmax > 0 (so 1/scale is
    finite), fp16 rounded up; NaN for blocks with NaN/Inf."""
    b = blocks_of(v, block)
    bad = ~np.isfinite(b).all(axis=1)
    amax = np.abs(np.where(np.isfinite(b), b, 0)).max(axis=1).astype(np.float32)
    s32 = (amax / np.float32(QMAX[codec])).astype(np.float32)
    s32 = np.where((amax > 0) & (s32 < FLT_MIN), FLT_MIN, s32).astype(np.float32)
    s = s32 if fp32 else f16_round_up(s32)
    s[bad] = np.nan
    return s


def int_bound(codec, s):
    """|v - decode| for one element of a finite block with stored scale s:
    t = fl(v * fl(1/s)) is within qmax * 2u(1+u) of v/s (two fp32 roundings of a
    value <= qmax(1+u)); rounding t to an integer adds 1/2; fl(q*s) adds qmax*s*u.
    Total s * (1/2 + 3 qmax u (1+u)) <= s * (1/2 + qmax * 2^-22)."""
    return s.astype(np.float64) * (0.5 + QMAX[codec] * 2.0 ** -22)


# ---- inputs -----------------------------------------------------------------

COUNTS = [1, 255, 256, 257, 1000003]


def make_input(kind, n, block, seed=0):
    rng = np.random.default_rng(seed)
    nb = -(-n // block)
    if kind == "normal":
        # a different magnitude per block, 1e-8 .. 1e3: exercises subnormal fp16 scales
        mag = per_elem(10.0 ** rng.uniform(-8, 3, nb), n, block)
        return (rng.standard_normal(n) * mag).astype(np.float32)
    if kind == "outlier":
        x = rng.standard_normal(n).astype(np.float32)
        x[::block] = np.float32(3e4) * np.sign(rng.standard_normal(nb)).astype(np.float32)
        return x
    if kind == "denormal":
        x = (rng.standard_normal(n) * 1e-40).astype(np.float32)
        x[::7] = np.float32(1e-45) * (1 - 2 * (np.arange(x[::7].size) % 2))
        return x
    if kind == "zeros":
        x = np.zeros(n, np.float32)
        x[1::2] = -0.0
        return x
    raise ValueError(kind)


def with_bad_blocks(x, block, seed=1):
    """Puts NaN, +Inf or -Inf into every third block; returns (x, bad-block mask)."""
    rng = np.random.default_rng(seed)
    x = x.copy()
    nb = -(-x.size // block)
    bad = np.zeros(nb, bool)
    bad[1::3] = True
    for i, b in enumerate(np.flatnonzero(bad)):
        lo, hi = b * block, min(x.size, (b + 1) * block)
        x[rng.integers(lo, hi)] = [np.nan, np.inf, -np.inf][i % 3]
    return x, bad


# ---- basics -----------------------------------------------------------------

def test_names_defaults_and_sizes():
    assert [ffi.string(lib.hc_codec_name(c)).decode() for c in ALL] == [
        "none", "fp16", "bf16", "int8", "int4", "1bit"]
    assert ffi.string(lib.hc_codec_name(99)).decode() == "unknown"
    p = ffi.new("hc_codec_params *")
    p.block, p.sr_seed = 7, 5
    lib.hc_codec_params_init(p)
    assert (p.block, p.scale_fp32, p.sr_seed, p.sr_offset) == (256, 1, 0, 0)
    for n in [0, 1, 255, 256, 257, 1000003]:
        for fp32, ss in [(1, 4), (0, 2)]:
            q = params(256, fp32)
            nb = -(-n // 256)
            assert lib.hc_codec_encoded_size(NONE, n, q) == 4 * n
            assert lib.hc_codec_encoded_size(FP16, n, q) == 2 * n
            assert lib.hc_codec_encoded_size(BF16, n, q) == 2 * n
            assert lib.hc_codec_encoded_size(INT8, n, q) == nb * ss + n
            assert lib.hc_codec_encoded_size(INT4, n, q) == nb * ss + (n + 1) // 2
            assert lib.hc_codec_encoded_size(BIT1, n, q) == nb * ss + (n + 7) // 8
    # NULL params mean the defaults
    assert lib.hc_codec_encoded_size(INT8, 1000, ffi.NULL) == 4 * 4 + 1000


def test_invalid_arguments():
    x = np.ones(10, np.float32)
    buf = np.zeros(100, np.uint8)
    p = params()
    for bad in (-1, 6, 1000):
        assert lib.hc_codec_encode(bad, fptr(x), 10, ffi.from_buffer(buf), ffi.NULL, p) == \
            lib.HC_ERR_INVALID_ARGUMENT
        assert "codec" in last_error()
        assert lib.hc_codec_encoded_size(bad, 10, p) == 0
    p0 = params(block=0)
    for codec in BLOCKED:
        assert lib.hc_codec_encode(codec, fptr(x), 10, ffi.from_buffer(buf), ffi.NULL, p0) == \
            lib.HC_ERR_INVALID_ARGUMENT
        assert "block" in last_error()
        assert lib.hc_codec_decode(codec, ffi.from_buffer(buf), 10, fptr(x.copy()), p0) == \
            lib.HC_ERR_INVALID_ARGUMENT
    # casts have no blocks, so block 0 is irrelevant to them
    assert lib.hc_codec_encode(FP16, fptr(x), 10, ffi.from_buffer(buf), ffi.NULL, p0) == lib.HC_OK
    for codec in ALL:
        assert lib.hc_codec_encode(codec, ffi.NULL, 10, ffi.from_buffer(buf), ffi.NULL, p) == \
            lib.HC_ERR_INVALID_ARGUMENT
        assert "src" in last_error()
        assert lib.hc_codec_encode(codec, fptr(x), 10, ffi.NULL, ffi.NULL, p) == \
            lib.HC_ERR_INVALID_ARGUMENT
        assert "dst" in last_error()
        assert lib.hc_codec_decode_add(codec, ffi.from_buffer(buf), 10, ffi.NULL, p) == \
            lib.HC_ERR_INVALID_ARGUMENT
        assert "acc" in last_error()
        assert lib.hc_codec_hop(codec, ffi.from_buffer(buf), ffi.NULL, 10, ffi.from_buffer(buf),
                                ffi.NULL, p) == lib.HC_ERR_INVALID_ARGUMENT
        assert "local" in last_error()
        # count 0: nothing to touch, NULL is fine
        assert lib.hc_codec_encode(codec, ffi.NULL, 0, ffi.NULL, ffi.NULL, p) == lib.HC_OK
        assert lib.hc_codec_decode(codec, ffi.NULL, 0, ffi.NULL, p) == lib.HC_OK
        assert lib.hc_codec_hop(codec, ffi.NULL, ffi.NULL, 0, ffi.NULL, ffi.NULL, p) == lib.HC_OK


def test_none_is_fp32_on_the_wire():
    x = make_input("normal", 1001, 256)
    p = params()
    buf = encode(NONE, x, p)
    assert buf.tobytes() == x.tobytes()
    assert_same(decode(NONE, buf, x.size, p), x)
    acc = make_input("normal", 1001, 256, seed=3)
    assert_same(decode_add(NONE, buf, acc, p), acc + x)
    dst, s = hop(NONE, buf, acc, p)
    assert_same(s, x + acc)
    assert dst.tobytes() == (x + acc).tobytes()
    res = np.full_like(x, 0.25)
    buf = encode(NONE, x, p, residual=res)
    assert buf.tobytes() == (x + np.float32(0.25)).tobytes() and not res.any()


@pytest.mark.parametrize("codec", ALL, ids=lambda c: NAMES[c])
def test_unaligned_buffers_and_default_params(codec):
    """Wire buffers come with any alignment; fp32 arrays with 4-byte alignment."""
    n = 1000
    p = params()
    raw = np.zeros(n + 9, np.float32)
    x = raw[1:n + 1]                       # 4 mod 32
    x[:] = make_input("normal", n, 256, seed=9)
    ref = encode(codec, x.copy(), p)
    big = np.zeros(ref.size + 3, np.uint8)
    odd = big[1:ref.size + 1]               # odd address
    rc = lib.hc_codec_encode(codec, fptr(x), n, ffi.from_buffer(odd), ffi.NULL, ffi.NULL)
    assert rc == lib.HC_OK
    assert odd.tobytes() == ref.tobytes()   # NULL params are the defaults
    out = raw.copy()[3:n + 3]
    assert lib.hc_codec_decode(codec, ffi.from_buffer(odd), n, fptr(out), p) == lib.HC_OK
    assert_same(out, decode(codec, ref, n, p))
    big2 = np.zeros(ref.size + 3, np.uint8)
    dst = big2[3:ref.size + 3]
    local = raw.copy()[5:n + 5]
    assert lib.hc_codec_hop(codec, ffi.from_buffer(odd), fptr(local), n, ffi.from_buffer(dst),
                            ffi.NULL, p) == lib.HC_OK
    assert dst.tobytes() == hop(codec, ref, local.copy(), p)[0].tobytes()


# ---- int8 / int4 --------------------------------------------------------------

@pytest.mark.parametrize("codec", [INT8, INT4], ids=["int8", "int4"])
@pytest.mark.parametrize("fp32", [1, 0], ids=["s32", "s16"])
@pytest.mark.parametrize("block", [32, 256, 1024])
@pytest.mark.parametrize("n,kind", [(n, k) for n in COUNTS
                                    for k in ("normal", "outlier", "denormal", "zeros")
                                    if n < 10**6 or k == "normal"])
def test_int_codec_bounds(codec, fp32, block, n, kind):
    x = make_input(kind, n, block)
    p = params(block, fp32)
    buf = encode(codec, x, p)
    scales, lv = split(codec, buf, n, p)
    assert_same(scales, ref_int_scales(codec, x, block, fp32), "scales")
    assert np.abs(lv).max() <= QMAX[codec]
    dec = decode(codec, buf, n, p)
    assert_same(dec, ref_decode(codec, scales, lv, n, block), "decode")
    s = per_elem(scales, n, block)
    err = np.abs(x.astype(np.float64) - dec)
    assert (err <= int_bound(codec, s)).all(), f"max err/scale {np.max(err / np.maximum(s, 1e-45))}"
    if kind == "zeros":
        assert not scales.any() and not dec.any()


@pytest.mark.parametrize("codec", BLOCKED, ids=["int8", "int4", "1bit"])
@pytest.mark.parametrize("fp32", [1, 0], ids=["s32", "s16"])
def test_nan_inf_blocks(codec, fp32):
    block, n = 64, 64 * 20 + 17
    clean = make_input("normal", n, block, seed=5)
    x, bad = with_bad_blocks(clean, block)
    p = params(block, fp32)
    be = per_elem(bad, n, block)
    for residual in (None, np.full(n, 1e-3, np.float32)):
        v = x if residual is None else x + residual
        buf = encode(codec, x, p, residual)
        scales, lv = split(codec, buf, n, p)
        assert np.isnan(scales[bad]).all() and np.isfinite(scales[~bad]).all()
        assert not lv[be].any()
        dec = decode(codec, buf, n, p)
        assert np.isnan(dec[be]).all()
        # the other blocks are encoded as if the bad ones were not there
        zeroed = np.where(be, np.float32(0), v)
        ref = decode(codec, encode(codec, zeroed, p), n, p)
        assert_same(dec[~be], ref[~be])
        if residual is not None:
            assert not residual[be].any(), "residual of a NaN/Inf block must be reset"
            assert_same(residual[~be], (v - dec)[~be])


@pytest.mark.parametrize("codec", [INT8, INT4], ids=["int8", "int4"])
def test_fp16_scale_saturates(codec):
    """Blocks whose scale exceeds fp16 get scale 65504: values clip to +-qmax*65504,
    and error feedback keeps what was clipped."""
    block = 32
    x = np.linspace(-1, 1, 3 * block).astype(np.float32)
    x[:block] *= np.float32(1e9)
    p = params(block, fp32=0)
    res = np.zeros_like(x)
    buf = encode(codec, x, p, residual=res)
    scales, lv = split(codec, buf, x.size, p)
    assert scales[0] == F16_MAX
    dec = decode(codec, buf, x.size, p)
    assert np.isfinite(dec).all()
    assert np.abs(dec[:block]).max() == QMAX[codec] * F16_MAX
    assert_same(res, x - dec)
    # fp32 scales never clip
    dec32 = decode(codec, encode(codec, x, params(block, 1)), x.size, params(block, 1))
    s = per_elem(ref_int_scales(codec, x, block, 1), x.size, block)
    assert (np.abs(x.astype(np.float64) - dec32) <= int_bound(codec, s)).all()


# ---- 1 bit ------------------------------------------------------------------------

@pytest.mark.parametrize("fp32", [1, 0], ids=["s32", "s16"])
@pytest.mark.parametrize("block", [32, 256, 1024])
@pytest.mark.parametrize("n,kind", [(n, k) for n in COUNTS for k in ("normal", "denormal", "zeros")
                                    if n < 10**6 or k == "normal"])
def test_1bit(fp32, block, n, kind):
    x = make_input(kind, n, block)
    p = params(block, fp32)
    buf = encode(BIT1, x, p)
    scales, bits = split(BIT1, buf, n, p)
    assert_same(bits, (x >= 0).astype(np.int32), "sign bits")
    dec = decode(BIT1, buf, n, p)
    s = per_elem(scales, n, block)
    assert_same(dec, np.where(x >= 0, s, -s).astype(np.float32), "decode")
    b = blocks_of(np.abs(x).astype(np.float64), block)
    lens = np.minimum(block, n - block * np.arange(b.shape[0]))
    mean = b.sum(axis=1) / lens
    # the kernel sums in fp64 (relative error <= block * 2^-53) and rounds once to
    # fp32 (half an ulp, 2^-24 relative or 2^-150 absolute); fp16 adds half an fp16 ulp
    # (2^-11 relative or 2^-25 absolute). The bounds below hold each with room.
    if fp32:
        tol = np.maximum(mean * 2.0 ** -23, 2.0 ** -149)
    else:
        tol = mean * (2.0 ** -11 + 2.0 ** -23) + 2.0 ** -25
    assert (np.abs(scales - mean) <= tol).all()
    if kind == "zeros":
        assert not dec.any()


# ---- fp16 / bf16 --------------------------------------------------------------------

def cast_inputs(n=20011, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * 10.0 ** rng.uniform(-12, 6, n)).astype(np.float32)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519.99, 65520, -65520,
                         6e-8, 3e-8, 2.98e-8, 1e-45, -1e-45, 1e-40, 3.4e38, -3.4e38,
                         3.3961776e38, 3.3961778e38], np.float32)
    x[:specials.size] = specials
    x[-specials.size:] = specials[::-1]
    return x


def bf16_reference(x):
    """bfloat16 bits of x, rounded to nearest even in fp64 arithmetic (independent of
    the kernel's bit trick): 8 significant bits for normals, a 2^-133 grid below
    2^-126, Inf beyond the largest bfloat16 (0x7f7f)."""
    x64 = x.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        m, e = np.frexp(x64)
        r = np.rint(m * 256) * np.exp2(e - 8.0)
        sub = np.abs(x64) < 2.0 ** -126
        r[sub] = np.rint(x64[sub] * 2.0 ** 133) * 2.0 ** -133
        big = np.abs(r) > np.float64(np.uint32(0x7f7f0000).view(np.float32))
        r[big] = np.copysign(np.inf, r[big])
        return (r.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


@pytest.mark.parametrize("codec", [FP16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("n", [0, 1, 255, 256, 257, 20011])
def test_casts(codec, n):
    x = cast_inputs()[:n] if n < 20011 else cast_inputs()
    p = params()
    buf = encode(codec, x, p)
    assert buf.size == 2 * n
    got = buf.view(np.uint16)
    if codec == FP16:
        with np.errstate(over="ignore"):
            ref = x.astype(np.float16).view(np.uint16)
        dec_ref = ref.view(np.float16).astype(np.float32)
    else:
        ref = bf16_reference(x)
        dec_ref = (ref.astype(np.uint32) << 16).view(np.float32)
    nan = np.isnan(x)
    assert np.array_equal(got[~nan], ref[~nan])
    dec = decode(codec, buf, n, p)
    assert_same(dec, dec_ref)
    assert np.isnan(dec[nan]).all()
    # half an ulp: fp16 normals 2^-11 |x|, subnormals 2^-25; bf16 2^-8 |x|, 2^-134
    rel, tiny, big = (2.0 ** -11, 2.0 ** -25, 65520.0) if codec == FP16 else \
        (2.0 ** -8, 2.0 ** -134, (2 - 2.0 ** -8) * 2.0 ** 127)
    x64 = x.astype(np.float64)
    fin = np.isfinite(x64) & (np.abs(x64) < big)
    assert (np.abs(x64[fin] - dec[fin]) <= np.maximum(rel * np.abs(x64[fin]), tiny)).all()
    over = np.isfinite(x64) & (np.abs(x64) >= big)
    assert np.array_equal(dec[over], np.copysign(np.inf, x64[over]).astype(np.float32))
    assert np.array_equal(dec[np.isinf(x64)], x[np.isinf(x64)])
    # error feedback: residual = v - decode, reset where that is not finite
    res = np.zeros(n, np.float32)
    encode(codec, x, p, residual=res)
    with np.errstate(invalid="ignore"):
        r = x - dec
    assert_same(res, np.where(np.isfinite(r), r, np.float32(0)))


# ---- error feedback ----------------------------------------------------------------------

@pytest.mark.parametrize("codec", [FP16, BF16, INT8, INT4, BIT1], ids=lambda c: NAMES[c])
@pytest.mark.parametrize("fp32", [1, 0], ids=["s32", "s16"])
def test_error_feedback_tracks_sum(codec, fp32):
    """With the same x every step, sum(decoded) = k x - r_k up to fp32 rounding:
    v_t = fl(x + r_{t-1}) and r_t = fl(v_t - d_t) each round once (<= u |.|), so
    |(k x - sum d) - r_k| <= k u (max|v| + max|r|). And r_k itself is bounded by one
    step's error: s/2 (+ slack) for int8/int4, half an ulp of v for casts, and for
    1 bit ||r||_2 <= ||v||_2 per block (||v - s sign v||^2 = ||v||^2 - n s^2 exactly
    when s = mean|v|)."""
    n, block, k = 4099, 256, 25
    p = params(block, fp32)
    x = make_input("normal", n, block, seed=11)
    x = np.clip(x, -1e3, 1e3).astype(np.float32)
    res = np.zeros(n, np.float32)
    total = np.zeros(n, np.float64)
    vmax = rmax = np.zeros(n)
    for _ in range(k):
        v = x + res
        buf = encode(codec, x, p, residual=res)
        d = decode(codec, buf, n, p)
        assert_same(res, v - d, "residual is v - decode")
        total += d
        vmax, rmax = np.maximum(vmax, np.abs(v)), np.maximum(rmax, np.abs(res))
        if codec in QMAX:
            scales, _ = split(codec, buf, n, p)
            assert (np.abs(res) <= int_bound(codec, per_elem(scales, n, block))).all()
        elif codec == FP16:
            assert (np.abs(res) <= np.maximum(2.0 ** -11 * np.abs(v), 2.0 ** -25)).all()
        elif codec == BF16:
            assert (np.abs(res) <= np.maximum(2.0 ** -8 * np.abs(v), 2.0 ** -134)).all()
        else:
            rn = np.sqrt((blocks_of(res.astype(np.float64), block) ** 2).sum(axis=1))
            vn = np.sqrt((blocks_of(v.astype(np.float64), block) ** 2).sum(axis=1))
            assert (rn <= vn * (1 + 2.0 ** -20)).all()
    drift = k * x.astype(np.float64) - total
    assert (np.abs(drift - res) <= k * U * (vmax + rmax) + 1e-300).all()


# ---- fused ops ------------------------------------------------------------------------------

HOP_CASES = [(c, fp32, block, seed) for c in ALL for fp32 in (1, 0) for block in (32, 256)
             for seed in ((0, 99) if c in QMAX else (0,))
             if c in BLOCKED or (fp32, block) == (1, 256)]


@pytest.mark.parametrize("codec,fp32,block,seed", HOP_CASES)
def test_hop_is_decode_add_encode(codec, fp32, block, seed):
    n = 257 * 33 + 5
    p = params(block, fp32, seed=seed, offset=12345)
    a, _ = with_bad_blocks(make_input("normal", n, block, seed=1), block)
    local = make_input("normal", n, block, seed=2)
    local[-3] = np.inf  # one more non-finite block, coming from the local side
    src = encode(codec, a, p)
    dst, s = hop(codec, src, local, p)
    ref_sum = decode(codec, src, n, p) + local
    assert_same(s, ref_sum, "sum_out")
    assert dst.tobytes() == encode(codec, ref_sum, p).tobytes()
    dst2, _ = hop(codec, src, local, p, want_sum=False)
    assert dst2.tobytes() == dst.tobytes()
    # sum_out may alias local
    alias = local.copy()
    dst3 = np.empty_like(dst)
    assert lib.hc_codec_hop(codec, ffi.from_buffer(src), fptr(alias), n, ffi.from_buffer(dst3),
                            fptr(alias), p) == lib.HC_OK
    assert dst3.tobytes() == dst.tobytes()
    assert_same(alias, ref_sum)
    # decode_add == acc + decode
    acc = make_input("normal", n, block, seed=3)
    assert_same(decode_add(codec, src, acc, p), acc + decode(codec, src, n, p))


# ---- stochastic rounding -------------------------------------------------------------------

@pytest.mark.parametrize("codec", [INT8, INT4], ids=["int8", "int4"])
def test_sr_reproducible_and_chunk_independent(codec):
    block, n = 256, 256 * 40 + 77
    x = make_input("normal", n, block, seed=4)
    base = 2 ** 32 - 256 * 13 - 8  # the 32-bit counter wraps inside the tensor
    p = params(block, 1, seed=1234, offset=base)
    whole = encode(codec, x, p)
    assert encode(codec, x, p).tobytes() == whole.tobytes()
    assert encode(codec, x, params(block, 1, seed=1235, offset=base)).tobytes() != whole.tobytes()
    assert encode(codec, x, params(block, 1, seed=0)).tobytes() == \
        encode(codec, x, params(block, 1)).tobytes()
    dec = decode(codec, whole, n, p)
    ws, wl = split(codec, whole, n, p)
    cuts = [0, 256 * 3, 256 * 11, 256 * 12, 256 * 29, n]
    for lo, hi in zip(cuts, cuts[1:]):
        q = params(block, 1, seed=1234, offset=base + lo)
        part = encode(codec, x[lo:hi], q)
        cs, cl = split(codec, part, hi - lo, q)
        assert_same(cs, ws[lo // block: -(-hi // block)])
        assert np.array_equal(cl, wl[lo:hi])
        assert_same(decode(codec, part, hi - lo, q), dec[lo:hi])


@pytest.mark.parametrize("codec", [INT8, INT4], ids=["int8", "int4"])
def test_sr_unbiased(codec):
    """E[decode] = x: each element rounds to floor(t) or floor(t)+1 with P(up) = frac(t),
    so err_i has mean 0 and variance s^2 f(1-f) <= s^2/4. The mean error over N elements
    must lie within 6 sigma, plus the deterministic bias from fp32 rounding of t and
    t + u and the 2^-24 grid of u: at most s (qmax 2^-22 + 2^-24) per element."""
    block, n = 256, 1 << 20
    rng = np.random.default_rng(8)
    x = rng.standard_normal(n).astype(np.float32)
    p = params(block, 1, seed=77)
    buf = encode(codec, x, p)
    scales, lv = split(codec, buf, n, p)
    s = per_elem(scales, n, block).astype(np.float64)
    t = x / s
    assert ((lv == np.floor(t)) | (lv == np.floor(t) + 1) | (np.abs(t) >= QMAX[codec] - 1e-4)).all()
    err = lv * s - x
    f = t - np.floor(t)
    sigma = np.sqrt((s * s * f * (1 - f)).sum()) / n
    bias = (s * (QMAX[codec] * 2.0 ** -22 + 2.0 ** -24)).mean()
    assert abs(err.mean()) <= 6 * sigma + bias
    # and rounding to nearest is biased on the same data far more than SR's bound? no:
    # RTN's error is deterministic; check instead that SR really randomises (P(up) ~ f)
    up = lv > np.floor(t)
    sel = (f > 0.2) & (f < 0.4) & (np.abs(t) < QMAX[codec] - 1)
    ex = f[sel].mean()
    assert abs(up[sel].mean() - ex) <= 6 * np.sqrt(ex * (1 - ex) / sel.sum())


def test_sr_ignored_by_1bit():
    x = make_input("normal", 1000, 256)
    assert encode(BIT1, x, params(seed=5)).tobytes() == encode(BIT1, x, params()).tobytes()


# ---- scalar vs AVX2 -------------------------------------------------------------------------

def _canon_f32(a):
    a = np.array(a, np.float32, copy=True)
    a[np.isnan(a)] = np.nan  # NaN payloads are not part of the contract, NaN-ness is
    return a.tobytes()


def _canon_cast(codec, b):
    h = b.view(np.uint16).copy()
    nan = (h & 0x7fff) > (0x7c00 if codec == FP16 else 0x7f80)
    h[nan] = 0x7e00 if codec == FP16 else 0x7fc0
    return h.tobytes()


def _digest_cases():
    """(name, codec, n, params kwargs) over codecs, counts with tails, odd blocks,
    both scale formats, stochastic rounding across a 2^32 counter wrap."""
    cases = []
    for codec in ALL:
        blocked = codec in BLOCKED
        for n in [1, 7, 8, 255, 256, 257, 1000, 4099, 100003]:
            for block in ([32, 256, 1024, 40, 33] if blocked else [256]):
                for fp32 in ((1, 0) if blocked else (1,)):
                    srs = [(0, 0), (7, 0), (7, 2 ** 32 - 60)] if codec in QMAX else [(0, 0)]
                    for seed, off in srs:
                        kw = dict(block=block, fp32=fp32, seed=seed, offset=off)
                        name = f"{NAMES[codec]}-n{n}-b{block}-s{fp32}-sr{seed}-o{off}"
                        cases.append((name, codec, n, kw))
    return cases


def _digest_input(n, block, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * per_elem(10.0 ** rng.uniform(-9, 7, -(-n // block)), n, block))
    x = x.astype(np.float32)
    # ties: block 0 gets absmax 127 * 2^-3 and values (k + 1/2) 2^-3, exact halfway cases
    m = min(n, block)
    x[:m] = ((rng.integers(-127, 127, m) + 0.5) * 0.125).astype(np.float32)
    x[0] = 127 * 0.125
    specials = [0.0, -0.0, 1e-45, -3e-39, 1e30, -2e9, 65519.99, 65520.0, np.nan, np.inf, -np.inf]
    idx = rng.integers(0, n, min(n, 12))
    x[idx[:len(specials)]] = np.array(specials[:idx.size], np.float32)
    return x


def _digests():
    out = {}
    for name, codec, n, kw in _digest_cases():
        p = params(**kw)
        h = hashlib.sha256()
        x = _digest_input(n, kw["block"], n)
        enc = encode(codec, x, p)
        h.update(_canon_cast(codec, enc) if codec in (FP16, BF16) else enc.tobytes())
        res = (_digest_input(n, kw["block"], n + 1) * np.float32(1e-3)).astype(np.float32)
        enc_ef = encode(codec, x, p, residual=res)
        h.update(_canon_cast(codec, enc_ef) if codec in (FP16, BF16) else enc_ef.tobytes())
        h.update(_canon_f32(res))
        # decode and hop over arbitrary bytes too: garbage scales, NaN, negative, Inf
        garbage = np.random.default_rng(n).integers(0, 256, enc.size, dtype=np.uint8)
        local = _digest_input(n, kw["block"], n + 2)
        for src in (enc, garbage):
            h.update(_canon_f32(decode(codec, src, n, p)))
            h.update(_canon_f32(decode_add(codec, src, local, p)))
            dst, s = hop(codec, src, local, p)
            h.update(_canon_cast(codec, dst) if codec in (FP16, BF16) else dst.tobytes())
            h.update(_canon_f32(s))
        out[name] = h.hexdigest()
    return out


def test_scalar_and_avx2_bit_identical(tmp_path):
    level = ffi.string(lib.hc_simd_level()).decode()
    if level == "scalar":
        pytest.skip("this CPU has no AVX2 path to compare with")
    runs = {}
    for simd in ("scalar", "native"):
        env = dict(os.environ)
        env.pop("HETCOMM_SIMD", None)
        if simd == "scalar":
            env["HETCOMM_SIMD"] = "scalar"
        out = tmp_path / f"{simd}.json"
        subprocess.run([sys.executable, __file__, "--digest", str(out)], env=env, check=True,
                       timeout=120)
        runs[simd] = json.loads(out.read_text())
    assert runs["scalar"]["level"] == "scalar" and runs["native"]["level"] == level
    a, b = runs["scalar"]["digests"], runs["native"]["digests"]
    assert a.keys() == b.keys() and len(a) > 500
    diff = [k for k in a if a[k] != b[k]]
    assert not diff, f"{len(diff)} cases differ, e.g. {diff[:8]}"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--digest":
        with open(sys.argv[2], "w") as f:
            json.dump({"level": ffi.string(lib.hc_simd_level()).decode(), "digests": _digests()}, f)
    else:
        sys.exit(pytest.main([__file__] + sys.argv[1:]))
