/*
 * Large collectives between ranks of one host with one copy per byte: each
 * rank reads (and for allreduce writes) its peers' buffers directly
 * (transport/cma.h) instead of the peer copying into a shared-memory lane
 * and this rank copying out of it.
 *
 * Allreduce: rank i owns run i of the buffer (hc_split). It reads the
 * peers' inputs of that run block by block into a cache-sized scratch,
 * folds them into its output and writes each folded block, still in cache,
 * into every peer's output. Only the owner reduces a run, so all ranks end
 * with the owner's bits. Allgather reads each peer's input into place;
 * reduce_scatter folds the peers' blocks of this rank; broadcast reads the
 * root's buffer.
 *
 * Where this rank's buffers are (ADDR) and that it is done (DONE) pass
 * through the shared-memory arena when every rank mapped it: one arrival
 * barrier and one departure barrier, as a small collective's (algo/small.c),
 * with its checks of the calls, aborts, timeouts and lost peers. A socket
 * message costs a wake-up of two I/O threads on each side, which dominated
 * collectives of a few MiB. Without the arena both go over the sockets as
 * ordinary messages of the op. No rank returns before every peer is done:
 * until then its buffers may still be read or written.
 *
 * The kernel pins and maps every page it copies, so the buffers' 2 MiB
 * interiors are asked to be backed by huge pages (hugepages in the config).
 *
 * The first such op of a communicator proves the path: every rank reads a
 * word from every peer, compares it with what the peer published, and all
 * ranks exchange their verdicts, so they all take the same path from then
 * on. Where the kernel refuses (seccomp, Yama, another user, another PID
 * namespace) they use the rings over the lanes, with one warning.
 */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "core/internal.h"
#include "transport/cma.h"

/* Up to this a collective goes through the arena (HETCOMM_SMALL_BYTES), or the rings. */
#define MIN_BYTES (64u << 10)
/* Peers' pieces are folded in blocks this size: read into scratch and
 * reduced while the scratch and the output block are still in L2. */
#define BLOCK_BYTES (128u << 10)
/* How long a failed read waits for the peer's ABORT that may explain it. */
#define ABORT_GRACE_MS 200
#define ADDR_MAGIC 0x5944414d43434831ull /* "1HCCMADY" */

enum { STATE_UNTRIED = 0, STATE_WORKS = 1, STATE_REFUSED = -1 };

/* What a rank tells its peers at the start of the op. */
typedef struct sc_addr {
    uint64_t magic;
    int32_t pid;
    uint32_t usable; /* 0: this rank's buffers overlap in a way the path cannot handle */
    uint64_t in, out;
    uint64_t proof_addr, proof; /* a word in this process and the value it holds */
} sc_addr;

int hc_single_copy_fits(const hc_comm *c, const hc_op *op) {
    if (!c->cfg.cma_enable || c->size < 2 || c->nsites != 1 || op->codec != HC_CODEC_NONE || !*c->host) return 0;
    /* An allreduce algorithm asked for by name runs as asked. */
    int named = (op->opts.algo != HC_ALGO_AUTO ? op->opts.algo : c->cfg.algo) != HC_ALGO_AUTO;
    size_t part = op->count * hc_dtype_size(op->dtype), whole;
    if (op->kind == HC_OP_ALLREDUCE && !named) whole = part;
    else if (op->kind == HC_OP_BROADCAST) whole = part;
    else if (op->kind == HC_OP_ALLGATHER || op->kind == HC_OP_REDUCE_SCATTER) whole = part * (size_t)c->size;
    else return 0;
    if (whole <= MIN_BYTES || whole <= c->cfg.small_bytes) return 0;
    for (int r = 0; r < c->size; r++)
        if (r != c->rank && (!c->peers[r].host || strcmp(c->peers[r].host, c->host) != 0)) return 0;
    return 1;
}

static int overlaps(const void *a, size_t alen, const void *b, size_t blen) {
    const char *p = a, *q = b;
    return alen && blen && p < q + blen && q < p + alen;
}

/* Whether this rank's buffers allow the path: the parts peers read must not
 * be written by this rank during the op. */
static int buffers_usable(const hc_comm *c, const hc_op *op) {
    size_t es = hc_dtype_size(op->dtype), part = op->count * es, n = (size_t)c->size;
    const char *in = op->sendbuf, *out = op->recvbuf;
    switch (op->kind) {
    case HC_OP_ALLREDUCE: return in == out || !overlaps(in, part, out, part);
    case HC_OP_ALLGATHER: return in == out + (size_t)c->rank * part || !overlaps(in, part, out, part * n);
    case HC_OP_REDUCE_SCATTER: return out == in + (size_t)c->rank * part || !overlaps(in, part * n, out, part);
    default: return 1;
    }
}

/* Huge pages under the buffers this rank's peers read and it writes (see
 * hc_cma_hugepages). */
static void prefer_huge_pages(hc_comm *c, const hc_op *op) {
    if (!c->cfg.hugepages || c->cma_state == STATE_REFUSED) return;
    size_t part = op->count * hc_dtype_size(op->dtype), n = (size_t)c->size;
    size_t in_len = op->kind == HC_OP_REDUCE_SCATTER ? part * n : part;
    size_t out_len = op->kind == HC_OP_ALLGATHER ? part * n : part;
    if (op->kind != HC_OP_BROADCAST) hc_cma_hugepages(&c->huge, op->sendbuf, in_len);
    if (op->kind == HC_OP_BROADCAST || op->recvbuf != op->sendbuf) hc_cma_hugepages(&c->huge, op->recvbuf, out_len);
}

static int send_all(hc_exec *x, const void *msg, size_t len) {
    for (int k = 1; k < x->comm->size; k++) {
        int rc = hc_xsend_copy(x, (x->comm->rank + k) % x->comm->size, msg, len);
        if (rc != HC_OK) return rc;
    }
    return HC_OK;
}

int hc_single_copy_is_addr(const void *data, size_t len) {
    uint64_t magic;
    if (len != sizeof(sc_addr)) return 0;
    memcpy(&magic, data, sizeof magic);
    return magic == ADDR_MAGIC;
}

static int recv_all(hc_exec *x, void *msgs, size_t len) {
    for (int k = 1; k < x->comm->size; k++) {
        int r = (x->comm->rank + k) % x->comm->size;
        int rc = hc_xrecv_into(x, r, (char *)msgs + (size_t)r * len, len);
        if (rc != HC_OK) return rc;
    }
    return HC_OK;
}

/* The peers' ADDR messages. A peer that sends something else runs this
 * collective on the rings: the calls agree (the headers were checked), so
 * the settings differ. */
static int recv_addrs(hc_exec *x, sc_addr *a) {
    hc_comm *c = x->comm;
    for (int k = 1; k < c->size; k++) {
        int r = (c->rank + k) % c->size;
        hc_msg *m;
        int rc = hc_xrecv(x, r, &m);
        if (rc != HC_OK) return rc;
        if (m->len == sizeof *a) {
            memcpy(&a[r], m->data, sizeof *a);
        } else {
            char who[160];
            rc = hc_xfail(x, HC_ERR_MISMATCH,
                          "%s ran %s #%" PRIu64 " over the rings while rank %d read its peers' buffers directly: "
                          "HETCOMM_CMA or HETCOMM_SMALL_BYTES differ across ranks",
                          hc_peer_desc(c, r, who, sizeof who), hc_op_kind_name(x->op->kind), x->op->seq, c->rank);
        }
        hc_xrelease(x, m);
        if (rc != HC_OK) return rc;
    }
    return HC_OK;
}

/* Every rank's sc_addr into a[]: through the arena when every rank mapped
 * it (one barrier, no socket hop), else as ADDR messages. */
static int exchange_addrs(hc_exec *x, sc_addr *a) {
    hc_comm *c = x->comm;
    if (!c->small_shm) {
        int rc = send_all(x, &a[c->rank], sizeof *a);
        return rc == HC_OK ? recv_addrs(x, a) : rc;
    }
    int rc = hc_small_gather(x, &a[c->rank], sizeof *a);
    for (int r = 0; r < c->size && rc == HC_OK; r++)
        if (r != c->rank) memcpy(&a[r], hc_small_peer_data(x, r), sizeof *a);
    return rc;
}

/* Copies `len` bytes between `mine` and `remote` in rank r's process: from
 * there (`write` 0) or to there (1). */
static int copy_peer(hc_exec *x, int r, const sc_addr *a, void *mine, uint64_t remote, size_t len, int write) {
    int e = write ? hc_cma_write(a->pid, mine, remote, len) : hc_cma_read(a->pid, mine, remote, len);
    if (!e) return HC_OK;
    hc_comm *c = x->comm;
    int gone = e == ESRCH || (e == EFAULT && kill(a->pid, 0) != 0 && errno == ESRCH);
    /* A peer whose op already failed (an abort, a timeout) may have let go
     * of its buffers, or exited: its ABORT, sent before that, is the error
     * to report (still in flight for up to ABORT_GRACE_MS, unless it is gone). */
    int rc = hc_progress_poll(c, x->op, r, gone ? 0 : ABORT_GRACE_MS);
    if (rc != HC_OK) return rc;
    char who[160];
    hc_peer_desc(c, r, who, sizeof who);
    if (gone) {
        rc = hc_xfail(x, HC_ERR_PEER_LOST, "%s exited while rank %d %s its buffer in %s #%" PRIu64, who, c->rank,
                      write ? "wrote" : "read", hc_op_kind_name(x->op->kind), x->op->seq);
        hc_member_fail(c, r, "its process is gone (process_vm_readv/writev found no such process)");
        return rc;
    }
    return hc_xfail(x, HC_ERR_TRANSPORT, "rank %d could not %s %zu bytes at %#" PRIx64 " of %s in %s #%" PRIu64 ": %s",
                    c->rank, write ? "write" : "read", len, remote, who, hc_op_kind_name(x->op->kind), x->op->seq,
                    strerror(e));
}

static int read_peer(hc_exec *x, int r, const sc_addr *a, void *dst, uint64_t remote, size_t len) {
    return copy_peer(x, r, a, dst, remote, len, 0);
}

/* First op of the communicator on this path: can every rank read and write
 * every peer? (A seccomp profile may allow one call and not the other.) The
 * write puts back the value just read. */
static int agree_on_path(hc_exec *x, const sc_addr *a) {
    hc_comm *c = x->comm;
    uint32_t verdict = 1, verdicts[c->size];
    int first_errno = 0, failed_peer = -1;
    for (int r = 0; r < c->size && verdict; r++) {
        if (r == c->rank) continue;
        uint64_t seen = 0;
        int e = hc_cma_read(a[r].pid, &seen, a[r].proof_addr, sizeof seen);
        if (!e && seen == a[r].proof) e = hc_cma_write(a[r].pid, &seen, a[r].proof_addr, sizeof seen);
        if (e || seen != a[r].proof) {
            verdict = 0;
            first_errno = e;
            failed_peer = r;
        }
    }
    int rc = send_all(x, &verdict, sizeof verdict);
    if (rc == HC_OK) rc = recv_all(x, verdicts, sizeof verdict);
    if (rc != HC_OK) return rc;
    verdicts[c->rank] = verdict;
    c->cma_state = STATE_WORKS;
    for (int r = 0; r < c->size; r++)
        if (!verdicts[r]) c->cma_state = STATE_REFUSED;
    if (!verdict)
        hc_log(HC_LOG_WARNING,
               "%s: rank %d cannot read or write rank %d's memory (process_vm_readv/writev: %s); large "
               "collectives on this host use the shared-memory lanes (HETCOMM_CMA=0 skips the attempt)",
               c->name, c->rank, failed_peer, first_errno ? strerror(first_errno) : "another process answered");
    else if (c->cma_state == STATE_REFUSED)
        hc_log(HC_LOG_INFO, "%s: rank %d: another rank may not reach its peers' memory; large collectives use the "
               "shared-memory lanes", c->name, c->rank);
    return HC_OK;
}

/* dst = fold of every rank's `count` elements at byte offset `off` of its
 * input (this rank's at `mine`), this rank first, then the others in rank
 * order, block by block. With `push`, each folded block is also written to
 * the same offset of every peer's output while it is still in cache. */
static int fold_run(hc_exec *x, const sc_addr *a, uint64_t off, const char *mine, char *dst, size_t count, int push) {
    hc_comm *c = x->comm;
    hc_op *op = x->op;
    size_t es = hc_dtype_size(op->dtype), be = BLOCK_BYTES / es;
    char *scratch = hc_comm_scratch(c, HC_SCRATCH_TMP, BLOCK_BYTES);
    if (!scratch) return hc_xfail(x, HC_ERR_NO_MEMORY, "rank %d: no memory for a %u-byte block", c->rank, BLOCK_BYTES);
    for (size_t b = 0; b < count; b += be) {
        size_t len = count - b < be ? count - b : be;
        const char *acc = mine + b * es;
        char *block = dst + b * es;
        for (int r = 0; r < c->size; r++) {
            if (r == c->rank) continue;
            int rc = read_peer(x, r, &a[r], scratch, a[r].in + off + b * es, len * es);
            if (rc != HC_OK) return rc;
            hc_reduce_kernel(block, acc, scratch, len, op->dtype, op->redop);
            acc = block;
        }
        if (op->redop == HC_AVG) hc_divide_kernel(block, len, op->dtype, c->size);
        for (int k = 1; push && k < c->size; k++) {
            int r = (c->rank + k) % c->size;
            int rc = copy_peer(x, r, &a[r], block, a[r].out + off + b * es, len * es, 1);
            if (rc != HC_OK) return rc;
        }
    }
    return HC_OK;
}

/* Rank i folds run i of the buffer and writes it into every output. Only
 * the owner reads a run of a peer's input, and it reads each block before
 * it writes that block back, so buffers reduced in place are safe too. */
static int allreduce(hc_exec *x, const sc_addr *a) {
    hc_op *op = x->op;
    int n = x->comm->size, me = x->comm->rank;
    size_t es = hc_dtype_size(op->dtype);
    size_t lo = hc_split(op->count, n, me), hi = hc_split(op->count, n, me + 1);
    return fold_run(x, a, lo * es, (const char *)op->sendbuf + lo * es, (char *)op->recvbuf + lo * es, hi - lo, 1);
}

static int allgather(hc_exec *x, const sc_addr *a) {
    hc_op *op = x->op;
    int n = x->comm->size, me = x->comm->rank, rc = HC_OK;
    size_t part = op->count * hc_dtype_size(op->dtype);
    char *out = op->recvbuf;
    if (out + (size_t)me * part != (const char *)op->sendbuf) memcpy(out + (size_t)me * part, op->sendbuf, part);
    for (int k = 1; k < n && rc == HC_OK; k++) {
        int r = (me + k) % n;
        rc = read_peer(x, r, &a[r], out + (size_t)r * part, a[r].in, part);
    }
    return rc;
}

static int reduce_scatter(hc_exec *x, const sc_addr *a) {
    hc_op *op = x->op;
    size_t part = op->count * hc_dtype_size(op->dtype), off = (size_t)x->comm->rank * part;
    return fold_run(x, a, off, (const char *)op->sendbuf + off, op->recvbuf, op->count, 0);
}

static int broadcast(hc_exec *x, const sc_addr *a) {
    hc_op *op = x->op;
    if (x->comm->rank == op->root) return HC_OK;
    return read_peer(x, op->root, &a[op->root], op->recvbuf, a[op->root].out, op->count * hc_dtype_size(op->dtype));
}

static int fall_back(hc_exec *x) {
    switch (x->op->kind) {
    case HC_OP_ALLREDUCE: return hc_allreduce_run(x);
    case HC_OP_ALLGATHER: return hc_allgather_ring(x);
    case HC_OP_REDUCE_SCATTER: return hc_reduce_scatter_ring(x);
    default: return hc_broadcast_run(x);
    }
}

int hc_single_copy_run(hc_exec *x) {
    hc_comm *c = x->comm;
    hc_op *op = x->op;
    if (!c->cma_proof) {
        hc_cma_prepare();
        c->cma_proof = ((uint64_t)getpid() << 32 ^ (uint64_t)hc_now_ns() ^ c->cfg.comm_id) | 1;
    }
    prefer_huge_pages(c, op);
    sc_addr a[c->size];
    sc_addr mine = {ADDR_MAGIC, (int32_t)getpid(), (uint32_t)buffers_usable(c, op), (uint64_t)(uintptr_t)op->sendbuf,
                    (uint64_t)(uintptr_t)op->recvbuf, (uint64_t)(uintptr_t)&c->cma_proof, c->cma_proof};
    a[c->rank] = mine;
    int rc = exchange_addrs(x, a);
    if (rc == HC_OK && c->cma_state == STATE_UNTRIED) rc = agree_on_path(x, a);
    if (rc != HC_OK) return rc;
    int usable = c->cma_state == STATE_WORKS;
    for (int r = 0; r < c->size; r++) usable &= a[r].magic == ADDR_MAGIC && a[r].usable;
    if (hc_log_enabled(HC_LOG_DEBUG))
        hc_log(HC_LOG_DEBUG, "%s: rank %d: %s #%" PRIu64 " of %zu elements (%s): %s", c->name, c->rank,
               hc_op_kind_name(op->kind), op->seq, op->count, hc_dtype_name(op->dtype),
               usable ? "single copy from the peers' buffers" : "rings (single copy not usable)");
    if (!usable) {
        if (c->small_shm && (rc = hc_small_leave(x, 0)) != HC_OK) return rc;
        return fall_back(x);
    }
    switch (op->kind) {
    case HC_OP_ALLREDUCE: rc = allreduce(x, a); break;
    case HC_OP_ALLGATHER: rc = allgather(x, a); break;
    case HC_OP_REDUCE_SCATTER: rc = reduce_scatter(x, a); break;
    default: rc = broadcast(x, a); break;
    }
    if (rc != HC_OK) return rc;
    /* Peers may still be reading or writing this rank's buffers until every rank is done. */
    if (c->small_shm) return hc_small_leave(x, 1);
    uint32_t done[c->size];
    done[c->rank] = 1;
    rc = send_all(x, &done[c->rank], sizeof done[0]);
    return rc == HC_OK ? recv_all(x, done, sizeof done[0]) : rc;
}
