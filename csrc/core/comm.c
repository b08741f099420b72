/* Communicator lifecycle: create, learn peers, connect, break, destroy. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/internal.h"

/* How long a broken or closing communicator lets queued bytes (an ABORT
 * notice, the last sends) drain before dropping them. */
#define HC_CLOSE_LINGER_MS 1000

void *hc_worker_main(void *arg);

int hc_init(const char *libzmq_path, int load) { return hc_zmq_load(libzmq_path, load); }

static char *dup_or_empty(const char *s) { return strdup(s ? s : ""); }

static void free_comm(hc_comm *c) {
    for (int r = 0; c->peers && r < c->size; r++) {
        hc_peer *p = &c->peers[r];
        for (hc_msg *m = p->stash_head, *next; m; m = next) {
            next = m->next;
            hc_tp_release_msg(c, m);
            free(m);
        }
        free(p->site_name);
        free(p->host);
        free(p->endpoints);
        free(p->curve_key);
        free(p->streams);
    }
    for (hc_msg *m = c->unexpected_head, *next; m; m = next) {
        next = m->next;
        hc_tp_release_msg(c, m);
        free(m);
    }
    /* After the stashes: released messages write their lane slot's state. */
    for (int r = 0; c->peers && r < c->size; r++) {
        hc_lane_close(c->peers[r].tx_lane);
        hc_lane_close(c->peers[r].rx_lane);
    }
    hc_arena_close(c->arena);
    for (hc_msg *m = c->free_msgs, *next; m; m = next) {
        next = m->next;
        free(m);
    }
    for (hc_residual *r = c->residuals, *next; r; r = next) {
        next = r->next;
        free(r->data);
        free(r);
    }
    for (hc_msg *m = c->future_head, *next; m; m = next) {
        next = m->next;
        hc_tp_release_msg(c, m);
        free(m);
    }
    hc_member_free(c);
    free(c->peers);
    free(c->ring);
    free(c->items);
    free(c->idle_items);
    free(c->sleep_items);
    free(c->garbage);
    for (int i = 0; i < HC_SCRATCH_SLOTS; i++) free(c->scratch[i]);
    free(c->name);
    free(c->site);
    free(c->host);
    free(c->bind_address);
    free(c->curve_public_key);
    free(c->curve_secret_key);
    if (c->wake_fd[0] >= 0) close(c->wake_fd[0]);
    if (c->wake_fd[1] >= 0) close(c->wake_fd[1]);
    pthread_mutex_destroy(&c->qmu);
    pthread_mutex_destroy(&c->engine);
    free(c);
}

static int valid_key(const char *k) { return k && strlen(k) == 40; }

int hc_comm_alloc(const hc_config *cfg, hc_comm **out) {
    hc_comm *c = calloc(1, sizeof *c);
    if (!c) return HC_ERR_NO_MEMORY;
    c->wake_fd[0] = c->wake_fd[1] = -1;
    pthread_mutex_init(&c->qmu, NULL);
    pthread_mutex_init(&c->engine, NULL);
    memcpy(&c->cfg, cfg, cfg->struct_size < sizeof c->cfg ? cfg->struct_size : sizeof c->cfg);
    c->rank = cfg->rank;
    c->size = cfg->size;
    c->name = dup_or_empty(cfg->name);
    c->site = dup_or_empty(cfg->site);
    c->host = dup_or_empty(cfg->host);
    c->bind_address = dup_or_empty(cfg->bind_address);
    c->curve_public_key = cfg->curve_enable ? strdup(cfg->curve_public_key) : NULL;
    c->curve_secret_key = cfg->curve_enable ? strdup(cfg->curve_secret_key) : NULL;
    c->cfg.name = c->name;
    c->cfg.site = c->site;
    c->cfg.host = c->host;
    c->cfg.bind_address = c->bind_address;
    c->cfg.curve_public_key = c->curve_public_key;
    c->cfg.curve_secret_key = c->curve_secret_key;
    atomic_init(&c->status, HC_OK);
    c->peers = calloc((size_t)c->size, sizeof *c->peers);
    c->tx = hc_tx_new();
    if (!c->peers || !c->tx || pipe(c->wake_fd) != 0 || hc_member_init(c) != HC_OK) {
        hc_set_last_error("hc_comm_create: out of memory or file descriptors");
        hc_tx_free(c->tx);
        free_comm(c);
        return HC_ERR_NO_MEMORY;
    }
    for (int i = 0; i < 2; i++) fcntl(c->wake_fd[i], F_SETFL, fcntl(c->wake_fd[i], F_GETFL) | O_NONBLOCK);
    for (int r = 0; r < c->size; r++) c->peers[r].rank = r;
    *out = c;
    return HC_OK;
}

int hc_comm_create(const hc_config *cfg, hc_comm **out) {
    if (!out) {
        hc_set_last_error("hc_comm_create: out is NULL");
        return HC_ERR_INVALID_ARGUMENT;
    }
    *out = NULL;
    if (!cfg || cfg->struct_size < offsetof(hc_config, codec)) {
        hc_set_last_error("hc_comm_create: cfg is NULL or from an older hetcomm.h (struct_size %u)",
                          cfg ? cfg->struct_size : 0);
        return HC_ERR_INVALID_ARGUMENT;
    }
    if (!hc_zmq_loaded()) {
        hc_set_last_error("hc_comm_create: call hc_init() with the path of libzmq first");
        return HC_ERR_STATE;
    }
    if (cfg->size < 1 || cfg->rank < 0 || cfg->rank >= cfg->size) {
        hc_set_last_error("hc_comm_create: rank %d is not in [0, size=%d)", cfg->rank, cfg->size);
        return HC_ERR_INVALID_ARGUMENT;
    }
    if (cfg->chunk_bytes < 4096 || cfg->streams < 1 || cfg->streams > 64 || cfg->codec < 0 ||
        cfg->codec >= HC_CODEC_COUNT || cfg->codec_block == 0) {
        hc_set_last_error("hc_comm_create: chunk_bytes (%zu, min 4096), streams (%d, 1..64), codec (%d) "
                          "or codec_block (%u) out of range",
                          cfg->chunk_bytes, cfg->streams, cfg->codec, cfg->codec_block);
        return HC_ERR_INVALID_ARGUMENT;
    }
    if (cfg->curve_enable && (!valid_key(cfg->curve_public_key) || !valid_key(cfg->curve_secret_key))) {
        hc_set_last_error("hc_comm_create: CURVE is enabled but the key pair is missing or not 40-char Z85");
        return HC_ERR_INVALID_ARGUMENT;
    }
    hc_comm *c;
    int rc = hc_comm_alloc(cfg, &c);
    if (rc != HC_OK) return rc;
    hc_peer *self = &c->peers[c->rank];
    self->site_name = strdup(c->site);
    self->host = strdup(c->host);
    rc = hc_tp_bind(c);
    if (rc != HC_OK) {
        hc_tp_close_all(c, 0);
        hc_tx_free(c->tx);
        free_comm(c);
        return rc;
    }
    *out = c;
    return HC_OK;
}

const char *hc_comm_endpoint(const hc_comm *c) { return c ? c->endpoint : ""; }

int hc_comm_set_peer(hc_comm *c, int peer, const char *endpoint, const char *site, const char *host,
                     const char *curve_public_key) {
    if (!c || peer < 0 || peer >= c->size || peer == c->rank || !endpoint || !*endpoint) {
        hc_set_last_error("hc_comm_set_peer: peer %d is out of range, this rank itself, or has no endpoint", peer);
        return HC_ERR_INVALID_ARGUMENT;
    }
    if (c->connected) {
        hc_set_last_error("hc_comm_set_peer: communicator '%s' is already connected", c->name);
        return HC_ERR_STATE;
    }
    if (curve_public_key && *curve_public_key && !valid_key(curve_public_key)) {
        hc_set_last_error("hc_comm_set_peer: rank %d's CURVE public key is not 40-char Z85", peer);
        return HC_ERR_INVALID_ARGUMENT;
    }
    hc_peer *p = &c->peers[peer];
    free(p->endpoints);
    free(p->site_name);
    free(p->host);
    free(p->curve_key);
    p->endpoints = strdup(endpoint);
    p->site_name = dup_or_empty(site);
    p->host = dup_or_empty(host);
    p->curve_key = curve_public_key && *curve_public_key ? strdup(curve_public_key) : NULL;
    return HC_OK;
}

/* Sites are numbered by first appearance in rank order; the ring visits them
 * one after another so each link between sites is crossed once per pass. */
int hc_topology_build(hc_comm *c) {
    free(c->ring);
    c->ring = malloc((size_t)c->size * sizeof(int));
    if (!c->ring) return HC_ERR_NO_MEMORY;
    c->nsites = 0;
    for (int r = 0; r < c->size; r++) {
        hc_peer *p = &c->peers[r];
        p->site = -1;
        for (int q = 0; q < r; q++)
            if (strcmp(c->peers[q].site_name, p->site_name) == 0) {
                p->site = c->peers[q].site;
                break;
            }
        if (p->site < 0) p->site = c->nsites++;
    }
    int k = 0;
    for (int s = 0; s < c->nsites; s++)
        for (int r = 0; r < c->size; r++)
            if (c->peers[r].site == s) c->ring[k++] = r;
    for (int i = 0; i < c->size; i++)
        if (c->ring[i] == c->rank) c->ring_pos = i;
    return HC_OK;
}

void hc_lane_name(const hc_comm *c, int src, int dst, char *buf, size_t len) {
    snprintf(buf, len, "/hc-%016llx-%d-%d", (unsigned long long)c->cfg.comm_id, src, dst);
}

void hc_arena_name(const hc_comm *c, char *buf, size_t len) {
    snprintf(buf, len, "/hc-%016llx-arena", (unsigned long long)c->cfg.comm_id);
}

static int local_peer(const hc_comm *c, const hc_peer *p) {
    return !p->inherited && p->site == c->peers[c->rank].site && strcmp(p->host, c->host) == 0;
}

/* Lanes to same-site peers that say they run on this host; each is used only
 * once the peer confirms it mapped it (see the handshake). When every rank
 * runs here, rank 0 also creates the arena for small collectives; it is used
 * only once every rank said it mapped it. */
static void open_lanes(hc_comm *c) {
    if (!c->cfg.shm_enable || !*c->host) return;
    size_t nslots = c->cfg.shm_bytes / c->cfg.chunk_bytes;
    int all_local = 1;
    for (int r = 0; r < c->size; r++) {
        hc_peer *p = &c->peers[r];
        if (r == c->rank) continue;
        if (!local_peer(c, p)) {
            all_local = 0;
            continue;
        }
        char name[64];
        hc_lane_name(c, c->rank, r, name, sizeof name);
        p->tx_lane = hc_lane_create(name, nslots < 2 ? 2 : (uint32_t)nslots, c->cfg.chunk_bytes);
    }
    if (all_local && c->rank == 0 && c->size > 1) {
        char name[64];
        hc_arena_name(c, name, sizeof name);
        c->arena = hc_arena_create(name, c->size);
    }
}

int hc_comm_connect(hc_comm *c) {
    if (!c) {
        hc_set_last_error("hc_comm_connect: comm is NULL");
        return HC_ERR_INVALID_ARGUMENT;
    }
    if (c->connected) {
        hc_set_last_error("hc_comm_connect: communicator '%s' is already connected", c->name);
        return HC_ERR_STATE;
    }
    for (int r = 0; r < c->size; r++)
        if (r != c->rank && !c->peers[r].endpoints) {
            hc_set_last_error("hc_comm_connect: rank %d: no endpoint was set for rank %d", c->rank, r);
            return HC_ERR_STATE;
        }
    int rc = hc_topology_build(c);
    for (int r = 0; rc == HC_OK && r < c->size; r++)
        if (r != c->rank && !c->peers[r].inherited) rc = hc_tp_connect_peer(c, &c->peers[r]);
    if (rc == HC_OK) {
        open_lanes(c);
        hc_tp_build_pollset(c);
        rc = c->items ? hc_progress_handshake(c) : HC_ERR_NO_MEMORY;
    }
    if (rc != HC_OK) {
        /* Leave it unusable but destroyable; the error is in hc_last_error().
         * A grown communicator keeps its members' links, so that it can be
         * shrunk back to them (hc_comm_shrink excluding the newcomers). */
        for (int r = 0; r < c->size; r++)
            if (r != c->rank && !c->peers[r].inherited) hc_tp_close_peer(c, &c->peers[r]);
        return rc;
    }
    for (int r = 0; r < c->size; r++) {
        if (r == c->rank) continue;
        const hc_peer *p = &c->peers[r];
        hc_log(HC_LOG_DEBUG, "%s: rank %d: round trip to rank %d (site %d) %.1f us", c->name, c->rank, r, p->site,
               p->rtt_ns / 1e3);
    }
    if (c->wan_in_flight)
        hc_log(HC_LOG_DEBUG, "%s: rank %d: allreduce below %zu bytes uses recursive doubling (one WAN trip)",
               c->name, c->rank, c->wan_in_flight > c->cfg.small_bytes ? c->wan_in_flight : c->cfg.small_bytes);
    int64_t now = hc_now_ns();
    for (int r = 0; r < c->size; r++) c->peers[r].last_heard_ns = c->peers[r].last_beat_ns = now;
    c->connected = 1;
    if (pthread_create(&c->worker, NULL, hc_worker_main, c) != 0) {
        hc_set_last_error("hc_comm_connect: cannot start the worker thread");
        c->connected = 0;
        return HC_ERR_NO_MEMORY;
    }
    c->worker_started = 1;
    hc_log(HC_LOG_INFO, "%s: rank %d/%d connected (site %d of %d, endpoint %s)", c->name, c->rank,
           c->size, c->peers[c->rank].site, c->nsites, c->endpoint);
    return HC_OK;
}

static void send_abort(hc_comm *c, int status, const char *reason) {
    hc_wire_header h;
    hc_wire_header_init(&h, c, HC_MSG_ABORT);
    h.root = status;
    size_t len = strlen(reason);
    for (int r = 0; r < c->size; r++) {
        hc_peer *p = &c->peers[r];
        if (r == c->rank || p->gone || !p->streams || !p->streams[0]) continue;
        h.part = 0;
        hc_tp_send(c, p, &h, reason, len, -1);
    }
}

void hc_comm_break(hc_comm *c, int status, const char *error, int notify_peers) {
    if (atomic_load(&c->status) != HC_OK) return;
    snprintf(c->error, sizeof c->error, "%s", error && *error ? error : hc_status_string(status));
    atomic_store(&c->status, status);
    hc_log(HC_LOG_ERROR, "%s: rank %d: %s", c->name, c->rank, c->error);
    if (notify_peers) send_abort(c, status, c->error);
    hc_p2p_fail_all(c, HC_ERR_ABORTED, c->error);
}

void hc_comm_quiesce(hc_comm *c) {
    if (c->quiesced) return;
    c->quiesced = 1;
    /* Closing with a linger lets the ABORT go out, then drops whatever the
     * dead or stuck peers never took, which releases the user's buffers. */
    hc_tp_close_peers(c, HC_CLOSE_LINGER_MS);
    if (hc_tx_wait(c->tx, -1, HC_CLOSE_LINGER_MS + 5000) != HC_OK)
        hc_log(HC_LOG_ERROR, "%s: rank %d: ZeroMQ still holds send buffers after close", c->name, c->rank);
}

int hc_comm_abort(hc_comm *c, const char *reason) {
    if (!c) return HC_ERR_INVALID_ARGUMENT;
    snprintf(c->abort_reason, sizeof c->abort_reason, "%s", reason && *reason ? reason : "hc_comm_abort called");
    atomic_store(&c->abort_requested, 1);
    char b = 1;
    (void)!write(c->wake_fd[1], &b, 1);
    return HC_OK;
}

void hc_comm_stop_worker(hc_comm *c) {
    if (!c->worker_started) return;
    pthread_mutex_lock(&c->qmu);
    c->closing = 1;
    pthread_mutex_unlock(&c->qmu);
    char b = 1;
    (void)!write(c->wake_fd[1], &b, 1);
    pthread_join(c->worker, NULL);
    c->worker_started = 0;
}

int hc_comm_destroy(hc_comm *c) {
    if (!c) return HC_OK;
    hc_comm_stop_worker(c);
    /* A goodbye tells the peers this close is on purpose, not a crash.
     * Closing waits until ZeroMQ has taken the goodbyes, and with them every
     * message sent before: the peers may still be receiving the last ones,
     * and a process that exits right after this (multiprocessing's children
     * do) would take them along unsent. A peer whose end is closed gets
     * none: it would sit queued for the whole linger. */
    if (c->connected && c->tx) {
        hc_wire_header_init(&c->tx->bye, c, HC_MSG_BYE);
        for (int r = 0; r < c->size; r++)
            if (r != c->rank && !hc_tp_peer_departed(c, &c->peers[r])) hc_tp_send_bye(c, &c->peers[r]);
        hc_tp_flush_goodbyes(c, HC_CLOSE_LINGER_MS);
    }
    hc_tp_close_all(c, HC_CLOSE_LINGER_MS);
    /* Lingering sockets may still hold zero-copy buffers; the tracker must
     * outlive them, so it is leaked rather than freed if they do not drain. */
    if (!c->tx || hc_tx_wait(c->tx, -1, HC_CLOSE_LINGER_MS + 5000) == HC_OK)
        hc_tx_free(c->tx);
    else
        hc_log(HC_LOG_ERROR, "%s: rank %d: ZeroMQ still holds send buffers at destroy", c->name, c->rank);
    free_comm(c);
    return HC_OK;
}

int hc_comm_rank(const hc_comm *c) { return c ? c->rank : -1; }
int hc_comm_size(const hc_comm *c) { return c ? c->size : -1; }
int hc_comm_site_count(const hc_comm *c) { return c ? c->nsites : 0; }

int64_t hc_comm_peer_rtt_ns(const hc_comm *c, int peer) {
    if (!c || !c->connected || peer < 0 || peer >= c->size || peer == c->rank) return -1;
    return c->peers[peer].rtt_ns;
}

int hc_comm_site_of(const hc_comm *c, int rank) {
    return c && c->ring && rank >= 0 && rank < c->size ? c->peers[rank].site : -1;
}

int hc_comm_ring_order(const hc_comm *c, int *order, int n) {
    if (!c || !c->ring || !order || n < c->size) return HC_ERR_INVALID_ARGUMENT;
    memcpy(order, c->ring, (size_t)c->size * sizeof(int));
    return HC_OK;
}

int hc_comm_status(const hc_comm *c) { return c ? atomic_load(&((hc_comm *)c)->status) : HC_ERR_INVALID_ARGUMENT; }

const char *hc_comm_error(const hc_comm *c) {
    return c && atomic_load(&((hc_comm *)c)->status) != HC_OK ? c->error : "";
}

uint64_t hc_comm_seq(const hc_comm *c) {
    if (!c) return 0;
    pthread_mutex_lock(&((hc_comm *)c)->qmu);
    uint64_t s = c->issued_seq;
    pthread_mutex_unlock(&((hc_comm *)c)->qmu);
    return s;
}

uint64_t hc_comm_bytes_sent(const hc_comm *c) { return c ? atomic_load(&((hc_comm *)c)->bytes_sent) : 0; }

uint64_t hc_comm_bytes_sent_intersite(const hc_comm *c) {
    return c ? atomic_load(&((hc_comm *)c)->bytes_sent_intersite) : 0;
}

void *hc_comm_scratch(hc_comm *c, int slot, size_t bytes) {
    if (bytes > c->scratch_len[slot]) {
        free(c->scratch[slot]);
        c->scratch[slot] = malloc(bytes);
        c->scratch_len[slot] = c->scratch[slot] ? bytes : 0;
    }
    return c->scratch[slot];
}

const char *hc_peer_desc(const hc_comm *c, int rank, char *buf, size_t len) {
    const hc_peer *p = rank >= 0 && rank < c->size ? &c->peers[rank] : NULL;
    if (!p)
        snprintf(buf, len, "rank %d", rank);
    else if (p->site_name && *p->site_name)
        snprintf(buf, len, "rank %d (site '%s', host '%s')", rank, p->site_name, p->host ? p->host : "");
    else
        snprintf(buf, len, "rank %d (host '%s')", rank, p->host ? p->host : "");
    return buf;
}
