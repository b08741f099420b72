#define _GNU_SOURCE
#include "transport/cma.h"

#include <errno.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/uio.h>

#ifndef PR_SET_PTRACER
#define PR_SET_PTRACER 0x59616d61
#endif
#ifndef PR_SET_PTRACER_ANY
#define PR_SET_PTRACER_ANY ((unsigned long)-1)
#endif

static pthread_once_t prepared = PTHREAD_ONCE_INIT;

static void allow_readers(void) {
    /* EINVAL without Yama: nothing to allow. */
    (void)prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0);
}

void hc_cma_prepare(void) { pthread_once(&prepared, allow_readers); }

/* One direction of a copy between this process and `pid`. */
static int cma_copy(pid_t pid, void *local, uint64_t remote, size_t len, int write) {
    char *mine = local;
    while (len) {
        struct iovec l = {mine, len}, r = {(void *)(uintptr_t)remote, len};
        ssize_t n = write ? process_vm_writev(pid, &l, 1, &r, 1, 0) : process_vm_readv(pid, &l, 1, &r, 1, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        if (n == 0) return EFAULT; /* a partial copy stops at the first unmapped page */
        mine += n;
        remote += (uint64_t)n;
        len -= (size_t)n;
    }
    return 0;
}

int hc_cma_read(pid_t pid, void *local, uint64_t remote, size_t len) { return cma_copy(pid, local, remote, len, 0); }

int hc_cma_write(pid_t pid, const void *local, uint64_t remote, size_t len) {
    return cma_copy(pid, (void *)local, remote, len, 1);
}

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
#define HUGE_PAGE (2u << 20)

void hc_cma_hugepages(hc_huge_cache *cache, const void *buf, size_t len) {
    uintptr_t start = ((uintptr_t)buf + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1);
    uintptr_t end = ((uintptr_t)buf + len) & ~(uintptr_t)(HUGE_PAGE - 1);
    if (end <= start) return;
    size_t n = end - start;
    for (int i = 0; i < HC_HUGE_RANGES; i++) {
        if (cache->range[i].start != start || cache->range[i].len != n) continue;
        if (!cache->range[i].collapsed) (void)madvise((void *)start, n, MADV_COLLAPSE);
        cache->range[i].collapsed = 1;
        return;
    }
    unsigned i = cache->next++ % HC_HUGE_RANGES;
    cache->range[i].start = start;
    cache->range[i].len = n;
    cache->range[i].collapsed = 0;
}
