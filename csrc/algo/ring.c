/*
 * Ring algorithms: reduce-scatter, allgather, and allreduce as the two
 * back to back. The ring follows the site-aware order, so each link between
 * sites carries one segment per step. Every segment moves as pieces, and a
 * piece goes on to the next rank as soon as it is reduced, so receiving,
 * reducing and sending overlap all along the ring.
 *
 * All ranks end bit-identical: each segment is reduced completely at one
 * rank (its owner) and every other rank copies the owner's bytes.
 */
#include "algo/ring.h"
#include "algo/sites.h"

#include <inttypes.h>
#include <string.h>

#include "kernels/convert.h"

void hc_ring_init(hc_exec *x, hc_ring *g, const int *members, int n, size_t count, size_t block, size_t esize) {
    hc_comm *c = x->comm;
    g->n = n;
    g->order = members;
    g->pos = 0;
    for (int i = 0; i < n; i++)
        if (members[i] == c->rank) g->pos = i;
    g->next = members[(g->pos + 1) % n];
    g->prev = members[(g->pos - 1 + n) % n];
    g->es = esize;
    g->dtype = esize == hc_dtype_size(x->op->dtype) ? x->op->dtype : HC_FLOAT32;
    g->count = count;
    g->block = block;
    g->on_final = NULL;
    g->on_final_ctx = NULL;
    g->first_sent = 0;
    /* Pieces of chunk_bytes at most, but at least a few per segment so that
     * medium messages still pipeline (not below 256 KiB: each piece costs a
     * message and, often, a thread wake-up). */
    size_t ce = c->cfg.chunk_bytes / esize, seg = count / (size_t)n, floor_ce = (256u << 10) / esize;
    if (seg / 4 < ce) ce = seg / 4 > floor_ce ? seg / 4 : floor_ce;
    if (ce > c->cfg.chunk_bytes / esize) ce = c->cfg.chunk_bytes / esize;
    g->ce = ce ? ce : 1;
}

void hc_ring_piece(const hc_ring *g, int seg, size_t k, size_t *off, size_t *len) {
    size_t hi = hc_ring_seg_hi(g, seg);
    *off = hc_ring_seg_lo(g, seg) + k * g->ce;
    size_t end = *off + g->ce < hi ? *off + g->ce : hi;
    *len = end > *off ? end - *off : 0;
}

size_t hc_ring_at(const hc_ring *g, int seg, size_t off) {
    if (!g->block) return off * g->es;
    return ((size_t)g->order[hc_mod(seg - 1, g->n)] * g->block + (off - hc_ring_seg_lo(g, seg))) * g->es;
}

int hc_ring_recv(hc_exec *x, const hc_ring *g, size_t bytes, hc_msg **m) {
    int rc = hc_xrecv(x, g->prev, m);
    if (rc != HC_OK) return rc;
    if ((*m)->len == bytes) return HC_OK;
    hc_comm *c = x->comm;
    if (hc_single_copy_is_addr((*m)->data, (*m)->len)) {
        char who[160];
        rc = hc_xfail(x, HC_ERR_MISMATCH,
                      "%s read its peers' buffers directly in %s #%" PRIu64 " while rank %d ran the rings: "
                      "HETCOMM_CMA or HETCOMM_SMALL_BYTES differ across ranks",
                      hc_peer_desc(c, g->prev, who, sizeof who), hc_op_kind_name(x->op->kind), x->op->seq, c->rank);
    } else {
        rc = hc_xfail(x, HC_ERR_MISMATCH,
                      "rank %d received a piece of %zu bytes from rank %d where %zu were expected; "
                      "the ranks' buffer sizes or codec settings differ",
                      c->rank, (*m)->len, g->prev, bytes);
    }
    hc_xrelease(x, *m);
    return rc;
}

static int send_pieces(hc_exec *x, const hc_ring *g, int seg, size_t from, size_t to, const char *buf) {
    for (size_t k = from; k < to; k++) {
        size_t off, len;
        hc_ring_piece(g, seg, k, &off, &len);
        int rc = hc_xsend(x, g->next, buf + hc_ring_at(g, seg, off), len * g->es);
        if (rc != HC_OK) return rc;
    }
    return HC_OK;
}

int hc_ring_send_segment(hc_exec *x, const hc_ring *g, int seg, const char *buf) {
    return send_pieces(x, g, seg, 0, hc_ring_pieces(g, seg), buf);
}

int hc_ring_send_first(hc_exec *x, hc_ring *g, const char *in, size_t upto) {
    int rc = send_pieces(x, g, g->pos, g->first_sent, upto, in);
    if (rc == HC_OK) g->first_sent = upto;
    return rc;
}

int hc_ring_reduce_scatter(hc_exec *x, const hc_ring *g, const char *in, char *work, char *last,
                           int divide_by, int final_group) {
    hc_op *op = x->op;
    int n = g->n;
    x->tx_group = 0;
    int rc = send_pieces(x, g, g->pos, g->first_sent, hc_ring_pieces(g, g->pos), in);
    for (int s = 0; rc == HC_OK && s < n - 1; s++) {
        int seg = hc_mod(g->pos - s - 1, n);
        int final = s == n - 2;
        for (size_t k = 0, np = hc_ring_pieces(g, seg); rc == HC_OK && k < np; k++) {
            size_t off, len;
            hc_ring_piece(g, seg, k, &off, &len);
            hc_msg *m;
            if ((rc = hc_ring_recv(x, g, len * g->es, &m)) != HC_OK) break;
            char *dst = final && last ? last + (off - hc_ring_seg_lo(g, seg)) * g->es : work + hc_ring_at(g, seg, off);
            hc_reduce_kernel(dst, in + hc_ring_at(g, seg, off), m->data, len, g->dtype, op->redop);
            hc_xrelease(x, m);
            if (final && divide_by > 1) hc_divide_kernel(dst, len, g->dtype, divide_by);
            if (final && g->on_final && (rc = g->on_final(x, g, seg, k, g->on_final_ctx)) != HC_OK) break;
            if (!final || final_group >= 0) {
                x->tx_group = final ? final_group : 0;
                rc = hc_xsend(x, g->next, dst, len * g->es);
            }
        }
    }
    return rc;
}

int hc_ring_allgather(hc_exec *x, const hc_ring *g, char *out) {
    int n = g->n;
    for (int s = 0; s < n - 1; s++) {
        int seg = hc_mod(g->pos - s, n);
        for (size_t k = 0, np = hc_ring_pieces(g, seg); k < np; k++) {
            size_t off, len;
            hc_ring_piece(g, seg, k, &off, &len);
            hc_msg *m;
            int rc = hc_ring_recv(x, g, len * g->es, &m);
            if (rc != HC_OK) return rc;
            char *dst = out + hc_ring_at(g, seg, off);
            if (len) memcpy(dst, m->data, len * g->es);
            hc_xrelease(x, m);
            /* Passed on from where it landed: that region is final, so the
             * zero-copy send needs no further care. */
            if (s < n - 2 && (rc = hc_xsend(x, g->next, dst, len * g->es)) != HC_OK) return rc;
            if (g->on_final && (rc = g->on_final(x, g, seg, k, g->on_final_ctx)) != HC_OK) return rc;
        }
    }
    return HC_OK;
}

int hc_ring_allreduce(hc_exec *x, const hc_ring *g, const void *in, void *out, int divide_by) {
    if (g->n == 1) {
        if (in != out && g->count) memcpy(out, in, g->count * g->es);
        if (divide_by > 1) hc_divide_kernel(out, g->count, g->dtype, divide_by);
        return HC_OK;
    }
    int rc = hc_ring_reduce_scatter(x, g, in, out, NULL, divide_by, 1);
    /* The allgather overwrites segments this rank sent during the
     * reduce-scatter; ZeroMQ must be done reading them. */
    if (rc == HC_OK) rc = hc_xsend_wait(x, 0);
    if (rc == HC_OK) rc = hc_ring_allgather(x, g, out);
    return rc;
}

/* ---- the flat collectives ---- */

int hc_allreduce_ring(hc_exec *x) {
    hc_op *op = x->op;
    hc_ring g;
    hc_ring_init(x, &g, x->comm->ring, x->comm->size, op->count, 0, hc_dtype_size(op->dtype));
    return hc_ring_allreduce(x, &g, op->sendbuf, op->recvbuf, op->redop == HC_AVG ? x->comm->size : 0);
}

/* Float data through fp32 for the codecs: `count` elements of the op's
 * dtype at `src` as fp32 (the buffer itself when it already is). */
static float *as_f32(hc_exec *x, int slot, const void *src, size_t count) {
    if (x->op->dtype == HC_FLOAT32) return (float *)src;
    float *f = hc_comm_scratch(x->comm, slot, count * sizeof(float));
    if (f && src) hc_convert_to_f32(f, src, count, x->op->dtype);
    return f;
}

static int reduce_scatter_codec(hc_exec *x) {
    hc_op *op = x->op;
    hc_comm *c = x->comm;
    size_t total = op->count * (size_t)c->size;
    const float *in = as_f32(x, HC_SCRATCH_STAGE, op->sendbuf, total);
    float *last = op->dtype == HC_FLOAT32 ? op->recvbuf : as_f32(x, HC_SCRATCH_WORK, NULL, op->count);
    float *residual = op->opts.residual_key ? hc_residual_get(c, op->opts.residual_key, total) : NULL;
    if ((!in || !last || (op->opts.residual_key && !residual)) && total)
        return hc_xfail(x, HC_ERR_NO_MEMORY, "rank %d: no memory to stage a compressed reduce_scatter", c->rank);
    hc_ring g;
    hc_ring_init(x, &g, c->ring, c->size, total, op->count, sizeof(float));
    int rc = hc_ring_reduce_scatter_codec(x, &g, in, last, op->redop == HC_AVG ? c->size : 0, residual);
    if (rc == HC_OK && last != op->recvbuf) hc_convert_from_f32(op->recvbuf, last, op->count, op->dtype);
    return rc;
}

int hc_reduce_scatter_ring(hc_exec *x) {
    hc_op *op = x->op;
    hc_comm *c = x->comm;
    size_t es = hc_dtype_size(op->dtype), block = op->count;
    if (c->size == 1) {
        if (op->sendbuf != op->recvbuf && block) memcpy(op->recvbuf, op->sendbuf, block * es);
        return HC_OK;
    }
    if (hc_sites_hierarchical(c, op)) return hc_reduce_scatter_hierarchical(x);
    if (op->codec != HC_CODEC_NONE) return reduce_scatter_codec(x);
    /* Partial sums cannot go into the caller's input, so they go to a work
     * buffer kept by the communicator. */
    char *work = hc_comm_scratch(c, HC_SCRATCH_WORK, block * (size_t)c->size * es);
    if (!work && block)
        return hc_xfail(x, HC_ERR_NO_MEMORY, "rank %d: no memory for a %zu-byte reduce_scatter work buffer",
                        c->rank, block * (size_t)c->size * es);
    hc_ring g;
    hc_ring_init(x, &g, c->ring, c->size, block * (size_t)c->size, block, es);
    return hc_ring_reduce_scatter(x, &g, op->sendbuf, work, op->recvbuf, op->redop == HC_AVG ? c->size : 0, -1);
}

int hc_allgather_ring(hc_exec *x) {
    hc_op *op = x->op;
    hc_comm *c = x->comm;
    size_t es = hc_dtype_size(op->dtype), block = op->count;
    char *out = op->recvbuf;
    char *mine = out + (size_t)c->rank * block * es;
    if (op->sendbuf != mine && block) memmove(mine, op->sendbuf, block * es);
    if (c->size == 1) return HC_OK;
    /* Parameters stay exact: a codec here is only ever asked for per call. */
    if (op->codec == HC_CODEC_NONE && hc_sites_hierarchical(c, op)) return hc_allgather_hierarchical(x);
    if (op->codec != HC_CODEC_NONE) {
        size_t total = block * (size_t)c->size;
        float *out32 = as_f32(x, HC_SCRATCH_STAGE, op->dtype == HC_FLOAT32 ? out : NULL, total);
        if (!out32 && total) return hc_xfail(x, HC_ERR_NO_MEMORY, "rank %d: no memory to stage a compressed allgather", c->rank);
        if (out32 != (float *)out) hc_convert_to_f32(out32 + (size_t)c->rank * block, mine, block, op->dtype);
        float *residual = op->opts.residual_key ? hc_residual_get(c, op->opts.residual_key, total) : NULL;
        hc_ring g;
        hc_ring_init(x, &g, c->ring, c->size, total, block, sizeof(float));
        int rc = hc_ring_allgather_codec(x, &g, out32, residual);
        if (rc == HC_OK && out32 != (float *)out) hc_convert_from_f32(out, out32, total, op->dtype);
        return rc;
    }
    hc_ring g;
    hc_ring_init(x, &g, c->ring, c->size, block * (size_t)c->size, block, es);
    x->tx_group = 1;
    int rc = hc_ring_send_segment(x, &g, hc_mod(g.pos + 1, g.n), out); /* own block: segment pos+1 */
    return rc == HC_OK ? hc_ring_allgather(x, &g, out) : rc;
}
