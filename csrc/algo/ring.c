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
#include <string.h>

#include "core/internal.h"

typedef struct ring {
    int n, pos, next, prev;
    const int *order;
    size_t es, count, ce; /* element size, elements in total, elements per piece */
    size_t block;         /* 0: segments split one buffer (allreduce); else
                             segment i is the block of rank order[i-1] */
} ring;

static int mod(int a, int n) { return ((a % n) + n) % n; }

static void ring_init(hc_exec *x, ring *g, size_t count, size_t block) {
    hc_comm *c = x->comm;
    g->n = c->size;
    g->pos = c->ring_pos;
    g->order = c->ring;
    g->next = c->ring[(g->pos + 1) % g->n];
    g->prev = c->ring[(g->pos - 1 + g->n) % g->n];
    g->es = hc_dtype_size(x->op->dtype);
    g->count = count;
    g->block = block;
    g->ce = hc_chunk_elems(x);
}

static size_t seg_lo(const ring *g, int seg) { return hc_split(g->count, g->n, seg); }
static size_t seg_hi(const ring *g, int seg) { return hc_split(g->count, g->n, seg + 1); }

static size_t pieces_of(const ring *g, int seg) { return hc_piece_count(seg_hi(g, seg) - seg_lo(g, seg), g->ce); }

/* Piece k of segment seg: offset (in segment space) and length, in elements. */
static void piece(const ring *g, int seg, size_t k, size_t *off, size_t *len) {
    size_t hi = seg_hi(g, seg);
    *off = seg_lo(g, seg) + k * g->ce;
    size_t end = *off + g->ce < hi ? *off + g->ce : hi;
    *len = end > *off ? end - *off : 0;
}

/* Where an element of segment space lives in a caller's buffer, in bytes. */
static size_t at(const ring *g, int seg, size_t off) {
    if (!g->block) return off * g->es;
    return ((size_t)g->order[mod(seg - 1, g->n)] * g->block + (off - seg_lo(g, seg))) * g->es;
}

static int recv_piece(hc_exec *x, const ring *g, size_t len, hc_msg **m) {
    int rc = hc_xrecv(x, g->prev, m);
    if (rc != HC_OK) return rc;
    if ((*m)->len != len * g->es) {
        rc = hc_xfail(x, HC_ERR_MISMATCH,
                      "rank %d received a piece of %zu bytes from rank %d where %zu were expected; "
                      "the ranks' buffer sizes differ",
                      x->comm->rank, (*m)->len, g->prev, len * g->es);
        hc_xrelease(x, *m);
    }
    return rc;
}

static int send_segment(hc_exec *x, const ring *g, int seg, const char *buf) {
    for (size_t k = 0, np = pieces_of(g, seg); k < np; k++) {
        size_t off, len;
        piece(g, seg, k, &off, &len);
        int rc = hc_xsend(x, g->next, buf + at(g, seg, off), len * g->es);
        if (rc != HC_OK) return rc;
    }
    return HC_OK;
}

/*
 * Reduce-scatter: afterwards ring position pos holds the full reduction of
 * segment pos+1 — in `work`, or at `last` (a buffer of just that segment)
 * when given. `in` holds this rank's contribution, `work` takes the partial
 * sums (it may be `in`). With `final_group` >= 0 each finished piece of the
 * owned segment is sent on at once, as the first step of an allgather.
 */
static int reduce_scatter_phase(hc_exec *x, const ring *g, const char *in, char *work, char *last,
                                int divide, int final_group) {
    hc_op *op = x->op;
    int n = g->n;
    x->tx_group = 0;
    int rc = send_segment(x, g, g->pos, in);
    for (int s = 0; rc == HC_OK && s < n - 1; s++) {
        int seg = mod(g->pos - s - 1, n);
        int final = s == n - 2;
        for (size_t k = 0, np = pieces_of(g, seg); rc == HC_OK && k < np; k++) {
            size_t off, len;
            piece(g, seg, k, &off, &len);
            hc_msg *m;
            if ((rc = recv_piece(x, g, len, &m)) != HC_OK) break;
            char *dst = final && last ? last + (off - seg_lo(g, seg)) * g->es : work + at(g, seg, off);
            hc_reduce_kernel(dst, in + at(g, seg, off), m->data, len, op->dtype, op->redop);
            hc_xrelease(x, m);
            if (final && divide) hc_divide_kernel(dst, len, op->dtype, n);
            if (!final || final_group >= 0) {
                x->tx_group = final ? final_group : 0;
                rc = hc_xsend(x, g->next, dst, len * g->es);
            }
        }
    }
    return rc;
}

/* Allgather: position pos starts owning segment pos+1 (already sent on) and
 * ends with every segment in `out`. */
static int allgather_phase(hc_exec *x, const ring *g, char *out) {
    int n = g->n;
    for (int s = 0; s < n - 1; s++) {
        int seg = mod(g->pos - s, n);
        for (size_t k = 0, np = pieces_of(g, seg); k < np; k++) {
            size_t off, len;
            piece(g, seg, k, &off, &len);
            hc_msg *m;
            int rc = recv_piece(x, g, len, &m);
            if (rc != HC_OK) return rc;
            char *dst = out + at(g, seg, off);
            if (len) memcpy(dst, m->data, len * g->es);
            hc_xrelease(x, m);
            /* Passed on from where it landed: that region is final, so the
             * zero-copy send needs no further care. */
            if (s < n - 2 && (rc = hc_xsend(x, g->next, dst, len * g->es)) != HC_OK) return rc;
        }
    }
    return HC_OK;
}

int hc_allreduce_ring(hc_exec *x) {
    hc_op *op = x->op;
    ring g;
    ring_init(x, &g, op->count, 0);
    char *out = op->recvbuf;
    if (g.n == 1) {
        if (op->sendbuf != op->recvbuf && op->count) memcpy(out, op->sendbuf, op->count * g.es);
        return HC_OK;
    }
    int rc = reduce_scatter_phase(x, &g, op->sendbuf, out, NULL, op->redop == HC_AVG, 1);
    /* The allgather overwrites segments this rank sent during the
     * reduce-scatter; ZeroMQ must be done reading them. */
    if (rc == HC_OK) rc = hc_xsend_wait(x, 0);
    if (rc == HC_OK) rc = allgather_phase(x, &g, out);
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
    /* Partial sums cannot go into the caller's input, so they go to a work
     * buffer kept by the communicator. */
    char *work = hc_comm_scratch(c, 0, block * (size_t)c->size * es);
    if (!work && block)
        return hc_xfail(x, HC_ERR_NO_MEMORY, "rank %d: no memory for a %zu-byte reduce_scatter work buffer",
                        c->rank, block * (size_t)c->size * es);
    ring g;
    ring_init(x, &g, block * (size_t)c->size, block);
    return reduce_scatter_phase(x, &g, op->sendbuf, work, op->recvbuf, op->redop == HC_AVG, -1);
}

int hc_allgather_ring(hc_exec *x) {
    hc_op *op = x->op;
    hc_comm *c = x->comm;
    size_t es = hc_dtype_size(op->dtype), block = op->count;
    char *out = op->recvbuf;
    char *mine = out + (size_t)c->rank * block * es;
    if (op->sendbuf != mine && block) memmove(mine, op->sendbuf, block * es);
    if (c->size == 1) return HC_OK;
    ring g;
    ring_init(x, &g, block * (size_t)c->size, block);
    x->tx_group = 1;
    int rc = send_segment(x, &g, mod(g.pos + 1, g.n), out); /* own block: segment pos+1 */
    return rc == HC_OK ? allgather_phase(x, &g, out) : rc;
}
