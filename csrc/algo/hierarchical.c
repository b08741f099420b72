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
#include "algo/sites.h"

/*
 * Step 3 after a compressed step 2: every rank of the site already holds the
 * encoding all its column decoded, so it sends those bytes (1/4 to 1/32 of
 * the fp32 shard) instead of the decoded floats, and each receiver decodes
 * them itself: the same bits, a fraction of the in-site traffic.
 */
static int share_encoded(hc_exec *x, const hc_ring *site_ring, const hc_ring *col_ring, const int *local, float *out) {
    int m = site_ring->n, me = site_ring->pos, rc = HC_OK;
    for (int i = 1; i < m && rc == HC_OK; i++)
        for (int cs = 0; cs < col_ring->n && rc == HC_OK; cs++)
            for (size_t k = 0, np = hc_ring_pieces(col_ring, cs); k < np && rc == HC_OK; k++) {
                size_t bytes;
                const uint8_t *enc = hc_ring_codec_piece(x, col_ring, cs, k, &bytes);
                rc = enc ? hc_xsend(x, local[(me + i) % m], enc, bytes) : HC_ERR_NO_MEMORY;
            }
    for (int i = 1; i < m && rc == HC_OK; i++) {
        int q = (me - i + m) % m; /* its shard: the segment after its site-ring position */
        int seg = hc_mod(q + 1, m);
        size_t lo = hc_ring_seg_lo(site_ring, seg);
        hc_ring theirs = *col_ring;
        theirs.count = hc_ring_seg_hi(site_ring, seg) - lo;
        for (int cs = 0; cs < theirs.n && rc == HC_OK; cs++)
            for (size_t k = 0, np = hc_ring_pieces(&theirs, cs); k < np && rc == HC_OK; k++) {
                size_t off, len;
                hc_ring_piece(&theirs, cs, k, &off, &len);
                hc_msg *msg;
                if ((rc = hc_xrecv(x, local[q], &msg)) != HC_OK) break;
                rc = hc_ring_codec_decode_piece(x, &theirs, msg, len, out + lo + off);
                hc_xrelease(x, msg);
            }
    }
    return rc;
}

int hc_allreduce_hierarchical(hc_exec *x, const void *in, void *out, size_t count, size_t es, int compressed,
                              float *residual) {
    hc_comm *c = x->comm;
    int nsites = c->nsites, m = hc_sites_uniform(c);
    int table[nsites * m], column[nsites];
    int lp = hc_site_table(c, m, table);
    const int *local = table + c->peers[c->rank].site * m;
    for (int s = 0; s < nsites; s++) column[s] = table[s * m + lp];
    int divide_by = x->op->redop == HC_AVG ? c->size : 0;
    char *o = out;

    hc_ring site_ring, col_ring;
    hc_ring_init(x, &site_ring, local, m, count, 0, es);
    int rc = HC_OK;
    int64_t t0 = hc_now_ns();
    if (m > 1)
        rc = hc_ring_reduce_scatter(x, &site_ring, in, out, NULL, 0, -1);
    else if (in != out && count)
        memcpy(out, in, count * es);
    if (rc != HC_OK) return rc;

    int own = hc_mod(site_ring.pos + 1, m);
    size_t lo = m > 1 ? hc_ring_seg_lo(&site_ring, own) : 0, hi = m > 1 ? hc_ring_seg_hi(&site_ring, own) : count;
    hc_ring_init(x, &col_ring, column, nsites, hi - lo, 0, es);
    int64_t t1 = hc_now_ns();
    uint64_t wan0 = atomic_load(&c->bytes_sent_intersite);
    if (compressed)
        rc = hc_ring_allreduce_codec(x, &col_ring, (float *)(o + lo * es), (float *)(o + lo * es), divide_by,
                                     residual ? residual + lo : NULL, m > 1);
    else
        rc = hc_ring_allreduce(x, &col_ring, o + lo * es, o + lo * es, divide_by);
    int64_t t2 = hc_now_ns();
    if (hc_log_enabled(HC_LOG_DEBUG))
        hc_log(HC_LOG_DEBUG, "%s: rank %d: hierarchical: in-site reduce-scatter %.1f ms, across sites %.1f ms "
               "(%llu bytes sent, %.0f MB/s)", c->name, c->rank, (t1 - t0) / 1e6, (t2 - t1) / 1e6,
               (unsigned long long)(atomic_load(&c->bytes_sent_intersite) - wan0),
               (atomic_load(&c->bytes_sent_intersite) - wan0) / ((t2 - t1) / 1e3 + 1));
    if (rc != HC_OK || m == 1) return rc;

    /* Step 3 overwrites shards this rank sent in step 1. */
    if ((rc = hc_xsend_wait(x, 0)) != HC_OK) return rc;
    if (compressed) return share_encoded(x, &site_ring, &col_ring, local, (float *)out);
    x->tx_group = 1;
    for (size_t k = 0, np = hc_ring_pieces(&site_ring, own); k < np && rc == HC_OK; k++) {
        size_t off, len;
        hc_ring_piece(&site_ring, own, k, &off, &len);
        rc = hc_xsend(x, site_ring.next, o + off * es, len * es);
    }
    x->tx_group = 0;
    return rc == HC_OK ? hc_ring_allgather(x, &site_ring, out) : rc;
}
