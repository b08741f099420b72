/*
 * Element-wise reductions (dst = a op b) and the divide step of AVG.
 *
 * Every path gives the same bytes, because ranks that run different paths
 * (an AVX2 host beside an older or non-x86 one) must end a collective with
 * bit-identical tensors:
 *   - fp16/bf16 are widened to fp32, computed, and rounded once (nearest
 *     even), as torch does for `(a.float() + b.float()).half()`.
 *   - Any float result that is NaN is the canonical quiet NaN of its dtype.
 *     IEEE leaves the payload of a NaN result open and x86 picks it from
 *     operand order, which the compiler is free to swap; canonical NaNs also
 *     make a op b == b op a bit for bit, which recursive doubling relies on.
 *   - MIN/MAX: NaN wins (torch.minimum); min(+0,-0) = -0 and max = +0 in
 *     either order, for the same reason.
 *   - Integers wrap (computed unsigned, so no UB); bool bytes are read as
 *     nonzero = true and written as 0/1.
 * No alignment is required: buffers can be slices of received messages.
 *
 * Paths: "base" is portable C (plain loops for floats, GCC vector-extension
 * loops for integers, which lower to SSE2 on x86-64 and NEON on arm64); the
 * AVX2 path uses intrinsics for floats and the same integer loops compiled
 * for AVX2. hc_cpu_level_get() picks one per call.
 */
#include <stdint.h>
#include <string.h>

#include "core/errors.h"
#include "hetcomm.h"
#include "kernels/cpu.h"
#include "kernels/half.h"

typedef void (*hc_binop_fn)(void *dst, const void *a, const void *b, size_t n);
typedef void (*hc_divop_fn)(void *buf, size_t n, int64_t divisor);

#define HC_QNAN_F32 0x7fc00000u
#define HC_QNAN_F64 0x7ff8000000000000ull

/* ---- scalar float semantics (the reference every path matches) ---------- */

static inline uint64_t hc_f64_bits(double d) {
    uint64_t u;
    memcpy(&u, &d, 8);
    return u;
}

static inline double hc_bits_f64(uint64_t u) {
    double d;
    memcpy(&d, &u, 8);
    return d;
}

static inline float hc_canon_f32(float r) { return r != r ? hc_bits_f32(HC_QNAN_F32) : r; }
static inline double hc_canon_f64(double r) { return r != r ? hc_bits_f64(HC_QNAN_F64) : r; }

static inline float hc_sum_f32(float a, float b) { return hc_canon_f32(a + b); }
static inline float hc_prod_f32(float a, float b) { return hc_canon_f32(a * b); }
static inline double hc_sum_f64(double a, double b) { return hc_canon_f64(a + b); }
static inline double hc_prod_f64(double a, double b) { return hc_canon_f64(a * b); }

/* Equal operands differ at most in the sign of zero: OR of the bits keeps
 * -0 for min, AND keeps +0 for max. */
static inline float hc_min_f32(float a, float b) {
    if (a != a || b != b) return hc_bits_f32(HC_QNAN_F32);
    if (a == b) return hc_bits_f32(hc_f32_bits(a) | hc_f32_bits(b));
    return a < b ? a : b;
}

static inline float hc_max_f32(float a, float b) {
    if (a != a || b != b) return hc_bits_f32(HC_QNAN_F32);
    if (a == b) return hc_bits_f32(hc_f32_bits(a) & hc_f32_bits(b));
    return a > b ? a : b;
}

static inline double hc_min_f64(double a, double b) {
    if (a != a || b != b) return hc_bits_f64(HC_QNAN_F64);
    if (a == b) return hc_bits_f64(hc_f64_bits(a) | hc_f64_bits(b));
    return a < b ? a : b;
}

static inline double hc_max_f64(double a, double b) {
    if (a != a || b != b) return hc_bits_f64(HC_QNAN_F64);
    if (a == b) return hc_bits_f64(hc_f64_bits(a) & hc_f64_bits(b));
    return a > b ? a : b;
}

/* Element loads/stores through memcpy: no alignment assumed, and the
 * vectorizer cannot assume any either. */
static inline float hc_ld_f32(const uint8_t *p) { float v; memcpy(&v, p, 4); return v; }
static inline double hc_ld_f64(const uint8_t *p) { double v; memcpy(&v, p, 8); return v; }
static inline uint16_t hc_ld_u16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline void hc_st_f32(uint8_t *p, float v) { memcpy(p, &v, 4); }
static inline void hc_st_f64(uint8_t *p, double v) { memcpy(p, &v, 8); }
static inline void hc_st_u16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }

static inline float hc_ld_f16(const uint8_t *p) { return hc_f16_to_f32(hc_ld_u16(p)); }
static inline float hc_ld_bf16(const uint8_t *p) { return hc_bf16_to_f32(hc_ld_u16(p)); }
static inline void hc_st_f16(uint8_t *p, float v) { hc_st_u16(p, hc_f32_to_f16(v)); }
static inline void hc_st_bf16(uint8_t *p, float v) { hc_st_u16(p, hc_f32_to_bf16(v)); }

/* One loop per (storage format, op). Each iteration loads both operands
 * before storing, so dst may be a or b. */
#define HC_SCALAR_BINOP(NAME, ESZ, LD, ST, OP)                                      \
    static void NAME(void *dst, const void *pa, const void *pb, size_t n) {         \
        uint8_t *d = dst;                                                           \
        const uint8_t *a = pa, *b = pb;                                             \
        for (size_t i = 0; i < n; i++) ST(d + i * (ESZ), OP(LD(a + i * (ESZ)), LD(b + i * (ESZ)))); \
    }

#define HC_SCALAR_FLOAT_OPS(T, ESZ, LD, ST, W)                       \
    HC_SCALAR_BINOP(hc_sum_##T##_base, ESZ, LD, ST, hc_sum_##W)      \
    HC_SCALAR_BINOP(hc_prod_##T##_base, ESZ, LD, ST, hc_prod_##W)    \
    HC_SCALAR_BINOP(hc_min_##T##_base, ESZ, LD, ST, hc_min_##W)      \
    HC_SCALAR_BINOP(hc_max_##T##_base, ESZ, LD, ST, hc_max_##W)

HC_SCALAR_FLOAT_OPS(f32, 4, hc_ld_f32, hc_st_f32, f32)
HC_SCALAR_FLOAT_OPS(f64, 8, hc_ld_f64, hc_st_f64, f64)
HC_SCALAR_FLOAT_OPS(f16, 2, hc_ld_f16, hc_st_f16, f32)
HC_SCALAR_FLOAT_OPS(bf16, 2, hc_ld_bf16, hc_st_bf16, f32)

/* ---- integer and bool loops (GCC vector extensions) --------------------- */

/* 32-byte generic vectors: one AVX2 register, two SSE2/NEON registers. */
typedef uint8_t hc_u8v __attribute__((vector_size(32)));
typedef int8_t hc_i8v __attribute__((vector_size(32)));
typedef uint16_t hc_u16v __attribute__((vector_size(32)));
typedef int16_t hc_i16v __attribute__((vector_size(32)));
typedef uint32_t hc_u32v __attribute__((vector_size(32)));
typedef int32_t hc_i32v __attribute__((vector_size(32)));
typedef uint64_t hc_u64v __attribute__((vector_size(32)));
typedef int64_t hc_i64v __attribute__((vector_size(32)));

/* EXPR combines vectors x and y of type V. Works on bytes: every op is
 * element-wise and the element size divides the vector size. The tail goes
 * through zero-padded temporaries so it runs the very same EXPR. */
#define HC_VEC_BINOP(NAME, ATTR, V, ESZ, EXPR)                                   \
    ATTR static void NAME(void *dst, const void *pa, const void *pb, size_t n) { \
        uint8_t *d = dst;                                                        \
        const uint8_t *a = pa, *b = pb;                                          \
        const size_t bytes = n * (ESZ), w = sizeof(V);                           \
        size_t off = 0;                                                          \
        for (; off + 2 * w <= bytes; off += 2 * w) {                             \
            V x, y, x1, y1, r, r1;                                               \
            memcpy(&x, a + off, w);                                              \
            memcpy(&y, b + off, w);                                              \
            memcpy(&x1, a + off + w, w);                                         \
            memcpy(&y1, b + off + w, w);                                         \
            r = (EXPR);                                                          \
            { V x = x1, y = y1; r1 = (EXPR); } /* EXPR names x, y: rebind */     \
            memcpy(d + off, &r, w);                                              \
            memcpy(d + off + w, &r1, w);                                         \
        }                                                                        \
        for (; off < bytes; off += w) {                                          \
            size_t len = bytes - off < w ? bytes - off : w;                      \
            V x = {0}, y = {0}, r;                                               \
            memcpy(&x, a + off, len);                                            \
            memcpy(&y, b + off, len);                                            \
            r = (EXPR);                                                          \
            memcpy(d + off, &r, len);                                            \
        }                                                                        \
    }

/* x op y with a mask from a comparison (vector ?: is C++ only). */
#define HC_VSEL(V, m, p, q) (((V)(m) & (p)) | (~(V)(m) & (q)))
#define HC_VMIN(V) HC_VSEL(V, x < y, x, y)
#define HC_VMAX(V) HC_VSEL(V, x > y, x, y)
#define HC_VTRUE(V, e) ((V)(e) & 1)

#if defined(HC_X86)
#define HC_AVX2 __attribute__((target("avx2,f16c")))
#define HC_VEC_BINOP2(NAME, V, ESZ, EXPR)             \
    HC_VEC_BINOP(NAME##_base, , V, ESZ, EXPR)         \
    HC_VEC_BINOP(NAME##_avx2, HC_AVX2, V, ESZ, EXPR)
#else
#define HC_VEC_BINOP2(NAME, V, ESZ, EXPR) HC_VEC_BINOP(NAME##_base, , V, ESZ, EXPR)
#endif

/* Sums and products in unsigned lanes (wraparound), min/max in the dtype's
 * own signedness, bitwise ops on unsigned lanes. */
#define HC_INT_OPS(T, UV, SV, ESZ)                     \
    HC_VEC_BINOP2(hc_sum_##T, UV, ESZ, x + y)          \
    HC_VEC_BINOP2(hc_prod_##T, UV, ESZ, x * y)         \
    HC_VEC_BINOP2(hc_min_##T, SV, ESZ, HC_VMIN(SV))    \
    HC_VEC_BINOP2(hc_max_##T, SV, ESZ, HC_VMAX(SV))    \
    HC_VEC_BINOP2(hc_band_##T, UV, ESZ, x & y)         \
    HC_VEC_BINOP2(hc_bor_##T, UV, ESZ, x | y)          \
    HC_VEC_BINOP2(hc_bxor_##T, UV, ESZ, x ^ y)

HC_INT_OPS(i8, hc_u8v, hc_i8v, 1)
HC_INT_OPS(i16, hc_u16v, hc_i16v, 2)
HC_INT_OPS(i32, hc_u32v, hc_i32v, 4)
HC_INT_OPS(i64, hc_u64v, hc_i64v, 8)
HC_INT_OPS(u8, hc_u8v, hc_u8v, 1)

HC_VEC_BINOP2(hc_or_bool, hc_u8v, 1, HC_VTRUE(hc_u8v, (x | y) != 0))
HC_VEC_BINOP2(hc_and_bool, hc_u8v, 1, HC_VTRUE(hc_u8v, (x != 0) & (y != 0)))
HC_VEC_BINOP2(hc_xor_bool, hc_u8v, 1, HC_VTRUE(hc_u8v, (x != 0) ^ (y != 0)))

/* ---- AVX2 float kernels ------------------------------------------------- */

#if defined(HC_X86)

HC_AVX2 static inline __m256 hc_v_qnan_ps(void) { return _mm256_castsi256_ps(_mm256_set1_epi32((int)HC_QNAN_F32)); }
HC_AVX2 static inline __m256d hc_v_qnan_pd(void) { return _mm256_castsi256_pd(_mm256_set1_epi64x((long long)HC_QNAN_F64)); }

HC_AVX2 static inline __m256 hc_v_canon_ps(__m256 r) {
    return _mm256_blendv_ps(r, hc_v_qnan_ps(), _mm256_cmp_ps(r, r, _CMP_UNORD_Q));
}

HC_AVX2 static inline __m256d hc_v_canon_pd(__m256d r) {
    return _mm256_blendv_pd(r, hc_v_qnan_pd(), _mm256_cmp_pd(r, r, _CMP_UNORD_Q));
}

HC_AVX2 static inline __m256 hc_v_sum_ps(__m256 x, __m256 y) { return hc_v_canon_ps(_mm256_add_ps(x, y)); }
HC_AVX2 static inline __m256 hc_v_prod_ps(__m256 x, __m256 y) { return hc_v_canon_ps(_mm256_mul_ps(x, y)); }
HC_AVX2 static inline __m256d hc_v_sum_pd(__m256d x, __m256d y) { return hc_v_canon_pd(_mm256_add_pd(x, y)); }
HC_AVX2 static inline __m256d hc_v_prod_pd(__m256d x, __m256d y) { return hc_v_canon_pd(_mm256_mul_pd(x, y)); }

/* vminps/vmaxps return the second operand on equal or unordered inputs:
 * fix up equal lanes (OR/AND of the bits, as hc_min_f32 does), then NaN. */
HC_AVX2 static inline __m256 hc_v_min_ps(__m256 x, __m256 y) {
    __m256 r = _mm256_blendv_ps(_mm256_min_ps(x, y), _mm256_or_ps(x, y), _mm256_cmp_ps(x, y, _CMP_EQ_OQ));
    return _mm256_blendv_ps(r, hc_v_qnan_ps(), _mm256_cmp_ps(x, y, _CMP_UNORD_Q));
}

HC_AVX2 static inline __m256 hc_v_max_ps(__m256 x, __m256 y) {
    __m256 r = _mm256_blendv_ps(_mm256_max_ps(x, y), _mm256_and_ps(x, y), _mm256_cmp_ps(x, y, _CMP_EQ_OQ));
    return _mm256_blendv_ps(r, hc_v_qnan_ps(), _mm256_cmp_ps(x, y, _CMP_UNORD_Q));
}

HC_AVX2 static inline __m256d hc_v_min_pd(__m256d x, __m256d y) {
    __m256d r = _mm256_blendv_pd(_mm256_min_pd(x, y), _mm256_or_pd(x, y), _mm256_cmp_pd(x, y, _CMP_EQ_OQ));
    return _mm256_blendv_pd(r, hc_v_qnan_pd(), _mm256_cmp_pd(x, y, _CMP_UNORD_Q));
}

HC_AVX2 static inline __m256d hc_v_max_pd(__m256d x, __m256d y) {
    __m256d r = _mm256_blendv_pd(_mm256_max_pd(x, y), _mm256_and_pd(x, y), _mm256_cmp_pd(x, y, _CMP_EQ_OQ));
    return _mm256_blendv_pd(r, hc_v_qnan_pd(), _mm256_cmp_pd(x, y, _CMP_UNORD_Q));
}

#define HC_LD_PS(p) _mm256_loadu_ps((const float *)(p))
#define HC_ST_PS(p, v) _mm256_storeu_ps((float *)(p), v)
#define HC_LD_PD(p) _mm256_loadu_pd((const double *)(p))
#define HC_ST_PD(p, v) _mm256_storeu_pd((double *)(p), v)
#define HC_LD_PH(p) hc_load8_f16((const uint16_t *)(p))
#define HC_ST_PH(p, v) hc_store8_f16((uint16_t *)(p), v)
#define HC_LD_BH(p) hc_load8_bf16((const uint16_t *)(p))
#define HC_ST_BH(p, v) hc_store8_bf16((uint16_t *)(p), v)

/* A vector holds LANES elements of ESZ bytes in memory. Four vectors an
 * iteration keep enough loads in flight for a 3-stream op to reach memory
 * bandwidth; the tail goes through zero-padded temporaries so that it runs
 * the same vector code. All loads of an iteration come before its stores
 * and iterations touch disjoint elements, so dst may be a or b. */
#define HC_AVX2_BINOP(NAME, VT, LANES, ESZ, LD, ST, OP)                                          \
    HC_AVX2 static void NAME(void *dst, const void *pa, const void *pb, size_t n) {              \
        uint8_t *d = dst;                                                                        \
        const uint8_t *a = pa, *b = pb;                                                          \
        const size_t w = (LANES) * (ESZ);                                                        \
        size_t i = 0;                                                                            \
        for (; i + 4 * (LANES) <= n; i += 4 * (LANES)) {                                         \
            const size_t o = i * (ESZ);                                                          \
            VT x0 = LD(a + o), x1 = LD(a + o + w), x2 = LD(a + o + 2 * w), x3 = LD(a + o + 3 * w); \
            VT y0 = LD(b + o), y1 = LD(b + o + w), y2 = LD(b + o + 2 * w), y3 = LD(b + o + 3 * w); \
            ST(d + o, OP(x0, y0));                                                               \
            ST(d + o + w, OP(x1, y1));                                                           \
            ST(d + o + 2 * w, OP(x2, y2));                                                       \
            ST(d + o + 3 * w, OP(x3, y3));                                                       \
        }                                                                                        \
        for (; i + (LANES) <= n; i += (LANES))                                                   \
            ST(d + i * (ESZ), OP(LD(a + i * (ESZ)), LD(b + i * (ESZ))));                         \
        if (i < n) {                                                                             \
            uint8_t tx[32] = {0}, ty[32] = {0}, tr[32];                                          \
            const size_t len = (n - i) * (ESZ);                                                  \
            memcpy(tx, a + i * (ESZ), len);                                                      \
            memcpy(ty, b + i * (ESZ), len);                                                      \
            ST(tr, OP(LD(tx), LD(ty)));                                                          \
            memcpy(d + i * (ESZ), tr, len);                                                      \
        }                                                                                        \
    }

#define HC_AVX2_FLOAT_OPS(T, VT, LANES, ESZ, LD, ST, W)                           \
    HC_AVX2_BINOP(hc_sum_##T##_avx2, VT, LANES, ESZ, LD, ST, hc_v_sum_##W)   \
    HC_AVX2_BINOP(hc_prod_##T##_avx2, VT, LANES, ESZ, LD, ST, hc_v_prod_##W) \
    HC_AVX2_BINOP(hc_min_##T##_avx2, VT, LANES, ESZ, LD, ST, hc_v_min_##W)   \
    HC_AVX2_BINOP(hc_max_##T##_avx2, VT, LANES, ESZ, LD, ST, hc_v_max_##W)

HC_AVX2_FLOAT_OPS(f32, __m256, 8, 4, HC_LD_PS, HC_ST_PS, ps)
HC_AVX2_FLOAT_OPS(f64, __m256d, 4, 8, HC_LD_PD, HC_ST_PD, pd)
HC_AVX2_FLOAT_OPS(f16, __m256, 8, 2, HC_LD_PH, HC_ST_PH, ps)

/* bf16, 16 elements a register. Unpacking against zero turns each bf16
 * into its fp32 bits, elements 0-3 and 8-11 in lo and 4-7, 12-15 in hi;
 * packus puts them back in exactly that order, so no lane permutes. */

/* Round to nearest even and keep the high half. Inputs come from the
 * canonicalizing ops, so the only NaN is 0x7fc00000, which this maps to the
 * canonical 0x7fc0: no NaN case needed, unlike hc_store8_bf16. */
HC_AVX2 static inline __m256i hc_v_round_bf16(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
}

#define HC_BF16_LO(v) _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), v))
#define HC_BF16_HI(v) _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), v))
#define HC_V_BF16(OPNAME)                                                                 \
    HC_AVX2 static inline __m256i hc_v_##OPNAME##_bf16(__m256i x, __m256i y) {            \
        __m256i lo = hc_v_round_bf16(hc_v_##OPNAME##_ps(HC_BF16_LO(x), HC_BF16_LO(y)));   \
        __m256i hi = hc_v_round_bf16(hc_v_##OPNAME##_ps(HC_BF16_HI(x), HC_BF16_HI(y)));   \
        return _mm256_packus_epi32(lo, hi);                                               \
    }

HC_V_BF16(sum)
HC_V_BF16(prod)
HC_V_BF16(min)
HC_V_BF16(max)

#define HC_LD_SI(p) _mm256_loadu_si256((const __m256i *)(p))
#define HC_ST_SI(p, v) _mm256_storeu_si256((__m256i *)(p), v)

HC_AVX2_FLOAT_OPS(bf16, __m256i, 16, 2, HC_LD_SI, HC_ST_SI, bf16)

#endif /* HC_X86 */

/* ---- divide (the second half of AVG) ------------------------------------ */

/* True division in the accumulation precision, as torch's `sum / n`. */
#define HC_SCALAR_DIV(NAME, ESZ, LD, ST, DT, CANON)                  \
    static void NAME(void *buf, size_t n, int64_t divisor) {         \
        uint8_t *p = buf;                                            \
        const DT dv = (DT)divisor;                                   \
        for (size_t i = 0; i < n; i++) ST(p + i * (ESZ), CANON(LD(p + i * (ESZ)) / dv)); \
    }

HC_SCALAR_DIV(hc_div_f32_base, 4, hc_ld_f32, hc_st_f32, float, hc_canon_f32)
HC_SCALAR_DIV(hc_div_f64_base, 8, hc_ld_f64, hc_st_f64, double, hc_canon_f64)
HC_SCALAR_DIV(hc_div_f16_base, 2, hc_ld_f16, hc_st_f16, float, hc_canon_f32)
HC_SCALAR_DIV(hc_div_bf16_base, 2, hc_ld_bf16, hc_st_bf16, float, hc_canon_f32)

/* Truncating integer division. Up to 32 bits it goes through double, which
 * vectorizes and is exact: |v| < 2^31 keeps the rounding error of v/d below
 * 1/d, the least distance from a non-integer quotient to an integer. */
#define HC_INT_DIV(NAME, ATTR, T, Q)                                 \
    ATTR static void NAME(void *buf, size_t n, int64_t divisor) {    \
        uint8_t *p = buf;                                            \
        const Q dv = (Q)divisor;                                     \
        for (size_t i = 0; i < n; i++) {                             \
            T v;                                                     \
            memcpy(&v, p + i * sizeof(T), sizeof(T));                \
            v = (T)((Q)v / dv);                                      \
            memcpy(p + i * sizeof(T), &v, sizeof(T));                \
        }                                                            \
    }

#if defined(HC_X86)
#define HC_INT_DIV2(T, CT, Q)                            \
    HC_INT_DIV(hc_div_##T##_base, , CT, Q)               \
    HC_INT_DIV(hc_div_##T##_avx2, HC_AVX2, CT, Q)
#else
#define HC_INT_DIV2(T, CT, Q) HC_INT_DIV(hc_div_##T##_base, , CT, Q)
#endif

HC_INT_DIV2(i8, int8_t, double)
HC_INT_DIV2(i16, int16_t, double)
HC_INT_DIV2(i32, int32_t, double)
HC_INT_DIV2(i64, int64_t, int64_t)
HC_INT_DIV2(u8, uint8_t, double)

#if defined(HC_X86)

#define HC_AVX2_DIV(NAME, VT, LANES, ESZ, LD, ST, DT, SET1, DIV, CANON)     \
    HC_AVX2 static void NAME(void *buf, size_t n, int64_t divisor) {        \
        uint8_t *p = buf;                                                   \
        const VT dv = SET1((DT)divisor);                                    \
        size_t i = 0;                                                       \
        for (; i + (LANES) <= n; i += (LANES))                              \
            ST(p + i * (ESZ), CANON(DIV(LD(p + i * (ESZ)), dv)));           \
        if (i < n) {                                                        \
            uint8_t t[32] = {0};                                            \
            const size_t len = (n - i) * (ESZ);                             \
            memcpy(t, p + i * (ESZ), len);                                  \
            ST(t, CANON(DIV(LD(t), dv)));                                   \
            memcpy(p + i * (ESZ), t, len);                                  \
        }                                                                   \
    }

HC_AVX2_DIV(hc_div_f32_avx2, __m256, 8, 4, HC_LD_PS, HC_ST_PS, float, _mm256_set1_ps, _mm256_div_ps, hc_v_canon_ps)
HC_AVX2_DIV(hc_div_f64_avx2, __m256d, 4, 8, HC_LD_PD, HC_ST_PD, double, _mm256_set1_pd, _mm256_div_pd, hc_v_canon_pd)
HC_AVX2_DIV(hc_div_f16_avx2, __m256, 8, 2, HC_LD_PH, HC_ST_PH, float, _mm256_set1_ps, _mm256_div_ps, hc_v_canon_ps)
HC_AVX2_DIV(hc_div_bf16_avx2, __m256, 8, 2, HC_LD_BH, HC_ST_BH, float, _mm256_set1_ps, _mm256_div_ps, hc_v_canon_ps)

#endif /* HC_X86 */

/* ---- dispatch tables ----------------------------------------------------- */

/* NULL marks an unsupported (dtype, op): bitwise ops on floats, AVG on bool. */
#define HC_FLOAT_ROW(T, S)                                                         \
    { [HC_SUM] = hc_sum_##T##_##S, [HC_AVG] = hc_sum_##T##_##S, [HC_PROD] = hc_prod_##T##_##S, \
      [HC_MIN] = hc_min_##T##_##S, [HC_MAX] = hc_max_##T##_##S }

#define HC_INT_ROW(T, S)                                                           \
    { [HC_SUM] = hc_sum_##T##_##S, [HC_AVG] = hc_sum_##T##_##S, [HC_PROD] = hc_prod_##T##_##S, \
      [HC_MIN] = hc_min_##T##_##S, [HC_MAX] = hc_max_##T##_##S,                  \
      [HC_BAND] = hc_band_##T##_##S, [HC_BOR] = hc_bor_##T##_##S, [HC_BXOR] = hc_bxor_##T##_##S }

/* On bools SUM/MAX are "any", PROD/MIN "all", as torch computes them. */
#define HC_BOOL_ROW(S)                                                             \
    { [HC_SUM] = hc_or_bool_##S, [HC_PROD] = hc_and_bool_##S, [HC_MIN] = hc_and_bool_##S, \
      [HC_MAX] = hc_or_bool_##S, [HC_BAND] = hc_and_bool_##S, [HC_BOR] = hc_or_bool_##S,  \
      [HC_BXOR] = hc_xor_bool_##S }

#define HC_OPS_TABLE(S)                                                            \
    { [HC_FLOAT32] = HC_FLOAT_ROW(f32, S), [HC_FLOAT64] = HC_FLOAT_ROW(f64, S),    \
      [HC_FLOAT16] = HC_FLOAT_ROW(f16, S), [HC_BFLOAT16] = HC_FLOAT_ROW(bf16, S),  \
      [HC_INT8] = HC_INT_ROW(i8, S), [HC_INT16] = HC_INT_ROW(i16, S),              \
      [HC_INT32] = HC_INT_ROW(i32, S), [HC_INT64] = HC_INT_ROW(i64, S),            \
      [HC_UINT8] = HC_INT_ROW(u8, S), [HC_BOOL] = HC_BOOL_ROW(S) }

#define HC_DIV_TABLE(S)                                                            \
    { [HC_FLOAT32] = hc_div_f32_##S, [HC_FLOAT64] = hc_div_f64_##S,                \
      [HC_FLOAT16] = hc_div_f16_##S, [HC_BFLOAT16] = hc_div_bf16_##S,              \
      [HC_INT8] = hc_div_i8_##S, [HC_INT16] = hc_div_i16_##S,                      \
      [HC_INT32] = hc_div_i32_##S, [HC_INT64] = hc_div_i64_##S,                    \
      [HC_UINT8] = hc_div_u8_##S }

/* Indexed by hc_cpu_level. */
static const hc_binop_fn hc_reduce_ops[][HC_DTYPE_COUNT][HC_REDOP_COUNT] = {
    [HC_CPU_SCALAR] = HC_OPS_TABLE(base),
#if defined(HC_X86)
    [HC_CPU_AVX2] = HC_OPS_TABLE(avx2),
#endif
};

static const hc_divop_fn hc_divide_ops[][HC_DTYPE_COUNT] = {
    [HC_CPU_SCALAR] = HC_DIV_TABLE(base),
#if defined(HC_X86)
    [HC_CPU_AVX2] = HC_DIV_TABLE(avx2),
#endif
};

static int hc_reduce_level(void) {
    int level = (int)hc_cpu_level_get();
    const int levels = (int)(sizeof(hc_reduce_ops) / sizeof(hc_reduce_ops[0]));
    return level < levels ? level : HC_CPU_SCALAR;
}

/* ---- public entry points -------------------------------------------------- */

static int hc_valid_dtype(int dtype) { return dtype >= 0 && dtype < HC_DTYPE_COUNT; }
static int hc_valid_redop(int op) { return op >= 0 && op < HC_REDOP_COUNT; }

/* count elements of dtype must be addressable; a wrapped product would make
 * the kernels read far less than the caller meant. */
static int hc_count_fits(size_t count, int dtype) {
    size_t esz = hc_dtype_size(dtype);
    return esz == 0 || count <= SIZE_MAX / esz;
}

int hc_reduce_kernel(void *dst, const void *a, const void *b, size_t count, int dtype,
                     int redop) {
    if (!hc_valid_dtype(dtype) || !hc_valid_redop(redop)) {
        hc_set_last_error("hc_reduce_kernel: invalid %s %d",
                          hc_valid_dtype(dtype) ? "reduction op" : "dtype",
                          hc_valid_dtype(dtype) ? redop : dtype);
        return HC_ERR_INVALID_ARGUMENT;
    }
    hc_binop_fn fn = hc_reduce_ops[hc_reduce_level()][dtype][redop];
    if (!fn) {
        hc_set_last_error("hc_reduce_kernel: reduction %s is not supported for dtype %s",
                          hc_redop_name(redop), hc_dtype_name(dtype));
        return HC_ERR_UNSUPPORTED;
    }
    if (count == 0) return HC_OK;
    if (!dst || !a || !b || !hc_count_fits(count, dtype)) {
        hc_set_last_error("hc_reduce_kernel: %s for %zu %s elements (%s op)",
                          hc_count_fits(count, dtype) ? "NULL buffer" : "count overflows size_t",
                          count, hc_dtype_name(dtype), hc_redop_name(redop));
        return HC_ERR_INVALID_ARGUMENT;
    }
    fn(dst, a, b, count);
    return HC_OK;
}

int hc_divide_kernel(void *buf, size_t count, int dtype, int64_t divisor) {
    if (!hc_valid_dtype(dtype)) {
        hc_set_last_error("hc_divide_kernel: invalid dtype %d", dtype);
        return HC_ERR_INVALID_ARGUMENT;
    }
    hc_divop_fn fn = hc_divide_ops[hc_reduce_level()][dtype];
    if (!fn) {
        hc_set_last_error("hc_divide_kernel: division (%s) is not supported for dtype %s",
                          hc_redop_name(HC_AVG), hc_dtype_name(dtype));
        return HC_ERR_UNSUPPORTED;
    }
    if (divisor <= 0) {
        hc_set_last_error("hc_divide_kernel: divisor %lld must be positive (dtype %s)",
                          (long long)divisor, hc_dtype_name(dtype));
        return HC_ERR_INVALID_ARGUMENT;
    }
    if (count == 0) return HC_OK;
    if (!buf || !hc_count_fits(count, dtype)) {
        hc_set_last_error("hc_divide_kernel: %s for %zu %s elements",
                          buf ? "count overflows size_t" : "NULL buffer", count,
                          hc_dtype_name(dtype));
        return HC_ERR_INVALID_ARGUMENT;
    }
    fn(buf, count, divisor);
    return HC_OK;
}
