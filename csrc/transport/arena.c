#include "transport/arena.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "core/internal.h"

#define ARENA_MAGIC 0x414e524141434831ull /* "1HCARNA" */
#define LINE 64

typedef struct arena_header {
    uint64_t magic;
    uint64_t nranks;
    uint64_t slot_bytes;
} arena_header;

/* A region: the arrival and departure counts and their words, a line each, then the slots. */
typedef struct arena_region {
    _Atomic uint32_t arrived __attribute__((aligned(LINE)));
    hc_shm_word generation __attribute__((aligned(LINE)));
    _Atomic uint32_t departed __attribute__((aligned(LINE)));
    hc_shm_word freed __attribute__((aligned(LINE)));
} arena_region;

static size_t slot_stride(int nranks) {
    size_t data = (sizeof(hc_arena_slot) + (size_t)nranks * 4 + LINE - 1) & ~(size_t)(LINE - 1);
    return data + HC_ARENA_SLOT_BYTES;
}
static size_t region_stride(int nranks) { return sizeof(arena_region) + (size_t)nranks * slot_stride(nranks); }
static size_t map_size(int nranks) { return LINE + HC_ARENA_REGIONS * region_stride(nranks); }

static arena_region *region_of(hc_arena *a, uint64_t seq) {
    return (arena_region *)(a->base + LINE + (seq % HC_ARENA_REGIONS) * region_stride(a->nranks));
}

static hc_arena *wrap(const char *name, uint8_t *base, int nranks, int linked) {
    hc_arena *a = calloc(1, sizeof *a);
    if (!a) return NULL;
    snprintf(a->name, sizeof a->name, "%s", name);
    a->base = base;
    a->map_bytes = map_size(nranks);
    a->nranks = nranks;
    a->slot_stride = slot_stride(nranks);
    a->linked = linked;
    return a;
}

hc_arena *hc_arena_create(const char *name, int nranks) {
    size_t bytes = map_size(nranks);
    uint8_t *base = hc_shm_map_new(name, bytes);
    if (!base) return NULL;
    /* New shared memory is zero-filled: every word starts at 0, which no sequence number uses. */
    arena_header *h = (arena_header *)base;
    h->nranks = (uint64_t)nranks;
    h->slot_bytes = HC_ARENA_SLOT_BYTES;
    atomic_thread_fence(memory_order_release);
    h->magic = ARENA_MAGIC;
    hc_arena *a = wrap(name, base, nranks, 1);
    if (!a) {
        munmap(base, bytes);
        shm_unlink(name);
    }
    return a;
}

static size_t arena_bytes(const void *head) {
    const arena_header *h = head;
    return h->magic == ARENA_MAGIC && h->slot_bytes == HC_ARENA_SLOT_BYTES && h->nranks > 0 && h->nranks <= INT_MAX
               ? map_size((int)h->nranks)
               : 0;
}

hc_arena *hc_arena_attach(const char *name, int nranks) {
    arena_header h;
    size_t bytes;
    uint8_t *base = hc_shm_map_existing(name, &h, sizeof h, arena_bytes, &bytes, 1);
    if (!base) return NULL;
    hc_arena *a = h.nranks == (uint64_t)nranks ? wrap(name, base, nranks, 0) : NULL;
    if (!a) munmap(base, bytes);
    return a;
}

void hc_arena_unlink(hc_arena *a) {
    if (a && a->linked) shm_unlink(a->name);
    if (a) a->linked = 0;
}

void hc_arena_close(hc_arena *a) {
    if (!a) return;
    hc_arena_unlink(a);
    munmap(a->base, a->map_bytes);
    free(a);
}

hc_arena_slot *hc_arena_slot_of(hc_arena *a, uint64_t seq, int rank) {
    return (hc_arena_slot *)((uint8_t *)region_of(a, seq) + sizeof(arena_region) + (size_t)rank * a->slot_stride);
}

hc_shm_word *hc_arena_generation(hc_arena *a, uint64_t seq) { return &region_of(a, seq)->generation; }

int hc_arena_arrive(hc_arena *a, uint64_t seq) {
    arena_region *r = region_of(a, seq);
    if (atomic_fetch_add(&r->arrived, 1) + 1 < (uint32_t)a->nranks) return 0;
    /* Every rank is in: nobody touches this count again before the region's
     * next collective, which no rank starts before seeing this one published. */
    atomic_store_explicit(&r->arrived, 0, memory_order_relaxed);
    return 1;
}

int hc_arena_withdraw(hc_arena *a, uint64_t seq) {
    arena_region *r = region_of(a, seq);
    uint32_t k = atomic_load(&r->arrived);
    /* 0 or every rank: the last arriver has counted this rank in for good. */
    while (k > 0 && k < (uint32_t)a->nranks)
        if (atomic_compare_exchange_weak(&r->arrived, &k, k - 1)) return 1;
    return 0;
}

void hc_arena_publish(hc_arena *a, uint64_t seq) { hc_shm_word_post(&region_of(a, seq)->generation, (uint32_t)seq); }

void hc_arena_leave(hc_arena *a, uint64_t seq) {
    arena_region *r = region_of(a, seq);
    if (atomic_fetch_add(&r->departed, 1) + 1 < (uint32_t)a->nranks) return;
    /* Nobody arrives here again before seeing `freed`, so nobody leaves either. */
    atomic_store_explicit(&r->departed, 0, memory_order_relaxed);
    hc_shm_word_post(&r->freed, (uint32_t)seq);
}

hc_shm_word *hc_arena_freed(hc_arena *a, uint64_t seq) { return &region_of(a, seq)->freed; }

/* Shared (not process-private) futexes: the word lives in a MAP_SHARED mapping. */
static long futex(_Atomic uint32_t *addr, int op, uint32_t val, const struct timespec *ts) {
    return syscall(SYS_futex, (uint32_t *)addr, op, val, ts, NULL, 0);
}

void hc_shm_word_post(hc_shm_word *w, uint32_t v) {
    /* Sequentially consistent with hc_shm_word_sleep's count-then-check:
     * either the sleeper sees the value or this sees it counted. */
    atomic_store(&w->value, v);
    if (atomic_load(&w->sleepers)) futex(&w->value, FUTEX_WAKE, INT_MAX, NULL);
}

int hc_shm_word_sleep(hc_shm_word *w, uint32_t want, long timeout_us) {
    atomic_fetch_add(&w->sleepers, 1);
    uint32_t seen = atomic_load(&w->value);
    int rc = 1;
    if (seen != want) {
        struct timespec ts = {timeout_us / 1000000, (timeout_us % 1000000) * 1000};
        rc = futex(&w->value, FUTEX_WAIT, seen, &ts) == 0 || errno == EAGAIN ? 1 : errno == EINTR ? -1 : 0;
        if (rc == 1) rc = hc_shm_word_holds(w, want); /* woken for another value, or spuriously */
    }
    atomic_fetch_sub(&w->sleepers, 1);
    return rc;
}
