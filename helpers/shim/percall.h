/* Per call (FDKEEPER_PER_CALL=1, sipp -t tn/-t ln): one kept connection per
 * user (AoR), leased at the first send by the message's From AoR. */
#ifndef FDKEEPER_PERCALL_H
#define FDKEEPER_PERCALL_H

#include <sys/socket.h>
#include <sys/uio.h>
#include "fdtable.h"

/* connect() to the SuT: a quiet placeholder on fd, PENDING until the first
 * send. 0 (errno = saved_errno) or -1. */
SHIM_HIDDEN int percall_placeholder(int fd, const struct fde *snap, const struct sockaddr *addr,
                                    socklen_t alen, const char *what, int saved_errno);
/* Before a send/sendto/write (buf, len) or sendmsg/writev (iov, iovcnt) on
 * fd: if fd is PENDING, lease its connection. 0: go on with the real call;
 * -1: fail it (errno set). Call only when fdt_pending_sends() (cheap). */
SHIM_HIDDEN int percall_first_send(int fd, const void *buf, size_t len, const struct iovec *iov,
                                   size_t iovcnt, const char *call);

enum percall_call { PERCALL_SEND, PERCALL_SENDTO, PERCALL_WRITE };

/* send/sendto/write of buf on fd: on a kept per-call fd the placeholder's
 * address in the message's headers is the kept connection's (rewrite.h),
 * every other fd gets the program's call as it is. Call only when
 * fdt_rewrite_fds() (cheap). */
SHIM_HIDDEN ssize_t percall_send(int fd, const void *buf, size_t len, int flags,
                                 const struct sockaddr *addr, socklen_t alen,
                                 enum percall_call how);

#endif
