/*
 * The shared-memory arena: small collectives between the ranks of one host
 * without a socket on the path.
 *
 * A ZeroMQ round trip costs tens of microseconds (two I/O threads on each
 * side). The arena is one mapping all ranks of a communicator share: each
 * rank has a slot for its input (with the wire header of its call), and a
 * collective is an arrival barrier over those slots. Every rank copies its
 * input into its slot and counts itself in; the last to arrive publishes the
 * sequence number on the region's generation word and wakes every sleeper
 * with one futex call. Then each rank reads the slots it needs. A rank
 * therefore sleeps at most once per collective, however many ranks there
 * are.
 *
 * Two regions, used by sequence number parity. Each rank counts itself out
 * of a region when it is done reading it; the last one out publishes that
 * the region is free. A rank fills its slot for collective s+2 only once
 * every rank left s. When small collectives follow each other this never
 * waits (finishing s+1 means every rank arrived at s+1, so left s); it
 * matters when a collective in between ran over the sockets and let a rank
 * finish early (a broadcast root, say).
 */
#ifndef HC_ARENA_H
#define HC_ARENA_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "transport/wire.h"

#define HC_ARENA_REGIONS 2
/* Input bytes a slot holds: the largest small collective's input. */
#define HC_ARENA_SLOT_BYTES (64u << 10)

/* A futex word in shared memory with a count of its sleepers, so a
 * publisher makes the futex call only when someone sleeps. */
typedef struct hc_shm_word {
    _Atomic uint32_t value;
    _Atomic uint32_t sleepers;
} hc_shm_word;

typedef struct hc_arena_slot {
    hc_wire_header h; /* the rank's call, as on the wire; h.len payload bytes */
    _Atomic uint32_t posted; /* low 32 bits of h.seq, stored once the slot is filled */
    /* sent[r]: collective messages this rank had sent rank r over the sockets */
    uint32_t sent[] __attribute__((aligned(4)));
} hc_arena_slot;

typedef struct hc_arena {
    char name[64];
    uint8_t *base;
    size_t map_bytes;
    int nranks;
    size_t slot_stride;
    int linked; /* the name still exists in /dev/shm */
} hc_arena;

/* Creates the arena `name` for `nranks` ranks. NULL on failure. */
hc_arena *hc_arena_create(const char *name, int nranks);
/* Maps an arena another process created (its name stays until hc_arena_unlink). NULL on failure. */
hc_arena *hc_arena_attach(const char *name, int nranks);
/* Removes the name: every rank has mapped it. */
void hc_arena_unlink(hc_arena *a);
void hc_arena_close(hc_arena *a);
/* Rank `rank`'s slot in the region of collective `seq`, and its payload. */
hc_arena_slot *hc_arena_slot_of(hc_arena *a, uint64_t seq, int rank);
static inline uint8_t *hc_arena_data(hc_arena *a, hc_arena_slot *s) {
    return (uint8_t *)s + ((sizeof(hc_arena_slot) + (size_t)a->nranks * 4 + 63) & ~(size_t)63);
}
/* Counts this rank in for collective `seq`: 1 when it is the last of all
 * ranks (then it must call hc_arena_publish), else 0. */
int hc_arena_arrive(hc_arena *a, uint64_t seq);
/* Counts a rank that gives up waiting out again, so a rank arriving later
 * waits too instead of reading slots (and buffers) it has let go of: 1 when
 * withdrawn, 0 when every rank had arrived already (the collective goes on). */
int hc_arena_withdraw(hc_arena *a, uint64_t seq);
/* The last rank arrived: publishes `seq` on the generation word and wakes the sleepers. */
void hc_arena_publish(hc_arena *a, uint64_t seq);
/* The generation word of collective `seq`'s region: it holds (uint32_t)seq once all arrived. */
hc_shm_word *hc_arena_generation(hc_arena *a, uint64_t seq);
/* This rank is done reading the region of `seq`; the last one out frees it. */
void hc_arena_leave(hc_arena *a, uint64_t seq);
/* The region's freed word: it holds (uint32_t)seq once every rank left collective `seq`. */
hc_shm_word *hc_arena_freed(hc_arena *a, uint64_t seq);

/* Stores `v` into the word and wakes every sleeper. */
void hc_shm_word_post(hc_shm_word *w, uint32_t v);
/* Sleeps until the word holds `want` or `timeout_us` passed: 1 when it
 * holds `want`, 0 on timeout, -1 when a signal interrupted the sleep. */
int hc_shm_word_sleep(hc_shm_word *w, uint32_t want, long timeout_us);
static inline int hc_shm_word_holds(hc_shm_word *w, uint32_t want) {
    return atomic_load_explicit(&w->value, memory_order_acquire) == want;
}

#endif
