/* fdkeeper LD_PRELOAD shim: declarations shared by its source files.
 *
 * Everything in here is hidden; only the hooks in hooks.c are exported
 * (default visibility). */
#ifndef FDKEEPER_SHIM_H
#define FDKEEPER_SHIM_H

#include <netinet/in.h>
#include <stddef.h>
#include <sys/socket.h>

/* Empty only where a test builds a few files into a library of its own
 * (shimbuild.compile_twin: -DSHIM_HIDDEN=) to call them through ctypes. */
#ifndef SHIM_HIDDEN
#define SHIM_HIDDEN __attribute__((visibility("hidden")))
#endif
#define SHIM_EXPORT __attribute__((visibility("default")))

enum shim_role { SHIM_ROLE_NONE = 0, SHIM_ROLE_CLIENT, SHIM_ROLE_SERVER };
/* FDKEEPER_TRANSPORT: unset/empty means tcp; anything unknown is BAD (the
 * shim then stays out of every handoff and says so once). tls, ws and wss are
 * the keeper's to speak: the program gets a socketpair end carrying plain SIP. */
enum shim_transport {
    SHIM_TRANSPORT_TCP = 0,
    SHIM_TRANSPORT_TLS,
    SHIM_TRANSPORT_WS,
    SHIM_TRANSPORT_WSS,
    SHIM_TRANSPORT_BAD
};
/* The transport= value of each (docs/protocol.md), indexed by enum shim_transport. */
SHIM_HIDDEN extern const char *const shim_transport_names[SHIM_TRANSPORT_BAD];

/* The environment, read once. */
struct shim_config {
    int active;                     /* FDKEEPER_SOCKET set and usable */
    enum shim_role role;
    char socket_path[4096];         /* copied: the program may change its environment */
    int have_remote;                /* FDKEEPER_REMOTE parsed */
    struct sockaddr_storage remote;
    char remote_str[64];            /* canonical IP:PORT / [IP]:PORT */
    char local_str[64];             /* FDKEEPER_LOCAL canonical (what sipp binds: -i/-p), or "" */
    struct sockaddr_storage local;  /* FDKEEPER_LOCAL parsed (when local_str is set) */
    int local_from_listener;        /* FDKEEPER_LOCAL_FROM_LISTENER=1: its port is only the likely
                                     * one; the listener's own port is the identity */
    enum shim_transport transport;
    char transport_str[64];         /* the value as given (cut), for the BAD message */
    int reconnect;
    int per_call;                   /* FDKEEPER_PER_CALL=1 (client): lease at the first send */
    long lease_cache;               /* FDKEEPER_LEASE_CACHE: copies kept at most (leasecache.h);
                                     * -1 when unset or not a number */
    int debug;
};

/* An IPv4/IPv6 address as the keeper named it in FDS peers=/locals=. */
struct shim_inaddr {
    socklen_t len; /* sizeof the sockaddr_in/_in6 in u; 0: not known */
    union {
        struct sockaddr sa;
        struct sockaddr_in in;
        struct sockaddr_in6 in6;
    } u;
};

SHIM_HIDDEN const struct shim_config *shim_config(void);

/* Cheap test used at the top of every interposed call. */
#define SHIM_ACTIVE() (shim_config()->active)

/* One line on stderr (a newline is added). */
SHIM_HIDDEN void shim_say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* "fdkeeper-shim: ..." on stderr when FDKEEPER_DEBUG=1. */
SHIM_HIDDEN void shim_debug(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* IP:PORT (IPv4) or [IP]:PORT (IPv6); "-" for anything else. */
SHIM_HIDDEN void shim_format_addr(const struct sockaddr *sa, char *buf, size_t len);
SHIM_HIDDEN int shim_parse_addr(const char *s, struct sockaddr_storage *out);
/* The first n bytes of s (IP:PORT, [IP]:PORT, or "-" for not known) into out. */
SHIM_HIDDEN int shim_parse_inaddr(const char *s, size_t n, struct shim_inaddr *out);
/* Same family (IPv4-mapped IPv6 counts as IPv4), address and port. */
SHIM_HIDDEN int shim_addr_equal(const struct sockaddr *a, socklen_t alen,
                                const struct sockaddr_storage *b);

/* AoR of a SIP message (aor.c): the URI of its first From (f:) header,
 * without URI parameters, percent-encoded for the control protocol into out
 * (NUL-terminated). Returns its length, 0 when the message has no usable
 * From header, -1 when the encoded URI does not fit in outlen. */
SHIM_HIDDEN int shim_from_aor(const char *msg, size_t len, char *out, size_t outlen);

#endif
