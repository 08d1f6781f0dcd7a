/* Calls on tracked fds, whatever the mode (see kept.h). Each costs at most
 * one table lookup on an fd that is not ours. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <string.h>
#include <unistd.h>

#include "fdtable.h"
#include "kept.h"
#include "leasecache.h"
#include "real.h"

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

static int is_tcp_socket(int domain, int type, int protocol)
{
    int base = type & ~(SOCK_NONBLOCK | SOCK_CLOEXEC);
    return (domain == AF_INET || domain == AF_INET6) && base == SOCK_STREAM &&
           (protocol == 0 || protocol == IPPROTO_TCP);
}

int kept_socket(int domain, int type, int protocol)
{
    int fd = REAL(socket)(domain, type, protocol);
    int saved;

    /* The lease cache's copies take descriptors the program's own sockets come before. */
    if (fd < 0 && SHIM_ACTIVE() && lc_gave_way())
        fd = REAL(socket)(domain, type, protocol);
    saved = errno;

    if (fd < 0 || !SHIM_ACTIVE())
        return fd;
    if (!is_tcp_socket(domain, type, protocol)) {
        fdt_forget(fd); /* stale state of a number closed behind our back */
        return fd;
    }
    fdt_lock();
    struct fde *e = fdt_create(fd);
    if (e) {
        e->flags = FDE_CANDIDATE;
        e->family = domain;
        fde_set_identity(fd, e);
    }
    fdt_unlock();
    errno = saved;
    return fd;
}

int kept_bind(int fd, const struct sockaddr *addr, socklen_t len)
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

/* Keep an option for the connection that will replace the socket (replayed at the handoff). */
static void remember_opt(int fd, int level, int name, const void *val, socklen_t len)
{
    fdt_lock();
    struct fde *e = fdt_get(fd);
    if (e)
        fde_set_opt(e, level, name, val, len);
    fdt_unlock();
}

int kept_setsockopt(int fd, int level, int name, const void *val, socklen_t len)
{
    struct fde snap;
    int r;

    if (!SHIM_ACTIVE() || !fdt_lookup(fd, FDE_ANY, &snap))
        return REAL(setsockopt)(fd, level, name, val, len);
    /* A per-call socket before its first send: the placeholder is no TCP socket. */
    if (snap.flags & FDE_PENDING) {
        remember_opt(fd, level, name, val, len);
        shim_debug("setsockopt(fd %d) before the first send: kept for the lease", fd);
        return 0;
    }
    /* SO_LINGER would turn the program's close into a reset of the kept
     * connection; TCP options cannot apply to a socketpair end (and sipp
     * treats their failure as fatal). */
    if (((snap.flags & FDE_KEPT) && level == SOL_SOCKET && name == SO_LINGER) ||
        ((snap.flags & FDE_PAIR) && level == IPPROTO_TCP)) {
        shim_debug("setsockopt(fd %d, %s) on a kept connection: ignored", fd,
                   level == IPPROTO_TCP ? "IPPROTO_TCP option" : "SO_LINGER");
        return 0;
    }
    r = REAL(setsockopt)(fd, level, name, val, len);
    if (r == 0 && !(snap.flags & FDE_KEPT))
        remember_opt(fd, level, name, val, len);
    return r;
}

/* getsockname/getpeername: the kernel's answer, except on a kept fd that is
 * not an inet socket (FDE_PAIR): there the addresses the keeper sent; and on
 * a PENDING fd: the SuT and the program's own socket's local address. */
int kept_getname(int fd, struct sockaddr *addr, socklen_t *len, int peer)
{
    struct fde snap;
    const struct shim_inaddr *a;

    if (!SHIM_ACTIVE() || !fdt_lookup(fd, FDE_PAIR | FDE_PENDING, &snap) ||
        (a = peer ? &snap.peer : &snap.local)->len == 0)
        return peer ? REAL(getpeername)(fd, addr, len) : REAL(getsockname)(fd, addr, len);
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
        memcpy(addr, &a->u, *len < a->len ? *len : a->len);
    *len = a->len;
    return 0;
}

int kept_epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev)
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

int kept_shutdown(int fd, int how)
{
    struct fde snap;

    if (!SHIM_ACTIVE() || !fdt_lookup(fd, FDE_KEPT | FDE_PENDING, &snap))
        return REAL(shutdown)(fd, how);
    if (snap.flags & FDE_KEPT)
        shim_debug("shutdown(fd %d) on a kept connection: ignored (the keeper keeps it open)", fd);
    else
        shim_debug("shutdown(fd %d) on a per-call connection before its first send: ignored", fd);
    return 0;
}

/* close() only closes the program's descriptor: a kept connection goes on in
 * the keeper. A PENDING fd's placeholder peer closes with its last copy. */
int kept_close(int fd)
{
    if (!SHIM_ACTIVE())
        return REAL(close)(fd);
    if (fdt_forget(fd) & FDE_KEPT)
        shim_debug("close(fd %d): kept connection released to the keeper", fd);
    lc_lost_fd(fd); /* a number of the lease cache's the program closes is the program's */
    return REAL(close)(fd);
}

/* close_range(): what close() does, for every fd in the range. With
 * CLOSE_RANGE_CLOEXEC nothing closes (kept fds are close-on-exec already). */
int kept_close_range(unsigned first, unsigned last, int flags)
{
    real_close_range_t real = REAL(close_range);

    if (!real) { /* glibc before 2.34 */
        errno = ENOSYS;
        return -1;
    }
    if (SHIM_ACTIVE() && first <= last && !(flags & CLOSE_RANGE_CLOEXEC)) {
        if (fdt_forget_range(first, last) & FDE_KEPT)
            shim_debug("close_range(%u, %u): kept connections released to the keeper", first, last);
        lc_lost_range(first, last);
    }
    return real(first, last, flags);
}

int kept_dup_result(int old, int r)
{
    if (r >= 0 && r != old && SHIM_ACTIVE()) {
        lc_lost_fd(r); /* dup2/dup3 onto a number of the lease cache's closed our copy */
        fdt_note_dup(old, r);
    }
    return r;
}

int kept_fcntl(int (*real)(int, int, ...), int fd, int cmd, void *arg)
{
    int r = real(fd, cmd, arg);
    if (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC)
        return kept_dup_result(fd, r);
    return r;
}
