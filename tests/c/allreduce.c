/* A C program using hetcomm through its C ABI alone (no Python, no torch).
 * Usage: allreduce RANK SIZE LIBZMQ_PATH. Prints its endpoint, then reads
 * "rank endpoint" lines for every other rank on stdin (the test is the
 * rendezvous), runs collectives and prints OK. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hetcomm.h"

#define CHECK(call)                                                                        \
    do {                                                                                   \
        int rc_ = (call);                                                                  \
        if (rc_ != HC_OK) {                                                                \
            fprintf(stderr, "%s: %s: %s\n", #call, hc_status_name(rc_), hc_last_error()); \
            return 1;                                                                      \
        }                                                                                  \
    } while (0)

int main(int argc, char **argv) {
    if (argc != 4) return 2;
    int rank = atoi(argv[1]), size = atoi(argv[2]);
    CHECK(hc_init(argv[3], 1));
    hc_config cfg;
    hc_config_init(&cfg);
    cfg.rank = rank;
    cfg.size = size;
    cfg.name = "c-demo";
    cfg.comm_id = 0x1234;
    cfg.session_token = 0x5678;
    cfg.host = "c-demo-host";
    cfg.timeout_ms = 20000;
    hc_comm *comm;
    CHECK(hc_comm_create(&cfg, &comm));
    printf("%s\n", hc_comm_endpoint(comm));
    fflush(stdout);
    for (int i = 0; i < size - 1; i++) {
        int peer;
        char endpoint[1024];
        if (scanf("%d %1023s", &peer, endpoint) != 2) return 3;
        CHECK(hc_comm_set_peer(comm, peer, endpoint, "", "c-demo-host", NULL));
    }
    CHECK(hc_comm_connect(comm));

    enum { N = 100003 };
    float *x = malloc(N * sizeof(float)), *all = malloc((size_t)N * size * sizeof(float));
    for (int i = 0; i < N; i++) x[i] = (float)(rank + 1) * (float)(i % 7);
    CHECK(hc_allreduce(comm, x, x, N, HC_FLOAT32, HC_SUM, NULL, NULL)); /* blocking */
    for (int i = 0; i < N; i++)
        if (x[i] != (float)(size * (size + 1) / 2) * (float)(i % 7)) {
            fprintf(stderr, "allreduce: x[%d] = %g\n", i, x[i]);
            return 4;
        }
    hc_op *op;
    CHECK(hc_allgather(comm, x, all, N, HC_FLOAT32, NULL, &op)); /* asynchronous */
    CHECK(hc_op_wait(op, -1));
    hc_op_release(op);
    if (memcmp(all + (size_t)(size - 1) * N, x, N * sizeof(float)) != 0) return 5;

    /* Bad input is refused with a named error before anything is sent. */
    int rc = hc_broadcast(comm, x, N, HC_FLOAT32, size + 3, NULL, NULL);
    printf("%s %s\n", hc_status_name(rc), hc_last_error());
    CHECK(hc_comm_destroy(comm));
    free(x);
    free(all);
    printf("OK\n");
    return 0;
}
