/*
 * AVX2 + F16C codec kernels, picked at run time (quant.c). Each function
 * performs the IEEE operations of its scalar twin in quant_scalar.c, in the
 * same order, so the bytes on the wire do not depend on which one ran. The
 * target deliberately omits "fma": see quant_impl.h.
 *
 * Work is done block by block, two passes per block (scale, then quantize),
 * so the second pass reads from L1; hop and error feedback are fused into
 * the same passes rather than run as separate sweeps over memory.
 */
#include "kernels/quant_impl.h"

#ifdef HC_QUANT_HAVE_AVX2
#include <immintrin.h>

#define QA_FN __attribute__((target("avx2,f16c")))
#define QA_INL static inline __attribute__((always_inline, target("avx2,f16c")))

/* ---- loading encoded values, 8 elements (i is a multiple of 8) ---- */

QA_INL __m256i qa_i8x8(const uint8_t *p) {
    return _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p));
}

/* 4 bytes -> 8 sign-extended nibbles, low nibble first. */
QA_INL __m256i qa_i4x8(const uint8_t *p) {
    int32_t w;
    memcpy(&w, p, 4);
    __m128i x = _mm_cvtsi32_si128(w);
    __m128i m = _mm_set1_epi8(0x0f), eight = _mm_set1_epi8(8);
    __m128i e = _mm_unpacklo_epi8(_mm_and_si128(x, m), _mm_and_si128(_mm_srli_epi16(x, 4), m));
    e = _mm_sub_epi8(_mm_xor_si128(e, eight), eight);
    return _mm256_cvtepi8_epi32(e);
}

/* 16 bytes -> 32 sign-extended nibbles as four vectors of int32. */
QA_INL void qa_i4x32(const uint8_t *p, __m256i q[4]) {
    __m128i x = _mm_loadu_si128((const __m128i *)p);
    __m128i m = _mm_set1_epi8(0x0f), eight = _mm_set1_epi8(8);
    __m128i lo = _mm_and_si128(x, m), hi = _mm_and_si128(_mm_srli_epi16(x, 4), m);
    __m128i e0 = _mm_sub_epi8(_mm_xor_si128(_mm_unpacklo_epi8(lo, hi), eight), eight);
    __m128i e1 = _mm_sub_epi8(_mm_xor_si128(_mm_unpackhi_epi8(lo, hi), eight), eight);
    q[0] = _mm256_cvtepi8_epi32(e0);
    q[1] = _mm256_cvtepi8_epi32(_mm_srli_si128(e0, 8));
    q[2] = _mm256_cvtepi8_epi32(e1);
    q[3] = _mm256_cvtepi8_epi32(_mm_srli_si128(e1, 8));
}

/* Sign bits for the lanes whose bit in `byte` is clear (those decode to -s). */
QA_INL __m256 qa_bit_signs(uint8_t byte) {
    __m256i bit = _mm256_and_si256(_mm256_set1_epi32(byte),
                                   _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128));
    __m256i clear = _mm256_cmpeq_epi32(bit, _mm256_setzero_si256());
    return _mm256_castsi256_ps(_mm256_and_si256(clear, _mm256_set1_epi32((int)0x80000000u)));
}

QA_INL __m256 qa_dec8(int codec, const uint8_t *vals, size_t i, __m256 s) {
    if (codec == HC_CODEC_INT8) return _mm256_mul_ps(_mm256_cvtepi32_ps(qa_i8x8(vals + i)), s);
    if (codec == HC_CODEC_INT4)
        return _mm256_mul_ps(_mm256_cvtepi32_ps(qa_i4x8(vals + i / 2)), s);
    return _mm256_xor_ps(s, qa_bit_signs(vals[i >> 3]));
}

/* v for elements i..i+7, as qs_in() computes it. */
QA_INL __m256 qa_in(const hc_qctx *c, int codec, int mode, size_t i, __m256 s_in) {
    if (mode == HC_QIN_SRC) return _mm256_loadu_ps(c->src + i);
    if (mode == HC_QIN_EF)
        return _mm256_add_ps(_mm256_loadu_ps(c->src + i), _mm256_loadu_ps(c->residual + i));
    return _mm256_add_ps(qa_dec8(codec, c->in_vals, i, s_in), _mm256_loadu_ps(c->local + i));
}

/* Running max of |v| as integer bits: exact, order-free, and NaN sorts
 * above Inf above every finite value. */
QA_INL __m256i qa_absmax(__m256i m, __m256 v) {
    __m256i a = _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7fffffff));
    return _mm256_max_epu32(m, a);
}

QA_INL uint32_t qa_hmax_u32(__m256i m) {
    __m128i x = _mm_max_epu32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
    x = _mm_max_epu32(x, _mm_shuffle_epi32(x, 0x4e));
    x = _mm_max_epu32(x, _mm_shuffle_epi32(x, 0xb1));
    return (uint32_t)_mm_cvtsi128_si32(x);
}

/* ---- stochastic rounding: hc_q_sr_u() eight lanes at a time ---- */

QA_INL __m256i qa_mix32(__m256i x) {
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb352d));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int)0x846ca68bu));
    return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

/* lo = (uint32)(n of lane 0) + k0; hi = hc_q_sr_hi(), constant in the block. */
QA_INL __m256 qa_sr_u(uint32_t lo, uint32_t hi) {
    __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i x = _mm256_add_epi32(_mm256_set1_epi32((int)lo), iota);
    x = qa_mix32(_mm256_xor_si256(x, _mm256_set1_epi32((int)hi)));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(x, 8)), _mm256_set1_ps(0x1p-24f));
}

/* Does the 32-bit counter wrap inside elements [i0, i0 + n)? Then the high
 * word differs across the block and the scalar path takes it (once per 2^32
 * elements). */
static inline int qa_sr_wraps(const hc_qctx *c, size_t i0, size_t n) {
    return (uint64_t)(uint32_t)(c->sr_offset + i0) + n > 0x100000000ull;
}

/* ---- int8 / int4 encode ---- */

/* Hop blocks up to this long keep v = decode + local in a stack buffer
 * between the passes instead of decoding twice (sum_out, when given, is
 * used as that buffer). */
#define QA_VBUF 2048

/* Where pass 2 of a hop block rereads v from; NULL: recompute it. */
static inline float *qa_vbuf(const hc_qctx *c, int mode, size_t i0, size_t n, float *stack) {
    if (mode != HC_QIN_HOP) return NULL;
    if (c->sum_out) return c->sum_out + i0;
    return n <= QA_VBUF ? stack : NULL;
}

/* v for elements i..i+31; int4 hop inputs decode 32 at a time. */
QA_INL void qa_in32(const hc_qctx *c, int codec, int mode, size_t i, __m256 s_in, __m256 v[4]) {
    if (mode == HC_QIN_HOP && codec == HC_CODEC_INT4) {
        __m256i q[4];
        qa_i4x32(c->in_vals + i / 2, q);
        for (int g = 0; g < 4; g++)
            v[g] = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q[g]), s_in),
                                 _mm256_loadu_ps(c->local + i + 8 * (size_t)g));
        return;
    }
    for (int g = 0; g < 4; g++) v[g] = qa_in(c, codec, mode, i + 8 * (size_t)g, s_in);
}

/* Pass 1 of 32 elements: v, kept in vb[j..] when buffering. */
QA_INL void qa_v1x32(const hc_qctx *c, int codec, int mode, size_t i, __m256 s_in, float *vb,
                     size_t j, __m256 v[4]) {
    qa_in32(c, codec, mode, i, s_in, v);
    if (mode == HC_QIN_HOP && vb)
        for (int g = 0; g < 4; g++) _mm256_storeu_ps(vb + j + 8 * (size_t)g, v[g]);
}

/* Pass 1 load: v for elements i..i+7, kept in vb[j..] when buffering. */
QA_INL __m256 qa_v1(const hc_qctx *c, int codec, int mode, size_t i, __m256 s_in, float *vb,
                    size_t j) {
    __m256 v = qa_in(c, codec, mode, i, s_in);
    if (mode == HC_QIN_HOP && vb) _mm256_storeu_ps(vb + j, v);
    return v;
}

/* Pass 2 load. */
QA_INL __m256 qa_v2(const hc_qctx *c, int codec, int mode, size_t i, __m256 s_in, float *vb,
                    size_t j) {
    if (mode == HC_QIN_HOP && vb) return _mm256_loadu_ps(vb + j);
    return qa_in(c, codec, mode, i, s_in);
}

/* A NaN/Inf block: what qs_bad_block writes (sum_out was written in pass 1;
 * with sum_out aliasing local the scalar code could not recompute it). */
static inline void qa_bad_block(const hc_qctx *c, int mode, size_t b, size_t i0, size_t n) {
    hc_q_scale_put_nan(c->out_scales, b, c->scale_fp32);
    if (c->codec == HC_CODEC_INT8)
        memset(c->out_vals + i0, 0, n);
    else if (c->codec == HC_CODEC_INT4)
        memset(c->out_vals + i0 / 2, 0, n / 2);
    else
        memset(c->out_vals + i0 / 8, 0, n / 8);
    if (mode == HC_QIN_EF) memset(c->residual + i0, 0, n * sizeof(float));
}

typedef struct qa_blk {
    __m256 s, inv, qmax, nqmax;
    uint32_t sr_hi;
} qa_blk;

/* Levels of v = elements i..i+7 (hc_q_level / hc_q_level_sr); writes the residual. */
QA_INL __m256i qa_levels(const hc_qctx *c, const qa_blk *k, int mode, int sr, size_t i,
                         __m256 v) {
    __m256 t = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(v, k->inv), k->nqmax), k->qmax);
    __m256i q;
    if (sr) {
        __m256 u = qa_sr_u((uint32_t)(c->sr_offset + i) + c->sr_k0, k->sr_hi);
        q = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_floor_ps(_mm256_add_ps(t, u)), k->qmax));
    } else {
        q = _mm256_cvtps_epi32(t); /* == hc_q_level's magic-number rounding, see there */
    }
    if (mode == HC_QIN_EF) {
        __m256 dec = _mm256_mul_ps(_mm256_cvtepi32_ps(q), k->s);
        _mm256_storeu_ps(c->residual + i, _mm256_sub_ps(v, dec));
    }
    return q;
}

/* 32 int32 levels -> 32 bytes in element order. */
QA_INL __m256i qa_pack32(__m256i q0, __m256i q1, __m256i q2, __m256i q3) {
    __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
    return _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* Byte pairs -> nibble pairs: low | high << 4 (maddubs with 1 and 16). */
QA_INL __m128i qa_nibbles32(__m256i bytes) {
    __m256i nib = _mm256_and_si256(bytes, _mm256_set1_epi8(0x0f));
    __m256i w = _mm256_maddubs_epi16(nib, _mm256_set1_epi16(0x1001));
    __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi16(w, w), 0x08);
    return _mm256_castsi256_si128(p);
}

QA_INL void qa_store8(int codec, uint8_t *vals, size_t i, __m256i q) {
    __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    __m128i b = _mm_packs_epi16(w, w);
    if (codec == HC_CODEC_INT8) {
        _mm_storel_epi64((__m128i *)(vals + i), b);
        return;
    }
    __m128i nib = _mm_and_si128(b, _mm_set1_epi8(0x0f));
    __m128i w2 = _mm_maddubs_epi16(nib, _mm_set1_epi16(0x1001));
    __m128i p = _mm_packus_epi16(w2, _mm_setzero_si128());
    int32_t x = _mm_cvtsi128_si32(p);
    memcpy(vals + i / 2, &x, 4);
}

QA_INL void qa_int_block(const hc_qctx *cp, size_t b, int codec, int mode, int sr) {
    size_t i0 = b * cp->block, n = hc_q_block_len(cp, b), end = i0 + n;
    if (((i0 | n) & 7) || (sr && qa_sr_wraps(cp, i0, n))) {
        hc_qs_encode_block(cp, mode, b);
        return;
    }
    /* A local copy the compiler can see no store reach, so the pointers stay
     * in registers across the float and byte stores below. */
    const hc_qctx cc = *cp, *c = &cc;
    float stack[QA_VBUF];
    float *vb = qa_vbuf(c, mode, i0, n, stack);
    __m256 s_in = _mm256_set1_ps(
        mode == HC_QIN_HOP ? hc_q_scale_get(c->in_scales, b, c->scale_fp32) : 0.0f);

    /* pass 1: absmax */
    __m256i m[4];
    for (int g = 0; g < 4; g++) m[g] = _mm256_setzero_si256();
    size_t i = i0;
    for (; i + 32 <= end; i += 32) {
        __m256 v[4];
        qa_v1x32(c, codec, mode, i, s_in, vb, i - i0, v);
        for (int g = 0; g < 4; g++)
            m[g] = qa_absmax(m[g], v[g]);
    }
    for (; i < end; i += 8) m[0] = qa_absmax(m[0], qa_v1(c, codec, mode, i, s_in, vb, i - i0));
    m[0] = _mm256_max_epu32(_mm256_max_epu32(m[0], m[1]), _mm256_max_epu32(m[2], m[3]));
    uint32_t amax = qa_hmax_u32(m[0]);
    if (amax >= 0x7f800000u) {
        qa_bad_block(c, mode, b, i0, n);
        return;
    }

    float qmax = hc_q_qmax(codec);
    float s = hc_q_scale_put_absmax(c->out_scales, b, c->scale_fp32, hc_bits_f32(amax), qmax);
    qa_blk k;
    k.s = _mm256_set1_ps(s);
    k.inv = _mm256_set1_ps(hc_q_inverse(s));
    k.qmax = _mm256_set1_ps(qmax);
    k.nqmax = _mm256_set1_ps(-qmax);
    k.sr_hi = sr ? hc_q_sr_hi(c, c->sr_offset + i0) : 0;

    /* pass 2: quantize, 32 elements per store where possible */
    uint8_t *vals = c->out_vals;
    for (i = i0; i + 32 <= end; i += 32) {
        __m256i q[4];
        for (int g = 0; g < 4; g++) {
            size_t ig = i + 8 * (size_t)g;
            q[g] = qa_levels(c, &k, mode, sr, ig, qa_v2(c, codec, mode, ig, s_in, vb, ig - i0));
        }
        __m256i bytes = qa_pack32(q[0], q[1], q[2], q[3]);
        if (codec == HC_CODEC_INT8)
            _mm256_storeu_si256((__m256i *)(vals + i), bytes);
        else
            _mm_storeu_si128((__m128i *)(vals + i / 2), qa_nibbles32(bytes));
    }
    for (; i < end; i += 8) {
        __m256 v = qa_v2(c, codec, mode, i, s_in, vb, i - i0);
        qa_store8(codec, vals, i, qa_levels(c, &k, mode, sr, i, v));
    }
}

/* ---- 1-bit encode ---- */

typedef struct qa_acc {
    __m256d lo[4], hi[4]; /* chain r sums groups g = r (mod 4): lanes j % 32 */
} qa_acc;

QA_INL void qa_acc_add(qa_acc *a, int r, __m256 v) {
    __m256 m = _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)));
    a->lo[r] = _mm256_add_pd(a->lo[r], _mm256_cvtps_pd(_mm256_castps256_ps128(m)));
    a->hi[r] = _mm256_add_pd(a->hi[r], _mm256_cvtps_pd(_mm256_extractf128_ps(m, 1)));
}

/* hc_q_sum_lanes(), register by register. */
QA_INL double qa_acc_sum(const qa_acc *a) {
    __m256d lo = _mm256_add_pd(_mm256_add_pd(a->lo[0], a->lo[1]),
                               _mm256_add_pd(a->lo[2], a->lo[3]));
    __m256d hi = _mm256_add_pd(_mm256_add_pd(a->hi[0], a->hi[1]),
                               _mm256_add_pd(a->hi[2], a->hi[3]));
    __m256d t = _mm256_add_pd(lo, hi);
    __m128d u = _mm_add_pd(_mm256_castpd256_pd128(t), _mm256_extractf128_pd(t, 1));
    return _mm_cvtsd_f64(u) + _mm_cvtsd_f64(_mm_unpackhi_pd(u, u));
}

/* Sign bits of v >= 0 (-0 counts as >= 0) and the residual against +-s. */
QA_INL uint32_t qa_signs(const hc_qctx *c, int mode, size_t i, __m256 v, __m256 s) {
    __m256 ge = _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GE_OQ);
    if (mode == HC_QIN_EF) {
        __m256 dec = _mm256_xor_ps(s, _mm256_andnot_ps(ge, _mm256_set1_ps(-0.0f)));
        _mm256_storeu_ps(c->residual + i, _mm256_sub_ps(v, dec));
    }
    return (uint32_t)_mm256_movemask_ps(ge);
}

QA_INL void qa_1bit_block(const hc_qctx *cp, size_t b, int mode) {
    const int codec = HC_CODEC_1BIT;
    size_t i0 = b * cp->block, n = hc_q_block_len(cp, b), end = i0 + n;
    if ((i0 | n) & 7) {
        hc_qs_encode_block(cp, mode, b);
        return;
    }
    const hc_qctx cc = *cp, *c = &cc;
    float stack[QA_VBUF];
    float *vb = qa_vbuf(c, mode, i0, n, stack);
    __m256 s_in = _mm256_set1_ps(
        mode == HC_QIN_HOP ? hc_q_scale_get(c->in_scales, b, c->scale_fp32) : 0.0f);

    qa_acc a;
    for (int r = 0; r < 4; r++) a.lo[r] = a.hi[r] = _mm256_setzero_pd();
    size_t i = i0;
    for (; i + 32 <= end; i += 32) {
        __m256 v[4];
        qa_v1x32(c, codec, mode, i, s_in, vb, i - i0, v);
        for (int r = 0; r < 4; r++) qa_acc_add(&a, r, v[r]);
    }
    for (int r = 0; i < end; i += 8, r++) { /* at most three groups left: chains 0, 1, 2 */
        __m256 v = qa_v1(c, codec, mode, i, s_in, vb, i - i0);
        if (r == 0) qa_acc_add(&a, 0, v);
        else if (r == 1) qa_acc_add(&a, 1, v);
        else qa_acc_add(&a, 2, v);
    }
    double sum = qa_acc_sum(&a);
    if (!(sum <= DBL_MAX)) {
        qa_bad_block(c, mode, b, i0, n);
        return;
    }
    float mean = hc_q_mean(sum, n);
    __m256 s = _mm256_set1_ps(hc_q_scale_put_mean(c->out_scales, b, c->scale_fp32, mean));

    for (i = i0; i + 32 <= end; i += 32) {
        uint32_t bits = 0;
        for (int g = 0; g < 4; g++) {
            size_t ig = i + 8 * (size_t)g;
            __m256 v = qa_v2(c, codec, mode, ig, s_in, vb, ig - i0);
            bits |= qa_signs(c, mode, ig, v, s) << (8 * g);
        }
        memcpy(c->out_vals + i / 8, &bits, 4);
    }
    for (; i < end; i += 8) {
        __m256 v = qa_v2(c, codec, mode, i, s_in, vb, i - i0);
        c->out_vals[i / 8] = (uint8_t)qa_signs(c, mode, i, v, s);
    }
}

/* ---- block drivers: one specialised loop per (codec, input, rounding) ---- */

#define QA_ENC(name, call)                                             \
    static QA_FN void name(const hc_qctx *c) {                         \
        for (size_t b = 0; b < c->nblocks; b++) call;                  \
    }

QA_ENC(qa_i8_src, qa_int_block(c, b, HC_CODEC_INT8, HC_QIN_SRC, 0))
QA_ENC(qa_i8_ef, qa_int_block(c, b, HC_CODEC_INT8, HC_QIN_EF, 0))
QA_ENC(qa_i8_hop, qa_int_block(c, b, HC_CODEC_INT8, HC_QIN_HOP, 0))
QA_ENC(qa_i8_src_sr, qa_int_block(c, b, HC_CODEC_INT8, HC_QIN_SRC, 1))
QA_ENC(qa_i8_ef_sr, qa_int_block(c, b, HC_CODEC_INT8, HC_QIN_EF, 1))
QA_ENC(qa_i8_hop_sr, qa_int_block(c, b, HC_CODEC_INT8, HC_QIN_HOP, 1))
QA_ENC(qa_i4_src, qa_int_block(c, b, HC_CODEC_INT4, HC_QIN_SRC, 0))
QA_ENC(qa_i4_ef, qa_int_block(c, b, HC_CODEC_INT4, HC_QIN_EF, 0))
QA_ENC(qa_i4_hop, qa_int_block(c, b, HC_CODEC_INT4, HC_QIN_HOP, 0))
QA_ENC(qa_i4_src_sr, qa_int_block(c, b, HC_CODEC_INT4, HC_QIN_SRC, 1))
QA_ENC(qa_i4_ef_sr, qa_int_block(c, b, HC_CODEC_INT4, HC_QIN_EF, 1))
QA_ENC(qa_i4_hop_sr, qa_int_block(c, b, HC_CODEC_INT4, HC_QIN_HOP, 1))
QA_ENC(qa_b1_src, qa_1bit_block(c, b, HC_QIN_SRC))
QA_ENC(qa_b1_ef, qa_1bit_block(c, b, HC_QIN_EF))
QA_ENC(qa_b1_hop, qa_1bit_block(c, b, HC_QIN_HOP))

typedef void (*qa_enc_fn)(const hc_qctx *);

void hc_qa_encode_blocks(const hc_qctx *c, int mode) {
    static const qa_enc_fn int8[2][HC_QIN_COUNT] = {{qa_i8_src, qa_i8_ef, qa_i8_hop},
                                                    {qa_i8_src_sr, qa_i8_ef_sr, qa_i8_hop_sr}};
    static const qa_enc_fn int4[2][HC_QIN_COUNT] = {{qa_i4_src, qa_i4_ef, qa_i4_hop},
                                                    {qa_i4_src_sr, qa_i4_ef_sr, qa_i4_hop_sr}};
    static const qa_enc_fn bit1[HC_QIN_COUNT] = {qa_b1_src, qa_b1_ef, qa_b1_hop};
    if (c->codec == HC_CODEC_INT8)
        int8[c->sr != 0][mode](c);
    else if (c->codec == HC_CODEC_INT4)
        int4[c->sr != 0][mode](c);
    else
        bit1[mode](c);
}

/* ---- decode ---- */

QA_INL void qa_dec_put(float *out, size_t i, __m256 d, int add) {
    if (add) d = _mm256_add_ps(_mm256_loadu_ps(out + i), d);
    _mm256_storeu_ps(out + i, d);
}

QA_INL void qa_dec_block(const hc_qctx *cp, size_t b, int codec, int add) {
    size_t i0 = b * cp->block, n = hc_q_block_len(cp, b), end = i0 + n;
    if ((i0 | n) & 7) {
        hc_qs_decode_block(cp, add, b);
        return;
    }
    const uint8_t *vals = cp->in_vals;
    float *out = cp->out;
    __m256 s = _mm256_set1_ps(hc_q_scale_get(cp->in_scales, b, cp->scale_fp32));
    size_t i = i0;
    if (codec == HC_CODEC_INT4)
        for (; i + 32 <= end; i += 32) {
            __m256i q[4];
            qa_i4x32(vals + i / 2, q);
            for (int g = 0; g < 4; g++)
                qa_dec_put(out, i + 8 * (size_t)g, _mm256_mul_ps(_mm256_cvtepi32_ps(q[g]), s), add);
        }
    for (; i < end; i += 8) qa_dec_put(out, i, qa_dec8(codec, vals, i, s), add);
}

#define QA_DEC(name, codec, add)                                            \
    static QA_FN void name(const hc_qctx *c) {                              \
        for (size_t b = 0; b < c->nblocks; b++) qa_dec_block(c, b, codec, add); \
    }

QA_DEC(qa_i8_dec, HC_CODEC_INT8, 0)
QA_DEC(qa_i8_add, HC_CODEC_INT8, 1)
QA_DEC(qa_i4_dec, HC_CODEC_INT4, 0)
QA_DEC(qa_i4_add, HC_CODEC_INT4, 1)
QA_DEC(qa_b1_dec, HC_CODEC_1BIT, 0)
QA_DEC(qa_b1_add, HC_CODEC_1BIT, 1)

void hc_qa_decode_blocks(const hc_qctx *c, int add) {
    static const qa_enc_fn fns[3][2] = {
        {qa_i8_dec, qa_i8_add}, {qa_i4_dec, qa_i4_add}, {qa_b1_dec, qa_b1_add}};
    fns[c->codec - HC_CODEC_INT8][add != 0](c);
}

/* ---- fp16 / bf16 casts (tails go to the scalar code) ---- */

QA_INL __m256 qa_uncast(int codec, const uint8_t *p) {
    return codec == HC_CODEC_FP16 ? hc_load8_f16((const uint16_t *)p)
                                  : hc_load8_bf16((const uint16_t *)p);
}

QA_INL void qa_cast(int codec, uint8_t *p, __m256 v) {
    if (codec == HC_CODEC_FP16)
        hc_store8_f16((uint16_t *)p, v);
    else
        hc_store8_bf16((uint16_t *)p, v);
}

QA_INL void qa_cast_encode(int codec, const float *src, float *residual, size_t n, uint8_t *dst) {
    size_t i = 0;
    __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 inf = _mm256_set1_ps(INFINITY);
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(src + i);
        if (residual) v = _mm256_add_ps(v, _mm256_loadu_ps(residual + i));
        qa_cast(codec, dst + 2 * i, v);
        if (residual) {
            __m256 r = _mm256_sub_ps(v, qa_uncast(codec, dst + 2 * i));
            __m256 finite = _mm256_cmp_ps(_mm256_and_ps(r, absmask), inf, _CMP_LT_OQ);
            _mm256_storeu_ps(residual + i, _mm256_and_ps(r, finite));
        }
    }
    hc_qs_cast_encode(codec, src + i, residual ? residual + i : NULL, n - i, dst + 2 * i);
}

QA_INL void qa_cast_decode(int codec, const uint8_t *src, size_t n, float *dst, int add) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 d = qa_uncast(codec, src + 2 * i);
        if (add) d = _mm256_add_ps(_mm256_loadu_ps(dst + i), d);
        _mm256_storeu_ps(dst + i, d);
    }
    hc_qs_cast_decode(codec, src + 2 * i, n - i, dst + i, add);
}

QA_INL void qa_cast_hop(int codec, const uint8_t *src, const float *local, size_t n, uint8_t *dst,
                        float *sum_out) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_add_ps(qa_uncast(codec, src + 2 * i), _mm256_loadu_ps(local + i));
        if (sum_out) _mm256_storeu_ps(sum_out + i, v);
        qa_cast(codec, dst + 2 * i, v);
    }
    hc_qs_cast_hop(codec, src + 2 * i, local + i, n - i, dst + 2 * i, sum_out ? sum_out + i : NULL);
}

QA_FN void hc_qa_cast_encode(int codec, const float *src, float *residual, size_t n, uint8_t *dst) {
    if (codec == HC_CODEC_FP16)
        qa_cast_encode(HC_CODEC_FP16, src, residual, n, dst);
    else
        qa_cast_encode(HC_CODEC_BF16, src, residual, n, dst);
}

QA_FN void hc_qa_cast_decode(int codec, const uint8_t *src, size_t n, float *dst, int add) {
    if (codec == HC_CODEC_FP16)
        qa_cast_decode(HC_CODEC_FP16, src, n, dst, add);
    else
        qa_cast_decode(HC_CODEC_BF16, src, n, dst, add);
}

QA_FN void hc_qa_cast_hop(int codec, const uint8_t *src, const float *local, size_t n, uint8_t *dst,
                          float *sum_out) {
    if (codec == HC_CODEC_FP16)
        qa_cast_hop(HC_CODEC_FP16, src, local, n, dst, sum_out);
    else
        qa_cast_hop(HC_CODEC_BF16, src, local, n, dst, sum_out);
}

#endif /* HC_QUANT_HAVE_AVX2 */
