#include "transport/mailbox.h"

#include <errno.h>
#include <linux/futex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "core/internal.h"

#define MBOX_MAGIC 0x584f424d4d434831ull /* "1HCMMBOX" */

typedef struct mbox_header {
    uint64_t magic;
    uint64_t slot_bytes;
} mbox_header;

static size_t slot_stride(size_t slot_bytes) { return (sizeof(hc_mbox_slot) + slot_bytes + 63) & ~(size_t)63; }
static size_t map_size(size_t slot_bytes) { return 64 + HC_MBOX_SLOTS * slot_stride(slot_bytes); }

static hc_mbox *wrap(const char *name, uint8_t *base, size_t bytes, size_t slot_bytes, int linked) {
    hc_mbox *mb = calloc(1, sizeof *mb);
    if (!mb) return NULL;
    snprintf(mb->name, sizeof mb->name, "%s", name);
    mb->base = base;
    mb->map_bytes = bytes;
    mb->slot_bytes = slot_bytes;
    mb->linked = linked;
    return mb;
}

hc_mbox *hc_mbox_create(const char *name) {
    size_t bytes = map_size(HC_MBOX_SLOT_BYTES);
    uint8_t *base = hc_shm_map_new(name, bytes);
    if (!base) return NULL;
    /* New shared memory is zero-filled: every word starts at 0, which no sequence number uses. */
    mbox_header *h = (mbox_header *)base;
    h->slot_bytes = HC_MBOX_SLOT_BYTES;
    atomic_thread_fence(memory_order_release);
    h->magic = MBOX_MAGIC;
    hc_mbox *mb = wrap(name, base, bytes, HC_MBOX_SLOT_BYTES, 1);
    if (!mb) {
        munmap(base, bytes);
        shm_unlink(name);
    }
    return mb;
}

static size_t mbox_bytes(const void *head) {
    const mbox_header *h = head;
    return h->magic == MBOX_MAGIC && h->slot_bytes == HC_MBOX_SLOT_BYTES ? map_size(h->slot_bytes) : 0;
}

hc_mbox *hc_mbox_attach(const char *name) {
    mbox_header h;
    size_t bytes;
    uint8_t *base = hc_shm_map_existing(name, &h, sizeof h, mbox_bytes, &bytes);
    if (!base) return NULL;
    hc_mbox *mb = wrap(name, base, bytes, h.slot_bytes, 0);
    if (!mb) munmap(base, bytes);
    return mb;
}

void hc_mbox_close(hc_mbox *mb) {
    if (!mb) return;
    if (mb->linked) shm_unlink(mb->name);
    munmap(mb->base, mb->map_bytes);
    free(mb);
}

hc_mbox_slot *hc_mbox_slot_for(hc_mbox *mb, uint64_t seq) {
    return (hc_mbox_slot *)(mb->base + 64 + (seq % HC_MBOX_SLOTS) * slot_stride(mb->slot_bytes));
}

/* Shared (not process-private) futexes: the word lives in a MAP_SHARED mapping. */
static long futex(_Atomic uint32_t *addr, int op, uint32_t val, const struct timespec *ts) {
    return syscall(SYS_futex, (uint32_t *)addr, op, val, ts, NULL, 0);
}

void hc_mbox_post(hc_mbox_word *w, uint32_t v) {
    /* Sequentially consistent with hc_mbox_sleep's flag-then-check: either
     * the waiter sees the value or this sees its flag. */
    atomic_store(&w->value, v);
    if (atomic_load(&w->sleeping)) futex(&w->value, FUTEX_WAKE, 1, NULL);
}

int hc_mbox_sleep(hc_mbox_word *w, uint32_t want, long timeout_us) {
    atomic_store(&w->sleeping, 1);
    uint32_t seen = atomic_load(&w->value);
    int rc = 1;
    if (seen != want) {
        struct timespec ts = {timeout_us / 1000000, (timeout_us % 1000000) * 1000};
        rc = futex(&w->value, FUTEX_WAIT, seen, &ts) == 0 || errno == EAGAIN ? 1 : errno == EINTR ? -1 : 0;
        if (rc == 1) rc = hc_mbox_holds(w, want); /* woken for another value, or spuriously */
    }
    atomic_store(&w->sleeping, 0);
    return rc;
}
