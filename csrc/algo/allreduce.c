/*
 * Allreduce: picks the algorithm and, for compressed ops, stages non-fp32
 * data through fp32 (the codecs work on fp32).
 *
 *   recursive doubling  small messages, uncompressed (latency bound; see
 *                       hc_wan_in_flight_estimate)
 *   hierarchical        several sites of equal size (WAN bound)
 *   ring                the rest
 *
 * HETCOMM_ALGO / hc_call_opts.algo override the choice where it is possible.
 */
#include <inttypes.h>
#include <string.h>

#include "algo/ring.h"
#include "algo/sites.h"
#include "kernels/convert.h"

int hc_allreduce_hierarchical(hc_exec *x, const void *in, void *out, size_t count, size_t es, int compressed,
                              float *residual);

static const char *algo_name(int algo) {
    switch (algo) {
    case HC_ALGO_RECURSIVE_DOUBLING: return "recursive doubling";
    case HC_ALGO_HIERARCHICAL: return "hierarchical";
    default: return "ring";
    }
}

/*
 * Across sites an allreduce is latency-bound below about what one one-way
 * trip over the WAN carries (measured round trip / 2 x the configured
 * bandwidth): recursive doubling crosses the WAN once per doubling step with
 * the whole message from every rank of a site, the hierarchical allreduce
 * twice with 1/(ranks per site) of it, so up to about that size the extra trip
 * costs more than the extra bytes. 0 without a bandwidth or a second site.
 * Each rank's estimate is exchanged at connect; all use the largest.
 */
size_t hc_wan_in_flight_estimate(const hc_comm *c) {
    if (c->nsites < 2 || c->cfg.wan_bandwidth <= 0) return 0;
    int64_t rtt = 0;
    for (int r = 0; r < c->size; r++)
        if (c->peers[r].site != c->peers[c->rank].site && c->peers[r].rtt_ns > rtt) rtt = c->peers[r].rtt_ns;
    int per_site = hc_sites_uniform(c);
    return (size_t)(c->cfg.wan_bandwidth * (double)rtt / 2e9 / (per_site > 1 ? per_site - 1 : 1));
}

/* The algorithm an allreduce of `bytes` runs with: `algo` asked for by the
 * call (HC_ALGO_AUTO: the communicator's setting), `codec` its codec. */
int hc_allreduce_algo_for(const hc_comm *c, int algo, int codec, size_t bytes) {
    if (algo == HC_ALGO_AUTO) algo = c->cfg.algo;
    int hier_ok = c->nsites > 1 && hc_sites_uniform(c) > 0;
    if (algo == HC_ALGO_TREE) algo = HC_ALGO_RECURSIVE_DOUBLING;
    if (algo == HC_ALGO_AUTO) {
        if (codec == HC_CODEC_NONE && (bytes < c->cfg.small_bytes || bytes < c->wan_in_flight))
            algo = HC_ALGO_RECURSIVE_DOUBLING;
        else
            algo = hier_ok ? HC_ALGO_HIERARCHICAL : HC_ALGO_RING;
    }
    /* Fall back where the asked-for algorithm cannot run. */
    if (algo == HC_ALGO_HIERARCHICAL && !hier_ok) algo = HC_ALGO_RING;
    if (algo == HC_ALGO_RECURSIVE_DOUBLING && codec != HC_CODEC_NONE) algo = HC_ALGO_RING;
    return algo;
}

static int choose(hc_exec *x, size_t bytes) {
    return hc_allreduce_algo_for(x->comm, x->op->opts.algo, x->op->codec, bytes);
}

int hc_allreduce_run(hc_exec *x) {
    hc_comm *c = x->comm;
    hc_op *op = x->op;
    size_t es = hc_dtype_size(op->dtype), bytes = op->count * es;
    int algo = choose(x, bytes);
    if (hc_log_enabled(HC_LOG_DEBUG))
        hc_log(HC_LOG_DEBUG, "%s: rank %d: allreduce #%" PRIu64 " of %zu bytes (%s): %s%s%s", c->name, c->rank,
               op->seq, bytes, hc_dtype_name(op->dtype), algo_name(algo), op->codec ? ", codec " : "",
               op->codec ? hc_codec_name(op->codec) : "");
    if (op->codec == HC_CODEC_NONE) {
        if (algo == HC_ALGO_RECURSIVE_DOUBLING) return hc_allreduce_recursive_doubling(x);
        if (algo == HC_ALGO_HIERARCHICAL)
            return hc_allreduce_hierarchical(x, op->sendbuf, op->recvbuf, op->count, es, 0, NULL);
        return hc_allreduce_ring(x);
    }
    float *in = (float *)op->sendbuf, *out = op->recvbuf;
    if (op->dtype != HC_FLOAT32) {
        in = out = hc_comm_scratch(c, HC_SCRATCH_STAGE, op->count * sizeof(float));
        if (!in && op->count) return hc_xfail(x, HC_ERR_NO_MEMORY, "rank %d: no memory to stage %zu floats", c->rank, op->count);
        hc_convert_to_f32(in, op->sendbuf, op->count, op->dtype);
    }
    float *residual = NULL;
    if (op->opts.residual_key && !(residual = hc_residual_get(c, op->opts.residual_key, op->count)))
        return hc_xfail(x, HC_ERR_NO_MEMORY, "rank %d: no memory for a residual of %zu floats", c->rank, op->count);
    int rc;
    if (algo == HC_ALGO_HIERARCHICAL) {
        rc = hc_allreduce_hierarchical(x, in, out, op->count, sizeof(float), 1, residual);
    } else {
        hc_ring g;
        hc_ring_init(x, &g, c->ring, c->size, op->count, 0, sizeof(float));
        rc = hc_ring_allreduce_codec(x, &g, in, out, op->redop == HC_AVG ? c->size : 0, residual);
    }
    if (rc == HC_OK && op->dtype != HC_FLOAT32) hc_convert_from_f32(op->recvbuf, out, op->count, op->dtype);
    return rc;
}
