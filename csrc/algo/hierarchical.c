/*
 * Hierarchical allreduce across sites, with every inter-site link busy:
 *
 *   1. reduce-scatter inside each site (fast links): local rank j ends
 *      holding the site's partial sum of shard j;
 *   2. the j-th ranks of all sites allreduce shard j across sites, in
 *      parallel for every j, with the codec (if any) on this leg only;
 *   3. allgather inside each site.
 *
 * Each byte of the tensor crosses the WAN about once per direction, where a
 * flat ring over all ranks sends 2(n-1)/n of it. Needs the same number of
 * ranks in every site (the caller checks; otherwise it uses the flat ring).
 */
#include <string.h>

#include "algo/ring.h"

/* Ranks of `site` in ring order; returns how many. */
static int site_members(const hc_comm *c, int site, int *out) {
    int k = 0;
    for (int i = 0; i < c->size; i++)
        if (c->peers[c->ring[i]].site == site) out[k++] = c->ring[i];
    return k;
}

int hc_sites_uniform(const hc_comm *c) {
    int first = 0;
    for (int s = 0; s < c->nsites; s++) {
        int k = 0;
        for (int r = 0; r < c->size; r++) k += c->peers[r].site == s;
        if (s == 0) first = k;
        if (k != first) return 0;
    }
    return first;
}

int hc_allreduce_hierarchical(hc_exec *x, const void *in, void *out, size_t count, size_t es, int compressed,
                              float *residual) {
    hc_comm *c = x->comm;
    int nsites = c->nsites, m = hc_sites_uniform(c);
    int local[m], column[nsites], tmp[m];
    site_members(c, c->peers[c->rank].site, local);
    int lp = 0;
    for (int i = 0; i < m; i++)
        if (local[i] == c->rank) lp = i;
    for (int s = 0; s < nsites; s++) {
        site_members(c, s, tmp);
        column[s] = tmp[lp];
    }
    int divide_by = x->op->redop == HC_AVG ? c->size : 0;
    char *o = out;

    hc_ring site_ring, col_ring;
    hc_ring_init(x, &site_ring, local, m, count, 0, es);
    int rc = HC_OK;
    if (m > 1)
        rc = hc_ring_reduce_scatter(x, &site_ring, in, out, NULL, 0, -1);
    else if (in != out && count)
        memcpy(out, in, count * es);
    if (rc != HC_OK) return rc;

    int own = hc_mod(site_ring.pos + 1, m);
    size_t lo = m > 1 ? hc_ring_seg_lo(&site_ring, own) : 0, hi = m > 1 ? hc_ring_seg_hi(&site_ring, own) : count;
    hc_ring_init(x, &col_ring, column, nsites, hi - lo, 0, es);
    if (compressed)
        rc = hc_ring_allreduce_codec(x, &col_ring, (float *)(o + lo * es), (float *)(o + lo * es), divide_by,
                                     residual ? residual + lo : NULL);
    else
        rc = hc_ring_allreduce(x, &col_ring, o + lo * es, o + lo * es, divide_by);
    if (rc != HC_OK || m == 1) return rc;

    /* Step 3 overwrites shards this rank sent in step 1. */
    if ((rc = hc_xsend_wait(x, 0)) != HC_OK) return rc;
    x->tx_group = 1;
    for (size_t k = 0, np = hc_ring_pieces(&site_ring, own); k < np && rc == HC_OK; k++) {
        size_t off, len;
        hc_ring_piece(&site_ring, own, k, &off, &len);
        rc = hc_xsend(x, site_ring.next, o + off * es, len * es);
    }
    x->tx_group = 0;
    return rc == HC_OK ? hc_ring_allgather(x, &site_ring, out) : rc;
}
