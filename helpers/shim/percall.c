/* Per call (see helpers/README.md): connect() gets a placeholder, the first
 * send leases the connection of the message's From AoR (handoff_lease). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "handoff.h"
#include "kept.h"
#include "lease.h"
#include "leasecache.h"
#include "percall.h"
#include "real.h"
#include "rewrite.h"

#define MAX_AOR 3000            /* percent-encoded; the LEASE must fit in 4096 bytes */
#define MAX_FLAT (64 * 1024)    /* bytes of a writev/sendmsg looked at for the From header */

/* What getpeername (the connect() address) and getsockname (the program's
 * own socket's local address) answer while fd is PENDING. */
static void pending_names(int fd, const struct sockaddr *addr, socklen_t alen,
                          struct shim_inaddr *peer, struct shim_inaddr *local)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;

    memset(peer, 0, sizeof *peer);
    memset(local, 0, sizeof *local);
    if (alen <= sizeof peer->u) {
        peer->len = alen;
        memcpy(&peer->u, addr, alen);
    }
    if (REAL(getsockname)(fd, (struct sockaddr *)&ss, &sl) == 0 && sl <= sizeof local->u &&
        (ss.ss_family == AF_INET || ss.ss_family == AF_INET6)) {
        local->len = sl;
        /* getsockname filled ss: cppcheck cannot see through REAL()'s function pointer. */
        /* cppcheck-suppress uninitvar */
        memcpy(&local->u, &ss, sl);
    }
}

/* One end of a fresh socketpair on fd (the program's O_NONBLOCK, set for the
 * connect, goes with it); the other end in *other. 0 or -1 (said). */
static int put_placeholder(int fd, const char *what, int *other)
{
    char ebuf[128];
    int sp[2], err;

    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp) != 0 &&
        (!lc_gave_way() || socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp) != 0)) {
        err = errno;
        shim_say("fdkeeper: %s: cannot make the placeholder of a per-call connection: %s", what,
                 strerror_r(err, ebuf, sizeof ebuf));
        errno = err;
        return -1;
    }
    if (handoff_dup_onto(sp[0], fd) != 0) {
        err = errno;
        REAL(close)(sp[1]);
        shim_say("fdkeeper: %s: cannot put the placeholder of a per-call connection on fd %d: %s",
                 what, fd, strerror_r(err, ebuf, sizeof ebuf));
        errno = err;
        return -1;
    }
    *other = sp[1];
    return 0;
}

int percall_placeholder(int fd, const struct fde *snap, const struct sockaddr *addr,
                        socklen_t alen, const char *what, int saved_errno)
{
    struct shim_inaddr peer, local;
    int other, err;

    pending_names(fd, addr, alen, &peer, &local);
    if (put_placeholder(fd, what, &other) != 0)
        return -1;
    handoff_restore_epoll(fd, snap);

    fdt_lock();
    struct fde *e = fdt_get(fd);
    err = !e || fdt_set_pending(e, other) != 0;
    if (!err) {
        e->peer = peer;
        e->local = local;
        fde_set_identity(fd, e);
    }
    fdt_unlock();
    if (err) {
        REAL(close)(other);
        shim_say("fdkeeper: %s: out of memory for a per-call connection", what);
        errno = ENOMEM;
        return -1;
    }
    shim_debug("%s: per-call connection, leased at its first send (placeholder on fd %d)", what,
               fd);
    errno = saved_errno;
    return 0;
}

static int is_wildcard(const struct sockaddr *sa)
{
    if (sa->sa_family == AF_INET)
        return ((const struct sockaddr_in *)sa)->sin_addr.s_addr == htonl(INADDR_ANY);
    return sa->sa_family == AF_INET6 &&
           IN6_IS_ADDR_UNSPECIFIED(&((const struct sockaddr_in6 *)sa)->sin6_addr);
}

static unsigned short port_of(const struct sockaddr *sa)
{
    if (sa->sa_family == AF_INET)
        return ntohs(((const struct sockaddr_in *)sa)->sin_port);
    return ntohs(((const struct sockaddr_in6 *)sa)->sin6_port);
}

/* The placeholder's "IP:PORT" as the program wrote it ([local_ip]:[local_port]):
 * a socket bound to the wildcard (sipp without -i) is written with the
 * address the connection is made from, which is the kept connection's. */
static void placeholder_text(const struct shim_inaddr *ph, const struct sockaddr *kept,
                             char *out, size_t n)
{
    struct sockaddr_storage ss;

    if (!is_wildcard(&ph->u.sa) || kept->sa_family != ph->u.sa.sa_family) {
        shim_format_addr(&ph->u.sa, out, n);
        return;
    }
    memcpy(&ss, kept, kept->sa_family == AF_INET ? sizeof(struct sockaddr_in)
                                                  : sizeof(struct sockaddr_in6));
    if (ss.ss_family == AF_INET)
        ((struct sockaddr_in *)&ss)->sin_port = ph->u.in.sin_port;
    else
        ((struct sockaddr_in6 *)&ss)->sin6_port = ph->u.in6.sin6_port;
    shim_format_addr((struct sockaddr *)&ss, out, n);
}

/* After the handoff: what fd sends names the kept connection's address, not
 * the placeholder's (the program read its port before the user was known). */
static void rewrite_placeholder(int fd, const struct shim_inaddr *ph, const char *what)
{
    static int warned;
    struct sockaddr_storage ks;
    socklen_t kl = sizeof ks;
    char from[RW_MAX_ADDR], to[RW_MAX_ADDR];
    struct rw_pair pair;
    int ok;

    if (!ph->len || port_of(&ph->u.sa) == 0 || kept_getname(fd, (struct sockaddr *)&ks, &kl, 0) != 0 ||
        (ks.ss_family != AF_INET && ks.ss_family != AF_INET6))
        return; /* the program bound no port of its own: it wrote none */
    placeholder_text(ph, (struct sockaddr *)&ks, from, sizeof from);
    shim_format_addr((struct sockaddr *)&ks, to, sizeof to);
    if (strcmp(from, to) == 0)
        return;
    if (rw_pair_set(&pair, from, to) != 0) {
        if (!__atomic_exchange_n(&warned, 1, __ATOMIC_RELAXED))
            shim_say("fdkeeper: %s: the kept connection's address %s and the per-call socket's "
                     "%s differ in length; messages keep the per-call socket's port (a SuT that "
                     "aliases Via ports to connections sees a new one per call)", what, to, from);
        return;
    }
    fdt_lock();
    struct fde *e = fdt_get(fd);
    ok = e && (e->flags & FDE_KEPT) && fdt_set_rewrite(e, &pair) == 0;
    fdt_unlock();
    if (ok)
        shim_debug("%s: %s rewritten to %s in what fd %d sends", what, from, to, fd);
}

/* The first MAX_FLAT bytes of iov in one malloc'ed buffer (*len: its size);
 * NULL with *len 0 when there is nothing, or without memory (*len not 0). */
static char *flatten(const struct iovec *iov, size_t iovcnt, size_t *len)
{
    size_t total = 0, n = 0;
    char *flat;

    for (size_t i = 0; i < iovcnt && total < MAX_FLAT; i++)
        total += iov[i].iov_len < MAX_FLAT ? iov[i].iov_len : MAX_FLAT;
    if (total > MAX_FLAT)
        total = MAX_FLAT;
    *len = total;
    if (!total || !(flat = malloc(total)))
        return NULL;
    for (size_t i = 0; i < iovcnt && n < total; i++) {
        size_t k = iov[i].iov_len < total - n ? iov[i].iov_len : total - n;
        memcpy(flat + n, iov[i].iov_base, k);
        n += k;
    }
    return flat;
}

/* The AoR of the message into aor; 0, or -1 after one stderr line (ECONNREFUSED). */
static int message_aor(const char *buf, size_t len, char *aor, const char *what)
{
    int n = shim_from_aor(buf, len, aor, MAX_AOR);

    if (n > 0)
        return 0;
    shim_say("fdkeeper: %s: %s; with FDKEEPER_PER_CALL=1 each connection is leased for the "
             "user (AoR) in the From header of the first SIP message sent on it",
             what, n == 0 ? "the first message on this per-call connection has no From "
                            "header (is it SIP?)"
                          : "the From URI of the first message is too long");
    errno = ECONNREFUSED;
    return -1;
}

int percall_first_send(int fd, const void *buf, size_t len, const struct iovec *iov,
                       size_t iovcnt, const char *call)
{
    const struct shim_config *cfg = shim_config();
    struct fde snap;
    char aor[MAX_AOR], what[128];
    const char *transport;
    char *flat = NULL;
    int r, saved = errno;

    if (!fdt_lookup(fd, FDE_PENDING, &snap))
        return 0;
    if (iov) {
        buf = flat = flatten(iov, iovcnt, &len);
        if (!flat && len) {
            errno = ENOMEM;
            return -1;
        }
    }
    if (len == 0 || !buf) { /* nothing that names a user; the placeholder takes it */
        errno = saved;
        return 0;
    }
    snprintf(what, sizeof what, "%s(fd %d) to %s", call, fd, cfg->remote_str);
    r = message_aor(buf, len, aor, what);
    free(flat);
    if (r != 0)
        return -1;
    if (!(transport = lease_transport(what))) { /* checked at connect(): cannot happen */
        errno = ECONNREFUSED;
        return -1;
    }
    if (handoff_lease(fd, &snap, transport, what, saved, aor) != 0)
        return -1;
    rewrite_placeholder(fd, &snap.local, what);
    errno = saved;
    return 0;
}

/* The program's call on fd, as it made it. */
static ssize_t real_send(int fd, const void *buf, size_t len, int flags,
                         const struct sockaddr *addr, socklen_t alen, enum percall_call how)
{
    if (how == PERCALL_WRITE)
        return REAL(write)(fd, buf, len);
    if (how == PERCALL_SENDTO)
        return REAL(sendto)(fd, buf, len, flags, addr, alen);
    return REAL(send)(fd, buf, len, flags);
}

static ssize_t planned_send(int fd, struct rw_send *s, int flags, const struct sockaddr *addr,
                            socklen_t alen, enum percall_call how)
{
    struct msghdr mh;

    if (how == PERCALL_WRITE)
        return REAL(writev)(fd, s->iov, s->iovcnt);
    memset(&mh, 0, sizeof mh);
    mh.msg_iov = s->iov;
    mh.msg_iovlen = (size_t)s->iovcnt;
    if (how == PERCALL_SENDTO) {
        mh.msg_name = (void *)addr;
        mh.msg_namelen = alen;
    }
    return REAL(sendmsg)(fd, &mh, flags);
}

ssize_t percall_send(int fd, const void *buf, size_t len, int flags, const struct sockaddr *addr,
                     socklen_t alen, enum percall_call how)
{
    struct rw_pair pair;
    struct rw_tail tail;
    struct rw_send plan;
    ssize_t r;
    int err;

    if (!buf || !fdt_rewrite_take(fd, &pair, &tail))
        return real_send(fd, buf, len, flags, addr, alen, how);
    if (rw_plan(&pair, &tail, buf, len, &plan) != 0) {
        fdt_rewrite_put(fd, &tail);
        errno = ENOMEM; /* nothing sent: the program tries again, as after EAGAIN */
        return -1;
    }
    r = plan.changed ? planned_send(fd, &plan, flags, addr, alen, how)
                     : real_send(fd, buf, len, flags, addr, alen, how);
    err = errno;
    rw_done(&tail, &plan, r > 0 ? (size_t)r : 0);
    fdt_rewrite_put(fd, &tail);
    errno = err;
    return r;
}
