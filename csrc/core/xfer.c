/* The send/receive vocabulary algorithms use: messages numbered per
 * (op, peer) so both sides agree on order without naming every step. */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "core/internal.h"

void hc_wire_header_init(hc_wire_header *h, const hc_comm *c, int kind) {
    memset(h, 0, sizeof *h);
    h->magic = HC_WIRE_MAGIC;
    h->version = HC_WIRE_VERSION;
    h->kind = (uint8_t)kind;
    h->src = c->rank;
    h->comm_id = c->cfg.comm_id;
}

static void fill_header(hc_exec *x, hc_wire_header *h, int dst) {
    hc_comm *c = x->comm;
    hc_op *op = x->op;
    hc_wire_header_init(h, c, HC_MSG_DATA);
    h->op = (uint8_t)op->kind;
    h->dtype = (uint8_t)op->dtype;
    h->redop = (uint8_t)op->redop;
    h->codec = (uint8_t)op->codec;
    h->root = op->root;
    h->seq = op->seq;
    h->count = op->count;
    h->part = c->peers[dst].tx_part++;
    c->peers[dst].tx_data++;
    /* Both ends must decode with the same block and scale format. */
    if (op->codec) h->reserved0 = c->cfg.codec_block | (c->cfg.codec_scale_fp32 ? 0x80000000u : 0);
}

static int send_common(hc_exec *x, int dst, const void *buf, size_t len, int group) {
    hc_wire_header h;
    fill_header(x, &h, dst);
    int rc = hc_tp_send(x->comm, &x->comm->peers[dst], &h, buf, len, group);
    return rc == HC_OK ? rc : hc_xfail(x, rc, "%s", hc_last_error());
}

int hc_xsend(hc_exec *x, int dst, const void *buf, size_t len) {
    return send_common(x, dst, buf, len, x->tx_group);
}

int hc_xsend_copy(hc_exec *x, int dst, const void *buf, size_t len) {
    return send_common(x, dst, buf, len, -1);
}

int hc_xrecv(hc_exec *x, int src, hc_msg **out) {
    uint32_t part = x->comm->peers[src].rx_part++;
    return hc_progress_wait(x->comm, x->op, src, part, x->timeout_ms, out);
}

void hc_xrelease(hc_exec *x, hc_msg *m) {
    hc_tp_release_msg(x->comm, m);
    hc_msg_free(x->comm, m);
}

int hc_xrecv_into(hc_exec *x, int src, void *buf, size_t len) {
    hc_msg *m;
    int rc = hc_xrecv(x, src, &m);
    if (rc != HC_OK) return rc;
    if (m->len != len) {
        char who[160];
        rc = hc_xfail(x, HC_ERR_MISMATCH,
                      "%s sent %zu bytes where rank %d expected %zu in %s #%" PRIu64,
                      hc_peer_desc(x->comm, src, who, sizeof who), m->len, x->comm->rank, len,
                      hc_op_kind_name(x->op->kind), x->op->seq);
    } else if (len) {
        memcpy(buf, m->data, len);
    }
    hc_xrelease(x, m);
    return rc;
}

int hc_xsend_wait(hc_exec *x, int group) {
    return hc_progress_tx_drain(x->comm, x->op, group, x->timeout_ms);
}

int hc_xfail(hc_exec *x, int status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    if (!x->op->error[0]) vsnprintf(x->op->error, sizeof x->op->error, fmt, ap);
    va_end(ap);
    return status;
}

size_t hc_chunk_elems(hc_exec *x) {
    size_t e = x->comm->cfg.chunk_bytes / hc_dtype_size(x->op->dtype);
    return e ? e : 1;
}

int hc_xsend_run(hc_exec *x, int dst, const void *buf, size_t count) {
    size_t es = hc_dtype_size(x->op->dtype), ce = hc_chunk_elems(x), n = hc_piece_count(count, ce);
    for (size_t k = 0; k < n; k++) {
        size_t lo = k * ce, hi = lo + ce < count ? lo + ce : count;
        int rc = hc_xsend(x, dst, (const char *)buf + lo * es, (hi - lo) * es);
        if (rc != HC_OK) return rc;
    }
    return HC_OK;
}

int hc_xrecv_run(hc_exec *x, int src, void *buf, size_t count) {
    size_t es = hc_dtype_size(x->op->dtype), ce = hc_chunk_elems(x), n = hc_piece_count(count, ce);
    for (size_t k = 0; k < n; k++) {
        size_t lo = k * ce, hi = lo + ce < count ? lo + ce : count;
        int rc = hc_xrecv_into(x, src, (char *)buf + lo * es, (hi - lo) * es);
        if (rc != HC_OK) return rc;
    }
    return HC_OK;
}
