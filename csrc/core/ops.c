/* Op handles: creation, completion, waiting. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/internal.h"

hc_op *hc_op_new(hc_comm *comm, hc_op_kind kind, const hc_call_opts *opts) {
    hc_op *op = calloc(1, sizeof *op);
    if (!op) return NULL;
    atomic_init(&op->refs, 2); /* the caller's and the worker's */
    op->kind = kind;
    op->comm = comm;
    op->root = -1;
    op->source = -1;
    op->status = HC_IN_PROGRESS;
    if (opts) {
        size_t n = opts->struct_size < sizeof op->opts ? opts->struct_size : sizeof op->opts;
        hc_call_opts_init(&op->opts);
        memcpy(&op->opts, opts, n);
        op->opts.struct_size = sizeof op->opts;
    } else {
        hc_call_opts_init(&op->opts);
    }
    op->timeout_ms = op->opts.timeout_ms == HC_TIMEOUT_DEFAULT ? comm->cfg.timeout_ms : op->opts.timeout_ms;
    pthread_mutex_init(&op->mu, NULL);
    pthread_cond_init(&op->cv, NULL);
    return op;
}

int hc_op_failf(hc_op *op, int status, const char *fmt, ...) {
    if (!op->error[0]) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(op->error, sizeof op->error, fmt, ap);
        va_end(ap);
    }
    return status;
}

void hc_op_complete(hc_op *op, int status, const char *error) {
    pthread_mutex_lock(&op->mu);
    op->status = status;
    if (status != HC_OK && !op->error[0])
        snprintf(op->error, sizeof op->error, "%s", error && *error ? error : hc_status_string(status));
    op->done = 1;
    pthread_mutex_unlock(&op->mu);
    if (op->opts.on_done) op->opts.on_done(op, status, op->opts.user);
    /* Waiters return only after the callback: a blocking caller that gets
     * an error back must know whether its callback has already run. */
    pthread_mutex_lock(&op->mu);
    op->notified = 1;
    pthread_cond_broadcast(&op->cv);
    pthread_mutex_unlock(&op->mu);
    hc_op_release(op); /* the worker's reference */
}

int hc_op_wait(hc_op *op, int timeout_ms) {
    if (!op) return HC_ERR_INVALID_ARGUMENT;
    struct timespec until;
    if (timeout_ms >= 0) {
        clock_gettime(CLOCK_REALTIME, &until);
        int64_t ns = until.tv_nsec + (int64_t)timeout_ms * 1000000;
        until.tv_sec += ns / 1000000000;
        until.tv_nsec = ns % 1000000000;
    }
    pthread_mutex_lock(&op->mu);
    while (!op->notified) {
        if (timeout_ms < 0)
            pthread_cond_wait(&op->cv, &op->mu);
        else if (pthread_cond_timedwait(&op->cv, &op->mu, &until) == ETIMEDOUT)
            break;
    }
    int status = op->notified ? op->status : HC_IN_PROGRESS;
    pthread_mutex_unlock(&op->mu);
    return status;
}

int hc_op_status(const hc_op *op) {
    hc_op *m = (hc_op *)op;
    pthread_mutex_lock(&m->mu);
    int s = m->done ? m->status : HC_IN_PROGRESS;
    pthread_mutex_unlock(&m->mu);
    return s;
}

const char *hc_op_error(const hc_op *op) {
    /* Written once, before done is set; readers only look after completion. */
    return hc_op_status(op) == HC_IN_PROGRESS ? "" : op->error;
}

int hc_op_source(const hc_op *op) { return op->source; }

uint64_t hc_op_seq(const hc_op *op) { return op->seq; }

void hc_op_release(hc_op *op) {
    if (!op) return;
    if (atomic_fetch_sub(&op->refs, 1) != 1) return;
    pthread_mutex_destroy(&op->mu);
    pthread_cond_destroy(&op->cv);
    free(op->vcounts);
    free(op);
}
