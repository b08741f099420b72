#include "kernels/cpu.h"

#include <stdlib.h>
#include <string.h>

#include "hetcomm.h"

static hc_cpu_level detect(void) {
    const char *force = getenv("HETCOMM_SIMD");
    if (force && strcmp(force, "scalar") == 0) return HC_CPU_SCALAR;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
        return HC_CPU_AVX2;
#endif
    return HC_CPU_SCALAR;
}

hc_cpu_level hc_cpu_level_get(void) {
    /* Racing first calls compute the same answer; a relaxed int is enough. */
    static int level = -1;
    int v = __atomic_load_n(&level, __ATOMIC_RELAXED);
    if (v < 0) {
        v = (int)detect();
        __atomic_store_n(&level, v, __ATOMIC_RELAXED);
    }
    return (hc_cpu_level)v;
}

const char *hc_simd_level(void) { return hc_cpu_level_get() == HC_CPU_AVX2 ? "avx2" : "scalar"; }
