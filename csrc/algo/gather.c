/* Gather to a root: every rank sends its block straight to the root, which
 * takes them in rank order (early arrivals wait, uncopied, in the stash). */
#include <string.h>

#include "core/internal.h"

int hc_gather_run(hc_exec *x) {
    hc_op *op = x->op;
    hc_comm *c = x->comm;
    size_t bytes = op->count * hc_dtype_size(op->dtype);
    if (c->rank != op->root) return hc_xsend_run(x, op->root, op->sendbuf, op->count);
    char *out = op->recvbuf;
    if (bytes && out + (size_t)c->rank * bytes != op->sendbuf) memmove(out + (size_t)c->rank * bytes, op->sendbuf, bytes);
    for (int r = 0; r < c->size; r++) {
        if (r == c->rank) continue;
        int rc = hc_xrecv_run(x, r, out + (size_t)r * bytes, op->count);
        if (rc != HC_OK) return rc;
    }
    return HC_OK;
}
