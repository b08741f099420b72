#include "transport/shm.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "core/internal.h"

#define LANE_MAGIC 0x454e414c4d434831ull /* "1HCMLANE" */
#define LINE 64

enum { SLOT_FREE = 0, SLOT_FULL = 1 };

typedef struct lane_header {
    uint64_t magic;
    uint32_t nslots;
    uint32_t reserved;
    uint64_t slot_bytes;
    _Atomic uint32_t waiting;
} lane_header;

static size_t page_round(size_t n) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    return (n + page - 1) / page * page;
}

static size_t data_offset(uint32_t nslots) { return page_round(LINE + (size_t)nslots * LINE); }

static hc_lane *wrap(const char *name, uint8_t *base, size_t map_bytes, int linked) {
    hc_lane *lane = calloc(1, sizeof *lane);
    if (!lane) return NULL;
    const lane_header *h = (const lane_header *)base;
    snprintf(lane->name, sizeof lane->name, "%s", name);
    lane->base = base;
    lane->map_bytes = map_bytes;
    lane->nslots = h->nslots;
    lane->slot_bytes = h->slot_bytes;
    lane->states = (_Atomic uint32_t *)(base + LINE);
    lane->waiting = &((lane_header *)base)->waiting;
    lane->data = base + data_offset(h->nslots);
    lane->linked = linked;
    return lane;
}

static _Atomic uint32_t *state_of(hc_lane *lane, uint32_t slot) {
    return (_Atomic uint32_t *)((uint8_t *)lane->states + (size_t)slot * LINE);
}

uint8_t *hc_shm_map_new(const char *name, size_t bytes) {
    int fd = shm_open(name, O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0) {
        hc_log(HC_LOG_DEBUG, "shm_open(%s): %s", name, strerror(errno));
        return NULL;
    }
    uint8_t *base = MAP_FAILED;
    if (ftruncate(fd, (off_t)bytes) == 0) base = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (base == MAP_FAILED) {
        hc_log(HC_LOG_DEBUG, "cannot size or map %s (%zu bytes): %s", name, bytes, strerror(errno));
        shm_unlink(name);
        return NULL;
    }
    return base;
}

uint8_t *hc_shm_map_existing(const char *name, void *head, size_t head_len, size_t (*bytes_of)(const void *head),
                             size_t *bytes, int keep_name) {
    int fd = shm_open(name, O_RDWR, 0);
    if (fd < 0) {
        hc_log(HC_LOG_DEBUG, "shm_open(%s) to attach: %s", name, strerror(errno));
        return NULL;
    }
    uint8_t *base = MAP_FAILED;
    *bytes = 0;
    if (pread(fd, head, head_len, 0) == (ssize_t)head_len && (*bytes = bytes_of(head)) != 0)
        base = mmap(NULL, *bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    /* Mapped (or not): the name is no longer needed, and removing it now
     * means a crash later leaves nothing behind in /dev/shm. */
    if (!keep_name) shm_unlink(name);
    return base == MAP_FAILED ? NULL : base;
}

hc_lane *hc_lane_create(const char *name, uint32_t nslots, size_t slot_bytes) {
    size_t bytes = data_offset(nslots) + (size_t)nslots * slot_bytes;
    uint8_t *base = hc_shm_map_new(name, bytes);
    if (!base) return NULL;
    lane_header *h = (lane_header *)base;
    h->nslots = nslots;
    h->slot_bytes = slot_bytes;
    for (uint32_t i = 0; i < nslots; i++)
        atomic_store_explicit((_Atomic uint32_t *)(base + LINE + (size_t)i * LINE), SLOT_FREE, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
    h->magic = LANE_MAGIC;
    hc_lane *lane = wrap(name, base, bytes, 1);
    if (!lane) {
        munmap(base, bytes);
        shm_unlink(name);
    }
    return lane;
}

static size_t lane_bytes(const void *head) {
    const lane_header *h = head;
    return h->magic == LANE_MAGIC && h->nslots > 0 ? data_offset(h->nslots) + (size_t)h->nslots * h->slot_bytes : 0;
}

hc_lane *hc_lane_attach(const char *name) {
    lane_header h;
    size_t bytes;
    uint8_t *base = hc_shm_map_existing(name, &h, sizeof h, lane_bytes, &bytes, 0);
    if (!base) return NULL;
    hc_lane *lane = wrap(name, base, bytes, 0);
    if (!lane) munmap(base, bytes);
    return lane;
}

void hc_lane_close(hc_lane *lane) {
    if (!lane) return;
    if (lane->linked) shm_unlink(lane->name);
    munmap(lane->base, lane->map_bytes);
    free(lane);
}

int hc_lane_take(hc_lane *lane) {
    for (uint32_t k = 0; k < lane->nslots; k++) {
        uint32_t slot = (lane->cursor + k) % lane->nslots;
        if (atomic_load(state_of(lane, slot)) == SLOT_FREE) {
            lane->cursor = (slot + 1) % lane->nslots;
            return (int)slot;
        }
    }
    return -1;
}

void hc_lane_fill(hc_lane *lane, int slot) {
    atomic_store_explicit(state_of(lane, (uint32_t)slot), SLOT_FULL, memory_order_release);
}

const uint8_t *hc_lane_read(hc_lane *lane, uint32_t slot) {
    if (slot >= lane->nslots || atomic_load_explicit(state_of(lane, slot), memory_order_acquire) != SLOT_FULL)
        return NULL;
    return hc_lane_slot(lane, (int)slot);
}

int hc_lane_release(hc_lane *lane, uint32_t slot) {
    /* Sequentially consistent on both sides (here and in want_slot/take), so
     * either the sender sees the free slot or this sees its waiting flag. */
    atomic_store(state_of(lane, slot), SLOT_FREE);
    return atomic_load(lane->waiting) && atomic_exchange(lane->waiting, 0);
}

void hc_lane_want_slot(hc_lane *lane) { atomic_store(lane->waiting, 1); }
