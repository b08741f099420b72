/*
 * The ring with a codec on every link, on fp32 data.
 *
 * Reduce-scatter: each hop dequantizes the incoming partial sum, adds this
 * rank's contribution in fp32 and quantizes once for the next hop (one fused
 * pass per piece). Allgather: the segment's owner quantizes its final sum
 * once; the others forward those bytes unchanged, and every member — owner
 * included — decodes them, so all end with the same bits.
 *
 * Error feedback: over one allreduce a rank quantizes each element exactly
 * once (its own contribution, a partial sum at a hop, or the final sum it
 * owns), always at the same stage since the schedule is fixed, so one
 * residual per element carries what that quantization lost into the next
 * call.
 *
 * Encoded pieces live in an arena with one slot per piece, so a buffer handed
 * to a zero-copy send is never reused within the op.
 */
#include <string.h>

#include "algo/ring.h"

typedef struct codec_ctx {
    int codec;
    hc_codec_params p;
    size_t enc_max;    /* encoded bytes of a full piece */
    uint8_t *arena;
    size_t *first;     /* first arena slot of each segment; n+1 entries */
    float *tmp;        /* one piece of fp32, for hops with error feedback */
} codec_ctx;

/* The op's codec and its parameters; no buffers. */
static void codec_params(hc_exec *x, codec_ctx *k) {
    hc_comm *c = x->comm;
    hc_op *op = x->op;
    k->codec = op->codec;
    hc_codec_params_init(&k->p);
    k->p.block = c->cfg.codec_block;
    k->p.scale_fp32 = c->cfg.codec_scale_fp32;
    /* Distinct random streams per rank: equal seeds would round the same
     * element the same way on every rank. */
    k->p.sr_seed = op->opts.sr_seed ? op->opts.sr_seed ^ (0x9e3779b97f4a7c15ull * (uint64_t)(c->rank + 1)) : 0;
}

static int setup(hc_exec *x, const hc_ring *g, codec_ctx *k) {
    hc_comm *c = x->comm;
    hc_op *op = x->op;
    codec_params(x, k);
    k->enc_max = hc_codec_encoded_size(k->codec, g->ce, &k->p);
    size_t slots = 0;
    for (int s = 0; s < g->n; s++) slots += hc_ring_pieces(g, s);
    k->first = hc_comm_scratch(c, HC_SCRATCH_INDEX, (size_t)(g->n + 1) * sizeof(size_t));
    k->arena = hc_comm_scratch(c, HC_SCRATCH_ARENA, slots * k->enc_max);
    k->tmp = op->opts.residual_key ? hc_comm_scratch(c, HC_SCRATCH_TMP, g->ce * sizeof(float)) : NULL;
    if (!k->first || !k->arena || (op->opts.residual_key && !k->tmp))
        return hc_xfail(x, HC_ERR_NO_MEMORY, "rank %d: no memory for %zu encoded pieces", c->rank, slots);
    k->first[0] = 0;
    for (int s = 0; s < g->n; s++) k->first[s + 1] = k->first[s] + hc_ring_pieces(g, s);
    return HC_OK;
}

static uint8_t *slot(const codec_ctx *k, int seg, size_t piece) { return k->arena + (k->first[seg] + piece) * k->enc_max; }

static size_t enc_size(const codec_ctx *k, size_t len) { return hc_codec_encoded_size(k->codec, len, &k->p); }

static int encode(hc_exec *x, codec_ctx *k, const float *src, size_t off, size_t len, uint8_t *dst, float *residual) {
    k->p.sr_offset = off;
    int rc = hc_codec_encode(k->codec, src, len, dst, residual ? residual + off : NULL, &k->p);
    return rc == HC_OK ? rc : hc_xfail(x, rc, "%s", hc_last_error());
}

/* Sends pieces [from, to) of this rank's own segment, quantized. */
static int send_own(hc_exec *x, const hc_ring *g, codec_ctx *k, const float *in, int seg, size_t from, size_t to,
                    float *residual) {
    x->tx_group = 0;
    for (size_t i = from; i < to; i++) {
        size_t off, len;
        hc_ring_piece(g, seg, i, &off, &len);
        uint8_t *enc = slot(k, seg, i);
        const float *src = (const float *)((const char *)in + hc_ring_at(g, seg, off));
        int rc = encode(x, k, src, off, len, enc, residual);
        if (rc == HC_OK) rc = hc_xsend(x, g->next, enc, enc_size(k, len));
        if (rc != HC_OK) return rc;
    }
    return HC_OK;
}

/* One hop: dst = Q(D(m) + local), with this rank's residual when given. */
static int hop(hc_exec *x, codec_ctx *k, const hc_msg *m, const float *local, size_t off, size_t len, uint8_t *dst,
               float *residual) {
    int rc;
    if (!residual) {
        k->p.sr_offset = off;
        rc = hc_codec_hop(k->codec, m->data, local, len, dst, NULL, &k->p);
        return rc == HC_OK ? rc : hc_xfail(x, rc, "%s", hc_last_error());
    }
    memcpy(k->tmp, local, len * sizeof(float));
    rc = hc_codec_decode_add(k->codec, m->data, len, k->tmp, &k->p);
    if (rc != HC_OK) return hc_xfail(x, rc, "%s", hc_last_error());
    return encode(x, k, k->tmp, off, len, dst, residual);
}

/*
 * The reduce-scatter phase. The owned segment's fp32 sum goes to `last`
 * (segment-sized). With `share` set, each finished piece is also quantized
 * once, decoded back into `last` and sent on as the first allgather step.
 */
static int reduce_scatter(hc_exec *x, const hc_ring *g, codec_ctx *k, const float *in, float *last, int divide_by,
                          float *residual, int share) {
    int n = g->n;
    int rc = send_own(x, g, k, in, g->pos, g->first_sent, hc_ring_pieces(g, g->pos), residual);
    for (int s = 0; rc == HC_OK && s < n - 1; s++) {
        int seg = hc_mod(g->pos - s - 1, n);
        int final = s == n - 2;
        for (size_t i = 0, np = hc_ring_pieces(g, seg); rc == HC_OK && i < np; i++) {
            size_t off, len;
            hc_ring_piece(g, seg, i, &off, &len);
            const float *local = (const float *)((const char *)in + hc_ring_at(g, seg, off));
            hc_msg *m;
            if ((rc = hc_ring_recv(x, g, enc_size(k, len), &m)) != HC_OK) break;
            uint8_t *enc = slot(k, seg, i);
            if (!final) {
                rc = hop(x, k, m, local, off, len, enc, residual);
                hc_xrelease(x, m);
                if (rc == HC_OK) rc = hc_xsend(x, g->next, enc, enc_size(k, len));
                continue;
            }
            float *sum = last + (off - hc_ring_seg_lo(g, seg));
            if (sum != local) memcpy(sum, local, len * sizeof(float));
            rc = hc_codec_decode_add(k->codec, m->data, len, sum, &k->p);
            hc_xrelease(x, m);
            if (rc != HC_OK) return hc_xfail(x, rc, "%s", hc_last_error());
            if (divide_by > 1) hc_divide_kernel(sum, len, HC_FLOAT32, divide_by);
            if (!share) continue;
            if ((rc = encode(x, k, sum, off, len, enc, residual)) != HC_OK) break;
            rc = hc_codec_decode(k->codec, enc, len, sum, &k->p);
            x->tx_group = 1;
            if (rc == HC_OK) rc = hc_xsend(x, g->next, enc, enc_size(k, len));
            x->tx_group = 0;
        }
    }
    return rc;
}

/* The allgather phase: decode each arriving piece into `out` and pass the
 * same bytes on. Slots reused here were sent in the reduce-scatter, so the
 * caller waits for those sends first. */
static int allgather(hc_exec *x, const hc_ring *g, codec_ctx *k, float *out, int keep_encoded) {
    int n = g->n;
    for (int s = 0; s < n - 1; s++) {
        int seg = hc_mod(g->pos - s, n);
        for (size_t i = 0, np = hc_ring_pieces(g, seg); i < np; i++) {
            size_t off, len;
            hc_ring_piece(g, seg, i, &off, &len);
            size_t bytes = enc_size(k, len);
            hc_msg *m;
            int rc = hc_ring_recv(x, g, bytes, &m);
            if (rc != HC_OK) return rc;
            uint8_t *enc = slot(k, seg, i);
            if (s < n - 2 || keep_encoded) memcpy(enc, m->data, bytes);
            rc = hc_codec_decode(k->codec, m->data, len, (float *)((char *)out + hc_ring_at(g, seg, off)), &k->p);
            hc_xrelease(x, m);
            if (rc != HC_OK) return hc_xfail(x, rc, "%s", hc_last_error());
            if (s < n - 2 && (rc = hc_xsend(x, g->next, enc, bytes)) != HC_OK) return rc;
        }
    }
    return HC_OK;
}

int hc_ring_allreduce_codec(hc_exec *x, const hc_ring *g, const float *in, float *out, int divide_by,
                            float *residual, int keep_encoded) {
    if (g->n == 1) {
        if (in != out && g->count) memcpy(out, in, g->count * sizeof(float));
        if (divide_by > 1) hc_divide_kernel(out, g->count, HC_FLOAT32, divide_by);
        return HC_OK;
    }
    codec_ctx k;
    int rc = setup(x, g, &k);
    int own = hc_mod(g->pos + 1, g->n);
    if (rc == HC_OK)
        rc = reduce_scatter(x, g, &k, in, out + hc_ring_seg_lo(g, own), divide_by, residual, 1);
    if (rc == HC_OK) rc = hc_xsend_wait(x, 0);
    if (rc == HC_OK) rc = allgather(x, g, &k, out, keep_encoded);
    return rc;
}

const uint8_t *hc_ring_codec_piece(hc_exec *x, const hc_ring *g, int seg, size_t piece, size_t *bytes) {
    codec_ctx k;
    if (setup(x, g, &k) != HC_OK) return NULL;
    size_t off, len;
    hc_ring_piece(g, seg, piece, &off, &len);
    *bytes = enc_size(&k, len);
    return slot(&k, seg, piece);
}

int hc_ring_codec_decode_piece(hc_exec *x, const hc_ring *g, const hc_msg *m, size_t len, float *dst) {
    codec_ctx k;
    codec_params(x, &k); /* not setup(): the arena holds pieces still being sent */
    int rc = HC_OK;
    if (m->len != enc_size(&k, len))
        return hc_xfail(x, HC_ERR_MISMATCH, "rank %d got an encoded piece of %zu bytes, expected %zu",
                        x->comm->rank, m->len, enc_size(&k, len));
    if (rc == HC_OK && (rc = hc_codec_decode(k.codec, m->data, len, dst, &k.p)) != HC_OK)
        return hc_xfail(x, rc, "%s", hc_last_error());
    return rc;
}

int hc_ring_codec_send_first(hc_exec *x, hc_ring *g, const float *in, size_t upto, float *residual) {
    codec_ctx k;
    int rc = setup(x, g, &k);
    if (rc == HC_OK) rc = send_own(x, g, &k, in, g->pos, g->first_sent, upto, residual);
    if (rc == HC_OK) g->first_sent = upto;
    return rc;
}

int hc_ring_reduce_scatter_codec(hc_exec *x, const hc_ring *g, const float *in, float *last, int divide_by,
                                 float *residual) {
    codec_ctx k;
    int rc = setup(x, g, &k);
    return rc == HC_OK ? reduce_scatter(x, g, &k, in, last, divide_by, residual, 0) : rc;
}

int hc_ring_allgather_codec(hc_exec *x, const hc_ring *g, float *out, float *residual) {
    codec_ctx k;
    int rc = setup(x, g, &k);
    int own = hc_mod(g->pos + 1, g->n);
    float *mine = (float *)((char *)out + hc_ring_at(g, own, hc_ring_seg_lo(g, own)));
    x->tx_group = 1;
    for (size_t i = 0, np = hc_ring_pieces(g, own); rc == HC_OK && i < np; i++) {
        size_t off, len;
        hc_ring_piece(g, own, i, &off, &len);
        uint8_t *enc = slot(&k, own, i);
        float *src = mine + (off - hc_ring_seg_lo(g, own));
        rc = encode(x, &k, src, off, len, enc, residual);
        /* The owner keeps what everyone else decodes. */
        if (rc == HC_OK) rc = hc_codec_decode(k.codec, enc, len, src, &k.p);
        if (rc == HC_OK) rc = hc_xsend(x, g->next, enc, enc_size(&k, len));
    }
    x->tx_group = 0;
    return rc == HC_OK ? allgather(x, g, &k, out, 0) : rc;
}
