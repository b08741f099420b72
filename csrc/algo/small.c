/*
 * Small collectives between ranks of one host, through the shared-memory
 * arena (transport/arena.h): one arrival barrier instead of log2(n) or n-1
 * socket rounds, and at most one sleep per rank.
 *
 * Every rank copies its input (with its call's wire header) into its slot of
 * the arena and counts itself in; the last to arrive wakes all the others at
 * once. Then each rank reads the slots it needs: allreduce and
 * reduce_scatter fold the contributions in rank order 0, 1, ..., n-1 on
 * every rank with the same kernel, so all ranks end with the same bits (NaN
 * payloads included) whichever rank arrived last.
 *
 * Each slot carries its rank's wire header, so a mismatched call is the same
 * MismatchError as over the sockets, raised on every rank. Waits spin
 * briefly, then sleep on the futex in slices; between slices they serve the
 * sockets (an ABORT, a peer that took the socket path for this collective),
 * abort requests, the peers' connections, signals and the op's timeout.
 */
#include <inttypes.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "core/internal.h"

/* Futex sleeps are cut into slices this long to look at the sockets. */
#define SLICE_US 2000

int hc_small_links_ok(const hc_comm *c) { return c->cfg.shm_enable && c->arena; }

/* The bytes of one rank's share: its input (allreduce, allgather), its output (reduce_scatter). */
static size_t part_bytes(const hc_op *op) { return op->count * hc_dtype_size(op->dtype); }

/* The bytes a rank puts into its slot. */
static size_t input_bytes(const hc_comm *c, const hc_op *op) {
    if (op->kind == HC_OP_BARRIER) return 0;
    return op->kind == HC_OP_REDUCE_SCATTER ? part_bytes(op) * (size_t)c->size : part_bytes(op);
}

int hc_small_fits(const hc_comm *c, const hc_op *op) {
    if (!c->small_shm || op->codec != HC_CODEC_NONE) return 0;
    size_t part = part_bytes(op), whole = part;
    switch (op->kind) {
    case HC_OP_ALLREDUCE: {
        int algo = op->opts.algo != HC_ALGO_AUTO ? op->opts.algo : c->cfg.algo;
        if (algo != HC_ALGO_AUTO) return 0; /* an algorithm asked for by name runs as asked */
        break;
    }
    case HC_OP_ALLGATHER:
    case HC_OP_REDUCE_SCATTER: whole = part * (size_t)c->size; break;
    case HC_OP_BARRIER: return 1;
    default: return 0;
    }
    return whole <= c->cfg.small_bytes && input_bytes(c, op) <= HC_ARENA_SLOT_BYTES;
}

/* More ranks than cores. glibc's sysconf reads /sys on every call (an
 * open, a read and a close: several µs), so the count is read once. */
static int oversubscribed(const hc_comm *c) {
    static _Atomic long cores;
    long n = atomic_load_explicit(&cores, memory_order_relaxed);
    if (!n) atomic_store_explicit(&cores, n = sysconf(_SC_NPROCESSORS_ONLN), memory_order_relaxed);
    return n < c->size;
}

/* How long a wait polls before it sleeps on the futex. Auto: 30 µs with a
 * core per rank, 50 µs without (see wait_word); for an op larger than the
 * arena (single copy) as long as copying its bytes at 4 GB/s takes, up to
 * SPIN_CAP_NS: its waits last about as long as the peers' copies, and a
 * futex sleep ends in a wake-up that costs 0.1-0.2 ms in a VM (2 ranks,
 * 256 KiB allgather: 225 µs a call sleeping after 30 µs, 80 µs spinning). */
#define SPIN_CAP_NS 2000000
static long spin_ns(const hc_comm *c, const hc_op *op) {
    if (c->cfg.spin_us >= 0) return (long)c->cfg.spin_us * 1000;
    long base = oversubscribed(c) ? 50000 : 30000;
    size_t bytes = part_bytes(op);
    if (op->kind == HC_OP_ALLGATHER || op->kind == HC_OP_REDUCE_SCATTER) bytes *= (size_t)c->size;
    long copy = (long)(bytes / 4 < SPIN_CAP_NS ? bytes / 4 : SPIN_CAP_NS);
    return copy > base ? copy : base;
}

/* A yield that kept the core away this long ran another job's time slice
 * (or a peer's compute), not a peer's next step: waits then sleep at once
 * for YIELD_BACKOFF_NS before yielding again. On a quiet 2-core machine 5 in
 * 100k yields took over 1 ms, beside two busy processes 4 in 10. */
#define YIELD_SLOW_NS 1000000
#define YIELD_BACKOFF_NS 100000000

/* This collective's slot of rank r, when r filled it. */
static hc_arena_slot *posted_slot(hc_comm *c, const hc_op *op, int r) {
    hc_arena_slot *s = hc_arena_slot_of(c->arena, op->seq, r);
    if (atomic_load_explicit(&s->posted, memory_order_acquire) != (uint32_t)op->seq || s->h.seq != op->seq)
        return NULL;
    return s;
}

/* The first rank that has not arrived at this collective, or -1. */
static int first_missing(hc_comm *c, const hc_op *op) {
    for (int r = 0; r < c->size; r++)
        if (!posted_slot(c, op, r)) return r;
    return -1;
}

static int wait_failed(hc_exec *x, int peer, const char *what, int64_t start) {
    char who[160] = "the other ranks";
    if (peer >= 0) hc_peer_desc(x->comm, peer, who, sizeof who);
    return hc_xfail(x, HC_ERR_TIMEOUT,
                    "rank %d timed out after %d ms waiting for %s to %s in %s #%" PRIu64
                    "; that rank is slower, stuck, dead, or not calling this collective",
                    x->comm->rank, (int)((hc_now_ns() - start) / 1000000), who, what,
                    hc_op_kind_name(x->op->kind), x->op->seq);
}

/* A peer that ran this collective over the sockets: its call differs (or
 * its small-message settings do); the header check names the difference.
 * A peer that posted its slot sends socket messages of the op only on a
 * path that uses both (single copy's first op). */
static int socket_path_taken(hc_exec *x) {
    hc_comm *c = x->comm;
    for (int r = 0; r < c->size; r++)
        for (hc_msg *m = posted_slot(c, x->op, r) ? NULL : c->peers[r].stash_head; m; m = m->next) {
            if (m->h.seq != x->op->seq) continue;
            int rc = hc_progress_check_header(c, x->op, &m->h);
            if (rc != HC_OK) return rc;
            char who[160];
            return hc_xfail(x, HC_ERR_MISMATCH,
                            "%s ran %s #%" PRIu64 " over the sockets while rank %d used shared memory: "
                            "HETCOMM_SMALL_BYTES, HETCOMM_SHM, HETCOMM_CMA or HETCOMM_ALGO differ across ranks",
                            hc_peer_desc(c, r, who, sizeof who), hc_op_kind_name(x->op->kind), x->op->seq, c->rank);
        }
    return HC_OK;
}

int hc_small_check_arena(hc_comm *c, hc_op *op) {
    /* Not when this rank posted too: the op's path uses both. */
    if (!c->arena || c->arena_seq[op->seq % HC_ARENA_REGIONS] == op->seq) return HC_OK;
    for (int r = 0; r < c->size; r++) {
        hc_arena_slot *s = r == c->rank ? NULL : posted_slot(c, op, r);
        if (!s) continue;
        int rc = hc_progress_check_header(c, op, &s->h);
        if (rc != HC_OK) return rc;
        char who[160];
        return hc_op_failf(op, HC_ERR_MISMATCH,
                           "%s ran %s #%" PRIu64 " through shared memory while rank %d used the sockets: "
                           "HETCOMM_SMALL_BYTES, HETCOMM_SHM, HETCOMM_CMA or HETCOMM_ALGO differ across ranks",
                           hc_peer_desc(c, r, who, sizeof who), hc_op_kind_name(op->kind), op->seq, c->rank);
    }
    return HC_OK;
}

/* Between sleeps: abort requests and every peer's connection (a rank that
 * arrived may have given up since, and said why). */
static int serve(hc_exec *x) {
    hc_comm *c = x->comm;
    for (int r = 0; r < c->size; r++) {
        if (r == c->rank) continue;
        int rc = hc_progress_poll(c, x->op, r, 0);
        if (rc != HC_OK) return rc;
    }
    return socket_path_taken(x);
}

/* A failed arrival wait counts this rank out again (hc_arena_withdraw).
 * Its slot stays posted: the peers' errors name the rank that never came. */
static int give_up(hc_exec *x, int arrival, int rc) {
    if (arrival) hc_arena_withdraw(x->comm->arena, x->op->seq);
    return rc;
}

/* Waits until `w` holds `want`: every rank arrived at this collective
 * (`arrival`), or left it, or the one before it in this region. */
static int wait_word(hc_exec *x, hc_shm_word *w, uint32_t want, int arrival) {
    if (hc_shm_word_holds(w, want)) return HC_OK;
    hc_comm *c = x->comm;
    int64_t start = hc_now_ns(), spin_until = start + spin_ns(c, x->op);
    /* Spinning only pays when the peers run meanwhile; with more ranks than
     * cores the waiter yields its core instead: the rank sharing it runs its
     * part at once, without a futex round trip and the wake-up of a halted
     * core (4 ranks on 2 cores, per-call loop: 4-byte allreduce 122-152 ->
     * 93-112 µs). A yield to another job costs that job's whole time slice
     * (2 ms a call beside two busy processes), so one slow yield turns
     * yielding off. */
    int yield = oversubscribed(c);
    if (yield && start < c->yield_off_until_ns) spin_until = start;
    while (hc_now_ns() < spin_until) {
        if (yield) {
            if (hc_shm_word_holds(w, want)) return HC_OK;
            int64_t before = hc_now_ns();
            sched_yield();
            int64_t after = hc_now_ns();
            if (after - before > YIELD_SLOW_NS) {
                c->yield_off_until_ns = after + YIELD_BACKOFF_NS;
                if (hc_log_enabled(HC_LOG_DEBUG))
                    hc_log(HC_LOG_DEBUG, "%s: rank %d: a yield kept the core %.1f ms: small collectives sleep at once "
                           "for %d ms", c->name, c->rank, (after - before) / 1e6, YIELD_BACKOFF_NS / 1000000);
                break;
            }
            continue;
        }
        for (int k = 0; k < 64; k++) {
            if (hc_shm_word_holds(w, want)) return HC_OK;
            __builtin_ia32_pause();
        }
    }
    int64_t deadline = x->timeout_ms < 0 ? INT64_MAX : start + (int64_t)x->timeout_ms * 1000000;
    for (;;) {
        int got = hc_shm_word_sleep(w, want, SLICE_US);
        if (got == 1) return HC_OK;
        if (got < 0 && !hc_on_worker)
            return give_up(x, arrival, hc_xfail(x, HC_ERR_INTERRUPTED, "rank %d: %s #%" PRIu64 " interrupted by a signal",
                                                c->rank, hc_op_kind_name(x->op->kind), x->op->seq));
        int rc = serve(x);
        if (rc != HC_OK) return give_up(x, arrival, rc);
        if (hc_shm_word_holds(w, want)) return HC_OK;
        if (hc_now_ns() < deadline) continue;
        if (!arrival)
            return wait_failed(x, -1, want == (uint32_t)x->op->seq ? "finish with this rank's buffers"
                                                                  : "finish the previous small collective", start);
        int missing = first_missing(c, x->op);
        /* Every rank came in while this one gave up: the word is about to hold. */
        if (!hc_arena_withdraw(c->arena, x->op->seq)) continue;
        return wait_failed(x, missing, "arrive", start);
    }
}

/* Socket messages the peer sent before this slot must be in before the op
 * ends: a stray one from an earlier, mismatched collective fails it as it
 * would over the sockets. The slot says how many the peer had sent. */
static int catch_up(hc_exec *x, int peer, uint32_t sent) {
    hc_comm *c = x->comm;
    int64_t start = hc_now_ns();
    while ((int32_t)(sent - c->peers[peer].rx_data) > 0) {
        int rc = hc_progress_poll(c, x->op, peer, SLICE_US / 1000);
        if (rc == HC_OK) rc = socket_path_taken(x);
        if (rc != HC_OK) return rc;
        if (x->timeout_ms >= 0 && hc_now_ns() - start >= (int64_t)x->timeout_ms * 1000000)
            return wait_failed(x, peer, "deliver its earlier messages", start);
    }
    return HC_OK;
}

/* Fills this rank's slot with its call and `len` bytes of `data`, and publishes it. */
static void post(hc_exec *x, hc_arena_slot *s, const void *data, size_t len) {
    hc_comm *c = x->comm;
    hc_op *op = x->op;
    hc_wire_header_init(&s->h, c, HC_MSG_DATA);
    s->h.op = (uint8_t)op->kind;
    s->h.dtype = (uint8_t)op->dtype;
    s->h.redop = (uint8_t)op->redop;
    s->h.root = op->root;
    s->h.seq = op->seq;
    s->h.count = op->count;
    s->h.len = len;
    for (int r = 0; r < c->size; r++) s->sent[r] = c->peers[r].tx_data;
    if (len) memcpy(hc_arena_data(c->arena, s), data, len);
    atomic_store_explicit(&s->posted, (uint32_t)op->seq, memory_order_release);
    atomic_fetch_add_explicit(&c->bytes_sent, len, memory_order_relaxed);
}

/* Every rank arrived: checks that each made the same call and posted as
 * many bytes, and that the socket messages each sent this rank before it
 * are in. */
static int check_peers(hc_exec *x, size_t len) {
    hc_comm *c = x->comm;
    hc_op *op = x->op;
    for (int r = 0; r < c->size; r++) {
        if (r == c->rank) continue;
        hc_arena_slot *s = hc_arena_slot_of(c->arena, op->seq, r);
        int rc = hc_progress_check_header(c, op, &s->h);
        if (rc == HC_OK && s->h.len != len) {
            char who[160];
            rc = hc_xfail(x, HC_ERR_MISMATCH, "%s sent %" PRIu64 " bytes where rank %d expected %zu in %s #%" PRIu64,
                          hc_peer_desc(c, r, who, sizeof who), s->h.len, c->rank, len, hc_op_kind_name(op->kind),
                          op->seq);
        }
        if (rc == HC_OK) rc = catch_up(x, r, s->sent[c->rank]);
        if (rc != HC_OK) return rc;
    }
    return HC_OK;
}

int hc_small_gather(hc_exec *x, const void *data, size_t len) {
    hc_comm *c = x->comm;
    hc_op *op = x->op;
    hc_arena *a = c->arena;
    int rc;
    /* The region's previous collective must be over on every rank. */
    uint64_t *last = &c->arena_seq[op->seq % HC_ARENA_REGIONS];
    if (*last && (rc = wait_word(x, hc_arena_freed(a, op->seq), (uint32_t)*last, 0)) != HC_OK) return rc;
    *last = op->seq;
    post(x, hc_arena_slot_of(a, op->seq, c->rank), data, len);
    if (hc_arena_arrive(a, op->seq))
        hc_arena_publish(a, op->seq);
    else if ((rc = wait_word(x, hc_arena_generation(a, op->seq), (uint32_t)op->seq, 1)) != HC_OK)
        return rc;
    return check_peers(x, len);
}

const void *hc_small_peer_data(hc_exec *x, int rank) {
    hc_arena *a = x->comm->arena;
    return hc_arena_data(a, hc_arena_slot_of(a, x->op->seq, rank));
}

int hc_small_leave(hc_exec *x, int wait_all) {
    hc_arena *a = x->comm->arena;
    hc_arena_leave(a, x->op->seq);
    return wait_all ? wait_word(x, hc_arena_freed(a, x->op->seq), (uint32_t)x->op->seq, 0) : HC_OK;
}

/* out = fold over ranks 0..n-1, in that order, of the `count` elements at
 * byte `offset` of each rank's slot. */
static void fold(hc_exec *x, size_t offset, void *out) {
    hc_comm *c = x->comm;
    hc_op *op = x->op;
    size_t len = part_bytes(op);
    for (int r = 0; r < c->size; r++) {
        const uint8_t *theirs = (const uint8_t *)hc_small_peer_data(x, r) + offset;
        if (r == 0) {
            if (len) memcpy(out, theirs, len);
        } else {
            hc_reduce_kernel(out, out, theirs, op->count, op->dtype, op->redop);
        }
    }
    if (op->redop == HC_AVG) hc_divide_kernel(out, op->count, op->dtype, c->size);
}

int hc_small_run(hc_exec *x) {
    hc_comm *c = x->comm;
    hc_op *op = x->op;
    size_t len = part_bytes(op);
    int me = c->rank, rc;
    if (hc_log_enabled(HC_LOG_DEBUG))
        hc_log(HC_LOG_DEBUG, "%s: rank %d: %s #%" PRIu64 " of %zu bytes a rank (%s): shared-memory arena", c->name, me,
               hc_op_kind_name(op->kind), op->seq, len, hc_dtype_name(op->dtype));
    if ((rc = hc_small_gather(x, op->sendbuf, input_bytes(c, op))) != HC_OK) return rc;
    char *out = op->recvbuf;
    switch (op->kind) {
    case HC_OP_ALLREDUCE: fold(x, 0, out); break;
    case HC_OP_REDUCE_SCATTER: fold(x, (size_t)me * len, out); break;
    case HC_OP_ALLGATHER:
        for (int r = 0; r < c->size && len; r++) memcpy(out + (size_t)r * len, hc_small_peer_data(x, r), len);
        break;
    default: break;
    }
    return hc_small_leave(x, 0);
}
