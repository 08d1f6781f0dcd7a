/* The exported hooks: the only symbols the shim exports. Each is a thin
 * call into the logic, as proxychains-ng keeps its hooks:
 *   kept.c     calls on tracked fds whatever the mode (setup recorded for a
 *              handoff; kept connections used, copied, closed)
 *   client.c   connect() handoff (client role); percall.c: lease at the first send
 *   server.c   kept connections offered as accepted ones (server role)
 *
 * Reads (recv, recvfrom, read, ...) are not interposed at all. The send
 * family is, for the per-call mode only: while no fd is PENDING or REWRITE it
 * costs one atomic load, otherwise one table lookup. */
#define _GNU_SOURCE
#include <stdarg.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "client.h"
#include "fdtable.h"
#include "kept.h"
#include "percall.h"
#include "real.h"
#include "server.h"

/* ---- socket setup and names ---------------------------------------------- */

SHIM_EXPORT int socket(int domain, int type, int protocol)
{
    return kept_socket(domain, type, protocol);
}

SHIM_EXPORT int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
    return kept_bind(fd, addr, len);
}

SHIM_EXPORT int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
{
    return kept_setsockopt(fd, level, name, val, len);
}

SHIM_EXPORT int getsockname(int fd, struct sockaddr *addr, socklen_t *len)
{
    return kept_getname(fd, addr, len, 0);
}

SHIM_EXPORT int getpeername(int fd, struct sockaddr *addr, socklen_t *len)
{
    return kept_getname(fd, addr, len, 1);
}

SHIM_EXPORT int epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev)
{
    return kept_epoll_ctl(epfd, op, fd, ev);
}

/* ---- client role ---------------------------------------------------------- */

SHIM_EXPORT int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    return client_connect(fd, addr, len);
}

SHIM_EXPORT ssize_t send(int fd, const void *buf, size_t len, int flags)
{
    if (fdt_pending_sends() && percall_first_send(fd, buf, len, NULL, 0, "send") != 0)
        return -1;
    if (fdt_rewrite_fds())
        return percall_send(fd, buf, len, flags, NULL, 0, PERCALL_SEND);
    return REAL(send)(fd, buf, len, flags);
}

SHIM_EXPORT ssize_t sendto(int fd, const void *buf, size_t len, int flags,
                           const struct sockaddr *addr, socklen_t alen)
{
    if (fdt_pending_sends() && percall_first_send(fd, buf, len, NULL, 0, "sendto") != 0)
        return -1;
    if (fdt_rewrite_fds())
        return percall_send(fd, buf, len, flags, addr, alen, PERCALL_SENDTO);
    return REAL(sendto)(fd, buf, len, flags, addr, alen);
}

SHIM_EXPORT ssize_t sendmsg(int fd, const struct msghdr *msg, int flags)
{
    if (fdt_pending_sends() && msg && msg->msg_iov &&
        percall_first_send(fd, NULL, 0, msg->msg_iov, msg->msg_iovlen, "sendmsg") != 0)
        return -1;
    return REAL(sendmsg)(fd, msg, flags);
}

SHIM_EXPORT ssize_t write(int fd, const void *buf, size_t len)
{
    if (fdt_pending_sends() && percall_first_send(fd, buf, len, NULL, 0, "write") != 0)
        return -1;
    if (fdt_rewrite_fds())
        return percall_send(fd, buf, len, 0, NULL, 0, PERCALL_WRITE);
    return REAL(write)(fd, buf, len);
}

SHIM_EXPORT ssize_t writev(int fd, const struct iovec *iov, int iovcnt)
{
    if (fdt_pending_sends() && iov && iovcnt > 0 &&
        percall_first_send(fd, NULL, 0, iov, (size_t)iovcnt, "writev") != 0)
        return -1;
    return REAL(writev)(fd, iov, iovcnt);
}

/* ---- server role ---------------------------------------------------------- */

SHIM_EXPORT int listen(int fd, int backlog)
{
    return server_listen(fd, backlog);
}

SHIM_EXPORT int epoll_wait(int epfd, struct epoll_event *events, int maxevents, int timeout)
{
    return server_epoll_wait(epfd, events, maxevents, timeout, NULL, 0);
}

SHIM_EXPORT int epoll_pwait(int epfd, struct epoll_event *events, int maxevents, int timeout,
                            const sigset_t *sigmask)
{
    return server_epoll_wait(epfd, events, maxevents, timeout, sigmask, 1);
}

SHIM_EXPORT int accept(int fd, struct sockaddr *addr, socklen_t *alen)
{
    return server_accept(fd, addr, alen, 0, 0);
}

SHIM_EXPORT int accept4(int fd, struct sockaddr *addr, socklen_t *alen, int flags)
{
    return server_accept(fd, addr, alen, flags, 1);
}

/* ---- kept fds: shutdown, close, the dup family ------------------------------ */

SHIM_EXPORT int shutdown(int fd, int how)
{
    return kept_shutdown(fd, how);
}

SHIM_EXPORT int close(int fd)
{
    return kept_close(fd);
}

SHIM_EXPORT int close_range(unsigned int first, unsigned int last, int flags)
{
    return kept_close_range(first, last, flags);
}

SHIM_EXPORT int dup(int old)
{
    return kept_dup_result(old, REAL(dup)(old));
}

SHIM_EXPORT int dup2(int old, int new)
{
    return kept_dup_result(old, REAL(dup2)(old, new));
}

SHIM_EXPORT int dup3(int old, int new, int flags)
{
    return kept_dup_result(old, REAL(dup3)(old, new, flags));
}

/* fcntl is variadic; like cwrap, pass the one argument on as a pointer-sized
 * value (int and pointer arguments both travel in a register on the ABIs
 * glibc supports). fcntl and fcntl64 differ only in the real symbol called. */
#define FCNTL_HOOK(name)                                                                  \
    SHIM_EXPORT int name(int fd, int cmd, ...)                                            \
    {                                                                                     \
        va_list ap;                                                                       \
        va_start(ap, cmd);                                                                \
        void *arg = va_arg(ap, void *);                                                   \
        va_end(ap);                                                                       \
        return kept_fcntl(REAL(name), fd, cmd, arg);                                      \
    }
FCNTL_HOOK(fcntl)
FCNTL_HOOK(fcntl64)
