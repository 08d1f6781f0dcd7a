/* Binding of the real libc symbols (dlsym(RTLD_NEXT)), once per process. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "real.h"

struct real_fns shim_real;
static pthread_once_t real_once = PTHREAD_ONCE_INIT;

/* The write system call itself: write() is interposed, and its real one may
 * be what could not be bound. */
static void raw_write(const char *s)
{
    if (syscall(SYS_write, 2, s, strlen(s)) < 0) {
        /* nothing more we can do */
    }
}

static void die(const char *what, const char *why)
{
    /* No stdio: we may be in the middle of anything. */
    raw_write("fdkeeper-shim: fatal: cannot bind the real ");
    raw_write(what);
    raw_write(": ");
    raw_write(why);
    raw_write("\n");
    abort();
}

static void *bind_one(const char *name, int required)
{
    Dl_info self, found;
    void *p;

    dlerror();
    p = dlsym(RTLD_NEXT, name);
    if (!p) {
        if (required) {
            const char *e = dlerror();
            die(name, e ? e : "not found");
        }
        return NULL;
    }
    /* RTLD_NEXT must never come back to this library (proxychains-ng does the same check). */
    if (dladdr((void *)&bind_one, &self) && dladdr(p, &found) &&
        self.dli_fbase == found.dli_fbase)
        die(name, "dlsym(RTLD_NEXT) resolved to the shim itself (is it linked into the program?)");
    return p;
}

static void bind_all(void)
{
    shim_real.socket = (int (*)(int, int, int))bind_one("socket", 1);
    shim_real.bind = (int (*)(int, const struct sockaddr *, socklen_t))bind_one("bind", 1);
    shim_real.connect = (int (*)(int, const struct sockaddr *, socklen_t))bind_one("connect", 1);
    shim_real.listen = (int (*)(int, int))bind_one("listen", 1);
    shim_real.accept = (int (*)(int, struct sockaddr *, socklen_t *))bind_one("accept", 1);
    shim_real.accept4 = (int (*)(int, struct sockaddr *, socklen_t *, int))bind_one("accept4", 1);
    shim_real.shutdown = (int (*)(int, int))bind_one("shutdown", 1);
    shim_real.close = (int (*)(int))bind_one("close", 1);
    shim_real.dup = (int (*)(int))bind_one("dup", 1);
    shim_real.dup2 = (int (*)(int, int))bind_one("dup2", 1);
    shim_real.dup3 = (int (*)(int, int, int))bind_one("dup3", 1);
    shim_real.fcntl = (int (*)(int, int, ...))bind_one("fcntl", 1);
    shim_real.fcntl64 = (int (*)(int, int, ...))bind_one("fcntl64", 0);
    if (!shim_real.fcntl64)
        shim_real.fcntl64 = shim_real.fcntl;
    shim_real.setsockopt =
        (int (*)(int, int, int, const void *, socklen_t))bind_one("setsockopt", 1);
    shim_real.getsockname =
        (int (*)(int, struct sockaddr *, socklen_t *))bind_one("getsockname", 1);
    shim_real.getpeername =
        (int (*)(int, struct sockaddr *, socklen_t *))bind_one("getpeername", 1);
    shim_real.epoll_ctl = (int (*)(int, int, int, struct epoll_event *))bind_one("epoll_ctl", 1);
    shim_real.epoll_wait = (int (*)(int, struct epoll_event *, int, int))bind_one("epoll_wait", 1);
    shim_real.epoll_pwait = (int (*)(int, struct epoll_event *, int, int, const sigset_t *))
        bind_one("epoll_pwait", 1);
    shim_real.send = (ssize_t (*)(int, const void *, size_t, int))bind_one("send", 1);
    shim_real.sendto = (ssize_t (*)(int, const void *, size_t, int, const struct sockaddr *,
                                    socklen_t))bind_one("sendto", 1);
    shim_real.sendmsg = (ssize_t (*)(int, const struct msghdr *, int))bind_one("sendmsg", 1);
    shim_real.write = (ssize_t (*)(int, const void *, size_t))bind_one("write", 1);
    shim_real.writev = (ssize_t (*)(int, const struct iovec *, int))bind_one("writev", 1);
}

void real_init(void)
{
    pthread_once(&real_once, bind_all);
}
