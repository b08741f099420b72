/*
 * Recursive-doubling allreduce, for small messages where latency rules:
 * log2(n) rounds of whole-buffer exchanges. A world that is not a power of
 * two first folds its extra ranks into partners and unfolds at the end.
 *
 * Both partners of a round compute f(lower rank's data, higher rank's data)
 * with the operands in that order, so every rank ends with the same bits
 * even for NaN payloads, and the folded ranks receive a copy.
 */
#include <string.h>

#include "core/internal.h"

/* acc = (lower, higher) reduction of acc (mine) and msg (theirs). */
static void combine(hc_exec *x, char *acc, const hc_msg *m, int mine_is_lower) {
    hc_op *op = x->op;
    if (mine_is_lower)
        hc_reduce_kernel(acc, acc, m->data, op->count, op->dtype, op->redop);
    else
        hc_reduce_kernel(acc, m->data, acc, op->count, op->dtype, op->redop);
}

static int exchange(hc_exec *x, int partner, char *acc, size_t bytes, int mine_is_lower) {
    /* A copying send: acc is overwritten right after. */
    int rc = hc_xsend_copy(x, partner, acc, bytes);
    hc_msg *m;
    if (rc == HC_OK) rc = hc_xrecv(x, partner, &m);
    if (rc != HC_OK) return rc;
    if (m->len != bytes)
        rc = hc_xfail(x, HC_ERR_MISMATCH, "rank %d got %zu bytes from rank %d, expected %zu", x->comm->rank,
                      m->len, partner, bytes);
    else
        combine(x, acc, m, mine_is_lower);
    hc_xrelease(x, m);
    return rc;
}

int hc_allreduce_recursive_doubling(hc_exec *x) {
    hc_op *op = x->op;
    int n = x->comm->size, r = x->comm->rank;
    size_t bytes = op->count * hc_dtype_size(op->dtype);
    char *acc = op->recvbuf;
    if (op->sendbuf != op->recvbuf && bytes) memcpy(acc, op->sendbuf, bytes);
    if (n == 1) return HC_OK;

    int pof2 = 1;
    while (pof2 * 2 <= n) pof2 *= 2;
    int rem = n - pof2, vr, rc = HC_OK;
    if (r < 2 * rem) {
        if (r % 2 == 0) { /* fold into r+1 and wait for the result */
            rc = hc_xsend_copy(x, r + 1, acc, bytes);
            vr = -1;
        } else {
            hc_msg *m;
            if ((rc = hc_xrecv(x, r - 1, &m)) != HC_OK) return rc;
            if (m->len != bytes)
                rc = hc_xfail(x, HC_ERR_MISMATCH, "rank %d got %zu bytes from rank %d, expected %zu", r, m->len,
                              r - 1, bytes);
            else
                combine(x, acc, m, 0);
            hc_xrelease(x, m);
            vr = r / 2;
        }
    } else {
        vr = r - rem;
    }
    for (int mask = 1; rc == HC_OK && vr >= 0 && mask < pof2; mask <<= 1) {
        int vp = vr ^ mask;
        int partner = vp < rem ? vp * 2 + 1 : vp + rem;
        rc = exchange(x, partner, acc, bytes, vr < vp);
    }
    if (rc == HC_OK && vr >= 0 && op->redop == HC_AVG) hc_divide_kernel(acc, op->count, op->dtype, n);
    if (rc != HC_OK || r >= 2 * rem) return rc;
    if (r % 2 == 1) return hc_xsend_copy(x, r - 1, acc, bytes);
    return hc_xrecv_into(x, r + 1, acc, bytes);
}
