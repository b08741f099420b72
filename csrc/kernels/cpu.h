/*
 * Run-time SIMD dispatch. Builds are portable (no -march=native); each hot
 * kernel has a scalar path and an AVX2 path compiled with a target
 * attribute, and picks one from hc_cpu_level() on first use.
 * HETCOMM_SIMD=scalar forces the scalar paths (tests use it to cover both).
 */
#ifndef HC_CPU_H
#define HC_CPU_H

typedef enum hc_cpu_level {
    HC_CPU_SCALAR = 0,
    HC_CPU_AVX2 = 1, /* AVX2 + FMA + F16C (x86-64-v3) */
} hc_cpu_level;

hc_cpu_level hc_cpu_level_get(void);

#endif
