/*
 * Gradient codecs: the public hc_codec_* entry points. Checks arguments,
 * lays out the encoded buffer (scales first, then values; see
 * quant_impl.h) and hands the work to the AVX2 or the scalar kernels, which
 * produce identical bytes.
 *
 * Decisions worth knowing:
 *   - Default parameters: block 256, fp32 scales, no stochastic rounding.
 *     fp32 scales cost 4 bytes per block (int8: 1.6% of the payload against
 *     0.8% for fp16) and cover every gradient: fp16 scales clip blocks with
 *     absmax above ~8.3e6 (int8), ~4.6e5 (int4) or mean |x| above 65504
 *     (1bit) -- ordinary under fp16 loss scaling -- and lose precision below
 *     ~6e-5 (subnormal scales). See hc_q_f16_up() for what clipping does.
 *   - A NULL `p` means the defaults.
 *   - `block` must be > 0 for int8/int4/1bit only; fp16/bf16/none ignore
 *     block and the stochastic-rounding fields. 1bit ignores sr_seed.
 *   - hc_codec_hop's sum_out may alias local; no other buffers may overlap
 *     (except decode's src/dst for HC_CODEC_NONE, a memmove).
 */
#include "kernels/quant_impl.h"

#include "core/errors.h"
#include "kernels/cpu.h"

static const char *const hc_codec_names[HC_CODEC_COUNT] = {"none", "fp16", "bf16",
                                                           "int8", "int4", "1bit"};

const char *hc_codec_name(int codec) {
    return codec >= 0 && codec < HC_CODEC_COUNT ? hc_codec_names[codec] : "unknown";
}

void hc_codec_params_init(hc_codec_params *p) {
    if (!p) return;
    memset(p, 0, sizeof *p);
    p->block = 256;
    p->scale_fp32 = 1;
}

static int hc_q_blocked(int codec) {
    return codec == HC_CODEC_INT8 || codec == HC_CODEC_INT4 || codec == HC_CODEC_1BIT;
}

static int hc_q_use_avx2(void) {
#ifdef HC_QUANT_HAVE_AVX2
    return hc_cpu_level_get() == HC_CPU_AVX2;
#else
    return 0;
#endif
}

/* Validates codec and params; fills *out with the params to use. */
static int hc_q_check(const char *fn, int codec, const hc_codec_params *p, hc_codec_params *out) {
    if (codec < 0 || codec >= HC_CODEC_COUNT) {
        hc_set_last_error("%s: codec %d is not an hc_codec (0..%d)", fn, codec, HC_CODEC_COUNT - 1);
        return HC_ERR_INVALID_ARGUMENT;
    }
    if (p)
        *out = *p;
    else
        hc_codec_params_init(out);
    if (hc_q_blocked(codec) && out->block == 0) {
        hc_set_last_error("%s: p->block is 0; codec '%s' needs at least one element per block",
                          fn, hc_codec_name(codec));
        return HC_ERR_INVALID_ARGUMENT;
    }
    return HC_OK;
}

static int hc_q_null(const char *fn, const char *arg) {
    hc_set_last_error("%s: %s is NULL but count > 0", fn, arg);
    return HC_ERR_INVALID_ARGUMENT;
}

static size_t hc_q_nblocks(size_t count, size_t block) {
    return count / block + (count % block != 0);
}

static size_t hc_q_scale_area(size_t count, const hc_codec_params *p) {
    return hc_q_nblocks(count, p->block) * (p->scale_fp32 ? 4 : 2);
}

size_t hc_codec_encoded_size(int codec, size_t count, const hc_codec_params *p) {
    hc_codec_params q;
    if (hc_q_check("hc_codec_encoded_size", codec, p, &q) != HC_OK) return 0;
    switch (codec) {
    case HC_CODEC_NONE: return count * 4;
    case HC_CODEC_FP16:
    case HC_CODEC_BF16: return count * 2;
    case HC_CODEC_INT8: return hc_q_scale_area(count, &q) + count;
    case HC_CODEC_INT4: return hc_q_scale_area(count, &q) + count / 2 + (count & 1);
    default: return hc_q_scale_area(count, &q) + count / 8 + ((count & 7) != 0);
    }
}

/* Context for a block codec over `count` elements. */
static void hc_q_ctx(hc_qctx *c, int codec, size_t count, const hc_codec_params *p) {
    memset(c, 0, sizeof *c);
    c->codec = codec;
    c->count = count;
    c->block = p->block;
    c->nblocks = hc_q_nblocks(count, p->block);
    c->scale_fp32 = p->scale_fp32 != 0;
}

static void hc_q_ctx_sr(hc_qctx *c, const hc_codec_params *p) {
    if (!p->sr_seed || c->codec == HC_CODEC_1BIT) return;
    uint64_t k = hc_q_splitmix64(p->sr_seed);
    c->sr = 1;
    c->sr_k0 = (uint32_t)k;
    c->sr_k1 = (uint32_t)(k >> 32);
    c->sr_offset = p->sr_offset;
}

static void hc_q_run_encode(const hc_qctx *c, int mode) {
#ifdef HC_QUANT_HAVE_AVX2
    if (hc_q_use_avx2()) {
        hc_qa_encode_blocks(c, mode);
        return;
    }
#endif
    for (size_t b = 0; b < c->nblocks; b++) hc_qs_encode_block(c, mode, b);
}

static void hc_q_run_decode(const hc_qctx *c, int add) {
#ifdef HC_QUANT_HAVE_AVX2
    if (hc_q_use_avx2()) {
        hc_qa_decode_blocks(c, add);
        return;
    }
#endif
    for (size_t b = 0; b < c->nblocks; b++) hc_qs_decode_block(c, add, b);
}

static void hc_q_cast_encode(int codec, const float *src, float *residual, size_t n, uint8_t *dst) {
#ifdef HC_QUANT_HAVE_AVX2
    if (hc_q_use_avx2()) {
        hc_qa_cast_encode(codec, src, residual, n, dst);
        return;
    }
#endif
    hc_qs_cast_encode(codec, src, residual, n, dst);
}

static void hc_q_cast_decode(int codec, const uint8_t *src, size_t n, float *dst, int add) {
#ifdef HC_QUANT_HAVE_AVX2
    if (hc_q_use_avx2()) {
        hc_qa_cast_decode(codec, src, n, dst, add);
        return;
    }
#endif
    hc_qs_cast_decode(codec, src, n, dst, add);
}

static void hc_q_cast_hop(int codec, const uint8_t *src, const float *local, size_t n, uint8_t *dst,
                          float *sum_out) {
#ifdef HC_QUANT_HAVE_AVX2
    if (hc_q_use_avx2()) {
        hc_qa_cast_hop(codec, src, local, n, dst, sum_out);
        return;
    }
#endif
    hc_qs_cast_hop(codec, src, local, n, dst, sum_out);
}

/* ---- HC_CODEC_NONE: fp32 on the wire, so callers treat every codec alike.
 * The wire buffer may be unaligned, hence memcpy per element (compiled to
 * plain vector loads/stores). ---- */

static void hc_q_none_encode(const float *src, size_t n, uint8_t *dst, float *residual) {
    if (!residual) {
        memcpy(dst, src, n * 4);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        float v = src[i] + residual[i];
        memcpy(dst + 4 * i, &v, 4);
        residual[i] = 0.0f; /* nothing is lost */
    }
}

static void hc_q_none_decode_add(const uint8_t *src, size_t n, float *acc) {
    for (size_t i = 0; i < n; i++) {
        float d;
        memcpy(&d, src + 4 * i, 4);
        acc[i] += d;
    }
}

static void hc_q_none_hop(const uint8_t *src, const float *local, size_t n, uint8_t *dst,
                          float *sum_out) {
    for (size_t i = 0; i < n; i++) {
        float v;
        memcpy(&v, src + 4 * i, 4);
        v += local[i];
        if (sum_out) sum_out[i] = v;
        memcpy(dst + 4 * i, &v, 4);
    }
}

/* ---- public entry points ---- */

int hc_codec_encode(int codec, const float *src, size_t count, void *dst, float *residual,
                    const hc_codec_params *p) {
    static const char fn[] = "hc_codec_encode";
    hc_codec_params q;
    int rc = hc_q_check(fn, codec, p, &q);
    if (rc != HC_OK || count == 0) return rc;
    if (!src) return hc_q_null(fn, "src");
    if (!dst) return hc_q_null(fn, "dst");

    uint8_t *out = dst;
    if (codec == HC_CODEC_NONE) {
        hc_q_none_encode(src, count, out, residual);
        return HC_OK;
    }
    if (!hc_q_blocked(codec)) {
        hc_q_cast_encode(codec, src, residual, count, out);
        return HC_OK;
    }
    hc_qctx c;
    hc_q_ctx(&c, codec, count, &q);
    hc_q_ctx_sr(&c, &q);
    c.src = src;
    c.residual = residual;
    c.out_scales = out;
    c.out_vals = out + hc_q_scale_area(count, &q);
    hc_q_run_encode(&c, residual ? HC_QIN_EF : HC_QIN_SRC);
    return HC_OK;
}

static int hc_q_decode(const char *fn, int codec, const void *src, size_t count, float *dst,
                       int add, const hc_codec_params *p) {
    hc_codec_params q;
    int rc = hc_q_check(fn, codec, p, &q);
    if (rc != HC_OK || count == 0) return rc;
    if (!src) return hc_q_null(fn, "src");
    if (!dst) return hc_q_null(fn, add ? "acc" : "dst");

    const uint8_t *in = src;
    if (codec == HC_CODEC_NONE) {
        if (add)
            hc_q_none_decode_add(in, count, dst);
        else
            memmove(dst, in, count * 4);
        return HC_OK;
    }
    if (!hc_q_blocked(codec)) {
        hc_q_cast_decode(codec, in, count, dst, add);
        return HC_OK;
    }
    hc_qctx c;
    hc_q_ctx(&c, codec, count, &q);
    c.in_scales = in;
    c.in_vals = in + hc_q_scale_area(count, &q);
    c.out = dst;
    hc_q_run_decode(&c, add);
    return HC_OK;
}

int hc_codec_decode(int codec, const void *src, size_t count, float *dst,
                    const hc_codec_params *p) {
    return hc_q_decode("hc_codec_decode", codec, src, count, dst, 0, p);
}

int hc_codec_decode_add(int codec, const void *src, size_t count, float *acc,
                        const hc_codec_params *p) {
    return hc_q_decode("hc_codec_decode_add", codec, src, count, acc, 1, p);
}

int hc_codec_hop(int codec, const void *src, const float *local, size_t count, void *dst,
                 float *sum_out, const hc_codec_params *p) {
    static const char fn[] = "hc_codec_hop";
    hc_codec_params q;
    int rc = hc_q_check(fn, codec, p, &q);
    if (rc != HC_OK || count == 0) return rc;
    if (!src) return hc_q_null(fn, "src");
    if (!local) return hc_q_null(fn, "local");
    if (!dst) return hc_q_null(fn, "dst");

    const uint8_t *in = src;
    uint8_t *out = dst;
    if (codec == HC_CODEC_NONE) {
        hc_q_none_hop(in, local, count, out, sum_out);
        return HC_OK;
    }
    if (!hc_q_blocked(codec)) {
        hc_q_cast_hop(codec, in, local, count, out, sum_out);
        return HC_OK;
    }
    size_t area = hc_q_scale_area(count, &q);
    hc_qctx c;
    hc_q_ctx(&c, codec, count, &q);
    hc_q_ctx_sr(&c, &q);
    c.in_scales = in;
    c.in_vals = in + area;
    c.local = local;
    c.sum_out = sum_out;
    c.out_scales = out;
    c.out_vals = out + area;
    hc_q_run_encode(&c, HC_QIN_HOP);
    return HC_OK;
}
