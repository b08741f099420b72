/*
 * hetcomm.h — the C ABI of hetcomm, the only public header of the C core.
 *
 * A communicator joins `size` ranks. Creating one is two-phase, like NCCL's
 * unique-id dance, because rendezvous belongs to the caller (Python uses a
 * key-value store; a C program can use anything):
 *
 *   hc_init(libzmq_path)                 once per process
 *   hc_comm_create(&cfg, &comm)          binds this rank's inbox
 *   hc_comm_endpoint(comm)               publish this string to the others
 *   hc_comm_set_peer(comm, r, ...)       for every other rank r
 *   hc_comm_connect(comm)                connects and checks every peer
 *
 * Collectives are asynchronous: each returns at once with an hc_op handle and
 * runs on the communicator's worker thread, in issue order. Point-to-point
 * ops never wait behind a collective. Pass `op_out == NULL` to block until the
 * op completes instead. Buffers must stay valid and unchanged (the receive
 * buffers untouched) until the op completes.
 *
 * Every function returns an hc_status. After a transport-level failure
 * (timeout, lost peer, mismatch, abort) the communicator is broken: later ops
 * fail at once naming the first error (HC_ERR_PEER_LOST after a lost peer,
 * HC_ERR_ABORTED otherwise), as NCCL does, because the ranks can no longer
 * agree on where the byte stream stands. The links to the live peers stay
 * up, so a broken communicator can be shrunk (hc_comm_shrink) into a working
 * one without a new rendezvous, and a running one grown (hc_comm_grow).
 *
 * Failures: a peer whose connection closes without a goodbye (it crashed or
 * was killed) is lost at once; one that goes silent (a cut link) is lost when
 * no heartbeat came for hc_config.heartbeat_ms. The survivors then agree on
 * one set of failed ranks (hc_comm_failed_ranks) before the failed op
 * completes, so every survivor reports the same set.
 *
 * The region between the CDEF markers is read by cffi as well as by the C
 * compiler, so it holds only plain declarations.
 */
#ifndef HETCOMM_H
#define HETCOMM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* HC_CDEF_BEGIN */

#define HC_VERSION_MAJOR 0
#define HC_VERSION_MINOR 1
#define HC_ANY_SOURCE -1
#define HC_TIMEOUT_DEFAULT -1

typedef enum hc_status {
    HC_OK = 0,
    HC_ERR_INVALID_ARGUMENT = 1, /* the caller passed something wrong */
    HC_ERR_NO_MEMORY = 2,
    HC_ERR_TIMEOUT = 3,          /* a peer did not answer within the timeout */
    HC_ERR_PEER_LOST = 4,        /* a peer's connection closed */
    HC_ERR_MISMATCH = 5,         /* ranks issued different collectives */
    HC_ERR_PROTOCOL = 6,         /* a message that is not hetcomm's, or corrupt */
    HC_ERR_ABORTED = 7,          /* this or another rank aborted the communicator */
    HC_ERR_INTERRUPTED = 8,      /* a signal interrupted a blocking wait */
    HC_ERR_TRANSPORT = 9,        /* ZeroMQ or the operating system failed */
    HC_ERR_UNSUPPORTED = 10,     /* dtype, op or codec combination not supported */
    HC_ERR_STATE = 11,           /* not valid in the communicator's current state */
    HC_ERR_AUTH = 12,            /* a peer was refused by the authenticator */
    HC_IN_PROGRESS = 13          /* hc_op_status: not finished yet */
} hc_status;

typedef enum hc_dtype {
    HC_FLOAT32 = 0,
    HC_FLOAT64 = 1,
    HC_FLOAT16 = 2,
    HC_BFLOAT16 = 3,
    HC_INT8 = 4,
    HC_INT16 = 5,
    HC_INT32 = 6,
    HC_INT64 = 7,
    HC_UINT8 = 8,
    HC_BOOL = 9,
    HC_DTYPE_COUNT = 10
} hc_dtype;

typedef enum hc_redop {
    HC_SUM = 0,
    HC_AVG = 1,   /* SUM, then divided by the number of contributors */
    HC_PROD = 2,
    HC_MIN = 3,   /* NaN wins, as in torch */
    HC_MAX = 4,
    HC_BAND = 5,  /* integer and bool dtypes only */
    HC_BOR = 6,
    HC_BXOR = 7,
    HC_REDOP_COUNT = 8
} hc_redop;

typedef enum hc_codec {
    HC_CODEC_NONE = 0,
    HC_CODEC_FP16 = 1,  /* IEEE half, round to nearest even */
    HC_CODEC_BF16 = 2,  /* bfloat16, round to nearest even */
    HC_CODEC_INT8 = 3,  /* blockwise absmax, symmetric [-127, 127] */
    HC_CODEC_INT4 = 4,  /* blockwise absmax, symmetric [-7, 7], two per byte */
    HC_CODEC_1BIT = 5,  /* sign bit, per-block mean |x| scale */
    HC_CODEC_COUNT = 6
} hc_codec;

typedef enum hc_algo {
    HC_ALGO_AUTO = 0,
    HC_ALGO_RING = 1,
    HC_ALGO_RECURSIVE_DOUBLING = 2,
    HC_ALGO_TREE = 3,
    HC_ALGO_HIERARCHICAL = 4,
    HC_ALGO_COUNT = 5
} hc_algo;

typedef enum hc_log_level {
    HC_LOG_ERROR = 40,
    HC_LOG_WARNING = 30,
    HC_LOG_INFO = 20,
    HC_LOG_DEBUG = 10
} hc_log_level;

typedef struct hc_comm hc_comm;
typedef struct hc_op hc_op;

/* Called on the worker thread once an op has finished (status HC_OK or an
 * error). It must not block; the op handle stays valid until released. */
typedef void (*hc_done_fn)(hc_op *op, int status, void *user);

/* Log sink; `level` is an hc_log_level. Called from any hetcomm thread. */
typedef void (*hc_log_fn)(int level, const char *message, void *user);

/* ---- errors --------------------------------------------------------- */

/* "HC_ERR_TIMEOUT" for HC_ERR_TIMEOUT; "HC_ERR_UNKNOWN" for other values. */
const char *hc_status_name(int status);
/* A one-line description of the code itself. */
const char *hc_status_string(int status);
/* The detailed message of the last failing call made by this thread. */
const char *hc_last_error(void);

/* ---- library -------------------------------------------------------- */

/* Resolves libzmq from a shared object that is already loaded in this process
 * (pyzmq's backend module, or libzmq.so itself). Loads it if `load` is
 * non-zero and it is not loaded yet. Idempotent for the same path. */
int hc_init(const char *libzmq_path, int load);
void hc_set_logger(hc_log_fn fn, void *user, int min_level);
size_t hc_dtype_size(int dtype);
const char *hc_dtype_name(int dtype);
const char *hc_redop_name(int op);
const char *hc_codec_name(int codec);
/* Which SIMD level the kernels dispatched to: "avx2", "sse4", "scalar". */
const char *hc_simd_level(void);

/* ---- communicators ---------------------------------------------------- */

typedef struct hc_config {
    uint32_t struct_size;      /* sizeof(hc_config): lets the ABI grow */
    int rank;
    int size;
    const char *name;          /* shown in errors and logs */
    uint64_t comm_id;          /* equal on every rank, unique per communicator */
    uint64_t session_token;    /* equal on every rank; peers that differ are refused */
    void *zmq_context;         /* a ZeroMQ context to use; NULL: hetcomm's own */
    const char *bind_address;  /* "tcp://10.1.2.3" or "ipc:///tmp/dir"; port/name chosen here */
    const char *site;          /* this rank's data centre label ("" = one site) */
    const char *host;          /* this rank's host name */
    int timeout_ms;            /* every blocking wait inside an op */
    int streams;               /* TCP connections per peer in another site */
    size_t chunk_bytes;        /* pipeline granule of the large-message algorithms */
    size_t small_bytes;        /* below this, allreduce uses recursive doubling */
    int algo;                  /* hc_algo for allreduce; HC_ALGO_AUTO picks by size */
    int sndbuf_bytes;          /* SO_SNDBUF on inter-site links; 0: OS default */
    int rcvbuf_bytes;          /* SO_RCVBUF on inter-site links; 0: OS default */
    int codec;                 /* default hc_codec for float SUM/AVG allreduce */
    size_t codec_min_bytes;    /* never compress below this payload */
    uint32_t codec_block;      /* quantization block, elements */
    int codec_scale_fp32;      /* 1: fp32 block scales; 0: fp16 */
    int curve_enable;          /* 1: CurveZMQ on links between sites */
    const char *curve_public_key;  /* Z85, 40 chars: this rank's key pair */
    const char *curve_secret_key;
    int shm_enable;            /* 1: shared-memory lanes to same-host, same-site peers */
    size_t shm_bytes;          /* size of each lane (one per peer and direction) */
    double wan_bandwidth;      /* bytes/s of a link between sites; 0: unknown. With the round
                                  trips measured at connect it raises the size below which
                                  allreduce across sites uses recursive doubling */
    int heartbeat_ms;          /* a peer silent this long is lost (heartbeats go out at a
                                  quarter of it); 0: no heartbeats */
    int spin_us;               /* small collectives on one host: poll this long for a peer
                                  before sleeping on a futex (spinning with a core per rank,
                                  yielding the core without); -1: auto (30, or 50 without) */
    int cma_enable;            /* 1: large collectives between ranks of one host read and write
                                  the peers' buffers directly (process_vm_readv/writev), falling
                                  back to the lanes where the kernel refuses; must match on all
                                  ranks */
    int hugepages;             /* 1: buffers of those collectives get huge pages (their 2 MiB
                                  interior, collapsed when a buffer is used a second time);
                                  this rank's choice alone */
} hc_config;

/* Fills defaults: one stream, 2 MiB chunks, 64 KiB small threshold, 300 s
 * timeout, 5 s heartbeat, no codec, no CURVE, 16 MiB shared-memory lanes to
 * peers on the same host (their `host` equal to ours) and site, large
 * collectives among ranks of one host reading each other's buffers
 * (cma_enable) in huge pages (hugepages). rank and size are -1. */
void hc_config_init(hc_config *cfg);

int hc_comm_create(const hc_config *cfg, hc_comm **out);
/* The endpoint(s) peers connect to: "tcp://host:port" or, with CURVE,
 * "tcp://host:port;tcp://host:port2" (plain;secure). Owned by the comm. */
const char *hc_comm_endpoint(const hc_comm *comm);
/* Tells this rank where rank `peer` listens. `curve_public_key` is the peer's
 * Z85 public key or NULL. Call for every rank except this one. */
int hc_comm_set_peer(hc_comm *comm, int peer, const char *endpoint,
                     const char *site, const char *host,
                     const char *curve_public_key);
/* Connects to every peer, exchanges a greeting with each and times one round
 * trip to each (hc_comm_peer_rtt_ns); returns HC_ERR_TIMEOUT naming the ranks
 * that did not answer in time. */
int hc_comm_connect(hc_comm *comm);
/* Finishes the queued ops, then closes. Safe on a broken communicator. */
int hc_comm_destroy(hc_comm *comm);
/* Fails the current and queued ops with HC_ERR_ABORTED and tells the peers. */
int hc_comm_abort(hc_comm *comm, const char *reason);

int hc_comm_rank(const hc_comm *comm);
int hc_comm_size(const hc_comm *comm);
int hc_comm_site_count(const hc_comm *comm);
/* Round trip to `peer` in nanoseconds, measured once when connecting; -1 for
 * this rank, a bad peer or an unconnected communicator. */
int64_t hc_comm_peer_rtt_ns(const hc_comm *comm, int peer);
/* Index of the site of `rank` (sites numbered by first appearance in rank order). */
int hc_comm_site_of(const hc_comm *comm, int rank);
/* The ring order the large-message algorithms use (sites kept adjacent). */
int hc_comm_ring_order(const hc_comm *comm, int *order, int n);
/* The hc_algo hc_allreduce with default call options runs `count` elements
 * of `dtype` with (by the communicator's settings, sites and WAN estimate);
 * -1 for a bad argument. */
int hc_comm_allreduce_algo(const hc_comm *comm, size_t count, int dtype, int redop);
/* HC_OK while usable; the error that broke it otherwise. */
int hc_comm_status(const hc_comm *comm);
const char *hc_comm_error(const hc_comm *comm);
/* Sequence number of the last collective issued (for torch's debug checks). */
uint64_t hc_comm_seq(const hc_comm *comm);
/* Total payload bytes this rank has put on the wire, and of that how much
 * crossed to another site. */
uint64_t hc_comm_bytes_sent(const hc_comm *comm);
uint64_t hc_comm_bytes_sent_intersite(const hc_comm *comm);
/* Forgets the error-feedback residual of `key` (all keys when 0). */
int hc_comm_reset_residual(hc_comm *comm, uint64_t key);

/* ---- membership: failures, shrink, grow --------------------------------- */

#define HC_SHRINK_DEFAULT 0  /* queued ops finish (or fail) first */
#define HC_SHRINK_ABORT 1    /* queued and running ops are failed locally first */

/* The ranks this rank holds failed, ascending, into ranks[0..n) (*count gets
 * how many there are). Waits up to timeout_ms (0: not at all, -1: forever)
 * for the survivors to agree on the set: HC_OK when they have (or nothing
 * failed), HC_ERR_TIMEOUT when not yet (ranks then hold this rank's view). */
int hc_comm_failed_ranks(hc_comm *comm, int timeout_ms, int *ranks, int n, int *count);
/* Called by every rank not in exclude[0..nexclude), with the same set: a new
 * communicator of the others over the links the old one holds (no new
 * rendezvous), ranks renumbered in order, sites, keys and settings kept.
 * Fails with HC_ERR_MISMATCH if the survivors pass different sets and with
 * HC_ERR_PEER_LOST if a kept rank is lost (shrink again without it). On
 * success the old communicator only fails ops; destroy it as usual. */
int hc_comm_shrink(hc_comm *comm, const int *exclude, int nexclude, int flags, hc_comm **out);
/* Called by every rank of `comm` at the same point (between collectives):
 * a new communicator of new_size > size ranks in which this rank keeps its
 * rank and its links, and ranks size..new_size-1 are newcomers. Give it the
 * newcomers with hc_comm_set_peer, then hc_comm_connect. The newcomers make
 * theirs with hc_comm_create (same comm_id and session_token) and connect to
 * everyone. On success the old communicator only fails ops. If
 * hc_comm_connect then fails (a newcomer never came), the grown communicator
 * keeps the members' links: hc_comm_shrink excluding every newcomer gives
 * back a working communicator of the members. */
int hc_comm_grow(hc_comm *comm, int new_size, uint64_t comm_id, uint64_t session_token, hc_comm **out);

/* ---- ops ------------------------------------------------------------ */

/* Per-call options; NULL everywhere means "the communicator's defaults". */
typedef struct hc_call_opts {
    uint32_t struct_size;      /* sizeof(hc_call_opts) */
    int timeout_ms;            /* HC_TIMEOUT_DEFAULT: the communicator's */
    int algo;                  /* hc_algo, HC_ALGO_AUTO */
    int codec;                 /* -1: communicator default; else hc_codec */
    uint64_t residual_key;     /* != 0: error feedback, residual kept under this key */
    uint64_t sr_seed;          /* != 0: stochastic rounding seeded with this */
    hc_done_fn on_done;
    void *user;
} hc_call_opts;

void hc_call_opts_init(hc_call_opts *opts);

int hc_allreduce(hc_comm *comm, const void *sendbuf, void *recvbuf, size_t count,
                 int dtype, int redop, const hc_call_opts *opts, hc_op **op_out);
int hc_broadcast(hc_comm *comm, void *buf, size_t count, int dtype, int root,
                 const hc_call_opts *opts, hc_op **op_out);
/* recvbuf is used at the root only (may be NULL elsewhere). */
int hc_reduce(hc_comm *comm, const void *sendbuf, void *recvbuf, size_t count,
              int dtype, int redop, int root, const hc_call_opts *opts, hc_op **op_out);
/* recvbuf holds size*count elements, rank r's at r*count. */
int hc_allgather(hc_comm *comm, const void *sendbuf, void *recvbuf, size_t count,
                 int dtype, const hc_call_opts *opts, hc_op **op_out);
/* sendbuf holds size*recvcount elements; rank r receives the reduction of block r. */
int hc_reduce_scatter(hc_comm *comm, const void *sendbuf, void *recvbuf, size_t recvcount,
                      int dtype, int redop, const hc_call_opts *opts, hc_op **op_out);
/* recvbuf (root only) holds size*count elements. */
int hc_gather(hc_comm *comm, const void *sendbuf, void *recvbuf, size_t count,
              int dtype, int root, const hc_call_opts *opts, hc_op **op_out);
/* sendbuf (root only) holds size*count elements. */
int hc_scatter(hc_comm *comm, const void *sendbuf, void *recvbuf, size_t count,
               int dtype, int root, const hc_call_opts *opts, hc_op **op_out);
/* Block r of sendbuf (count elements) goes to rank r. */
int hc_alltoall(hc_comm *comm, const void *sendbuf, void *recvbuf, size_t count,
                int dtype, const hc_call_opts *opts, hc_op **op_out);
/* Counts and displacements in elements, one per rank. */
int hc_alltoallv(hc_comm *comm, const void *sendbuf, const size_t *sendcounts,
                 const size_t *sdispls, void *recvbuf, const size_t *recvcounts,
                 const size_t *rdispls, int dtype, const hc_call_opts *opts,
                 hc_op **op_out);
int hc_barrier(hc_comm *comm, const hc_call_opts *opts, hc_op **op_out);
/* Point-to-point; matched by (source, tag) in send order. */
int hc_send(hc_comm *comm, const void *buf, size_t count, int dtype, int peer,
            int tag, const hc_call_opts *opts, hc_op **op_out);
/* peer may be HC_ANY_SOURCE; hc_op_source tells who sent it. */
int hc_recv(hc_comm *comm, void *buf, size_t count, int dtype, int peer, int tag,
            const hc_call_opts *opts, hc_op **op_out);

/* Blocks until done (its on_done callback, if any, has returned) or
 * `timeout_ms` passes (-1: forever): the op's status, or HC_IN_PROGRESS if
 * it is still running. */
int hc_op_wait(hc_op *op, int timeout_ms);
int hc_op_status(const hc_op *op);
/* The detailed error message of a failed op ("" when it succeeded). */
const char *hc_op_error(const hc_op *op);
/* The rank a receive got its message from. */
int hc_op_source(const hc_op *op);
/* Collective sequence number the op ran as (0 for point-to-point). */
uint64_t hc_op_seq(const hc_op *op);
/* Drops the caller's reference; the op itself runs to completion. */
void hc_op_release(hc_op *op);
/* Runs the queued collectives on the calling thread if the communicator's
 * worker is idle (saves two thread hand-offs when an async op is waited for
 * right away); returns how many ran. Never call it from an hc_done_fn. */
int hc_comm_progress(hc_comm *comm);

/* ---- kernels (pure functions over buffers; also used by the collectives) ---- */

/* dst[i] = a[i] (op) b[i]; dst may alias a or b. AVG reduces as SUM. */
int hc_reduce_kernel(void *dst, const void *a, const void *b, size_t count,
                     int dtype, int redop);
/* buf[i] /= divisor (floats: multiply by 1/divisor in fp32/fp64; integers: truncating division). */
int hc_divide_kernel(void *buf, size_t count, int dtype, int64_t divisor);

typedef struct hc_codec_params {
    uint32_t block;            /* elements per block (int8/int4/1bit); default 256 */
    int scale_fp32;            /* 1: scales stored as fp32; 0: as fp16 */
    uint64_t sr_seed;          /* != 0: stochastic rounding (int8/int4) with this seed */
    uint64_t sr_offset;        /* element index of src[0] in the whole tensor, so
                                  the random stream does not depend on chunking */
} hc_codec_params;

void hc_codec_params_init(hc_codec_params *p);
/* Bytes an encoded run of `count` floats takes (scales included). */
size_t hc_codec_encoded_size(int codec, size_t count, const hc_codec_params *p);
/* Encodes src (fp32). With `residual` (fp32, count long): encodes src+residual
 * and leaves in residual what the encoding lost (error feedback).
 * A block holding NaN or Inf decodes to NaN in every element (never to a
 * finite number); its residual is reset to 0 so one bad step does not poison
 * the next. */
int hc_codec_encode(int codec, const float *src, size_t count, void *dst,
                    float *residual, const hc_codec_params *p);
/* dst = decode(src) */
int hc_codec_decode(int codec, const void *src, size_t count, float *dst,
                    const hc_codec_params *p);
/* acc += decode(src) */
int hc_codec_decode_add(int codec, const void *src, size_t count, float *acc,
                        const hc_codec_params *p);
/* One reduce-scatter hop: dst = encode(decode(src) + local), accumulating in
 * fp32. `sum_out` (may be NULL) receives decode(src) + local. */
int hc_codec_hop(int codec, const void *src, const float *local, size_t count,
                 void *dst, float *sum_out, const hc_codec_params *p);

/* ---- embedding ---------------------------------------------------------- */

/* Every public entry point, for code that receives the table's address
 * instead of linking the core (the torch shim does this). */
typedef struct hc_api {
    uint32_t struct_size;
    const char *(*status_name)(int);
    const char *(*last_error)(void);
    int (*comm_rank)(const hc_comm *);
    int (*comm_size)(const hc_comm *);
    int (*comm_status)(const hc_comm *);
    const char *(*comm_error)(const hc_comm *);
    uint64_t (*comm_seq)(const hc_comm *);
    int (*comm_abort)(hc_comm *, const char *);
    int (*allreduce)(hc_comm *, const void *, void *, size_t, int, int, const hc_call_opts *, hc_op **);
    int (*broadcast)(hc_comm *, void *, size_t, int, int, const hc_call_opts *, hc_op **);
    int (*reduce)(hc_comm *, const void *, void *, size_t, int, int, int, const hc_call_opts *, hc_op **);
    int (*allgather)(hc_comm *, const void *, void *, size_t, int, const hc_call_opts *, hc_op **);
    int (*reduce_scatter)(hc_comm *, const void *, void *, size_t, int, int, const hc_call_opts *, hc_op **);
    int (*gather)(hc_comm *, const void *, void *, size_t, int, int, const hc_call_opts *, hc_op **);
    int (*scatter)(hc_comm *, const void *, void *, size_t, int, int, const hc_call_opts *, hc_op **);
    int (*alltoall)(hc_comm *, const void *, void *, size_t, int, const hc_call_opts *, hc_op **);
    int (*alltoallv)(hc_comm *, const void *, const size_t *, const size_t *, void *,
                     const size_t *, const size_t *, int, const hc_call_opts *, hc_op **);
    int (*barrier)(hc_comm *, const hc_call_opts *, hc_op **);
    int (*send)(hc_comm *, const void *, size_t, int, int, int, const hc_call_opts *, hc_op **);
    int (*recv)(hc_comm *, void *, size_t, int, int, int, const hc_call_opts *, hc_op **);
    int (*op_wait)(hc_op *, int);
    int (*op_status)(const hc_op *);
    const char *(*op_error)(const hc_op *);
    int (*op_source)(const hc_op *);
    void (*op_release)(hc_op *);
    void (*call_opts_init)(hc_call_opts *);
    /* Appended for the torch shim, which owns the communicator it is handed. */
    int (*comm_destroy)(hc_comm *);
    int (*comm_progress)(hc_comm *);
    /* Appended for shrinking process groups. */
    int (*comm_failed_ranks)(hc_comm *, int, int *, int, int *);
    int (*comm_shrink)(hc_comm *, const int *, int, int, hc_comm **);
    /* Appended for HETCOMM_INTRA (which allreduces a site split may compose). */
    int (*comm_allreduce_algo)(const hc_comm *, size_t, int, int);
} hc_api;

const hc_api *hc_get_api(void);

/* HC_CDEF_END */

#ifdef __cplusplus
}
#endif

#endif /* HETCOMM_H */
