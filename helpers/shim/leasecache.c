/* The lease cache (see leasecache.h): a bounded table of this process's own
 * copies of the connections the keeper leased it per call, keyed by the LEASE
 * request that got each, the least recently used evicted first. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "handoff.h"
#include "leasecache.h"
#include "real.h"

struct lc_entry {
    struct lc_entry *chain;       /* next in its hash bucket */
    struct lc_entry *newer, *older; /* the LRU list */
    uint32_t hash;
    int fd;
    dev_t dev; /* the socket fd was when kept: a number the program took over is not ours */
    ino_t ino;
    struct lc_answer answer;
    char request[]; /* the key */
};

static pthread_mutex_t lc_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t lc_once = PTHREAD_ONCE_INIT;
static int lc_cap;                  /* copies kept at most (0: the cache is off) */
static int lc_kept;                 /* copies kept now; read without the lock as a hint */
static struct lc_entry **buckets;   /* lc_nbuckets (a power of two), allocated at the first put */
static uint32_t lc_nbuckets;
static struct lc_entry *newest, *oldest;
static struct lc_entry **by_fd;     /* the entry whose copy has that number, for the program's closes */
static int by_fd_len;

static uint32_t hash_of(const char *s)
{
    uint32_t h = 2166136261u; /* FNV-1a */

    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 16777619u;
    return h;
}

static void atfork_prepare(void) { pthread_mutex_lock(&lc_mutex); }
static void atfork_parent(void) { pthread_mutex_unlock(&lc_mutex); }
static void atfork_child(void);

/* The bound: FDKEEPER_LEASE_CACHE, else LC_DEFAULT_MAX, and never more than a
 * quarter of the open-file limit. */
static void lc_init(void)
{
    struct rlimit rl;
    long want = shim_config()->lease_cache;
    long quarter = LC_DEFAULT_MAX;

    if (want < 0)
        want = LC_DEFAULT_MAX;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY)
        quarter = (long)(rl.rlim_cur / 4);
    lc_cap = (int)(want < quarter ? want : quarter);
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

int lc_enabled(void)
{
    pthread_once(&lc_once, lc_init);
    return lc_cap > 0;
}

int lc_count(void)
{
    return __atomic_load_n(&lc_kept, __ATOMIC_RELAXED);
}

static struct lc_entry *find(const char *request, uint32_t h)
{
    for (struct lc_entry *e = buckets[h & (lc_nbuckets - 1)]; e; e = e->chain)
        if (e->hash == h && strcmp(e->request, request) == 0)
            return e;
    return NULL;
}

static void unlink_lru(struct lc_entry *e)
{
    if (e->newer)
        e->newer->older = e->older;
    else
        newest = e->older;
    if (e->older)
        e->older->newer = e->newer;
    else
        oldest = e->newer;
    e->newer = e->older = NULL;
}

static void push_newest(struct lc_entry *e)
{
    e->older = newest;
    e->newer = NULL;
    if (newest)
        newest->newer = e;
    newest = e;
    if (!oldest)
        oldest = e;
}

/* Forget e; its copy is closed when close_it and its number is still that socket. */
static void drop(struct lc_entry *e, int close_it)
{
    struct lc_entry **p = &buckets[e->hash & (lc_nbuckets - 1)];

    while (*p != e)
        p = &(*p)->chain;
    *p = e->chain;
    unlink_lru(e);
    if (e->fd < by_fd_len && by_fd[e->fd] == e)
        by_fd[e->fd] = NULL;
    if (close_it && fdt_same_socket(e->fd, e->dev, e->ino))
        REAL(close)(e->fd);
    __atomic_store_n(&lc_kept, lc_kept - 1, __ATOMIC_RELAXED);
    free(e);
}

/* Whether the copy's peer ended it: the SuT's FIN or RST on a TCP socket, the
 * keeper's end of a socketpair gone. Such a copy is for the keeper to judge. */
static int ended(int fd)
{
    struct pollfd p = { .fd = fd, .events = POLLRDHUP };

    return poll(&p, 1, 0) != 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL));
}

int lc_take_onto(const char *request, int fd, struct lc_answer *out)
{
    struct lc_entry *e;
    uint32_t h;
    int r = -1, saved = errno;

    if (!lc_count()) /* also when the cache is off: nothing was put */
        return -1;
    h = hash_of(request);
    pthread_mutex_lock(&lc_mutex);
    if (!buckets || !(e = find(request, h)))
        goto out;
    if (!fdt_same_socket(e->fd, e->dev, e->ino)) { /* its number was closed behind our back */
        drop(e, 0);
        goto out;
    }
    if (ended(e->fd)) {
        drop(e, 1);
        goto out;
    }
    if (handoff_dup_keeping(e->fd, fd) != 0)
        goto out;
    unlink_lru(e);
    push_newest(e);
    *out = e->answer;
    r = 0;
out:
    pthread_mutex_unlock(&lc_mutex);
    errno = saved;
    return r;
}

/* The table's storage, at the first put; 0 or -1 without memory. */
static int have_storage(void)
{
    uint32_t n = 16;

    if (buckets)
        return 0;
    while (n < 2u * (uint32_t)lc_cap)
        n *= 2;
    if (!(buckets = calloc(n, sizeof *buckets)))
        return -1;
    lc_nbuckets = n;
    return 0;
}

/* by_fd long enough for fd; 0 or -1 without memory. */
static int room_for_fd(int fd)
{
    int len = by_fd_len ? by_fd_len : 256;
    struct lc_entry **grown;

    if (fd < by_fd_len)
        return 0;
    while (len <= fd)
        len *= 2;
    if (!(grown = realloc(by_fd, (size_t)len * sizeof *grown)))
        return -1;
    memset(grown + by_fd_len, 0, (size_t)(len - by_fd_len) * sizeof *grown);
    by_fd = grown;
    by_fd_len = len;
    return 0;
}

void lc_put(const char *request, int kept, const struct lc_answer *answer)
{
    size_t len = strlen(request);
    uint32_t h = hash_of(request);
    struct lc_entry *e, *old;
    struct stat st;
    int saved = errno;

    if (!lc_enabled() || fstat(kept, &st) != 0) {
        REAL(close)(kept);
        errno = saved;
        return;
    }
    pthread_mutex_lock(&lc_mutex);
    if (have_storage() != 0 || room_for_fd(kept) != 0 || !(e = malloc(sizeof *e + len + 1))) {
        pthread_mutex_unlock(&lc_mutex);
        REAL(close)(kept);
        errno = saved;
        return;
    }
    if ((old = find(request, h)))
        drop(old, 1);
    while (lc_kept >= lc_cap && oldest)
        drop(oldest, 1);
    memset(e, 0, sizeof *e);
    memcpy(e->request, request, len + 1);
    e->hash = h;
    e->fd = kept;
    e->dev = st.st_dev;
    e->ino = st.st_ino;
    e->answer = *answer;
    e->chain = buckets[h & (lc_nbuckets - 1)];
    buckets[h & (lc_nbuckets - 1)] = e;
    push_newest(e);
    by_fd[kept] = e;
    __atomic_store_n(&lc_kept, lc_kept + 1, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&lc_mutex);
    errno = saved;
}

int lc_gave_way(void)
{
    int closed = 0, saved = errno;

    if (saved != EMFILE || !lc_count())
        return 0;
    pthread_mutex_lock(&lc_mutex);
    for (int n = (lc_kept + 1) / 2; n > 0 && oldest; n--, closed++)
        drop(oldest, 1);
    pthread_mutex_unlock(&lc_mutex);
    shim_debug("out of descriptors: closed %d of the lease cache's copies", closed);
    errno = saved;
    return closed;
}

void lc_lost_range(unsigned first, unsigned last)
{
    int saved = errno;

    if (!lc_count())
        return;
    pthread_mutex_lock(&lc_mutex);
    for (unsigned fd = first; fd <= last && fd < (unsigned)by_fd_len; fd++)
        if (by_fd[fd])
            drop(by_fd[fd], 0);
    pthread_mutex_unlock(&lc_mutex);
    errno = saved;
}

void lc_lost_fd(int fd)
{
    if (fd >= 0)
        lc_lost_range((unsigned)fd, (unsigned)fd);
}

/* A forked child holds no lease (the keeper leased the parent's pid): its
 * copies of the parent's are closed, and it asks the keeper for its own. */
static void atfork_child(void)
{
    while (oldest)
        drop(oldest, 1);
    pthread_mutex_init(&lc_mutex, NULL);
}
