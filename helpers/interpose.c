/* The interposed libc calls. Only these symbols are exported.
 *
 * Reads (recv, recvfrom, read, ...) are not interposed at all. The send
 * family (send, sendto, sendmsg, write, writev) is, for the per-call mode
 * only: while no fd is PENDING it costs one atomic load, otherwise one table
 * lookup. Every other call here that is not about one of our fds costs at
 * most one table lookup. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "control.h"
#include "fdtable.h"
#include "real.h"
#include "shim.h"

#define MAX_INJECT 8

/* ---- helpers ---------------------------------------------------------- */

static void set_identity(int fd, struct fde *e)
{
    struct stat st;
    int saved = errno;
    if (fstat(fd, &st) == 0) {
        e->dev = st.st_dev;
        e->ino = st.st_ino;
    }
    errno = saved;
}

/* Is fd still the socket the entry was made for? (fds can be closed behind
 * our back, e.g. by fclose() on an fdopen()ed socket.) */
static int same_socket(int fd, dev_t dev, ino_t ino)
{
    struct stat st;
    int saved = errno;
    int ok = fstat(fd, &st) == 0 && st.st_dev == dev && st.st_ino == ino;
    errno = saved;
    return ok;
}

static void forget(int fd)
{
    int *cl = NULL, ncl = 0;
    fdt_lock();
    fdt_remove(fd, &cl, &ncl);
    fdt_unlock();
    fdt_close_list(cl, ncl);
}

static int err_for_code(const char *code)
{
    if (strcmp(code, "busy") == 0)
        return EBUSY;
    if (strcmp(code, "timeout") == 0)
        return ETIMEDOUT;
    return ECONNREFUSED; /* refused, closed, none and anything else */
}

/* Tell the user why the handoff failed (one line), set errno, return -1. */
static int lease_failed(struct ctl_result *res, const char *what)
{
    const struct shim_config *cfg = shim_config();
    char ebuf[128];
    int err = ECONNREFUSED;

    switch (res->status) {
    case CTL_UNREACHABLE:
        shim_say("fdkeeper: cannot reach the keeper at %s: %s; start it with 'fdkeeper keeper' "
                 "or run through 'fdkeeper sipp'",
                 cfg->socket_path, strerror_r(res->sys_errno, ebuf, sizeof ebuf));
        break;
    case CTL_TIMEOUT:
        shim_say("fdkeeper: the keeper at %s did not answer within %d s; check it with "
                 "'fdkeeper status'", cfg->socket_path, CTL_TIMEOUT_SECONDS);
        err = ETIMEDOUT;
        break;
    case CTL_ERR:
        shim_say("%s", res->text);
        err = err_for_code(res->code);
        break;
    case CTL_PROTO:
    case CTL_OK:
        shim_say("fdkeeper: unexpected reply from the keeper at %s: %s", cfg->socket_path,
                 res->text);
        break;
    }
    shim_debug("%s: no handoff (%s)", what,
               res->status == CTL_ERR ? res->code : "keeper not usable");
    ctl_result_free(res, 1);
    errno = err;
    return -1;
}

/* Is fd an AF_INET/AF_INET6 socket? For transport=tls the keeper hands one end
 * of a socketpair instead. When in doubt: yes (the kernel keeps answering). */
static int is_inet(int fd)
{
    int dom = 0, r, saved = errno;
    socklen_t l = sizeof dom;

    r = getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &dom, &l);
    errno = saved;
    return r != 0 || dom == AF_INET || dom == AF_INET6;
}

/* transport= of a LEASE, or NULL when FDKEEPER_TRANSPORT is unusable: then
 * the handoff `what` does not happen (said once per process). */
static const char *lease_transport(const char *what)
{
    static int reported;
    const struct shim_config *cfg = shim_config();

    if (cfg->transport == SHIM_TRANSPORT_TCP)
        return "tcp";
    if (cfg->transport == SHIM_TRANSPORT_TLS)
        return "tls";
    if (!__atomic_exchange_n(&reported, 1, __ATOMIC_RELAXED))
        shim_say("fdkeeper: FDKEEPER_TRANSPORT '%s' is neither 'tcp' nor 'tls'; %s goes ahead "
                 "without the keeper (no kept connection is handed over)",
                 cfg->transport_str, what);
    else
        shim_debug("%s: no handoff (bad FDKEEPER_TRANSPORT)", what);
    return NULL;
}

static int is_lingerlike(int level, int name)
{
    return level == SOL_SOCKET && (name == SO_LINGER || name == SO_REUSEADDR
#ifdef SO_REUSEPORT
                                   || name == SO_REUSEPORT
#endif
                                  );
}

/* ---- socket creation and setup ---------------------------------------- */

SHIM_EXPORT int socket(int domain, int type, int protocol)
{
    int fd = REAL(socket)(domain, type, protocol);
    int base = type & ~(SOCK_NONBLOCK | SOCK_CLOEXEC);
    int *cl = NULL, ncl = 0;
    int saved;

    if (fd < 0 || !SHIM_ACTIVE())
        return fd;
    saved = errno;
    fdt_lock();
    if ((domain == AF_INET || domain == AF_INET6) && base == SOCK_STREAM &&
        (protocol == 0 || protocol == IPPROTO_TCP)) {
        struct fde *e = fdt_create(fd);
        if (e) {
            e->flags = FDE_CANDIDATE;
            e->family = domain;
            set_identity(fd, e);
        }
    } else {
        fdt_remove(fd, &cl, &ncl); /* stale state of a number closed behind our back */
    }
    fdt_unlock();
    fdt_close_list(cl, ncl);
    errno = saved;
    return fd;
}

SHIM_EXPORT int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
    int r = REAL(bind)(fd, addr, len);
    if (r != 0 || !SHIM_ACTIVE() || !addr)
        return r;
    fdt_lock();
    struct fde *e = fdt_get(fd);
    if (e && (e->flags & FDE_CANDIDATE) && len <= sizeof e->bind_addr &&
        (addr->sa_family == AF_INET || addr->sa_family == AF_INET6)) {
        memset(&e->bind_addr, 0, sizeof e->bind_addr);
        memcpy(&e->bind_addr, addr, len);
        e->has_bind = 1;
    }
    fdt_unlock();
    return r;
}

SHIM_EXPORT int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
{
    unsigned flags;
    dev_t dev;
    ino_t ino;
    int r;

    if (!SHIM_ACTIVE())
        return REAL(setsockopt)(fd, level, name, val, len);
    fdt_lock();
    struct fde *e = fdt_get(fd);
    if (!e) {
        fdt_unlock();
        return REAL(setsockopt)(fd, level, name, val, len);
    }
    flags = e->flags;
    dev = e->dev;
    ino = e->ino;
    fdt_unlock();

    /* A per-call socket before its first send: the placeholder is no TCP
     * socket; keep the option for the kept connection (replayed at the lease). */
    if (flags & FDE_PENDING) {
        if (!same_socket(fd, dev, ino)) {
            forget(fd);
            return REAL(setsockopt)(fd, level, name, val, len);
        }
        fdt_lock();
        if ((e = fdt_get(fd)))
            fde_set_opt(e, level, name, val, len);
        fdt_unlock();
        shim_debug("setsockopt(fd %d) before the first send: kept for the lease", fd);
        return 0;
    }
    /* SO_LINGER would turn the program's close into a reset of the kept
     * connection; TCP options cannot apply to a socketpair end (and sipp
     * treats their failure as fatal). */
    if (((flags & FDE_KEPT) && level == SOL_SOCKET && name == SO_LINGER) ||
        ((flags & FDE_PAIR) && level == IPPROTO_TCP)) {
        if (same_socket(fd, dev, ino)) {
            shim_debug("setsockopt(fd %d, %s) on a kept connection: ignored", fd,
                       level == IPPROTO_TCP ? "IPPROTO_TCP option" : "SO_LINGER");
            return 0;
        }
        forget(fd);
        return REAL(setsockopt)(fd, level, name, val, len);
    }
    r = REAL(setsockopt)(fd, level, name, val, len);
    if (r == 0 && !(flags & FDE_KEPT)) {
        fdt_lock();
        if ((e = fdt_get(fd)))
            fde_set_opt(e, level, name, val, len);
        fdt_unlock();
    }
    return r;
}

/* getsockname/getpeername: the kernel's answer, except on a kept fd that is
 * not an inet socket (FDE_PAIR): there the addresses the keeper sent; and on
 * a PENDING fd: the SuT and the program's own socket's local address. */
static int name_common(int fd, struct sockaddr *addr, socklen_t *len, int peer)
{
    struct shim_inaddr a;
    dev_t dev = 0;
    ino_t ino = 0;
    int pair = 0;

    if (SHIM_ACTIVE()) {
        fdt_lock();
        struct fde *e = fdt_get(fd);
        if (e && (e->flags & (FDE_PAIR | FDE_PENDING))) {
            pair = 1;
            a = peer ? e->peer : e->local;
            dev = e->dev;
            ino = e->ino;
        }
        fdt_unlock();
    }
    if (!pair || a.len == 0)
        goto real;
    if (!same_socket(fd, dev, ino)) {
        forget(fd);
        goto real;
    }
    /* The kernel's semantics: copy at most *len bytes, report the full size. */
    if (!len) {
        errno = EFAULT;
        return -1;
    }
    if ((int)*len < 0) {
        errno = EINVAL;
        return -1;
    }
    if (*len && !addr) {
        errno = EFAULT;
        return -1;
    }
    if (*len)
        memcpy(addr, &a.u, *len < a.len ? *len : a.len);
    *len = a.len;
    return 0;
real:
    return peer ? REAL(getpeername)(fd, addr, len) : REAL(getsockname)(fd, addr, len);
}

SHIM_EXPORT int getsockname(int fd, struct sockaddr *addr, socklen_t *len)
{
    return name_common(fd, addr, len, 0);
}

SHIM_EXPORT int getpeername(int fd, struct sockaddr *addr, socklen_t *len)
{
    return name_common(fd, addr, len, 1);
}

SHIM_EXPORT int epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev)
{
    int r = REAL(epoll_ctl)(epfd, op, fd, ev);
    if (r != 0 || !SHIM_ACTIVE())
        return r;
    fdt_lock();
    struct fde *e = fdt_get(fd);
    if (e)
        fde_epoll_update(e, epfd, op, ev);
    fdt_unlock();
    return r;
}

/* ---- client role: connect() ------------------------------------------- */

/* The dup3 onto fd dropped the program's epoll registrations (they belong to
 * the replaced open file description): add them again. */
static void restore_epoll(int fd, const struct fde *snap)
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

/* Lease the client connection (aor: the percent-encoded AoR of a per-call
 * socket, or NULL) and put it on fd in place of what is there (the program's
 * socket, or a PENDING fd's placeholder). 0 (errno = saved_errno) or -1. */
static int handoff_client(int fd, const struct fde *snap, const char *transport,
                          const char *what, int saved_errno, const char *aor)
{
    const struct shim_config *cfg = shim_config();
    char local[64], req[4096], got[64];
    struct ctl_result res;
    struct shim_inaddr kpeer, klocal;
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    int kept, pfl, kfl, pair, *cl = NULL, ncl = 0;

    if (snap->has_bind)
        shim_format_addr((const struct sockaddr *)&snap->bind_addr, local, sizeof local);
    else
        strcpy(local, "-");
    snprintf(req, sizeof req, "LEASE role=client transport=%s remote=%s local=%s%s%s%s", transport,
             cfg->remote_str, local, cfg->reconnect ? " reconnect=1" : "", aor ? " aor=" : "",
             aor ? aor : "");

    ctl_lease(cfg->socket_path, req, &res);
    if (res.status != CTL_OK)
        return lease_failed(&res, what);
    if (res.nfds != 1) {
        res.status = CTL_PROTO;
        snprintf(res.text, sizeof res.text, "a client lease carried %d descriptors, not 1",
                 res.nfds);
        return lease_failed(&res, what);
    }
    kept = res.fds[0];
    kpeer = res.peers[0];
    klocal = res.locals[0];
    ctl_result_free(&res, 0);
    pair = !is_inet(kept);

    /* The kept socket takes the program's O_NONBLOCK setting (file status
     * flags live on the shared open file description). */
    pfl = REAL(fcntl)(fd, F_GETFL);
    kfl = REAL(fcntl)(kept, F_GETFL);
    if (pfl >= 0 && kfl >= 0 && ((pfl ^ kfl) & O_NONBLOCK))
        REAL(fcntl)(kept, F_SETFL, (kfl & ~O_NONBLOCK) | (pfl & O_NONBLOCK));

    if (REAL(dup3)(kept, fd, O_CLOEXEC) < 0) {
        int err = errno;
        char ebuf[128];
        REAL(close)(kept);
        shim_say("fdkeeper: cannot put the kept connection on fd %d: %s", fd,
                 strerror_r(err, ebuf, sizeof ebuf));
        errno = err;
        return -1;
    }
    REAL(close)(kept);
    restore_epoll(fd, snap);
    /* Socket options the program set, except those about its own address
     * and closing, and TCP options on a socketpair end. */
    for (int i = 0; i < snap->nopts; i++) {
        const struct fde_opt *o = &snap->opts[i];
        if (!is_lingerlike(o->level, o->name) && !(pair && o->level == IPPROTO_TCP))
            REAL(setsockopt)(fd, o->level, o->name, o->val, o->len);
    }

    fdt_lock();
    struct fde *e = fdt_get(fd);
    if (!e && (e = fdt_create(fd)))
        e->family = snap->family;
    if (e) {
        fdt_clear_pending(e, &cl, &ncl); /* the placeholder's other end goes too */
        e->flags |= FDE_CANDIDATE | FDE_KEPT | (pair ? FDE_PAIR : 0);
        e->nregs = snap->nregs;
        memcpy(e->regs, snap->regs, sizeof e->regs);
        e->peer = kpeer;
        e->local = klocal;
        set_identity(fd, e);
    }
    fdt_unlock();
    fdt_close_list(cl, ncl);

    if (name_common(fd, (struct sockaddr *)&ss, &sl, 0) == 0)
        shim_format_addr((struct sockaddr *)&ss, got, sizeof got);
    else
        strcpy(got, "?");
    shim_debug("%s: handed over the kept connection %s->%s%s%s%s", what, got, cfg->remote_str,
               aor ? " of " : "", aor ? aor : "",
               pair ? " (a socketpair end the keeper relays)" : "");
    errno = saved_errno;
    return 0;
}

/* FDKEEPER_PER_CALL: connect() to the SuT puts a quiet placeholder on fd
 * (one end of a socketpair whose other end the shim keeps open: never
 * readable, never hung up) and marks it PENDING; the first send leases. */
static int placeholder_connect(int fd, const struct fde *snap, const struct sockaddr *addr,
                               socklen_t alen, const char *what, int saved_errno)
{
    struct shim_inaddr peer, local;
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    char ebuf[128];
    int sp[2], fl, err;

    memset(&peer, 0, sizeof peer);
    memset(&local, 0, sizeof local);
    if (alen <= sizeof peer.u) { /* getpeername: what the kernel would say */
        peer.len = alen;
        memcpy(&peer.u, addr, alen);
    }
    if (REAL(getsockname)(fd, (struct sockaddr *)&ss, &sl) == 0 && sl <= sizeof local.u &&
        (ss.ss_family == AF_INET || ss.ss_family == AF_INET6)) {
        local.len = sl;
        memcpy(&local.u, &ss, sl);
    }
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp) != 0) {
        err = errno;
        shim_say("fdkeeper: %s: cannot make the placeholder of a per-call connection: %s", what,
                 strerror_r(err, ebuf, sizeof ebuf));
        errno = err;
        return -1;
    }
    /* The program's O_NONBLOCK (set for the connect) goes with it. */
    fl = REAL(fcntl)(fd, F_GETFL);
    if (fl >= 0 && (fl & O_NONBLOCK))
        REAL(fcntl)(sp[0], F_SETFL, O_RDWR | O_NONBLOCK);
    if (REAL(dup3)(sp[0], fd, O_CLOEXEC) < 0) {
        err = errno;
        REAL(close)(sp[0]);
        REAL(close)(sp[1]);
        shim_say("fdkeeper: %s: cannot put the placeholder of a per-call connection on fd %d: %s",
                 what, fd, strerror_r(err, ebuf, sizeof ebuf));
        errno = err;
        return -1;
    }
    REAL(close)(sp[0]);
    restore_epoll(fd, snap);

    fdt_lock();
    struct fde *e = fdt_get(fd);
    err = !e || fdt_set_pending(e, sp[1]) != 0;
    if (!err) {
        e->peer = peer;
        e->local = local;
        set_identity(fd, e);
    }
    fdt_unlock();
    if (err) {
        REAL(close)(sp[1]);
        shim_say("fdkeeper: %s: out of memory for a per-call connection", what);
        errno = ENOMEM;
        return -1;
    }
    shim_debug("%s: per-call connection, leased at its first send (placeholder on fd %d)", what,
               fd);
    errno = saved_errno;
    return 0;
}

SHIM_EXPORT int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    const struct shim_config *cfg = shim_config();
    struct fde snap;
    int candidate = 0, pending = 0, saved = errno;

    if (!cfg->active || cfg->role != SHIM_ROLE_CLIENT)
        return REAL(connect)(fd, addr, len);
    fdt_lock();
    struct fde *e = fdt_get(fd);
    if (e && (e->flags & FDE_PENDING)) {
        snap = *e;
        pending = 1;
    } else if (e && (e->flags & FDE_CANDIDATE) && !(e->flags & FDE_KEPT)) {
        snap = *e;
        candidate = 1;
    }
    fdt_unlock();
    if (pending) { /* "connected" already, as far as the program knows */
        if (!same_socket(fd, snap.dev, snap.ino)) {
            forget(fd);
            return REAL(connect)(fd, addr, len);
        }
        errno = EISCONN;
        return -1;
    }
    if (!candidate)
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
    if (!same_socket(fd, snap.dev, snap.ino)) {
        forget(fd);
        return REAL(connect)(fd, addr, len);
    }
    {
        char what[96];
        const char *transport;
        snprintf(what, sizeof what, "connect(fd %d) to %s", fd, cfg->remote_str);
        if (!(transport = lease_transport(what))) {
            errno = saved;
            return REAL(connect)(fd, addr, len);
        }
        if (cfg->per_call)
            return placeholder_connect(fd, &snap, addr, len, what, saved);
        return handoff_client(fd, &snap, transport, what, saved, NULL);
    }
}

/* ---- client role, per call: the first send ---------------------------- */

#define MAX_AOR 3000            /* percent-encoded; the LEASE must fit in 4096 bytes */
#define MAX_FLAT (64 * 1024)    /* bytes of a writev/sendmsg looked at for the From header */

/* If fd is PENDING: lease the connection of the first message's From AoR
 * onto fd. buf/len, or iov/iovcnt (writev, sendmsg), is what the program is
 * sending. 0: go on with the real call; -1: fail it (errno set). */
static int first_send(int fd, const void *buf, size_t len, const struct iovec *iov,
                      size_t iovcnt, const char *call)
{
    const struct shim_config *cfg = shim_config();
    struct fde snap;
    char aor[MAX_AOR], what[128];
    const char *transport;
    char *flat = NULL;
    int pending = 0, n, saved = errno;

    fdt_lock();
    struct fde *e = fdt_get(fd);
    if (e && (e->flags & FDE_PENDING)) {
        snap = *e;
        pending = 1;
    }
    fdt_unlock();
    if (!pending)
        return 0;
    if (!same_socket(fd, snap.dev, snap.ino)) {
        forget(fd);
        return 0;
    }
    if (iov) {
        size_t total = 0;
        for (size_t i = 0; i < iovcnt && total < MAX_FLAT; i++)
            total += iov[i].iov_len < MAX_FLAT ? iov[i].iov_len : MAX_FLAT;
        if (total > MAX_FLAT)
            total = MAX_FLAT;
        if (total && !(flat = malloc(total))) {
            errno = ENOMEM;
            return -1;
        }
        len = 0;
        for (size_t i = 0; i < iovcnt && len < total; i++) {
            size_t k = iov[i].iov_len < total - len ? iov[i].iov_len : total - len;
            memcpy(flat + len, iov[i].iov_base, k);
            len += k;
        }
        buf = flat;
    }
    if (len == 0 || !buf) { /* nothing that names a user; the placeholder takes it */
        free(flat);
        errno = saved;
        return 0;
    }
    snprintf(what, sizeof what, "%s(fd %d) to %s", call, fd, cfg->remote_str);
    n = shim_from_aor(buf, len, aor, sizeof aor);
    free(flat);
    if (n <= 0) {
        shim_say("fdkeeper: %s: %s; with FDKEEPER_PER_CALL=1 each connection is leased for the "
                 "user (AoR) in the From header of the first SIP message sent on it",
                 what, n == 0 ? "the first message on this per-call connection has no From "
                                "header (is it SIP?)"
                              : "the From URI of the first message is too long");
        errno = ECONNREFUSED;
        return -1;
    }
    if (!(transport = lease_transport(what))) { /* checked at connect(): cannot happen */
        errno = ECONNREFUSED;
        return -1;
    }
    return handoff_client(fd, &snap, transport, what, saved, aor);
}

SHIM_EXPORT ssize_t send(int fd, const void *buf, size_t len, int flags)
{
    if (fdt_pending_sends() && first_send(fd, buf, len, NULL, 0, "send") != 0)
        return -1;
    return REAL(send)(fd, buf, len, flags);
}

SHIM_EXPORT ssize_t sendto(int fd, const void *buf, size_t len, int flags,
                           const struct sockaddr *addr, socklen_t alen)
{
    if (fdt_pending_sends() && first_send(fd, buf, len, NULL, 0, "sendto") != 0)
        return -1;
    return REAL(sendto)(fd, buf, len, flags, addr, alen);
}

SHIM_EXPORT ssize_t sendmsg(int fd, const struct msghdr *msg, int flags)
{
    if (fdt_pending_sends() && msg && msg->msg_iov &&
        first_send(fd, NULL, 0, msg->msg_iov, msg->msg_iovlen, "sendmsg") != 0)
        return -1;
    return REAL(sendmsg)(fd, msg, flags);
}

SHIM_EXPORT ssize_t write(int fd, const void *buf, size_t len)
{
    if (fdt_pending_sends() && first_send(fd, buf, len, NULL, 0, "write") != 0)
        return -1;
    return REAL(write)(fd, buf, len);
}

SHIM_EXPORT ssize_t writev(int fd, const struct iovec *iov, int iovcnt)
{
    if (fdt_pending_sends() && iov && iovcnt > 0 &&
        first_send(fd, NULL, 0, iov, (size_t)iovcnt, "writev") != 0)
        return -1;
    return REAL(writev)(fd, iov, iovcnt);
}

/* ---- server role: listen(), epoll_wait(), accept() -------------------- */

static int server_leased; /* the first listening candidate got its lease */

SHIM_EXPORT int listen(int fd, int backlog)
{
    const struct shim_config *cfg = shim_config();
    struct ctl_result res;
    char req[256], what[64];
    const char *transport;
    int go = 0, n, saved;
    int r = REAL(listen)(fd, backlog);

    if (r != 0 || !cfg->active || cfg->role != SHIM_ROLE_SERVER)
        return r;
    fdt_lock();
    struct fde *e = fdt_get(fd);
    if (e && (e->flags & FDE_CANDIDATE) && !(e->flags & FDE_KEPT) && !server_leased) {
        server_leased = 1;
        go = 1;
    }
    fdt_unlock();
    if (!go)
        return r;
    saved = errno;

    snprintf(what, sizeof what, "listen(fd %d)", fd);
    if (!(transport = lease_transport(what))) {
        errno = saved;
        return r;
    }
    snprintf(req, sizeof req, "LEASE role=server transport=%s%s%s", transport,
             cfg->have_remote ? " remote=" : "", cfg->have_remote ? cfg->remote_str : "");
    ctl_lease(cfg->socket_path, req, &res);
    if (res.status != CTL_OK)
        return lease_failed(&res, what);

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
    errno = saved;
    return 0;
}

/* Report listeners with pending kept connections as readable. */
static int inject_wait(int epfd, struct epoll_event *events, int maxevents, int timeout,
                       const sigset_t *sigmask, int pwait)
{
    struct epoll_event inj[MAX_INJECT];
    int k, n = 0;

    if (!SHIM_ACTIVE() || fdt_pending_total() == 0 || maxevents <= 0)
        goto real;
    fdt_lock();
    k = fdt_pending_events(epfd, inj, MAX_INJECT);
    fdt_unlock();
    if (k == 0)
        goto real;
    if (k > maxevents)
        k = maxevents;
    if (maxevents - k > 0) {
        /* Never block, never overflow the caller's array. */
        n = pwait ? REAL(epoll_pwait)(epfd, events, maxevents - k, 0, sigmask)
                  : REAL(epoll_wait)(epfd, events, maxevents - k, 0);
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
real:
    return pwait ? REAL(epoll_pwait)(epfd, events, maxevents, timeout, sigmask)
                 : REAL(epoll_wait)(epfd, events, maxevents, timeout);
}

SHIM_EXPORT int epoll_wait(int epfd, struct epoll_event *events, int maxevents, int timeout)
{
    return inject_wait(epfd, events, maxevents, timeout, NULL, 0);
}

SHIM_EXPORT int epoll_pwait(int epfd, struct epoll_event *events, int maxevents, int timeout,
                            const sigset_t *sigmask)
{
    return inject_wait(epfd, events, maxevents, timeout, sigmask, 1);
}

static int accept_common(int fd, struct sockaddr *addr, socklen_t *alen, int flags, int four)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    struct fde_item it;
    int nfd, fl, pair, saved = errno;

    if (!SHIM_ACTIVE() || fdt_pending_total() == 0)
        goto real;
    fdt_lock();
    nfd = fdt_pending_pop(fd, &it);
    fdt_unlock();
    if (nfd < 0)
        goto real;
    pair = !is_inet(nfd);

    /* What a real accept4() gives: O_NONBLOCK only on request; close-on-exec
     * always (a kept connection must not leak into exec()ed children). */
    fl = REAL(fcntl)(nfd, F_GETFL);
    if (fl >= 0) {
        int want = (flags & SOCK_NONBLOCK) ? (fl | O_NONBLOCK) : (fl & ~O_NONBLOCK);
        if (want != fl)
            REAL(fcntl)(nfd, F_SETFL, want);
    }
    REAL(fcntl)(nfd, F_SETFD, FD_CLOEXEC);

    memset(&ss, 0, sizeof ss);
    if (pair && it.peer.len) { /* a socketpair end: the TLS connection's peer */
        memcpy(&ss, &it.peer.u, it.peer.len);
        sl = it.peer.len;
    } else if (REAL(getpeername)(nfd, (struct sockaddr *)&ss, &sl) != 0) {
        sl = 0; /* the SuT already went away; the read will tell the program */
    }
    if (addr && alen) {
        memcpy(addr, &ss, *alen < sl ? *alen : sl);
        *alen = sl;
    }

    fdt_lock();
    struct fde *e = fdt_create(nfd);
    if (e) {
        e->flags = FDE_CANDIDATE | FDE_KEPT | (pair ? FDE_PAIR : 0);
        e->family = ss.ss_family;
        e->peer = it.peer;
        e->local = it.local;
        set_identity(nfd, e);
    }
    fdt_unlock();
    if (shim_config()->debug) {
        char a[64];
        shim_format_addr((struct sockaddr *)&ss, a, sizeof a);
        shim_debug("accept(fd %d): handed over the kept connection from %s as fd %d", fd, a, nfd);
    }
    errno = saved;
    return nfd;
real:
    return four ? REAL(accept4)(fd, addr, alen, flags) : REAL(accept)(fd, addr, alen);
}

SHIM_EXPORT int accept(int fd, struct sockaddr *addr, socklen_t *alen)
{
    return accept_common(fd, addr, alen, 0, 0);
}

SHIM_EXPORT int accept4(int fd, struct sockaddr *addr, socklen_t *alen, int flags)
{
    return accept_common(fd, addr, alen, flags, 1);
}

/* ---- kept fds: shutdown, close ---------------------------------------- */

SHIM_EXPORT int shutdown(int fd, int how)
{
    dev_t dev = 0;
    ino_t ino = 0;
    int kept = 0;

    if (!SHIM_ACTIVE())
        return REAL(shutdown)(fd, how);
    fdt_lock();
    struct fde *e = fdt_get(fd);
    if (e && (e->flags & (FDE_KEPT | FDE_PENDING))) {
        kept = (e->flags & FDE_KEPT) ? 1 : 2;
        dev = e->dev;
        ino = e->ino;
    }
    fdt_unlock();
    if (!kept)
        return REAL(shutdown)(fd, how);
    if (!same_socket(fd, dev, ino)) {
        forget(fd);
        return REAL(shutdown)(fd, how);
    }
    if (kept == 1)
        shim_debug("shutdown(fd %d) on a kept connection: ignored (the keeper keeps it open)", fd);
    else
        shim_debug("shutdown(fd %d) on a per-call connection before its first send: ignored", fd);
    return 0;
}

SHIM_EXPORT int close(int fd)
{
    int *cl = NULL, ncl = 0, kept = 0;

    if (!SHIM_ACTIVE())
        return REAL(close)(fd);
    fdt_lock();
    struct fde *e = fdt_get(fd);
    if (e) {
        kept = (e->flags & FDE_KEPT) != 0;
        fdt_remove(fd, &cl, &ncl); /* a PENDING fd's placeholder peer, when the last */
    }
    fdt_unlock();
    if (e) {
        fdt_close_list(cl, ncl);
        if (kept)
            shim_debug("close(fd %d): kept connection released to the keeper", fd);
    }
    return REAL(close)(fd);
}

/* ---- dup family: the copy inherits the state ---------------------------- */

static void after_dup(int from, int to)
{
    int *cl = NULL, ncl = 0;
    int saved = errno;
    fdt_lock();
    fdt_copy(from, to, &cl, &ncl);
    fdt_unlock();
    fdt_close_list(cl, ncl);
    errno = saved;
}

SHIM_EXPORT int dup(int old)
{
    int r = REAL(dup)(old);
    if (r >= 0 && SHIM_ACTIVE())
        after_dup(old, r);
    return r;
}

SHIM_EXPORT int dup2(int old, int new)
{
    int r = REAL(dup2)(old, new);
    if (r >= 0 && old != new && SHIM_ACTIVE())
        after_dup(old, r);
    return r;
}

SHIM_EXPORT int dup3(int old, int new, int flags)
{
    int r = REAL(dup3)(old, new, flags);
    if (r >= 0 && SHIM_ACTIVE())
        after_dup(old, r);
    return r;
}

/* fcntl is variadic; like cwrap, pass the one argument on as a pointer-sized
 * value (int and pointer arguments both travel in a register on the ABIs
 * glibc supports). fcntl and fcntl64 differ only in the real symbol called. */
static int fcntl_tracked(int (*real)(int, int, ...), int fd, int cmd, void *arg)
{
    int r = real(fd, cmd, arg);
    if (r >= 0 && (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC) && SHIM_ACTIVE())
        after_dup(fd, r);
    return r;
}

SHIM_EXPORT int fcntl(int fd, int cmd, ...)
{
    va_list ap;
    void *arg;

    va_start(ap, cmd);
    arg = va_arg(ap, void *);
    va_end(ap);
    return fcntl_tracked(REAL(fcntl), fd, cmd, arg);
}

SHIM_EXPORT int fcntl64(int fd, int cmd, ...)
{
    va_list ap;
    void *arg;

    va_start(ap, cmd);
    arg = va_arg(ap, void *);
    va_end(ap);
    return fcntl_tracked(REAL(fcntl64), fd, cmd, arg);
}
