#include "kernels/convert.h"

#include <string.h>

#include "hetcomm.h"
#include "kernels/cpu.h"
#include "kernels/half.h"

#ifdef HC_X86
__attribute__((target("avx2,f16c"))) static size_t to_f32_avx2(float *dst, const uint16_t *src, size_t n, int bf16) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, bf16 ? hc_load8_bf16(src + i) : hc_load8_f16(src + i));
    return i;
}

__attribute__((target("avx2,f16c"))) static size_t from_f32_avx2(uint16_t *dst, const float *src, size_t n, int bf16) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(src + i);
        if (bf16)
            hc_store8_bf16(dst + i, v);
        else
            hc_store8_f16(dst + i, v);
    }
    return i;
}
#endif

void hc_convert_to_f32(float *dst, const void *src, size_t count, int dtype) {
    if (dtype == HC_FLOAT32) {
        if ((const void *)dst != src) memmove(dst, src, count * 4);
        return;
    }
    if (dtype == HC_FLOAT64) {
        const double *s = src;
        for (size_t i = 0; i < count; i++) dst[i] = (float)s[i];
        return;
    }
    const uint16_t *s = src;
    int bf16 = dtype == HC_BFLOAT16;
    size_t i = 0;
#ifdef HC_X86
    if (hc_cpu_level_get() == HC_CPU_AVX2) i = to_f32_avx2(dst, s, count, bf16);
#endif
    for (; i < count; i++) dst[i] = bf16 ? hc_bf16_to_f32(s[i]) : hc_f16_to_f32(s[i]);
}

void hc_convert_from_f32(void *dst, const float *src, size_t count, int dtype) {
    if (dtype == HC_FLOAT32) {
        if (dst != (const void *)src) memmove(dst, src, count * 4);
        return;
    }
    if (dtype == HC_FLOAT64) {
        double *d = dst;
        for (size_t i = count; i-- > 0;) d[i] = src[i]; /* backwards: dst may overlap src's start */
        return;
    }
    uint16_t *d = dst;
    int bf16 = dtype == HC_BFLOAT16;
    size_t i = 0;
#ifdef HC_X86
    if (hc_cpu_level_get() == HC_CPU_AVX2) i = from_f32_avx2(d, src, count, bf16);
#endif
    for (; i < count; i++) d[i] = bf16 ? hc_f32_to_bf16(src[i]) : hc_f32_to_f16(src[i]);
}
