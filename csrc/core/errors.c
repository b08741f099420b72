/* Status codes, the per-thread last error, and the log sink. */
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "core/internal.h"

static const struct {
    const char *name;
    const char *text;
} status_table[] = {
    [HC_OK] = {"HC_OK", "success"},
    [HC_ERR_INVALID_ARGUMENT] = {"HC_ERR_INVALID_ARGUMENT", "invalid argument"},
    [HC_ERR_NO_MEMORY] = {"HC_ERR_NO_MEMORY", "out of memory"},
    [HC_ERR_TIMEOUT] = {"HC_ERR_TIMEOUT", "a peer did not answer within the timeout"},
    [HC_ERR_PEER_LOST] = {"HC_ERR_PEER_LOST", "a peer's connection closed"},
    [HC_ERR_MISMATCH] = {"HC_ERR_MISMATCH", "ranks issued different collectives"},
    [HC_ERR_PROTOCOL] = {"HC_ERR_PROTOCOL", "received a message that is not hetcomm's"},
    [HC_ERR_ABORTED] = {"HC_ERR_ABORTED", "the communicator was aborted"},
    [HC_ERR_INTERRUPTED] = {"HC_ERR_INTERRUPTED", "interrupted by a signal"},
    [HC_ERR_TRANSPORT] = {"HC_ERR_TRANSPORT", "transport (ZeroMQ or OS) failure"},
    [HC_ERR_UNSUPPORTED] = {"HC_ERR_UNSUPPORTED", "unsupported combination"},
    [HC_ERR_STATE] = {"HC_ERR_STATE", "invalid in the communicator's current state"},
    [HC_ERR_AUTH] = {"HC_ERR_AUTH", "a peer was refused by authentication"},
    [HC_IN_PROGRESS] = {"HC_IN_PROGRESS", "still in progress"},
};

#define STATUS_COUNT ((int)(sizeof(status_table) / sizeof(status_table[0])))

const char *hc_status_name(int status) {
    return status >= 0 && status < STATUS_COUNT ? status_table[status].name : "HC_ERR_UNKNOWN";
}

const char *hc_status_string(int status) {
    return status >= 0 && status < STATUS_COUNT ? status_table[status].text : "unknown status";
}

static _Thread_local char last_error[HC_ERROR_LEN];

const char *hc_last_error(void) { return last_error; }

void hc_set_last_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
}

/* The sink is swapped rarely (set up and teardown); readers take a snapshot. */
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static hc_log_fn log_fn;
static void *log_user;
static atomic_int log_min_level = 1000; /* nothing until a sink is set */

void hc_set_logger(hc_log_fn fn, void *user, int min_level) {
    pthread_mutex_lock(&log_lock);
    log_fn = fn;
    log_user = user;
    atomic_store(&log_min_level, fn ? min_level : 1000);
    pthread_mutex_unlock(&log_lock);
}

int hc_log_enabled(int level) { return level >= atomic_load_explicit(&log_min_level, memory_order_relaxed); }

void hc_log(int level, const char *fmt, ...) {
    if (!hc_log_enabled(level)) return;
    char line[HC_ERROR_LEN];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&log_lock);
    hc_log_fn fn = log_fn;
    void *user = log_user;
    pthread_mutex_unlock(&log_lock);
    if (fn) fn(level, line, user);
}

int64_t hc_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}
