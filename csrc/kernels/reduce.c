/* TEMPORARY scalar kernels so the core links; replaced by the kernels branch. */
#include <math.h>
#include <string.h>

#include "core/internal.h"
#include "kernels/half.h"

#define LOOP(T, EXPR)                                                          \
    do {                                                                       \
        T *d = dst; const T *x = a, *y = b;                                    \
        for (size_t i = 0; i < n; i++) { T u = x[i], v = y[i]; d[i] = (EXPR); } \
    } while (0)

static float fop(float u, float v, int op) {
    switch (op) {
    case HC_PROD: return u * v;
    case HC_MIN: return (isnan(u) || isnan(v)) ? NAN : (u < v ? u : v);
    case HC_MAX: return (isnan(u) || isnan(v)) ? NAN : (u > v ? u : v);
    default: return u + v;
    }
}

int hc_reduce_kernel(void *dst, const void *a, const void *b, size_t n, int dtype, int op) {
    switch (dtype) {
    case HC_FLOAT32: LOOP(float, fop(u, v, op)); break;
    case HC_FLOAT64: LOOP(double, op == HC_PROD ? u * v : op == HC_MIN ? (u < v ? u : v) : op == HC_MAX ? (u > v ? u : v) : u + v); break;
    case HC_FLOAT16: LOOP(uint16_t, hc_f32_to_f16(fop(hc_f16_to_f32(u), hc_f16_to_f32(v), op))); break;
    case HC_BFLOAT16: LOOP(uint16_t, hc_f32_to_bf16(fop(hc_bf16_to_f32(u), hc_bf16_to_f32(v), op))); break;
#define INTS(T) LOOP(T, op == HC_PROD ? (T)(u * v) : op == HC_MIN ? (u < v ? u : v) : op == HC_MAX ? (u > v ? u : v) : op == HC_BAND ? (T)(u & v) : op == HC_BOR ? (T)(u | v) : op == HC_BXOR ? (T)(u ^ v) : (T)(u + v))
    case HC_INT8: INTS(int8_t); break;
    case HC_INT16: INTS(int16_t); break;
    case HC_INT32: INTS(int32_t); break;
    case HC_INT64: INTS(int64_t); break;
    case HC_UINT8: INTS(uint8_t); break;
    case HC_BOOL: LOOP(uint8_t, (op == HC_PROD || op == HC_MIN || op == HC_BAND) ? (u && v) : op == HC_BXOR ? ((u != 0) ^ (v != 0)) : (u || v)); break;
    default: return HC_ERR_INVALID_ARGUMENT;
    }
    return HC_OK;
}

int hc_divide_kernel(void *buf, size_t n, int dtype, int64_t div) {
    switch (dtype) {
    case HC_FLOAT32: { float *p = buf; for (size_t i = 0; i < n; i++) p[i] /= (float)div; break; }
    case HC_FLOAT64: { double *p = buf; for (size_t i = 0; i < n; i++) p[i] /= (double)div; break; }
    case HC_FLOAT16: { uint16_t *p = buf; for (size_t i = 0; i < n; i++) p[i] = hc_f32_to_f16(hc_f16_to_f32(p[i]) / (float)div); break; }
    case HC_BFLOAT16: { uint16_t *p = buf; for (size_t i = 0; i < n; i++) p[i] = hc_f32_to_bf16(hc_bf16_to_f32(p[i]) / (float)div); break; }
    case HC_INT8: { int8_t *p = buf; for (size_t i = 0; i < n; i++) p[i] /= div; break; }
    case HC_INT16: { int16_t *p = buf; for (size_t i = 0; i < n; i++) p[i] /= div; break; }
    case HC_INT32: { int32_t *p = buf; for (size_t i = 0; i < n; i++) p[i] /= div; break; }
    case HC_INT64: { int64_t *p = buf; for (size_t i = 0; i < n; i++) p[i] /= div; break; }
    case HC_UINT8: { uint8_t *p = buf; for (size_t i = 0; i < n; i++) p[i] /= div; break; }
    default: return HC_ERR_UNSUPPORTED;
    }
    return HC_OK;
}
