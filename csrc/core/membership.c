/*
 * Membership: noticing that peers are gone and agreeing on which.
 *
 * A peer is lost when its control connection drops without a goodbye (its
 * process died: the kernel closed its sockets) or when nothing came from it
 * for heartbeat_ms (a cut link, a frozen host). Either way this rank holds
 * it failed, breaks the communicator with HC_ERR_PEER_LOST, closes the links
 * to it (which drops whatever was queued for it and so releases the user's
 * buffers) and floods its failed set to every live peer in a FAULT message.
 *
 * Agreement: sets only grow, and every rank re-sends its set to any peer
 * whose set differs, so the survivors converge on the union. The
 * coordinator (the lowest rank not held failed) declares the set agreed once
 * every live peer has echoed exactly its set, and sends DECIDE; a rank
 * adopts a DECIDE that equals its own set. A later failure reopens it. A
 * live rank that never echoes is eventually silent for heartbeat_ms and
 * joins the set, so the wait always ends.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"

/* A dropped connection with no goodbye is a crash, but a goodbye sent on the
 * other connection may still be in flight: wait this long for it. */
#define HC_BYE_GRACE_MS 100

int hc_member_init(hc_comm *c) {
    pthread_mutex_init(&c->member_mu, NULL);
    pthread_cond_init(&c->member_cv, NULL);
    c->failed = calloc((size_t)c->size, 1);
    c->heartbeat_ns = (int64_t)c->cfg.heartbeat_ms * 1000000;
    return c->failed ? HC_OK : HC_ERR_NO_MEMORY;
}

void hc_member_free(hc_comm *c) {
    pthread_mutex_destroy(&c->member_mu);
    pthread_cond_destroy(&c->member_cv);
    free(c->failed);
    for (int r = 0; c->peers && r < c->size; r++) free(c->peers[r].reshape_keep);
}

const char *hc_member_list(const hc_comm *c, char *buf, size_t len) {
    size_t n = (size_t)snprintf(buf, len, "[");
    for (int r = 0, first = 1; r < c->size && n + 16 < len; r++)
        if (c->failed[r]) {
            n += (size_t)snprintf(buf + n, len - n, "%s%d", first ? "" : ", ", r);
            first = 0;
        }
    snprintf(buf + n, len - n, "]");
    return buf;
}

static int live_peer(const hc_comm *c, int r) { return r != c->rank && !c->failed[r] && !c->peers[r].left; }

/* The lowest rank still in the job decides. */
static int coordinator(const hc_comm *c) {
    for (int r = 0; r < c->size; r++)
        if (r == c->rank || live_peer(c, r)) return r;
    return -1;
}

static void pack(const hc_comm *c, uint8_t *bits) {
    memset(bits, 0, hc_bitmap_bytes(c->size));
    for (int r = 0; r < c->size; r++)
        if (c->failed[r]) hc_set_bit(bits, r);
}

static void send_set(hc_comm *c, int kind, int to) {
    uint8_t bits[hc_bitmap_bytes(c->size)];
    pack(c, bits);
    hc_wire_header h;
    hc_wire_header_init(&h, c, kind);
    for (int r = 0; r < c->size; r++)
        if ((to < 0 || r == to) && live_peer(c, r)) hc_tp_send_ctl(c, &c->peers[r], &h, bits, sizeof bits);
}

static void announce_agreed(hc_comm *c) {
    char list[256];
    pthread_mutex_lock(&c->member_mu);
    c->agreed = 1;
    pthread_cond_broadcast(&c->member_cv);
    pthread_mutex_unlock(&c->member_mu);
    hc_log(HC_LOG_INFO, "%s: rank %d: the survivors agree that ranks %s failed", c->name, c->rank,
           hc_member_list(c, list, sizeof list));
}

/* The coordinator decides once every live peer echoed the current set. */
static void maybe_decide(hc_comm *c) {
    if (c->agreed || coordinator(c) != c->rank) return;
    for (int r = 0; r < c->size; r++)
        if (live_peer(c, r) && !c->peers[r].acked) return;
    send_set(c, HC_MSG_DECIDE, -1);
    announce_agreed(c);
}

void hc_member_fail(hc_comm *c, int rank, const char *why) {
    if (rank < 0 || rank >= c->size || rank == c->rank || c->failed[rank]) return;
    char who[160], msg[HC_ERROR_LEN];
    hc_peer_desc(c, rank, who, sizeof who);
    snprintf(msg, sizeof msg, "%s was lost: %s", who, why);
    pthread_mutex_lock(&c->member_mu);
    c->failed[rank] = 1;
    c->nfailed++;
    c->agreed = 0;
    pthread_mutex_unlock(&c->member_mu);
    /* The first failure is logged as the error that breaks the communicator. */
    if (atomic_load(&c->status) != HC_OK) hc_log(HC_LOG_WARNING, "%s: rank %d: %s", c->name, c->rank, msg);
    hc_tp_close_peer(c, &c->peers[rank]);
    /* A new member of the set: earlier echoes no longer count. */
    for (int r = 0; r < c->size; r++) c->peers[r].acked = 0;
    hc_comm_break(c, HC_ERR_PEER_LOST, msg, 0);
    send_set(c, HC_MSG_FAULT, -1);
    maybe_decide(c);
}

void hc_member_on_message(hc_comm *c, const hc_msg *m) {
    int src = m->h.src;
    if (m->len != hc_bitmap_bytes(c->size) || c->failed[src]) return;
    const uint8_t *theirs = m->data;
    if (hc_bit(theirs, c->rank) && !c->excluded) {
        char who[160], msg[HC_ERROR_LEN];
        snprintf(msg, sizeof msg, "%s holds this rank (%d) failed: the others go on without it",
                 hc_peer_desc(c, src, who, sizeof who), c->rank);
        c->excluded = 1;
        hc_comm_break(c, HC_ERR_PEER_LOST, msg, 0);
        return;
    }
    for (int r = 0; r < c->size; r++)
        if (hc_bit(theirs, r) && !c->failed[r] && r != c->rank) {
            char why[96];
            snprintf(why, sizeof why, "rank %d found it failed", src);
            hc_member_fail(c, r, why);
        }
    int same = 1;
    for (int r = 0; r < c->size; r++)
        if (hc_bit(theirs, r) != c->failed[r]) same = 0;
    if (!same) {
        send_set(c, HC_MSG_FAULT, src); /* it has not seen all of ours yet */
        return;
    }
    if (m->h.kind == HC_MSG_DECIDE) {
        if (!c->agreed && src == coordinator(c)) announce_agreed(c);
        return;
    }
    c->peers[src].acked = 1;
    maybe_decide(c);
}

/* A dropped connection, a goodbye, or silence, turned into a verdict. */
static void check_peer(hc_comm *c, hc_peer *p, int64_t now, long *next_ms) {
    if (c->failed[p->rank] || p->left) return;
    if (p->gone) {
        if (p->said_bye) {
            p->left = 1; /* a clean close: only waits on it fail */
            return;
        }
        int64_t verdict = p->gone_ns + (int64_t)HC_BYE_GRACE_MS * 1000000;
        if (now >= verdict) {
            hc_member_fail(c, p->rank, "its connection closed without a goodbye (the process exited, "
                                       "crashed or was killed, or its host went down)");
            return;
        }
        long ms = (long)((verdict - now + 999999) / 1000000);
        if (*next_ms < 0 || ms < *next_ms) *next_ms = ms;
        return;
    }
    if (!c->heartbeat_ns || !c->connected) return;
    int64_t silent_until = p->last_heard_ns + c->heartbeat_ns;
    if (now >= silent_until) {
        char why[160];
        snprintf(why, sizeof why, "nothing came from it for %.1f s (heartbeat interval %.1f s): its link "
                                  "is down or its host stopped",
                 (now - p->last_heard_ns) / 1e9, c->heartbeat_ns / 1e9);
        hc_member_fail(c, p->rank, why);
        return;
    }
    long ms = (long)((silent_until - now + 999999) / 1000000);
    if (*next_ms < 0 || ms < *next_ms) *next_ms = ms;
}

long hc_member_tick(hc_comm *c, int64_t now) {
    long next_ms = -1;
    int64_t period = c->heartbeat_ns / 4;
    for (int r = 0; r < c->size; r++) {
        hc_peer *p = &c->peers[r];
        if (r == c->rank || !p->ctl) continue;
        check_peer(c, p, now, &next_ms);
        if (!period || !live_peer(c, r) || !c->connected) continue;
        if (now >= p->last_beat_ns + period) {
            hc_wire_header h;
            hc_wire_header_init(&h, c, HC_MSG_HEARTBEAT);
            hc_tp_send_ctl(c, p, &h, NULL, 0);
            p->last_beat_ns = now;
        }
        long ms = (long)((p->last_beat_ns + period - now + 999999) / 1000000);
        if (next_ms < 0 || ms < next_ms) next_ms = ms;
    }
    return next_ms;
}

int hc_member_settled(const hc_comm *c) { return c->agreed || c->excluded || coordinator(c) < 0; }

static int settled(hc_comm *c, void *arg) {
    (void)arg;
    return hc_member_settled(c);
}

int hc_comm_failed_ranks(hc_comm *c, int timeout_ms, int *ranks, int n, int *count) {
    if (!c || (!ranks && n > 0) || !count) {
        hc_set_last_error("hc_comm_failed_ranks: comm or count is NULL, or ranks is NULL with n > 0");
        return HC_ERR_INVALID_ARGUMENT;
    }
    int rc = HC_OK;
    if (timeout_ms != 0 && c->nfailed && !c->agreed && c->connected && !c->reshaped) {
        int64_t deadline = timeout_ms < 0 ? INT64_MAX : hc_now_ns() + (int64_t)timeout_ms * 1000000;
        if (!hc_on_worker && pthread_mutex_trylock(&c->engine) == 0) {
            /* The worker is idle or gone: drive the agreement on this thread. */
            rc = hc_progress_until(c, settled, NULL, deadline);
            pthread_mutex_unlock(&c->engine);
        } else {
            struct timespec until;
            clock_gettime(CLOCK_REALTIME, &until);
            int64_t ns = until.tv_nsec + (deadline == INT64_MAX ? 0 : deadline - hc_now_ns());
            until.tv_sec += ns / 1000000000;
            until.tv_nsec = ns % 1000000000;
            pthread_mutex_lock(&c->member_mu);
            while (!c->agreed && !c->excluded && rc == HC_OK) {
                if (deadline == INT64_MAX)
                    pthread_cond_wait(&c->member_cv, &c->member_mu);
                else if (pthread_cond_timedwait(&c->member_cv, &c->member_mu, &until) != 0)
                    rc = HC_ERR_TIMEOUT;
            }
            pthread_mutex_unlock(&c->member_mu);
        }
    }
    pthread_mutex_lock(&c->member_mu);
    int k = 0;
    for (int r = 0; r < c->size; r++)
        if (c->failed[r]) {
            if (k < n) ranks[k] = r;
            k++;
        }
    *count = k;
    if (k && !c->agreed && rc == HC_OK && timeout_ms != 0) rc = HC_ERR_TIMEOUT;
    pthread_mutex_unlock(&c->member_mu);
    if (rc == HC_ERR_TIMEOUT)
        hc_set_last_error("rank %d: the survivors have not agreed on the failed ranks within %d ms", c->rank,
                          timeout_ms);
    return rc;
}
