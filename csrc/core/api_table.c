/* The function table for code that is handed the core's address instead of
 * linking it (the torch shim). Append only: the struct_size tells readers
 * which fields exist. */
#include "core/internal.h"

static const hc_api api = {
    .struct_size = sizeof(hc_api),
    .status_name = hc_status_name,
    .last_error = hc_last_error,
    .comm_rank = hc_comm_rank,
    .comm_size = hc_comm_size,
    .comm_status = hc_comm_status,
    .comm_error = hc_comm_error,
    .comm_seq = hc_comm_seq,
    .comm_abort = hc_comm_abort,
    .allreduce = hc_allreduce,
    .broadcast = hc_broadcast,
    .reduce = hc_reduce,
    .allgather = hc_allgather,
    .reduce_scatter = hc_reduce_scatter,
    .gather = hc_gather,
    .scatter = hc_scatter,
    .alltoall = hc_alltoall,
    .alltoallv = hc_alltoallv,
    .barrier = hc_barrier,
    .send = hc_send,
    .recv = hc_recv,
    .op_wait = hc_op_wait,
    .op_status = hc_op_status,
    .op_error = hc_op_error,
    .op_source = hc_op_source,
    .op_release = hc_op_release,
    .call_opts_init = hc_call_opts_init,
    .comm_destroy = hc_comm_destroy,
    .comm_progress = hc_comm_progress,
    .comm_failed_ranks = hc_comm_failed_ranks,
    .comm_shrink = hc_comm_shrink,
    .comm_allreduce_algo = hc_comm_allreduce_algo,
};

const hc_api *hc_get_api(void) { return &api; }
