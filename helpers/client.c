/* Client role (FDKEEPER_ROLE=client): connect() to FDKEEPER_REMOTE hands the
 * kept connection over by dup3 onto the program's socket. With
 * FDKEEPER_PER_CALL the lease waits for the first send (percall.c). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "client.h"
#include "kept.h"
#include "lease.h"
#include "percall.h"
#include "real.h"

void client_restore_epoll(int fd, const struct fde *snap)
{
    for (int i = 0; i < snap->nregs; i++) {
        struct epoll_event ev;
        memset(&ev, 0, sizeof ev);
        ev.events = snap->regs[i].events;
        ev.data = snap->regs[i].data;
        if (REAL(epoll_ctl)(snap->regs[i].epfd, EPOLL_CTL_ADD, fd, &ev) != 0 &&
            (errno != EEXIST || REAL(epoll_ctl)(snap->regs[i].epfd, EPOLL_CTL_MOD, fd, &ev) != 0))
            shim_debug("fd %d: could not restore its epoll registration in epoll fd %d: %s", fd,
                       snap->regs[i].epfd, strerror(errno));
    }
}

static int is_lingerlike(int level, int name)
{
    return level == SOL_SOCKET && (name == SO_LINGER || name == SO_REUSEADDR
#ifdef SO_REUSEPORT
                                   || name == SO_REUSEPORT
#endif
                                  );
}

/* Socket options the program set, except those about its own address and
 * closing, and TCP options on a socketpair end. */
static void replay_options(int fd, const struct fde *snap, int pair)
{
    for (int i = 0; i < snap->nopts; i++) {
        const struct fde_opt *o = &snap->opts[i];
        if (!is_lingerlike(o->level, o->name) && !(pair && o->level == IPPROTO_TCP))
            REAL(setsockopt)(fd, o->level, o->name, o->val, o->len);
    }
}

/* The kept socket takes the program's O_NONBLOCK setting (file status flags
 * live on the shared open file description), then replaces fd. */
static int put_on_fd(int kept, int fd)
{
    int pfl = REAL(fcntl)(fd, F_GETFL);
    int kfl = REAL(fcntl)(kept, F_GETFL);
    int err;
    char ebuf[128];

    if (pfl >= 0 && kfl >= 0 && ((pfl ^ kfl) & O_NONBLOCK))
        REAL(fcntl)(kept, F_SETFL, (kfl & ~O_NONBLOCK) | (pfl & O_NONBLOCK));
    if (REAL(dup3)(kept, fd, O_CLOEXEC) >= 0) {
        REAL(close)(kept);
        return 0;
    }
    err = errno;
    REAL(close)(kept);
    shim_say("fdkeeper: cannot put the kept connection on fd %d: %s", fd,
             strerror_r(err, ebuf, sizeof ebuf));
    errno = err;
    return -1;
}

/* fd now holds the kept connection: its entry says so (a PENDING fd's
 * placeholder and, with its last copy, the placeholder's other end go). */
static void mark_kept(int fd, const struct fde *snap, const struct shim_inaddr *peer,
                      const struct shim_inaddr *local, int pair)
{
    int *cl = NULL, ncl = 0;

    fdt_lock();
    struct fde *e = fdt_get(fd);
    if (!e && (e = fdt_create(fd)))
        e->family = snap->family;
    if (e) {
        fdt_clear_pending(e, &cl, &ncl);
        e->flags |= FDE_CANDIDATE | FDE_KEPT | (pair ? FDE_PAIR : 0);
        e->nregs = snap->nregs;
        memcpy(e->regs, snap->regs, sizeof e->regs);
        e->peer = *peer;
        e->local = *local;
        fde_set_identity(fd, e);
    }
    fdt_unlock();
    fdt_close_list(cl, ncl);
}

static void say_handed_over(int fd, const char *what, const char *aor, int pair)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    char got[64];

    if (!shim_config()->debug)
        return;
    if (kept_getname(fd, (struct sockaddr *)&ss, &sl, 0) == 0)
        shim_format_addr((struct sockaddr *)&ss, got, sizeof got);
    else
        strcpy(got, "?");
    shim_debug("%s: handed over the kept connection %s->%s%s%s%s", what, got,
               shim_config()->remote_str, aor ? " of " : "", aor ? aor : "",
               pair ? " (a socketpair end the keeper relays)" : "");
}

int client_handoff(int fd, const struct fde *snap, const char *transport, const char *what,
                   int saved_errno, const char *aor)
{
    const struct shim_config *cfg = shim_config();
    char local[64], req[4096], why[64];
    struct ctl_result res;
    struct shim_inaddr kpeer, klocal;
    int kept, pair;

    if (snap->has_bind)
        shim_format_addr((const struct sockaddr *)&snap->bind_addr, local, sizeof local);
    else
        strcpy(local, "-");
    snprintf(req, sizeof req, "LEASE role=client transport=%s remote=%s local=%s%s%s%s", transport,
             cfg->remote_str, local, cfg->reconnect ? " reconnect=1" : "", aor ? " aor=" : "",
             aor ? aor : "");
    if (lease_request(req, &res, what) != 0)
        return -1;
    if (res.nfds != 1) {
        snprintf(why, sizeof why, "a client lease carried %d descriptors, not 1", res.nfds);
        return lease_bad_reply(&res, why, what);
    }
    kept = res.fds[0];
    kpeer = res.peers[0];
    klocal = res.locals[0];
    ctl_result_free(&res, 0);
    pair = lease_is_pair(kept);

    if (put_on_fd(kept, fd) != 0)
        return -1;
    client_restore_epoll(fd, snap);
    replay_options(fd, snap, pair);
    mark_kept(fd, snap, &kpeer, &klocal, pair);
    say_handed_over(fd, what, aor, pair);
    errno = saved_errno;
    return 0;
}

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
    return client_handoff(fd, &snap, transport, what, saved, NULL);
}
