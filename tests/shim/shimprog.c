/* Test program for the fdkeeper preload shim (tests/shim/test_shim.py).
 * It uses its sockets the way sipp 3.6.1 does and prints key=value lines.
 *
 *   shimprog client IP PORT [BINDIP]   sipp-like client connection, hello/reply
 *   shimprog connect IP PORT           plain connect, prints rc and errno
 *   shimprog untouched IP PORT OTHERPORT UDPPORT
 *   shimprog dup IP PORT OTHERPORT
 *   shimprog fork IP PORT
 *   shimprog threadfork IP PORT N      forks N children while a thread keeps taking the
 *                                      shim's lock (dup/close of the kept fd); each child
 *                                      uses the shim and must not hang (alarm: 10 s)
 *   shimprog closerange IP PORT OTHERPORT
 *                                      dup2/close/close_range on the kept fd and copies
 *   shimprog server N [v]              sipp-like listener, accepts N via epoll (gives up
 *                                      after $SHIMPROG_IDLE_MS ms without one; 2000)
 *                                      (v: one line per accepted connection)
 *   shimprog percall IP PORT BINDIP HOW|FROM ...
 *                                      sipp -t tn: one socket per call, connected
 *                                      and then sent a SIP message with header line
 *                                      FROM ("-": none) through HOW (send, sendto,
 *                                      write, writev, sendmsg; dup: send on a dup);
 *                                      the reply is read via epoll, then closed;
 *                                      HOW may start with fork+ (a forked child makes
 *                                      the call, the parent waits for it), closerange+
 *                                      (close_range of every fd above the epoll fd first)
 *                                      wait+ (a line read from stdin first) or hog+ (every
 *                                      free descriptor taken but two, kept to the end)
 *   shimprog percallvia IP PORT BINDIP FROM SNDBUF FILLERS CALLS
 *                                      sipp -t tn writing [local_ip]:[local_port] (Via,
 *                                      Contact, FILLERS more headers, the body): CALLS
 *                                      calls of one user, each a socket with SO_SNDBUF
 *                                      SNDBUF, its message sent as sipp does (send with
 *                                      MSG_DONTWAIT, the untaken tail again from its
 *                                      offset when writable); a reply line read after each
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <dirent.h>
#include <poll.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *ename(int e) { return e ? strerrorname_np(e) : "0"; }

static void die(const char *what)
{
    printf("fail=%s errno=%s\n", what, ename(errno));
    exit(2);
}

static struct sockaddr_in addr_of(const char *ip, const char *port)
{
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)atoi(port));
    if (inet_pton(AF_INET, ip, &a.sin_addr) != 1)
        die("inet_pton");
    return a;
}

static void format_addr(const struct sockaddr *sa, socklen_t len, char *out, size_t n)
{
    char ip[64];
    if (sa->sa_family == AF_INET && len == sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &in->sin_addr, ip, sizeof ip);
        snprintf(out, n, "%s:%u", ip, ntohs(in->sin_port));
    } else if (sa->sa_family == AF_INET6 && len == sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &in6->sin6_addr, ip, sizeof ip);
        snprintf(out, n, "[%s]:%u", ip, ntohs(in6->sin6_port));
    } else {
        snprintf(out, n, "family%d/len%u", sa->sa_family, (unsigned)len);
    }
}

static void print_addr_len(const char *key, const struct sockaddr *sa, socklen_t len)
{
    char buf[128];
    format_addr(sa, len, buf, sizeof buf);
    printf("%s=%s\n", key, buf);
}

static int domain_of(int fd)
{
    int d = -1;
    socklen_t l = sizeof d;
    getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &d, &l);
    return d;
}

static int sipp_sndbuf = 65535; /* sipp's SO_SNDBUF (percallvia makes it tiny) */

/* The sipp sequence: socket, epoll ADD, setsockopt, bind, O_NONBLOCK, connect, flags back. */
static int sipp_connect(int ep, uint64_t data, const char *ip, const char *port,
                        const char *bindip, int *err)
{
    struct sockaddr_in a = addr_of(ip, port);
    struct epoll_event ev = { .events = EPOLLIN, .data.u64 = data };
    struct linger l = { 1, 1 };
    int one = 1, buf = sipp_sndbuf, fl, s, r;

    s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0)
        die("socket");
    if (ep >= 0 && epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev) != 0)
        die("epoll_ctl add");
    if (setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) ||
        setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) ||
        setsockopt(s, SOL_SOCKET, SO_LINGER, &l, sizeof l) ||
        setsockopt(s, SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf) ||
        setsockopt(s, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf))
        die("setsockopt");
    if (bindip) {
        struct sockaddr_in b = addr_of(bindip, "0");
        if (bind(s, (struct sockaddr *)&b, sizeof b) != 0)
            die("bind");
    }
    fl = fcntl(s, F_GETFL, 0);
    fcntl(s, F_SETFL, fl | O_NONBLOCK);
    errno = 0;
    r = connect(s, (struct sockaddr *)&a, sizeof a);
    *err = errno;
    if (r < 0 && errno != EINPROGRESS) {
        close(s);
        return -1;
    }
    if (r < 0) { /* wait for the real connect to finish */
        fd_set w;
        FD_ZERO(&w);
        FD_SET(s, &w);
        select(s + 1, NULL, &w, NULL, NULL);
    }
    fcntl(s, F_SETFL, fl);
    return s;
}

static int wait_in(int ep, int ms, uint64_t *data)
{
    struct epoll_event ev;
    int n = epoll_wait(ep, &ev, 1, ms);
    if (n == 1)
        *data = ev.data.u64;
    return n;
}

static int cmd_client(int argc, char **argv)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    char buf[256];
    uint64_t data = 0;
    int ep = epoll_create1(EPOLL_CLOEXEC), err, s, n;
    struct linger rst = { 1, 0 };

    s = sipp_connect(ep, 7, argv[2], argv[3], argc > 4 ? argv[4] : NULL, &err);
    if (s < 0) {
        printf("connect=-1 errno=%s\n", ename(err));
        return 3;
    }
    printf("connected=%d errno=%s\n", s, ename(err));
    printf("cloexec=%d nonblock=%d\n", (fcntl(s, F_GETFD) & FD_CLOEXEC) != 0,
           (fcntl(s, F_GETFL) & O_NONBLOCK) != 0);
    printf("domain=%s\n", domain_of(s) == AF_UNIX ? "unix" : domain_of(s) == AF_INET ? "inet" : "?");
    errno = EXDEV; /* a successful call leaves errno alone */
    if (getpeername(s, (struct sockaddr *)&ss, &sl) == 0)
        print_addr_len("peer", (struct sockaddr *)&ss, sl);
    printf("errno_after_name=%s\n", ename(errno));
    sl = sizeof ss;
    if (getsockname(s, (struct sockaddr *)&ss, &sl) == 0)
        print_addr_len("local", (struct sockaddr *)&ss, sl);
    {
        /* A short buffer: at most len bytes copied, the full size reported. */
        struct sockaddr_storage full, part;
        socklen_t fl = sizeof full, pl = 6;
        int r;
        memset(&part, 0xee, sizeof part);
        getsockname(s, (struct sockaddr *)&full, &fl);
        r = getsockname(s, (struct sockaddr *)&part, &pl);
        printf("trunc=%d,%u,%d\n", r, (unsigned)pl,
               memcmp(&part, &full, 6) == 0 && ((unsigned char *)&part)[6] == 0xee);
        pl = 0;
        r = getpeername(s, NULL, &pl);
        printf("zero=%d,%u\n", r, (unsigned)pl);
    }
    /* sipp may set TCP options on the connection after the handoff. */
    {
        int one = 1;
        printf("nodelay=%d\n", setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one));
    }
    fflush(stdout);
    if (send(s, "hello\n", 6, MSG_DONTWAIT) != 6)
        die("send");
    n = wait_in(ep, 5000, &data);
    printf("events=%d data=%llu\n", n, (unsigned long long)data);
    if (n == 1) {
        n = (int)recvfrom(s, buf, sizeof buf - 1, 0, NULL, NULL);
        buf[n > 0 ? n : 0] = 0;
        buf[strcspn(buf, "\n")] = 0;
        printf("got=%s\n", buf);
    }
    /* What sipp does on a reset, then on every close. */
    printf("linger=%d\n", setsockopt(s, SOL_SOCKET, SO_LINGER, &rst, sizeof rst));
    epoll_ctl(ep, EPOLL_CTL_DEL, s, NULL);
    printf("shutdown=%d\n", shutdown(s, SHUT_RDWR));
    printf("close=%d\n", close(s));
    return 0;
}

static int cmd_connect(int argc, char **argv)
{
    struct sockaddr_in a = addr_of(argv[2], argv[3]);
    int s = socket(AF_INET, SOCK_STREAM, 0), r;
    (void)argc;
    errno = 0;
    r = connect(s, (struct sockaddr *)&a, sizeof a);
    printf("rc=%d errno=%s\n", r, ename(r ? errno : 0));
    return 0;
}

static int cmd_untouched(int argc, char **argv)
{
    struct sockaddr_in u = addr_of(argv[2], argv[5]);
    int err, t, s;
    (void)argc;

    /* sipp's local-IP probe: a connected UDP socket. */
    s = socket(AF_INET, SOCK_DGRAM, 0);
    printf("udp_connect=%d\n", connect(s, (struct sockaddr *)&u, sizeof u));
    printf("udp_send=%zd\n", send(s, "udp\n", 4, 0));
    printf("udp_shutdown=%d\n", shutdown(s, SHUT_RDWR));
    close(s);
    /* A TCP connect somewhere else than the SuT. */
    t = sipp_connect(-1, 0, argv[2], argv[4], NULL, &err);
    printf("other_connect=%d\n", t >= 0 ? 0 : -1);
    printf("other_send=%zd\n", send(t, "other\n", 6, 0));
    printf("other_shutdown=%d\n", shutdown(t, SHUT_RDWR));
    close(t);
    return 0;
}

/* After the kept fd k was closed: a plain connection to IP:PORT gets its number
 * back, and the shim leaves it alone (send and shutdown are real). */
static int reuse_number(int k, const char *ip, const char *port)
{
    int err, s = sipp_connect(-1, 0, ip, port, NULL, &err);
    printf("reused=%d\n", s == k);
    printf("send_other=%zd\n", send(s, "other\n", 6, 0));
    printf("shutdown_reused=%d\n", shutdown(s, SHUT_RDWR));
    close(s);
    return 0;
}

static int cmd_dup(int argc, char **argv)
{
    int err, k, a, b, c, u, r;
    (void)argc;

    k = sipp_connect(-1, 0, argv[2], argv[3], NULL, &err);
    if (k < 0)
        die("connect");
    a = dup(k);
    b = dup2(k, 50);
    c = fcntl(k, F_DUPFD, 60);
    printf("dups=%d,%d,%d\n", a >= 0, b == 50, c >= 60);
    printf("shutdown_dup=%d shutdown_dup2=%d shutdown_dupfd=%d\n", shutdown(a, SHUT_RDWR),
           shutdown(b, SHUT_RDWR), shutdown(c, SHUT_RDWR));
    printf("send_dupfd=%zd\n", send(c, "via-dup\n", 8, 0));
    /* dup2 of an untracked socket over a copy of the kept fd: the copy's state goes. */
    u = socket(AF_INET, SOCK_DGRAM, 0);
    dup2(u, b);
    errno = 0;
    r = shutdown(b, SHUT_RDWR);
    printf("shutdown_over=%d errno=%s\n", r, ename(errno));
    close(u);
    close(b);
    close(a);
    close(c);
    printf("shutdown_kept=%d\n", shutdown(k, SHUT_RDWR));
    close(k);
    /* The number comes back for a plain connection: shutdown is real there. */
    return reuse_number(k, argv[2], argv[4]);
}

static int cmd_fork(int argc, char **argv)
{
    int err, k, status;
    pid_t pid;
    (void)argc;

    k = sipp_connect(-1, 0, argv[2], argv[3], NULL, &err);
    if (k < 0)
        die("connect");
    fflush(stdout);
    pid = fork();
    if (pid == 0) {
        send(k, "child\n", 6, 0);
        printf("child_shutdown=%d\n", shutdown(k, SHUT_RDWR));
        close(k);
        fflush(stdout);
        _exit(0);
    }
    waitpid(pid, &status, 0);
    printf("parent_send=%zd\n", send(k, "parent\n", 7, 0));
    printf("parent_shutdown=%d\n", shutdown(k, SHUT_RDWR));
    close(k);
    return 0;
}

static volatile int hammering = 1;

/* Copies and closes of the kept fd: each goes through the shim's table lock. */
static void *hammer(void *arg)
{
    int k = *(int *)arg;
    while (hammering) {
        int d = dup(k);
        if (d >= 0)
            close(d);
    }
    return NULL;
}

static int cmd_threadfork(int argc, char **argv)
{
    int err, k, n = atoi(argv[4]), hung = 0, failed = 0, status;
    pthread_t t;
    (void)argc;

    k = sipp_connect(-1, 0, argv[2], argv[3], NULL, &err);
    if (k < 0)
        die("connect");
    pthread_create(&t, NULL, hammer, &k);
    for (int i = 0; i < n; i++) {
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0) { /* the shim's lock must be usable here, and the table intact */
            alarm(10);
            int d = dup(k);
            int ok = d >= 0 && shutdown(d, SHUT_RDWR) == 0 && close(d) == 0;
            _exit(ok ? 0 : 1);
        }
        if (pid < 0)
            die("fork");
        waitpid(pid, &status, 0);
        hung += WIFSIGNALED(status) && WTERMSIG(status) == SIGALRM;
        failed += !WIFEXITED(status) || WEXITSTATUS(status) != 0;
    }
    hammering = 0;
    pthread_join(t, NULL);
    printf("forks=%d hung=%d failed=%d\n", n, hung, failed);
    printf("send_after=%zd\n", send(k, "after-forks\n", 12, 0));
    printf("shutdown_kept=%d\n", shutdown(k, SHUT_RDWR));
    close(k);
    return 0;
}

static int cmd_closerange(int argc, char **argv)
{
    int err, k, s, r;
    (void)argc;

    k = sipp_connect(-1, 0, argv[2], argv[3], NULL, &err);
    if (k < 0)
        die("connect");
    /* A copy, closed by close_range: the kept fd stays kept. */
    printf("dup2=%d\n", dup2(k, 40) == 40);
    r = close_range(40, 40, CLOSE_RANGE_CLOEXEC);
    printf("cloexec_rc=%d cloexec_flag=%d", r, fcntl(40, F_GETFD) == FD_CLOEXEC);
    printf(" shutdown_cloexec=%d\n", shutdown(40, SHUT_RDWR));
    r = close_range(40, 45, 0);
    errno = 0;
    printf("range_rc=%d gone=%d\n", r, fcntl(40, F_GETFD) == -1 && errno == EBADF);
    /* A copy closed by close(), the number reused by a UDP socket: the state went with it. */
    r = dup2(k, 41);
    printf("dup2_again=%d", r == 41);
    printf(" close_copy=%d\n", close(41));
    s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s != 41)
        dup2(s, 41), close(s);
    errno = 0;
    r = shutdown(41, SHUT_RDWR);
    printf("shutdown_udp=%d errno=%s\n", r, ename(errno));
    close(41);
    printf("send_kept=%zd", send(k, "after-close-range\n", 18, 0));
    printf(" shutdown_kept=%d\n", shutdown(k, SHUT_RDWR));
    /* close_range over the kept fd itself: released to the keeper, the number is plain again. */
    printf("range_kept_rc=%d\n", close_range((unsigned)k, (unsigned)k, 0));
    return reuse_number(k, argv[2], argv[4]);
}

static int cmd_server(int argc, char **argv)
{
    int want = atoi(argv[2]), got = 0, addr_ok = 0, blocking = 0, cloexec = 0, one = 1;
    int verbose = argc > 3 && !strcmp(argv[3], "v");
    const char *idle = getenv("SHIMPROG_IDLE_MS");
    int idle_ms = idle ? atoi(idle) : 2000;
    int ep = epoll_create1(0), l = socket(AF_INET, SOCK_STREAM, 0);
    int *fds = calloc((size_t)want + 1, sizeof(int));
    struct epoll_event ev = { .events = EPOLLIN, .data.u64 = 5 };
    struct epoll_event evs[16];
    struct sockaddr_in b = addr_of("127.0.0.1", "0");
    (void)argc;

    /* sipp: socket, epoll ADD at once, options, bind, listen; invalidate()
     * of another socket may later MOD the listener with a new index. */
    if (epoll_ctl(ep, EPOLL_CTL_ADD, l, &ev) != 0)
        die("epoll add");
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(l, (struct sockaddr *)&b, sizeof b) != 0)
        die("bind");
    if (listen(l, 100) != 0)
        die("listen");
    ev.data.u64 = 0;
    if (epoll_ctl(ep, EPOLL_CTL_MOD, l, &ev) != 0)
        die("epoll mod");
    while (got < want) {
        int n = epoll_wait(ep, evs, 16, idle_ms);
        if (n <= 0)
            break;
        for (int i = 0; i < n; i++) {
            struct sockaddr_storage ss, ps;
            socklen_t sl = sizeof ss, pl = sizeof ps;
            int fd;
            if (evs[i].data.u64 != 0)
                continue;
            fd = (got & 1) ? accept4(l, (struct sockaddr *)&ss, &sl, SOCK_CLOEXEC)
                           : accept(l, (struct sockaddr *)&ss, &sl);
            if (fd < 0)
                die("accept");
            if (getpeername(fd, (struct sockaddr *)&ps, &pl) == 0 && pl == sl &&
                memcmp(&ps, &ss, sl) == 0)
                addr_ok++;
            if (verbose) {
                struct sockaddr_storage ls;
                socklen_t ll = sizeof ls;
                char a[128], b[128];
                getsockname(fd, (struct sockaddr *)&ls, &ll);
                format_addr((struct sockaddr *)&ss, sl, a, sizeof a);
                format_addr((struct sockaddr *)&ls, ll, b, sizeof b);
                printf("acc%d=%s,%s,%s\n", got, a, b,
                       domain_of(fd) == AF_UNIX ? "unix" : domain_of(fd) == AF_INET ? "inet" : "?");
            }
            blocking += !(fcntl(fd, F_GETFL) & O_NONBLOCK);
            cloexec += (fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0;
            ev.data.u64 = 1000 + (uint64_t)got;
            if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) != 0)
                die("epoll add accepted");
            fds[got++] = fd;
        }
    }
    printf("accepted=%d addr_ok=%d blocking=%d cloexec=%d\n", got, addr_ok, blocking, cloexec);
    for (int i = 0; i < got; i++) {
        char msg[32];
        int m = snprintf(msg, sizeof msg, "srv %d\n", i);
        send(fds[i], msg, (size_t)m, 0);
        epoll_ctl(ep, EPOLL_CTL_DEL, fds[i], NULL);
        shutdown(fds[i], SHUT_RDWR);
        close(fds[i]);
    }
    free(fds);
    printf("done=1\n");
    return 0;
}

static int count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    struct dirent *de;
    int n = 0;
    if (!d)
        return -1;
    while ((de = readdir(d)))
        n += de->d_name[0] != '.';
    closedir(d);
    return n - 1; /* the directory's own fd */
}

static ssize_t send_how(const char *how, int s, const char *msg, size_t len)
{
    struct iovec iov[3] = { { (void *)msg, 10 }, { (void *)(msg + 10), 20 },
                            { (void *)(msg + 30), len - 30 } };
    struct msghdr mh;
    if (!strcmp(how, "sendto"))
        return sendto(s, msg, len, MSG_DONTWAIT, NULL, 0);
    if (!strcmp(how, "write"))
        return write(s, msg, len);
    if (!strcmp(how, "writev"))
        return writev(s, iov, 3);
    if (!strcmp(how, "sendmsg")) {
        memset(&mh, 0, sizeof mh);
        mh.msg_iov = iov;
        mh.msg_iovlen = 3;
        return sendmsg(s, &mh, MSG_DONTWAIT);
    }
    return send(s, msg, len, MSG_DONTWAIT);
}

/* Whether how starts with prefix; if so, the prefix is cut off. */
static int percall_prefix(char *how, const char *prefix)
{
    size_t n = strlen(prefix);

    if (strncmp(how, prefix, n) != 0)
        return 0;
    memmove(how, how + n, strlen(how + n) + 1);
    return 1;
}

static int cmd_percall(int argc, char **argv)
{
    int ep = epoll_create1(EPOLL_CLOEXEC);

    printf("fds_base=%d\n", count_fds());
    for (int i = 5; i < argc; i++) {
        int c = i - 5, err, s, n, ml;
        const char *bar = strchr(argv[i], '|'), *from;
        char how[32], msg[1024], buf[512], fromline[600];
        struct epoll_event ev;
        struct pollfd pfd;
        struct sockaddr_storage ss;
        socklen_t sl = sizeof ss;
        uint64_t data = 0;
        ssize_t r;

        int child = 0;

        if (!bar || bar - argv[i] >= (int)sizeof how)
            return 1;
        memcpy(how, argv[i], (size_t)(bar - argv[i]));
        how[bar - argv[i]] = 0;
        from = bar + 1;
        if (percall_prefix(how, "wait+")) {
            char line[16];
            if (!fgets(line, sizeof line, stdin))
                die("stdin");
        }
        if (percall_prefix(how, "hog+")) {
            int last = -1, before = -1;
            for (int d; (d = dup(0)) >= 0;)
                before = last, last = d;
            close(last);
            close(before);
        }
        if (percall_prefix(how, "closerange+") && close_range((unsigned)ep + 1, ~0U, 0) != 0)
            die("close_range");
        if (percall_prefix(how, "fork+")) {
            pid_t pid = fork();
            if (pid < 0)
                die("fork");
            if (pid > 0) {
                int st;
                if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st))
                    die("child");
                continue;
            }
            child = 1;
        }
        s = sipp_connect(ep, 100 + (uint64_t)c, argv[2], argv[3], argv[4], &err);
        printf("c%d_connect=%d c%d_err=%s\n", c, s >= 0 ? 0 : -1, c, ename(err));
        if (s < 0)
            continue;
        if (!strcmp(how, "dup")) { /* the program moves the socket to another number */
            int d = dup(s);
            epoll_ctl(ep, EPOLL_CTL_DEL, s, NULL);
            close(s);
            s = d;
            ev.events = EPOLLIN;
            ev.data.u64 = 100 + (uint64_t)c;
            if (epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev) != 0)
                die("epoll add dup");
            strcpy(how, "send");
        }
        /* Before the first send: nothing to read, no hangup. */
        pfd.fd = s;
        pfd.events = POLLIN | POLLRDHUP;
        pfd.revents = 0;
        n = poll(&pfd, 1, 100);
        printf("c%d_poll=%d,%d\n", c, n, pfd.revents);
        n = epoll_wait(ep, &ev, 1, 100);
        printf("c%d_quiet=%d\n", c, n);
        printf("c%d_fds=%d\n", c, count_fds());
        if (getpeername(s, (struct sockaddr *)&ss, &sl) == 0) {
            char key[32];
            snprintf(key, sizeof key, "c%d_peer", c);
            print_addr_len(key, (struct sockaddr *)&ss, sl);
        }
        {
            int one = 1; /* sipp may set options at any time; TCP ones are fatal if they fail */
            printf("c%d_nodelay=%d\n", c,
                   setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one));
        }
        if (!strcmp(from, "-"))
            fromline[0] = 0;
        else
            snprintf(fromline, sizeof fromline, "%s\r\n", from);
        ml = snprintf(msg, sizeof msg,
                      "INVITE sip:service@%s:%s SIP/2.0\r\n"
                      "Via: SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bK-%d\r\n"
                      "%s"
                      "To: <sip:service@%s:%s>\r\n"
                      "Call-ID: call-%d\r\n"
                      "CSeq: 1 INVITE\r\n"
                      "Content-Length: 0\r\n\r\n",
                      argv[2], argv[3], c, fromline, argv[2], argv[3], c);
        errno = 0;
        r = send_how(how, s, msg, (size_t)ml);
        printf("c%d_send=%d c%d_send_errno=%s\n", c, r == ml ? 1 : (int)r, c,
               ename(r < 0 ? errno : 0));
        if (r == ml) {
            n = epoll_wait(ep, &ev, 1, 5000);
            if (n == 1)
                data = ev.data.u64;
            printf("c%d_events=%d c%d_data=%llu\n", c, n, c, (unsigned long long)data);
            n = (int)recvfrom(s, buf, sizeof buf - 1, 0, NULL, NULL);
            buf[n > 0 ? n : 0] = 0;
            buf[strcspn(buf, "\r\n")] = 0;
            printf("c%d_got=%s\n", c, buf);
            printf("c%d_domain=%s\n", c, domain_of(s) == AF_UNIX ? "unix" : "inet");
        }
        epoll_ctl(ep, EPOLL_CTL_DEL, s, NULL);
        shutdown(s, SHUT_RDWR);
        close(s);
        if (child) {
            fflush(stdout);
            _exit(0);
        }
    }
    printf("fds_end=%d\n", count_fds());
    return 0;
}

/* sipp's write(): send with MSG_DONTWAIT; a short send leaves the tail, sent
 * again from its offset once the socket is writable. Returns the partial sends. */
static int sipp_send_all(int s, const char *msg, size_t len)
{
    size_t off = 0;
    int partial = 0;

    while (off < len) {
        ssize_t r = send(s, msg + off, len - off, MSG_DONTWAIT);
        if (r > 0) {
            off += (size_t)r;
            partial += off < len;
            continue;
        }
        if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
            die("send");
        struct pollfd pfd = { .fd = s, .events = POLLOUT };
        if (poll(&pfd, 1, 10000) != 1)
            die("poll out");
    }
    return partial;
}

static int cmd_percallvia(int argc, char **argv)
{
    int fillers = atoi(argv[7]), calls = atoi(argv[8]);
    size_t cap = 4096 + (size_t)fillers * 128;
    char *msg = malloc(cap);

    (void)argc;
    sipp_sndbuf = atoi(argv[6]);
    if (!msg)
        die("malloc");
    for (int c = 0; c < calls; c++) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof ss;
        char me[64], body[128], line[256];
        size_t ml = 0;
        int err, s, n;

        s = sipp_connect(-1, 0, argv[2], argv[3], argv[4], &err);
        if (s < 0)
            die("connect");
        if (getsockname(s, (struct sockaddr *)&ss, &sl) != 0) /* sipp reads [local_port] */
            die("getsockname");
        format_addr((struct sockaddr *)&ss, sl, me, sizeof me);
        printf("c%d_placeholder=%s\n", c, me);
        snprintf(body, sizeof body, "body names %s and stays as it is\r\n", me);
        ml += (size_t)snprintf(msg + ml, cap - ml,
                               "INVITE sip:service@%s:%s SIP/2.0\r\n"
                               "Via: SIP/2.0/TCP %s;branch=z9hG4bK-%d\r\n"
                               "%s\r\nTo: <sip:service@%s:%s>\r\nCall-ID: via-%d\r\n"
                               "CSeq: 1 INVITE\r\nContact: <sip:u@%s;transport=tcp>\r\n",
                               argv[2], argv[3], me, c, argv[5], argv[2], argv[3], c, me);
        for (int i = 0; i < fillers; i++)
            ml += (size_t)snprintf(msg + ml, cap - ml, "X-Filler-%d: %s %s0 9%s\r\n", i, me,
                                   me, me);
        ml += (size_t)snprintf(msg + ml, cap - ml,
                               "Content-Type: text/plain\r\nContent-Length: %zu\r\n\r\n%s",
                               strlen(body), body);
        printf("c%d_len=%zu\n", c, ml);
        printf("c%d_partial=%d\n", c, sipp_send_all(s, msg, ml));
        struct pollfd pfd = { .fd = s, .events = POLLIN };
        n = poll(&pfd, 1, 10000) == 1 ? (int)recv(s, line, sizeof line - 1, 0) : -1;
        line[n > 0 ? n : 0] = 0;
        line[strcspn(line, "\r\n")] = 0;
        printf("c%d_got=%s\n", c, line);
        close(s);
    }
    free(msg);
    return 0;
}

int main(int argc, char **argv)
{
    int r;
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2)
        return 1;
    if (!strcmp(argv[1], "client") && argc >= 4)
        r = cmd_client(argc, argv);
    else if (!strcmp(argv[1], "connect") && argc >= 4)
        r = cmd_connect(argc, argv);
    else if (!strcmp(argv[1], "untouched") && argc >= 6)
        r = cmd_untouched(argc, argv);
    else if (!strcmp(argv[1], "dup") && argc >= 5)
        r = cmd_dup(argc, argv);
    else if (!strcmp(argv[1], "fork") && argc >= 4)
        r = cmd_fork(argc, argv);
    else if (!strcmp(argv[1], "threadfork") && argc >= 5)
        r = cmd_threadfork(argc, argv);
    else if (!strcmp(argv[1], "closerange") && argc >= 5)
        r = cmd_closerange(argc, argv);
    else if (!strcmp(argv[1], "server") && argc >= 3)
        r = cmd_server(argc, argv);
    else if (!strcmp(argv[1], "percall") && argc >= 5)
        r = cmd_percall(argc, argv);
    else if (!strcmp(argv[1], "percallvia") && argc >= 9)
        r = cmd_percallvia(argc, argv);
    else
        return 1;
    return r;
}
