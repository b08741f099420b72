/* Sites, local indices and columns (see sites.h). */
#include "algo/sites.h"

int hc_sites_uniform(const hc_comm *c) {
    int first = 0;
    for (int s = 0; s < c->nsites; s++) {
        int k = 0;
        for (int r = 0; r < c->size; r++) k += c->peers[r].site == s;
        if (s == 0) first = k;
        if (k != first) return 0;
    }
    return first;
}

int hc_site_table(const hc_comm *c, int m, int *table) {
    int lp = 0;
    for (int s = 0; s < c->nsites; s++)
        for (int i = 0, k = 0; i < c->size; i++) {
            int r = c->ring[i];
            if (c->peers[r].site != s) continue;
            if (r == c->rank) lp = k;
            table[s * m + k++] = r;
        }
    return lp;
}

int hc_sites_hierarchical(const hc_comm *c, const hc_op *op) {
    int algo = op->opts.algo != HC_ALGO_AUTO ? op->opts.algo : c->cfg.algo;
    if (algo != HC_ALGO_AUTO && algo != HC_ALGO_HIERARCHICAL) return 0;
    return c->nsites > 1 && hc_sites_uniform(c) > 0;
}
