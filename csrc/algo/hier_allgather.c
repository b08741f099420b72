/*
 * Hierarchical allgather across sites (S sites of m ranks each), exact:
 * the ranks of each column (the same local index in every site) run a ring
 * allgather of their blocks across sites, and every piece a rank holds —
 * its own block at once, each piece of the column ring as it lands — goes
 * on to the other ranks of its site, so the in-site leg runs under the WAN
 * leg.
 *
 * Each block crosses between two sites once per direction, where a flat
 * ring carries n-1 blocks over each WAN link it crosses (at 2 sites x 2
 * ranks: 2 blocks per direction instead of 3).
 */
#include "algo/ring.h"
#include "algo/sites.h"

typedef struct site_share {
    const int *local; /* the site's ranks by local index */
    int m, lp;
} site_share;

/* The t-th segment a rank shares: its own block first, then the column
 * ring's in the order they land there. */
static int shared_segment(const hc_ring *col, int t) { return hc_mod(col->pos + 1 - t, col->n); }

/* Sends a final piece (its region is never written again) to the site. */
static int share_piece(hc_exec *x, const hc_ring *col, int seg, size_t k, void *ctx) {
    const site_share *sh = ctx;
    size_t off, len;
    hc_ring_piece(col, seg, k, &off, &len);
    for (int i = 1; i < sh->m; i++) {
        int rc = hc_xsend(x, sh->local[(sh->lp + i) % sh->m], (char *)x->op->recvbuf + hc_ring_at(col, seg, off),
                          len * col->es);
        if (rc != HC_OK) return rc;
    }
    return HC_OK;
}

int hc_allgather_hierarchical(hc_exec *x) {
    hc_comm *c = x->comm;
    hc_op *op = x->op;
    int nsites = c->nsites, m = hc_sites_uniform(c), site = c->peers[c->rank].site;
    int table[nsites * m], column[nsites], theirs[nsites];
    int lp = hc_site_table(c, m, table);
    for (int s = 0; s < nsites; s++) column[s] = table[s * m + lp];
    size_t es = hc_dtype_size(op->dtype), block = op->count;
    char *out = op->recvbuf; /* this rank's block is already in place */
    site_share sh = {table + site * m, m, lp};

    hc_ring col;
    hc_ring_init(x, &col, column, nsites, (size_t)nsites * block, block, es);
    int own = shared_segment(&col, 0), rc = hc_ring_send_segment(x, &col, own, out);
    for (size_t k = 0, np = hc_ring_pieces(&col, own); k < np && rc == HC_OK; k++)
        rc = share_piece(x, &col, own, k, &sh);
    if (m > 1) {
        col.on_final = share_piece;
        col.on_final_ctx = &sh;
    }
    if (rc == HC_OK) rc = hc_ring_allgather(x, &col, out);
    /* What the others of the site shared, in the same order: their columns. */
    for (int i = 1; i < m && rc == HC_OK; i++) {
        int q = (lp - i + m) % m;
        for (int s = 0; s < nsites; s++) theirs[s] = table[s * m + q];
        hc_ring g = col;
        g.order = theirs;
        for (int t = 0; t < nsites && rc == HC_OK; t++) {
            int seg = shared_segment(&g, t);
            for (size_t k = 0, np = hc_ring_pieces(&g, seg); k < np && rc == HC_OK; k++) {
                size_t off, len;
                hc_ring_piece(&g, seg, k, &off, &len);
                rc = hc_xrecv_into(x, sh.local[q], out + hc_ring_at(&g, seg, off), len * es);
            }
        }
    }
    return rc;
}
