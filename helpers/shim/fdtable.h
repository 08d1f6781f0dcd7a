/* Per-fd state of the shim: an array of entry pointers indexed by fd,
 * grown on demand, protected by one mutex (re-initialised in a forked child). */
#ifndef FDKEEPER_FDTABLE_H
#define FDKEEPER_FDTABLE_H

#include <stdint.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/types.h>
#include "rewrite.h"
#include "shim.h"

#define FDE_CANDIDATE 0x1u /* AF_INET/AF_INET6 SOCK_STREAM socket */
#define FDE_KEPT 0x2u      /* refers to a connection the keeper holds */
#define FDE_PAIR 0x4u      /* kept, but not an inet socket (TLS: a socketpair end):
                            * getsockname/getpeername answer peer/local below */
#define FDE_PENDING 0x8u   /* FDKEEPER_PER_CALL: "connected" to a quiet placeholder;
                            * the lease waits for the first send (its From AoR).
                            * getsockname/getpeername answer peer/local below */

#define FDE_REWRITE 0x10u  /* FDKEEPER_PER_CALL, kept: the placeholder's address is rewritten
                            * in what is sent (rewrite.h; state in rw below) */

#define FDE_ANY (FDE_CANDIDATE | FDE_KEPT | FDE_PAIR | FDE_PENDING)

#define FDE_MAX_OPTS 8
#define FDE_OPT_LEN 32
#define FDE_MAX_REGS 4

struct fde_opt {
    int level, name;
    socklen_t len;
    unsigned char val[FDE_OPT_LEN];
};

struct fde_reg {
    int epfd;
    uint32_t events;
    epoll_data_t data;
};

/* A descriptor received from the keeper with its FDS peers=/locals= entries. */
struct fde_item {
    int fd;
    struct shim_inaddr peer, local;
};

/* Descriptors received from the keeper for a listener, not yet accepted. */
struct fde_pending {
    struct fde_item *items;
    int head, count, cap;
};

/* The other end of a PENDING fd's placeholder socketpair: kept open so that
 * the placeholder is never readable nor hung up; shared by dups of the fd. */
struct fde_placeholder {
    int peer_fd;
    dev_t dev;
    ino_t ino;
    int refs; /* entries pointing here */
};

struct fde {
    unsigned flags;
    int family;
    dev_t dev;                /* identity of the socket the entry describes */
    ino_t ino;
    int has_bind;
    struct sockaddr_storage bind_addr;
    int nopts;
    struct fde_opt opts[FDE_MAX_OPTS];
    int nregs;
    struct fde_reg regs[FDE_MAX_REGS];
    struct fde_pending *pending;
    struct shim_inaddr peer, local; /* from the keeper (kept fds); PENDING: the SuT and
                                     * the program's own socket's local address */
    struct fde_placeholder *ph;     /* PENDING only */
    struct fde_rewrite *rw;         /* REWRITE only */
};

/* A REWRITE fd's address pair and what it still owes of a partly sent message. */
struct fde_rewrite {
    struct rw_pair pair;
    struct rw_tail tail;
};

SHIM_HIDDEN void fdt_lock(void);
SHIM_HIDDEN void fdt_unlock(void);

/* All of these need the lock held. */
SHIM_HIDDEN struct fde *fdt_get(int fd);
/* A fresh zeroed entry for fd (an old one is dropped first); NULL without memory. */
SHIM_HIDDEN struct fde *fdt_create(int fd);
/* Drop fd's entry. Descriptors still pending on it are appended to
 * close_fds/nclose (malloc'ed; the caller closes them after unlocking). */
SHIM_HIDDEN void fdt_remove(int fd, int **close_fds, int *nclose);
/* to gets a copy of from's state (not its epoll registrations, which belong
 * to the fd number, nor its pending queue); to's old state is dropped. */
SHIM_HIDDEN void fdt_copy(int from, int to, int **close_fds, int *nclose);

/* Make e PENDING on a placeholder whose other end is peer_fd (lock held);
 * 0, or -1 without memory. */
SHIM_HIDDEN int fdt_set_pending(struct fde *e, int peer_fd);
/* e is no longer PENDING; its placeholder's other end goes to the close list
 * when no other entry shares it (lock held). */
SHIM_HIDDEN void fdt_clear_pending(struct fde *e, int **close_fds, int *nclose);
/* Number of PENDING entries (no lock needed): 0 lets send() skip the table. */
SHIM_HIDDEN int fdt_pending_sends(void);

/* Make kept entry e rewrite p in what is sent (lock held); 0, or -1 without memory. */
SHIM_HIDDEN int fdt_set_rewrite(struct fde *e, const struct rw_pair *p);
/* Number of REWRITE entries (no lock needed): 0 lets send() skip the table. */
SHIM_HIDDEN int fdt_rewrite_fds(void);

/* Entry state helpers (lock held). */
SHIM_HIDDEN void fde_set_opt(struct fde *e, int level, int name, const void *val, socklen_t len);
SHIM_HIDDEN void fde_epoll_update(struct fde *e, int epfd, int op, const struct epoll_event *ev);
/* Append descriptors to a listener's queue, with their addresses (peers and
 * locals may be NULL: not known); returns 0 or -1 (ENOMEM). */
SHIM_HIDDEN int fdt_pending_add(int fd, const int *fds, const struct shim_inaddr *peers,
                                const struct shim_inaddr *locals, int n);
/* Pop the next pending descriptor of listener fd into *out; returns its fd, or -1. */
SHIM_HIDDEN int fdt_pending_pop(int fd, struct fde_item *out);
/* Number of descriptors pending on all listeners (no lock needed). */
SHIM_HIDDEN int fdt_pending_total(void);
/* Fill up to max events {EPOLLIN, data} for listeners with pending
 * descriptors registered in epfd; returns how many. */
SHIM_HIDDEN int fdt_pending_events(int epfd, struct epoll_event *out, int max);

/* Close a list returned by fdt_remove/fdt_copy and free it. */
SHIM_HIDDEN void fdt_close_list(int *fds, int n);

/* Record fd's current socket identity (dev, inode) in e. */
SHIM_HIDDEN void fde_set_identity(int fd, struct fde *e);
/* Is fd still the socket of that identity? (fds can be closed behind our back,
 * e.g. by fclose() on an fdopen()ed socket, and their numbers reused.) Keeps
 * errno; no lock needed. */
SHIM_HIDDEN int fdt_same_socket(int fd, dev_t dev, ino_t ino);

/* These take the lock themselves. */

/* The one lookup of every call on a tracked fd: if fd has an entry with any
 * of the `want` flags, copy it to *snap and return 1, provided fd still is
 * the socket the entry was made for; a stale entry is forgotten (0). The
 * copy's pending/ph pointers belong to the table: do not follow them. */
SHIM_HIDDEN int fdt_lookup(int fd, unsigned want, struct fde *snap);
/* Drop the entries of fd (of every fd in first..last), closing what they
 * still held (a listener's queue, the last placeholder's other end); returns
 * the union of their flags (0: none). Keeps errno. */
SHIM_HIDDEN unsigned fdt_forget(int fd);
SHIM_HIDDEN unsigned fdt_forget_range(unsigned first, unsigned last);
/* If fd is REWRITE (and still its socket): 1, with its pair in *p and its
 * tail moved into *t (the entry's is left empty until fdt_rewrite_put). */
SHIM_HIDDEN int fdt_rewrite_take(int fd, struct rw_pair *p, struct rw_tail *t);
/* Give the tail back to fd's entry (freed if fd is no longer REWRITE). */
SHIM_HIDDEN void fdt_rewrite_put(int fd, struct rw_tail *t);
/* After a dup from -> to: to inherits from's state (see fdt_copy). Keeps errno. */
SHIM_HIDDEN void fdt_note_dup(int from, int to);

#endif
