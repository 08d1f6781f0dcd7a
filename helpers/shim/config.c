/* The shim's environment, logging and address helpers. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "real.h"
#include "shim.h"

static struct shim_config config;
static pthread_once_t config_once = PTHREAD_ONCE_INIT;

const char *const shim_transport_names[SHIM_TRANSPORT_BAD] = {"tcp", "tls", "ws", "wss"};

static enum shim_transport transport_named(const char *name)
{
    int t;

    for (t = SHIM_TRANSPORT_TCP; t < SHIM_TRANSPORT_BAD; t++)
        if (strcmp(name, shim_transport_names[t]) == 0)
            return (enum shim_transport)t;
    return SHIM_TRANSPORT_BAD;
}

/* FDKEEPER_LEASE_CACHE: a whole number (0 turns the cache off); -1 when unset
 * or not one (the default bound applies). */
static long lease_cache_bound(const char *s)
{
    char *end;
    long v;

    if (!s || *s < '0' || *s > '9')
        return -1;
    v = strtol(s, &end, 10);
    return *end ? -1 : v;
}

static void config_read(void)
{
    const char *s;
    int saved = errno;

    config.debug = (s = getenv("FDKEEPER_DEBUG")) && strcmp(s, "1") == 0;
    config.reconnect = (s = getenv("FDKEEPER_RECONNECT")) && strcmp(s, "1") == 0;
    config.per_call = (s = getenv("FDKEEPER_PER_CALL")) && strcmp(s, "1") == 0;
    config.lease_cache = lease_cache_bound(getenv("FDKEEPER_LEASE_CACHE"));

    s = getenv("FDKEEPER_SOCKET");
    if (!s || !*s)
        goto out; /* inert */
    if (strlen(s) >= sizeof config.socket_path) {
        shim_say("fdkeeper: FDKEEPER_SOCKET is too long; the preload shim stays inactive");
        goto out;
    }
    strcpy(config.socket_path, s);

    s = getenv("FDKEEPER_ROLE");
    if (s && strcmp(s, "client") == 0) {
        config.role = SHIM_ROLE_CLIENT;
    } else if (s && strcmp(s, "server") == 0) {
        config.role = SHIM_ROLE_SERVER;
    } else {
        shim_say("fdkeeper: FDKEEPER_ROLE must be 'client' or 'server' (got '%s'); "
                 "the preload shim stays inactive", s ? s : "");
        goto out;
    }

    /* A bad value is only reported at the first handoff (lease.c). */
    s = getenv("FDKEEPER_TRANSPORT");
    config.transport = transport_named(s && *s ? s : "tcp");
    if (config.transport == SHIM_TRANSPORT_BAD)
        snprintf(config.transport_str, sizeof config.transport_str, "%s", s);

    s = getenv("FDKEEPER_REMOTE");
    if (s && *s) {
        if (shim_parse_addr(s, &config.remote) != 0) {
            shim_say("fdkeeper: FDKEEPER_REMOTE '%s' is not IP:PORT or [IP]:PORT; "
                     "the preload shim stays inactive", s);
            goto out;
        }
        config.have_remote = 1;
        shim_format_addr((struct sockaddr *)&config.remote, config.remote_str,
                         sizeof config.remote_str);
    } else if (config.role == SHIM_ROLE_CLIENT) {
        shim_say("fdkeeper: FDKEEPER_REMOTE is not set; the client role needs the SuT's "
                 "IP:PORT; the preload shim stays inactive");
        goto out;
    }
    /* The run's identity (-i/-p) for a server lease; a client's is what sipp binds. */
    s = getenv("FDKEEPER_LOCAL");
    if (s && *s) {
        if (shim_parse_addr(s, &config.local) != 0) {
            shim_say("fdkeeper: FDKEEPER_LOCAL '%s' is not IP:PORT or [IP]:PORT; "
                     "the preload shim stays inactive", s);
            goto out;
        }
        shim_format_addr((struct sockaddr *)&config.local, config.local_str, sizeof config.local_str);
        s = getenv("FDKEEPER_LOCAL_FROM_LISTENER");
        config.local_from_listener = s && strcmp(s, "1") == 0;
    }
    config.active = 1;
out:
    errno = saved;
}

const struct shim_config *shim_config(void)
{
    pthread_once(&config_once, config_read);
    return &config;
}

static void vsay(const char *prefix, const char *fmt, va_list ap)
{
    char buf[4200];
    size_t n = 0;
    int saved = errno;
    int r;

    if (prefix) {
        n = strlen(prefix);
        memcpy(buf, prefix, n);
    }
    r = vsnprintf(buf + n, sizeof buf - n - 1, fmt, ap);
    if (r < 0)
        r = 0;
    n += (size_t)r < sizeof buf - n - 1 ? (size_t)r : sizeof buf - n - 2;
    buf[n++] = '\n';
    /* One write(2): the line is not interleaved with other writers. */
    if (REAL(write)(2, buf, n) < 0) {
        /* stderr gone: nothing to do */
    }
    errno = saved;
}

void shim_say(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsay(NULL, fmt, ap);
    va_end(ap);
}

void shim_debug(const char *fmt, ...)
{
    va_list ap;
    if (!config.debug)
        return;
    va_start(ap, fmt);
    vsay("fdkeeper-shim: ", fmt, ap);
    va_end(ap);
}

void shim_format_addr(const struct sockaddr *sa, char *buf, size_t len)
{
    char ip[INET6_ADDRSTRLEN];
    int saved = errno;

    if (sa && sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &in->sin_addr, ip, sizeof ip);
        snprintf(buf, len, "%s:%u", ip, ntohs(in->sin_port));
    } else if (sa && sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &in6->sin6_addr, ip, sizeof ip);
        snprintf(buf, len, "[%s]:%u", ip, ntohs(in6->sin6_port));
    } else {
        snprintf(buf, len, "-");
    }
    errno = saved;
}

int shim_parse_addr(const char *s, struct sockaddr_storage *out)
{
    char host[INET6_ADDRSTRLEN + 1];
    const char *port_s, *end;
    char *stop;
    unsigned long port;
    size_t hl;

    memset(out, 0, sizeof *out);
    if (*s == '[') {
        end = strchr(s, ']');
        if (!end || end[1] != ':')
            return -1;
        hl = (size_t)(end - s - 1);
        if (hl == 0 || hl >= sizeof host)
            return -1;
        memcpy(host, s + 1, hl);
        host[hl] = 0;
        port_s = end + 2;
    } else {
        end = strrchr(s, ':');
        if (!end)
            return -1;
        hl = (size_t)(end - s);
        if (hl == 0 || hl >= sizeof host)
            return -1;
        memcpy(host, s, hl);
        host[hl] = 0;
        port_s = end + 1;
    }
    if (*port_s < '0' || *port_s > '9')
        return -1;
    errno = 0;
    port = strtoul(port_s, &stop, 10);
    if (*stop || port > 65535 || errno)
        return -1;
    if (s[0] != '[') {
        struct sockaddr_in *in = (struct sockaddr_in *)out;
        if (inet_pton(AF_INET, host, &in->sin_addr) != 1)
            return -1;
        in->sin_family = AF_INET;
        in->sin_port = htons((unsigned short)port);
    } else {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)out;
        if (inet_pton(AF_INET6, host, &in6->sin6_addr) != 1)
            return -1;
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((unsigned short)port);
    }
    return 0;
}

int shim_parse_inaddr(const char *s, size_t n, struct shim_inaddr *out)
{
    struct sockaddr_storage ss;
    char buf[INET6_ADDRSTRLEN + 16];
    int saved, r;

    memset(out, 0, sizeof *out);
    if (n == 1 && s[0] == '-')
        return 0;
    if (n == 0 || n >= sizeof buf)
        return -1;
    memcpy(buf, s, n);
    buf[n] = 0;
    saved = errno;
    r = shim_parse_addr(buf, &ss);
    errno = saved;
    if (r != 0)
        return -1;
    out->len = ss.ss_family == AF_INET ? sizeof out->u.in : sizeof out->u.in6;
    memcpy(&out->u, &ss, out->len);
    return 0;
}

/* Reduce an IPv4-mapped IPv6 address to IPv4. */
static void normalise(const struct sockaddr *sa, struct sockaddr_storage *out)
{
    memset(out, 0, sizeof *out);
    if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        if (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr)) {
            struct sockaddr_in *in = (struct sockaddr_in *)out;
            in->sin_family = AF_INET;
            in->sin_port = in6->sin6_port;
            memcpy(&in->sin_addr, &in6->sin6_addr.s6_addr[12], 4);
            return;
        }
        memcpy(out, in6, sizeof *in6);
    } else if (sa->sa_family == AF_INET) {
        memcpy(out, sa, sizeof(struct sockaddr_in));
    } else {
        out->ss_family = sa->sa_family;
    }
}

int shim_addr_equal(const struct sockaddr *a, socklen_t alen, const struct sockaddr_storage *b)
{
    struct sockaddr_storage na, nb;

    if (!a || alen < sizeof(sa_family_t))
        return 0;
    if ((a->sa_family == AF_INET && alen < sizeof(struct sockaddr_in)) ||
        (a->sa_family == AF_INET6 && alen < sizeof(struct sockaddr_in6)))
        return 0;
    normalise(a, &na);
    normalise((const struct sockaddr *)b, &nb);
    if (na.ss_family != nb.ss_family)
        return 0;
    if (na.ss_family == AF_INET) {
        const struct sockaddr_in *x = (const struct sockaddr_in *)&na, *y = (const struct sockaddr_in *)&nb;
        return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    if (na.ss_family == AF_INET6) {
        const struct sockaddr_in6 *x = (const struct sockaddr_in6 *)&na, *y = (const struct sockaddr_in6 *)&nb;
        return x->sin6_port == y->sin6_port &&
               memcmp(&x->sin6_addr, &y->sin6_addr, sizeof x->sin6_addr) == 0;
    }
    return 0;
}
