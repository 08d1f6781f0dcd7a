/* Per-fd state table. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fdtable.h"
#include "real.h"

static pthread_mutex_t table_mutex = PTHREAD_MUTEX_INITIALIZER;
static struct fde **table;
static int table_size;
/* Listeners that have pending descriptors (normally one). */
static int *listeners;
static int nlisteners, listeners_cap;
static int pending_total; /* read without the lock through __atomic */
static int pending_sends; /* PENDING entries; read without the lock through __atomic */
static int rewrite_fds;   /* REWRITE entries; read without the lock through __atomic */

/* Fork safety as cwrap's socket_wrapper does it: the forking thread takes the
 * lock (so no other thread is inside the table when the process is copied),
 * the parent releases it, the child (whose only thread is the forking one)
 * starts with a fresh lock. The child keeps the table: it has the same fds. */
static void atfork_prepare(void) { pthread_mutex_lock(&table_mutex); }
static void atfork_parent(void) { pthread_mutex_unlock(&table_mutex); }
static void atfork_child(void) { pthread_mutex_init(&table_mutex, NULL); }

/* Registered when the library is loaded, not at the first use: a program
 * that forks before any socket call must find the handlers in place. */
__attribute__((constructor)) static void fdt_constructor(void)
{
    real_init();
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

void fdt_lock(void)
{
    pthread_mutex_lock(&table_mutex);
}

void fdt_unlock(void)
{
    pthread_mutex_unlock(&table_mutex);
}

struct fde *fdt_get(int fd)
{
    if (fd < 0 || fd >= table_size)
        return NULL;
    return table[fd];
}

static int grow(int fd)
{
    int n = table_size ? table_size : 64;
    struct fde **t;

    while (n <= fd) {
        if (n > (1 << 29))
            return -1;
        n *= 2;
    }
    t = realloc(table, (size_t)n * sizeof *t);
    if (!t)
        return -1;
    memset(t + table_size, 0, (size_t)(n - table_size) * sizeof *t);
    table = t;
    table_size = n;
    return 0;
}

/* The socket's identity: fd numbers are reused, (dev, inode) is not while it is open. */
static void identity_of(int fd, dev_t *dev, ino_t *ino)
{
    struct stat st;
    int saved = errno;
    if (fstat(fd, &st) == 0) {
        *dev = st.st_dev;
        *ino = st.st_ino;
    }
    errno = saved;
}

int fdt_same_socket(int fd, dev_t dev, ino_t ino)
{
    struct stat st;
    int saved = errno;
    int ok = fstat(fd, &st) == 0 && st.st_dev == dev && st.st_ino == ino;
    errno = saved;
    return ok;
}

void fde_set_identity(int fd, struct fde *e)
{
    identity_of(fd, &e->dev, &e->ino);
}

static void list_append(int **list, int *n, int fd)
{
    int *l = realloc(*list, (size_t)(*n + 1) * sizeof **list);
    if (!l) /* should not happen; at worst we leak the descriptor */
        return;
    l[(*n)++] = fd;
    *list = l;
}

static void drop_listener(int fd)
{
    for (int i = 0; i < nlisteners; i++) {
        if (listeners[i] == fd) {
            listeners[i] = listeners[--nlisteners];
            return;
        }
    }
}

void fdt_clear_pending(struct fde *e, int **close_fds, int *nclose)
{
    struct fde_placeholder *ph = e->ph;

    if (!(e->flags & FDE_PENDING))
        return;
    e->flags &= ~FDE_PENDING;
    e->ph = NULL;
    __atomic_sub_fetch(&pending_sends, 1, __ATOMIC_RELAXED);
    if (ph && --ph->refs == 0) {
        /* Only if the number still is our socket (not closed behind our back and reused). */
        if (fdt_same_socket(ph->peer_fd, ph->dev, ph->ino))
            list_append(close_fds, nclose, ph->peer_fd);
        free(ph);
    }
}

int fdt_set_pending(struct fde *e, int peer_fd)
{
    struct fde_placeholder *ph = calloc(1, sizeof *ph);

    if (!ph)
        return -1;
    ph->peer_fd = peer_fd;
    ph->refs = 1;
    identity_of(peer_fd, &ph->dev, &ph->ino);
    e->ph = ph;
    e->flags |= FDE_PENDING;
    __atomic_add_fetch(&pending_sends, 1, __ATOMIC_RELAXED);
    return 0;
}

int fdt_pending_sends(void)
{
    return __atomic_load_n(&pending_sends, __ATOMIC_RELAXED);
}

int fdt_set_rewrite(struct fde *e, const struct rw_pair *p)
{
    if (!e->rw && !(e->rw = calloc(1, sizeof *e->rw)))
        return -1;
    rw_tail_free(&e->rw->tail);
    e->rw->pair = *p;
    if (!(e->flags & FDE_REWRITE))
        __atomic_add_fetch(&rewrite_fds, 1, __ATOMIC_RELAXED);
    e->flags |= FDE_REWRITE;
    return 0;
}

static void clear_rewrite(struct fde *e)
{
    if (e->rw) {
        rw_tail_free(&e->rw->tail);
        free(e->rw);
        e->rw = NULL;
    }
    if (e->flags & FDE_REWRITE)
        __atomic_sub_fetch(&rewrite_fds, 1, __ATOMIC_RELAXED);
    e->flags &= ~FDE_REWRITE;
}

int fdt_rewrite_fds(void)
{
    return __atomic_load_n(&rewrite_fds, __ATOMIC_RELAXED);
}

static void free_entry(int fd, struct fde *e, int **close_fds, int *nclose)
{
    fdt_clear_pending(e, close_fds, nclose);
    clear_rewrite(e);
    if (e->pending) {
        struct fde_pending *p = e->pending;
        for (int i = p->head; i < p->count; i++)
            list_append(close_fds, nclose, p->items[i].fd);
        __atomic_sub_fetch(&pending_total, p->count - p->head, __ATOMIC_RELAXED);
        drop_listener(fd);
        free(p->items);
        free(p);
    }
    free(e);
}

void fdt_remove(int fd, int **close_fds, int *nclose)
{
    struct fde *e = fdt_get(fd);
    if (!e)
        return;
    table[fd] = NULL;
    free_entry(fd, e, close_fds, nclose);
}

struct fde *fdt_create(int fd)
{
    struct fde *e;
    int *cl = NULL, ncl = 0;

    if (fd < 0)
        return NULL;
    if (fd >= table_size && grow(fd) != 0)
        return NULL;
    fdt_remove(fd, &cl, &ncl);
    fdt_close_list(cl, ncl); /* a stale listener entry: close what it still held */
    e = calloc(1, sizeof *e);
    if (!e)
        return NULL;
    table[fd] = e;
    return e;
}

void fdt_copy(int from, int to, int **close_fds, int *nclose)
{
    struct fde *src, *dst;

    if (from == to)
        return;
    fdt_remove(to, close_fds, nclose);
    src = fdt_get(from);
    if (!src)
        return;
    dst = fdt_create(to);
    if (!dst)
        return;
    memcpy(dst, src, sizeof *dst);
    dst->nregs = 0;
    dst->pending = NULL;
    if (dst->flags & FDE_PENDING) { /* the copy shares the placeholder */
        dst->ph->refs++;
        __atomic_add_fetch(&pending_sends, 1, __ATOMIC_RELAXED);
    }
    dst->rw = NULL; /* the copy rewrites too, but owes nothing of the original's sends */
    dst->flags &= ~FDE_REWRITE;
    if ((src->flags & FDE_REWRITE) && src->rw)
        fdt_set_rewrite(dst, &src->rw->pair);
}

void fde_set_opt(struct fde *e, int level, int name, const void *val, socklen_t len)
{
    struct fde_opt *o = NULL;

    if (len > FDE_OPT_LEN || (len && !val))
        return;
    for (int i = 0; i < e->nopts; i++)
        if (e->opts[i].level == level && e->opts[i].name == name)
            o = &e->opts[i];
    if (!o) {
        if (e->nopts == FDE_MAX_OPTS)
            return;
        o = &e->opts[e->nopts++];
    }
    o->level = level;
    o->name = name;
    o->len = len;
    if (len)
        memcpy(o->val, val, len);
}

void fde_epoll_update(struct fde *e, int epfd, int op, const struct epoll_event *ev)
{
    int i;

    for (i = 0; i < e->nregs; i++)
        if (e->regs[i].epfd == epfd)
            break;
    if (op == EPOLL_CTL_DEL) {
        if (i < e->nregs)
            e->regs[i] = e->regs[--e->nregs];
        return;
    }
    if (!ev)
        return;
    if (i == e->nregs) {
        if (e->nregs == FDE_MAX_REGS)
            return;
        e->nregs++;
    }
    e->regs[i].epfd = epfd;
    e->regs[i].events = ev->events;
    e->regs[i].data = ev->data;
}

int fdt_pending_add(int fd, const int *fds, const struct shim_inaddr *peers,
                    const struct shim_inaddr *locals, int n)
{
    struct fde *e = fdt_get(fd);
    struct fde_pending *p;

    if (!e)
        return -1;
    if (!e->pending && !(e->pending = calloc(1, sizeof *e->pending)))
        return -1;
    p = e->pending;
    if (p->count + n > p->cap) {
        int cap = p->cap ? p->cap : 16;
        struct fde_item *f;
        while (cap < p->count + n)
            cap *= 2;
        f = realloc(p->items, (size_t)cap * sizeof *f);
        if (!f)
            return -1;
        p->items = f;
        p->cap = cap;
    }
    for (int i = 0; i < n; i++) {
        struct fde_item *it = &p->items[p->count + i];
        memset(it, 0, sizeof *it);
        it->fd = fds[i];
        if (peers)
            it->peer = peers[i];
        if (locals)
            it->local = locals[i];
    }
    p->count += n;
    if (n > 0) {
        int found = 0;
        for (int i = 0; i < nlisteners; i++)
            found |= listeners[i] == fd;
        if (!found) {
            if (nlisteners == listeners_cap) {
                int cap = listeners_cap ? listeners_cap * 2 : 4;
                int *l = realloc(listeners, (size_t)cap * sizeof *l);
                if (!l)
                    return -1;
                listeners = l;
                listeners_cap = cap;
            }
            listeners[nlisteners++] = fd;
        }
        __atomic_add_fetch(&pending_total, n, __ATOMIC_RELAXED);
    }
    return 0;
}

int fdt_pending_pop(int fd, struct fde_item *out)
{
    struct fde *e = fdt_get(fd);
    struct fde_pending *p;
    int r;

    if (!e || !(p = e->pending) || p->head == p->count)
        return -1;
    *out = p->items[p->head++];
    r = out->fd;
    __atomic_sub_fetch(&pending_total, 1, __ATOMIC_RELAXED);
    if (p->head == p->count) {
        drop_listener(fd);
        p->head = p->count = 0;
    }
    return r;
}

int fdt_pending_total(void)
{
    return __atomic_load_n(&pending_total, __ATOMIC_RELAXED);
}

int fdt_pending_events(int epfd, struct epoll_event *out, int max)
{
    int n = 0;

    for (int i = 0; i < nlisteners && n < max; i++) {
        struct fde *e = fdt_get(listeners[i]);
        if (!e || !e->pending || e->pending->head == e->pending->count)
            continue;
        for (int j = 0; j < e->nregs && n < max; j++) {
            if (e->regs[j].epfd != epfd || !(e->regs[j].events & EPOLLIN))
                continue;
            out[n].events = EPOLLIN;
            out[n].data = e->regs[j].data;
            n++;
        }
    }
    return n;
}

void fdt_close_list(int *fds, int n)
{
    int saved = errno;
    for (int i = 0; i < n; i++)
        REAL(close)(fds[i]);
    free(fds);
    errno = saved;
}

int fdt_lookup(int fd, unsigned want, struct fde *snap)
{
    int found = 0;

    fdt_lock();
    struct fde *e = fdt_get(fd);
    if (e && (e->flags & want)) {
        *snap = *e;
        found = 1;
    }
    fdt_unlock();
    if (found && !fdt_same_socket(fd, snap->dev, snap->ino)) {
        fdt_forget(fd);
        found = 0;
    }
    return found;
}

int fdt_rewrite_take(int fd, struct rw_pair *p, struct rw_tail *t)
{
    int found = 0;
    dev_t dev = 0;
    ino_t ino = 0;

    fdt_lock();
    struct fde *e = fdt_get(fd);
    if (e && (e->flags & FDE_REWRITE) && e->rw) {
        *p = e->rw->pair;
        *t = e->rw->tail;
        memset(&e->rw->tail, 0, sizeof e->rw->tail);
        dev = e->dev;
        ino = e->ino;
        found = 1;
    }
    fdt_unlock();
    if (found && !fdt_same_socket(fd, dev, ino)) { /* closed behind our back: not ours now */
        rw_tail_free(t);
        fdt_forget(fd);
        found = 0;
    }
    return found;
}

void fdt_rewrite_put(int fd, struct rw_tail *t)
{
    fdt_lock();
    struct fde *e = fdt_get(fd);
    if (e && (e->flags & FDE_REWRITE) && e->rw && !e->rw->tail.copy && !e->rw->tail.plain) {
        e->rw->tail = *t;
        memset(t, 0, sizeof *t);
    }
    fdt_unlock();
    rw_tail_free(t);
}

unsigned fdt_forget(int fd)
{
    return fdt_forget_range((unsigned)fd, (unsigned)fd);
}

unsigned fdt_forget_range(unsigned first, unsigned last)
{
    int *cl = NULL, ncl = 0;
    unsigned had = 0;

    fdt_lock();
    if (last >= (unsigned)table_size)
        last = (unsigned)table_size - 1; /* table_size 0: nothing (first > last) */
    for (unsigned fd = first; fd <= last && table_size > 0; fd++) {
        if (table[fd]) {
            had |= table[fd]->flags;
            fdt_remove((int)fd, &cl, &ncl);
        }
    }
    fdt_unlock();
    fdt_close_list(cl, ncl);
    return had;
}

void fdt_note_dup(int from, int to)
{
    int *cl = NULL, ncl = 0;
    int saved = errno;
    fdt_lock();
    fdt_copy(from, to, &cl, &ncl);
    fdt_unlock();
    fdt_close_list(cl, ncl);
    errno = saved;
}
