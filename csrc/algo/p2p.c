/*
 * Point-to-point: sends go out at once (copied, so the op completes
 * immediately, as an eager send would); receives match arrivals by
 * (source, tag) in the order both were issued, like MPI. Neither ever
 * blocks the worker, so a receive posted before its matching send — on
 * either rank — cannot deadlock the collective queue behind it.
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "core/internal.h"

static void append(hc_op **head, hc_op **tail, hc_op *op) {
    op->next = NULL;
    if (*tail)
        (*tail)->next = op;
    else
        *head = op;
    *tail = op;
}

static int matches(const hc_op *recv, const hc_msg *m) {
    return (recv->root == HC_ANY_SOURCE || recv->root == m->h.src) && recv->tag == m->h.root;
}

static void finish_recv(hc_comm *c, hc_op *op, hc_msg *m) {
    size_t want = op->count * hc_dtype_size(op->dtype);
    op->source = m->h.src;
    int status = HC_OK;
    if (m->len != want) {
        char who[160];
        status = hc_op_failf(op, HC_ERR_MISMATCH,
                             "%s sent %zu bytes (%" PRIu64 " x %s) with tag %d, but rank %d posted a "
                             "receive of %zu bytes (%zu x %s)",
                             hc_peer_desc(c, m->h.src, who, sizeof who), m->len, m->h.count,
                             hc_dtype_name(m->h.dtype), op->tag, c->rank, want, op->count,
                             hc_dtype_name(op->dtype));
    } else if (want) {
        memcpy(op->recvbuf, m->data, want);
    }
    hc_tp_release_msg(c, m);
    hc_msg_free(c, m);
    hc_op_complete(op, status, NULL);
}

static void start_send(hc_comm *c, hc_op *op) {
    hc_peer *p = &c->peers[op->root];
    char who[160];
    if (p->gone) {
        hc_op_failf(op, HC_ERR_PEER_LOST, "rank %d cannot send to %s: its connection closed", c->rank,
                    hc_peer_desc(c, op->root, who, sizeof who));
        hc_op_complete(op, HC_ERR_PEER_LOST, NULL);
        return;
    }
    hc_wire_header h;
    hc_wire_header_init(&h, c, HC_MSG_P2P);
    h.op = HC_OP_SEND;
    h.dtype = (uint8_t)op->dtype;
    h.root = op->tag;
    h.count = op->count;
    /* One message on stream 0 keeps sends to one peer in order. */
    int rc = hc_tp_send(c, p, &h, op->sendbuf, op->count * hc_dtype_size(op->dtype), -1);
    if (rc != HC_OK) hc_op_failf(op, rc, "%s", hc_last_error());
    hc_op_complete(op, rc, NULL);
}

static void start_recv(hc_comm *c, hc_op *op) {
    for (hc_msg *prev = NULL, *m = c->unexpected_head; m; prev = m, m = m->next) {
        if (!matches(op, m)) continue;
        if (prev)
            prev->next = m->next;
        else
            c->unexpected_head = m->next;
        if (c->unexpected_tail == m) c->unexpected_tail = prev;
        finish_recv(c, op, m);
        return;
    }
    op->deadline_ns = op->timeout_ms < 0 ? INT64_MAX : hc_now_ns() + (int64_t)op->timeout_ms * 1000000;
    append(&c->recv_pending_head, &c->recv_pending_tail, op);
}

void hc_p2p_start(hc_comm *c, hc_op *op) {
    if (atomic_load(&c->status) != HC_OK) {
        hc_op_complete(op, HC_ERR_ABORTED, c->error);
        return;
    }
    if (op->kind == HC_OP_SEND)
        start_send(c, op);
    else
        start_recv(c, op);
}

void hc_p2p_deliver(hc_comm *c, hc_msg *m) {
    for (hc_op *prev = NULL, *op = c->recv_pending_head; op; prev = op, op = op->next) {
        if (!matches(op, m)) continue;
        if (prev)
            prev->next = op->next;
        else
            c->recv_pending_head = op->next;
        if (c->recv_pending_tail == op) c->recv_pending_tail = prev;
        op->next = NULL;
        finish_recv(c, op, m);
        return;
    }
    m->next = NULL;
    if (c->unexpected_tail)
        c->unexpected_tail->next = m;
    else
        c->unexpected_head = m;
    c->unexpected_tail = m;
}

long hc_p2p_expire(hc_comm *c, int64_t now) {
    long next = -1;
    for (hc_op *prev = NULL, *op = c->recv_pending_head; op; prev = op, op = op->next) {
        if (op->deadline_ns == INT64_MAX) continue;
        if (op->deadline_ns > now) {
            long ms = (long)((op->deadline_ns - now + 999999) / 1000000);
            if (next < 0 || ms < next) next = ms;
            continue;
        }
        if (prev)
            prev->next = op->next;
        else
            c->recv_pending_head = op->next;
        if (c->recv_pending_tail == op) c->recv_pending_tail = prev;
        char who[160];
        const char *from = op->root == HC_ANY_SOURCE ? "any rank" : hc_peer_desc(c, op->root, who, sizeof who);
        hc_op_failf(op, HC_ERR_TIMEOUT, "rank %d timed out after %d ms waiting for a message with tag %d from %s",
                    c->rank, op->timeout_ms, op->tag, from);
        char msg[HC_ERROR_LEN];
        snprintf(msg, sizeof msg, "%s", op->error);
        hc_op_complete(op, HC_ERR_TIMEOUT, NULL);
        /* A late message could match a later receive by mistake, so a
         * timed-out receive breaks the communicator, as a collective's does. */
        hc_comm_break(c, HC_ERR_TIMEOUT, msg, 1);
        return 0;
    }
    return next;
}

void hc_p2p_fail_all(hc_comm *c, int status, const char *error) {
    hc_op *op = c->recv_pending_head;
    c->recv_pending_head = c->recv_pending_tail = NULL;
    for (hc_op *next; op; op = next) {
        next = op->next;
        op->next = NULL;
        hc_op_complete(op, status, error);
    }
}
