/* Embedding hetcomm in a C program: no Python, no torch, only csrc/hetcomm.h.
 *
 *   embed_allreduce RANK SIZE SITE HOST:PORT LIBZMQ
 *
 * Rendezvous is the program's own business: here rank 0 listens on HOST:PORT,
 * every other rank sends it "rank site endpoint", and rank 0 answers each with
 * the whole table. Then every rank runs
 *   1. an exact float32 allreduce (checked element by element),
 *   2. an int8-compressed allreduce with error feedback, asynchronous with a
 *      completion callback, checked against the codec's bound, and
 *   3. a MIN/MAX allreduce of a hash of that result, which shows that every
 *      rank holds the same bits.
 * Ranks with different SITE labels talk as different data centres (several
 * TCP streams per peer, compression only on the links between sites).
 * run.sh builds it against hetcomm.get_include()/get_library_dir() and starts
 * the ranks. */
#include <arpa/inet.h>
#include <math.h>
#include <netdb.h>
#include <semaphore.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "hetcomm.h"

#define CHECK(call)                                                                        \
    do {                                                                                   \
        int rc_ = (call);                                                                  \
        if (rc_ != HC_OK) {                                                                \
            fprintf(stderr, "%s: %s: %s\n", #call, hc_status_name(rc_), hc_last_error()); \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

enum { MAX_LINE = 1024, N = 1 << 18 };

typedef struct peer_info {
    char site[64];
    char endpoint[MAX_LINE];
} peer_info;

static void die(const char *what) {
    perror(what);
    exit(1);
}

/* Reads one '\n'-terminated line from a socket (no buffering beyond the line). */
static int read_line(int fd, char *buf, size_t cap) {
    size_t n = 0;
    while (n + 1 < cap) {
        ssize_t k = recv(fd, buf + n, 1, 0);
        if (k <= 0) return -1;
        if (buf[n] == '\n') break;
        n++;
    }
    buf[n] = '\0';
    return (int)n;
}

static int open_socket(const char *host, const char *port, int listening) {
    struct addrinfo hints = {0}, *res;
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = listening ? AI_PASSIVE : 0;
    if (getaddrinfo(host, port, &hints, &res) != 0) die("getaddrinfo");
    int fd = socket(res->ai_family, res->ai_socktype, 0);
    if (fd < 0) die("socket");
    if (listening) {
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, res->ai_addr, res->ai_addrlen) != 0 || listen(fd, 64) != 0) die("bind/listen");
    } else {
        /* Rank 0 may not listen yet: retry for up to 30 s, as a store client does. */
        struct timespec pause = {0, 50 * 1000 * 1000};
        int tries = 0;
        while (connect(fd, res->ai_addr, res->ai_addrlen) != 0) {
            if (++tries > 600) die("connect to rank 0");
            nanosleep(&pause, NULL);
            close(fd);
            fd = socket(res->ai_family, res->ai_socktype, 0);
        }
    }
    freeaddrinfo(res);
    return fd;
}

/* Fills table[0..size) with every rank's site and endpoint. */
static void rendezvous(int rank, int size, const char *site, const char *endpoint, const char *addr,
                       peer_info *table) {
    char host[256], line[MAX_LINE + 128];
    const char *colon = strrchr(addr, ':');
    if (!colon || (size_t)(colon - addr) >= sizeof host) {
        fprintf(stderr, "bad HOST:PORT %s\n", addr);
        exit(2);
    }
    memcpy(host, addr, (size_t)(colon - addr));
    host[colon - addr] = '\0';
    snprintf(table[rank].site, sizeof table[rank].site, "%s", site);
    snprintf(table[rank].endpoint, sizeof table[rank].endpoint, "%s", endpoint);
    if (rank == 0) {
        int srv = open_socket(host, colon + 1, 1), *fds = calloc((size_t)size, sizeof(int));
        for (int i = 1; i < size; i++) {
            int fd = accept(srv, NULL, NULL), r;
            if (fd < 0 || read_line(fd, line, sizeof line) < 0) die("rendezvous: accept/read");
            char s[64], e[MAX_LINE];
            if (sscanf(line, "%d %63s %1023s", &r, s, e) != 3 || r <= 0 || r >= size || fds[r]) {
                fprintf(stderr, "rendezvous: bad greeting %s\n", line);
                exit(2);
            }
            fds[r] = fd;
            snprintf(table[r].site, sizeof table[r].site, "%s", s);
            snprintf(table[r].endpoint, sizeof table[r].endpoint, "%s", e);
        }
        for (int r = 1; r < size; r++) {
            for (int q = 0; q < size; q++) {
                int len = snprintf(line, sizeof line, "%d %s %s\n", q, table[q].site, table[q].endpoint);
                if (send(fds[r], line, (size_t)len, 0) != len) die("rendezvous: send");
            }
            close(fds[r]);
        }
        close(srv);
        free(fds);
    } else {
        int fd = open_socket(host, colon + 1, 0);
        int len = snprintf(line, sizeof line, "%d %s %s\n", rank, site, endpoint);
        if (send(fd, line, (size_t)len, 0) != len) die("rendezvous: send");
        for (int i = 0; i < size; i++) {
            int q;
            char s[64], e[MAX_LINE];
            if (read_line(fd, line, sizeof line) < 0 || sscanf(line, "%d %63s %1023s", &q, s, e) != 3 ||
                q < 0 || q >= size) {
                fprintf(stderr, "rendezvous: bad table line\n");
                exit(2);
            }
            snprintf(table[q].site, sizeof table[q].site, "%s", s);
            snprintf(table[q].endpoint, sizeof table[q].endpoint, "%s", e);
        }
        close(fd);
    }
}

typedef struct completion {
    sem_t done;
    int status;
} completion;

static void on_done(hc_op *op, int status, void *user) {
    /* Runs on the communicator's worker thread: record and signal, never block. */
    (void)op;
    completion *c = user;
    c->status = status;
    sem_post(&c->done);
}

static int64_t hash_bits(const float *x, size_t n) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a over the bytes */
    const unsigned char *p = (const unsigned char *)x;
    for (size_t i = 0; i < n * sizeof(float); i++) h = (h ^ p[i]) * 1099511628211ull;
    return (int64_t)(h >> 1);
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s RANK SIZE SITE HOST:PORT LIBZMQ\n", argv[0]);
        return 2;
    }
    int rank = atoi(argv[1]), size = atoi(argv[2]);
    const char *site = argv[3];
    CHECK(hc_init(argv[5], 1));

    hc_config cfg;
    hc_config_init(&cfg);
    cfg.rank = rank;
    cfg.size = size;
    cfg.name = "embed-example";
    cfg.comm_id = 0xE4A3;
    cfg.session_token = 0x5EED;
    cfg.site = site;
    cfg.host = site; /* one emulated host per site: shared memory only inside a site */
    cfg.bind_address = "tcp://127.0.0.1";
    cfg.streams = 4;
    cfg.timeout_ms = 30000;
    hc_comm *comm;
    CHECK(hc_comm_create(&cfg, &comm));

    peer_info *table = calloc((size_t)size, sizeof *table);
    rendezvous(rank, size, site, hc_comm_endpoint(comm), argv[4], table);
    for (int q = 0; q < size; q++)
        if (q != rank) CHECK(hc_comm_set_peer(comm, q, table[q].endpoint, table[q].site, table[q].site, NULL));
    CHECK(hc_comm_connect(comm));

    /* 1. exact: small integers sum exactly in float32 */
    float *x = malloc(N * sizeof(float));
    for (int i = 0; i < N; i++) x[i] = (float)(rank + 1) * (float)(i % 7 - 3);
    CHECK(hc_allreduce(comm, x, x, N, HC_FLOAT32, HC_SUM, NULL, NULL)); /* NULL op_out: blocking */
    float tri = (float)(size * (size + 1) / 2);
    for (int i = 0; i < N; i++)
        if (x[i] != tri * (float)(i % 7 - 3)) {
            fprintf(stderr, "rank %d: exact allreduce x[%d] = %g, expected %g\n", rank, i, x[i],
                    tri * (float)(i % 7 - 3));
            return 4;
        }

    /* 2. int8 across sites with error feedback, asynchronous with a callback */
    for (int i = 0; i < N; i++) x[i] = (float)(rank + 1) * (float)(i % 7 - 3);
    hc_call_opts opts;
    hc_call_opts_init(&opts);
    opts.codec = HC_CODEC_INT8;
    opts.residual_key = 1;
    completion c = {.status = -1};
    sem_init(&c.done, 0, 0);
    opts.on_done = on_done;
    opts.user = &c;
    hc_op *op;
    CHECK(hc_allreduce(comm, x, x, N, HC_FLOAT32, HC_SUM, &opts, &op));
    hc_op_release(op); /* the op runs on; the callback tells when it is done */
    /* ... the program could compute here while the allreduce runs ... */
    while (sem_wait(&c.done) != 0) {
    } /* EINTR: wait again */
    sem_destroy(&c.done);
    if (c.status != HC_OK) {
        fprintf(stderr, "rank %d: int8 allreduce: %s\n", rank, hc_status_name(c.status));
        return 5;
    }
    /* Bound: up to `size` partial sums of magnitude <= size*M quantized, M = 3*size, eps = 1/254 */
    double bound = 2.0 * size * size * 3.0 * size / 254.0, worst = 0;
    for (int i = 0; i < N; i++) worst = fmax(worst, fabs(x[i] - tri * (float)(i % 7 - 3)));
    if (worst > bound) {
        fprintf(stderr, "rank %d: int8 error %g above the bound %g\n", rank, worst, bound);
        return 6;
    }

    /* 3. every rank holds the same bits: MIN and MAX of a hash agree */
    int64_t h = hash_bits(x, N), lo, hi;
    CHECK(hc_allreduce(comm, &h, &lo, 1, HC_INT64, HC_MIN, NULL, NULL));
    CHECK(hc_allreduce(comm, &h, &hi, 1, HC_INT64, HC_MAX, NULL, NULL));
    if (lo != hi) {
        fprintf(stderr, "rank %d: ranks hold different results\n", rank);
        return 7;
    }
    printf("rank %d (site %s of %d sites): exact allreduce ok; int8 allreduce max error %.3g (bound %.3g), "
           "identical on all ranks; %llu of %llu bytes sent crossed sites\n",
           rank, site, hc_comm_site_count(comm), worst, bound,
           (unsigned long long)hc_comm_bytes_sent_intersite(comm), (unsigned long long)hc_comm_bytes_sent(comm));
    CHECK(hc_comm_destroy(comm));
    free(table);
    free(x);
    return 0;
}
