/*
 * Gradient codecs: what quant.c (API, validation, dispatch), quant_scalar.c
 * and quant_avx2.c share. Not public.
 *
 * Bit-identity rule. Ranks on different CPUs must encode and decode the same
 * bytes, so every value that reaches the wire is computed by the helpers in
 * this file, or by AVX2 code that performs the same IEEE operations in the
 * same order:
 *   - no FMA (a fused multiply-add rounds once where the scalar code rounds
 *     twice). GCC contracts a*b+c into FMA by default in gnu11 mode, even
 *     across intrinsics, and even in the scalar file on targets where FMA is
 *     baseline (aarch64 hosts of Ascend cards). This header turns contraction
 *     off for the rest of the file (every codec source includes it first),
 *     and the AVX2 functions are compiled without the "fma" target.
 *   - 1/scale is one fp32 division, done once per block by hc_q_inverse();
 *   - sums whose order matters (the 1-bit mean) use a fixed lane order
 *     (element j of a block goes to lane j % 32, fixed reduction tree).
 *   - rounding to an integer: see hc_q_level().
 * NaN payloads are not part of the promise (block codecs write one
 * canonical NaN scale; casts keep whatever payload the conversion gives).
 *
 * Layout of an encoded block codec run of `count` elements:
 *   [scale of block 0] ... [scale of block nblocks-1]   fp32 or fp16 each
 *   [values]: int8: one byte per element
 *             int4: element 2k in the low nibble of byte k, 2k+1 in the
 *                   high nibble, two's complement; a final odd nibble is 0
 *             1bit: element 8k+j is bit j of byte k; padding bits are 0
 * Values form one stream over the whole run (a block of odd length shares
 * a byte with the next one).
 */
#ifndef HC_QUANT_IMPL_H
#define HC_QUANT_IMPL_H

#if defined(__clang__)
#define HC_QUANT_NO_CONTRACT _Pragma("STDC FP_CONTRACT OFF")
#elif defined(__GNUC__)
#define HC_QUANT_NO_CONTRACT _Pragma("GCC optimize(\"fp-contract=off\")")
#else
#define HC_QUANT_NO_CONTRACT
#endif
/* Before any include, so inline helpers from headers are covered too. */
HC_QUANT_NO_CONTRACT

#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "hetcomm.h"
#include "kernels/half.h"

/* x87 keeps float temporaries in extended precision, so results would
 * depend on register spills: ranks could disagree. */
#if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD != 0
#error "the codec kernels need FLT_EVAL_METHOD == 0 (SSE2 or another IEEE single/double FPU)"
#endif

/* For kernels written once over (codec, mode) and specialised by constant
 * arguments at each call site. */
#if defined(__GNUC__)
#define HC_Q_INLINE static inline __attribute__((always_inline))
#else
#define HC_Q_INLINE static inline
#endif

/* Where a block's fp32 input v comes from. */
enum {
    HC_QIN_SRC = 0, /* v = src[i] */
    HC_QIN_EF = 1,  /* v = src[i] + residual[i]; residual[i] = v - decode */
    HC_QIN_HOP = 2, /* v = decode(in)[i] + local[i]; sum_out[i] = v */
    HC_QIN_COUNT = 3
};

/* One call's buffers and parameters, shared by every block. */
typedef struct hc_qctx {
    int codec;
    size_t count;
    size_t block;
    size_t nblocks;
    int scale_fp32;

    const float *src;          /* HC_QIN_SRC, HC_QIN_EF */
    float *residual;           /* HC_QIN_EF */
    const uint8_t *in_scales;  /* HC_QIN_HOP and decode: the encoded input */
    const uint8_t *in_vals;
    const float *local;        /* HC_QIN_HOP */
    float *sum_out;            /* HC_QIN_HOP; may be NULL */

    uint8_t *out_scales;       /* encode / hop output */
    uint8_t *out_vals;
    float *out;                /* decode target (set or accumulate) */

    int sr;                    /* stochastic rounding (int8/int4) */
    uint32_t sr_k0, sr_k1;     /* key words derived from the seed */
    uint64_t sr_offset;        /* tensor index of element 0 of this call */
} hc_qctx;

static inline size_t hc_q_block_len(const hc_qctx *c, size_t b) {
    size_t i0 = b * c->block;
    size_t left = c->count - i0;
    return left < c->block ? left : c->block;
}

static inline float hc_q_qmax(int codec) { return codec == HC_CODEC_INT8 ? 127.0f : 7.0f; }

/* ---- scales ---- */

static inline float hc_q_scale_get(const uint8_t *scales, size_t b, int fp32) {
    if (fp32) {
        float s;
        memcpy(&s, scales + 4 * b, 4);
        return s;
    }
    uint16_t h;
    memcpy(&h, scales + 2 * b, 2);
    return hc_f16_to_f32(h);
}

/* Stores `s` exactly as given (the caller has made it representable). */
static inline void hc_q_scale_put_bits(uint8_t *scales, size_t b, int fp32, float s, uint16_t h) {
    if (fp32)
        memcpy(scales + 4 * b, &s, 4);
    else
        memcpy(scales + 2 * b, &h, 2);
}

/* A block that held NaN or Inf: a NaN scale makes every element decode to
 * NaN, whatever its value bits are. */
static inline void hc_q_scale_put_nan(uint8_t *scales, size_t b, int fp32) {
    hc_q_scale_put_bits(scales, b, fp32, hc_bits_f32(0x7fc00000u), 0x7e00u);
}

/* fp16 scales are rounded up so that |x| / scale never exceeds qmax, and
 * saturate at 65504: a scale beyond fp16's range (int8: absmax > ~8.3e6,
 * int4: > ~4.6e5) clips that block's values to +-qmax*65504 instead of
 * turning finite gradients into Inf/NaN or failing the collective mid-ring;
 * with error feedback the clipped part stays in the residual. fp32 scales
 * (the default) never clip. */
static inline uint16_t hc_q_f16_up(float s) {
    uint16_t h = hc_f32_to_f16(s);
    if (hc_f16_to_f32(h) < s) h++; /* next fp16 up; s >= 0 so bits order as values */
    return h >= 0x7c00u ? (uint16_t)0x7bffu : h;
}

/* Scale of an int8/int4 block with finite absmax `amax`; stores it and
 * returns the stored value (the one the receiver will multiply by). */
static inline float hc_q_scale_put_absmax(uint8_t *scales, size_t b, int fp32, float amax,
                                          float qmax) {
    float s = amax / qmax;
    /* Keep 1/scale finite (below FLT_MIN the reciprocal overflows) and a
     * non-zero block's scale non-zero (absmax/qmax can underflow to 0). Such
     * blocks (absmax < 1.5e-36) just get a coarser, still exact grid. */
    if (amax > 0.0f && s < FLT_MIN) s = FLT_MIN;
    if (fp32) {
        hc_q_scale_put_bits(scales, b, 1, s, 0);
        return s;
    }
    uint16_t h = hc_q_f16_up(s);
    hc_q_scale_put_bits(scales, b, 0, 0.0f, h);
    return hc_f16_to_f32(h);
}

/* 1-bit scale: the block's mean |x|, to nearest (fp16 saturates as above). */
static inline float hc_q_scale_put_mean(uint8_t *scales, size_t b, int fp32, float mean) {
    if (fp32) {
        hc_q_scale_put_bits(scales, b, 1, mean, 0);
        return mean;
    }
    uint16_t h = hc_f32_to_f16(mean);
    if (h >= 0x7c00u) h = 0x7bffu;
    hc_q_scale_put_bits(scales, b, 0, 0.0f, h);
    return hc_f16_to_f32(h);
}

static inline float hc_q_inverse(float s) { return s > 0.0f ? 1.0f / s : 0.0f; }

/* The 1-bit mean |x| is a sum whose order must be fixed. Element j of a
 * block goes to lane j % 32 (so the AVX2 code can run four independent
 * chains of two 4-double registers); lanes are reduced by this tree, which
 * is the AVX2 register reduction written out. Doubles make the sum of any
 * block of finite floats finite, so a non-finite sum means NaN/Inf input. */
#define HC_Q_LANES 32
static inline double hc_q_sum_lanes(const double a[HC_Q_LANES]) {
    double t[4];
    for (int k = 0; k < 4; k++) {
        double lo = (a[k] + a[8 + k]) + (a[16 + k] + a[24 + k]);
        double hi = (a[4 + k] + a[12 + k]) + (a[20 + k] + a[28 + k]);
        t[k] = lo + hi;
    }
    return (t[0] + t[2]) + (t[1] + t[3]);
}

static inline float hc_q_mean(double sum, size_t n) { return (float)(sum / (double)n); }

/* ---- rounding ---- */

#define HC_Q_MAGIC 12582912.0f /* 1.5 * 2^23: adding it rounds |t| < 2^22 to an integer */

/* The integer level of v (an exact small integer as a float). t is clamped
 * before rounding so that saturated fp16 scales cannot leave the range.
 * Adding 1.5*2^23 rounds t to an integer in the current rounding mode (the
 * spacing of floats there is 1) and subtracting it back is exact, so this
 * equals cvtps2dq (which the AVX2 path uses) in every mode, and gives +0 for
 * t in (-0.5, 0.5) as cvtps2dq's integer 0 does. It stays portable C where
 * rintf() would be a libm call on baseline x86-64. */
static inline float hc_q_level(float v, float inv, float qmax) {
    float t = v * inv;
    t = t < -qmax ? -qmax : t;
    t = t > qmax ? qmax : t;
    return (t + HC_Q_MAGIC) - HC_Q_MAGIC;
}

/* Stochastic rounding: floor(t + u), clamped after rounding as well since
 * qmax + u can round up to qmax + 1. floorf is exact. */
static inline float hc_q_level_sr(float v, float inv, float qmax, float u) {
    float t = v * inv;
    t = t < -qmax ? -qmax : t;
    t = t > qmax ? qmax : t;
    float r = floorf(t + u);
    return r > qmax ? qmax : r;
}

/* ---- counter-based random numbers for stochastic rounding ---- */

static inline uint64_t hc_q_splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* Wellons' lowbias32: a bijection on 32 bits with low avalanche bias. Being
 * bijective, 2^32 consecutive counters give every 24-bit u exactly 256 times. */
static inline uint32_t hc_q_mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

/* The high counter word only changes every 2^32 elements. */
static inline uint32_t hc_q_sr_hi(const hc_qctx *c, uint64_t n) {
    return hc_q_mix32((uint32_t)(n >> 32) ^ c->sr_k1);
}

/* u in [0, 1) on a 2^-24 grid for tensor element n. Depends only on
 * (seed, n), so chunking a tensor does not change its rounding. */
static inline float hc_q_sr_u(const hc_qctx *c, uint64_t n) {
    uint32_t h = hc_q_mix32(((uint32_t)n + c->sr_k0) ^ hc_q_sr_hi(c, n));
    return (float)(h >> 8) * 0x1p-24f;
}

/* ---- element access to encoded values ---- */

static inline float hc_q_level_at(int codec, const uint8_t *vals, size_t i) {
    if (codec == HC_CODEC_INT8) return (float)(int8_t)vals[i];
    int nib = (vals[i >> 1] >> ((i & 1) * 4)) & 0xf;
    return (float)((nib ^ 8) - 8);
}

static inline float hc_q_decode_at(int codec, const uint8_t *vals, size_t i, float s) {
    if (codec == HC_CODEC_1BIT) return (vals[i >> 3] >> (i & 7)) & 1 ? s : -s;
    return hc_q_level_at(codec, vals, i) * s;
}

/* ---- the kernels ---- */

/* Encoded fp16/bf16 runs are byte buffers: the wire gives no alignment. */
static inline uint16_t hc_q_ld16(const uint8_t *p, size_t i) {
    uint16_t h;
    memcpy(&h, p + 2 * i, 2);
    return h;
}

static inline void hc_q_st16(uint8_t *p, size_t i, uint16_t h) { memcpy(p + 2 * i, &h, 2); }

/* Scalar (portable; also the reference the AVX2 path must match). */
void hc_qs_encode_block(const hc_qctx *c, int mode, size_t b);
void hc_qs_decode_block(const hc_qctx *c, int add, size_t b);
void hc_qs_cast_encode(int codec, const float *src, float *residual, size_t n, uint8_t *dst);
void hc_qs_cast_decode(int codec, const uint8_t *src, size_t n, float *dst, int add);
void hc_qs_cast_hop(int codec, const uint8_t *src, const float *local, size_t n, uint8_t *dst,
                    float *sum_out);

#if defined(__x86_64__) /* as kernels/cpu.c, which only detects AVX2 there */
#define HC_QUANT_HAVE_AVX2 1
/* AVX2 + F16C. Blocks the vector code cannot take whole (a start or length
 * that is not a multiple of 8, a NaN/Inf block, a stochastic-rounding
 * counter that wraps 2^32 inside the block) go to the scalar kernels. */
void hc_qa_encode_blocks(const hc_qctx *c, int mode);
void hc_qa_decode_blocks(const hc_qctx *c, int add);
void hc_qa_cast_encode(int codec, const float *src, float *residual, size_t n, uint8_t *dst);
void hc_qa_cast_decode(int codec, const uint8_t *src, size_t n, float *dst, int add);
void hc_qa_cast_hop(int codec, const uint8_t *src, const float *local, size_t n, uint8_t *dst,
                    float *sum_out);
#endif

#endif
