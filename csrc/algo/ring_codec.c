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
 * The ring runs as stages, one receive step each (see hc_codec_ring_step),
 * so that the hierarchical allreduce can interleave the stages of several
 * chunks. Encoded pieces live in an arena with two slots per piece (the
 * partial sum this rank sends, the final encoding), each written once per
 * op: a buffer handed to a zero-copy send is never overwritten before the op
 * ends, and no stage waits for sends to drain.
 */
#include <string.h>

#include "algo/ring.h"

static int codec_failed(hc_exec *x, int rc) { return rc == HC_OK ? rc : hc_xfail(x, rc, "%s", hc_last_error()); }

void hc_codec_ring_init(hc_exec *x, hc_codec_ring *r, const hc_ring *g) {
    hc_comm *c = x->comm;
    hc_op *op = x->op;
    memset(r, 0, sizeof *r);
    r->g = *g;
    r->codec = op->codec;
    hc_codec_params_init(&r->p);
    r->p.block = c->cfg.codec_block;
    r->p.scale_fp32 = c->cfg.codec_scale_fp32;
    /* Distinct random streams per rank: equal seeds would round the same
     * element the same way on every rank. */
    r->p.sr_seed = op->opts.sr_seed ? op->opts.sr_seed ^ (0x9e3779b97f4a7c15ull * (uint64_t)(c->rank + 1)) : 0;
    r->enc_max = hc_codec_encoded_size(r->codec, g->ce, &r->p);
    for (int s = 0; s < g->n; s++) r->slots += hc_ring_pieces(g, s);
}

size_t hc_codec_ring_arena_bytes(const hc_codec_ring *r) { return 2 * r->slots * r->enc_max; }

/* The arena from the communicator's scratch, for a ring that runs alone. */
static int scratch_arena(hc_exec *x, hc_codec_ring *r) {
    r->arena = hc_comm_scratch(x->comm, HC_SCRATCH_ARENA, hc_codec_ring_arena_bytes(r));
    return r->arena ? HC_OK
                    : hc_xfail(x, HC_ERR_NO_MEMORY, "rank %d: no memory for %zu encoded pieces", x->comm->rank,
                               2 * r->slots);
}

static uint8_t *slot(const hc_codec_ring *r, int seg, size_t piece, int final) {
    size_t i = piece;
    for (int s = 0; s < seg; s++) i += hc_ring_pieces(&r->g, s);
    return r->arena + ((final ? r->slots : 0) + i) * r->enc_max;
}

static size_t enc_size(const hc_codec_ring *r, size_t len) { return hc_codec_encoded_size(r->codec, len, &r->p); }

static int encode(hc_exec *x, hc_codec_ring *r, const float *src, size_t off, size_t len, uint8_t *dst) {
    r->p.sr_offset = off;
    return codec_failed(x, hc_codec_encode(r->codec, src, len, dst, r->residual ? r->residual + off : NULL, &r->p));
}

static const float *local_at(const hc_codec_ring *r, int seg, size_t off) {
    return (const float *)((const char *)r->in + hc_ring_at(&r->g, seg, off));
}

/* Sends pieces [from, to) of this rank's own segment, quantized (stage 0
 * sends those a caller did not send ahead: hc_ring_codec_send_first). */
static int send_own(hc_exec *x, hc_codec_ring *r, size_t from, size_t to) {
    const hc_ring *g = &r->g;
    for (size_t i = from; i < to; i++) {
        size_t off, len;
        hc_ring_piece(g, g->pos, i, &off, &len);
        uint8_t *enc = slot(r, g->pos, i, 0);
        int rc = encode(x, r, local_at(r, g->pos, off), off, len, enc);
        if (rc == HC_OK) rc = hc_xsend(x, g->next, enc, enc_size(r, len));
        if (rc != HC_OK) return rc;
    }
    return HC_OK;
}

/* One hop: dst = Q(D(m) + local), with this rank's residual when given. */
static int hop(hc_exec *x, hc_codec_ring *r, const hc_msg *m, const float *local, size_t off, size_t len,
               uint8_t *dst) {
    if (!r->residual) {
        r->p.sr_offset = off;
        return codec_failed(x, hc_codec_hop(r->codec, m->data, local, len, dst, NULL, &r->p));
    }
    float *tmp = hc_comm_scratch(x->comm, HC_SCRATCH_TMP, len * sizeof(float));
    if (!tmp) return hc_xfail(x, HC_ERR_NO_MEMORY, "rank %d: no memory for a piece of %zu floats", x->comm->rank, len);
    memcpy(tmp, local, len * sizeof(float));
    int rc = codec_failed(x, hc_codec_decode_add(r->codec, m->data, len, tmp, &r->p));
    return rc == HC_OK ? encode(x, r, tmp, off, len, dst) : rc;
}

/*
 * Reduce-scatter step s (0..n-2). The last one leaves the owned segment's
 * fp32 sum in `last`; with `share` set, each finished piece is also
 * quantized once, decoded back into `last` and sent on as the first
 * allgather step.
 */
static int reduce_step(hc_exec *x, hc_codec_ring *r, int s) {
    const hc_ring *g = &r->g;
    int seg = hc_mod(g->pos - s - 1, g->n), final = s == g->n - 2, rc = HC_OK;
    for (size_t i = 0, np = hc_ring_pieces(g, seg); rc == HC_OK && i < np; i++) {
        size_t off, len;
        hc_ring_piece(g, seg, i, &off, &len);
        const float *local = local_at(r, seg, off);
        hc_msg *m;
        if ((rc = hc_ring_recv(x, g, enc_size(r, len), &m)) != HC_OK) break;
        uint8_t *enc = slot(r, seg, i, final);
        if (!final) {
            rc = hop(x, r, m, local, off, len, enc);
            hc_xrelease(x, m);
            if (rc == HC_OK) rc = hc_xsend(x, g->next, enc, enc_size(r, len));
            continue;
        }
        float *sum = r->last + (off - hc_ring_seg_lo(g, seg));
        if (sum != local) memcpy(sum, local, len * sizeof(float));
        rc = codec_failed(x, hc_codec_decode_add(r->codec, m->data, len, sum, &r->p));
        hc_xrelease(x, m);
        if (rc != HC_OK) break;
        if (r->divide_by > 1) hc_divide_kernel(sum, len, HC_FLOAT32, r->divide_by);
        if (!r->share) continue;
        if ((rc = encode(x, r, sum, off, len, enc)) != HC_OK) break;
        rc = codec_failed(x, hc_codec_decode(r->codec, enc, len, sum, &r->p));
        if (rc == HC_OK) rc = hc_xsend(x, g->next, enc, enc_size(r, len));
    }
    return rc;
}

/* Allgather step s (0..n-2): decode each arriving piece into `out` and pass
 * the same bytes on (kept in the final slots where asked). */
static int gather_step(hc_exec *x, hc_codec_ring *r, int s) {
    const hc_ring *g = &r->g;
    int seg = hc_mod(g->pos - s, g->n), forward = s < g->n - 2;
    for (size_t i = 0, np = hc_ring_pieces(g, seg); i < np; i++) {
        size_t off, len;
        hc_ring_piece(g, seg, i, &off, &len);
        size_t bytes = enc_size(r, len);
        hc_msg *m;
        int rc = hc_ring_recv(x, g, bytes, &m);
        if (rc != HC_OK) return rc;
        uint8_t *enc = slot(r, seg, i, 1);
        if (forward || r->keep_encoded) memcpy(enc, m->data, bytes);
        rc = hc_codec_decode(r->codec, m->data, len, (float *)((char *)r->out + hc_ring_at(g, seg, off)), &r->p);
        hc_xrelease(x, m);
        if ((rc = codec_failed(x, rc)) != HC_OK) return rc;
        if (forward && (rc = hc_xsend(x, g->next, enc, bytes)) != HC_OK) return rc;
    }
    return HC_OK;
}

int hc_codec_ring_step(hc_exec *x, hc_codec_ring *r, int stage) {
    int n = r->g.n;
    x->tx_group = 1; /* arena slots only: never overwritten within the op */
    int rc = stage == 0 ? send_own(x, r, r->g.first_sent, hc_ring_pieces(&r->g, r->g.pos))
             : stage < n ? reduce_step(x, r, stage - 1)
                         : gather_step(x, r, stage - n);
    x->tx_group = 0;
    return rc;
}

const uint8_t *hc_codec_ring_final(const hc_codec_ring *r, int seg, size_t piece, size_t *bytes) {
    size_t off, len;
    hc_ring_piece(&r->g, seg, piece, &off, &len);
    *bytes = enc_size(r, len);
    return slot(r, seg, piece, 1);
}

int hc_codec_ring_decode(hc_exec *x, const hc_codec_ring *r, const hc_msg *m, size_t len, float *dst) {
    if (m->len != enc_size(r, len))
        return hc_xfail(x, HC_ERR_MISMATCH, "rank %d got an encoded piece of %zu bytes, expected %zu",
                        x->comm->rank, m->len, enc_size(r, len));
    return codec_failed(x, hc_codec_decode(r->codec, m->data, len, dst, &r->p));
}

static int run_stages(hc_exec *x, hc_codec_ring *r, int first, int end) {
    int rc = scratch_arena(x, r);
    for (int s = first; rc == HC_OK && s < end; s++) rc = hc_codec_ring_step(x, r, s);
    return rc;
}

int hc_ring_allreduce_codec(hc_exec *x, const hc_ring *g, const float *in, float *out, int divide_by,
                            float *residual) {
    if (g->n == 1) {
        if (in != out && g->count) memcpy(out, in, g->count * sizeof(float));
        if (divide_by > 1) hc_divide_kernel(out, g->count, HC_FLOAT32, divide_by);
        return HC_OK;
    }
    hc_codec_ring r;
    hc_codec_ring_init(x, &r, g);
    r.in = in;
    r.out = out;
    r.last = out + hc_ring_seg_lo(g, hc_mod(g->pos + 1, g->n));
    r.residual = residual;
    r.divide_by = divide_by;
    r.share = 1;
    return run_stages(x, &r, 0, hc_codec_ring_stages(&r));
}

int hc_ring_codec_send_first(hc_exec *x, hc_ring *g, const float *in, size_t upto, float *residual) {
    hc_codec_ring r;
    hc_codec_ring_init(x, &r, g);
    r.in = in;
    r.residual = residual;
    /* The reduce-scatter that follows takes the same scratch arena, so the
     * slots sent here stay untouched until the op ends. */
    int rc = scratch_arena(x, &r);
    x->tx_group = 1;
    if (rc == HC_OK) rc = send_own(x, &r, g->first_sent, upto);
    x->tx_group = 0;
    if (rc == HC_OK) g->first_sent = upto;
    return rc;
}

int hc_ring_reduce_scatter_codec(hc_exec *x, const hc_ring *g, const float *in, float *last, int divide_by,
                                 float *residual) {
    hc_codec_ring r;
    hc_codec_ring_init(x, &r, g);
    r.in = in;
    r.last = last;
    r.residual = residual;
    r.divide_by = divide_by;
    return run_stages(x, &r, 0, g->n);
}

int hc_ring_allgather_codec(hc_exec *x, const hc_ring *g, float *out, float *residual) {
    hc_codec_ring r;
    hc_codec_ring_init(x, &r, g);
    r.out = out;
    r.residual = residual;
    int rc = scratch_arena(x, &r);
    int own = hc_mod(g->pos + 1, g->n);
    float *mine = (float *)((char *)out + hc_ring_at(g, own, hc_ring_seg_lo(g, own)));
    x->tx_group = 1;
    for (size_t i = 0, np = hc_ring_pieces(g, own); rc == HC_OK && i < np; i++) {
        size_t off, len;
        hc_ring_piece(g, own, i, &off, &len);
        uint8_t *enc = slot(&r, own, i, 1);
        float *src = mine + (off - hc_ring_seg_lo(g, own));
        rc = encode(x, &r, src, off, len, enc);
        /* The owner keeps what everyone else decodes. */
        if (rc == HC_OK) rc = codec_failed(x, hc_codec_decode(r.codec, enc, len, src, &r.p));
        if (rc == HC_OK) rc = hc_xsend(x, g->next, enc, enc_size(&r, len));
    }
    x->tx_group = 0;
    for (int s = g->n; rc == HC_OK && s < hc_codec_ring_stages(&r); s++) rc = hc_codec_ring_step(x, &r, s);
    return rc;
}
