/*
 * The worker thread: one per communicator, the only thread that touches its
 * sockets. It runs collectives one at a time in issue order and keeps the
 * point-to-point engine moving between and during them.
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "core/internal.h"

static int run_algorithm(hc_exec *x) {
    if (hc_small_fits(x->comm, x->op)) return hc_small_run(x);
    if (hc_single_copy_fits(x->comm, x->op)) return hc_single_copy_run(x);
    switch (x->op->kind) {
    case HC_OP_ALLREDUCE: return hc_allreduce_run(x);
    case HC_OP_BROADCAST: return hc_broadcast_run(x);
    case HC_OP_REDUCE: return hc_reduce_run(x);
    case HC_OP_ALLGATHER: return hc_allgather_ring(x);
    case HC_OP_REDUCE_SCATTER: return hc_reduce_scatter_ring(x);
    case HC_OP_GATHER: return hc_gather_run(x);
    case HC_OP_SCATTER: return hc_scatter_run(x);
    case HC_OP_ALLTOALL:
    case HC_OP_ALLTOALLV: return hc_alltoall_run(x);
    case HC_OP_BARRIER: return hc_barrier_run(x);
    default: return hc_xfail(x, HC_ERR_UNSUPPORTED, "op kind %d cannot run as a collective", x->op->kind);
    }
}

/* Before a failed op completes: the survivors agree on who failed (so its
 * error and hc_comm_failed_ranks tell the same set everywhere), and ZeroMQ
 * lets go of the op's buffers. Live peers take what was sent to them; the
 * links to failed ones were closed, which drops what was queued for them. */
static int settled_after_failure(hc_comm *c, void *arg) {
    (void)arg;
    if (hc_tx_inflight(c->tx, -1)) return 0;
    return !c->nfailed || hc_member_settled(c);
}

static void settle_after_failure(hc_comm *c) {
    int64_t wait_ms = HC_SETTLE_MS + (c->heartbeat_ns ? c->heartbeat_ns / 1000000 : 0);
    hc_progress_until(c, settled_after_failure, NULL, hc_now_ns() + wait_ms * 1000000);
    if (hc_tx_inflight(c->tx, -1)) hc_comm_quiesce(c); /* a stuck peer holds buffers: drop every link */
}

void hc_run_op(hc_comm *c, hc_op *op) {
    int broken = atomic_load(&c->status);
    if (broken != HC_OK) {
        int status = broken == HC_ERR_PEER_LOST || broken == HC_ERR_STATE ? broken : HC_ERR_ABORTED;
        hc_op_failf(op, status, "communicator broken by an earlier error: %s", c->error);
        hc_op_complete(op, status, NULL);
        return;
    }
    for (int r = 0; r < c->size; r++) c->peers[r].tx_part = c->peers[r].rx_part = 0;
    hc_exec x = {c, op, op->timeout_ms, 0};
    int status = hc_progress_check_stash(c, op);
    if (status == HC_OK && !(c->size == 1 && op->kind == HC_OP_BARRIER)) status = run_algorithm(&x);
    /* The user may reuse the buffers once the op completes, so ZeroMQ must
     * have let go of every zero-copy send first. */
    if (status == HC_OK) status = hc_xsend_wait(&x, -1);
    if (status != HC_OK) {
        if (!op->error[0]) hc_op_failf(op, status, "%s", hc_status_string(status));
        hc_comm_break(c, status, op->error, status != HC_ERR_ABORTED || atomic_load(&c->abort_requested));
        settle_after_failure(c);
    } else {
        hc_progress_remember(c, op);
    }
    hc_op_complete(op, status, NULL);
}

hc_op *hc_next_collective(hc_comm *c, int *closing) {
    pthread_mutex_lock(&c->qmu);
    hc_op *op = c->q_head;
    if (op) {
        c->q_head = op->next;
        if (!c->q_head) c->q_tail = NULL;
        op->next = NULL;
    }
    if (closing) *closing = c->closing && !c->p2p_head;
    pthread_mutex_unlock(&c->qmu);
    return op;
}

/* How long to leave the next op to the caller that queued it (0: run it). */
static long deferred_ms(hc_comm *c) {
    pthread_mutex_lock(&c->qmu);
    int64_t until = c->q_head && !c->closing && !c->p2p_head ? c->q_head->defer_until_ns : 0;
    pthread_mutex_unlock(&c->qmu);
    int64_t left = until - hc_now_ns();
    return left > 0 ? (long)((left + 999999) / 1000000) : 0;
}

void *hc_worker_main(void *arg) {
    hc_comm *c = arg;
    hc_on_worker = 1;
    /* Signals belong to the user's threads (Ctrl-C must reach Python). */
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    for (;;) {
        long defer_ms = deferred_ms(c);
        if (defer_ms) {
            /* Without the engine, so the caller can take it at once. Eating
             * a wake-up here is safe: ops are deferred only with the arena,
             * and then every wait of an engine holder looks at the queue and
             * at abort requests at least every HC_SMALL_CHECK_MS. The nap
             * touches no socket (the caller may hold them) and lasts at most
             * HC_DEFER_NS, so heartbeats and control messages wait no longer. */
            hc_progress_clear_wakeups(c);
            hc_progress_nap(c, defer_ms);
            continue;
        }
        pthread_mutex_lock(&c->engine);
        int closing;
        hc_op *op = hc_next_collective(c, &closing);
        if (op) {
            hc_run_op(c, op);
        } else if (closing) {
            hc_p2p_fail_all(c, HC_ERR_ABORTED, "the communicator was destroyed while this receive was pending");
            pthread_mutex_unlock(&c->engine);
            break;
        } else if (hc_progress_needs_sockets(c)) {
            hc_progress_idle(c);
        } else {
            /* No op: serve the control plane (heartbeats, faults, reshapes),
             * then let go of the sockets, so a blocking call can run on its
             * caller's thread, and sleep until woken, until a control message
             * or monitor event may have come, or until the next heartbeat is
             * due. Wake-ups are cleared only here, holding the engine, and
             * the queue is looked at again afterwards, so none is lost. */
            long next_ms = hc_progress_housekeeping(c);
            hc_progress_clear_wakeups(c);
            hc_progress_snapshot_idle(c);
            pthread_mutex_lock(&c->qmu);
            int more = c->q_head || c->p2p_head || c->closing;
            pthread_mutex_unlock(&c->qmu);
            pthread_mutex_unlock(&c->engine);
            if (!more) hc_progress_sleep(c, next_ms);
            continue;
        }
        pthread_mutex_unlock(&c->engine);
    }
    return NULL;
}
