/*
 * What travels on the wire. Every ZeroMQ message hetcomm sends starts with
 * this header, so a receiver can tell a stray or mismatched message from the
 * one it waits for and say exactly which calls disagreed.
 *
 * A message is either one frame (header + inline payload, for small payloads
 * that are cheaper to copy than to track) or two frames (header, then the
 * payload sent zero-copy from the caller's buffer).
 */
#ifndef HC_WIRE_H
#define HC_WIRE_H

#include <stdint.h>

#define HC_WIRE_MAGIC 0x314d4348u /* "HCM1" little-endian */
#define HC_WIRE_VERSION 3

/*
 * Data-plane kinds travel on a peer's data streams; the control kinds on its
 * control connection (a socket of their own, so a heartbeat or a fault
 * notice never waits behind megabytes of data, and an idle rank can watch
 * them without touching the data inboxes).
 */
typedef enum hc_msg_kind {
    HC_MSG_HELLO = 1, /* greeting on each stream after connecting */
    HC_MSG_DATA = 2,  /* part of a collective */
    HC_MSG_P2P = 3,   /* a point-to-point send */
    HC_MSG_ABORT = 4, /* control: the sender broke the communicator; payload: reason */
    HC_MSG_READY = 5, /* after all greetings: which shared-memory lanes work */
    HC_MSG_CREDIT = 6, /* a lane slot was freed while its sender waited for one */
    HC_MSG_PING = 7,   /* control, after the greetings: count = sender's clock, echoed by */
    HC_MSG_PONG = 8,   /* the reply, so the sender measures the round trip */
    HC_MSG_LINKS = 9,  /* control, after the pongs: count = the sender's WAN in-flight estimate (bytes) */
    HC_MSG_HEARTBEAT = 10, /* control: the sender is alive */
    HC_MSG_BYE = 11,   /* control, at destroy: the sender closes on purpose (not a crash) */
    HC_MSG_FAULT = 12, /* control: payload = bitmap of the ranks the sender holds failed */
    HC_MSG_DECIDE = 13, /* control, from the coordinator: payload = the agreed failed bitmap */
    HC_MSG_RESHAPE = 14, /* control: the sender entered a shrink or grow; count = the new communicator's
                            id, root = its size, payload = bitmap of the ranks it keeps */
} hc_msg_kind;

enum {
    HC_WIRE_INLINE = 1, /* payload follows the header in the same frame */
    HC_WIRE_SHM = 2,    /* payload is in slot `reserved` of the sender's lane (HELLO/READY: lane offered/mapped) */
    HC_WIRE_ARENA = 4,  /* HELLO from rank 0: the arena is offered; LINKS: the sender mapped it */
};

typedef struct hc_wire_header {
    uint32_t magic;
    uint8_t version;
    uint8_t kind;   /* hc_msg_kind */
    uint8_t op;     /* hc_op_kind of the sender's call */
    uint8_t dtype;
    uint8_t redop;
    uint8_t codec;
    uint8_t flags;
    uint8_t algo;
    int32_t src;    /* sender rank */
    int32_t root;   /* root of rooted collectives, tag of p2p, status of ABORT */
    uint32_t reserved0;
    uint64_t comm_id;
    uint64_t seq;   /* collective sequence number; session token in HELLO */
    uint64_t count; /* element count of the sender's call */
    uint32_t part;  /* message index within the op, per (sender, receiver) */
    uint32_t reserved;
    uint64_t len;   /* payload bytes */
} hc_wire_header;

_Static_assert(sizeof(hc_wire_header) == 64, "wire header layout changed");
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
               "the wire format is little-endian; big-endian hosts need byte swaps");

#endif
