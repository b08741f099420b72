/*
 * The public op entry points: check the arguments, build the op, queue it.
 * Everything a caller can get wrong is caught here, before any byte moves,
 * so an algorithm only ever fails on the network.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/internal.h"

#define FAIL(status, ...)                    \
    do {                                     \
        hc_set_last_error(__VA_ARGS__);      \
        return (status);                     \
    } while (0)

static int check_comm(hc_comm *c, const char *fn) {
    if (!c) FAIL(HC_ERR_INVALID_ARGUMENT, "%s: comm is NULL", fn);
    if (!c->connected) FAIL(HC_ERR_STATE, "%s: communicator '%s' is not connected yet (call hc_comm_connect)", fn, c->name);
    int broken = atomic_load(&c->status);
    if (broken == HC_ERR_PEER_LOST || broken == HC_ERR_STATE)
        FAIL(broken, "%s: communicator '%s': %s", fn, c->name, c->error);
    if (broken != HC_OK)
        FAIL(HC_ERR_ABORTED, "%s: communicator '%s' is broken by an earlier error: %s", fn, c->name, c->error);
    return HC_OK;
}

static int check_dtype(hc_comm *c, const char *fn, int dtype) {
    if (dtype < 0 || dtype >= HC_DTYPE_COUNT)
        FAIL(HC_ERR_INVALID_ARGUMENT, "%s: rank %d: dtype %d is not an hc_dtype", fn, c->rank, dtype);
    return HC_OK;
}

static int is_float(int dtype) {
    return dtype == HC_FLOAT32 || dtype == HC_FLOAT64 || dtype == HC_FLOAT16 || dtype == HC_BFLOAT16;
}

static int check_redop(hc_comm *c, const char *fn, int dtype, int redop) {
    if (redop < 0 || redop >= HC_REDOP_COUNT)
        FAIL(HC_ERR_INVALID_ARGUMENT, "%s: rank %d: op %d is not an hc_redop", fn, c->rank, redop);
    if (is_float(dtype) && (redop == HC_BAND || redop == HC_BOR || redop == HC_BXOR))
        FAIL(HC_ERR_UNSUPPORTED, "%s: rank %d: %s is not defined for %s", fn, c->rank,
             hc_redop_name(redop), hc_dtype_name(dtype));
    if (dtype == HC_BOOL && redop == HC_AVG)
        FAIL(HC_ERR_UNSUPPORTED, "%s: rank %d: avg is not defined for bool", fn, c->rank);
    return HC_OK;
}

static int check_buffer(hc_comm *c, const char *fn, const char *name, const void *buf, size_t count,
                        int dtype, size_t blocks) {
    size_t esize = hc_dtype_size(dtype);
    if (blocks && count > SIZE_MAX / esize / blocks)
        FAIL(HC_ERR_INVALID_ARGUMENT, "%s: rank %d: %s of %zu x %zu %s elements overflows", fn,
             c->rank, name, blocks, count, hc_dtype_name(dtype));
    if (!buf && count && blocks)
        FAIL(HC_ERR_INVALID_ARGUMENT, "%s: rank %d: %s is NULL but holds %zu elements", fn, c->rank,
             name, count * blocks);
    return HC_OK;
}

static int check_rank(hc_comm *c, const char *fn, const char *name, int r) {
    if (r < 0 || r >= c->size)
        FAIL(HC_ERR_INVALID_ARGUMENT, "%s: rank %d: %s %d is out of range [0, %d)", fn, c->rank,
             name, r, c->size);
    return HC_OK;
}

static int codec_of(const hc_comm *c, int call_codec, int dtype, int redop, size_t count) {
    int codec = call_codec >= 0 ? call_codec : c->cfg.codec;
    /* Only float sums and averages are compressed; the rest must be exact. */
    if (!is_float(dtype) || (redop != HC_SUM && redop != HC_AVG)) return HC_CODEC_NONE;
    if (codec < 0 || codec >= HC_CODEC_COUNT || count * hc_dtype_size(dtype) < c->cfg.codec_min_bytes)
        return HC_CODEC_NONE;
    return codec;
}

static int codec_for(hc_comm *c, hc_op *op) { return codec_of(c, op->opts.codec, op->dtype, op->redop, op->count); }

int hc_comm_allreduce_algo(const hc_comm *c, size_t count, int dtype, int redop) {
    if (!c || dtype < 0 || dtype >= HC_DTYPE_COUNT || redop < 0 || redop >= HC_REDOP_COUNT) return -1;
    return hc_allreduce_algo_for(c, HC_ALGO_AUTO, codec_of(c, -1, dtype, redop, count), count * hc_dtype_size(dtype));
}

static void wake(hc_comm *c) {
    char b = 1;
    (void)!write(c->wake_fd[1], &b, 1); /* a full pipe already means "wake up" */
}

/* Ends a run on a user thread: the op's waits may have eaten wake-ups meant
 * for the worker, so wake it if anything is left for it, then let go. */
static void release_engine(hc_comm *c) {
    pthread_mutex_lock(&c->qmu);
    int pending = c->q_head || c->p2p_head;
    pthread_mutex_unlock(&c->qmu);
    if (pending || c->recv_pending_head) wake(c);
    pthread_mutex_unlock(&c->engine);
}

/* A blocking collective on an idle communicator runs on the caller's thread:
 * two thread hand-offs less, which is most of a small message's latency. */
static int run_inline(hc_comm *c, hc_op *op) {
    if (pthread_mutex_trylock(&c->engine) != 0) return 0;
    pthread_mutex_lock(&c->qmu);
    if (c->closing || c->q_head) {
        pthread_mutex_unlock(&c->qmu);
        pthread_mutex_unlock(&c->engine);
        return 0;
    }
    op->seq = ++c->issued_seq;
    pthread_mutex_unlock(&c->qmu);
    hc_run_op(c, op);
    release_engine(c);
    return 1;
}

/* The next op is a small one the worker leaves to its waiting caller; the
 * worker holds the engine only for a moment then. */
static int head_deferred(hc_comm *c) {
    pthread_mutex_lock(&c->qmu);
    int deferred = c->q_head && c->q_head->defer_until_ns;
    pthread_mutex_unlock(&c->qmu);
    return deferred;
}

int hc_comm_progress(hc_comm *c) {
    if (!c || !c->connected || hc_on_worker) return 0;
    if (pthread_mutex_trylock(&c->engine) != 0) {
        if (!head_deferred(c)) return 0;
        pthread_mutex_lock(&c->engine);
    }
    int ran = 0;
    for (hc_op *op; (op = hc_next_collective(c, NULL)) != NULL; ran++) hc_run_op(c, op);
    release_engine(c);
    return ran;
}

static int submit(hc_comm *c, hc_op *op, hc_op **op_out) {
    int p2p = op->kind == HC_OP_SEND || op->kind == HC_OP_RECV;
    if (!op_out && !p2p && run_inline(c, op)) {
        int status = op->status;
        if (status != HC_OK) hc_set_last_error("%s", op->error);
        hc_op_release(op);
        return status;
    }
    pthread_mutex_lock(&c->qmu);
    if (c->closing) {
        pthread_mutex_unlock(&c->qmu);
        op->refs = 1;
        hc_op_release(op);
        FAIL(HC_ERR_STATE, "communicator '%s' is being destroyed", c->name);
    }
    hc_op **head = p2p ? &c->p2p_head : &c->q_head, **tail = p2p ? &c->p2p_tail : &c->q_tail;
    if (!p2p) op->seq = ++c->issued_seq;
    /* An async small op alone in the queue is most likely waited for at
     * once (torch's synchronous calls are async ops plus wait()): the worker
     * leaves it to the waiting thread for a moment, which saves two thread
     * hand-offs; it runs it after HC_DEFER_NS if nobody waits. */
    if (op_out && !c->q_head && hc_small_fits(c, op)) op->defer_until_ns = hc_now_ns() + HC_DEFER_NS;
    if (*tail)
        (*tail)->next = op;
    else
        *head = op;
    *tail = op;
    pthread_mutex_unlock(&c->qmu);
    wake(c);
    if (op_out) {
        *op_out = op;
        return HC_OK;
    }
    int status = hc_op_wait(op, -1);
    if (status != HC_OK) hc_set_last_error("%s", op->error);
    hc_op_release(op);
    return status;
}

static hc_op *new_op(hc_comm *c, hc_op_kind kind, const hc_call_opts *opts, const void *sendbuf,
                     void *recvbuf, size_t count, int dtype) {
    hc_op *op = hc_op_new(c, kind, opts);
    if (!op) return NULL;
    op->sendbuf = sendbuf;
    op->recvbuf = recvbuf;
    op->count = count;
    op->dtype = dtype;
    op->redop = HC_SUM;
    return op;
}

#define NEW_OP(kind, send, recv, count, dtype)                                          \
    hc_op *op = new_op(c, kind, opts, send, recv, count, dtype);                        \
    if (!op) FAIL(HC_ERR_NO_MEMORY, "%s: rank %d: out of memory", __func__, c->rank)

#define CHECK(expr)                 \
    do {                            \
        int rc_ = (expr);           \
        if (rc_ != HC_OK) return rc_; \
    } while (0)

int hc_allreduce(hc_comm *c, const void *sendbuf, void *recvbuf, size_t count, int dtype, int redop,
                 const hc_call_opts *opts, hc_op **op_out) {
    CHECK(check_comm(c, __func__));
    CHECK(check_dtype(c, __func__, dtype));
    CHECK(check_redop(c, __func__, dtype, redop));
    CHECK(check_buffer(c, __func__, "sendbuf", sendbuf, count, dtype, 1));
    CHECK(check_buffer(c, __func__, "recvbuf", recvbuf, count, dtype, 1));
    NEW_OP(HC_OP_ALLREDUCE, sendbuf, recvbuf, count, dtype);
    op->redop = redop;
    op->codec = codec_for(c, op);
    return submit(c, op, op_out);
}

int hc_broadcast(hc_comm *c, void *buf, size_t count, int dtype, int root, const hc_call_opts *opts,
                 hc_op **op_out) {
    CHECK(check_comm(c, __func__));
    CHECK(check_dtype(c, __func__, dtype));
    CHECK(check_rank(c, __func__, "root", root));
    CHECK(check_buffer(c, __func__, "buf", buf, count, dtype, 1));
    NEW_OP(HC_OP_BROADCAST, buf, buf, count, dtype);
    op->root = root;
    return submit(c, op, op_out);
}

int hc_reduce(hc_comm *c, const void *sendbuf, void *recvbuf, size_t count, int dtype, int redop,
              int root, const hc_call_opts *opts, hc_op **op_out) {
    CHECK(check_comm(c, __func__));
    CHECK(check_dtype(c, __func__, dtype));
    CHECK(check_redop(c, __func__, dtype, redop));
    CHECK(check_rank(c, __func__, "root", root));
    CHECK(check_buffer(c, __func__, "sendbuf", sendbuf, count, dtype, 1));
    CHECK(check_buffer(c, __func__, "recvbuf", recvbuf, count, dtype, c->rank == root));
    NEW_OP(HC_OP_REDUCE, sendbuf, recvbuf, count, dtype);
    op->redop = redop;
    op->root = root;
    return submit(c, op, op_out);
}

int hc_allgather(hc_comm *c, const void *sendbuf, void *recvbuf, size_t count, int dtype,
                 const hc_call_opts *opts, hc_op **op_out) {
    CHECK(check_comm(c, __func__));
    CHECK(check_dtype(c, __func__, dtype));
    CHECK(check_buffer(c, __func__, "sendbuf", sendbuf, count, dtype, 1));
    CHECK(check_buffer(c, __func__, "recvbuf", recvbuf, count, dtype, (size_t)c->size));
    NEW_OP(HC_OP_ALLGATHER, sendbuf, recvbuf, count, dtype);
    /* Lossy gathers (parameters, activations) only when asked for per call. */
    if (opts && opts->codec > 0) op->codec = codec_for(c, op);
    return submit(c, op, op_out);
}

int hc_reduce_scatter(hc_comm *c, const void *sendbuf, void *recvbuf, size_t recvcount, int dtype,
                      int redop, const hc_call_opts *opts, hc_op **op_out) {
    CHECK(check_comm(c, __func__));
    CHECK(check_dtype(c, __func__, dtype));
    CHECK(check_redop(c, __func__, dtype, redop));
    CHECK(check_buffer(c, __func__, "sendbuf", sendbuf, recvcount, dtype, (size_t)c->size));
    CHECK(check_buffer(c, __func__, "recvbuf", recvbuf, recvcount, dtype, 1));
    NEW_OP(HC_OP_REDUCE_SCATTER, sendbuf, recvbuf, recvcount, dtype);
    op->redop = redop;
    op->codec = codec_for(c, op);
    return submit(c, op, op_out);
}

int hc_gather(hc_comm *c, const void *sendbuf, void *recvbuf, size_t count, int dtype, int root,
              const hc_call_opts *opts, hc_op **op_out) {
    CHECK(check_comm(c, __func__));
    CHECK(check_dtype(c, __func__, dtype));
    CHECK(check_rank(c, __func__, "root", root));
    CHECK(check_buffer(c, __func__, "sendbuf", sendbuf, count, dtype, 1));
    CHECK(check_buffer(c, __func__, "recvbuf", recvbuf, count, dtype, c->rank == root ? (size_t)c->size : 0));
    NEW_OP(HC_OP_GATHER, sendbuf, recvbuf, count, dtype);
    op->root = root;
    return submit(c, op, op_out);
}

int hc_scatter(hc_comm *c, const void *sendbuf, void *recvbuf, size_t count, int dtype, int root,
               const hc_call_opts *opts, hc_op **op_out) {
    CHECK(check_comm(c, __func__));
    CHECK(check_dtype(c, __func__, dtype));
    CHECK(check_rank(c, __func__, "root", root));
    CHECK(check_buffer(c, __func__, "sendbuf", sendbuf, count, dtype, c->rank == root ? (size_t)c->size : 0));
    CHECK(check_buffer(c, __func__, "recvbuf", recvbuf, count, dtype, 1));
    NEW_OP(HC_OP_SCATTER, sendbuf, recvbuf, count, dtype);
    op->root = root;
    return submit(c, op, op_out);
}

int hc_alltoall(hc_comm *c, const void *sendbuf, void *recvbuf, size_t count, int dtype,
                const hc_call_opts *opts, hc_op **op_out) {
    CHECK(check_comm(c, __func__));
    CHECK(check_dtype(c, __func__, dtype));
    CHECK(check_buffer(c, __func__, "sendbuf", sendbuf, count, dtype, (size_t)c->size));
    CHECK(check_buffer(c, __func__, "recvbuf", recvbuf, count, dtype, (size_t)c->size));
    NEW_OP(HC_OP_ALLTOALL, sendbuf, recvbuf, count, dtype);
    return submit(c, op, op_out);
}

int hc_alltoallv(hc_comm *c, const void *sendbuf, const size_t *sendcounts, const size_t *sdispls,
                 void *recvbuf, const size_t *recvcounts, const size_t *rdispls, int dtype,
                 const hc_call_opts *opts, hc_op **op_out) {
    CHECK(check_comm(c, __func__));
    CHECK(check_dtype(c, __func__, dtype));
    if (!sendcounts || !sdispls || !recvcounts || !rdispls)
        FAIL(HC_ERR_INVALID_ARGUMENT, "%s: rank %d: counts and displacements must not be NULL", __func__, c->rank);
    size_t n = (size_t)c->size, total_send = 0, total_recv = 0;
    for (size_t r = 0; r < n; r++) {
        CHECK(check_buffer(c, __func__, "sendbuf", sendbuf, sendcounts[r], dtype, 1));
        CHECK(check_buffer(c, __func__, "recvbuf", recvbuf, recvcounts[r], dtype, 1));
        total_send += sendcounts[r];
        total_recv += recvcounts[r];
    }
    NEW_OP(HC_OP_ALLTOALLV, sendbuf, recvbuf, total_send, dtype);
    op->vcounts = malloc(4 * n * sizeof(size_t));
    if (!op->vcounts) {
        op->refs = 1;
        hc_op_release(op);
        FAIL(HC_ERR_NO_MEMORY, "%s: out of memory", __func__);
    }
    memcpy(op->vcounts, sendcounts, n * sizeof(size_t));
    memcpy(op->vcounts + n, sdispls, n * sizeof(size_t));
    memcpy(op->vcounts + 2 * n, recvcounts, n * sizeof(size_t));
    memcpy(op->vcounts + 3 * n, rdispls, n * sizeof(size_t));
    (void)total_recv;
    return submit(c, op, op_out);
}

int hc_barrier(hc_comm *c, const hc_call_opts *opts, hc_op **op_out) {
    CHECK(check_comm(c, __func__));
    NEW_OP(HC_OP_BARRIER, NULL, NULL, 0, HC_UINT8);
    return submit(c, op, op_out);
}

static int check_p2p(hc_comm *c, const char *fn, int peer, int tag, int any_ok) {
    if (!(any_ok && peer == HC_ANY_SOURCE)) {
        CHECK(check_rank(c, fn, "peer", peer));
        if (peer == c->rank)
            FAIL(HC_ERR_INVALID_ARGUMENT, "%s: rank %d cannot %s itself", fn, c->rank,
                 any_ok ? "receive from" : "send to");
    }
    if (tag < 0) FAIL(HC_ERR_INVALID_ARGUMENT, "%s: rank %d: tag %d is negative", fn, c->rank, tag);
    return HC_OK;
}

int hc_send(hc_comm *c, const void *buf, size_t count, int dtype, int peer, int tag,
            const hc_call_opts *opts, hc_op **op_out) {
    CHECK(check_comm(c, __func__));
    CHECK(check_dtype(c, __func__, dtype));
    CHECK(check_p2p(c, __func__, peer, tag, 0));
    CHECK(check_buffer(c, __func__, "buf", buf, count, dtype, 1));
    NEW_OP(HC_OP_SEND, buf, NULL, count, dtype);
    op->root = peer;
    op->tag = tag;
    return submit(c, op, op_out);
}

int hc_recv(hc_comm *c, void *buf, size_t count, int dtype, int peer, int tag,
            const hc_call_opts *opts, hc_op **op_out) {
    CHECK(check_comm(c, __func__));
    CHECK(check_dtype(c, __func__, dtype));
    CHECK(check_p2p(c, __func__, peer, tag, 1));
    CHECK(check_buffer(c, __func__, "buf", buf, count, dtype, 1));
    NEW_OP(HC_OP_RECV, NULL, buf, count, dtype);
    op->root = peer;
    op->tag = tag;
    return submit(c, op, op_out);
}
