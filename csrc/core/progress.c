/*
 * The progress engine: the one loop that waits on the network for the worker.
 *
 * Everything arrives in this rank's inboxes, from every peer, in whatever
 * order the peers ran. Each wait drains the inboxes and files what it finds:
 * the message being waited for is returned; messages of collectives not yet
 * reached are kept per sender (the stash); point-to-point messages go to the
 * p2p engine; an ABORT from a peer fails the wait; garbage is dropped with a
 * warning, so a stray client on a port cannot break a job. Between drains
 * it blocks in zmq_poll on the inboxes, the wake-up pipe (new ops, abort
 * requests), the zero-copy release pipe and the peers' monitors.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/internal.h"

/* After a peer closed its communicator on purpose (a goodbye, then its
 * connection dropped), messages it sent before may still be in flight on its
 * other connections; a wait on it allows this long for them. A peer that
 * drops without a goodbye is failed by the membership instead. */
#define HC_GONE_GRACE_MS 2000

hc_msg *hc_msg_alloc(hc_comm *c) {
    hc_msg *m = c->free_msgs;
    if (m) {
        c->free_msgs = m->next;
    } else if (!(m = malloc(sizeof *m))) {
        return NULL;
    }
    m->has_payload_frame = 0;
    m->lane = NULL;
    m->data = NULL;
    m->len = 0;
    m->next = NULL;
    return m;
}

void hc_msg_free(hc_comm *c, hc_msg *m) {
    m->next = c->free_msgs;
    c->free_msgs = m;
}

static void drop(hc_comm *c, hc_msg *m) {
    hc_tp_release_msg(c, m);
    hc_msg_free(c, m);
}

static const char *call_desc(char *buf, size_t len, int kind, uint64_t count, int dtype,
                             int redop, int root, int codec, uint32_t params) {
    int n = snprintf(buf, len, "%s(count=%" PRIu64 ", dtype=%s", hc_op_kind_name(kind), count,
                     hc_dtype_name(dtype));
    if (kind == HC_OP_ALLREDUCE || kind == HC_OP_REDUCE || kind == HC_OP_REDUCE_SCATTER)
        n += snprintf(buf + n, len - (size_t)n, ", op=%s", hc_redop_name(redop));
    if (kind == HC_OP_BROADCAST || kind == HC_OP_REDUCE || kind == HC_OP_GATHER ||
        kind == HC_OP_SCATTER)
        n += snprintf(buf + n, len - (size_t)n, ", root=%d", root);
    if (codec)
        n += snprintf(buf + n, len - (size_t)n, ", codec=%s, block=%u, %s scales", hc_codec_name(codec),
                      params & 0x7fffffffu, params >> 31 ? "fp32" : "fp16");
    snprintf(buf + n, len - (size_t)n, ")");
    return buf;
}

int hc_progress_check_header(hc_comm *c, hc_op *op, const hc_wire_header *h) {
    int same = h->op == op->kind && h->dtype == op->dtype;
    if (op->kind == HC_OP_ALLREDUCE || op->kind == HC_OP_REDUCE || op->kind == HC_OP_REDUCE_SCATTER)
        same = same && h->redop == op->redop;
    if (op->kind == HC_OP_BROADCAST || op->kind == HC_OP_REDUCE || op->kind == HC_OP_GATHER ||
        op->kind == HC_OP_SCATTER)
        same = same && h->root == op->root;
    if (op->kind != HC_OP_ALLTOALLV && op->kind != HC_OP_BARRIER) same = same && h->count == op->count;
    uint32_t params = op->codec ? c->cfg.codec_block | (c->cfg.codec_scale_fp32 ? 0x80000000u : 0) : 0;
    same = same && h->codec == op->codec && h->reserved0 == params;
    if (same) return HC_OK;
    char mine[200], theirs[200], who[160];
    return hc_op_failf(op, HC_ERR_MISMATCH,
                       "collective #%" PRIu64 " differs across ranks: rank %d called %s but %s called %s",
                       op->seq, c->rank,
                       call_desc(mine, sizeof mine, op->kind, op->count, op->dtype, op->redop, op->root, op->codec, params),
                       hc_peer_desc(c, h->src, who, sizeof who),
                       call_desc(theirs, sizeof theirs, h->op, h->count, h->dtype, h->redop, h->root, h->codec, h->reserved0));
}

/* Garbage on a port is logged once per remote address per minute, with how
 * many messages were dropped since, so a flood cannot flood the log. */
#define HC_GARBAGE_SOURCES 64
#define HC_GARBAGE_LOG_NS (60 * (int64_t)1000000000)
struct hc_garbage {
    struct {
        char addr[64];
        int64_t logged_ns;
        uint64_t dropped; /* since the last line about this address */
    } src[HC_GARBAGE_SOURCES];
    uint64_t total;
};

void hc_progress_remember(hc_comm *c, const hc_op *op) {
    c->recent[op->seq % HC_RECENT_OPS] = (hc_call_sig){op->seq, op->count, op->kind, op->dtype, op->redop, op->root,
                                                      op->codec};
}

/* A message of a collective this rank is past. If that collective completed
 * here under another signature, the ranks called different things (a rank
 * that only sent, a broadcast root say, could not tell then); otherwise
 * they issued different numbers of collectives. */
static int stale(hc_comm *c, hc_op *op, const hc_msg *m) {
    const hc_call_sig *s = &c->recent[m->h.seq % HC_RECENT_OPS];
    if (s->seq == m->h.seq) {
        hc_op done = {.kind = s->kind, .dtype = s->dtype, .redop = s->redop, .root = s->root, .codec = s->codec,
                      .count = s->count, .seq = s->seq};
        if (hc_progress_check_header(c, &done, &m->h) != HC_OK)
            return hc_op_failf(op, HC_ERR_MISMATCH, "%s", done.error);
    }
    char who[160];
    return hc_op_failf(op, HC_ERR_PROTOCOL,
                       "%s sent a message of collective #%" PRIu64 " while this rank runs #%" PRIu64
                       "; the ranks issued different numbers of collectives",
                       hc_peer_desc(c, m->h.src, who, sizeof who), m->h.seq, op->seq);
}

static void warn_dropped(hc_comm *c, hc_msg *m, const char *why) {
    if (!c->garbage && !(c->garbage = calloc(1, sizeof *c->garbage))) return;
    struct hc_garbage *g = c->garbage;
    const char *addr = hc_zmq.msg_gets ? hc_zmq.msg_gets(&m->frame, "Peer-Address") : NULL;
    if (!addr || !*addr) addr = "a local (ipc) client";
    g->total++;
    int slot = 0;
    for (int i = 0; i < HC_GARBAGE_SOURCES; i++) {
        if (strncmp(g->src[i].addr, addr, sizeof g->src[i].addr - 1) == 0) {
            slot = i;
            break;
        }
        if (g->src[i].logged_ns < g->src[slot].logged_ns) slot = i; /* the stalest, if not found */
    }
    if (strncmp(g->src[slot].addr, addr, sizeof g->src[slot].addr - 1) != 0) {
        snprintf(g->src[slot].addr, sizeof g->src[slot].addr, "%s", addr);
        g->src[slot].logged_ns = 0;
        g->src[slot].dropped = 0;
    }
    g->src[slot].dropped++;
    int64_t now = hc_now_ns();
    if (g->src[slot].logged_ns && now - g->src[slot].logged_ns < HC_GARBAGE_LOG_NS) return;
    hc_log(HC_LOG_WARNING,
           "%s: rank %d dropped %llu message(s) from %s on its port in the last minute (%llu in all): %s "
           "(magic %08x, version %u, src %d); further ones from there are counted, not logged, for a minute",
           c->name, c->rank, (unsigned long long)g->src[slot].dropped, addr, (unsigned long long)g->total, why,
           m->h.magic, m->h.version, m->h.src);
    g->src[slot].logged_ns = now;
    g->src[slot].dropped = 0;
}

/* Handshake messages carry the session token where collectives carry their sequence number. */
static void control_header(const hc_comm *c, hc_wire_header *h, int kind) {
    hc_wire_header_init(h, c, kind);
    h->seq = c->cfg.session_token;
}

/* A peer's first greeting: map the lane it offers, then tell it whether to use it. */
static void greeted_by(hc_comm *c, hc_peer *p, int offered) {
    if ((offered & HC_WIRE_SHM) && !p->rx_lane && p->site == c->peers[c->rank].site) {
        char name[64];
        hc_lane_name(c, p->rank, c->rank, name, sizeof name);
        p->rx_lane = hc_lane_attach(name);
    }
    if ((offered & HC_WIRE_ARENA) && p->rank == 0 && !c->arena && c->cfg.shm_enable) {
        char name[64];
        hc_arena_name(c, name, sizeof name);
        c->arena = hc_arena_attach(name, c->size);
    }
    hc_wire_header h;
    control_header(c, &h, HC_MSG_READY);
    if (p->rx_lane) h.flags = HC_WIRE_SHM;
    hc_tp_send(c, p, &h, NULL, 0, -1);
}

/* What the engine is waiting for; NULL op while idle. */
typedef struct want {
    hc_op *op;
    int src;
    uint32_t part;
    hc_msg *found;
} want;

static void stash(hc_peer *p, hc_msg *m) {
    m->next = NULL;
    if (p->stash_tail)
        p->stash_tail->next = m;
    else
        p->stash_head = m;
    p->stash_tail = m;
}

static hc_msg *unstash(hc_peer *p, uint64_t seq, uint32_t part) {
    for (hc_msg *prev = NULL, *m = p->stash_head; m; prev = m, m = m->next) {
        if (m->h.seq != seq || m->h.part != part) continue;
        if (prev)
            prev->next = m->next;
        else
            p->stash_head = m->next;
        if (p->stash_tail == m) p->stash_tail = prev;
        m->next = NULL;
        return m;
    }
    return NULL;
}

static uint64_t current_seq(hc_comm *c, hc_op *op) { return op ? op->seq : 0; }

/* Files one message. Returns HC_OK, or an error status for the wait. */
static int dispatch(hc_comm *c, want *w, hc_msg *m) {
    hc_wire_header *h = &m->h;
    if (h->magic != HC_WIRE_MAGIC) {
        warn_dropped(c, m, "not a hetcomm message");
        drop(c, m);
        return HC_OK;
    }
    if (h->version != HC_WIRE_VERSION) {
        warn_dropped(c, m, "another wire version (a hetcomm of another release?)");
        drop(c, m);
        return HC_OK;
    }
    if (h->comm_id != c->cfg.comm_id) {
        if (h->comm_id == c->next_comm_id && c->next_comm_id) {
            /* A peer already runs the communicator this one is being reshaped into. */
            m->next = NULL;
            if (c->future_tail)
                c->future_tail->next = m;
            else
                c->future_head = m;
            c->future_tail = m;
            return HC_OK;
        }
        int ancestor = 0;
        for (size_t i = 0; i < sizeof c->ancestors / sizeof c->ancestors[0]; i++)
            if (c->ancestors[i] && c->ancestors[i] == h->comm_id) ancestor = 1;
        if (!ancestor) warn_dropped(c, m, "from another communicator");
        drop(c, m); /* late messages of the communicator this one was reshaped from */
        return HC_OK;
    }
    if (h->src < 0 || h->src >= c->size || h->src == c->rank) {
        warn_dropped(c, m, "from an unknown rank");
        drop(c, m);
        return HC_OK;
    }
    hc_peer *p = &c->peers[h->src];
    if (c->failed && c->failed[h->src]) { /* held failed: it is not heard any more */
        drop(c, m);
        return HC_OK;
    }
    p->last_heard_ns = hc_now_ns();
    switch (h->kind) {
    case HC_MSG_HEARTBEAT:
        drop(c, m);
        return HC_OK;
    case HC_MSG_BYE:
        p->said_bye = 1;
        drop(c, m);
        return HC_OK;
    case HC_MSG_FAULT:
    case HC_MSG_DECIDE:
        hc_member_on_message(c, m);
        drop(c, m);
        return HC_OK;
    case HC_MSG_RESHAPE:
        hc_reshape_on_message(c, m);
        drop(c, m);
        return HC_OK;
    case HC_MSG_HELLO:
        if (h->seq != c->cfg.session_token) {
            warn_dropped(c, m, "greeting with the wrong session token (another job on this port?)");
        } else if (p->hellos++ == 0) {
            p->peer_streams = (int)h->count;
            greeted_by(c, p, h->flags);
        }
        drop(c, m);
        return HC_OK;
    case HC_MSG_READY:
        if (h->seq == c->cfg.session_token && !p->ready) {
            p->ready = 1;
            if ((h->flags & HC_WIRE_SHM) && p->tx_lane) {
                p->tx_lane_ok = 1;
                hc_log(HC_LOG_DEBUG, "%s: rank %d -> rank %d: payloads through shared memory (%u x %zu bytes)",
                       c->name, c->rank, p->rank, p->tx_lane->nslots, p->tx_lane->slot_bytes);
            } else if (p->tx_lane) { /* it could not map the lane: sockets only */
                hc_lane_close(p->tx_lane);
                p->tx_lane = NULL;
            }
        }
        drop(c, m);
        return HC_OK;
    case HC_MSG_PING:
        if (h->seq == c->cfg.session_token) {
            hc_wire_header pong;
            control_header(c, &pong, HC_MSG_PONG);
            pong.count = h->count;
            p->pinged_me = 1;
            hc_tp_send(c, p, &pong, NULL, 0, -1);
        }
        drop(c, m);
        return HC_OK;
    case HC_MSG_PONG:
        if (h->seq == c->cfg.session_token && h->count) {
            int64_t rtt = hc_now_ns() - (int64_t)h->count;
            p->rtt_ns = rtt > 0 ? rtt : 1;
        }
        drop(c, m);
        return HC_OK;
    case HC_MSG_LINKS:
        if (h->seq == c->cfg.session_token) {
            p->links_reported = 1;
            p->arena_mapped = (h->flags & HC_WIRE_ARENA) != 0;
            if (h->count > c->wan_in_flight) c->wan_in_flight = (size_t)h->count;
        }
        drop(c, m);
        return HC_OK;
    case HC_MSG_ABORT: {
        char who[160];
        int status = h->root > HC_OK && h->root < HC_IN_PROGRESS ? h->root : HC_ERR_ABORTED;
        int rc = w->op ? hc_op_failf(w->op, status, "%s aborted the communicator: %.*s",
                                     hc_peer_desc(c, h->src, who, sizeof who), (int)m->len,
                                     (const char *)m->data)
                       : status;
        if (!w->op) {
            hc_set_last_error("%s aborted the communicator: %.*s", hc_peer_desc(c, h->src, who, sizeof who),
                              (int)m->len, (const char *)m->data);
            hc_comm_break(c, status, hc_last_error(), 0);
        }
        drop(c, m);
        return rc;
    }
    case HC_MSG_P2P:
        hc_p2p_deliver(c, m);
        return HC_OK;
    case HC_MSG_CREDIT:
        if (p->pend_head) hc_tp_pump(c, p);
        drop(c, m);
        return HC_OK;
    case HC_MSG_DATA: {
        p->rx_data++;
        uint64_t cur = current_seq(c, w->op);
        if (w->op && h->seq == cur) {
            int rc = hc_progress_check_header(c, w->op, &m->h);
            if (rc != HC_OK) {
                drop(c, m);
                return rc;
            }
            if (h->src == w->src && h->part == w->part && !w->found) {
                w->found = m;
                return HC_OK;
            }
        } else if (w->op && h->seq < cur) {
            int rc = stale(c, w->op, m);
            drop(c, m);
            return rc;
        }
        stash(p, m);
        return HC_OK;
    }
    default:
        warn_dropped(c, m, "unknown message kind");
        drop(c, m);
        return HC_OK;
    }
}

static int drain_socket(hc_comm *c, want *w, int ctl, int i) {
    hc_msg *m;
    int r;
    while ((r = ctl ? hc_tp_try_recv_ctl(c, i, &m) : hc_tp_try_recv(c, i, &m)) == 1) {
        int rc = dispatch(c, w, m);
        if (rc != HC_OK) return rc;
        if (w->found) return HC_OK;
    }
    if (r < 0) return w->op ? hc_op_failf(w->op, -r, "%s", hc_last_error()) : -r;
    return HC_OK;
}

/* Control messages first: a fault notice must not wait behind data. */
static int drain_control(hc_comm *c, want *w) {
    for (int i = 0; i < c->nctl; i++) {
        int rc = drain_socket(c, w, 1, i);
        if (rc != HC_OK || w->found) return rc;
    }
    return HC_OK;
}

static int drain_inboxes(hc_comm *c, want *w) {
    /* Messages that came for this communicator while it was being made. */
    while (c->future_head) {
        hc_msg *m = c->future_head;
        c->future_head = m->next;
        if (!c->future_head) c->future_tail = NULL;
        int rc = dispatch(c, w, m);
        if (rc != HC_OK || w->found) return rc;
    }
    int rc = drain_control(c, w);
    if (rc != HC_OK || w->found) return rc;
    for (int i = 0; i < c->ninbox; i++) {
        rc = drain_socket(c, w, 0, i);
        if (rc != HC_OK || w->found) return rc;
    }
    return HC_OK;
}

static void drain_pipe(int fd) {
    char buf[64];
    while (read(fd, buf, sizeof buf) > 0) {
    }
}

static int watch_monitors(hc_comm *c, want *w);

/* New p2p ops, abort requests, monitor events. */
static int service_control(hc_comm *c, want *w) {
    if (atomic_load(&c->status) != HC_OK) {
        hc_set_last_error("%s", c->error);
        return w->op ? hc_op_failf(w->op, atomic_load(&c->status), "%s", c->error) : atomic_load(&c->status);
    }
    drain_pipe(c->wake_fd[0]);
    drain_pipe(c->tx->fd[0]);
    pthread_mutex_lock(&c->qmu);
    hc_op *p2p = c->p2p_head;
    c->p2p_head = c->p2p_tail = NULL;
    pthread_mutex_unlock(&c->qmu);
    while (p2p) {
        hc_op *next = p2p->next;
        p2p->next = NULL;
        hc_p2p_start(c, p2p);
        p2p = next;
    }
    if (atomic_load(&c->abort_requested)) {
        hc_set_last_error("aborted on rank %d: %s", c->rank, c->abort_reason);
        return w->op ? hc_op_failf(w->op, HC_ERR_ABORTED, "%s", hc_last_error()) : HC_ERR_ABORTED;
    }
    return watch_monitors(c, w);
}

/* What a failed handshake on this rank's CURVE port means, or NULL where it
 * says nothing about this job's keys: NO_DETAIL is a connection that broke
 * off mid-handshake, which is what a peer that has just failed for its own
 * reason (and closed) leaves behind. */
static const char *curve_port_failure(int ev) {
    if (ev & HC_ZMQ_EVENT_HANDSHAKE_FAILED_AUTH)
        return "refused a connection to its CURVE port: the connecting process's key is not in the allow-list";
    if (ev & HC_ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL)
        return "refused a connection to its CURVE port: the connecting process expected another server key "
               "or spoke another protocol";
    return NULL;
}

/* Peers whose control connection dropped or whose handshake failed, then
 * refused CURVE clients. The peers come first: when this rank's key was
 * refused, the peer that refused it may also have broken off its own
 * connection to this rank, and the refusal is what the user must read. */
static int watch_monitors(hc_comm *c, want *w) {
    for (int r = 0; r < c->size; r++) {
        hc_peer *p = &c->peers[r];
        if (r == c->rank || !p->monitor) continue;
        for (int ev; (ev = hc_tp_read_monitor(c, p)) != 0;) {
            char who[160];
            if (ev == HC_ZMQ_EVENT_DISCONNECTED) {
                if (!p->gone) {
                    p->gone = 1;
                    p->gone_ns = hc_now_ns();
                    hc_log(HC_LOG_INFO, "%s: rank %d lost its connection to %s", c->name, c->rank,
                           hc_peer_desc(c, r, who, sizeof who));
                }
            } else if (ev & (HC_ZMQ_EVENT_HANDSHAKE_FAILED_AUTH | HC_ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL |
                             HC_ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL)) {
                const char *why = p->secure ? "refused this rank's CURVE key, or its own key is not the one "
                                              "this rank expects"
                                            : "failed the ZeroMQ handshake";
                char msg[HC_ERROR_LEN];
                snprintf(msg, sizeof msg, "rank %d: the link to %s (%s) %s", c->rank,
                         hc_peer_desc(c, r, who, sizeof who), p->url, why);
                if (w->op) return hc_op_failf(w->op, p->secure ? HC_ERR_AUTH : HC_ERR_PROTOCOL, "%s", msg);
                hc_set_last_error("%s", msg);
                return p->secure ? HC_ERR_AUTH : HC_ERR_PROTOCOL;
            }
        }
    }
    for (int ev; c->secure_monitor && (ev = hc_tp_read_event(c->secure_monitor)) != 0;) {
        const char *what = curve_port_failure(ev);
        if (!what) {
            hc_log(HC_LOG_INFO, "%s: rank %d: a connection to its CURVE port broke off during the handshake",
                   c->name, c->rank);
            continue;
        }
        if (c->connected) { /* a running job ignores strangers */
            hc_log(HC_LOG_WARNING, "%s: rank %d %s", c->name, c->rank, what);
            continue;
        }
        hc_set_last_error("%s: rank %d %s", c->name, c->rank, what);
        return HC_ERR_AUTH;
    }
    return HC_OK;
}

static long ms_until(int64_t deadline_ns, int64_t now) {
    if (deadline_ns == INT64_MAX) return -1;
    int64_t d = deadline_ns - now;
    return d <= 0 ? 0 : (long)((d + 999999) / 1000000);
}

static long min_timeout(long a, long b) {
    if (a < 0) return b;
    if (b < 0) return a;
    return a < b ? a : b;
}

_Thread_local int hc_on_worker;

static int poll_items(hc_comm *c, hc_op *op, long timeout_ms) {
    if (hc_zmq.poll(c->items, c->nitems, timeout_ms) >= 0) return HC_OK;
    int e = hc_zmq.errno_();
    if (e == EINTR) {
        if (hc_on_worker || !op) return HC_OK; /* not this thread's signal: wait again */
        /* A blocking call on the user's thread: return to the caller so that
         * Ctrl-C and its other signal handlers run. */
        return hc_op_failf(op, HC_ERR_INTERRUPTED, "rank %d: %s #%llu interrupted by a signal", c->rank,
                           hc_op_kind_name(op->kind), (unsigned long long)op->seq);
    }
    if (op) return hc_op_failf(op, HC_ERR_TRANSPORT, "zmq_poll: %s", hc_zmq.strerror(e));
    return HC_ERR_TRANSPORT;
}

int hc_progress_check_stash(hc_comm *c, hc_op *op) {
    /* Messages that arrived before this op started were filed unchecked. */
    for (int r = 0; r < c->size; r++)
        for (hc_msg *m = c->peers[r].stash_head; m; m = m->next) {
            if (m->h.seq == op->seq) {
                int rc = hc_progress_check_header(c, op, &m->h);
                if (rc != HC_OK) return rc;
            } else if (m->h.seq < op->seq) {
                return stale(c, op, m);
            }
        }
    return HC_OK;
}

int hc_progress_wait(hc_comm *c, hc_op *op, int src, uint32_t part, int timeout_ms, hc_msg **out) {
    hc_peer *p = &c->peers[src];
    hc_msg *m = unstash(p, op->seq, part);
    if (m) {
        int rc = hc_progress_check_header(c, op, &m->h);
        if (rc != HC_OK) {
            drop(c, m);
            return rc;
        }
        *out = m;
        return HC_OK;
    }
    int64_t start = hc_now_ns();
    int64_t deadline = timeout_ms < 0 ? INT64_MAX : start + (int64_t)timeout_ms * 1000000;
    want w = {op, src, part, NULL};
    for (;;) {
        int rc = drain_inboxes(c, &w);
        if (rc != HC_OK) return rc;
        if (w.found) {
            *out = w.found;
            return HC_OK;
        }
        if ((rc = service_control(c, &w)) != HC_OK) return rc;
        int64_t now = hc_now_ns();
        char who[160];
        long tick = hc_member_tick(c, now);
        if (atomic_load(&c->status) != HC_OK) continue; /* a peer was found failed: service_control fails the op */
        /* A peer that closed on purpose may have sent its last messages just before. */
        if (p->left && now >= p->gone_ns + (int64_t)HC_GONE_GRACE_MS * 1000000)
            return hc_op_failf(op, HC_ERR_PEER_LOST,
                               "%s destroyed its communicator while rank %d waited for message %u of %s #%" PRIu64,
                               hc_peer_desc(c, src, who, sizeof who), c->rank, part,
                               hc_op_kind_name(op->kind), op->seq);
        if (now >= deadline)
            return hc_op_failf(op, HC_ERR_TIMEOUT,
                               "rank %d timed out after %d ms waiting for %s in %s #%" PRIu64
                               " (message %u); that rank is slower, stuck, dead, or not calling "
                               "this collective",
                               c->rank, timeout_ms, hc_peer_desc(c, src, who, sizeof who),
                               hc_op_kind_name(op->kind), op->seq, part);
        long wait = ms_until(deadline, now);
        wait = min_timeout(wait, hc_p2p_expire(c, now));
        wait = min_timeout(wait, tick);
        if (p->left) wait = min_timeout(wait, ms_until(p->gone_ns + (int64_t)HC_GONE_GRACE_MS * 1000000, now));
        if (c->small_shm) { /* a peer that took the arena path for this op writes nothing here */
            if ((rc = hc_small_check_arena(c, op)) != HC_OK) return rc;
            wait = min_timeout(wait, HC_SMALL_CHECK_MS);
        }
        if ((rc = poll_items(c, op, wait)) != HC_OK) return rc;
    }
}

int hc_progress_tx_drain(hc_comm *c, hc_op *op, int group, int timeout_ms) {
    int64_t deadline = timeout_ms < 0 ? INT64_MAX : hc_now_ns() + (int64_t)timeout_ms * 1000000;
    want w = {op, -1, 0, NULL};
    for (;;) {
        if (hc_tx_inflight(c->tx, group) == 0) return HC_OK;
        /* Keep filing arrivals so an ABORT or a drop is noticed while waiting. */
        int rc = drain_inboxes(c, &w);
        if (rc == HC_OK) rc = service_control(c, &w);
        if (rc != HC_OK) return rc;
        if (hc_tx_inflight(c->tx, group) == 0) return HC_OK;
        int64_t now = hc_now_ns();
        if (now >= deadline)
            return hc_op_failf(op, HC_ERR_TIMEOUT,
                               "rank %d timed out after %d ms waiting for its peers to take the "
                               "data it sent in %s #%" PRIu64,
                               c->rank, timeout_ms, hc_op_kind_name(op->kind), op->seq);
        long tick = hc_member_tick(c, now);
        if ((rc = poll_items(c, op, min_timeout(ms_until(deadline, now), tick))) != HC_OK) return rc;
    }
}

/* p2p ops queued on a communicator that broke before they started. */
static void fail_queued_p2p(hc_comm *c) {
    pthread_mutex_lock(&c->qmu);
    hc_op *p2p = c->p2p_head;
    c->p2p_head = c->p2p_tail = NULL;
    pthread_mutex_unlock(&c->qmu);
    for (hc_op *next; p2p; p2p = next) {
        next = p2p->next;
        hc_op_complete(p2p, atomic_load(&c->status) == HC_ERR_PEER_LOST ? HC_ERR_PEER_LOST : HC_ERR_ABORTED,
                       c->error);
    }
}

int hc_progress_poll(hc_comm *c, hc_op *op, int src, int timeout_ms) {
    want w = {op, -1, 0, NULL};
    int rc = timeout_ms > 0 ? poll_items(c, op, timeout_ms) : HC_OK;
    if (rc == HC_OK) rc = drain_inboxes(c, &w);
    /* Heartbeats go out during a long wait, and a peer that went silent or
     * dropped its connection without a goodbye is failed (membership breaks
     * the communicator, so service_control fails the op). */
    if (rc == HC_OK) hc_member_tick(c, hc_now_ns());
    if (rc == HC_OK) rc = service_control(c, &w);
    if (rc != HC_OK) return rc;
    char who[160];
    /* What travels outside the sockets was sent before the peer went away,
     * so a clean close is final at once (no grace as for sockets). */
    if (c->peers[src].left)
        return hc_op_failf(op, HC_ERR_PEER_LOST,
                           "%s closed its connection (it exited, crashed or destroyed its communicator) "
                           "while rank %d waited for it in %s #%" PRIu64,
                           hc_peer_desc(c, src, who, sizeof who), c->rank, hc_op_kind_name(op->kind), op->seq);
    return HC_OK;
}

void hc_progress_idle(hc_comm *c) {
    want w = {NULL, -1, 0, NULL};
    int rc = drain_inboxes(c, &w);
    if (rc == HC_OK) rc = service_control(c, &w);
    if (rc != HC_OK) {
        if (atomic_load(&c->status) == HC_OK) hc_comm_break(c, rc, hc_last_error(), 1);
        return;
    }
    pthread_mutex_lock(&c->qmu);
    int work = c->q_head != NULL || c->p2p_head != NULL || c->closing;
    pthread_mutex_unlock(&c->qmu);
    if (work) return;
    int64_t now = hc_now_ns();
    poll_items(c, NULL, min_timeout(hc_p2p_expire(c, now), hc_member_tick(c, now)));
}

int hc_progress_needs_sockets(hc_comm *c) {
    if (atomic_load(&c->status) != HC_OK) return 0; /* housekeeping is all a broken one needs */
    pthread_mutex_lock(&c->qmu);
    int p2p = c->p2p_head != NULL;
    pthread_mutex_unlock(&c->qmu);
    return p2p || c->recv_pending_head || atomic_load(&c->abort_requested);
}

long hc_progress_housekeeping(hc_comm *c) {
    want w = {NULL, -1, 0, NULL};
    int rc = drain_control(c, &w);
    if (rc == HC_OK) rc = watch_monitors(c, &w);
    if (rc != HC_OK && atomic_load(&c->status) == HC_OK) hc_comm_break(c, rc, hc_last_error(), 1);
    if (atomic_load(&c->status) != HC_OK) fail_queued_p2p(c);
    return hc_member_tick(c, hc_now_ns());
}

void hc_progress_clear_wakeups(hc_comm *c) { drain_pipe(c->wake_fd[0]); }

void hc_progress_sleep(hc_comm *c, long timeout_ms) {
    if (c->nsleep) {
        hc_zmq.poll(c->sleep_items, c->nsleep, timeout_ms);
    } else {
        hc_progress_nap(c, timeout_ms);
    }
}

void hc_progress_nap(hc_comm *c, long timeout_ms) {
    hc_zmq_pollitem wake = {NULL, c->wake_fd[0], HC_ZMQ_POLLIN, 0};
    hc_zmq.poll(&wake, 1, timeout_ms);
}

int hc_progress_snapshot_idle(hc_comm *c) {
    if (c->nidle > c->sleep_cap) {
        hc_zmq_pollitem *grown = realloc(c->sleep_items, (size_t)c->nidle * sizeof *grown);
        if (!grown) return c->nsleep = 0;
        c->sleep_items = grown;
        c->sleep_cap = c->nidle;
    }
    memcpy(c->sleep_items, c->idle_items, (size_t)c->nidle * sizeof *c->idle_items);
    return c->nsleep = c->nidle;
}

int hc_progress_until(hc_comm *c, int (*done)(hc_comm *, void *), void *arg, int64_t deadline_ns) {
    want w = {NULL, -1, 0, NULL};
    for (;;) {
        /* Only the control plane and the zero-copy releases: data waits in
         * the inboxes for the op (or the communicator) it belongs to. */
        int rc = drain_control(c, &w);
        if (rc == HC_OK) rc = watch_monitors(c, &w);
        if (rc != HC_OK && atomic_load(&c->status) == HC_OK) hc_comm_break(c, rc, hc_last_error(), 1);
        drain_pipe(c->tx->fd[0]);
        int64_t now = hc_now_ns();
        long tick = hc_member_tick(c, now);
        if (done(c, arg)) return HC_OK;
        if (now >= deadline_ns) return HC_ERR_TIMEOUT;
        hc_zmq_pollitem items[c->nctl + 2 + c->size];
        int n = 0;
        for (int i = 0; i < c->nctl; i++) items[n++] = (hc_zmq_pollitem){c->ctl_inbox[i], 0, HC_ZMQ_POLLIN, 0};
        items[n++] = (hc_zmq_pollitem){NULL, c->tx->fd[0], HC_ZMQ_POLLIN, 0};
        if (c->secure_monitor) items[n++] = (hc_zmq_pollitem){c->secure_monitor, 0, HC_ZMQ_POLLIN, 0};
        for (int r = 0; r < c->size; r++)
            if (r != c->rank && c->peers[r].monitor)
                items[n++] = (hc_zmq_pollitem){c->peers[r].monitor, 0, HC_ZMQ_POLLIN, 0};
        if (hc_zmq.poll(items, n, min_timeout(ms_until(deadline_ns, now), tick)) < 0 &&
            hc_zmq.errno_() == EINTR && !hc_on_worker)
            return HC_ERR_INTERRUPTED;
    }
}

/* All its streams greeted this rank, and it answered this rank's greeting. */
static int greeted_both_ways(const hc_peer *p) {
    return p->inherited || (p->peer_streams != 0 && p->hellos >= p->peer_streams && p->ready);
}

int hc_progress_handshake(hc_comm *c) {
    hc_wire_header h;
    control_header(c, &h, HC_MSG_HELLO);
    for (int r = 0; r < c->size; r++) {
        hc_peer *p = &c->peers[r];
        if (r == c->rank || p->inherited) continue;
        h.count = (uint64_t)p->nstreams; /* tells the peer how many greetings to expect */
        h.flags = (p->tx_lane ? HC_WIRE_SHM : 0) | (c->arena ? HC_WIRE_ARENA : 0);
        for (int s = 0; s < p->nstreams; s++) {
            h.part = (uint32_t)s;
            int rc = hc_tp_send(c, p, &h, NULL, 0, -1);
            if (rc != HC_OK) return rc;
        }
    }
    int64_t deadline = hc_now_ns() + (int64_t)c->cfg.timeout_ms * 1000000;
    want w = {NULL, -1, 0, NULL};
    int pinged = 0, reported = 0;
    for (;;) {
        int rc = drain_inboxes(c, &w);
        if (rc == HC_OK) rc = service_control(c, &w);
        if (rc != HC_OK) return rc;
        int greeted = 1;
        for (int r = 0; r < c->size; r++)
            if (r != c->rank && !greeted_both_ways(&c->peers[r])) greeted = 0;
        if (greeted && !pinged) {
            /* Every link is up: time one round trip on each. A rank leaves
             * only once every peer has pinged it (and got its answer), so no
             * ping waits on a rank that has moved on. */
            control_header(c, &h, HC_MSG_PING);
            for (int r = 0; r < c->size; r++) {
                if (r == c->rank || c->peers[r].inherited) continue;
                h.count = (uint64_t)hc_now_ns();
                if ((rc = hc_tp_send(c, &c->peers[r], &h, NULL, 0, -1)) != HC_OK) return rc;
            }
            pinged = 1;
        }
        int timed = pinged;
        for (int r = 0; r < c->size; r++)
            if (r != c->rank && !c->peers[r].rtt_ns) timed = 0;
        if (timed && !reported) {
            /* Algorithm choices depend on the estimate, so all ranks must use
             * the same one: each sends its own, all take the largest. */
            size_t mine = hc_wan_in_flight_estimate(c);
            if (mine > c->wan_in_flight) c->wan_in_flight = mine;
            control_header(c, &h, HC_MSG_LINKS);
            h.count = mine;
            if (hc_small_links_ok(c)) h.flags = HC_WIRE_ARENA;
            for (int r = 0; r < c->size; r++)
                if (r != c->rank && (rc = hc_tp_send(c, &c->peers[r], &h, NULL, 0, -1)) != HC_OK) return rc;
            reported = 1;
        }
        int complete = reported;
        for (int r = 0; r < c->size; r++)
            if (r != c->rank && (!c->peers[r].pinged_me || !c->peers[r].links_reported)) complete = 0;
        if (complete) {
            c->small_shm = hc_small_links_ok(c);
            for (int r = 0; r < c->size; r++)
                if (r != c->rank && !c->peers[r].arena_mapped) c->small_shm = 0;
            hc_arena_unlink(c->arena); /* every rank mapped it or gave up: the name is not needed */
            return HC_OK;
        }
        int64_t now = hc_now_ns();
        if (now >= deadline) {
            char missing[512] = "";
            size_t n = 0;
            for (int r = 0; r < c->size && n < sizeof missing - 16; r++)
                if (r != c->rank && (!greeted_both_ways(&c->peers[r]) || !c->peers[r].pinged_me || !c->peers[r].rtt_ns ||
                                     !c->peers[r].links_reported))
                    n += (size_t)snprintf(missing + n, sizeof missing - n, "%s%d", n ? ", " : "", r);
            hc_set_last_error("%s: rank %d heard nothing within %d ms from rank(s) %s; they did "
                              "not start, cannot reach this rank's address (%s), or are another job",
                              c->name, c->rank, c->cfg.timeout_ms, missing, c->endpoint);
            return HC_ERR_TIMEOUT;
        }
        poll_items(c, NULL, ms_until(deadline, now));
    }
}
