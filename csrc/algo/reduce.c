/*
 * Reduce to a root: a binomial tree for small messages, a pipelined chain
 * along the ring (ending at the root) for large ones, where each rank adds
 * its contribution to a piece and passes it on.
 */
#include <string.h>

#include "core/internal.h"

static int tree(hc_exec *x, char *acc) {
    hc_op *op = x->op;
    int n = x->comm->size, r = x->comm->rank, root = op->root;
    size_t bytes = op->count * hc_dtype_size(op->dtype);
    int vr = (r - root + n) % n;
    for (int mask = 1; mask < n; mask <<= 1) {
        if (vr & mask) return hc_xsend_copy(x, ((vr & ~mask) + root) % n, acc, bytes);
        if ((vr | mask) >= n) continue;
        int src = ((vr | mask) + root) % n;
        hc_msg *m;
        int rc = hc_xrecv(x, src, &m);
        if (rc != HC_OK) return rc;
        if (m->len != bytes)
            rc = hc_xfail(x, HC_ERR_MISMATCH, "rank %d got %zu bytes from rank %d, expected %zu", r, m->len, src, bytes);
        else
            hc_reduce_kernel(acc, acc, m->data, op->count, op->dtype, op->redop);
        hc_xrelease(x, m);
        if (rc != HC_OK) return rc;
    }
    return HC_OK;
}

static int chain(hc_exec *x, char *acc) {
    hc_op *op = x->op;
    hc_comm *c = x->comm;
    int n = c->size, root_pos = 0;
    for (int i = 0; i < n; i++)
        if (c->ring[i] == op->root) root_pos = i;
    int cp = (c->ring_pos - root_pos - 1 + 2 * n) % n; /* the root is last */
    int prev = c->ring[(c->ring_pos - 1 + n) % n], next = c->ring[(c->ring_pos + 1) % n];
    if (cp == 0) return hc_xsend_run(x, next, op->sendbuf, op->count);
    size_t es = hc_dtype_size(op->dtype), ce = hc_chunk_elems(x), np = hc_piece_count(op->count, ce);
    const char *in = op->sendbuf;
    for (size_t k = 0; k < np; k++) {
        size_t lo = k * ce, len = lo + ce < op->count ? ce : op->count - lo;
        hc_msg *m;
        int rc = hc_xrecv(x, prev, &m);
        if (rc != HC_OK) return rc;
        if (m->len != len * es)
            rc = hc_xfail(x, HC_ERR_MISMATCH, "rank %d: reduce piece of %zu bytes from rank %d, expected %zu",
                          c->rank, m->len, prev, len * es);
        else
            hc_reduce_kernel(acc + lo * es, in + lo * es, m->data, len, op->dtype, op->redop);
        hc_xrelease(x, m);
        if (rc == HC_OK && cp < n - 1) rc = hc_xsend(x, next, acc + lo * es, len * es);
        if (rc != HC_OK) return rc;
    }
    return HC_OK;
}

int hc_reduce_run(hc_exec *x) {
    hc_op *op = x->op;
    hc_comm *c = x->comm;
    size_t bytes = op->count * hc_dtype_size(op->dtype);
    int is_root = c->rank == op->root;
    /* Non-roots have no output buffer; partial results go to a work buffer. */
    char *acc = is_root ? op->recvbuf : hc_comm_scratch(c, HC_SCRATCH_WORK, bytes);
    if (!acc && bytes) return hc_xfail(x, HC_ERR_NO_MEMORY, "rank %d: no memory for a %zu-byte reduce buffer", c->rank, bytes);
    int small = bytes < c->cfg.small_bytes;
    if (small && acc != op->sendbuf && bytes) memcpy(acc, op->sendbuf, bytes);
    int rc = c->size == 1 ? HC_OK : small ? tree(x, acc) : chain(x, acc);
    if (rc == HC_OK && is_root && op->redop == HC_AVG) hc_divide_kernel(acc, op->count, op->dtype, c->size);
    if (rc == HC_OK && c->size == 1 && acc != op->sendbuf && bytes) memcpy(acc, op->sendbuf, bytes);
    return rc;
}
