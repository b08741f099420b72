/*
 * All-to-all (equal or per-rank counts): every send is posted first, zero
 * copy, so ZeroMQ streams to all peers at once; then blocks are taken from
 * each peer in turn, starting with the nearest, while later ones queue.
 */
#include <string.h>

#include "core/internal.h"

int hc_alltoall_run(hc_exec *x) {
    hc_op *op = x->op;
    hc_comm *c = x->comm;
    int n = c->size, r = c->rank;
    size_t es = hc_dtype_size(op->dtype);
    const size_t *v = op->vcounts; /* sendcounts, sdispls, recvcounts, rdispls */
    const char *in = op->sendbuf;
    char *out = op->recvbuf;
    /* Extent of each buffer: the furthest block end. */
    size_t in_bytes = 0, out_bytes = 0;
    for (int p = 0; p < n; p++) {
        size_t se = (v ? v[n + p] + v[p] : (size_t)(p + 1) * op->count) * es;
        size_t re = (v ? v[3 * n + p] + v[2 * n + p] : (size_t)(p + 1) * op->count) * es;
        in_bytes = se > in_bytes ? se : in_bytes;
        out_bytes = re > out_bytes ? re : out_bytes;
    }
    if (in_bytes && out_bytes && in < out + out_bytes && out < in + in_bytes) {
        /* In place: the zero-copy sends must not see blocks being received. */
        char *copy = hc_comm_scratch(c, HC_SCRATCH_TMP, in_bytes);
        if (!copy) return hc_xfail(x, HC_ERR_NO_MEMORY, "rank %d: no memory for an in-place alltoall", r);
        memcpy(copy, in, in_bytes);
        in = copy;
    }
#define SCOUNT(p) (v ? v[(p)] : op->count)
#define SDISPL(p) (v ? v[n + (p)] : (size_t)(p) * op->count)
#define RCOUNT(p) (v ? v[2 * n + (p)] : op->count)
#define RDISPL(p) (v ? v[3 * n + (p)] : (size_t)(p) * op->count)
    for (int i = 1; i < n; i++) {
        int dst = (r + i) % n;
        int rc = hc_xsend_run(x, dst, in + SDISPL(dst) * es, SCOUNT(dst));
        if (rc != HC_OK) return rc;
    }
    if (SCOUNT(r) != RCOUNT(r))
        return hc_xfail(x, HC_ERR_INVALID_ARGUMENT, "rank %d sends %zu elements to itself but expects %zu", r,
                        SCOUNT(r), RCOUNT(r));
    if (SCOUNT(r)) memmove(out + RDISPL(r) * es, in + SDISPL(r) * es, SCOUNT(r) * es);
    for (int i = 1; i < n; i++) {
        int src = (r - i + n) % n;
        int rc = hc_xrecv_run(x, src, out + RDISPL(src) * es, RCOUNT(src));
        if (rc != HC_OK) return rc;
    }
    return HC_OK;
#undef SCOUNT
#undef SDISPL
#undef RCOUNT
#undef RDISPL
}
