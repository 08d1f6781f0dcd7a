/* Per call: this process's own copies of the per-user connections the keeper
 * leased it, so a user's next call takes its connection without a round trip
 * to the keeper (helpers/README.md, "The lease cache"). A lease lasts as long
 * as its process, so while the process lives a copy is what the keeper would
 * hand again; the keeper says which replies may be kept (keep=1). */
#ifndef FDKEEPER_LEASECACHE_H
#define FDKEEPER_LEASECACHE_H

#include "fdtable.h"

/* Copies kept at most without FDKEEPER_LEASE_CACHE (and never more than a
 * quarter of the open-file limit: the program's own sockets come first). */
#define LC_DEFAULT_MAX 4096

/* What a kept copy stands for: the reply to one LEASE request. */
struct lc_answer {
    int pair; /* a socketpair end (FDE_PAIR), not an inet socket */
    struct shim_inaddr peer, local;
};

/* Whether this process keeps copies at all (FDKEEPER_LEASE_CACHE not 0). */
SHIM_HIDDEN int lc_enabled(void);
/* If the answer to `request` is kept, still the socket it was and not ended
 * by its peer (a hang-up, reset or error drops it): dup3 it onto fd (fd's
 * O_NONBLOCK carried over, close-on-exec) and return 0 with *out filled;
 * else -1 (nothing done to fd). */
SHIM_HIDDEN int lc_take_onto(const char *request, int fd, struct lc_answer *out);
/* Keep kept (a descriptor the keeper sent for `request`, keep=1) as the answer
 * to that request; the cache owns it from here (closed when evicted, the
 * least recently used first). Without memory it is closed. */
SHIM_HIDDEN void lc_put(const char *request, int kept, const struct lc_answer *answer);
/* The program closed fd (or dup2/dup3'ed over it, or close_range'd first..last):
 * a copy of ours that had that number is forgotten, not closed (its number is
 * the program's now). Cheap when nothing is kept. Keeps errno. */
SHIM_HIDDEN void lc_lost_fd(int fd);
SHIM_HIDDEN void lc_lost_range(unsigned first, unsigned last);
/* After a call that failed: whether to make it once more, because it failed
 * for want of descriptors (EMFILE) and the cache closed the older half of its
 * copies (at least one) to give them back. Keeps errno. */
SHIM_HIDDEN int lc_gave_way(void);
/* How many copies are kept (tests, debug lines). */
SHIM_HIDDEN int lc_count(void);

#endif
