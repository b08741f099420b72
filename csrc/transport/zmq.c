/*
 * The ZeroMQ transport: one inbox (PULL) per kind of link this rank accepts,
 * for each of two planes (data, and control: heartbeats, faults, aborts,
 * reshapes), and per peer a PUSH socket per TCP stream, one to its control
 * inbox, and a monitor that reports when the control connection drops.
 *
 * PUSH/PULL with one connection per PUSH socket keeps every stream in order
 * and lets the receiver match messages by header instead of by socket, so
 * striping over streams and out-of-order arrival from many peers need no
 * extra machinery. High-water marks are off: algorithms bound what is in
 * flight by the op's own size, and a send that can block could deadlock two
 * ranks that both send before they receive.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/internal.h"

/* Below this, a payload is copied into the header frame: one message is
 * cheaper than tracking a zero-copy buffer. */
#define HC_INLINE_MAX 8192
#define HC_ZAP_DOMAIN "hetcomm"

static int zerr(const char *what, const char *detail) {
    int e = hc_zmq.errno_();
    hc_set_last_error("%s%s%s: %s", what, detail ? " " : "", detail ? detail : "",
                      hc_zmq.strerror(e));
    return e == EINTR ? HC_ERR_INTERRUPTED : HC_ERR_TRANSPORT;
}

static int set_int(void *s, int opt, int v) { return hc_zmq.setsockopt(s, opt, &v, sizeof v); }

/* ---- zero-copy send tracking ---- */

hc_txtrack *hc_tx_new(void) {
    hc_txtrack *tx = calloc(1, sizeof *tx);
    if (!tx) return NULL;
    if (pipe(tx->fd) != 0) {
        free(tx);
        return NULL;
    }
    for (int i = 0; i < 2; i++) fcntl(tx->fd[i], F_SETFL, fcntl(tx->fd[i], F_GETFL) | O_NONBLOCK);
    pthread_mutex_init(&tx->mu, NULL);
    pthread_cond_init(&tx->cv, NULL);
    for (int g = 0; g < HC_TX_GROUPS; g++) tx->group[g].tx = tx;
    return tx;
}

void hc_tx_free(hc_txtrack *tx) {
    if (!tx) return;
    close(tx->fd[0]);
    close(tx->fd[1]);
    pthread_mutex_destroy(&tx->mu);
    pthread_cond_destroy(&tx->cv);
    free(tx);
}

static long inflight_locked(hc_txtrack *tx, int group) {
    if (group >= 0) return tx->group[group].inflight;
    long n = 0;
    for (int g = 0; g < HC_TX_GROUPS; g++) n += tx->group[g].inflight;
    return n;
}

long hc_tx_inflight(hc_txtrack *tx, int group) {
    pthread_mutex_lock(&tx->mu);
    long n = inflight_locked(tx, group);
    pthread_mutex_unlock(&tx->mu);
    return n;
}

static void tx_add(hc_txgroup *g, long n) {
    hc_txtrack *tx = g->tx;
    pthread_mutex_lock(&tx->mu);
    g->inflight += n;
    if (g->inflight == 0) {
        pthread_cond_broadcast(&tx->cv);
        char b = 1;
        (void)!write(tx->fd[1], &b, 1); /* full pipe: a wake-up is pending anyway */
    }
    pthread_mutex_unlock(&tx->mu);
}

int hc_tx_wait(hc_txtrack *tx, int group, int timeout_ms) {
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    int64_t ns = until.tv_nsec + (int64_t)(timeout_ms < 0 ? 0 : timeout_ms) * 1000000;
    until.tv_sec += ns / 1000000000;
    until.tv_nsec = ns % 1000000000;
    int rc = HC_OK;
    pthread_mutex_lock(&tx->mu);
    while (inflight_locked(tx, group) > 0) {
        if (timeout_ms < 0) {
            pthread_cond_wait(&tx->cv, &tx->mu);
        } else if (pthread_cond_timedwait(&tx->cv, &tx->mu, &until) == ETIMEDOUT) {
            rc = HC_ERR_TIMEOUT;
            break;
        }
    }
    pthread_mutex_unlock(&tx->mu);
    return rc;
}

static void tx_release(void *data, void *hint) { tx_add((hc_txgroup *)hint, -1); }

/* ---- inboxes ---- */

/* Connections that never finish the ZeroMQ greeting (a port scanner, a
 * stray client) are dropped after this, so they cannot pile up. */
#define HC_HANDSHAKE_IVL_MS 10000

static int bind_inbox(hc_comm *c, const char *base, int secure, int control, char *endpoint, size_t len) {
    void *s = hc_zmq.socket(c->zctx, HC_ZMQ_PULL);
    if (!s) return zerr("zmq_socket(PULL)", NULL);
    set_int(s, HC_ZMQ_RCVHWM, 0);
    set_int(s, HC_ZMQ_LINGER, 0);
    set_int(s, HC_ZMQ_HANDSHAKE_IVL, HC_HANDSHAKE_IVL_MS);
    if (c->cfg.rcvbuf_bytes > 0 && !control) set_int(s, HC_ZMQ_RCVBUF, c->cfg.rcvbuf_bytes);
    if (secure) {
        set_int(s, HC_ZMQ_CURVE_SERVER, 1);
        hc_zmq.setsockopt(s, HC_ZMQ_CURVE_SECRETKEY, c->curve_secret_key, 40);
        hc_zmq.setsockopt(s, HC_ZMQ_ZAP_DOMAIN, HC_ZAP_DOMAIN, strlen(HC_ZAP_DOMAIN));
    }
    char addr[512];
    if (strncmp(base, "tcp://", 6) == 0)
        snprintf(addr, sizeof addr, "%s:*", base);
    else
        snprintf(addr, sizeof addr, "%s/hc-%d-%016llx-%d%s%s", base, (int)getpid(),
                 (unsigned long long)c->cfg.comm_id, c->rank, secure ? "-s" : "", control ? "-c" : "");
    if (hc_zmq.bind(s, addr) != 0) {
        int rc = zerr("cannot bind", addr);
        hc_zmq.close(s);
        return rc;
    }
    size_t n = len;
    hc_zmq.getsockopt(s, HC_ZMQ_LAST_ENDPOINT, endpoint, &n);
    if (control)
        c->ctl_inbox[c->nctl++] = s;
    else
        c->inbox[c->ninbox++] = s;
    return HC_OK;
}

/* A data inbox and a control inbox on one base; published as "kind=url;ctl-kind=url". */
static void append_endpoint(hc_comm *c, const char *kind, const char *url);

static int bind_pair(hc_comm *c, const char *base, int secure, const char *kind) {
    char url[256] = "";
    int rc = bind_inbox(c, base, secure, 0, url, sizeof url);
    if (rc != HC_OK) return rc;
    append_endpoint(c, kind, url);
    char ctl_kind[32];
    snprintf(ctl_kind, sizeof ctl_kind, "ctl-%s", kind);
    if ((rc = bind_inbox(c, base, secure, 1, url, sizeof url)) == HC_OK) append_endpoint(c, ctl_kind, url);
    return rc;
}

/* Refused CURVE handshakes show up only as socket events on the server side. */
static int monitor_secure_inbox(hc_comm *c) {
    char mon[96];
    snprintf(mon, sizeof mon, "inproc://hc-secure-monitor-%p", (void *)c);
    int events = HC_ZMQ_EVENT_HANDSHAKE_FAILED_AUTH | HC_ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL |
                 HC_ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL;
    if (hc_zmq.socket_monitor(c->inbox[c->ninbox - 1], mon, events) != 0) return zerr("zmq_socket_monitor", mon);
    c->secure_monitor = hc_zmq.socket(c->zctx, HC_ZMQ_PAIR);
    if (!c->secure_monitor || hc_zmq.connect(c->secure_monitor, mon) != 0) return zerr("monitor connect", mon);
    return HC_OK;
}

static void append_endpoint(hc_comm *c, const char *kind, const char *url) {
    size_t used = strlen(c->endpoint);
    snprintf(c->endpoint + used, sizeof c->endpoint - used, "%s%s=%s", used ? ";" : "", kind, url);
}

/* bind_address is a ';'-separated list of bases, e.g. "tcp://10.0.0.5;ipc:///tmp/hc". */
int hc_tp_bind(hc_comm *c) {
    if (c->cfg.zmq_context) {
        c->zctx = c->cfg.zmq_context;
    } else {
        c->zctx = hc_zmq.ctx_new();
        if (!c->zctx) return zerr("zmq_ctx_new", NULL);
        c->own_ctx = 1;
    }
    char *list = strdup(c->bind_address), *save = NULL, *first_tcp = NULL;
    int rc = HC_OK;
    for (char *base = strtok_r(list, ";", &save); base && rc == HC_OK; base = strtok_r(NULL, ";", &save)) {
        if (c->ninbox >= HC_MAX_INBOXES - 1) {
            hc_set_last_error("bind_address lists more than %d addresses", HC_MAX_INBOXES - 1);
            rc = HC_ERR_INVALID_ARGUMENT;
            break;
        }
        int tcp = strncmp(base, "tcp://", 6) == 0;
        if (!tcp && strncmp(base, "ipc://", 6) != 0) {
            hc_set_last_error("bind_address '%s' is neither tcp:// nor ipc://", base);
            rc = HC_ERR_INVALID_ARGUMENT;
            break;
        }
        rc = bind_pair(c, base, 0, tcp ? "tcp" : "ipc");
        if (tcp && !first_tcp) first_tcp = base;
    }
    if (rc == HC_OK && c->cfg.curve_enable) {
        if (!first_tcp) {
            hc_set_last_error("CURVE needs a tcp:// bind address");
            rc = HC_ERR_INVALID_ARGUMENT;
        } else {
            rc = bind_pair(c, first_tcp, 1, "curve");
            if (rc == HC_OK) rc = monitor_secure_inbox(c);
        }
    }
    free(list);
    return rc;
}

/* ---- peers ---- */

/* Finds "kind=url" in a peer's endpoint list. */
static int endpoint_of(const char *list, const char *kind, char *url, size_t len) {
    size_t klen = strlen(kind);
    for (const char *p = list; p && *p;) {
        const char *end = strchr(p, ';');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        if (n > klen && strncmp(p, kind, klen) == 0 && p[klen] == '=') {
            size_t ulen = n - klen - 1;
            if (ulen >= len) return 0;
            memcpy(url, p + klen + 1, ulen);
            url[ulen] = 0;
            return 1;
        }
        p = end ? end + 1 : NULL;
    }
    return 0;
}

static int has_ipc_inbox(const hc_comm *c) { return strstr(c->endpoint, "ipc=") != NULL; }

/* Which of the peer's inboxes to use: CURVE across sites when enabled, ipc
 * on the same host when both offer it, plain tcp otherwise. */
static int use_kind(hc_peer *p, const char *kind) {
    char ctl_kind[32];
    snprintf(ctl_kind, sizeof ctl_kind, "ctl-%s", kind);
    return endpoint_of(p->endpoints, kind, p->url, sizeof p->url) &&
           endpoint_of(p->endpoints, ctl_kind, p->ctl_url, sizeof p->ctl_url);
}

static int choose_url(hc_comm *c, hc_peer *p) {
    int other_site = p->site != c->peers[c->rank].site;
    p->secure = 0;
    if (other_site && c->cfg.curve_enable) {
        if (!p->curve_key || !use_kind(p, "curve")) {
            hc_set_last_error("CURVE is on for links between sites, but rank %d published no "
                              "CURVE key or endpoint (endpoints '%s')", p->rank, p->endpoints);
            return HC_ERR_AUTH;
        }
        p->secure = 1;
        return HC_OK;
    }
    /* Never ipc:// across sites, even on one machine (an emulated WAN would be bypassed). */
    if (!other_site && p->host && c->host && *c->host && strcmp(p->host, c->host) == 0 && has_ipc_inbox(c) &&
        use_kind(p, "ipc"))
        return HC_OK;
    if (use_kind(p, "tcp")) return HC_OK;
    hc_set_last_error("rank %d published no endpoint this rank can use ('%s')", p->rank,
                      p->endpoints);
    return HC_ERR_INVALID_ARGUMENT;
}

static int open_stream(hc_comm *c, hc_peer *p, int control, void **out) {
    void *s = hc_zmq.socket(c->zctx, HC_ZMQ_PUSH);
    if (!s) return zerr("zmq_socket(PUSH)", NULL);
    int other_site = p->site != c->peers[c->rank].site;
    set_int(s, HC_ZMQ_SNDHWM, 0);
    set_int(s, HC_ZMQ_LINGER, -1);
    set_int(s, HC_ZMQ_RECONNECT_IVL, 100);
    set_int(s, HC_ZMQ_TCP_KEEPALIVE, 1);
    if (other_site && c->cfg.sndbuf_bytes > 0 && !control) set_int(s, HC_ZMQ_SNDBUF, c->cfg.sndbuf_bytes);
    if (p->secure) {
        hc_zmq.setsockopt(s, HC_ZMQ_CURVE_SERVERKEY, p->curve_key, 40);
        hc_zmq.setsockopt(s, HC_ZMQ_CURVE_PUBLICKEY, c->curve_public_key, 40);
        hc_zmq.setsockopt(s, HC_ZMQ_CURVE_SECRETKEY, c->curve_secret_key, 40);
    }
    *out = s;
    return HC_OK;
}

int hc_tp_connect_peer(hc_comm *c, hc_peer *p) {
    int rc = choose_url(c, p);
    if (rc != HC_OK) return rc;
    int other_site = p->site != c->peers[c->rank].site;
    p->nstreams = other_site && c->cfg.streams > 1 ? c->cfg.streams : 1;
    p->streams = calloc((size_t)p->nstreams, sizeof(void *));
    if (!p->streams) return HC_ERR_NO_MEMORY;
    for (int i = 0; i < p->nstreams; i++)
        if ((rc = open_stream(c, p, 0, &p->streams[i])) != HC_OK) return rc;
    if ((rc = open_stream(c, p, 1, &p->ctl)) != HC_OK) return rc;

    /* The monitor must exist before connecting, or an early drop is missed. */
    static atomic_uint monitors;
    char mon[96];
    snprintf(mon, sizeof mon, "inproc://hc-monitor-%u", atomic_fetch_add(&monitors, 1));
    int events = HC_ZMQ_EVENT_DISCONNECTED | HC_ZMQ_EVENT_HANDSHAKE_FAILED_AUTH |
                 HC_ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL | HC_ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL;
    if (hc_zmq.socket_monitor(p->ctl, mon, events) != 0) return zerr("zmq_socket_monitor", mon);
    p->monitor = hc_zmq.socket(c->zctx, HC_ZMQ_PAIR);
    if (!p->monitor || hc_zmq.connect(p->monitor, mon) != 0) return zerr("monitor connect", mon);

    for (int i = 0; i < p->nstreams; i++)
        if (hc_zmq.connect(p->streams[i], p->url) != 0) return zerr("cannot connect to", p->url);
    if (hc_zmq.connect(p->ctl, p->ctl_url) != 0) return zerr("cannot connect to", p->ctl_url);
    hc_log(HC_LOG_DEBUG, "%s: rank %d -> rank %d via %s (%d stream%s%s)", c->name, c->rank,
           p->rank, p->url, p->nstreams, p->nstreams > 1 ? "s" : "", p->secure ? ", CURVE" : "");
    return HC_OK;
}

/* ---- send ---- */

static void account(hc_comm *c, hc_peer *p, size_t len) {
    atomic_fetch_add_explicit(&c->bytes_sent, len, memory_order_relaxed);
    if (p->site != c->peers[c->rank].site)
        atomic_fetch_add_explicit(&c->bytes_sent_intersite, len, memory_order_relaxed);
}

static int send_inline(void *s, hc_wire_header *h, const void *payload, size_t len) {
    hc_zmq_msg m;
    h->flags |= HC_WIRE_INLINE;
    if (hc_zmq.msg_init_size(&m, sizeof *h + len) != 0) return zerr("zmq_msg_init_size", NULL);
    uint8_t *d = hc_zmq.msg_data(&m);
    memcpy(d, h, sizeof *h);
    if (len) memcpy(d + sizeof *h, payload, len);
    if (hc_zmq.msg_send(&m, s, HC_ZMQ_DONTWAIT) < 0) {
        int rc = zerr("zmq_msg_send", NULL);
        hc_zmq.msg_close(&m);
        return rc;
    }
    return HC_OK;
}

/* A zero-copy send waiting for a free slot in the peer's lane. */
typedef struct hc_pending {
    hc_wire_header h;
    const void *buf;
    int group;
    struct hc_pending *next;
} hc_pending;

static void *stream_for(hc_peer *p, const hc_wire_header *h) { return p->streams[h->part % (uint32_t)p->nstreams]; }

/* Copies the payload into lane slot `slot` and sends only the header. */
static int send_in_slot(hc_peer *p, hc_wire_header *h, const void *payload, int slot) {
    memcpy(hc_lane_slot(p->tx_lane, slot), payload, h->len);
    hc_lane_fill(p->tx_lane, slot);
    h->flags = (uint8_t)((h->flags & ~HC_WIRE_INLINE) | HC_WIRE_SHM);
    h->reserved = (uint32_t)slot;
    return hc_zmq.send(stream_for(p, h), h, sizeof *h, HC_ZMQ_DONTWAIT) < 0 ? zerr("send to", p->url) : HC_OK;
}

void hc_tp_pump(hc_comm *c, hc_peer *p) {
    while (p->pend_head) {
        int slot = hc_lane_take(p->tx_lane);
        if (slot < 0) {
            hc_lane_want_slot(p->tx_lane);
            if ((slot = hc_lane_take(p->tx_lane)) < 0) return; /* a CREDIT will come */
        }
        hc_pending *q = p->pend_head;
        p->pend_head = q->next;
        if (!p->pend_head) p->pend_tail = NULL;
        if (send_in_slot(p, &q->h, q->buf, slot) != HC_OK)
            hc_comm_break(c, HC_ERR_TRANSPORT, hc_last_error(), 1);
        tx_add(&c->tx->group[q->group], -1);
        free(q);
    }
}

/* Payloads to a peer with a lane go through it: at once if a slot is free,
 * else queued (zero-copy sends only; their buffers stay valid until the op's
 * tx wait). Returns 0 when the lane cannot take it (the caller uses the socket). */
static int send_via_lane(hc_comm *c, hc_peer *p, hc_wire_header *h, const void *payload, int tx_group, int *rc) {
    if (!p->tx_lane_ok || h->len > p->tx_lane->slot_bytes) return 0;
    int slot = p->pend_head ? -1 : hc_lane_take(p->tx_lane);
    if (slot >= 0) {
        *rc = send_in_slot(p, h, payload, slot);
        return 1;
    }
    if (tx_group < 0) return 0;
    hc_pending *q = malloc(sizeof *q);
    if (!q) return 0;
    *q = (hc_pending){*h, payload, tx_group, NULL};
    if (p->pend_tail)
        p->pend_tail->next = q;
    else
        p->pend_head = q;
    p->pend_tail = q;
    tx_add(&c->tx->group[tx_group], 1);
    hc_tp_pump(c, p);
    *rc = HC_OK;
    return 1;
}

int hc_tp_send(hc_comm *c, hc_peer *p, hc_wire_header *h, const void *payload, size_t len,
               int tx_group) {
    void *s = stream_for(p, h);
    int carries_payload = h->kind == HC_MSG_DATA || h->kind == HC_MSG_P2P;
    h->len = len;
    if (carries_payload) h->flags &= (uint8_t)~HC_WIRE_SHM; /* on HELLO/READY it means something else */
    account(c, p, len);
    if (len <= HC_INLINE_MAX) return send_inline(s, h, payload, len);
    int rc;
    if (carries_payload && send_via_lane(c, p, h, payload, tx_group, &rc)) return rc;
    h->flags &= (uint8_t)~HC_WIRE_INLINE;
    hc_zmq_msg m;
    if (tx_group >= 0) {
        tx_add(&c->tx->group[tx_group], 1);
        hc_zmq.msg_init_data(&m, (void *)payload, len, tx_release, &c->tx->group[tx_group]);
    } else {
        if (hc_zmq.msg_init_size(&m, len) != 0) return zerr("zmq_msg_init_size", NULL);
        memcpy(hc_zmq.msg_data(&m), payload, len);
    }
    if (hc_zmq.send(s, h, sizeof *h, HC_ZMQ_SNDMORE | HC_ZMQ_DONTWAIT) < 0 ||
        hc_zmq.msg_send(&m, s, HC_ZMQ_DONTWAIT) < 0) {
        int rc = zerr("send to", p->url);
        hc_zmq.msg_close(&m); /* runs tx_release for a zero-copy buffer */
        return rc;
    }
    return HC_OK;
}

int hc_tp_send_ctl(hc_comm *c, hc_peer *p, hc_wire_header *h, const void *payload, size_t len) {
    if (!p->ctl) return HC_OK; /* closed: the peer is failed or gone */
    h->len = len;
    return send_inline(p->ctl, h, payload, len);
}

/* ---- receive ---- */

void hc_tp_release_msg(hc_comm *c, hc_msg *m) {
    if (m->lane && hc_lane_release(m->lane, m->slot) && m->h.src >= 0 && m->h.src < c->size) {
        hc_peer *p = &c->peers[m->h.src];
        if (p->streams && p->streams[0]) {
            hc_wire_header h;
            hc_wire_header_init(&h, c, HC_MSG_CREDIT);
            send_inline(p->streams[0], &h, NULL, 0);
        }
    }
    m->lane = NULL;
    hc_zmq.msg_close(&m->frame);
    if (m->has_payload_frame) hc_zmq.msg_close(&m->payload);
    m->has_payload_frame = 0;
    m->data = NULL;
    m->len = 0;
}

static void drain_more(void *s) {
    hc_zmq_msg junk;
    int more = 1;
    size_t n = sizeof more;
    while (hc_zmq.getsockopt(s, HC_ZMQ_RCVMORE, &more, &n) == 0 && more) {
        hc_zmq.msg_init(&junk);
        hc_zmq.msg_recv(&junk, s, HC_ZMQ_DONTWAIT);
        hc_zmq.msg_close(&junk);
    }
}

/* A header-only message whose payload sits in the sender's lane. */
static int read_lane(hc_comm *c, hc_msg *m, size_t frame_bytes) {
    const hc_wire_header *h = &m->h;
    if (frame_bytes != sizeof *h || hc_zmq.msg_more(&m->frame) || h->src < 0 || h->src >= c->size) return 0;
    hc_lane *lane = c->peers[h->src].rx_lane;
    if (!lane || h->len > lane->slot_bytes) return 0;
    const uint8_t *data = hc_lane_read(lane, h->reserved);
    if (!data) return 0;
    m->data = data;
    m->len = h->len;
    m->lane = lane;
    m->slot = h->reserved;
    return 1;
}

static int try_recv(hc_comm *c, void *s, int inbox, hc_msg **out);

int hc_tp_try_recv(hc_comm *c, int inbox, hc_msg **out) { return try_recv(c, c->inbox[inbox], inbox, out); }

int hc_tp_try_recv_ctl(hc_comm *c, int i, hc_msg **out) { return try_recv(c, c->ctl_inbox[i], -1 - i, out); }

static int try_recv(hc_comm *c, void *s, int inbox, hc_msg **out) {
    hc_msg *m = hc_msg_alloc(c);
    if (!m) return -HC_ERR_NO_MEMORY;
    hc_zmq.msg_init(&m->frame);
    if (hc_zmq.msg_recv(&m->frame, s, HC_ZMQ_DONTWAIT) < 0) {
        int e = hc_zmq.errno_();
        hc_zmq.msg_close(&m->frame);
        hc_msg_free(c, m);
        if (e == EAGAIN) return 0;
        return -zerr("receive", NULL);
    }
    m->inbox = inbox;
    size_t n = hc_zmq.msg_size(&m->frame);
    const uint8_t *d = hc_zmq.msg_data(&m->frame);
    memset(&m->h, 0, sizeof m->h);
    if (n >= sizeof m->h) memcpy(&m->h, d, sizeof m->h);
    if ((m->h.flags & HC_WIRE_SHM) && (m->h.kind == HC_MSG_DATA || m->h.kind == HC_MSG_P2P)) {
        *out = m;
        /* Lanes belong to this communicator: late messages of the one it was
         * reshaped from name ranks of another numbering (dispatch drops them). */
        if (m->h.comm_id == c->cfg.comm_id && !read_lane(c, m, n)) m->h.magic = 0;
        return 1;
    }
    if (hc_zmq.msg_more(&m->frame)) {
        hc_zmq.msg_init(&m->payload);
        hc_zmq.msg_recv(&m->payload, s, HC_ZMQ_DONTWAIT); /* multipart arrives whole */
        m->has_payload_frame = 1;
        if (hc_zmq.msg_more(&m->payload)) {
            drain_more(s);
            m->h.magic = 0; /* not a shape we send: reject as garbage */
        }
        m->data = hc_zmq.msg_data(&m->payload);
        m->len = hc_zmq.msg_size(&m->payload);
    } else if (n >= sizeof m->h) {
        m->data = d + sizeof m->h;
        m->len = n - sizeof m->h;
    }
    if (n < sizeof m->h || (m->h.flags & HC_WIRE_INLINE) == m->has_payload_frame ||
        m->len != m->h.len)
        m->h.magic = 0;
    *out = m;
    return 1;
}

int hc_tp_read_monitor(hc_comm *c, hc_peer *p) { return hc_tp_read_event(p->monitor); }

int hc_tp_read_event(void *monitor) {
    hc_zmq_msg ev;
    hc_zmq.msg_init(&ev);
    if (!monitor || hc_zmq.msg_recv(&ev, monitor, HC_ZMQ_DONTWAIT) < 0) {
        hc_zmq.msg_close(&ev);
        return 0;
    }
    uint16_t event = 0;
    if (hc_zmq.msg_size(&ev) >= 2) memcpy(&event, hc_zmq.msg_data(&ev), 2);
    int more = hc_zmq.msg_more(&ev);
    hc_zmq.msg_close(&ev);
    if (more) drain_more(monitor); /* the endpoint frame */
    return event;
}

/* ---- poll set: inboxes, wake pipe, tx pipe, then one monitor per peer ---- */

/* The idle worker does not hold the engine, so it must not touch a socket:
 * it polls the sockets' notification descriptors instead (ZMQ_FD, read once
 * here by the thread that owns them). They may wake it needlessly; the
 * worker then takes the engine, drains, and the descriptor quiets down. */
static hc_zmq_pollitem fd_item(void *socket) {
    int fd = -1;
    size_t n = sizeof fd;
    hc_zmq.getsockopt(socket, HC_ZMQ_FD, &fd, &n);
    return (hc_zmq_pollitem){NULL, fd, HC_ZMQ_POLLIN, 0};
}

void hc_tp_build_pollset(hc_comm *c) {
    int n = c->ninbox + c->nctl + 3 + c->size;
    free(c->items);
    free(c->idle_items);
    c->items = calloc((size_t)n, sizeof *c->items);
    c->idle_items = calloc((size_t)n, sizeof *c->idle_items);
    if (!c->items || !c->idle_items) {
        free(c->items);
        c->items = NULL;
        return;
    }
    int k = 0, j = 0;
    for (int i = 0; i < c->ninbox; i++) c->items[k++] = (hc_zmq_pollitem){c->inbox[i], 0, HC_ZMQ_POLLIN, 0};
    for (int i = 0; i < c->nctl; i++) {
        c->items[k++] = (hc_zmq_pollitem){c->ctl_inbox[i], 0, HC_ZMQ_POLLIN, 0};
        c->idle_items[j++] = fd_item(c->ctl_inbox[i]);
    }
    c->items[k++] = (hc_zmq_pollitem){NULL, c->wake_fd[0], HC_ZMQ_POLLIN, 0};
    c->idle_items[j++] = (hc_zmq_pollitem){NULL, c->wake_fd[0], HC_ZMQ_POLLIN, 0};
    c->items[k++] = (hc_zmq_pollitem){NULL, c->tx->fd[0], HC_ZMQ_POLLIN, 0};
    if (c->secure_monitor) {
        c->items[k++] = (hc_zmq_pollitem){c->secure_monitor, 0, HC_ZMQ_POLLIN, 0};
        c->idle_items[j++] = fd_item(c->secure_monitor);
    }
    c->npinned = k;
    for (int r = 0; r < c->size; r++)
        if (r != c->rank && c->peers[r].monitor) {
            c->items[k++] = (hc_zmq_pollitem){c->peers[r].monitor, 0, HC_ZMQ_POLLIN, 0};
            c->idle_items[j++] = fd_item(c->peers[r].monitor);
        }
    c->nitems = k;
    c->nidle = j;
}

/* ---- teardown ---- */

static void close_socket(void **s, int linger_ms) {
    if (!*s) return;
    set_int(*s, HC_ZMQ_LINGER, linger_ms);
    hc_zmq.close(*s);
    *s = NULL;
}

static void close_links(hc_comm *c, hc_peer *p, int linger_ms) {
    for (hc_pending *q = p->pend_head, *next; q; q = next) {
        next = q->next;
        tx_add(&c->tx->group[q->group], -1);
        free(q);
    }
    p->pend_head = p->pend_tail = NULL;
    if (p->monitor && p->ctl) hc_zmq.socket_monitor(p->ctl, NULL, 0);
    for (int i = 0; p->streams && i < p->nstreams; i++) close_socket(&p->streams[i], linger_ms);
    close_socket(&p->ctl, linger_ms);
    close_socket(&p->monitor, 0);
}

void hc_tp_close_peer(hc_comm *c, hc_peer *p) {
    close_links(c, p, 0);
    hc_tp_build_pollset(c); /* it watched the peer's monitor */
}

void hc_tp_close_peers(hc_comm *c, int linger_ms) {
    for (int r = 0; c->peers && r < c->size; r++) close_links(c, &c->peers[r], linger_ms);
    /* The poll sets pointed at the peers' monitors. */
    if (c->items && c->nitems > c->npinned) c->nitems = c->npinned;
    c->nidle = 0;
}

void hc_tp_close_all(hc_comm *c, int linger_ms) {
    hc_tp_close_peers(c, linger_ms);
    if (c->secure_monitor) {
        hc_zmq.socket_monitor(c->inbox[c->ninbox - 1], NULL, 0);
        hc_zmq.close(c->secure_monitor);
        c->secure_monitor = NULL;
    }
    c->nitems = c->nidle = 0;
    for (int i = 0; i < c->ninbox; i++) hc_zmq.close(c->inbox[i]);
    for (int i = 0; i < c->nctl; i++) hc_zmq.close(c->ctl_inbox[i]);
    c->ninbox = c->nctl = 0;
    if (c->own_ctx && c->zctx) hc_zmq.ctx_term(c->zctx);
    c->zctx = NULL;
}

/* ---- goodbyes at destroy ---- */

static void send_tracked_bye(hc_comm *c, void *s) {
    hc_zmq_msg m;
    if (!s) return;
    tx_add(&c->tx->group[0], 1);
    if (hc_zmq.msg_init_data(&m, &c->tx->bye, sizeof c->tx->bye, tx_release, &c->tx->group[0]) != 0) {
        tx_add(&c->tx->group[0], -1);
        return;
    }
    if (hc_zmq.msg_send(&m, s, HC_ZMQ_DONTWAIT) < 0) hc_zmq.msg_close(&m); /* runs tx_release */
}

void hc_tp_send_bye(hc_comm *c, hc_peer *p) {
    c->tx->bye.flags |= HC_WIRE_INLINE;
    c->tx->bye.len = 0;
    send_tracked_bye(c, p->ctl);
    for (int i = 0; p->streams && i < p->nstreams; i++) send_tracked_bye(c, p->streams[i]);
}

int hc_tp_peer_departed(hc_comm *c, hc_peer *p) {
    for (int ev; !p->gone && p->monitor && (ev = hc_tp_read_monitor(c, p)) != 0;)
        if (ev == HC_ZMQ_EVENT_DISCONNECTED) p->gone = 1;
    return p->gone;
}

void hc_tp_flush_goodbyes(hc_comm *c, int timeout_ms) {
    int64_t deadline = hc_now_ns() + (int64_t)timeout_ms * 1000000;
    hc_zmq_pollitem items[1 + c->size];
    while (hc_tx_inflight(c->tx, 0) > 0) {
        int n = 0;
        items[n++] = (hc_zmq_pollitem){NULL, c->tx->fd[0], HC_ZMQ_POLLIN, 0};
        for (int r = 0; r < c->size; r++) {
            hc_peer *p = &c->peers[r];
            if (r == c->rank || !p->monitor) continue;
            if (hc_tp_peer_departed(c, p))
                close_links(c, p, 0); /* it closed meanwhile: drop what it will never take */
            else
                items[n++] = (hc_zmq_pollitem){p->monitor, 0, HC_ZMQ_POLLIN, 0};
        }
        long left = (long)((deadline - hc_now_ns()) / 1000000);
        if (left <= 0 || (hc_zmq.poll(items, n, left) < 0 && hc_zmq.errno_() != EINTR)) return;
        char b[64];
        while (read(c->tx->fd[0], b, sizeof b) > 0) {
        }
    }
}
