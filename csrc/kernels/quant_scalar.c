/*
 * Portable codec kernels. They define the encoding: the AVX2 kernels must
 * produce the same bytes and floats, and hand these any block they cannot
 * take whole. Arithmetic lives in quant_impl.h so both sides share it.
 */
#include "kernels/quant_impl.h"

/* The fp32 value block codecs quantize for element i of this call. */
HC_Q_INLINE float qs_in(const hc_qctx *c, int codec, int mode, size_t i, float s_in) {
    if (mode == HC_QIN_SRC) return c->src[i];
    if (mode == HC_QIN_EF) return c->src[i] + c->residual[i];
    return hc_q_decode_at(codec, c->in_vals, i, s_in) + c->local[i];
}

/* Elements are written in increasing order, so the first write to a shared
 * byte (low nibble / bit 0) may overwrite and later ones OR in: no caller
 * has to clear the output, and bytes split between blocks come out right. */
HC_Q_INLINE void qs_put_level(int codec, uint8_t *vals, size_t i, int q) {
    if (codec == HC_CODEC_INT8) {
        vals[i] = (uint8_t)(int8_t)q;
        return;
    }
    uint8_t nib = (uint8_t)(q & 0xf);
    if (i & 1)
        vals[i >> 1] |= (uint8_t)(nib << 4);
    else
        vals[i >> 1] = nib;
}

HC_Q_INLINE void qs_put_bit(uint8_t *vals, size_t i, int bit) {
    if (i & 7)
        vals[i >> 3] |= (uint8_t)(bit << (i & 7));
    else
        vals[i >> 3] = (uint8_t)bit;
}

/* A block holding NaN or Inf: NaN scale, zero values, residual reset so one
 * bad step does not poison the next; sum_out still gets the true sums. */
static void qs_bad_block(const hc_qctx *c, int mode, size_t b, float s_in) {
    size_t i0 = b * c->block, end = i0 + hc_q_block_len(c, b);
    hc_q_scale_put_nan(c->out_scales, b, c->scale_fp32);
    for (size_t i = i0; i < end; i++) {
        if (mode == HC_QIN_HOP && c->sum_out) c->sum_out[i] = qs_in(c, c->codec, mode, i, s_in);
        if (mode == HC_QIN_EF) c->residual[i] = 0.0f;
        if (c->codec == HC_CODEC_1BIT)
            qs_put_bit(c->out_vals, i, 0);
        else
            qs_put_level(c->codec, c->out_vals, i, 0);
    }
}

/* Side outputs of one element once its decoded value is known. Reads of
 * element i always precede writes of element i, so sum_out may alias local. */
HC_Q_INLINE void qs_side(const hc_qctx *c, int mode, size_t i, float v, float dec) {
    if (mode == HC_QIN_EF)
        c->residual[i] = v - dec;
    else if (mode == HC_QIN_HOP && c->sum_out)
        c->sum_out[i] = v;
}

/* int8/int4: two passes over the block (absmax, then quantize); the second
 * recomputes v instead of buffering it, which costs a few L1 reads. */
HC_Q_INLINE void qs_int_block_sr(const hc_qctx *cp, int codec, int mode, int sr, size_t b) {
    const hc_qctx cc = *cp, *c = &cc; /* no store can reach it: pointers stay in registers */
    size_t i0 = b * c->block, end = i0 + hc_q_block_len(c, b);
    float qmax = hc_q_qmax(codec);
    float s_in = mode == HC_QIN_HOP ? hc_q_scale_get(c->in_scales, b, c->scale_fp32) : 0.0f;

    uint32_t amax = 0; /* |v| as bits: integer max is exact and sees NaN */
    for (size_t i = i0; i < end; i++) {
        uint32_t a = hc_f32_bits(qs_in(c, codec, mode, i, s_in)) & 0x7fffffffu;
        amax = a > amax ? a : amax;
    }
    if (amax >= 0x7f800000u) {
        qs_bad_block(cp, mode, b, s_in);
        return;
    }
    float s = hc_q_scale_put_absmax(c->out_scales, b, c->scale_fp32, hc_bits_f32(amax), qmax);
    float inv = hc_q_inverse(s);
    for (size_t i = i0; i < end; i++) {
        float v = qs_in(c, codec, mode, i, s_in);
        float r = sr ? hc_q_level_sr(v, inv, qmax, hc_q_sr_u(c, c->sr_offset + i))
                     : hc_q_level(v, inv, qmax);
        qs_put_level(codec, c->out_vals, i, (int)r);
        qs_side(c, mode, i, v, r * s);
    }
}

HC_Q_INLINE void qs_int_block(const hc_qctx *c, int codec, int mode, size_t b) {
    if (c->sr)
        qs_int_block_sr(c, codec, mode, 1, b);
    else
        qs_int_block_sr(c, codec, mode, 0, b);
}

HC_Q_INLINE void qs_1bit_block(const hc_qctx *cp, int codec, int mode, size_t b) {
    const hc_qctx cc = *cp, *c = &cc;
    size_t i0 = b * c->block, n = hc_q_block_len(c, b);
    float s_in = mode == HC_QIN_HOP ? hc_q_scale_get(c->in_scales, b, c->scale_fp32) : 0.0f;

    double acc[HC_Q_LANES] = {0};
    for (size_t j = 0; j < n; j++)
        acc[j % HC_Q_LANES] += (double)fabsf(qs_in(c, codec, mode, i0 + j, s_in));
    double sum = hc_q_sum_lanes(acc);
    if (!(sum <= DBL_MAX)) {
        qs_bad_block(cp, mode, b, s_in);
        return;
    }
    float s = hc_q_scale_put_mean(c->out_scales, b, c->scale_fp32, hc_q_mean(sum, n));
    for (size_t i = i0; i < i0 + n; i++) {
        float v = qs_in(c, codec, mode, i, s_in);
        int bit = v >= 0.0f;
        qs_put_bit(c->out_vals, i, bit);
        qs_side(c, mode, i, v, bit ? s : -s);
    }
}

/* One instance per (codec, mode): the per-element branches fold away. */
#define QS_MODES(fn, codec)                                              \
    do {                                                                 \
        if (mode == HC_QIN_SRC)                                          \
            fn(c, codec, HC_QIN_SRC, b);                                 \
        else if (mode == HC_QIN_EF)                                      \
            fn(c, codec, HC_QIN_EF, b);                                  \
        else                                                             \
            fn(c, codec, HC_QIN_HOP, b);                                 \
    } while (0)

void hc_qs_encode_block(const hc_qctx *c, int mode, size_t b) {
    if (c->codec == HC_CODEC_INT8)
        QS_MODES(qs_int_block, HC_CODEC_INT8);
    else if (c->codec == HC_CODEC_INT4)
        QS_MODES(qs_int_block, HC_CODEC_INT4);
    else
        QS_MODES(qs_1bit_block, HC_CODEC_1BIT);
}

HC_Q_INLINE void qs_decode_block(const hc_qctx *c, int codec, int add, size_t b) {
    size_t i0 = b * c->block, end = i0 + hc_q_block_len(c, b);
    const uint8_t *vals = c->in_vals;
    float *out = c->out;
    float s = hc_q_scale_get(c->in_scales, b, c->scale_fp32);
    size_t i = i0;
    if (codec == HC_CODEC_1BIT && !(i0 & 7)) /* whole bytes: a fixed 8-wide inner loop */
        for (; i + 8 <= end; i += 8) {
            unsigned byte = vals[i >> 3];
            for (unsigned j = 0; j < 8; j++) {
                float d = (byte >> j) & 1 ? s : -s;
                out[i + j] = add ? out[i + j] + d : d;
            }
        }
    for (; i < end; i++) {
        float d = hc_q_decode_at(codec, vals, i, s);
        out[i] = add ? out[i] + d : d;
    }
}

void hc_qs_decode_block(const hc_qctx *c, int add, size_t b) {
    if (c->codec == HC_CODEC_INT8)
        add ? qs_decode_block(c, HC_CODEC_INT8, 1, b) : qs_decode_block(c, HC_CODEC_INT8, 0, b);
    else if (c->codec == HC_CODEC_INT4)
        add ? qs_decode_block(c, HC_CODEC_INT4, 1, b) : qs_decode_block(c, HC_CODEC_INT4, 0, b);
    else
        add ? qs_decode_block(c, HC_CODEC_1BIT, 1, b) : qs_decode_block(c, HC_CODEC_1BIT, 0, b);
}

/* ---- fp16 / bf16: element-wise casts ---- */

static inline uint16_t qs_cast(int codec, float v) {
    return codec == HC_CODEC_FP16 ? hc_f32_to_f16(v) : hc_f32_to_bf16(v);
}

static inline float qs_uncast(int codec, uint16_t h) {
    return codec == HC_CODEC_FP16 ? hc_f16_to_f32(h) : hc_bf16_to_f32(h);
}

void hc_qs_cast_encode(int codec, const float *src, float *residual, size_t n, uint8_t *dst) {
    for (size_t i = 0; i < n; i++) {
        float v = residual ? src[i] + residual[i] : src[i];
        uint16_t h = qs_cast(codec, v);
        hc_q_st16(dst, i, h);
        if (residual) {
            /* Casts have no blocks: an element that is or becomes NaN/Inf
             * (overflow) resets its own residual. */
            float r = v - qs_uncast(codec, h);
            residual[i] = fabsf(r) < INFINITY ? r : 0.0f;
        }
    }
}

void hc_qs_cast_decode(int codec, const uint8_t *src, size_t n, float *dst, int add) {
    for (size_t i = 0; i < n; i++) {
        float d = qs_uncast(codec, hc_q_ld16(src, i));
        dst[i] = add ? dst[i] + d : d;
    }
}

void hc_qs_cast_hop(int codec, const uint8_t *src, const float *local, size_t n, uint8_t *dst,
                    float *sum_out) {
    for (size_t i = 0; i < n; i++) {
        float v = qs_uncast(codec, hc_q_ld16(src, i)) + local[i];
        if (sum_out) sum_out[i] = v;
        hc_q_st16(dst, i, qs_cast(codec, v));
    }
}
