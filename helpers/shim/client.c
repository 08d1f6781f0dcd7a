/* Client role (FDKEEPER_ROLE=client): which connect() hands the kept
 * connection over (handoff.c does it). With FDKEEPER_PER_CALL the lease waits
 * for the first send (percall.c). */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>

#include "client.h"
#include "handoff.h"
#include "lease.h"
#include "percall.h"
#include "real.h"

/* connect() of a candidate socket to the SuT: the handoff (or, per call, the
 * placeholder). Anything else is the real connect. */
int client_connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    const struct shim_config *cfg = shim_config();
    struct fde snap;
    char what[96];
    const char *transport;
    int saved = errno;

    if (!cfg->active || cfg->role != SHIM_ROLE_CLIENT ||
        !fdt_lookup(fd, FDE_CANDIDATE | FDE_PENDING, &snap))
        return REAL(connect)(fd, addr, len);
    if (snap.flags & FDE_PENDING) { /* "connected" already, as far as the program knows */
        errno = EISCONN;
        return -1;
    }
    if (snap.flags & FDE_KEPT)
        return REAL(connect)(fd, addr, len);
    if (!shim_addr_equal(addr, len, &cfg->remote)) {
        if (cfg->debug) {
            char a[64];
            shim_format_addr(addr, a, sizeof a);
            shim_debug("connect(fd %d) to %s: not the SuT %s, real connect", fd, a,
                       cfg->remote_str);
        }
        return REAL(connect)(fd, addr, len);
    }
    snprintf(what, sizeof what, "connect(fd %d) to %s", fd, cfg->remote_str);
    if (!(transport = lease_transport(what))) {
        errno = saved;
        return REAL(connect)(fd, addr, len);
    }
    if (cfg->per_call)
        return percall_placeholder(fd, &snap, addr, len, what, saved);
    return handoff_lease(fd, &snap, transport, what, saved, NULL);
}
