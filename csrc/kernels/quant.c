/* TEMPORARY stubs so the core links; replaced by the kernels-quant branch. */
#include "core/internal.h"

const char *hc_codec_name(int codec) { return "stub"; }
void hc_codec_params_init(hc_codec_params *p) { p->block = 256; p->scale_fp32 = 1; p->sr_seed = 0; p->sr_offset = 0; }
size_t hc_codec_encoded_size(int codec, size_t count, const hc_codec_params *p) { return 0; }
int hc_codec_encode(int codec, const float *src, size_t count, void *dst, float *residual, const hc_codec_params *p) { return HC_ERR_UNSUPPORTED; }
int hc_codec_decode(int codec, const void *src, size_t count, float *dst, const hc_codec_params *p) { return HC_ERR_UNSUPPORTED; }
int hc_codec_decode_add(int codec, const void *src, size_t count, float *acc, const hc_codec_params *p) { return HC_ERR_UNSUPPORTED; }
int hc_codec_hop(int codec, const void *src, const float *local, size_t count, void *dst, float *sum_out, const hc_codec_params *p) { return HC_ERR_UNSUPPORTED; }
