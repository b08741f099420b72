/*
 * Broadcast: a binomial tree for small messages (log2(n) hops), a pipelined
 * chain along the ring for large ones (every link busy, about one buffer
 * time plus a piece per hop).
 */
#include <string.h>

#include "core/internal.h"

static int tree(hc_exec *x) {
    hc_op *op = x->op;
    int n = x->comm->size, r = x->comm->rank, root = op->root;
    int vr = (r - root + n) % n;
    int mask = 1, rc = HC_OK;
    while (mask < n) {
        if (vr & mask) {
            rc = hc_xrecv_run(x, (vr - mask + root) % n, op->recvbuf, op->count);
            break;
        }
        mask <<= 1;
    }
    /* The buffer is final once received, so children can be sent it zero-copy. */
    for (mask >>= 1; rc == HC_OK && mask > 0; mask >>= 1)
        if (vr + mask < n) rc = hc_xsend_run(x, (vr + mask + root) % n, op->recvbuf, op->count);
    return rc;
}

static int chain(hc_exec *x) {
    hc_op *op = x->op;
    hc_comm *c = x->comm;
    int n = c->size, root_pos = 0;
    for (int i = 0; i < n; i++)
        if (c->ring[i] == op->root) root_pos = i;
    int cp = (c->ring_pos - root_pos + n) % n;
    int prev = c->ring[(c->ring_pos - 1 + n) % n], next = c->ring[(c->ring_pos + 1) % n];
    if (cp == 0) return hc_xsend_run(x, next, op->recvbuf, op->count);
    size_t es = hc_dtype_size(op->dtype), ce = hc_chunk_elems(x), np = hc_piece_count(op->count, ce);
    for (size_t k = 0; k < np; k++) {
        size_t lo = k * ce, len = lo + ce < op->count ? ce : op->count - lo;
        hc_msg *m;
        int rc = hc_xrecv(x, prev, &m);
        if (rc != HC_OK) return rc;
        char *dst = (char *)op->recvbuf + lo * es;
        if (m->len != len * es)
            rc = hc_xfail(x, HC_ERR_MISMATCH, "rank %d: broadcast piece of %zu bytes from rank %d, expected %zu",
                          c->rank, m->len, prev, len * es);
        else if (len)
            memcpy(dst, m->data, len * es);
        hc_xrelease(x, m);
        if (rc == HC_OK && cp < n - 1) rc = hc_xsend(x, next, dst, len * es);
        if (rc != HC_OK) return rc;
    }
    return HC_OK;
}

int hc_broadcast_run(hc_exec *x) {
    if (x->comm->size == 1) return HC_OK;
    size_t bytes = x->op->count * hc_dtype_size(x->op->dtype);
    return bytes < x->comm->cfg.small_bytes ? tree(x) : chain(x);
}
