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
 *
 * With a codec the three phases are pipelined over chunks of the buffer:
 * while chunk k crosses the WAN, chunk k+1 is reduced inside the site and
 * chunk k-1 shared inside it, so the in-site legs hide behind the WAN leg
 * instead of adding to it.
 */
#include <string.h>

#include "algo/ring.h"
#include "algo/sites.h"

/* What every chunk of a pipelined (compressed) allreduce shares. */
typedef struct hier {
    const int *local, *column; /* this rank's site in ring order; its column, one rank a site */
    int m, nsites, divide_by;
    const float *in;
    float *out, *residual;
    size_t count, chunk;       /* elements in all, per chunk */
    int64_t site_ns, wan_ns;   /* time in the in-site phases and in the compressed leg */
} hier;

typedef struct hier_chunk {
    size_t lo, count;   /* which elements of the buffer */
    hc_ring site;       /* the chunk's in-site ring */
    hc_codec_ring col;  /* this rank's shard of it across sites */
} hier_chunk;

static void chunk_init(hc_exec *x, const hier *h, size_t index, hier_chunk *k) {
    k->lo = index * h->chunk;
    k->count = h->count - k->lo < h->chunk ? h->count - k->lo : h->chunk;
    hc_ring_init(x, &k->site, h->local, h->m, k->count, 0, sizeof(float));
    int own = hc_mod(k->site.pos + 1, h->m);
    size_t lo = h->m > 1 ? hc_ring_seg_lo(&k->site, own) : 0, hi = h->m > 1 ? hc_ring_seg_hi(&k->site, own) : k->count;
    hc_ring col;
    hc_ring_init(x, &col, h->column, h->nsites, hi - lo, 0, sizeof(float));
    hc_codec_ring_init(x, &k->col, &col);
    float *shard = h->out + k->lo + lo;
    k->col.in = k->col.out = shard;
    k->col.last = shard + hc_ring_seg_lo(&col, hc_mod(col.pos + 1, col.n));
    k->col.residual = h->residual ? h->residual + k->lo + lo : NULL;
    k->col.divide_by = h->divide_by;
    k->col.share = 1;
    k->col.keep_encoded = h->m > 1;
}

/* Step 1 for a chunk, then its first stage across sites. */
static int chunk_start(hc_exec *x, hier *h, hier_chunk *k) {
    int64_t t0 = hc_now_ns();
    int rc = HC_OK;
    if (h->m > 1)
        rc = hc_ring_reduce_scatter(x, &k->site, (const char *)(h->in + k->lo), (char *)(h->out + k->lo), NULL, 0, -1);
    else if (h->in != h->out && k->count)
        memcpy(h->out + k->lo, h->in + k->lo, k->count * sizeof(float));
    int64_t t1 = hc_now_ns();
    h->site_ns += t1 - t0;
    if (rc == HC_OK) rc = hc_codec_ring_step(x, &k->col, 0);
    h->wan_ns += hc_now_ns() - t1;
    return rc;
}

/*
 * Step 3 for a chunk: every rank of the site already holds the encoding all
 * its column decoded, so it sends those bytes (1/4 to 1/32 of the fp32
 * shard) instead of the decoded floats, and each receiver decodes them
 * itself: the same bits, a fraction of the in-site traffic.
 */
static int chunk_share(hc_exec *x, hier *h, const hier_chunk *k) {
    const hc_ring *site = &k->site, *col = &k->col.g;
    int m = site->n, me = site->pos;
    int64_t t0 = hc_now_ns();
    /* The decoded shards overwrite what this rank sent in step 1. */
    int rc = hc_xsend_wait(x, 0);
    x->tx_group = 1;
    for (int i = 1; i < m && rc == HC_OK; i++)
        for (int cs = 0; cs < col->n && rc == HC_OK; cs++)
            for (size_t p = 0, np = hc_ring_pieces(col, cs); p < np && rc == HC_OK; p++) {
                size_t bytes;
                const uint8_t *enc = hc_codec_ring_final(&k->col, cs, p, &bytes);
                rc = hc_xsend(x, h->local[(me + i) % m], enc, bytes);
            }
    x->tx_group = 0;
    for (int i = 1; i < m && rc == HC_OK; i++) {
        int q = (me - i + m) % m; /* its shard: the segment after its site-ring position */
        int seg = hc_mod(q + 1, m);
        size_t lo = hc_ring_seg_lo(site, seg);
        hc_ring theirs; /* its column ring's pieces (their size follows its shard's) */
        hc_ring_init(x, &theirs, h->column, h->nsites, hc_ring_seg_hi(site, seg) - lo, 0, sizeof(float));
        for (int cs = 0; cs < theirs.n && rc == HC_OK; cs++)
            for (size_t p = 0, np = hc_ring_pieces(&theirs, cs); p < np && rc == HC_OK; p++) {
                size_t off, len;
                hc_ring_piece(&theirs, cs, p, &off, &len);
                hc_msg *msg;
                if ((rc = hc_xrecv(x, h->local[q], &msg)) != HC_OK) break;
                rc = hc_codec_ring_decode(x, &k->col, msg, len, h->out + k->lo + lo + off);
                hc_xrelease(x, msg);
            }
    }
    h->site_ns += hc_now_ns() - t0;
    return rc;
}

/*
 * Software pipeline: in round t, stage s works on chunk t-s. A stage only
 * receives what its peers sent in the round before (across sites) or in the
 * same stage (inside the site), and every rank runs the same rounds, so each
 * link carries its messages in the order they are asked for. Stages run
 * first to last: a round puts its new chunk on the WAN before it waits for
 * what the last round sent, so the link never drains between rounds (last
 * stage first measured 20% slower than unpipelined at 100 Mbit/s).
 */
static int allreduce_pipelined(hc_exec *x, hier *h) {
    int stages = 2 * h->nsites - 1;
    size_t nchunks = h->count ? (h->count + h->chunk - 1) / h->chunk : 1, arena_bytes = 0;
    hier_chunk live[stages]; /* chunk i in live[i % stages] */
    for (size_t i = 0; i < nchunks; i++) {
        chunk_init(x, h, i, &live[0]);
        arena_bytes += hc_codec_ring_arena_bytes(&live[0].col);
    }
    /* One arena for the whole op: no chunk's zero-copy sends are overwritten. */
    uint8_t *arena = hc_comm_scratch(x->comm, HC_SCRATCH_ARENA, arena_bytes);
    if (!arena) return hc_xfail(x, HC_ERR_NO_MEMORY, "rank %d: no memory for %zu encoded bytes", x->comm->rank, arena_bytes);
    int rc = HC_OK;
    for (size_t t = 0; rc == HC_OK && t < nchunks + (size_t)stages - 1; t++)
        for (int s = 0; rc == HC_OK && s < stages; s++) {
            if (t < (size_t)s || t - (size_t)s >= nchunks) continue;
            hier_chunk *k = &live[(t - (size_t)s) % (size_t)stages];
            if (s == 0) {
                chunk_init(x, h, t, k);
                k->col.arena = arena;
                arena += hc_codec_ring_arena_bytes(&k->col);
                rc = chunk_start(x, h, k);
                continue;
            }
            int64_t t0 = hc_now_ns();
            rc = hc_codec_ring_step(x, &k->col, s);
            h->wan_ns += hc_now_ns() - t0;
            if (rc == HC_OK && s == stages - 1 && h->m > 1) rc = chunk_share(x, h, k);
        }
    return rc;
}

/* The uncompressed phases, one after the other. */
static int allreduce_phases(hc_exec *x, const int *local, int m, const int *column, int nsites, const void *in,
                            void *out, size_t count, size_t es, int divide_by) {
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

int hc_allreduce_hierarchical(hc_exec *x, const void *in, void *out, size_t count, size_t es, int compressed,
                              float *residual) {
    hc_comm *c = x->comm;
    int nsites = c->nsites, m = hc_sites_uniform(c);
    int table[nsites * m], column[nsites];
    int lp = hc_site_table(c, m, table);
    const int *local = table + c->peers[c->rank].site * m;
    for (int s = 0; s < nsites; s++) column[s] = table[s * m + lp];
    int divide_by = x->op->redop == HC_AVG ? c->size : 0;
    if (!compressed) return allreduce_phases(x, local, m, column, nsites, in, out, count, es, divide_by);

    /* Chunks of 2 x chunk_bytes per rank of the group: a few chunks per
     * large bucket (the pipeline's fill and drain is one chunk each way),
     * and each rank's shard of one still moves as several pieces. Half as
     * large measured slower on 2 cores (more messages, more wake-ups). */
    hier h = {local, column, m, nsites, divide_by, in, out, residual, count,
              2 * c->cfg.chunk_bytes / sizeof(float) * (size_t)c->size, 0, 0};
    uint64_t wan0 = atomic_load(&c->bytes_sent_intersite);
    int64_t t0 = hc_now_ns();
    int rc = allreduce_pipelined(x, &h);
    if (hc_log_enabled(HC_LOG_DEBUG)) {
        int64_t total = hc_now_ns() - t0;
        uint64_t sent = atomic_load(&c->bytes_sent_intersite) - wan0;
        hc_log(HC_LOG_DEBUG, "%s: rank %d: hierarchical, pipelined in chunks of %zu: %.1f ms in all, in-site phases "
               "%.1f ms, across sites %.1f ms (%llu bytes sent, %.0f MB/s over the whole op)", c->name, c->rank,
               h.chunk, total / 1e6, h.site_ns / 1e6, h.wan_ns / 1e6, (unsigned long long)sent,
               sent / (total / 1e3 + 1));
    }
    return rc;
}
