/*
 * Reshaping: a communicator made from another one over the same links.
 *
 * Shrink keeps some ranks (renumbered in order), grow keeps every rank and
 * adds newcomers at the end. Either way each member first stops the old
 * communicator's worker, so that the calling thread owns the sockets, then
 * tells its peers on the control plane which communicator it is about to
 * become (RESHAPE: the new id, the new size, the ranks kept) and waits until
 * every kept peer said the same. Only then are the sockets moved into the
 * new communicator, so no member runs the new one while another could still
 * refuse it. A peer that is faster starts sending under the new id while a
 * slower one still waits: the old communicator keeps those messages (the
 * "future" list) and hands them over. Late messages of the old communicator
 * reach the new one and are dropped quietly (it knows its ancestors' ids).
 *
 * What the new communicator does not inherit: the shared-memory lanes and
 * arena (the old ones may still hold the old communicator's payloads, and
 * the ranks are renumbered; the new one talks through its sockets, its small
 * collectives included, since only a communicator whose links are all new
 * gets an arena), queued ops and their messages, and the error-feedback residuals
 * (which part of a tensor a rank encodes depends on its place in the ring,
 * so an old residual would be added to the wrong sums; they start at zero,
 * as after hc_comm_reset_residual).
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/internal.h"

void *hc_worker_main(void *arg);

static uint64_t mix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* Equal on every member that keeps the same ranks, and never 0. */
static uint64_t shrink_id(const hc_comm *c, const uint8_t *keep) {
    uint64_t h = mix64(c->cfg.comm_id ^ 0x6b6e69726873ull); /* "shrink" */
    for (int r = 0; r < c->size; r++)
        if (hc_bit(keep, r)) h = mix64(h ^ (uint64_t)(r + 1));
    return h ? h : 1;
}

void hc_reshape_on_message(hc_comm *c, const hc_msg *m) {
    hc_peer *p = &c->peers[m->h.src];
    size_t bytes = hc_bitmap_bytes(c->size);
    if (m->len != bytes) return;
    if (!p->reshape_keep && !(p->reshape_keep = malloc(bytes))) return;
    memcpy(p->reshape_keep, m->data, bytes);
    p->reshape_id = m->h.count;
    p->reshape_size = m->h.root;
    p->reshape_seen = 1;
}

/* Stops the worker (after the queued ops ran, or failed with abort_first)
 * and takes the engine: from here on this thread owns the sockets. */
static void take_over(hc_comm *c, int abort_first) {
    if (abort_first) hc_comm_abort(c, "the communicator is being shrunk with HC_SHRINK_ABORT");
    hc_comm_stop_worker(c);
    pthread_mutex_lock(&c->engine);
}

typedef struct exchange {
    const uint8_t *keep;
    uint64_t id;
    int size;
    int mismatch; /* the first peer whose RESHAPE differs, or -1 */
} exchange;

static int peer_differs(const hc_comm *c, const exchange *x, int r) {
    const hc_peer *p = &c->peers[r];
    if (!p->reshape_seen || p->reshape_id == c->reshape_tried) return 0; /* not yet, or a stale attempt */
    if (!hc_bit(x->keep, r) && !hc_bit(p->reshape_keep, c->rank)) return 0; /* it goes on without us, as we without it */
    if (p->reshape_id != x->id || p->reshape_size != x->size) return 1;
    return memcmp(p->reshape_keep, x->keep, hc_bitmap_bytes(c->size)) != 0;
}

static int exchange_done(hc_comm *c, void *arg) {
    exchange *x = arg;
    for (int r = 0; r < c->size; r++) /* a mismatch says more than a rank that left over it */
        if (r != c->rank && !c->failed[r] && peer_differs(c, x, r)) {
            x->mismatch = r;
            return 1;
        }
    if (c->excluded) return 1;
    int all = 1;
    for (int r = 0; r < c->size; r++) {
        if (r == c->rank || !hc_bit(x->keep, r)) continue;
        const hc_peer *p = &c->peers[r];
        if (c->failed[r] || p->left) return 1; /* a kept rank is gone: fail now */
        if (!p->reshape_seen || p->reshape_id != x->id) all = 0;
    }
    return all;
}

static const char *rank_list(const hc_comm *c, const uint8_t *keep, int kept, char *buf, size_t len) {
    size_t n = (size_t)snprintf(buf, len, "[");
    for (int r = 0, first = 1; r < c->size && n + 16 < len; r++)
        if (hc_bit(keep, r) == kept) {
            n += (size_t)snprintf(buf + n, len - n, "%s%d", first ? "" : ", ", r);
            first = 0;
        }
    snprintf(buf + n, len - n, "]");
    return buf;
}

/* Tells every live peer which communicator this rank becomes and waits until
 * each kept peer announced the same one. Engine held. */
static int exchange_reshape(hc_comm *c, const char *what, const uint8_t *keep, uint64_t id, int size) {
    size_t bytes = hc_bitmap_bytes(c->size);
    c->next_comm_id = id;
    hc_wire_header h;
    hc_wire_header_init(&h, c, HC_MSG_RESHAPE);
    h.count = id;
    h.root = size;
    for (int r = 0; r < c->size; r++)
        if (r != c->rank && !c->failed[r]) hc_tp_send_ctl(c, &c->peers[r], &h, keep, bytes);
    exchange x = {keep, id, size, -1};
    int64_t deadline = hc_now_ns() + (int64_t)c->cfg.timeout_ms * 1000000;
    int rc = hc_progress_until(c, exchange_done, &x, deadline);
    char mine[256], theirs[256], who[160];
    if (x.mismatch >= 0) {
        const hc_peer *p = &c->peers[x.mismatch];
        hc_set_last_error("%s: rank %d: %s differs across ranks: this rank excludes %s (new size %d) but %s "
                          "excludes %s (new size %d)",
                          c->name, c->rank, what, rank_list(c, keep, 0, mine, sizeof mine), size,
                          hc_peer_desc(c, x.mismatch, who, sizeof who),
                          rank_list(c, p->reshape_keep, 0, theirs, sizeof theirs), p->reshape_size);
        return HC_ERR_MISMATCH;
    }
    if (c->excluded) {
        hc_set_last_error("%s: rank %d: %s: the other ranks hold this rank failed and go on without it", c->name,
                          c->rank, what);
        return HC_ERR_PEER_LOST;
    }
    for (int r = 0; r < c->size; r++)
        if (r != c->rank && hc_bit(keep, r) && (c->failed[r] || c->peers[r].left)) {
            hc_set_last_error("%s: rank %d: %s: %s, which it keeps, was lost (%s); call it again without "
                              "that rank",
                              c->name, c->rank, what, hc_peer_desc(c, r, who, sizeof who),
                              c->failed[r] ? "failed" : "it destroyed its communicator");
            return HC_ERR_PEER_LOST;
        }
    if (rc != HC_OK) {
        size_t n = 0;
        mine[0] = 0;
        for (int r = 0; r < c->size && n + 16 < sizeof mine; r++)
            if (r != c->rank && hc_bit(keep, r) && (!c->peers[r].reshape_seen || c->peers[r].reshape_id != id))
                n += (size_t)snprintf(mine + n, sizeof mine - n, "%s%d", n ? ", " : "", r);
        hc_set_last_error("%s: rank %d: %s: rank(s) %s did not join it within %d ms", c->name, c->rank, what, mine,
                          c->cfg.timeout_ms);
        return rc == HC_ERR_INTERRUPTED ? rc : HC_ERR_TIMEOUT;
    }
    return HC_OK;
}

/* Tells every live peer which communicator this rank becomes and waits until
 * each kept peer announced the same one. Engine held. */
static int agree_on_reshape(hc_comm *c, const char *what, const uint8_t *keep, uint64_t id, int size) {
    int rc = exchange_reshape(c, what, keep, id, size);
    if (rc != HC_OK) c->reshape_tried = id; /* a retry must not take the peers' RESHAPEs of this one as current */
    return rc;
}

/* The new communicator: rank `rank` of `size`, whose rank i was rank
 * old_of[i] of c (-1: a newcomer). Takes c's sockets. Engine of c held. */
static hc_comm *derive(hc_comm *c, int rank, int size, uint64_t id, uint64_t token, const int *old_of) {
    hc_config cfg = c->cfg;
    cfg.struct_size = sizeof cfg;
    cfg.rank = rank;
    cfg.size = size;
    cfg.comm_id = id;
    cfg.session_token = token;
    hc_comm *n;
    if (hc_comm_alloc(&cfg, &n) != HC_OK) return NULL;
    for (int i = 0; i < size; i++) {
        hc_peer *np = &n->peers[i];
        int o = old_of[i];
        if (o < 0) { /* a newcomer: hc_comm_set_peer and hc_comm_connect fill it */
            np->rank = i;
            continue;
        }
        hc_peer *op = &c->peers[o];
        *np = (hc_peer){0};
        np->rank = i;
        np->site_name = strdup(op->site_name);
        np->host = strdup(op->host);
        if (i == rank) continue;
        np->endpoints = strdup(op->endpoints);
        np->curve_key = op->curve_key ? strdup(op->curve_key) : NULL;
        memcpy(np->url, op->url, sizeof np->url);
        memcpy(np->ctl_url, op->ctl_url, sizeof np->ctl_url);
        np->secure = op->secure;
        np->inherited = 1;
        /* The links move; they are up and greeted already. */
        np->nstreams = op->nstreams;
        np->streams = op->streams;
        np->ctl = op->ctl;
        np->monitor = op->monitor;
        op->streams = NULL;
        op->ctl = NULL;
        op->monitor = NULL;
        np->hellos = np->peer_streams = np->ready = np->pinged_me = 1;
        np->links_reported = 1;
        np->rtt_ns = op->rtt_ns;
        np->gone = op->gone;
        np->gone_ns = op->gone_ns;
        np->said_bye = op->said_bye;
        np->left = op->left;
        np->last_heard_ns = op->last_heard_ns;
        np->last_beat_ns = op->last_beat_ns;
    }
    for (int i = 0; i < c->ninbox; i++) n->inbox[i] = c->inbox[i];
    for (int i = 0; i < c->nctl; i++) n->ctl_inbox[i] = c->ctl_inbox[i];
    n->ninbox = c->ninbox;
    n->nctl = c->nctl;
    c->ninbox = c->nctl = 0;
    n->secure_monitor = c->secure_monitor;
    c->secure_monitor = NULL;
    n->zctx = c->zctx;
    n->own_ctx = c->own_ctx;
    c->own_ctx = 0;
    memcpy(n->endpoint, c->endpoint, sizeof n->endpoint);
    n->wan_in_flight = c->wan_in_flight;
    n->heartbeat_ns = c->heartbeat_ns;
    n->ancestors[0] = c->cfg.comm_id;
    memcpy(&n->ancestors[1], c->ancestors, sizeof n->ancestors - sizeof n->ancestors[0]);
    n->future_head = c->future_head;
    n->future_tail = c->future_tail;
    c->future_head = c->future_tail = NULL;
    c->nitems = c->nidle = 0; /* the poll sets pointed at the moved sockets */
    return n;
}

/* The old communicator after its links moved: ops fail naming the new one. */
static void retire(hc_comm *c, hc_comm *n, const char *what) {
    c->reshaped = 1;
    if (atomic_load(&c->status) == HC_OK || atomic_load(&c->status) == HC_ERR_PEER_LOST) {
        snprintf(c->error, sizeof c->error, "communicator '%s' (rank %d of %d) was %s into a new one (rank %d of %d); "
                 "use that one", c->name, c->rank, c->size, what, n->rank, n->size);
        atomic_store(&c->status, HC_ERR_STATE);
    }
}

static int start(hc_comm *n) {
    int64_t now = hc_now_ns();
    for (int r = 0; r < n->size; r++)
        if (!n->peers[r].last_heard_ns) n->peers[r].last_heard_ns = n->peers[r].last_beat_ns = now;
    n->connected = 1;
    if (pthread_create(&n->worker, NULL, hc_worker_main, n) != 0) {
        n->connected = 0;
        hc_set_last_error("cannot start the worker thread of the new communicator");
        return HC_ERR_NO_MEMORY;
    }
    n->worker_started = 1;
    return HC_OK;
}

/* Grown, but its newcomers never connected: its members' links still work. */
static int grown_unconnected(const hc_comm *c) {
    for (int r = 0; r < c->size; r++)
        if (r != c->rank && c->peers[r].inherited) return !c->connected;
    return 0;
}

static int check_reshapable(hc_comm *c, const char *fn) {
    if (!c) {
        hc_set_last_error("%s: comm is NULL", fn);
        return HC_ERR_INVALID_ARGUMENT;
    }
    if ((!c->connected && !grown_unconnected(c)) || c->reshaped || c->quiesced) {
        hc_set_last_error("%s: communicator '%s' %s", fn, c->name,
                          !c->connected ? "is not connected"
                          : c->reshaped ? "was already shrunk or grown into another one"
                                        : "closed its links after an error no peer failure explains");
        return HC_ERR_STATE;
    }
    return HC_OK;
}

int hc_comm_shrink(hc_comm *c, const int *exclude, int nexclude, int flags, hc_comm **out) {
    int rc = check_reshapable(c, "hc_comm_shrink");
    if (rc != HC_OK) return rc;
    if (!out || nexclude < 0 || (nexclude && !exclude) || (flags & ~HC_SHRINK_ABORT)) {
        hc_set_last_error("hc_comm_shrink: out is NULL, exclude is NULL with %d ranks, or flags %d unknown", nexclude,
                          flags);
        return HC_ERR_INVALID_ARGUMENT;
    }
    *out = NULL;
    size_t bytes = hc_bitmap_bytes(c->size);
    uint8_t keep[bytes];
    memset(keep, 0, bytes);
    for (int r = 0; r < c->size; r++) hc_set_bit(keep, r);
    for (int i = 0; i < nexclude; i++) {
        int r = exclude[i];
        if (r < 0 || r >= c->size || r == c->rank || !hc_bit(keep, r)) {
            hc_set_last_error("hc_comm_shrink: rank %d: exclude[%d] = %d is %s", c->rank, i, r,
                              r == c->rank ? "this rank itself (an excluded rank does not call shrink)"
                              : r < 0 || r >= c->size ? "out of range"
                                                      : "listed twice");
            return HC_ERR_INVALID_ARGUMENT;
        }
        keep[r / 8] &= (uint8_t)~(1u << (r % 8));
    }
    for (int r = 0; !c->connected && r < c->size; r++)
        if (r != c->rank && !c->peers[r].inherited && hc_bit(keep, r)) {
            hc_set_last_error("hc_comm_shrink: rank %d: communicator '%s' never connected to rank %d (a newcomer "
                              "of a grow that failed): exclude every newcomer to go back to the members",
                              c->rank, c->name, r);
            return HC_ERR_STATE;
        }
    int size = c->size - nexclude, rank = 0, old_of[c->size];
    for (int r = 0, i = 0; r < c->size; r++)
        if (hc_bit(keep, r)) {
            if (r == c->rank) rank = i;
            old_of[i++] = r;
        }
    take_over(c, flags & HC_SHRINK_ABORT);
    uint64_t id = shrink_id(c, keep);
    char what[64];
    snprintf(what, sizeof what, "shrinking to %d rank%s", size, size == 1 ? "" : "s");
    rc = agree_on_reshape(c, what, keep, id, size);
    hc_comm *n = NULL;
    if (rc == HC_OK) {
        n = derive(c, rank, size, id, c->cfg.session_token, old_of);
        if (!n || hc_topology_build(n) != HC_OK) rc = HC_ERR_NO_MEMORY;
        if (rc == HC_OK) {
            hc_tp_build_pollset(n);
            if (!n->items) rc = HC_ERR_NO_MEMORY;
        }
        if (rc == HC_OK) rc = start(n);
        if (rc == HC_OK) retire(c, n, "shrunk");
    }
    if (rc != HC_OK && atomic_load(&c->status) == HC_OK) /* its worker is gone: it cannot run ops any more */
        hc_comm_break(c, rc, hc_last_error(), 0);
    pthread_mutex_unlock(&c->engine);
    if (rc != HC_OK) {
        if (n) hc_comm_destroy(n);
        if (rc == HC_ERR_NO_MEMORY) hc_set_last_error("hc_comm_shrink: out of memory");
        return rc;
    }
    char list[256];
    hc_log(HC_LOG_INFO, "%s: rank %d of %d is rank %d of %d after excluding ranks %s", c->name, c->rank, c->size,
           n->rank, n->size, rank_list(c, keep, 0, list, sizeof list));
    *out = n;
    return HC_OK;
}

int hc_comm_grow(hc_comm *c, int new_size, uint64_t comm_id, uint64_t session_token, hc_comm **out) {
    int rc = check_reshapable(c, "hc_comm_grow");
    if (rc != HC_OK) return rc;
    if (!out || new_size <= c->size || !comm_id || comm_id == c->cfg.comm_id) {
        hc_set_last_error("hc_comm_grow: out is NULL, new_size %d is not above the size %d, or comm_id is 0 or "
                          "the current one",
                          new_size, c->size);
        return HC_ERR_INVALID_ARGUMENT;
    }
    *out = NULL;
    if (atomic_load(&c->status) != HC_OK) {
        hc_set_last_error("hc_comm_grow: communicator '%s' is broken (%s): shrink it first", c->name, c->error);
        return HC_ERR_STATE;
    }
    size_t bytes = hc_bitmap_bytes(c->size);
    uint8_t keep[bytes];
    memset(keep, 0xff, bytes);
    int old_of[new_size];
    for (int i = 0; i < new_size; i++) old_of[i] = i < c->size ? i : -1;
    take_over(c, 0);
    char what[64];
    snprintf(what, sizeof what, "growing to %d ranks", new_size);
    /* Bits past the size are not compared: clear them. */
    if (c->size % 8) keep[bytes - 1] = (uint8_t)((1u << (c->size % 8)) - 1);
    rc = agree_on_reshape(c, what, keep, comm_id, new_size);
    hc_comm *n = NULL;
    if (rc == HC_OK && atomic_load(&c->status) != HC_OK) {
        hc_set_last_error("hc_comm_grow: communicator '%s' broke while growing: %s", c->name, c->error);
        rc = HC_ERR_STATE;
    }
    if (rc == HC_OK) {
        n = derive(c, c->rank, new_size, comm_id, session_token, old_of);
        if (!n) rc = HC_ERR_NO_MEMORY;
        /* Every member re-announces its WAN estimate at connect, and all take
         * the largest, newcomers included. */
        for (int r = 0; rc == HC_OK && r < c->size; r++) n->peers[r].links_reported = 0;
        if (rc == HC_OK) n->wan_in_flight = 0;
        if (rc == HC_OK) retire(c, n, "grown");
    }
    if (rc != HC_OK && atomic_load(&c->status) == HC_OK)
        hc_comm_break(c, rc, hc_last_error(), 0);
    pthread_mutex_unlock(&c->engine);
    if (rc != HC_OK) {
        if (n) hc_comm_destroy(n);
        if (rc == HC_ERR_NO_MEMORY) hc_set_last_error("hc_comm_grow: out of memory");
        return rc;
    }
    *out = n;
    return HC_OK;
}
