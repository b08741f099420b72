/*
 * Cross-memory attach: reading and writing another process's memory on this
 * host with process_vm_readv/writev, one kernel copy between its pages and
 * ours, with no shared segment in between. The large-message path between
 * ranks of one host (algo/single_copy.c) reaches its peers' buffers this way.
 *
 * The kernel allows it where this process may ptrace the other one (same
 * user, or root; Yama's ptrace_scope 1 needs the target's consent, which
 * hc_cma_prepare gives for this process); seccomp profiles of container
 * runtimes often refuse the call outright (EPERM or ENOSYS).
 */
#ifndef HC_CMA_H
#define HC_CMA_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Lets any process of this user read this one (Yama ptrace_scope 1); once
 * per process, harmless without Yama. */
void hc_cma_prepare(void);
/* Copies `len` bytes at `remote` in process `pid` to `local`: 0, or the
 * errno that stopped it (ESRCH: the process is gone; EFAULT: the range is
 * not mapped there; EPERM, ENOSYS: the kernel refuses). */
int hc_cma_read(pid_t pid, void *local, uint64_t remote, size_t len);
/* Copies `len` bytes at `local` to `remote` in process `pid` (process_vm_writev); errors as hc_cma_read. */
int hc_cma_write(pid_t pid, const void *local, uint64_t remote, size_t len);

/* Buffers whose 2 MiB-aligned interior this process had collapsed into huge
 * pages. The kernel pins and maps every page a copy touches, and in a VM a
 * 4 KiB page costs a nested page walk: on the 2-core VM, torch tensors in
 * 2 MiB pages made a 2-rank 16 MiB allreduce 7.4 -> 4.1 ms. */
#define HC_HUGE_RANGES 16
typedef struct hc_huge_cache {
    struct {
        uintptr_t start;
        size_t len;
        int collapsed;
    } range[HC_HUGE_RANGES];
    unsigned next;
} hc_huge_cache;

/* Huge pages under the 2 MiB-aligned interior of `buf`: a range seen for
 * the first time is only remembered; seen again, it is a buffer the caller
 * reuses, and its pages are collapsed into huge ones (MADV_COLLAPSE, Linux
 * 6.1: a copy), once per range while the cache remembers it, so buffers
 * that come back with fresh pages at the same address cost one collapse,
 * not one per call. No MADV_HUGEPAGE: it would split the caller's mappings
 * at every buffer's edges. Errors are ignored: the pages stay as they are. */
void hc_cma_hugepages(hc_huge_cache *cache, const void *buf, size_t len);

#endif
