/*
 * Shared by the core, the transport and the algorithms; not public.
 */
#ifndef HC_INTERNAL_H
#define HC_INTERNAL_H

#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "core/errors.h"
#include "hetcomm.h"
#include "transport/arena.h"
#include "transport/cma.h"
#include "transport/shm.h"
#include "transport/wire.h"
#include "transport/zmq_lib.h"

#define HC_ERROR_LEN 1024
#define HC_MAX_INBOXES 3 /* per plane: tcp, ipc, CURVE */
/* Work buffers the worker keeps between ops (see hc_comm_scratch). */
enum { HC_SCRATCH_WORK, HC_SCRATCH_TMP, HC_SCRATCH_ARENA, HC_SCRATCH_STAGE, HC_SCRATCH_SLOTS };

typedef enum hc_op_kind {
    HC_OP_ALLREDUCE = 1,
    HC_OP_BROADCAST,
    HC_OP_REDUCE,
    HC_OP_ALLGATHER,
    HC_OP_REDUCE_SCATTER,
    HC_OP_GATHER,
    HC_OP_SCATTER,
    HC_OP_ALLTOALL,
    HC_OP_ALLTOALLV,
    HC_OP_BARRIER,
    HC_OP_SEND,
    HC_OP_RECV,
} hc_op_kind;

const char *hc_op_kind_name(int kind);


/* ---- messages ---- */

/* A received message. The payload lives in a ZeroMQ frame until released. */
typedef struct hc_msg {
    hc_wire_header h;
    hc_zmq_msg frame;    /* header frame (holds the payload when inline) */
    hc_zmq_msg payload;  /* second frame, when not inline */
    int has_payload_frame;
    const uint8_t *data;
    size_t len;
    int inbox;           /* which inbox it came in on: data inbox i, or -1 - i for control inbox i */
    hc_lane *lane;       /* payload is in this lane's `slot`, freed on release */
    uint32_t slot;
    struct hc_msg *next;
} hc_msg;

/* ---- ops ---- */

struct hc_op {
    atomic_int refs;
    hc_op_kind kind;
    hc_comm *comm;
    const void *sendbuf;
    void *recvbuf;
    size_t count;
    int dtype;
    int redop;
    int root;     /* root rank; peer of p2p */
    int tag;
    size_t *vcounts; /* alltoallv: sendcounts, sdispls, recvcounts, rdispls */
    hc_call_opts opts;
    int timeout_ms;
    int codec;
    uint64_t seq;
    int64_t deadline_ns; /* p2p receives: when a pending receive times out */
    int64_t defer_until_ns; /* the worker leaves it to a waiting caller until then */

    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done;     /* finished: status and error are final */
    int notified; /* and its on_done callback has returned */
    int status;
    int source;
    char error[HC_ERROR_LEN];

    struct hc_op *next;
};

hc_op *hc_op_new(hc_comm *comm, hc_op_kind kind, const hc_call_opts *opts);
void hc_op_complete(hc_op *op, int status, const char *error);
int hc_op_failf(hc_op *op, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* The call of a collective that completed, kept for the last few: a late
 * message of one of them is then told apart from a mismatch. */
#define HC_RECENT_OPS 8
typedef struct hc_call_sig {
    uint64_t seq;
    size_t count;
    hc_op_kind kind;
    int dtype, redop, root, codec;
} hc_call_sig;

/* ---- peers and communicators ---- */

typedef struct hc_peer {
    int rank;
    int site;
    char *site_name;
    char *host;
    char *endpoints;      /* as published: "tcp=...;ipc=...;curve=..." */
    char *curve_key;
    char url[256];        /* the endpoint chosen to connect to */
    int secure;           /* CURVE on this link */
    int nstreams;
    void **streams;       /* PUSH sockets, one per TCP stream */
    void *ctl;            /* PUSH socket to the peer's control inbox */
    char ctl_url[256];
    void *monitor;        /* PAIR receiving the control socket's events */
    int hellos;           /* greetings received (one per stream of theirs) */
    int peer_streams;     /* how many streams the peer opened to this rank */
    int ready;            /* its READY arrived (handshake complete) */
    int pinged_me;        /* its PING arrived (and was answered) */
    int64_t rtt_ns;       /* round trip to it, measured at connect; 0 until then */
    int links_reported;   /* its LINKS arrived */
    hc_lane *tx_lane;     /* payloads to this peer, when it mapped the lane */
    struct hc_pending *pend_head, *pend_tail; /* zero-copy sends waiting for a lane slot */
    hc_lane *rx_lane;     /* payloads from this peer */
    int tx_lane_ok;
    int arena_mapped;     /* its LINKS said it mapped the communicator's arena */
    int gone;             /* its connection dropped */
    int64_t gone_ns;
    int said_bye;         /* it announced a clean close (BYE) */
    int left;             /* it closed cleanly: waits on it fail, the communicator stays usable */
    int64_t last_heard_ns; /* anything arrived from it */
    int64_t last_beat_ns; /* this rank's last heartbeat to it */
    int acked;            /* coordinator: its last FAULT bitmap equals this rank's */
    int inherited;        /* the link came from the communicator this one was reshaped from */
    int reshape_seen;     /* its RESHAPE arrived: it entered the same shrink or grow */
    uint64_t reshape_id;
    int reshape_size;
    uint8_t *reshape_keep; /* the ranks it keeps (bitmap) */
    hc_msg *stash_head, *stash_tail; /* collective messages not yet asked for */
    uint32_t tx_part, rx_part;       /* message counters of the running op */
    uint32_t tx_data, rx_data;       /* collective messages sent to / received from it on the sockets, ever */
} hc_peer;

/* Zero-copy sends not yet released by ZeroMQ, in two groups so an algorithm
 * can wait for the buffers it is about to overwrite and not for the ones it
 * just sent. Separate from the comm so a late release after a failed close
 * never touches freed memory. A byte on fd[1] wakes the progress engine
 * whenever a group drains. */
#define HC_TX_GROUPS 2
typedef struct hc_txtrack hc_txtrack;
typedef struct hc_txgroup {
    hc_txtrack *tx;
    long inflight;
} hc_txgroup;
struct hc_txtrack {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int fd[2];
    hc_txgroup group[HC_TX_GROUPS];
    hc_wire_header bye; /* sent zero-copy at destroy: must live as long as the tracker */
};

typedef struct hc_residual {
    uint64_t key;
    size_t count;
    float *data;
    struct hc_residual *next;
} hc_residual;

struct hc_comm {
    hc_config cfg;          /* strings below are owned copies */
    char *name;
    char *site;
    char *host;
    char *bind_address;
    char *curve_public_key;
    char *curve_secret_key;
    int rank;
    int size;

    void *zctx;
    int own_ctx;
    void *inbox[HC_MAX_INBOXES];   /* data plane */
    int ninbox;
    void *ctl_inbox[HC_MAX_INBOXES]; /* control plane: heartbeats, faults, aborts, reshapes */
    int nctl;
    void *secure_monitor;   /* auth failures on the CURVE inbox */
    char endpoint[1536];
    hc_peer *peers;
    int connected;

    int nsites;
    size_t wan_in_flight; /* agreed at connect: bytes one trip across the WAN holds (0: unknown) */
    hc_arena *arena;        /* small collectives on one host (algo/small.c), created by rank 0 */
    uint64_t arena_seq[HC_ARENA_REGIONS]; /* the collective that last used each region (0: none) */
    int small_shm;          /* agreed at connect: every rank mapped the arena */
    int64_t yield_off_until_ns; /* small waits sleep at once until then: a yield gave the core away (algo/small.c) */
    int cma_state;          /* large ops on one host read peers' memory: 0 untried, 1 works, -1 refused (algo/single_copy.c) */
    uint64_t cma_proof;     /* a word peers read to show they reach this process */
    hc_huge_cache huge;     /* this rank's buffers that peers read, backed by huge pages (hugepages) */
    int *ring;              /* ring order: ranks with sites kept adjacent */
    int ring_pos;           /* this rank's index in ring */

    /* worker and queues */
    pthread_mutex_t engine;         /* held by whoever drives the sockets: the
                                       worker, or a caller running a blocking
                                       op inline while the worker is idle */
    pthread_t worker;
    int worker_started;
    int wake_fd[2];
    pthread_mutex_t qmu;
    hc_op *q_head, *q_tail;         /* collectives, run in order */
    hc_op *p2p_head, *p2p_tail;     /* p2p ops not yet started */
    int closing;
    int quiesced;
    uint64_t issued_seq;
    atomic_int abort_requested;
    char abort_reason[256];

    /* state (written by the worker; read with the atomic) */
    atomic_int status;
    char error[HC_ERROR_LEN];

    /* membership (core/membership.c); the engine holder writes, member_mu
     * guards what other threads read */
    pthread_mutex_t member_mu;
    pthread_cond_t member_cv;   /* signalled when an agreement is reached */
    uint8_t *failed;            /* failed[r]: this rank holds r failed */
    int nfailed;
    int agreed;                 /* the survivors agreed on `failed` */
    int excluded;               /* the others hold this rank failed */
    int64_t heartbeat_ns;       /* silence that makes a peer lost; 0: off */
    int reshaped;               /* shrunk or grown into another communicator */

    /* point-to-point matching (worker only) */
    hc_op *recv_pending_head, *recv_pending_tail;
    hc_msg *unexpected_head, *unexpected_tail;

    hc_txtrack *tx;
    hc_zmq_pollitem *items;
    int nitems;
    int npinned;            /* items before the peers' monitors */
    hc_zmq_pollitem *idle_items; /* what an idle worker watches: control inboxes, wake pipe, monitors */
    int nidle;
    hc_zmq_pollitem *sleep_items; /* the worker's own copy, polled without the engine */
    int nsleep, sleep_cap;
    hc_msg *free_msgs;
    hc_residual *residuals;
    void *scratch[HC_SCRATCH_SLOTS]; /* grow-only work buffers of the worker */
    size_t scratch_len[HC_SCRATCH_SLOTS];

    atomic_uint_fast64_t bytes_sent;
    atomic_uint_fast64_t bytes_sent_intersite;

    /* reshaping (core/reshape.c): while a shrink or grow hands the links to
     * the next communicator, messages already sent under its id are kept */
    hc_call_sig recent[HC_RECENT_OPS]; /* by seq % HC_RECENT_OPS (worker only) */
    uint64_t next_comm_id;
    uint64_t reshape_tried; /* id of a reshape that failed here: peers' RESHAPEs for it are stale */
    hc_msg *future_head, *future_tail;
    uint64_t ancestors[4];  /* ids of the communicators this one was made from: their
                               late messages are dropped without a warning */
    struct hc_garbage *garbage; /* rate limit of the "dropped a message" warning */
};

/* A communicator with its settings (strings copied), queues, pipes and
 * membership state, but no sockets and no peers' details yet. */
int hc_comm_alloc(const hc_config *cfg, hc_comm **out);
/* Lets the worker finish the queued ops and joins it (idempotent). */
void hc_comm_stop_worker(hc_comm *comm);
/* Numbers the sites and orders the ring (sites kept adjacent). */
int hc_topology_build(hc_comm *comm);
/* The /dev/shm name of the lane carrying payloads from src to dst. */
void hc_lane_name(const hc_comm *comm, int src, int dst, char *buf, size_t len);
/* The /dev/shm name of the arena for small collectives. */
void hc_arena_name(const hc_comm *comm, char *buf, size_t len);
/* A work buffer of at least `bytes` that stays with the communicator, so
 * large ops do not pay for fresh pages every time. Worker thread only. */
void *hc_comm_scratch(hc_comm *comm, int slot, size_t bytes);
/* Words like "rank 2 (site 'b', host 'h2')" into buf. */
const char *hc_peer_desc(const hc_comm *comm, int rank, char *buf, size_t len);
/* Marks the communicator broken (first error wins), tells the peers, and
 * fails pending receives. Safe inside a running op, whose next wait then
 * fails. Worker thread only. */
void hc_comm_break(hc_comm *comm, int status, const char *error, int notify_peers);
/* After a break, at a point where no op is mid-flight: closes the links and
 * waits until ZeroMQ has let go of every user buffer. */
void hc_comm_quiesce(hc_comm *comm);

/* ---- the running op, as algorithms see it (core/xfer.c) ---- */

typedef struct hc_exec {
    hc_comm *comm;
    hc_op *op;
    int timeout_ms;
    int tx_group; /* which hc_txgroup zero-copy sends count in */
} hc_exec;

/* Sends `len` bytes to `dst` as the next message of this op. Large payloads
 * go zero-copy: the bytes must stay unchanged until hc_xsend_wait(). */
int hc_xsend(hc_exec *x, int dst, const void *buf, size_t len);
/* The next message of this op from `src`. Release it with hc_xrelease. */
int hc_xrecv(hc_exec *x, int src, hc_msg **out);
/* hc_xrecv, checks the length is exactly `len`, copies it to buf. */
int hc_xrecv_into(hc_exec *x, int src, void *buf, size_t len);
void hc_xrelease(hc_exec *x, hc_msg *m);
/* hc_xsend that always copies (for buffers about to be overwritten). */
int hc_xsend_copy(hc_exec *x, int dst, const void *buf, size_t len);
/* Waits until ZeroMQ has released the zero-copy buffers of `group` (-1: all). */
int hc_xsend_wait(hc_exec *x, int group);
/* A run of `count` elements goes as pieces of the communicator's chunk size
 * (at least one message, even when empty, so the receiver can check sizes). */
size_t hc_chunk_elems(hc_exec *x);
static inline size_t hc_piece_count(size_t count, size_t chunk_elems) {
    return count ? (count + chunk_elems - 1) / chunk_elems : 1;
}
int hc_xsend_run(hc_exec *x, int dst, const void *buf, size_t count);
int hc_xrecv_run(hc_exec *x, int src, void *buf, size_t count);
/* Fails the op with a formatted error; returns status. */
int hc_xfail(hc_exec *x, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* ---- progress engine (core/progress.c) ---- */

/* Records the call of a collective that completed here. */
void hc_progress_remember(hc_comm *comm, const hc_op *op);
/* Checks messages that came early for this op (or stale ones) before it runs. */
int hc_progress_check_stash(hc_comm *comm, hc_op *op);
/* Waits for message number `part` of collective `seq` from `src`. */
int hc_progress_wait(hc_comm *comm, hc_op *op, int src, uint32_t part, int timeout_ms,
                     hc_msg **out);
/* Fails `op` (returns its status) when a message of the same collective
 * number shows another call; HC_OK when the calls agree. */
int hc_progress_check_header(hc_comm *comm, hc_op *op, const hc_wire_header *h);
/* For waits outside the sockets: waits up to timeout_ms (0: not at all) for
 * them, files what they brought (an ABORT or a mismatched message fails
 * `op`), serves abort requests, monitors and membership (heartbeats, peers
 * failed), and fails `op` when `src` is lost or closed its communicator. */
int hc_progress_poll(hc_comm *comm, hc_op *op, int src, int timeout_ms);
/* Waits until ZeroMQ released the zero-copy sends of `group` (-1: all). */
int hc_progress_tx_drain(hc_comm *comm, hc_op *op, int group, int timeout_ms);
/* One idle round of the worker: waits for work or messages. */
void hc_progress_idle(hc_comm *comm);
/* Whether the idle worker must watch the sockets (pending receives, p2p
 * work, a broken communicator to wind down) or may just wait to be woken. */
int hc_progress_needs_sockets(hc_comm *comm);
/* Blocks until the wake-up pipe has a byte, a control message or monitor
 * event may have come, or timeout_ms (-1: none) passed; leaves the byte
 * there, since a caller running an op inline may be waiting on the same
 * pipe. Polls the copy hc_progress_snapshot_idle made, without the engine. */
void hc_progress_sleep(hc_comm *comm, long timeout_ms);
/* Blocks until the wake-up pipe has a byte or timeout_ms passed, leaving it
 * there; touches no socket, so another thread may hold the engine meanwhile. */
void hc_progress_nap(hc_comm *comm, long timeout_ms);
/* Copies what an idle worker watches, for hc_progress_sleep; engine held. */
int hc_progress_snapshot_idle(hc_comm *comm);
/* Empties the wake-up pipe; engine held (or a small op deferred, see worker.c). */
void hc_progress_clear_wakeups(hc_comm *comm);
/* Runs one collective and completes it; engine held. */
void hc_run_op(hc_comm *comm, hc_op *op);
/* Zeroes `h` and fills what every message carries: magic, version, kind,
 * sender rank and communicator id. */
void hc_wire_header_init(hc_wire_header *h, const hc_comm *comm, int kind);
/* Takes the oldest queued collective (NULL if none); `closing` (may be NULL)
 * tells whether the communicator is shutting down with no p2p op left. */
hc_op *hc_next_collective(hc_comm *comm, int *closing);
/* Set on the worker thread: there a signal is not the user's business. */
extern _Thread_local int hc_on_worker;
/* Greets every peer; waits for all greetings. */
int hc_progress_handshake(hc_comm *comm);
/* This rank's estimate of the bytes one WAN trip carries (algo/allreduce.c). */
size_t hc_wan_in_flight_estimate(const hc_comm *comm);
/* The algorithm an allreduce runs with (algo: the call's, HC_ALGO_AUTO for the communicator's). */
int hc_allreduce_algo_for(const hc_comm *comm, int algo, int codec, size_t bytes);
hc_msg *hc_msg_alloc(hc_comm *comm);
void hc_msg_free(hc_comm *comm, hc_msg *m);

/* ---- membership (core/membership.c) ---- */

int hc_member_init(hc_comm *comm);
void hc_member_free(hc_comm *comm);
/* Holds `rank` failed (once): breaks the communicator with HC_ERR_PEER_LOST,
 * drops the links to it and tells the survivors. Engine held. */
void hc_member_fail(hc_comm *comm, int rank, const char *why);
/* A FAULT or DECIDE message from a peer. Engine held. */
void hc_member_on_message(hc_comm *comm, const hc_msg *m);
/* Sends the heartbeats that are due and fails peers that went silent or whose
 * connection dropped without a goodbye; returns ms until the next deadline
 * (-1: none). Engine held. */
long hc_member_tick(hc_comm *comm, int64_t now);
/* The survivors agreed on the failed set, or this rank was excluded, or no
 * one is left to agree with. */
int hc_member_settled(const hc_comm *comm);
/* How long a failed op waits for that agreement and for its buffers, beyond
 * one heartbeat interval. */
#define HC_SETTLE_MS 1000
/* "[1, 3]": the failed ranks. */
const char *hc_member_list(const hc_comm *comm, char *buf, size_t len);
/* Bitmaps on the wire: one bit per rank. */
static inline size_t hc_bitmap_bytes(int n) { return ((size_t)n + 7) / 8; }
static inline int hc_bit(const uint8_t *b, int i) { return (b[i / 8] >> (i % 8)) & 1; }
static inline void hc_set_bit(uint8_t *b, int i) { b[i / 8] |= (uint8_t)(1u << (i % 8)); }

/* Drives the progress engine with no op running until done(comm, arg) holds
 * or the deadline passes (HC_ERR_TIMEOUT); engine held. Control messages,
 * faults and heartbeats are served meanwhile. */
int hc_progress_until(hc_comm *comm, int (*done)(hc_comm *, void *), void *arg, int64_t deadline_ns);
/* What the idle worker does when woken by the control plane or a timer:
 * serve control messages, monitors and heartbeats. Engine held. Returns ms
 * until the next timer (-1: none). */
long hc_progress_housekeeping(hc_comm *comm);

/* ---- reshaping (core/reshape.c) ---- */

/* A RESHAPE message from a peer: it entered a shrink or grow. Engine held. */
void hc_reshape_on_message(hc_comm *comm, const hc_msg *m);

/* ---- transport (transport/zmq.c) ---- */

int hc_tp_bind(hc_comm *comm);
int hc_tp_connect_peer(hc_comm *comm, hc_peer *peer);
void hc_tp_build_pollset(hc_comm *comm);
/* Sends header + payload to peer on the stream chosen by header->part. */
int hc_tp_send(hc_comm *comm, hc_peer *peer, hc_wire_header *h, const void *payload,
               size_t len, int tx_group /* -1: copy */);
/* Sends a control message (copied) on the peer's control connection. */
int hc_tp_send_ctl(hc_comm *comm, hc_peer *peer, hc_wire_header *h, const void *payload, size_t len);
/* At destroy: a goodbye (comm->tx->bye) on every link to the peer, counted in
 * tx group 0. Each one is queued behind what was sent on its link before, so
 * once hc_tp_flush_goodbyes sees them all taken, ZeroMQ has taken all this rank
 * sent (a process that exits right after a close loses what it has not). */
void hc_tp_send_bye(hc_comm *comm, hc_peer *peer);
/* Whether the peer's end of the links is known closed (reads its monitor). */
int hc_tp_peer_departed(hc_comm *comm, hc_peer *peer);
/* Waits (up to timeout_ms) until ZeroMQ has taken the goodbyes; the links of
 * a peer that closes meanwhile are dropped, goodbyes and all. */
void hc_tp_flush_goodbyes(hc_comm *comm, int timeout_ms);
/* Closes every link to one peer (linger 0: what it never took is dropped,
 * which releases the zero-copy buffers queued for it). */
void hc_tp_close_peer(hc_comm *comm, hc_peer *peer);
/* Non-blocking receive from control inbox `i`, like hc_tp_try_recv. */
int hc_tp_try_recv_ctl(hc_comm *comm, int i, hc_msg **out);
/* Non-blocking: 1 and *out set when a message was waiting, 0 when none, or
 * a negative hc_status (as -status) on failure. */
int hc_tp_try_recv(hc_comm *comm, int inbox, hc_msg **out);
/* Reads one monitor event of `peer`: the event code, or 0 when none. */
int hc_tp_read_monitor(hc_comm *comm, hc_peer *peer);
int hc_tp_read_event(void *monitor);
void hc_tp_close_peers(hc_comm *comm, int linger_ms);
void hc_tp_close_all(hc_comm *comm, int linger_ms);
/* Frees the message's frames (or lane slot, crediting a waiting sender). */
void hc_tp_release_msg(hc_comm *comm, hc_msg *m);
/* Moves queued payloads into the peer's lane as slots free up. */
void hc_tp_pump(hc_comm *comm, hc_peer *peer);
hc_txtrack *hc_tx_new(void);
void hc_tx_free(hc_txtrack *tx);
long hc_tx_inflight(hc_txtrack *tx, int group);
int hc_tx_wait(hc_txtrack *tx, int group, int timeout_ms);

/* The error-feedback residual of `key`, zeroed when new or resized. */
float *hc_residual_get(hc_comm *comm, uint64_t key, size_t count);

/* ---- point-to-point engine (algo/p2p.c) ---- */

void hc_p2p_start(hc_comm *comm, hc_op *op);
/* Takes ownership of a P2P message: completes a posted receive or keeps it. */
void hc_p2p_deliver(hc_comm *comm, hc_msg *m);
/* Times out overdue receives; returns ms until the next deadline, -1 if none. */
long hc_p2p_expire(hc_comm *comm, int64_t now_ns);
void hc_p2p_fail_all(hc_comm *comm, int status, const char *error);

/* ---- algorithms (one file each under algo/) ---- */

int hc_allreduce_run(hc_exec *x);
int hc_allreduce_ring(hc_exec *x);
int hc_allreduce_recursive_doubling(hc_exec *x);
int hc_reduce_scatter_ring(hc_exec *x);
int hc_allgather_ring(hc_exec *x);
int hc_broadcast_run(hc_exec *x);
int hc_reduce_run(hc_exec *x);
int hc_gather_run(hc_exec *x);
int hc_scatter_run(hc_exec *x);
int hc_alltoall_run(hc_exec *x);
int hc_barrier_run(hc_exec *x);
/* Small collectives through the arena: whether this op goes there, and the run. */
int hc_small_fits(const hc_comm *comm, const hc_op *op);
int hc_small_run(hc_exec *x);
/* One round of op x through the arena, for any path that needs one:
 * gather posts `len` bytes of `data` in this rank's slot (with the op's
 * header), waits until every rank posted and checks that their calls and
 * lengths agree; peer_data is rank r's posted bytes until leave; leave ends
 * the round, and with `wait_all` waits until every rank left. */
int hc_small_gather(hc_exec *x, const void *data, size_t len);
const void *hc_small_peer_data(hc_exec *x, int rank);
int hc_small_leave(hc_exec *x, int wait_all);
/* For waits on the sockets: fails `op` when a peer ran it through the
 * arena (the calls or the small-message settings differ). */
int hc_small_check_arena(hc_comm *comm, hc_op *op);
/* How long the worker leaves a small async op to the thread that queued it. */
#define HC_DEFER_NS 1000000
/* How often a socket wait looks at the arena, ms. */
#define HC_SMALL_CHECK_MS 5
/* This rank mapped an arena shared with every peer. */
int hc_small_links_ok(const hc_comm *comm);

/* Large collectives between ranks of one host, read straight from the
 * peers' buffers (cross-memory attach): whether this op goes there, and the run. */
int hc_single_copy_fits(const hc_comm *comm, const hc_op *op);
int hc_single_copy_run(hc_exec *x);
/* The message is a peer's ADDR of the single-copy path: that peer reads
 * buffers directly where this rank expected a ring's piece. */
int hc_single_copy_is_addr(const void *data, size_t len);

/* Splits `count` elements into `parts` nearly equal runs: the start of run i. */
static inline size_t hc_split(size_t count, int parts, int i) {
    return (size_t)((unsigned __int128)count * (unsigned)i / (unsigned)parts);
}

#endif
