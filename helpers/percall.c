/* Per call (see helpers/README.md): connect() gets a placeholder, the first
 * send leases the connection of the message's From AoR (client_handoff). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "client.h"
#include "lease.h"
#include "percall.h"
#include "real.h"

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
        memcpy(&local->u, &ss, sl);
    }
}

/* One end of a fresh socketpair on fd (the program's O_NONBLOCK, set for the
 * connect, goes with it); the other end in *other. 0 or -1 (said). */
static int put_placeholder(int fd, const char *what, int *other)
{
    char ebuf[128];
    int sp[2], fl, err;

    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp) != 0) {
        err = errno;
        shim_say("fdkeeper: %s: cannot make the placeholder of a per-call connection: %s", what,
                 strerror_r(err, ebuf, sizeof ebuf));
        errno = err;
        return -1;
    }
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
    client_restore_epoll(fd, snap);

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
    return client_handoff(fd, &snap, transport, what, saved, aor);
}
