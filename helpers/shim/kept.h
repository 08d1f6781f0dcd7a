/* Calls on the fds the shim tracks, whatever the mode: the socket's setup
 * recorded for a later handoff, and kept connections that the program may
 * use, copy and close but never take down for the keeper. Every function
 * leaves an fd that is not ours to the real call, untouched. */
#ifndef FDKEEPER_KEPT_H
#define FDKEEPER_KEPT_H

#include <sys/epoll.h>
#include <sys/socket.h>
#include "shim.h"

SHIM_HIDDEN int kept_socket(int domain, int type, int protocol);
SHIM_HIDDEN int kept_bind(int fd, const struct sockaddr *addr, socklen_t len);
SHIM_HIDDEN int kept_setsockopt(int fd, int level, int name, const void *val, socklen_t len);
/* getsockname (peer 0) / getpeername (peer 1). */
SHIM_HIDDEN int kept_getname(int fd, struct sockaddr *addr, socklen_t *len, int peer);
SHIM_HIDDEN int kept_epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev);
SHIM_HIDDEN int kept_shutdown(int fd, int how);
SHIM_HIDDEN int kept_close(int fd);
SHIM_HIDDEN int kept_close_range(unsigned first, unsigned last, int flags);
/* After the real dup/dup2/dup3/F_DUPFD returned r: the copy inherits the state. */
SHIM_HIDDEN int kept_dup_result(int old, int r);
/* fcntl and fcntl64 (real: which one), one argument passed on as cwrap does. */
SHIM_HIDDEN int kept_fcntl(int (*real)(int, int, ...), int fd, int cmd, void *arg);

#endif
