/* Server role: the kept connections are offered as accepted ones on the
 * program's first listening socket. */
#ifndef FDKEEPER_SERVER_H
#define FDKEEPER_SERVER_H

#include <signal.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include "shim.h"

SHIM_HIDDEN int server_listen(int fd, int backlog);
/* epoll_wait (sigmask NULL, pwait 0) and epoll_pwait (pwait 1). */
SHIM_HIDDEN int server_epoll_wait(int epfd, struct epoll_event *events, int maxevents,
                                  int timeout, const sigset_t *sigmask, int pwait);
/* accept (four 0) and accept4 (four 1). */
SHIM_HIDDEN int server_accept(int fd, struct sockaddr *addr, socklen_t *alen, int flags,
                              int four);

#endif
