#define _GNU_SOURCE
#include "transport/cma.h"

#include <errno.h>
#include <pthread.h>
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

int hc_cma_read(pid_t pid, void *local, uint64_t remote, size_t len) {
    char *dst = local;
    while (len) {
        struct iovec l = {dst, len}, r = {(void *)(uintptr_t)remote, len};
        ssize_t n = process_vm_readv(pid, &l, 1, &r, 1, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        if (n == 0) return EFAULT; /* a partial read stops at the first unmapped page */
        dst += n;
        remote += (uint64_t)n;
        len -= (size_t)n;
    }
    return 0;
}
