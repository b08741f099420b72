/*
 * Shared-memory mailboxes: small collectives between ranks on one host
 * without a socket on the path.
 *
 * A ZeroMQ round trip costs tens of microseconds (two I/O threads on each
 * side); a lane slot still needs its header sent over ZeroMQ. A mailbox
 * carries header and payload together in memory both ranks map, and the
 * receiver is woken by a futex on that memory, so a small collective costs
 * one wake-up per peer.
 *
 * A mailbox belongs to one (sender, receiver) pair and has two slots, used
 * by collective sequence number parity. Each slot has a `ready` word (the
 * sender publishes the low 32 bits of the sequence number after filling it)
 * and an `ack` word (the receiver echoes that value when done with it); the
 * sender reuses a slot only once ack equals ready. Each word has a flag the
 * waiter raises before sleeping, so a publisher makes the futex call only
 * when someone sleeps.
 */
#ifndef HC_MAILBOX_H
#define HC_MAILBOX_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "transport/wire.h"

#define HC_MBOX_SLOTS 2
/* Payload bytes a slot holds: the largest small collective's per-peer part. */
#define HC_MBOX_SLOT_BYTES (64u << 10)

typedef struct hc_mbox_word {
    _Atomic uint32_t value;
    _Atomic uint32_t sleeping;
} hc_mbox_word;

typedef struct hc_mbox_slot {
    hc_wire_header h; /* the sender's call, as on the wire; h.len payload bytes */
    hc_mbox_word ready __attribute__((aligned(64)));
    hc_mbox_word ack __attribute__((aligned(64)));
    uint8_t data[] __attribute__((aligned(64)));
} hc_mbox_slot;

typedef struct hc_mbox {
    char name[64];
    uint8_t *base;
    size_t map_bytes;
    size_t slot_bytes;
    int linked; /* the name still exists in /dev/shm */
} hc_mbox;

/* Creates the mailbox `name`. NULL on failure. */
hc_mbox *hc_mbox_create(const char *name);
/* Maps a mailbox another process created and removes its name. NULL on failure. */
hc_mbox *hc_mbox_attach(const char *name);
void hc_mbox_close(hc_mbox *mb);
/* The slot collective `seq` uses. */
hc_mbox_slot *hc_mbox_slot_for(hc_mbox *mb, uint64_t seq);
/* Stores `v` into the word and wakes its waiter if one sleeps. */
void hc_mbox_post(hc_mbox_word *w, uint32_t v);
/* Sleeps until the word holds `want` or `timeout_us` passed: 1 when it
 * holds `want`, 0 on timeout, -1 when a signal interrupted the sleep. */
int hc_mbox_sleep(hc_mbox_word *w, uint32_t want, long timeout_us);
static inline int hc_mbox_holds(hc_mbox_word *w, uint32_t want) {
    return atomic_load_explicit(&w->value, memory_order_acquire) == want;
}

#endif
