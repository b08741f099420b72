"""Element-wise reduction and divide kernels (csrc/kernels/reduce.c).

References are numpy (and torch for bfloat16 rounding and for torch's own
half/bfloat16 arithmetic). The kernels return a canonical quiet NaN for every
NaN result, so the references do the same before comparing bytes.

Run as a script (``python tests/test_kernels_reduce.py --digests``) it prints
digests of a fixed set of results; the bit-identity test runs it under
HETCOMM_SIMD=scalar and compares with the dispatched path in this process.
"""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hetcomm._capi import ffi, lib

SUM, AVG, PROD, MIN, MAX = lib.HC_SUM, lib.HC_AVG, lib.HC_PROD, lib.HC_MIN, lib.HC_MAX
BAND, BOR, BXOR = lib.HC_BAND, lib.HC_BOR, lib.HC_BXOR
ALL_OPS = [SUM, AVG, PROD, MIN, MAX, BAND, BOR, BXOR]
BITWISE = {BAND, BOR, BXOR}

# name: (hc dtype, storage dtype, kind)
DTYPES = {
    "float32": (lib.HC_FLOAT32, np.float32, "float"),
    "float64": (lib.HC_FLOAT64, np.float64, "float"),
    "float16": (lib.HC_FLOAT16, np.float16, "float"),
    "bfloat16": (lib.HC_BFLOAT16, np.uint16, "float"),
    "int8": (lib.HC_INT8, np.int8, "int"),
    "int16": (lib.HC_INT16, np.int16, "int"),
    "int32": (lib.HC_INT32, np.int32, "int"),
    "int64": (lib.HC_INT64, np.int64, "int"),
    "uint8": (lib.HC_UINT8, np.uint8, "int"),
    "bool": (lib.HC_BOOL, np.uint8, "bool"),
}
FLOATS = ["float32", "float64", "float16", "bfloat16"]
INTS = ["int8", "int16", "int32", "int64", "uint8"]

# Bit patterns: the unsigned view of each float format and its canonical NaN.
BITS = {"float32": np.uint32, "float64": np.uint64, "float16": np.uint16, "bfloat16": np.uint16}
QNAN = {"float32": 0x7FC00000, "float64": 0x7FF8000000000000, "float16": 0x7E00, "bfloat16": 0x7FC0}
SIGN = {"float32": 1 << 31, "float64": 1 << 63, "float16": 1 << 15, "bfloat16": 1 << 15}
SPECIALS = {
    "float32": [0, SIGN["float32"], 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001,
                0x7FC12345, 0x00000001, 0x807FFFFF, 0x7F7FFFFF, 0x00800000],
    "float64": [0, SIGN["float64"], 0x7FF0000000000000, 0xFFF0000000000000, 0x7FF8000000000000,
                0xFFF8000000000000, 0x7FF0000000000001, 0x7FF8000012345678, 1, 0x800FFFFFFFFFFFFF,
                0x7FEFFFFFFFFFFFFF],
    "float16": [0, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0xFE00, 0x7C01, 0x7E55, 0x0001, 0x83FF, 0x7BFF,
                0x0400, 0x3C00],
    "bfloat16": [0, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC0, 0x7F81, 0x7FD5, 0x0001, 0x807F,
                 0x7F7F, 0x0080, 0x3F80],
}

ODD_COUNTS = [0, 1, 7, 33, 1000003]


# ---- calling the kernels -------------------------------------------------------

def hc_reduce(dst, a, b, dtype_name, op, count=None):
    n = a.size if count is None else count
    return lib.hc_reduce_kernel(ffi.from_buffer(dst), ffi.from_buffer(a), ffi.from_buffer(b),
                                n, DTYPES[dtype_name][0], op)


def hc_divide(buf, dtype_name, divisor):
    return lib.hc_divide_kernel(ffi.from_buffer(buf), buf.size, DTYPES[dtype_name][0], divisor)


def last_error():
    return ffi.string(lib.hc_last_error()).decode()


def names(dtype_name, op):
    return (ffi.string(lib.hc_dtype_name(DTYPES[dtype_name][0])).decode(),
            ffi.string(lib.hc_redop_name(op)).decode())


def supported(dtype_name, op):
    kind = DTYPES[dtype_name][2]
    return not ((kind == "float" and op in BITWISE) or (kind == "bool" and op == AVG))


# ---- inputs ----------------------------------------------------------------------

def float_pair(rng, n, name):
    """Operand bit patterns mixing ordinary values, raw random bits (NaN
    payloads, Inf, denormals), specials, and x == y / x == -y positions."""
    bits = BITS[name]
    nbits = np.dtype(bits).itemsize * 8

    def one():
        vals = (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3, n)).astype(np.float32)
        if name == "float64":
            v = vals.astype(np.float64).view(np.uint64)
        elif name == "float32":
            v = vals.view(np.uint32)
        elif name == "float16":
            v = vals.astype(np.float16).view(np.uint16)
        else:
            v = (vals.view(np.uint32) >> 16).astype(np.uint16)
        v = v.copy()
        raw = rng.random(n) < 0.25
        v[raw] = rng.integers(0, 1 << nbits, raw.sum(), dtype=np.uint64).astype(bits)
        spec = rng.random(n) < 0.1
        v[spec] = np.array(SPECIALS[name], dtype=np.uint64).astype(bits)[
            rng.integers(0, len(SPECIALS[name]), spec.sum())]
        return v.astype(bits)

    x, y = one(), one()
    same = rng.random(n) < 0.1
    y[same] = x[same]
    neg = rng.random(n) < 0.05
    y[neg] = x[neg] ^ bits(SIGN[name])
    return as_storage(x, name), as_storage(y, name)


def as_storage(bits_arr, name):
    return bits_arr.view(DTYPES[name][1])


def int_pair(rng, n, name):
    dt = np.dtype(DTYPES[name][1])
    info = np.iinfo(dt)
    x = rng.integers(info.min, info.max, n, dtype=dt, endpoint=True)
    y = rng.integers(info.min, info.max, n, dtype=dt, endpoint=True)
    edge = rng.random(n) < 0.05
    y[edge] = np.array([info.min, info.max, 0, -1 if info.min else 1], dtype=dt)[rng.integers(0, 4, edge.sum())]
    return x, y


def bool_pair(rng, n):
    # Nonzero bytes other than 1 must read as true.
    choices = np.array([0, 0, 1, 1, 2, 255, 0x80], dtype=np.uint8)
    return choices[rng.integers(0, len(choices), n)], choices[rng.integers(0, len(choices), n)]


def make_pair(rng, n, name):
    kind = DTYPES[name][2]
    if kind == "float":
        return float_pair(rng, n, name)
    if kind == "int":
        return int_pair(rng, n, name)
    return bool_pair(rng, n)


# ---- references --------------------------------------------------------------------

def bf16_to_f32(u16):
    return (u16.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(f32):
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(np.ascontiguousarray(f32, dtype=np.float32)).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16)


def widen(x, name):
    """Values in the format the kernels compute in."""
    if name == "float16":
        return x.astype(np.float32)
    if name == "bfloat16":
        return bf16_to_f32(x)
    return x


def narrow(v, name):
    if name == "float16":
        return v.astype(np.float16)
    if name == "bfloat16":
        return f32_to_bf16(v)
    return v


def canon_nan(r, name):
    """r (storage) with every NaN replaced by the canonical quiet NaN."""
    r = r.copy()
    bits = r.view(BITS[name])
    vals = widen(r, name) if name != "bfloat16" else bf16_to_f32(r)
    bits[np.isnan(vals)] = QNAN[name]
    return r


def ref_float(x, y, name, op):
    xv, yv = widen(x, name), widen(y, name)
    with np.errstate(all="ignore"):
        if op in (SUM, AVG):
            v = xv + yv
        elif op == PROD:
            v = xv * yv
        else:
            v = (np.minimum if op == MIN else np.maximum)(xv, yv)
            # Equal operands: -0 wins min, +0 wins max, whatever the order.
            ub = np.uint64 if v.dtype == np.float64 else np.uint32
            xb, yb, vb = xv.view(ub), yv.view(ub), v.view(ub)
            eq = xv == yv
            vb[eq] = (xb | yb)[eq] if op == MIN else (xb & yb)[eq]
        return canon_nan(narrow(v, name), name)


def ref_int(x, y, op):
    with np.errstate(all="ignore"):
        return {SUM: np.add, AVG: np.add, PROD: np.multiply, MIN: np.minimum, MAX: np.maximum,
                BAND: np.bitwise_and, BOR: np.bitwise_or, BXOR: np.bitwise_xor}[op](x, y)


def ref_bool(x, y, op):
    xb, yb = x != 0, y != 0
    fn = {SUM: np.logical_or, MAX: np.logical_or, BOR: np.logical_or,
          PROD: np.logical_and, MIN: np.logical_and, BAND: np.logical_and,
          BXOR: np.logical_xor}[op]
    return fn(xb, yb).astype(np.uint8)


def reference(x, y, name, op):
    kind = DTYPES[name][2]
    if kind == "float":
        return ref_float(x, y, name, op)
    if kind == "int":
        return ref_int(x, y, op)
    return ref_bool(x, y, op)


def assert_bytes_equal(got, want, what):
    if got.tobytes() == want.tobytes():
        return
    gb, wb = got.view(np.uint8).reshape(got.size, -1), want.view(np.uint8).reshape(want.size, -1)
    bad = np.nonzero((gb != wb).any(axis=1))[0]
    i = bad[0]
    raise AssertionError(f"{what}: {bad.size} of {got.size} elements differ; first at {i}: "
                         f"got {gb[i].tobytes().hex()} want {wb[i].tobytes().hex()}")


# ---- every dtype x op against the reference ------------------------------------------

@pytest.mark.parametrize("name", list(DTYPES))
def test_reduce_matches_reference(name):
    rng = np.random.default_rng([99, list(DTYPES).index(name)])
    for op in ALL_OPS:
        if not supported(name, op):
            continue
        for n in ODD_COUNTS:
            x, y = make_pair(rng, n, name)
            dst = np.empty_like(x)
            assert hc_reduce(dst, x, y, name, op) == lib.HC_OK, last_error()
            assert_bytes_equal(dst, reference(x, y, name, op), f"{name} op={op} n={n}")


@pytest.mark.parametrize("name", list(DTYPES))
def test_reduce_aliasing(name):
    rng = np.random.default_rng(7)
    for op in ALL_OPS:
        if not supported(name, op):
            continue
        for n in (1, 33, 4099):
            x, y = make_pair(rng, n, name)
            want = reference(x, y, name, op)
            a = x.copy()
            assert hc_reduce(a, a, y, name, op) == lib.HC_OK
            assert_bytes_equal(a, want, f"{name} op={op} dst is a")
            b = y.copy()
            assert hc_reduce(b, x, b, name, op) == lib.HC_OK
            assert_bytes_equal(b, want, f"{name} op={op} dst is b")
            both = x.copy()
            assert hc_reduce(both, both, both, name, op) == lib.HC_OK
            assert_bytes_equal(both, reference(x, x, name, op), f"{name} op={op} dst is a is b")


@pytest.mark.parametrize("name", ["float32", "float64", "float16", "int32", "int64"])
def test_reduce_unaligned(name):
    """Buffers may be slices of received messages: no alignment assumed."""
    rng = np.random.default_rng(3)
    n, isz = 1001, np.dtype(DTYPES[name][1]).itemsize
    x, y = make_pair(rng, n, name)
    raw = np.zeros(3 * (n * isz + 1) + 64, np.uint8)
    def at(off, arr):
        view = raw[off:off + n * isz]
        view[:] = arr.view(np.uint8)
        return view
    for op in (SUM, MIN, MAX):
        xa, ya, da = at(1, x), at(n * isz + 3, y), raw[2 * n * isz + 5:3 * n * isz + 5]
        assert lib.hc_reduce_kernel(ffi.from_buffer(da), ffi.from_buffer(xa), ffi.from_buffer(ya),
                                    n, DTYPES[name][0], op) == lib.HC_OK
        assert_bytes_equal(da.view(x.dtype), reference(x, y, name, op), f"{name} op={op} unaligned")


# ---- float semantics spelled out ---------------------------------------------------------

@pytest.mark.parametrize("name", FLOATS)
def test_min_max_order_independent(name):
    rng = np.random.default_rng(11)
    x, y = float_pair(rng, 20000, name)
    for op in (MIN, MAX, SUM, PROD):
        xy, yx = np.empty_like(x), np.empty_like(x)
        hc_reduce(xy, x, y, name, op)
        hc_reduce(yx, y, x, name, op)
        assert_bytes_equal(xy, yx, f"{name} op={op} a,b vs b,a")


@pytest.mark.parametrize("name", FLOATS)
def test_signed_zero_and_nan(name):
    bits = BITS[name]
    pz, nz, one = 0, SIGN[name], {"float32": 0x3F800000, "float64": 0x3FF0000000000000,
                                  "float16": 0x3C00, "bfloat16": 0x3F80}[name]
    payload_nan = {"float32": 0xFFC12345, "float64": 0xFFF8000012345678,
                   "float16": 0xFE55, "bfloat16": 0xFFD5}[name]
    x = np.array([pz, nz, pz, nz, payload_nan, one, payload_nan], dtype=bits)
    y = np.array([nz, pz, pz, nz, one, payload_nan, QNAN[name] + 1], dtype=bits)
    xs, ys = as_storage(x, name), as_storage(y, name)
    out = {}
    for op in (MIN, MAX, SUM):
        d = np.empty_like(xs)
        assert hc_reduce(d, xs, ys, name, op) == lib.HC_OK
        out[op] = d.view(bits).tolist()
    q = QNAN[name]
    assert out[MIN] == [nz, nz, pz, nz, q, q, q]
    assert out[MAX] == [pz, pz, pz, nz, q, q, q]
    assert out[SUM][4:] == [q, q, q]


def test_fp16_rounds_once_from_fp32():
    # 2048 + 1 is a tie in fp16 (11-bit significand): nearest even is 2048;
    # 2048 + 3 rounds up to 2052. Overflow past 65504 rounds to Inf.
    x = np.array([2048, 2048, 65504, 1e-7], dtype=np.float16)
    y = np.array([1, 3, 65504, 1e-7], dtype=np.float16)
    d = np.empty_like(x)
    hc_reduce(d, x, y, "float16", SUM)
    assert d.tolist()[:3] == [2048.0, 2052.0, np.inf]
    assert d[3] == np.float16(np.float32(x[3]) + np.float32(y[3]))


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_half_matches_torch_arithmetic(name):
    """torch's own half/bfloat16 add/mul/minimum give the same bytes."""
    torch = pytest.importorskip("torch")
    tdt = torch.float16 if name == "float16" else torch.bfloat16
    rng = np.random.default_rng(5)
    x, y = float_pair(rng, 50000, name)
    tx = torch.from_numpy(x.view(np.int16)).view(tdt)
    ty = torch.from_numpy(y.view(np.int16)).view(tdt)
    eq = widen(x, name) == widen(y, name)  # torch leaves the sign of min(+0,-0) open
    for op, fn in ((SUM, torch.add), (PROD, torch.mul), (MIN, torch.minimum), (MAX, torch.maximum)):
        want = canon_nan(fn(tx, ty).view(torch.int16).numpy().view(x.dtype), name)
        d = np.empty_like(x)
        hc_reduce(d, x, y, name, op)
        keep = ~eq if op in (MIN, MAX) else np.ones_like(eq)
        assert_bytes_equal(d[keep], want[keep], f"{name} op={op} vs torch")


# ---- integers and bool ------------------------------------------------------------------------

def test_integer_wraparound():
    cases = [("int8", 127, 1, SUM, -128), ("int8", -128, -1, SUM, 127), ("uint8", 255, 1, SUM, 0),
             ("int16", 300, 300, PROD, 90000 - 65536 * 1), ("int32", 2**31 - 1, 1, SUM, -2**31),
             ("int32", 65536, 65536, PROD, 0), ("int64", 2**63 - 1, 1, SUM, -2**63),
             ("int64", -2**63, -1, PROD, -2**63), ("uint8", 16, 16, PROD, 0),
             ("int8", -128, 127, MIN, -128), ("uint8", 200, 100, MAX, 200)]
    for name, a, b, op, want in cases:
        dt = DTYPES[name][1]
        x, y, d = np.array([a], dt), np.array([b], dt), np.zeros(1, dt)
        assert hc_reduce(d, x, y, name, op) == lib.HC_OK
        assert int(d[0]) == want, (name, a, b, op, int(d[0]))


def test_bool_semantics():
    x = np.array([0, 0, 1, 1, 2, 255, 0, 2], np.uint8)
    y = np.array([0, 1, 0, 1, 0, 0, 128, 2], np.uint8)
    expect = {SUM: [0, 1, 1, 1, 1, 1, 1, 1], MAX: [0, 1, 1, 1, 1, 1, 1, 1],
              BOR: [0, 1, 1, 1, 1, 1, 1, 1], PROD: [0, 0, 0, 1, 0, 0, 0, 1],
              MIN: [0, 0, 0, 1, 0, 0, 0, 1], BAND: [0, 0, 0, 1, 0, 0, 0, 1],
              BXOR: [0, 1, 1, 0, 1, 1, 1, 0]}
    for op, want in expect.items():
        d = np.full(8, 7, np.uint8)
        assert hc_reduce(d, x, y, "bool", op) == lib.HC_OK
        assert d.tolist() == want, op


# ---- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("op", [BAND, BOR, BXOR])
def test_bitwise_on_float_unsupported(name, op):
    x = np.zeros(4, DTYPES[name][1])
    assert hc_reduce(x, x, x, name, op) == lib.HC_ERR_UNSUPPORTED
    dn, on = names(name, op)
    assert dn in last_error() and on in last_error()


def test_avg_on_bool_unsupported():
    x = np.zeros(4, np.uint8)
    assert hc_reduce(x, x, x, "bool", AVG) == lib.HC_ERR_UNSUPPORTED
    dn, on = names("bool", AVG)
    assert dn in last_error() and on in last_error()
    assert hc_divide(x, "bool", 2) == lib.HC_ERR_UNSUPPORTED
    assert dn in last_error()


def test_invalid_arguments():
    x = np.zeros(4, np.float32)
    p = ffi.from_buffer(x)
    for dtype, op in ((-1, SUM), (lib.HC_DTYPE_COUNT, SUM), (99, SUM), (lib.HC_FLOAT32, -1),
                      (lib.HC_FLOAT32, lib.HC_REDOP_COUNT)):
        assert lib.hc_reduce_kernel(p, p, p, 4, dtype, op) == lib.HC_ERR_INVALID_ARGUMENT
        assert last_error()
    for args in ((ffi.NULL, p, p), (p, ffi.NULL, p), (p, p, ffi.NULL)):
        assert lib.hc_reduce_kernel(*args, 4, lib.HC_FLOAT32, SUM) == lib.HC_ERR_INVALID_ARGUMENT
        assert names("float32", SUM)[0] in last_error()
        assert lib.hc_reduce_kernel(*args, 0, lib.HC_FLOAT32, SUM) == lib.HC_OK
    assert lib.hc_reduce_kernel(p, p, p, 2**63, lib.HC_FLOAT32, SUM) == lib.HC_ERR_INVALID_ARGUMENT
    assert lib.hc_divide_kernel(p, 4, lib.HC_FLOAT32, 0) == lib.HC_ERR_INVALID_ARGUMENT
    assert lib.hc_divide_kernel(p, 4, lib.HC_FLOAT32, -3) == lib.HC_ERR_INVALID_ARGUMENT
    assert lib.hc_divide_kernel(p, 4, 42, 2) == lib.HC_ERR_INVALID_ARGUMENT
    assert lib.hc_divide_kernel(ffi.NULL, 4, lib.HC_FLOAT32, 2) == lib.HC_ERR_INVALID_ARGUMENT
    assert lib.hc_divide_kernel(ffi.NULL, 0, lib.HC_FLOAT32, 2) == lib.HC_OK


# ---- divide ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FLOATS)
def test_divide_float_matches_torch(name):
    """AVG's divide equals torch's `sum / n` (true division in fp32/fp64)."""
    torch = pytest.importorskip("torch")
    tdt = {"float32": torch.float32, "float64": torch.float64,
           "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    rng = np.random.default_rng(13)
    for n in (0, 1, 7, 33, 100003):
        x, _ = float_pair(rng, n, name)
        for divisor in (1, 2, 3, 7, 24, 1000):
            ib = np.dtype(BITS[name]).itemsize
            tx = torch.from_numpy(x.view({2: np.int16, 4: np.int32, 8: np.int64}[ib]).copy()).view(tdt)
            want = canon_nan((tx / divisor).view(tx.dtype if ib > 2 else torch.int16).numpy()
                             .view(x.dtype), name)
            d = x.copy()
            assert hc_divide(d, name, divisor) == lib.HC_OK
            assert_bytes_equal(d, want, f"{name} / {divisor} n={n}")


@pytest.mark.parametrize("name", INTS)
def test_divide_int_truncates(name):
    rng = np.random.default_rng(17)
    for n in (0, 1, 7, 33, 100003):
        x, _ = int_pair(rng, n, name)
        for divisor in (1, 2, 3, 7, 127, 128, 1000, 2**31 + 11, 2**62):
            w = x.astype(np.int64)
            q = w // divisor  # floor; C truncates toward zero
            q = np.where((w % divisor != 0) & (w < 0), q + 1, q).astype(x.dtype)
            d = x.copy()
            assert hc_divide(d, name, divisor) == lib.HC_OK
            assert_bytes_equal(d, q, f"{name} / {divisor} n={n}")


# ---- scalar vs AVX2: the same bytes ------------------------------------------------------------

def result_digests(seed=1234):
    """sha256 of every (dtype, op, count) result and of every divide."""
    out = {}
    for name in DTYPES:
        rng = np.random.default_rng([seed, list(DTYPES).index(name)])
        for n in (37, 1000003):
            x, y = make_pair(rng, n, name)
            for op in ALL_OPS:
                if supported(name, op):
                    d = np.empty_like(x)
                    assert hc_reduce(d, x, y, name, op) == lib.HC_OK
                    out[f"{name}/op{op}/n{n}"] = hashlib.sha256(d.tobytes()).hexdigest()
            if name != "bool":
                for divisor in (3, 7):
                    d = x.copy()
                    assert hc_divide(d, name, divisor) == lib.HC_OK
                    out[f"{name}/div{divisor}/n{n}"] = hashlib.sha256(d.tobytes()).hexdigest()
    return out


def digests_in_subprocess(simd):
    env = dict(os.environ)
    env.pop("HETCOMM_SIMD", None)
    if simd:
        env["HETCOMM_SIMD"] = simd
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--digests"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_scalar_and_avx2_bit_identical():
    scalar = digests_in_subprocess("scalar")
    assert scalar["level"] == "scalar"
    native = digests_in_subprocess(None)
    if native["level"] != "avx2":
        pytest.skip(f"no AVX2 path on this CPU (level {native['level']})")
    bad = sorted(k for k in scalar["digests"] if scalar["digests"][k] != native["digests"][k])
    assert not bad, f"scalar and AVX2 results differ: {bad}"


if __name__ == "__main__" and "--digests" in sys.argv:
    print(json.dumps({"level": ffi.string(lib.hc_simd_level()).decode(),
                      "digests": result_digests()}))
