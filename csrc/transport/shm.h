/*
 * Shared-memory lanes: payload carriers between ranks on one host.
 *
 * Over TCP loopback every byte is copied into the kernel and out again; a
 * lane lets the sender copy a payload once into memory the receiver maps,
 * while the small header still travels over ZeroMQ, so ordering, matching,
 * aborts and dead-peer detection work exactly as for remote peers.
 *
 * A lane belongs to one (sender, receiver) pair and holds fixed slots of
 * chunk size. The sender takes a free slot (or, when all are busy, sends the
 * payload over the socket instead, so it never blocks); the receiver frees
 * the slot when it releases the message. Slots are freed in any order.
 */
#ifndef HC_SHM_H
#define HC_SHM_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

typedef struct hc_lane {
    char name[64];
    uint8_t *base;
    size_t map_bytes;
    uint32_t nslots;
    size_t slot_bytes;
    _Atomic uint32_t *states; /* one per slot, a cache line apart */
    _Atomic uint32_t *waiting; /* the sender found no free slot and waits for a credit */
    uint8_t *data;
    uint32_t cursor;          /* sender: where to look for a free slot first */
    int linked;               /* the name still exists in /dev/shm */
} hc_lane;

/* Creates and maps `bytes` of zero-filled shared memory called `name`. NULL on failure. */
uint8_t *hc_shm_map_new(const char *name, size_t bytes);
/* Maps shared memory another process created: reads its first `head_len`
 * bytes into `head`, maps bytes_of(head) bytes (0: refuse), sets *bytes and
 * removes the name unless `keep_name` (others still attach). NULL on failure. */
uint8_t *hc_shm_map_existing(const char *name, void *head, size_t head_len, size_t (*bytes_of)(const void *head),
                             size_t *bytes, int keep_name);
/* Creates the lane `name` with `nslots` slots of `slot_bytes`. NULL on failure. */
hc_lane *hc_lane_create(const char *name, uint32_t nslots, size_t slot_bytes);
/* Maps a lane another process created and removes its name. NULL on failure. */
hc_lane *hc_lane_attach(const char *name);
void hc_lane_close(hc_lane *lane);
/* A free slot's index, or -1 when all are in use. */
int hc_lane_take(hc_lane *lane);
/* The sender filled the slot: publish it. */
void hc_lane_fill(hc_lane *lane, int slot);
/* The receiver: a filled slot's bytes, or NULL if `slot` is not filled. */
const uint8_t *hc_lane_read(hc_lane *lane, uint32_t slot);
/* The receiver is done with a slot. Returns 1 when the sender was waiting
 * for one and must be told (the flag is cleared). */
int hc_lane_release(hc_lane *lane, uint32_t slot);
/* The sender will wait for a credit; call hc_lane_take again afterwards, in
 * case a slot was freed in between (then no credit comes). */
void hc_lane_want_slot(hc_lane *lane);
static inline uint8_t *hc_lane_slot(hc_lane *lane, int slot) { return lane->data + (size_t)slot * lane->slot_bytes; }

#endif
