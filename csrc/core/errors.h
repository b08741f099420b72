/* Errors and logging (core/errors.c), on their own so the kernels, pure
 * functions over buffers, can report without the transport headers. */
#ifndef HC_ERRORS_H
#define HC_ERRORS_H

#include <stdint.h>

void hc_set_last_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int hc_log_enabled(int level);
void hc_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int64_t hc_now_ns(void);

#endif
