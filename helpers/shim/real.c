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
#define REAL_BIND(name, required) shim_real.name.obj = bind_one(#name, required);
    REAL_SYMBOLS(REAL_BIND)
#undef REAL_BIND
    if (!shim_real.fcntl64.obj)
        shim_real.fcntl64.f = shim_real.fcntl.f;
}

void real_init(void)
{
    pthread_once(&real_once, bind_all);
}
