/* A tiny SIP agent for the ptrace-mode tests, linked statically (LD_PRELOAD cannot reach it).
 *
 *   sipagent register SUT_IP SUT_PORT USER DOMAIN [plain|thread|fork]
 *       connect (epoll-registered first, O_NONBLOCK, as sipp does), REGISTER, wait for 200.
 *       thread: the connect runs in a second thread while others make syscalls;
 *       fork:   the connect runs in a forked child while the parent makes syscalls.
 *   sipagent answer
 *       listen on 127.0.0.1:0, epoll_wait(-1) for the listener, accept, answer one INVITE
 *       with 200, then the BYE with 200.
 * Both end as sipp does: shutdown(SHUT_RDWR), SO_LINGER {1,0}, close - which must not
 * reach a kept connection. Exit status 0 on success; a line on stderr otherwise. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static int ep;
static char buf[65536];
static size_t have;
static volatile int stop_noise;

static void die(const char *what) { fprintf(stderr, "sipagent: %s: %s\n", what, strerror(errno)); exit(1); }

static void hostile_close(int fd)
{
    struct linger l = {1, 0};
    shutdown(fd, SHUT_RDWR);
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
    close(fd);
}

/* One whole SIP message from fd into msg (NUL-terminated); waits through epoll. */
static void read_message(int fd, char *msg, size_t room)
{
    for (;;) {
        char *end = memmem(buf, have, "\r\n\r\n", 4);
        if (end) {
            size_t head = end + 4 - buf, body = 0;
            char *cl = strcasestr(buf, "\r\nContent-Length:");
            if (cl && cl < end)
                body = strtoul(cl + 17, NULL, 10);
            if (have >= head + body) {
                size_t n = head + body < room - 1 ? head + body : room - 1;
                memcpy(msg, buf, n);
                msg[n] = 0;
                memmove(buf, buf + head + body, have - head - body);
                have -= head + body;
                if (n == 0 || strncmp(msg, "\r\n", 2) == 0)
                    continue;
                return;
            }
        }
        struct epoll_event ev;
        if (epoll_wait(ep, &ev, 1, 10000) != 1)
            die("no SIP message within 10 s");
        ssize_t r = recv(fd, buf + have, sizeof buf - have, MSG_DONTWAIT);
        if (r == 0) { errno = ECONNRESET; die("connection closed"); }
        if (r < 0 && errno != EAGAIN) die("recv");
        if (r > 0) have += r;
    }
}

static void send_all(int fd, const char *text)
{
    size_t n = strlen(text);
    while (n) {
        ssize_t w = send(fd, text, n, MSG_NOSIGNAL);
        if (w < 0 && errno != EAGAIN) die("send");
        if (w > 0) { text += w; n -= w; }
    }
}

static void *noise(void *arg)
{
    (void)arg;
    while (!stop_noise) { /* syscalls of every kind while the handoff happens */
        int s = socket(AF_INET, SOCK_STREAM, 0);
        close(s);
        getppid();
        usleep(100);
    }
    return NULL;
}

struct reg { const char *ip, *user, *domain; int port; int result; };

static void *do_register(void *arg)
{
    struct reg *r = arg;
    struct sockaddr_in sut = {.sin_family = AF_INET, .sin_port = htons(r->port)};
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 7};
    char msg[8192], req[1024];
    struct sockaddr_in me;
    socklen_t ml = sizeof me;
    int fd = socket(AF_INET, SOCK_STREAM, 0);

    inet_pton(AF_INET, r->ip, &sut.sin_addr);
    if (fd < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) != 0) die("socket/epoll_ctl");
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    if (connect(fd, (struct sockaddr *)&sut, sizeof sut) != 0 && errno != EINPROGRESS) die("connect");
    getsockname(fd, (struct sockaddr *)&me, &ml);
    snprintf(req, sizeof req,
             "REGISTER sip:%s SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:%d;branch=z9hG4bK-%d\r\n"
             "Max-Forwards: 70\r\nFrom: <sip:%s@%s>;tag=%d\r\nTo: <sip:%s@%s>\r\nCall-ID: reg-%d@sipagent\r\n"
             "CSeq: 1 REGISTER\r\nContact: <sip:%s@127.0.0.1:%d;transport=tcp>\r\nExpires: 3600\r\n"
             "Content-Length: 0\r\n\r\n",
             r->domain, ntohs(me.sin_port), getpid(), r->user, r->domain, getpid(), r->user, r->domain,
             getpid(), r->user, ntohs(me.sin_port));
    send_all(fd, req);
    do read_message(fd, msg, sizeof msg); while (strncmp(msg, "SIP/2.0 1", 9) == 0);
    if (strncmp(msg, "SIP/2.0 200", 11) != 0) { fprintf(stderr, "sipagent: REGISTER got: %.40s\n", msg); exit(1); }
    hostile_close(fd);
    r->result = 0;
    return NULL;
}

static int do_answer(void)
{
    struct sockaddr_in me = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 42};
    char msg[8192], out[8192], peer[64];
    struct sockaddr_in from;
    socklen_t fl = sizeof from;
    int l = socket(AF_INET, SOCK_STREAM, 0), c;

    if (l < 0 || bind(l, (struct sockaddr *)&me, sizeof me) != 0) die("bind");
    if (epoll_ctl(ep, EPOLL_CTL_ADD, l, &ev) != 0 || listen(l, 8) != 0) die("listen");
    if (epoll_wait(ep, &ev, 1, -1) != 1 || ev.data.u64 != 42) die("epoll_wait for the listener");
    if ((c = accept(l, (struct sockaddr *)&from, &fl)) < 0) die("accept");
    inet_ntop(AF_INET, &from.sin_addr, peer, sizeof peer);
    printf("accepted %s:%d\n", peer, ntohs(from.sin_port));
    fflush(stdout);
    ev.data.u64 = 43;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev) != 0) die("epoll_ctl on the accepted fd");
    for (;;) {
        read_message(c, msg, sizeof msg);
        int invite = strncmp(msg, "INVITE ", 7) == 0, bye = strncmp(msg, "BYE ", 4) == 0;
        if (!invite && !bye)
            continue; /* ACK */
        /* Echo the dialog headers, as sipp's [last_*] do. */
        size_t n = snprintf(out, sizeof out, "SIP/2.0 200 OK\r\n");
        for (char *line = strstr(msg, "\r\n") + 2; line && *line != '\r'; line = strstr(line, "\r\n") + 2) {
            char *eol = strstr(line, "\r\n");
            static const char *keep[] = {"Via:", "v:", "From:", "f:", "To:", "t:", "Call-ID:", "i:", "CSeq:", "Record-Route:"};
            for (size_t k = 0; k < sizeof keep / sizeof *keep; k++)
                if (strncasecmp(line, keep[k], strlen(keep[k])) == 0) {
                    n += snprintf(out + n, sizeof out - n, "%.*s%s\r\n", (int)(eol - line), line,
                                  invite && (k == 4 || k == 5) ? ";tag=sipagent" : "");
                    break;
                }
        }
        n += snprintf(out + n, sizeof out - n, "Contact: <sip:127.0.0.1:5999;transport=tcp>\r\nContent-Length: 0\r\n\r\n");
        send_all(c, out);
        if (bye)
            break;
    }
    hostile_close(c);
    return 0;
}

int main(int argc, char **argv)
{
    if ((ep = epoll_create1(0)) < 0) die("epoll_create1");
    if (argc >= 2 && strcmp(argv[1], "answer") == 0)
        return do_answer();
    if (argc < 6 || strcmp(argv[1], "register") != 0) {
        fprintf(stderr, "usage: sipagent register IP PORT USER DOMAIN [plain|thread|fork] | sipagent answer\n");
        return 2;
    }
    struct reg r = {argv[2], argv[4], argv[5], atoi(argv[3]), 1};
    const char *how = argc > 6 ? argv[6] : "plain";
    pthread_t noisy[3], worker;
    if (strcmp(how, "plain") == 0) {
        do_register(&r);
        return r.result;
    }
    for (int i = 0; i < 3; i++)
        pthread_create(&noisy[i], NULL, noise, NULL);
    usleep(20000);
    if (strcmp(how, "thread") == 0) {
        pthread_create(&worker, NULL, do_register, &r);
        pthread_join(worker, NULL);
    } else {
        pid_t child = fork();
        int status;
        if (child == 0) {
            do_register(&r);
            _exit(r.result);
        }
        waitpid(child, &status, 0);
        r.result = WIFEXITED(status) ? WEXITSTATUS(status) : 1;
    }
    stop_noise = 1;
    for (int i = 0; i < 3; i++)
        pthread_join(noisy[i], NULL);
    return r.result;
}
