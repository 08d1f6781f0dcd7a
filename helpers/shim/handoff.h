/* The handoff recipe of the client role, below both of its callers: connect()
 * (client.c) and a per-call socket's first send (percall.c). */
#ifndef FDKEEPER_HANDOFF_H
#define FDKEEPER_HANDOFF_H

#include "fdtable.h"

/* Lease the client connection (aor: the percent-encoded AoR of a per-call
 * socket, or NULL) and put it on fd in place of what is there (the program's
 * socket, or a PENDING fd's placeholder): dup3, epoll registrations added
 * again, the program's options replayed, the entry marked kept; snap: fd's
 * entry before. Per call the lease cache's copy, if it has one, takes the
 * keeper's place (leasecache.h). 0 (errno = saved_errno) or -1 (errno set,
 * one stderr line). */
SHIM_HIDDEN int handoff_lease(int fd, const struct fde *snap, const char *transport,
                              const char *what, int saved_errno, const char *aor);
/* src replaces fd (dup3, close-on-exec), taking the program's O_NONBLOCK
 * first (file status flags live on the replaced open file description); src
 * is closed either way. 0, or -1 with errno set (nothing said). */
SHIM_HIDDEN int handoff_dup_onto(int src, int fd);
/* The same, src left open (the lease cache's copy, handed again). */
SHIM_HIDDEN int handoff_dup_keeping(int src, int fd);
/* A dup3 onto fd dropped the program's epoll registrations (they belong to
 * the replaced open file description): add snap's again. */
SHIM_HIDDEN void handoff_restore_epoll(int fd, const struct fde *snap);

#endif
