/* Scatter from a root: the root sends block r straight to rank r. */
#include <string.h>

#include "core/internal.h"

int hc_scatter_run(hc_exec *x) {
    hc_op *op = x->op;
    hc_comm *c = x->comm;
    size_t bytes = op->count * hc_dtype_size(op->dtype);
    if (c->rank != op->root) return hc_xrecv_run(x, op->root, op->recvbuf, op->count);
    const char *in = op->sendbuf;
    for (int i = 1; i < c->size; i++) {
        int r = (c->rank + i) % c->size;
        int rc = hc_xsend_run(x, r, in + (size_t)r * bytes, op->count);
        if (rc != HC_OK) return rc;
    }
    if (bytes && (const char *)op->recvbuf != in + (size_t)c->rank * bytes)
        memmove(op->recvbuf, in + (size_t)c->rank * bytes, bytes);
    return HC_OK;
}
