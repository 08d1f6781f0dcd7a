/* Client role: the program's connect() to the SuT gets the kept connection. */
#ifndef FDKEEPER_CLIENT_H
#define FDKEEPER_CLIENT_H

#include <sys/socket.h>
#include "fdtable.h"

SHIM_HIDDEN int client_connect(int fd, const struct sockaddr *addr, socklen_t len);
/* Lease the client connection (aor: the percent-encoded AoR of a per-call
 * socket, or NULL) and put it on fd in place of what is there (the program's
 * socket, or a PENDING fd's placeholder); snap: fd's entry before. 0 (errno =
 * saved_errno) or -1 (errno set, one stderr line). */
SHIM_HIDDEN int client_handoff(int fd, const struct fde *snap, const char *transport,
                               const char *what, int saved_errno, const char *aor);
/* A dup3 onto fd dropped the program's epoll registrations (they belong to
 * the replaced open file description): add snap's again. */
SHIM_HIDDEN void client_restore_epoll(int fd, const struct fde *snap);

#endif
