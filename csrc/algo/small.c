/*
 * Small collectives between ranks of one host, through the shared-memory
 * mailboxes (transport/mailbox.h): one direct exchange instead of log2(n)
 * or n-1 socket rounds.
 *
 * Every rank writes its part for each peer into that peer's mailbox, then
 * reads what every peer wrote for it, in rank order. Allreduce and
 * reduce_scatter fold the contributions in rank order 0, 1, ..., n-1 on every
 * rank with the same kernel, so all ranks end with the same bits (NaN
 * payloads included) without a second pass.
 *
 * Each slot carries the sender's wire header, so a mismatched call is the
 * same MismatchError as over the sockets. Waits spin briefly, then sleep on
 * the futex in slices; between slices they serve the sockets (an ABORT, a
 * peer that took the socket path for this collective), abort requests, the
 * peer's connection, signals and the op's timeout.
 */
#include <inttypes.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "core/internal.h"

/* Futex sleeps are cut into slices this long to look at the sockets. */
#define SLICE_US 2000

int hc_small_links_ok(const hc_comm *c) {
    if (!c->cfg.shm_enable) return 0;
    for (int r = 0; r < c->size; r++)
        if (r != c->rank && !(c->peers[r].tx_mbox_ok && c->peers[r].rx_mbox)) return 0;
    return 1;
}

/* The bytes one rank sends one peer in this op. */
static size_t part_bytes(const hc_op *op) { return op->count * hc_dtype_size(op->dtype); }

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
    return whole <= c->cfg.small_bytes && part <= HC_MBOX_SLOT_BYTES;
}

static int oversubscribed(const hc_comm *c) { return sysconf(_SC_NPROCESSORS_ONLN) < c->size; }

/* How long a wait polls before it sleeps on the futex: auto is 30 µs of
 * spinning with a core per rank, 100 µs of yielding without (measured on 2
 * cores with 4 ranks: yielding 100-200 µs cut the median call by 20-25 %
 * against sleeping at once; spinning there made it worse). */
static long spin_ns(const hc_comm *c) {
    int us = c->cfg.spin_us;
    if (us < 0) us = oversubscribed(c) ? 100 : 30;
    return (long)us * 1000;
}

static int wait_failed(hc_exec *x, int peer, const char *what, int64_t start) {
    char who[160];
    return hc_xfail(x, HC_ERR_TIMEOUT,
                    "rank %d timed out after %d ms waiting for %s to %s in %s #%" PRIu64
                    "; that rank is slower, stuck, dead, or not calling this collective",
                    x->comm->rank, (int)((hc_now_ns() - start) / 1000000), hc_peer_desc(x->comm, peer, who, sizeof who),
                    what, hc_op_kind_name(x->op->kind), x->op->seq);
}

/* A peer that ran this collective over the sockets: its call differs (or
 * its small-message settings do); the header check names the difference. */
static int socket_path_taken(hc_exec *x) {
    hc_comm *c = x->comm;
    for (int r = 0; r < c->size; r++)
        for (hc_msg *m = c->peers[r].stash_head; m; m = m->next) {
            if (m->h.seq != x->op->seq) continue;
            int rc = hc_progress_check_header(c, x->op, &m->h);
            if (rc != HC_OK) return rc;
            char who[160];
            return hc_xfail(x, HC_ERR_MISMATCH,
                            "%s ran %s #%" PRIu64 " over the sockets while rank %d used shared memory: "
                            "HETCOMM_SMALL_BYTES, HETCOMM_SHM or HETCOMM_ALGO differ across ranks",
                            hc_peer_desc(c, r, who, sizeof who), hc_op_kind_name(x->op->kind), x->op->seq, c->rank);
        }
    return HC_OK;
}

int hc_small_check_mailboxes(hc_comm *c, hc_op *op) {
    for (int r = 0; r < c->size; r++) {
        if (r == c->rank || !c->peers[r].rx_mbox) continue;
        hc_mbox_slot *s = hc_mbox_slot_for(c->peers[r].rx_mbox, op->seq);
        if (!hc_mbox_holds(&s->ready, (uint32_t)op->seq) || s->h.seq != op->seq) continue;
        int rc = hc_progress_check_header(c, op, &s->h);
        if (rc != HC_OK) return rc;
        char who[160];
        return hc_op_failf(op, HC_ERR_MISMATCH,
                           "%s ran %s #%" PRIu64 " through shared memory while rank %d used the sockets: "
                           "HETCOMM_SMALL_BYTES, HETCOMM_SHM or HETCOMM_ALGO differ across ranks",
                           hc_peer_desc(c, r, who, sizeof who), hc_op_kind_name(op->kind), op->seq, c->rank);
    }
    return HC_OK;
}

/* Waits until `w` holds `want` (the peer wrote or read slot `seq`). */
static int wait_word(hc_exec *x, hc_mbox_word *w, uint32_t want, int peer, const char *what) {
    if (hc_mbox_holds(w, want)) return HC_OK;
    hc_comm *c = x->comm;
    int64_t start = hc_now_ns(), spin_until = start + spin_ns(c);
    /* Spinning only pays when the peer runs meanwhile; with more ranks than
     * cores the waiter yields its core instead, so a peer that is runnable
     * (just woken) gets it without a futex round trip. */
    int yield = oversubscribed(c);
    while (hc_now_ns() < spin_until) {
        if (yield) {
            if (hc_mbox_holds(w, want)) return HC_OK;
            sched_yield();
            continue;
        }
        for (int k = 0; k < 64; k++) {
            if (hc_mbox_holds(w, want)) return HC_OK;
            __builtin_ia32_pause();
        }
    }
    int64_t deadline = x->timeout_ms < 0 ? INT64_MAX : start + (int64_t)x->timeout_ms * 1000000;
    for (;;) {
        int got = hc_mbox_sleep(w, want, SLICE_US);
        if (got == 1) return HC_OK;
        if (got < 0 && !hc_on_worker)
            return hc_xfail(x, HC_ERR_INTERRUPTED, "rank %d: %s #%" PRIu64 " interrupted by a signal", c->rank,
                            hc_op_kind_name(x->op->kind), x->op->seq);
        int rc = hc_progress_poll(c, x->op, peer, 0);
        if (rc == HC_OK) rc = socket_path_taken(x);
        if (rc != HC_OK) return rc;
        if (hc_mbox_holds(w, want)) return HC_OK;
        if (hc_now_ns() >= deadline) return wait_failed(x, peer, what, start);
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

/* Fills this rank's slot of `seq` in the mailbox to `peer` and publishes it. */
static int post(hc_exec *x, int peer, const void *buf, size_t len) {
    hc_comm *c = x->comm;
    hc_op *op = x->op;
    hc_mbox_slot *s = hc_mbox_slot_for(c->peers[peer].tx_mbox, op->seq);
    /* The slot's previous occupant must have been read. */
    uint32_t prev = atomic_load_explicit(&s->ready.value, memory_order_relaxed);
    int rc = wait_word(x, &s->ack, prev, peer, "read the previous small collective");
    if (rc != HC_OK) return rc;
    hc_wire_header_init(&s->h, c, HC_MSG_DATA);
    s->h.op = (uint8_t)op->kind;
    s->h.dtype = (uint8_t)op->dtype;
    s->h.redop = (uint8_t)op->redop;
    s->h.root = op->root;
    s->h.seq = op->seq;
    s->h.count = op->count;
    s->h.len = len;
    s->h.part = c->peers[peer].tx_data;
    if (len) memcpy(s->data, buf, len);
    hc_mbox_post(&s->ready, (uint32_t)op->seq);
    atomic_fetch_add_explicit(&c->bytes_sent, len, memory_order_relaxed);
    return HC_OK;
}

/* Waits for `peer`'s slot of this op, checks it is the same call, and
 * returns its payload (read it, then hc_small_done). */
static int collect(hc_exec *x, int peer, size_t len, const uint8_t **data) {
    hc_comm *c = x->comm;
    hc_op *op = x->op;
    hc_mbox_slot *s = hc_mbox_slot_for(c->peers[peer].rx_mbox, op->seq);
    int rc = wait_word(x, &s->ready, (uint32_t)op->seq, peer, "send its part");
    if (rc != HC_OK) return rc;
    if ((rc = hc_progress_check_header(c, op, &s->h)) != HC_OK) return rc;
    if ((rc = catch_up(x, peer, s->h.part)) != HC_OK) return rc;
    if (s->h.len != len) {
        char who[160];
        return hc_xfail(x, HC_ERR_MISMATCH, "%s sent %" PRIu64 " bytes where rank %d expected %zu in %s #%" PRIu64,
                        hc_peer_desc(c, peer, who, sizeof who), s->h.len, c->rank, len, hc_op_kind_name(op->kind),
                        op->seq);
    }
    *data = s->data;
    return HC_OK;
}

/* Hands `peer`'s slot of this op back to it. */
static void done(hc_exec *x, int peer) {
    hc_mbox_slot *s = hc_mbox_slot_for(x->comm->peers[peer].rx_mbox, x->op->seq);
    hc_mbox_post(&s->ack, (uint32_t)x->op->seq);
}

/* out = fold over ranks 0..n-1, in that order, of each rank's `count`
 * elements (this rank's at `mine`). */
static int fold(hc_exec *x, const void *mine, void *out) {
    hc_comm *c = x->comm;
    hc_op *op = x->op;
    size_t len = part_bytes(op);
    int rc = HC_OK;
    const char *m = mine, *o = out;
    if (c->rank != 0 && len && m < o + len && o < m + len) {
        /* In place: the fold overwrites this rank's data before its turn. */
        void *copy = hc_comm_scratch(c, HC_SCRATCH_TMP, len);
        if (!copy) return hc_xfail(x, HC_ERR_NO_MEMORY, "rank %d: no memory for %zu bytes", c->rank, len);
        mine = memcpy(copy, mine, len);
    }
    for (int r = 0; r < c->size && rc == HC_OK; r++) {
        const uint8_t *theirs = mine;
        if (r != c->rank && (rc = collect(x, r, len, &theirs)) != HC_OK) break;
        if (r == 0) {
            if (out != (const void *)theirs && len) memcpy(out, theirs, len);
        } else {
            hc_reduce_kernel(out, out, theirs, op->count, op->dtype, op->redop);
        }
        if (r != c->rank) done(x, r);
    }
    if (rc == HC_OK && op->redop == HC_AVG) hc_divide_kernel(out, op->count, op->dtype, c->size);
    return rc;
}

int hc_small_run(hc_exec *x) {
    hc_comm *c = x->comm;
    hc_op *op = x->op;
    size_t len = part_bytes(op);
    const char *in = op->sendbuf;
    char *out = op->recvbuf;
    int n = c->size, me = c->rank, rc = HC_OK;
    if (hc_log_enabled(HC_LOG_DEBUG))
        hc_log(HC_LOG_DEBUG, "%s: rank %d: %s #%" PRIu64 " of %zu bytes a peer (%s): shared-memory mailboxes", c->name,
               me, hc_op_kind_name(op->kind), op->seq, len, hc_dtype_name(op->dtype));
    for (int k = 1; k < n && rc == HC_OK; k++) { /* the next rank first: in a ring of waits, no rank waits on all */
        int r = (me + k) % n;
        const char *part = op->kind == HC_OP_REDUCE_SCATTER ? in + (size_t)r * len : in;
        rc = post(x, r, part, len);
    }
    if (rc != HC_OK) return rc;
    switch (op->kind) {
    case HC_OP_ALLREDUCE: return fold(x, in, out);
    case HC_OP_REDUCE_SCATTER: {
        /* This rank's block of its own input; the output may be any buffer. */
        return fold(x, in + (size_t)me * len, out);
    }
    case HC_OP_ALLGATHER:
        if (len && out + (size_t)me * len != in) memmove(out + (size_t)me * len, in, len);
        /* fallthrough */
    default:
        for (int r = 0; r < n && rc == HC_OK; r++) {
            const uint8_t *theirs;
            if (r == me || (rc = collect(x, r, len, &theirs)) != HC_OK) continue;
            if (op->kind == HC_OP_ALLGATHER && len) memcpy(out + (size_t)r * len, theirs, len);
            done(x, r);
        }
        return rc;
    }
}
