/* Control-socket client: one SOCK_SEQPACKET connection a process, kept open
 * between requests (see "The kept control connection" below). */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "control.h"
#include "real.h"

#define MAX_PACKET 4096
#define MAX_FDS_PER_PACKET 250

static void proto_error(struct ctl_result *res, const char *fmt, const char *arg)
{
    res->status = CTL_PROTO;
    snprintf(res->text, sizeof res->text, fmt, arg);
}

/* A failed send/recv on the control socket: the keeper was too slow (timeout) or went away. */
static void socket_failure(struct ctl_result *res)
{
    res->status = (errno == EAGAIN || errno == EWOULDBLOCK) ? CTL_TIMEOUT : CTL_UNREACHABLE;
    res->sys_errno = errno;
}

/* Receive one packet; its SCM_RIGHTS descriptors are appended to *fds.
 * Returns the length, 0 on EOF, -1 on error (errno). */
static ssize_t recv_packet(int s, char *buf, int **fds, int *nfds, int *truncated)
{
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int) * (MAX_FDS_PER_PACKET + 3))];
    } cbuf;
    struct iovec iov = { buf, MAX_PACKET + 1 };
    struct msghdr msg;
    ssize_t n;

    *truncated = 0;
    for (;;) {
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.buf;
        msg.msg_controllen = sizeof cbuf.buf;
        n = recvmsg(s, &msg, MSG_CMSG_CLOEXEC);
        if (n >= 0 || errno != EINTR)
            break;
    }
    if (n < 0)
        return -1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int *grown = realloc(*fds, (size_t)(*nfds + k) * sizeof(int));
        if (!grown) { /* close what we cannot keep */
            for (int i = 0; i < k; i++)
                REAL(close)(((int *)CMSG_DATA(c))[i]);
            *truncated = 1;
            continue;
        }
        *fds = grown;
        memcpy(*fds + *nfds, CMSG_DATA(c), (size_t)k * sizeof(int));
        *nfds += k;
    }
    if (msg.msg_flags & (MSG_CTRUNC | MSG_TRUNC))
        *truncated = 1;
    buf[n > MAX_PACKET ? MAX_PACKET : n] = 0;
    return n;
}

/* "ERR code text" -> res; returns 1 if buf was an ERR packet. */
static int parse_err(const char *buf, struct ctl_result *res)
{
    const char *p, *sp;
    size_t cl;

    if (strncmp(buf, "ERR ", 4) != 0 && strcmp(buf, "ERR") != 0)
        return 0;
    res->status = CTL_ERR;
    p = buf[3] ? buf + 4 : buf + 3;
    sp = strchr(p, ' ');
    cl = sp ? (size_t)(sp - p) : strlen(p);
    if (cl >= sizeof res->code)
        cl = sizeof res->code - 1;
    memcpy(res->code, p, cl);
    res->code[cl] = 0;
    snprintf(res->text, sizeof res->text, "%s", sp ? sp + 1 : "");
    /* One line: cut at the first newline, if the keeper sent any. */
    res->text[strcspn(res->text, "\r\n")] = 0;
    if (!res->text[0])
        snprintf(res->text, sizeof res->text, "fdkeeper: the keeper refused (%s)", res->code);
    return 1;
}

/* Where the value of token key= starts in a "VERB k=v k=v" packet (its length
 * in *vlen), or NULL. */
static const char *find_value(const char *buf, const char *key, size_t *vlen)
{
    size_t kl = strlen(key);
    const char *p = strchr(buf, ' ');

    while (p) {
        p++;
        if (strncmp(p, key, kl) == 0 && p[kl] == '=') {
            *vlen = strcspn(p + kl + 1, " ");
            return p + kl + 1;
        }
        p = strchr(p, ' ');
    }
    return NULL;
}

/* Value of token key= in a "VERB k=v k=v" packet, copied to out. 0 or -1. */
static int token(const char *buf, const char *key, char *out, size_t outlen)
{
    size_t vl = 0;
    const char *v = find_value(buf, key, &vl);

    if (!v || vl >= outlen)
        return -1;
    memcpy(out, v, vl);
    out[vl] = 0;
    return 0;
}

/* "A,A,..." with exactly n addresses (IP:PORT, [IP]:PORT or -) into out;
 * no list at all (v NULL): every address unknown. 0 or -1. */
static int parse_addr_list(const char *v, size_t vlen, struct shim_inaddr *out, int n)
{
    const char *end;

    if (!v) {
        memset(out, 0, (size_t)n * sizeof *out);
        return 0;
    }
    end = v + vlen;
    for (int i = 0; i < n; i++) {
        const char *c = memchr(v, ',', (size_t)(end - v));
        if (shim_parse_inaddr(v, (size_t)((c ? c : end) - v), &out[i]) != 0)
            return -1;
        if (i == n - 1)
            return c ? -1 : 0;
        if (!c)
            return -1;
        v = c + 1;
    }
    return -1;
}

/* The packet's peers= and locals= for its descriptors res->fds[before..nfds). */
static int parse_addrs(const char *buf, struct ctl_result *res, int before)
{
    int n = res->nfds - before;
    struct shim_inaddr *p, *l;
    const char *v;
    size_t vl = 0;

    p = realloc(res->peers, (size_t)res->nfds * sizeof *p);
    if (p)
        res->peers = p;
    l = realloc(res->locals, (size_t)res->nfds * sizeof *l);
    if (l)
        res->locals = l;
    if (!p || !l) {
        proto_error(res, "%s", "out of memory for the addresses of the kept connections");
        return -1;
    }
    v = find_value(buf, "peers", &vl);
    if (parse_addr_list(v, vl, res->peers + before, n) != 0) {
        proto_error(res, "packet '%.200s' has no valid peers= address for each id", buf);
        return -1;
    }
    v = find_value(buf, "locals", &vl);
    if (parse_addr_list(v, vl, res->locals + before, n) != 0) {
        proto_error(res, "packet '%.200s' has no valid locals= address for each id", buf);
        return -1;
    }
    return 0;
}

static int parse_count(const char *s, long max)
{
    char *end;
    long v;

    if (*s < '0' || *s > '9')
        return -1;
    v = strtol(s, &end, 10);
    if (*end || v > max)
        return -1;
    return (int)v;
}

static void close_keeping_errno(int s)
{
    int saved = errno;

    REAL(close)(s);
    errno = saved;
}

/* A fresh control connection to the keeper at path, with the reply timeout
 * set; the socket, or -1 with res telling why. */
static int open_control(const char *path, struct ctl_result *res)
{
    struct sockaddr_un sun;
    struct timeval tv = { CTL_TIMEOUT_SECONDS, 0 };
    int s;

    memset(&sun, 0, sizeof sun);
    sun.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof sun.sun_path) {
        res->status = CTL_UNREACHABLE;
        res->sys_errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(sun.sun_path, path);
    s = REAL(socket)(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (s < 0) {
        res->status = CTL_UNREACHABLE;
        res->sys_errno = errno;
        return -1;
    }
    REAL(setsockopt)(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    REAL(setsockopt)(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (REAL(connect)(s, (struct sockaddr *)&sun, sizeof sun) != 0) {
        res->status = CTL_UNREACHABLE;
        res->sys_errno = errno;
        close_keeping_errno(s);
        return -1;
    }
    return s;
}

static int send_request(int s, const char *request, struct ctl_result *res)
{
    ssize_t n;

    do
        n = REAL(send)(s, request, strlen(request), MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n >= 0)
        return 0;
    res->status = errno == EAGAIN ? CTL_TIMEOUT : CTL_UNREACHABLE;
    res->sys_errno = errno;
    return -1;
}

/* The next packet of the reply into buf (its descriptors appended to res);
 * 0, or -1 with res telling why (when: where in the reply the keeper hung up). */
static int next_packet(int s, char *buf, struct ctl_result *res, int *truncated, const char *when)
{
    ssize_t n = recv_packet(s, buf, &res->fds, &res->nfds, truncated);

    if (n < 0) {
        socket_failure(res);
        return -1;
    }
    if (n == 0) {
        proto_error(res, "the keeper closed the control connection %s", when);
        return -1;
    }
    return 0;
}

/* A packet with ids=... (FDS, or OK answered inline) that carried the
 * descriptors res->fds[before..nfds): one per id, at most want in all, and
 * their addresses. 0 or -1 (res says why). */
static int take_fds(const char *buf, struct ctl_result *res, int before, int want, int truncated)
{
    int ids = 1;
    const char *v = strstr(buf, " ids=");

    if (truncated) {
        proto_error(res, "%s", "descriptors were lost in transit (too many in one packet, "
                               "or the file descriptor limit was reached)");
        return -1;
    }
    if (!v || !v[5]) {
        proto_error(res, "unexpected packet '%.200s'", buf);
        return -1;
    }
    for (const char *p = v + 5; *p && *p != ' '; p++)
        ids += *p == ',';
    if (res->nfds - before != ids || res->nfds > want) {
        proto_error(res, "packet '%.200s' did not carry one descriptor per id", buf);
        return -1;
    }
    return parse_addrs(buf, res, before);
}

/* The first packet: OK count=N (N in *want) or ERR (res says so); with a
 * per-call lease's inline=1, OK count=N ids=... with the descriptors (then
 * res holds them all). 0 or -1. */
static int read_count(int s, char *buf, struct ctl_result *res, int *want)
{
    char v[16];
    int truncated;

    if (next_packet(s, buf, res, &truncated, "without an answer") != 0)
        return -1;
    if (res->nfds && !strstr(buf, " ids=")) { /* descriptors without ids=: not in the protocol */
        proto_error(res, "%s", "the keeper sent descriptors with its first reply");
        return -1;
    }
    if (parse_err(buf, res))
        return -1;
    if (strncmp(buf, "OK ", 3) != 0 || token(buf, "count", v, sizeof v) != 0 ||
        (*want = parse_count(v, 1 << 20)) < 0) {
        proto_error(res, "unexpected reply '%.200s'", buf);
        return -1;
    }
    res->keep = token(buf, "keep", v, sizeof v) == 0 && strcmp(v, "1") == 0;
    if (res->nfds && (take_fds(buf, res, 0, *want, truncated) != 0 || res->nfds != *want)) {
        if (res->status == CTL_OK)
            proto_error(res, "packet '%.200s' did not carry one descriptor per id", buf);
        return -1;
    }
    return 0;
}

/* One FDS ids=... packet: its descriptors and addresses appended to res, at
 * most want in all. 0 or -1 (res says why). */
static int read_fds(int s, char *buf, struct ctl_result *res, int want)
{
    int before = res->nfds, truncated;

    if (next_packet(s, buf, res, &truncated, "in the middle of a reply") != 0)
        return -1;
    if (!truncated && parse_err(buf, res))
        return -1;
    if (!truncated && strncmp(buf, "FDS ", 4) != 0) {
        proto_error(res, "unexpected packet '%.200s'", buf);
        return -1;
    }
    return take_fds(buf, res, before, want, truncated);
}

/* The kept control connection. A per-call run leases once a call: a fresh
 * connection each time cost the program a socket, two setsockopt, a connect and
 * a close, and the keeper an accept, the peer's credentials, two epoll changes,
 * a wake-up for the hang-up and a close. So the connection stays open for the
 * next request, with these rules:
 * - it is this process's own: the keeper knows a requester by the credentials
 *   of its connect(), so a forked child forgets its copy (atfork) and opens its
 *   own; one request at a time (the mutex, taken across fork);
 * - before each reuse, its number must still be that socket (dev, inode: the
 *   program may have closed it and reused the number) and must have nothing to
 *   read (a MSG_PEEK that would block): anything else (the keeper dropped it as
 *   idle, or a reply's leftovers) and a fresh one is opened;
 * - it is kept only after a whole reply (OK with its descriptors, or ERR);
 * - a reused one the keeper closed before answering (its idle drop racing the
 *   request: the send fails, or the first read is EOF or a reset) is replaced
 *   and the request sent once more on a fresh one. */
static pthread_mutex_t kept_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t kept_once = PTHREAD_ONCE_INIT;
static int kept_fd = -1;
static dev_t kept_dev;
static ino_t kept_ino;
static char kept_path[sizeof(((struct sockaddr_un *)0)->sun_path)];

static int is_kept_socket(void)
{
    struct stat st;

    return kept_fd >= 0 && fstat(kept_fd, &st) == 0 && st.st_dev == kept_dev &&
           st.st_ino == kept_ino;
}

/* Close the kept connection if its number is still it; forget it either way. */
static void forget_kept(void)
{
    if (is_kept_socket())
        close_keeping_errno(kept_fd);
    kept_fd = -1;
}

static void atfork_prepare(void) { pthread_mutex_lock(&kept_mutex); }
static void atfork_parent(void) { pthread_mutex_unlock(&kept_mutex); }
static void atfork_child(void)
{
    forget_kept(); /* the parent's connection: the child's requests go on its own */
    pthread_mutex_init(&kept_mutex, NULL);
}
static void register_atfork(void) { pthread_atfork(atfork_prepare, atfork_parent, atfork_child); }

/* The kept connection to the keeper at path if it is still usable, else -1. */
static int reusable_connection(const char *path)
{
    char c;

    if (kept_fd < 0)
        return -1;
    if (strcmp(path, kept_path) != 0 || !is_kept_socket()) {
        forget_kept();
        return -1;
    }
    if (recv(kept_fd, &c, 1, MSG_PEEK | MSG_DONTWAIT) < 0 &&
        (errno == EAGAIN || errno == EWOULDBLOCK))
        return kept_fd;
    forget_kept(); /* EOF (dropped as idle), leftovers, or an error */
    return -1;
}

static void keep_connection(int s, const char *path)
{
    struct stat st;

    if (strlen(path) >= sizeof kept_path || fstat(s, &st) != 0) {
        close_keeping_errno(s);
        return;
    }
    kept_fd = s;
    kept_dev = st.st_dev;
    kept_ino = st.st_ino;
    strcpy(kept_path, path);
}

/* The request on s and its whole reply into res (res->status says how it went). */
static void exchange(int s, const char *request, struct ctl_result *res)
{
    char buf[MAX_PACKET + 2];
    int want = 0;

    memset(res, 0, sizeof *res);
    if (send_request(s, request, res) == 0 && read_count(s, buf, res, &want) == 0)
        while (res->nfds < want && read_fds(s, buf, res, want) == 0)
            ;
    /* Every step that failed set res->status; CTL_OK (0, from the memset) otherwise. */
    if (res->status != CTL_OK)
        ctl_result_free(res, 1);
}

/* A reused connection the keeper closed before any answer: worth one more try. */
static int closed_before_answer(const struct ctl_result *res)
{
    if (res->status == CTL_UNREACHABLE)
        return res->sys_errno == EPIPE || res->sys_errno == ECONNRESET;
    return res->status == CTL_PROTO && strstr(res->text, "without an answer") != NULL;
}

void ctl_lease(const char *path, const char *request, struct ctl_result *res)
{
    int s;

    pthread_once(&kept_once, register_atfork);
    pthread_mutex_lock(&kept_mutex);
    s = reusable_connection(path);
    if (s >= 0) {
        exchange(s, request, res);
        if (!closed_before_answer(res))
            goto done;
        forget_kept();
    }
    memset(res, 0, sizeof *res);
    if ((s = open_control(path, res)) < 0)
        goto unlock;
    exchange(s, request, res);
    if (res->status == CTL_OK || res->status == CTL_ERR)
        keep_connection(s, path);
    else
        close_keeping_errno(s);
    goto unlock;
done:
    if (res->status != CTL_OK && res->status != CTL_ERR)
        forget_kept();
unlock:
    pthread_mutex_unlock(&kept_mutex);
}

void ctl_result_free(struct ctl_result *res, int close_them)
{
    if (close_them)
        for (int i = 0; i < res->nfds; i++)
            REAL(close)(res->fds[i]);
    free(res->fds);
    free(res->peers);
    free(res->locals);
    res->fds = NULL;
    res->peers = res->locals = NULL;
    res->nfds = 0;
}
