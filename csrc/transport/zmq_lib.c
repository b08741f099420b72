#include "transport/zmq_lib.h"

#include <dlfcn.h>
#include <pthread.h>
#include <string.h>

#include "core/internal.h"

hc_zmq_api hc_zmq;

static pthread_mutex_t load_lock = PTHREAD_MUTEX_INITIALIZER;
static int loaded;

#define RESOLVE(field, symbol)                                                    \
    do {                                                                          \
        *(void **)(&table.field) = dlsym(handle, symbol);                         \
        if (!table.field) {                                                       \
            hc_set_last_error("hc_init: %s has no symbol %s; is it libzmq 4.x?", \
                              path, symbol);                                      \
            return HC_ERR_INVALID_ARGUMENT;                                       \
        }                                                                         \
    } while (0)

static int resolve_all(void *handle, const char *path) {
    hc_zmq_api table;
    RESOLVE(ctx_new, "zmq_ctx_new");
    RESOLVE(ctx_set, "zmq_ctx_set");
    RESOLVE(ctx_term, "zmq_ctx_term");
    RESOLVE(socket, "zmq_socket");
    RESOLVE(close, "zmq_close");
    RESOLVE(setsockopt, "zmq_setsockopt");
    RESOLVE(getsockopt, "zmq_getsockopt");
    RESOLVE(bind, "zmq_bind");
    RESOLVE(connect, "zmq_connect");
    RESOLVE(send, "zmq_send");
    RESOLVE(socket_monitor, "zmq_socket_monitor");
    RESOLVE(msg_init, "zmq_msg_init");
    RESOLVE(msg_init_size, "zmq_msg_init_size");
    RESOLVE(msg_init_data, "zmq_msg_init_data");
    RESOLVE(msg_send, "zmq_msg_send");
    RESOLVE(msg_recv, "zmq_msg_recv");
    RESOLVE(msg_close, "zmq_msg_close");
    RESOLVE(msg_copy, "zmq_msg_copy");
    RESOLVE(msg_data, "zmq_msg_data");
    RESOLVE(msg_size, "zmq_msg_size");
    RESOLVE(msg_more, "zmq_msg_more");
    RESOLVE(msg_gets, "zmq_msg_gets");
    RESOLVE(poll, "zmq_poll");
    RESOLVE(errno_, "zmq_errno");
    RESOLVE(strerror, "zmq_strerror");
    RESOLVE(version, "zmq_version");
    int major = 0, minor = 0, patch = 0;
    table.version(&major, &minor, &patch);
    if (major != 4) {
        hc_set_last_error("hc_init: %s is libzmq %d.%d.%d; hetcomm needs 4.x", path, major,
                          minor, patch);
        return HC_ERR_UNSUPPORTED;
    }
    hc_zmq = table;
    return HC_OK;
}

int hc_zmq_load(const char *path, int load) {
    if (!path || !*path) {
        hc_set_last_error("hc_init: libzmq_path is empty");
        return HC_ERR_INVALID_ARGUMENT;
    }
    pthread_mutex_lock(&load_lock);
    int rc = HC_OK;
    if (!loaded) {
        /* RTLD_NOLOAD first: the library pyzmq already loaded must be the one
         * we use, never a second copy. */
        void *handle = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
        if (!handle && load) handle = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
        if (!handle) {
            hc_set_last_error("hc_init: cannot open %s (%s)%s", path, dlerror(),
                              load ? "" : "; it must already be loaded (import zmq first)");
            rc = HC_ERR_INVALID_ARGUMENT;
        } else {
            rc = resolve_all(handle, path);
            if (rc == HC_OK) loaded = 1;
        }
    }
    pthread_mutex_unlock(&load_lock);
    return rc;
}

int hc_zmq_loaded(void) {
    pthread_mutex_lock(&load_lock);
    int v = loaded;
    pthread_mutex_unlock(&load_lock);
    return v;
}
