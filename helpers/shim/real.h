/* The real libc functions, bound once with dlsym(RTLD_NEXT).
 *
 * Each signature is written once, as a typedef; the table holds one union
 * per symbol (the function pointer and the void * dlsym gives), as cwrap's
 * socket_wrapper does, so binding needs no cast per symbol. */
#ifndef FDKEEPER_REAL_H
#define FDKEEPER_REAL_H

#include <signal.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include "shim.h"

typedef int (*real_socket_t)(int, int, int);
typedef int (*real_bind_t)(int, const struct sockaddr *, socklen_t);
typedef int (*real_connect_t)(int, const struct sockaddr *, socklen_t);
typedef int (*real_listen_t)(int, int);
typedef int (*real_accept_t)(int, struct sockaddr *, socklen_t *);
typedef int (*real_accept4_t)(int, struct sockaddr *, socklen_t *, int);
typedef int (*real_shutdown_t)(int, int);
typedef int (*real_close_t)(int);
typedef int (*real_close_range_t)(unsigned int, unsigned int, int);
typedef int (*real_dup_t)(int);
typedef int (*real_dup2_t)(int, int);
typedef int (*real_dup3_t)(int, int, int);
typedef int (*real_fcntl_t)(int, int, ...);
typedef int (*real_fcntl64_t)(int, int, ...);
typedef int (*real_setsockopt_t)(int, int, int, const void *, socklen_t);
typedef int (*real_getsockname_t)(int, struct sockaddr *, socklen_t *);
typedef int (*real_getpeername_t)(int, struct sockaddr *, socklen_t *);
typedef int (*real_epoll_ctl_t)(int, int, int, struct epoll_event *);
typedef int (*real_epoll_wait_t)(int, struct epoll_event *, int, int);
typedef int (*real_epoll_pwait_t)(int, struct epoll_event *, int, int, const sigset_t *);
typedef ssize_t (*real_send_t)(int, const void *, size_t, int);
typedef ssize_t (*real_sendto_t)(int, const void *, size_t, int, const struct sockaddr *,
                                 socklen_t);
typedef ssize_t (*real_sendmsg_t)(int, const struct msghdr *, int);
typedef ssize_t (*real_write_t)(int, const void *, size_t);
typedef ssize_t (*real_writev_t)(int, const struct iovec *, int);

/* X(name, required): every symbol the shim calls through REAL(). An optional
 * one may be NULL (close_range before glibc 2.34; fcntl64 falls back to fcntl). */
#define REAL_SYMBOLS(X)                                                                   \
    X(socket, 1) X(bind, 1) X(connect, 1) X(listen, 1) X(accept, 1) X(accept4, 1)        \
    X(shutdown, 1) X(close, 1) X(close_range, 0) X(dup, 1) X(dup2, 1) X(dup3, 1)          \
    X(fcntl, 1) X(fcntl64, 0) X(setsockopt, 1) X(getsockname, 1) X(getpeername, 1)        \
    X(epoll_ctl, 1) X(epoll_wait, 1) X(epoll_pwait, 1) X(send, 1) X(sendto, 1)            \
    X(sendmsg, 1) X(write, 1) X(writev, 1)

#define REAL_ENTRY(name, required) union { real_##name##_t f; void *obj; } name;
struct real_fns {
    REAL_SYMBOLS(REAL_ENTRY)
};
#undef REAL_ENTRY

SHIM_HIDDEN extern struct real_fns shim_real;
SHIM_HIDDEN void real_init(void);

/* REAL(close)(fd): the libc close, binding everything on first use. */
#define REAL(name) (real_init(), shim_real.name.f)

#endif
