/* Names and sizes of the enums in hetcomm.h, and option defaults. */
#include <string.h>

#include "core/internal.h"

static const size_t dtype_sizes[HC_DTYPE_COUNT] = {4, 8, 2, 2, 1, 2, 4, 8, 1, 1};
static const char *const dtype_names[HC_DTYPE_COUNT] = {
    "float32", "float64", "float16", "bfloat16", "int8",
    "int16",   "int32",   "int64",   "uint8",    "bool"};
static const char *const redop_names[HC_REDOP_COUNT] = {"sum", "avg", "prod", "min",
                                                        "max", "band", "bor", "bxor"};

size_t hc_dtype_size(int dtype) {
    return dtype >= 0 && dtype < HC_DTYPE_COUNT ? dtype_sizes[dtype] : 0;
}

const char *hc_dtype_name(int dtype) {
    return dtype >= 0 && dtype < HC_DTYPE_COUNT ? dtype_names[dtype] : "invalid-dtype";
}

const char *hc_redop_name(int op) {
    return op >= 0 && op < HC_REDOP_COUNT ? redop_names[op] : "invalid-op";
}

const char *hc_op_kind_name(int kind) {
    switch (kind) {
    case HC_OP_ALLREDUCE: return "allreduce";
    case HC_OP_BROADCAST: return "broadcast";
    case HC_OP_REDUCE: return "reduce";
    case HC_OP_ALLGATHER: return "allgather";
    case HC_OP_REDUCE_SCATTER: return "reduce_scatter";
    case HC_OP_GATHER: return "gather";
    case HC_OP_SCATTER: return "scatter";
    case HC_OP_ALLTOALL: return "alltoall";
    case HC_OP_ALLTOALLV: return "alltoallv";
    case HC_OP_BARRIER: return "barrier";
    case HC_OP_SEND: return "send";
    case HC_OP_RECV: return "recv";
    default: return "unknown-op";
    }
}

void hc_config_init(hc_config *cfg) {
    memset(cfg, 0, sizeof *cfg);
    cfg->struct_size = sizeof *cfg;
    cfg->rank = -1;
    cfg->size = -1;
    cfg->name = "hetcomm";
    cfg->bind_address = "tcp://127.0.0.1";
    cfg->site = "";
    cfg->host = "";
    cfg->timeout_ms = 300000;
    cfg->streams = 1;
    cfg->chunk_bytes = 2u << 20;
    cfg->small_bytes = 64 * 1024;
    cfg->algo = HC_ALGO_AUTO;
    cfg->codec = HC_CODEC_NONE;
    cfg->codec_min_bytes = 64 * 1024;
    cfg->codec_block = 256;
    cfg->codec_scale_fp32 = 1;
    cfg->shm_enable = 1;
    cfg->shm_bytes = 16u << 20;
    cfg->heartbeat_ms = 5000;
    cfg->spin_us = -1;
    cfg->cma_enable = 1;
    cfg->hugepages = 1;
}

void hc_call_opts_init(hc_call_opts *opts) {
    memset(opts, 0, sizeof *opts);
    opts->struct_size = sizeof *opts;
    opts->timeout_ms = HC_TIMEOUT_DEFAULT;
    opts->algo = HC_ALGO_AUTO;
    opts->codec = -1;
}
