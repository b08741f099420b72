/*
 * Ring primitives over any list of member ranks, shared by the flat ring
 * collectives, the compressed ring and the hierarchical allreduce (which
 * runs rings inside each site and across sites).
 *
 * The buffer of `count` elements is cut into one segment per member; after a
 * reduce-scatter the member at ring position pos holds the full reduction
 * of segment pos+1. Segments move as pieces of the communicator's chunk size.
 */
#ifndef HC_RING_H
#define HC_RING_H

#include "core/internal.h"

typedef struct hc_ring hc_ring;
/* Called for each piece that became final at this rank (see below). */
typedef int (*hc_ring_piece_fn)(hc_exec *x, const hc_ring *g, int seg, size_t piece, void *ctx);

struct hc_ring {
    int n, pos, next, prev;
    const int *order;     /* members in ring order */
    size_t es, count, ce; /* element size, elements in total, elements per piece */
    int dtype;            /* what the reductions add: the op's, or fp32 when the
                             ring runs on a compressed op's fp32 staging */
    size_t block;         /* 0: segments split one buffer; else segment i is the
                             block (of `block` elements) of rank order[i-1] */
    hc_ring_piece_fn on_final; /* NULL, or called for each piece of the owned
                                  segment the reduce-scatter finished and each
                                  piece the allgather landed, in order */
    void *on_final_ctx;
    size_t first_sent;         /* pieces of segment pos a caller sent ahead of the
                                  reduce-scatter (hc_ring_send_first and
                                  hc_ring_codec_send_first); it sends the rest */
};

/* `members` must contain this rank. */
void hc_ring_init(hc_exec *x, hc_ring *g, const int *members, int n, size_t count, size_t block, size_t esize);

static inline int hc_mod(int a, int n) { return ((a % n) + n) % n; }
static inline size_t hc_ring_seg_lo(const hc_ring *g, int seg) { return hc_split(g->count, g->n, seg); }
static inline size_t hc_ring_seg_hi(const hc_ring *g, int seg) { return hc_split(g->count, g->n, seg + 1); }
static inline size_t hc_ring_pieces(const hc_ring *g, int seg) {
    return hc_piece_count(hc_ring_seg_hi(g, seg) - hc_ring_seg_lo(g, seg), g->ce);
}
/* Piece k of segment seg: offset (segment space) and length, in elements. */
void hc_ring_piece(const hc_ring *g, int seg, size_t k, size_t *off, size_t *len);
/* Where an element of segment space lives in a caller's buffer, in bytes. */
size_t hc_ring_at(const hc_ring *g, int seg, size_t off);
/* Sends segment `seg` of `buf` to the next member, piece by piece. */
int hc_ring_send_segment(hc_exec *x, const hc_ring *g, int seg, const char *buf);
/* Sends the reduce-scatter's first pieces (of segment pos, from `in`) up to
 * piece `upto` ahead of it, as soon as they are final. */
int hc_ring_send_first(hc_exec *x, hc_ring *g, const char *in, size_t upto);
/* Receives the next piece from the previous member and checks its size. */
int hc_ring_recv(hc_exec *x, const hc_ring *g, size_t bytes, hc_msg **m);

/* Reduce-scatter: the result for the owned segment goes to `work` (or to
 * `last`, a buffer of just that segment, when given), divided by
 * `divide_by` when > 1. With final_group >= 0 its pieces are also sent on
 * at once, as the first allgather step. */
int hc_ring_reduce_scatter(hc_exec *x, const hc_ring *g, const char *in, char *work, char *last,
                           int divide_by, int final_group);
/* Allgather: starts owning segment pos+1 (already sent) and fills `out`. */
int hc_ring_allgather(hc_exec *x, const hc_ring *g, char *out);
/* Both, in place on `out` from `in` (which may be `out`). */
int hc_ring_allreduce(hc_exec *x, const hc_ring *g, const void *in, void *out, int divide_by);

/* The same on fp32 data with the op's codec on every link: each hop
 * dequantizes, adds in fp32 and quantizes once; the allgather forwards the
 * owner's encoding unchanged and every member (the owner too) decodes it,
 * so all end bit-identical. `residual` (count floats, or NULL) is this
 * rank's error feedback for the elements it quantizes. */
int hc_ring_allreduce_codec(hc_exec *x, const hc_ring *g, const float *in, float *out, int divide_by,
                            float *residual);

/* The compressed ring as stages that a caller may interleave with other
 * work (the hierarchical allreduce pipelines chunks through them). Stage 0
 * sends this rank's segment; stages 1..n-1 are the reduce-scatter's receive
 * steps, n..2n-2 the allgather's. Messages only go to g.next, so stage s of
 * one ring receives what the previous member sent in its stage s-1. */
typedef struct hc_codec_ring {
    hc_ring g;
    int codec;
    hc_codec_params p;
    size_t enc_max;   /* encoded bytes of a full piece */
    size_t slots;     /* pieces over all segments */
    uint8_t *arena;   /* hc_codec_ring_arena_bytes, kept until the op ends */
    const float *in;  /* this rank's contributions (reduce-scatter) */
    float *out;       /* the whole result (allgather) */
    float *last;      /* the owned segment's result, segment-sized */
    float *residual;  /* error feedback, indexed like `in`, or NULL */
    int divide_by;    /* > 1: the owned segment's sum is divided by it */
    int share;        /* the last reduce step starts the allgather */
    int keep_encoded; /* keep every final encoding (hc_codec_ring_final) */
} hc_codec_ring;

/* Geometry and codec parameters; the caller sets the buffers and the arena. */
void hc_codec_ring_init(hc_exec *x, hc_codec_ring *r, const hc_ring *g);
size_t hc_codec_ring_arena_bytes(const hc_codec_ring *r);
static inline int hc_codec_ring_stages(const hc_codec_ring *r) { return 2 * r->g.n - 1; }
int hc_codec_ring_step(hc_exec *x, hc_codec_ring *r, int stage);
/* With keep_encoded, after the last stage: the encoded bytes every member
 * decoded for piece `piece` of segment `seg`. */
const uint8_t *hc_codec_ring_final(const hc_codec_ring *r, int seg, size_t piece, size_t *bytes);
/* Decodes a received encoded piece of `len` elements into dst (checks its size). */
int hc_codec_ring_decode(hc_exec *x, const hc_codec_ring *r, const hc_msg *m, size_t len, float *dst);
/* hc_ring_send_first for the compressed reduce-scatter: the pieces quantized
 * (with `residual`, as the reduce-scatter would) and sent. */
int hc_ring_codec_send_first(hc_exec *x, hc_ring *g, const float *in, size_t upto, float *residual);
/* Compressed reduce-scatter: the owned segment, in fp32, lands in `last`. */
int hc_ring_reduce_scatter_codec(hc_exec *x, const hc_ring *g, const float *in, float *last, int divide_by,
                                 float *residual);
/* Compressed allgather of each member's segment (block layout): `out` holds
 * count floats, this rank's own segment already in place. */
int hc_ring_allgather_codec(hc_exec *x, const hc_ring *g, float *out, float *residual);

#endif
