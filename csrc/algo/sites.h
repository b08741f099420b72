/*
 * How the ranks of a communicator sit in sites, for the algorithms that work
 * site by site (the hierarchical allreduce, reduce-scatter and allgather).
 *
 * A rank's local index is its position among its site's ranks in ring order;
 * the ranks with the same local index in every site form a column.
 */
#ifndef HC_SITES_H
#define HC_SITES_H

#include "core/internal.h"

/* Ranks per site when every site has the same number, else 0. */
int hc_sites_uniform(const hc_comm *c);
/* Fills table[s * m + l] with the rank of local index l in site s (m ranks
 * per site, as hc_sites_uniform says); returns this rank's local index. */
int hc_site_table(const hc_comm *c, int m, int *table);
/* Whether a reduce-scatter or allgather runs site by site: several sites of
 * equal size, and no other algorithm named by the call or the communicator. */
int hc_sites_hierarchical(const hc_comm *c, const hc_op *op);

int hc_reduce_scatter_hierarchical(hc_exec *x);
int hc_allgather_hierarchical(hc_exec *x);

#endif
