/*
 * Hierarchical allgather across sites (S sites of m ranks each), exact:
 *
 *   1. the ranks of each column (the same local index in every site)
 *      allgather their blocks across sites;
 *   2. each rank sends the S blocks of its column to the other ranks of its
 *      site.
 *
 * Each block crosses between two sites once per direction, where a flat
 * ring carries n-1 blocks over each WAN link it crosses (at 2 sites x 2
 * ranks: 2 blocks per direction instead of 3).
 */
#include "algo/ring.h"
#include "algo/sites.h"

int hc_allgather_hierarchical(hc_exec *x) {
    hc_comm *c = x->comm;
    hc_op *op = x->op;
    int nsites = c->nsites, m = hc_sites_uniform(c), site = c->peers[c->rank].site;
    int table[nsites * m], column[nsites];
    int lp = hc_site_table(c, m, table);
    for (int s = 0; s < nsites; s++) column[s] = table[s * m + lp];
    size_t es = hc_dtype_size(op->dtype), block = op->count;
    char *out = op->recvbuf; /* this rank's block is already in place */

    hc_ring col_ring;
    hc_ring_init(x, &col_ring, column, nsites, (size_t)nsites * block, block, es);
    x->tx_group = 1;
    int rc = hc_ring_send_segment(x, &col_ring, hc_mod(col_ring.pos + 1, nsites), out);
    if (rc == HC_OK) rc = hc_ring_allgather(x, &col_ring, out);
    /* The column's blocks are final now: zero-copy sends from `out` are safe. */
    const int *local = table + site * m;
    for (int i = 1; i < m && rc == HC_OK; i++)
        for (int s = 0; s < nsites && rc == HC_OK; s++)
            rc = hc_xsend_run(x, local[(lp + i) % m], out + (size_t)column[s] * block * es, block);
    for (int i = 1; i < m && rc == HC_OK; i++) {
        int q = (lp - i + m) % m;
        for (int s = 0; s < nsites && rc == HC_OK; s++)
            rc = hc_xrecv_run(x, local[q], out + (size_t)table[s * m + q] * block * es, block);
    }
    return rc;
}
