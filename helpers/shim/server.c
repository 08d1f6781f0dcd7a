/* Server role (FDKEEPER_ROLE=server): after the program's first listen() on
 * a candidate socket, the keeper's connections queue on it as pending
 * accepts; epoll reports the listener readable while any is queued, and
 * accept()/accept4() hand them out as if the SuT had just connected. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "fdtable.h"
#include "lease.h"
#include "real.h"
#include "server.h"

#define MAX_INJECT 8

static int server_leased; /* the first listening candidate got its lease */

/* Is fd the first listening candidate? (Claims the lease for it.) */
static int first_listener(int fd)
{
    int go = 0;

    fdt_lock();
    struct fde *e = fdt_get(fd);
    if (e && (e->flags & FDE_CANDIDATE) && !(e->flags & FDE_KEPT) && !server_leased) {
        server_leased = 1;
        go = 1;
    }
    fdt_unlock();
    return go;
}

/* The run's identity for its server lease: FDKEEPER_LOCAL, with the port the listener really
 * got where the runner could only name the likely one (sipp 3.7 without -p takes the first
 * free port of 5060-5119, and another process may take the runner's guess first). */
static void server_identity(int fd, char *buf, size_t len)
{
    const struct shim_config *cfg = shim_config();
    struct sockaddr_storage bound, identity;
    socklen_t bound_len = sizeof bound;

    snprintf(buf, len, "%s", cfg->local_str);
    if (!cfg->local_str[0] || !cfg->local_from_listener ||
        REAL(getsockname)(fd, (struct sockaddr *)&bound, &bound_len) != 0 ||
        bound.ss_family != cfg->local.ss_family)
        return;
    identity = cfg->local;
    if (identity.ss_family == AF_INET)
        ((struct sockaddr_in *)&identity)->sin_port = ((struct sockaddr_in *)&bound)->sin_port;
    else
        ((struct sockaddr_in6 *)&identity)->sin6_port = ((struct sockaddr_in6 *)&bound)->sin6_port;
    shim_format_addr((struct sockaddr *)&identity, buf, len);
}

/* Lease the server connections and queue them on fd; 0 or -1 (errno set). */
static int queue_kept(int fd, const char *transport, const char *what)
{
    const struct shim_config *cfg = shim_config();
    struct ctl_result res;
    char req[256], local[64];
    int r, n;

    server_identity(fd, local, sizeof local);
    snprintf(req, sizeof req, "LEASE role=server transport=%s%s%s%s%s", transport,
             cfg->have_remote ? " remote=" : "", cfg->have_remote ? cfg->remote_str : "",
             local[0] ? " local=" : "", local);
    if (lease_request(req, &res, what) != 0)
        return -1;
    n = res.nfds;
    fdt_lock();
    r = fdt_get(fd) ? fdt_pending_add(fd, res.fds, res.peers, res.locals, n) : -1;
    fdt_unlock();
    if (r != 0) {
        ctl_result_free(&res, 1);
        shim_say("fdkeeper: cannot queue the kept connections on listening fd %d: out of memory",
                 fd);
        errno = ENOMEM;
        return -1;
    }
    ctl_result_free(&res, 0);
    shim_debug("%s: %d kept connection(s) queued as pending accepts", what, n);
    return 0;
}

int server_listen(int fd, int backlog)
{
    const struct shim_config *cfg = shim_config();
    char what[64];
    const char *transport;
    int saved, r = REAL(listen)(fd, backlog);

    if (r != 0 || !cfg->active || cfg->role != SHIM_ROLE_SERVER || !first_listener(fd))
        return r;
    saved = errno;
    snprintf(what, sizeof what, "listen(fd %d)", fd);
    if (!(transport = lease_transport(what))) {
        errno = saved;
        return r;
    }
    if (queue_kept(fd, transport, what) != 0)
        return -1;
    errno = saved;
    return 0;
}

static int real_wait(int epfd, struct epoll_event *events, int maxevents, int timeout,
                     const sigset_t *sigmask, int pwait)
{
    return pwait ? REAL(epoll_pwait)(epfd, events, maxevents, timeout, sigmask)
                 : REAL(epoll_wait)(epfd, events, maxevents, timeout);
}

/* Report listeners with pending kept connections as readable. */
int server_epoll_wait(int epfd, struct epoll_event *events, int maxevents, int timeout,
                      const sigset_t *sigmask, int pwait)
{
    struct epoll_event inj[MAX_INJECT];
    int k, n = 0;

    if (!SHIM_ACTIVE() || fdt_pending_total() == 0 || maxevents <= 0)
        return real_wait(epfd, events, maxevents, timeout, sigmask, pwait);
    fdt_lock();
    k = fdt_pending_events(epfd, inj, MAX_INJECT);
    fdt_unlock();
    if (k == 0)
        return real_wait(epfd, events, maxevents, timeout, sigmask, pwait);
    if (k > maxevents)
        k = maxevents;
    if (maxevents - k > 0) {
        /* Never block, never overflow the caller's array. */
        n = real_wait(epfd, events, maxevents - k, 0, sigmask, pwait);
        if (n < 0) {
            if (errno != EINTR)
                return n;
            n = 0;
        }
    }
    for (int i = 0; i < k; i++) {
        int dup = 0;
        for (int j = 0; j < n && !dup; j++)
            dup = events[j].data.u64 == inj[i].data.u64;
        if (!dup)
            events[n++] = inj[i];
    }
    return n;
}

/* What a real accept4() gives: O_NONBLOCK only on request; close-on-exec
 * always (a kept connection must not leak into exec()ed children). */
static void accepted_flags(int nfd, int flags)
{
    int fl = REAL(fcntl)(nfd, F_GETFL);
    if (fl >= 0) {
        int want = (flags & SOCK_NONBLOCK) ? (fl | O_NONBLOCK) : (fl & ~O_NONBLOCK);
        if (want != fl)
            REAL(fcntl)(nfd, F_SETFL, want);
    }
    REAL(fcntl)(nfd, F_SETFD, FD_CLOEXEC);
}

/* The peer address accept() reports: a socketpair end's from the keeper's
 * peers=, else the kernel's (length 0 if the SuT already went away: the read
 * will tell the program). */
static socklen_t accepted_peer(const struct fde_item *it, int pair, struct sockaddr_storage *ss)
{
    socklen_t sl = sizeof *ss;

    memset(ss, 0, sizeof *ss);
    if (pair && it->peer.len) {
        memcpy(ss, &it->peer.u, it->peer.len);
        return it->peer.len;
    }
    return REAL(getpeername)(it->fd, (struct sockaddr *)ss, &sl) == 0 ? sl : 0;
}

static void mark_accepted(const struct fde_item *it, int pair, int family)
{
    fdt_lock();
    struct fde *e = fdt_create(it->fd);
    if (e) {
        e->flags = FDE_CANDIDATE | FDE_KEPT | (pair ? FDE_PAIR : 0);
        e->family = family;
        e->peer = it->peer;
        e->local = it->local;
        fde_set_identity(it->fd, e);
    }
    fdt_unlock();
}

int server_accept(int fd, struct sockaddr *addr, socklen_t *alen, int flags, int four)
{
    struct sockaddr_storage ss;
    socklen_t sl;
    struct fde_item it;
    int nfd = -1, pair, saved = errno;

    if (SHIM_ACTIVE() && fdt_pending_total() != 0) {
        fdt_lock();
        nfd = fdt_pending_pop(fd, &it);
        fdt_unlock();
    }
    if (nfd < 0)
        return four ? REAL(accept4)(fd, addr, alen, flags) : REAL(accept)(fd, addr, alen);
    pair = lease_is_pair(nfd);
    accepted_flags(nfd, flags);
    sl = accepted_peer(&it, pair, &ss);
    if (addr && alen) {
        memcpy(addr, &ss, *alen < sl ? *alen : sl);
        *alen = sl;
    }
    mark_accepted(&it, pair, ss.ss_family);
    if (shim_config()->debug) {
        char a[64];
        shim_format_addr((struct sockaddr *)&ss, a, sizeof a);
        shim_debug("accept(fd %d): handed over the kept connection from %s as fd %d", fd, a, nfd);
    }
    errno = saved;
    return nfd;
}
