/* Barrier by dissemination: in round k every rank signals rank+2^k and
 * waits for rank-2^k; after log2(n) rounds each has heard from all. */
#include "core/internal.h"

int hc_barrier_run(hc_exec *x) {
    int n = x->comm->size, r = x->comm->rank;
    for (int k = 1; k < n; k <<= 1) {
        int rc = hc_xsend_copy(x, (r + k) % n, NULL, 0);
        if (rc == HC_OK) rc = hc_xrecv_into(x, (r - k + n) % n, NULL, 0);
        if (rc != HC_OK) return rc;
    }
    return HC_OK;
}
