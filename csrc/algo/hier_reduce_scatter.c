/*
 * Hierarchical reduce-scatter across sites (S sites of m ranks each):
 *
 *   1. reduce-scatter inside each site, uncompressed: the rank of local
 *      index l ends with its site's partial sums of the blocks owned by local
 *      index l in every site (S blocks);
 *   2. the ranks of column l reduce-scatter those S partials across sites,
 *      with the op's codec (and error feedback) on this leg only: each ends
 *      with the total of its own block.
 *
 * Step 2 starts under step 1: each piece of the column's first segment goes
 * across (quantized) as soon as the in-site reduce-scatter has finished it.
 *
 * A flat ring sends (n-1)/n of the input over each WAN link it crosses, and
 * quantizes at every hop; here (S-1)/S of a site's share crosses once and
 * is quantized S-1 times. Every block is summed in a fixed order (its site
 * ring, then its column ring), so the result does not depend on timing.
 */
#include <inttypes.h>
#include <string.h>

#include "algo/ring.h"
#include "algo/sites.h"
#include "kernels/convert.h"

/*
 * The input in the order the two rings cut it: the site ring's member at
 * position p owns segment p+1 and the column ring's member of site s owns
 * sub-segment s+1, so the block of rank (site s, local index l) goes to
 * sub-segment s+1 of segment l+1.
 */
static char *stage(hc_exec *x, const int *table, int nsites, int m, size_t es) {
    hc_op *op = x->op;
    size_t block = op->count;
    char *staged = hc_comm_scratch(x->comm, HC_SCRATCH_STAGE, block * (size_t)x->comm->size * es);
    if (!staged || !block) return staged;
    for (int s = 0; s < nsites; s++)
        for (int l = 0; l < m; l++) {
            size_t at = ((size_t)((l + 1) % m) * nsites + (s + 1) % nsites) * block;
            memcpy(staged + at * es, (const char *)op->sendbuf + (size_t)table[s * m + l] * block * es, block * es);
        }
    return staged;
}

/* Sending the column ring's first pieces while step 1 still runs. */
typedef struct send_ahead {
    hc_ring *col;
    const char *col_in; /* the column's partials */
    size_t col_lo;      /* where they start in the site ring's segment space */
    float *residual;    /* for the codec */
} send_ahead;

/* Called for each piece of step 1 this rank finished: sends the column
 * ring's first pieces that are now complete. */
static int ahead(hc_exec *x, const hc_ring *site_ring, int seg, size_t k, void *ctx) {
    send_ahead *a = ctx;
    hc_ring *col = a->col;
    size_t off, len, done, upto = col->first_sent, np = hc_ring_pieces(col, col->pos);
    hc_ring_piece(site_ring, seg, k, &off, &len);
    done = off + len - a->col_lo;
    for (; upto < np; upto++) {
        hc_ring_piece(col, col->pos, upto, &off, &len);
        if (off + len > done) break;
    }
    if (upto == col->first_sent) return HC_OK;
    if (x->op->codec == HC_CODEC_NONE) return hc_ring_send_first(x, col, a->col_in, upto);
    return hc_ring_codec_send_first(x, col, (const float *)a->col_in, upto, a->residual);
}

/* Step 2 with the codec, on fp32: other float types were summed inside the
 * site in their own type, as an uncompressed reduce-scatter would, and are
 * converted here. */
static int across_sites_codec(hc_exec *x, hc_ring *col_ring, char *col, int divide_by, float *residual) {
    hc_comm *c = x->comm;
    hc_op *op = x->op;
    size_t block = op->count, n = (size_t)col_ring->n * block;
    float *in = (float *)col, *last = op->recvbuf;
    if (op->dtype != HC_FLOAT32) {
        in = hc_comm_scratch(c, HC_SCRATCH_WORK, n * sizeof(float));
        if (!in && n) return hc_xfail(x, HC_ERR_NO_MEMORY, "rank %d: no memory to stage %zu floats", c->rank, n);
        hc_convert_to_f32(in, col, n, op->dtype);
        last = in + (size_t)hc_mod(col_ring->pos + 1, col_ring->n) * block;
    }
    int rc = hc_ring_reduce_scatter_codec(x, col_ring, in, last, divide_by, residual);
    if (rc == HC_OK && last != op->recvbuf) hc_convert_from_f32(op->recvbuf, last, block, op->dtype);
    return rc;
}

int hc_reduce_scatter_hierarchical(hc_exec *x) {
    hc_comm *c = x->comm;
    hc_op *op = x->op;
    int nsites = c->nsites, m = hc_sites_uniform(c), site = c->peers[c->rank].site;
    int table[nsites * m], column[nsites];
    int lp = hc_site_table(c, m, table);
    for (int s = 0; s < nsites; s++) column[s] = table[s * m + lp];
    size_t es = hc_dtype_size(op->dtype), block = op->count, total = block * (size_t)c->size;
    int divide_by = op->redop == HC_AVG ? c->size : 0;

    char *staged = stage(x, table, nsites, m, es);
    if (!staged && total)
        return hc_xfail(x, HC_ERR_NO_MEMORY, "rank %d: no memory to stage a %zu-byte reduce_scatter", c->rank,
                        total * es);
    /* This rank's S partials: segment lp+1 of step 1, where they are never sent. */
    size_t col_lo = (size_t)((lp + 1) % m) * nsites * block;
    char *col = staged + col_lo * es;
    hc_ring col_ring;
    hc_ring_init(x, &col_ring, column, nsites, (size_t)nsites * block, 0, op->codec ? sizeof(float) : es);
    float *residual = NULL;
    if (op->codec != HC_CODEC_NONE && op->opts.residual_key &&
        !(residual = hc_residual_get(c, op->opts.residual_key, (size_t)nsites * block)))
        return hc_xfail(x, HC_ERR_NO_MEMORY, "rank %d: no memory for a residual of %zu floats", c->rank,
                        (size_t)nsites * block);
    int64_t t0 = hc_now_ns();
    uint64_t wan0 = atomic_load(&c->bytes_sent_intersite);
    int rc = HC_OK;
    if (m > 1) {
        hc_ring site_ring;
        hc_ring_init(x, &site_ring, table + site * m, m, total, 0, es);
        send_ahead a = {&col_ring, col, col_lo, residual};
        if (op->codec == HC_CODEC_NONE || op->dtype == HC_FLOAT32) { /* else step 2 needs fp32 copies first */
            site_ring.on_final = ahead;
            site_ring.on_final_ctx = &a;
        }
        rc = hc_ring_reduce_scatter(x, &site_ring, staged, staged, NULL, 0, -1);
    }
    if (rc != HC_OK) return rc;
    int64_t t1 = hc_now_ns();
    if (op->codec != HC_CODEC_NONE)
        rc = across_sites_codec(x, &col_ring, col, divide_by, residual);
    else
        rc = hc_ring_reduce_scatter(x, &col_ring, col, col, op->recvbuf, divide_by, -1);
    if (hc_log_enabled(HC_LOG_DEBUG))
        hc_log(HC_LOG_DEBUG, "%s: rank %d: hierarchical reduce_scatter #%" PRIu64 ": in-site %.1f ms, then across "
               "sites %.1f ms (%llu bytes sent in all)", c->name, c->rank, op->seq, (t1 - t0) / 1e6,
               (hc_now_ns() - t1) / 1e6, (unsigned long long)(atomic_load(&c->bytes_sent_intersite) - wan0));
    return rc;
}
