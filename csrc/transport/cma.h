/*
 * Cross-memory attach: reading another process's memory on this host with
 * process_vm_readv, one kernel copy from its pages into ours, with no shared
 * segment in between. The large-message path between ranks of one host
 * (algo/single_copy.c) reads its peers' buffers this way.
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

#endif
