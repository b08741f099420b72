/* Error-feedback residuals, one per (communicator, key): what quantization
 * dropped last time, added back before quantizing the next time. */
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"

float *hc_residual_get(hc_comm *c, uint64_t key, size_t count) {
    for (hc_residual *r = c->residuals; r; r = r->next) {
        if (r->key != key) continue;
        if (r->count == count) return r->data;
        /* The bucket changed shape (a new model layout): start over. */
        float *data = calloc(count ? count : 1, sizeof(float));
        if (!data) return NULL;
        free(r->data);
        r->data = data;
        r->count = count;
        return data;
    }
    hc_residual *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    r->data = calloc(count ? count : 1, sizeof(float));
    if (!r->data) {
        free(r);
        return NULL;
    }
    r->key = key;
    r->count = count;
    r->next = c->residuals;
    c->residuals = r;
    return r->data;
}

int hc_comm_reset_residual(hc_comm *c, uint64_t key) {
    if (!c) return HC_ERR_INVALID_ARGUMENT;
    /* Residuals belong to the worker; resetting one mid-op would race, so
     * this zeroes in place and callers reset between steps. */
    for (hc_residual *r = c->residuals; r; r = r->next)
        if (key == 0 || r->key == key) memset(r->data, 0, r->count * sizeof(float));
    return HC_OK;
}
