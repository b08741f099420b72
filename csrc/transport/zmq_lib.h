/*
 * The slice of the libzmq API hetcomm uses, resolved at run time.
 *
 * The core never links libzmq: pyzmq's wheel carries its own copy (under a
 * hashed name that changes between builds), and a second copy in the process
 * could not share sockets or contexts with the first. hc_zmq_load() finds the
 * functions in a shared object that is already loaded (pyzmq's backend
 * module) and fills this table. Prototypes and constants are declared here by
 * hand, from the stable libzmq 4.x ABI, so no zmq.h is needed to build.
 */
#ifndef HC_ZMQ_LIB_H
#define HC_ZMQ_LIB_H

#include <stddef.h>
#include <stdint.h>

typedef struct hc_zmq_msg {
    unsigned char _[64] __attribute__((aligned(sizeof(void *))));
} hc_zmq_msg;

typedef struct hc_zmq_pollitem {
    void *socket;
    int fd;
    short events;
    short revents;
} hc_zmq_pollitem;

typedef void(hc_zmq_free_fn)(void *data, void *hint);

enum {
    HC_ZMQ_PAIR = 0,
    HC_ZMQ_PULL = 7,
    HC_ZMQ_PUSH = 8,

    HC_ZMQ_DONTWAIT = 1,
    HC_ZMQ_SNDMORE = 2,
    HC_ZMQ_POLLIN = 1,

    HC_ZMQ_IO_THREADS = 1,
    HC_ZMQ_SNDBUF = 11,
    HC_ZMQ_RCVBUF = 12,
    HC_ZMQ_RCVMORE = 13,
    HC_ZMQ_LINGER = 17,
    HC_ZMQ_RECONNECT_IVL = 18,
    HC_ZMQ_MAXMSGSIZE = 22,
    HC_ZMQ_SNDHWM = 23,
    HC_ZMQ_RCVHWM = 24,
    HC_ZMQ_FD = 14,
    HC_ZMQ_LAST_ENDPOINT = 32,
    HC_ZMQ_TCP_KEEPALIVE = 34,
    HC_ZMQ_IMMEDIATE = 39,
    HC_ZMQ_CURVE_SERVER = 47,
    HC_ZMQ_CURVE_PUBLICKEY = 48,
    HC_ZMQ_CURVE_SECRETKEY = 49,
    HC_ZMQ_CURVE_SERVERKEY = 50,
    HC_ZMQ_ZAP_DOMAIN = 55,
    HC_ZMQ_HANDSHAKE_IVL = 66,

    HC_ZMQ_EVENT_DISCONNECTED = 0x0200,
    HC_ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL = 0x0800,
    HC_ZMQ_EVENT_HANDSHAKE_SUCCEEDED = 0x1000,
    HC_ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL = 0x2000,
    HC_ZMQ_EVENT_HANDSHAKE_FAILED_AUTH = 0x4000,

    HC_ZMQ_ETERM = 156384712 + 53,
};

typedef struct hc_zmq_api {
    void *(*ctx_new)(void);
    int (*ctx_set)(void *, int, int);
    int (*ctx_term)(void *);
    void *(*socket)(void *, int);
    int (*close)(void *);
    int (*setsockopt)(void *, int, const void *, size_t);
    int (*getsockopt)(void *, int, void *, size_t *);
    int (*bind)(void *, const char *);
    int (*connect)(void *, const char *);
    int (*send)(void *, const void *, size_t, int);
    int (*socket_monitor)(void *, const char *, int);
    int (*msg_init)(hc_zmq_msg *);
    int (*msg_init_size)(hc_zmq_msg *, size_t);
    int (*msg_init_data)(hc_zmq_msg *, void *, size_t, hc_zmq_free_fn *, void *);
    int (*msg_send)(hc_zmq_msg *, void *, int);
    int (*msg_recv)(hc_zmq_msg *, void *, int);
    int (*msg_close)(hc_zmq_msg *);
    int (*msg_copy)(hc_zmq_msg *, hc_zmq_msg *);
    void *(*msg_data)(hc_zmq_msg *);
    size_t (*msg_size)(const hc_zmq_msg *);
    int (*msg_more)(const hc_zmq_msg *);
    const char *(*msg_gets)(const hc_zmq_msg *, const char *);
    int (*poll)(hc_zmq_pollitem *, int, long);
    int (*errno_)(void);
    const char *(*strerror)(int);
    void (*version)(int *, int *, int *);
} hc_zmq_api;

/* The process-wide table; valid once hc_zmq_load() succeeded. */
extern hc_zmq_api hc_zmq;

/* Returns HC_OK or an hc_status; the message goes to hc_last_error(). */
int hc_zmq_load(const char *path, int load);
int hc_zmq_loaded(void);

#endif
