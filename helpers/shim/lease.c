/* The lease exchange with the keeper (docs/protocol.md): one request on the
 * control socket, the reply's descriptors, and one stderr line when it fails. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include "lease.h"
#include "shim.h"

static int err_for_code(const char *code)
{
    if (strcmp(code, "busy") == 0)
        return EBUSY;
    if (strcmp(code, "timeout") == 0)
        return ETIMEDOUT;
    return ECONNREFUSED; /* refused, closed, none and anything else */
}

/* Tell the user why the handoff failed (one line), set errno, return -1. */
static int lease_failed(struct ctl_result *res, const char *what)
{
    const struct shim_config *cfg = shim_config();
    char ebuf[128];
    int err = ECONNREFUSED;

    switch (res->status) {
    case CTL_UNREACHABLE:
        shim_say("fdkeeper: cannot reach the keeper at %s: %s; start it with 'fdkeeper keeper' "
                 "or run through 'fdkeeper sipp'",
                 cfg->socket_path, strerror_r(res->sys_errno, ebuf, sizeof ebuf));
        break;
    case CTL_TIMEOUT:
        shim_say("fdkeeper: the keeper at %s did not answer within %d s; check it with "
                 "'fdkeeper status'", cfg->socket_path, CTL_TIMEOUT_SECONDS);
        err = ETIMEDOUT;
        break;
    case CTL_ERR:
        shim_say("%s", res->text);
        err = err_for_code(res->code);
        break;
    case CTL_PROTO:
    case CTL_OK:
        shim_say("fdkeeper: unexpected reply from the keeper at %s: %s", cfg->socket_path,
                 res->text);
        break;
    }
    shim_debug("%s: no handoff (%s)", what,
               res->status == CTL_ERR ? res->code : "keeper not usable");
    ctl_result_free(res, 1);
    errno = err;
    return -1;
}

int lease_request(const char *request, struct ctl_result *res, const char *what)
{
    ctl_lease(shim_config()->socket_path, request, res);
    return res->status == CTL_OK ? 0 : lease_failed(res, what);
}

int lease_bad_reply(struct ctl_result *res, const char *why, const char *what)
{
    res->status = CTL_PROTO;
    snprintf(res->text, sizeof res->text, "%s", why);
    return lease_failed(res, what);
}

const char *lease_transport(const char *what)
{
    static int reported;
    const struct shim_config *cfg = shim_config();

    if (cfg->transport != SHIM_TRANSPORT_BAD)
        return shim_transport_names[cfg->transport];
    if (!__atomic_exchange_n(&reported, 1, __ATOMIC_RELAXED))
        shim_say("fdkeeper: FDKEEPER_TRANSPORT '%s' is none of 'tcp', 'tls', 'ws', 'wss'; %s goes ahead "
                 "without the keeper (no kept connection is handed over)",
                 cfg->transport_str, what);
    else
        shim_debug("%s: no handoff (bad FDKEEPER_TRANSPORT)", what);
    return NULL;
}

int lease_is_pair(int fd)
{
    int dom = 0, r, saved = errno;
    socklen_t l = sizeof dom;

    r = getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &dom, &l);
    errno = saved;
    return !(r != 0 || dom == AF_INET || dom == AF_INET6);
}
