/* The handoff recipe of the client role (see handoff.h): the LEASE request,
 * the kept connection dup3'ed onto the program's fd, its epoll registrations
 * and socket options carried over, its entry marked kept. client.c and
 * percall.c keep only what is their own: when to hand over, and for whom. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "handoff.h"
#include "kept.h"
#include "leasecache.h"
#include "lease.h"
#include "real.h"
#include "replay.h"

void handoff_restore_epoll(int fd, const struct fde *snap)
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

/* The options the program set on its socket, as far as they concern the
 * connection (replay.h). */
static void replay_options(int fd, const struct fde *snap, int pair)
{
    for (int i = 0; i < snap->nopts; i++) {
        const struct fde_opt *o = &snap->opts[i];
        if (handoff_replays_option(o->level, o->name, pair))
            REAL(setsockopt)(fd, o->level, o->name, o->val, o->len);
    }
}

int handoff_dup_keeping(int src, int fd)
{
    int pfl = REAL(fcntl)(fd, F_GETFL);
    int sfl = REAL(fcntl)(src, F_GETFL);

    if (pfl >= 0 && sfl >= 0 && ((pfl ^ sfl) & O_NONBLOCK))
        REAL(fcntl)(src, F_SETFL, (sfl & ~O_NONBLOCK) | (pfl & O_NONBLOCK));
    return REAL(dup3)(src, fd, O_CLOEXEC) >= 0 ? 0 : -1;
}

int handoff_dup_onto(int src, int fd)
{
    int r = handoff_dup_keeping(src, fd), err = errno;

    REAL(close)(src);
    errno = err;
    return r;
}

/* The kept connection replaces fd; kept stays open for the caller to close or
 * cache, and is closed only when that fails. 0 or -1 (said, errno set). */
static int put_on_fd(int kept, int fd)
{
    char ebuf[128];
    int err;

    if (handoff_dup_keeping(kept, fd) == 0)
        return 0;
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

/* The client LEASE for snap's socket into req (per call: for aor, answered
 * inline, and a copy may be kept when the cache is on). */
static void lease_text(const struct fde *snap, const char *transport, const char *aor, char *req,
                       size_t n)
{
    const struct shim_config *cfg = shim_config();
    char bound[64];

    if (snap->has_bind)
        shim_format_addr((const struct sockaddr *)&snap->bind_addr, bound, sizeof bound);
    else
        strcpy(bound, "-");
    snprintf(req, n, "LEASE role=client transport=%s remote=%s local=%s%s%s%s%s", transport,
             cfg->remote_str, bound, cfg->reconnect ? " reconnect=1" : "",
             aor && lc_enabled() ? " cache=1" : "", aor ? " inline=1 aor=" : "", aor ? aor : "");
}

/* Ask the keeper for the client connection; its descriptor and addresses, and
 * whether a copy may be kept. 0 or -1 (said, errno set). */
static int lease_one(const char *req, const char *what, int *kept, struct lc_answer *answer,
                     int *keep)
{
    struct ctl_result res;

    if (lease_request(req, &res, what) != 0)
        return -1;
    if (res.nfds != 1) {
        char why[64];
        snprintf(why, sizeof why, "a client lease carried %d descriptors, not 1", res.nfds);
        return lease_bad_reply(&res, why, what);
    }
    *kept = res.fds[0];
    answer->peer = res.peers[0];
    answer->local = res.locals[0];
    *keep = res.keep;
    ctl_result_free(&res, 0);
    return 0;
}

/* The kept connection for the request on fd: this process's own copy when the
 * lease cache has one (per call, no round trip), else the keeper's answer
 * (kept in the cache when it says keep=1). 0 or -1 (said, errno set). */
static int connection_onto(int fd, const char *req, int per_call, const char *what,
                           struct lc_answer *answer)
{
    int kept = -1, keep = 0;

    if (per_call && lc_take_onto(req, fd, answer) == 0) {
        shim_debug("%s: the lease cache's copy, no request to the keeper", what);
        return 0;
    }
    if (lease_one(req, what, &kept, answer, &keep) != 0)
        return -1;
    answer->pair = lease_is_pair(kept);
    if (put_on_fd(kept, fd) != 0)
        return -1;
    if (per_call && keep) /* lc_put closes it when the cache is off */
        lc_put(req, kept, answer);
    else
        REAL(close)(kept);
    return 0;
}

int handoff_lease(int fd, const struct fde *snap, const char *transport, const char *what,
                  int saved_errno, const char *aor)
{
    struct lc_answer answer;
    char req[4096];

    lease_text(snap, transport, aor, req, sizeof req);
    if (connection_onto(fd, req, aor != NULL, what, &answer) != 0)
        return -1;
    handoff_restore_epoll(fd, snap);
    replay_options(fd, snap, answer.pair);
    mark_kept(fd, snap, &answer.peer, &answer.local, answer.pair);
    say_handed_over(fd, what, aor, answer.pair);
    errno = saved_errno;
    return 0;
}
