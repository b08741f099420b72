/* Conversions between a float dtype and fp32, for the compressed paths
 * (codecs work on fp32). Round to nearest even on the way back. */
#ifndef HC_CONVERT_H
#define HC_CONVERT_H

#include <stddef.h>

/* dtype: HC_FLOAT16, HC_BFLOAT16, HC_FLOAT64 or HC_FLOAT32 (a copy). */
void hc_convert_to_f32(float *dst, const void *src, size_t count, int dtype);
void hc_convert_from_f32(void *dst, const float *src, size_t count, int dtype);

#endif
