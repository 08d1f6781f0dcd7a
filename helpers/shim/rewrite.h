/* The placeholder's address in what a per-call connection sends (pure logic,
 * no I/O; percall.c applies it at each send, tests/shim/rewrite_test.c tests it).
 *
 * sipp -t tn writes [local_port] (Via sent-by, Contact) from the socket it
 * bound before connect(), which the shim replaced by a placeholder: the SuT
 * would see a new port on every call of the same user and connection. The
 * kept connection's "IP:PORT" replaces the placeholder's, same length only, in
 * the header part of a message, so Content-Length and every offset into the
 * message stay as the program computed them. */
#ifndef FDKEEPER_REWRITE_H
#define FDKEEPER_REWRITE_H

#include <stddef.h>
#include <sys/uio.h>
#include "shim.h"

#define RW_MAX_ADDR 64            /* "[IPv6]:PORT" fits */
#define RW_MAX_HEADERS (64 * 1024) /* bytes of a message looked at: sipp's largest message */

struct rw_pair {
    char from[RW_MAX_ADDR]; /* the placeholder's "IP:PORT" as the program wrote it */
    char to[RW_MAX_ADDR];   /* the kept connection's */
    size_t len;             /* of both */
};

/* Set pair from/to (NUL-terminated). 0; -1 when they differ in length, are
 * empty or too long (the message is then left as it is). */
SHIM_HIDDEN int rw_pair_set(struct rw_pair *p, const char *from, const char *to);

/* The end offset of the last occurrence of p->from in the header part of
 * msg[0..len) (up to its first blank line, at most RW_MAX_HEADERS bytes), at
 * address boundaries (not inside a longer name or number); 0 when none. */
SHIM_HIDDEN size_t rw_last_end(const struct rw_pair *p, const char *msg, size_t len);

/* out[0..end) = msg[0..end) with every such occurrence of p->from that ends
 * at or before end replaced by p->to; returns how many were replaced. */
SHIM_HIDDEN size_t rw_apply(const struct rw_pair *p, const char *msg, size_t end, char *out);

/* What a per-call fd still owes of a message the kernel took only part of.
 * sipp resends the untaken tail of a message itself (its own buffer, from the
 * offset send() returned), so the tail must go out as the rewritten copy did,
 * never half old: a token split across two sends included. */
struct rw_tail {
    char *copy;              /* the rewritten header part (malloc'ed), or NULL */
    size_t copy_off, copy_len; /* copy[copy_off..copy_len) is still to send */
    size_t plain;            /* then this many bytes of the message pass as given */
};

/* One send planned: the program's buffer with the substitutions. */
struct rw_send {
    struct iovec iov[4];
    int iovcnt;
    int changed;             /* 0: send the program's buffer itself */
    size_t from_tail;        /* bytes of buf that continue the tail's copy */
    size_t from_plain;       /* then bytes of the tail's plain rest */
    size_t msg_len;          /* then bytes of a message that starts in this send */
    char *fresh;             /* its rewritten header part (malloc'ed) or NULL */
    size_t fresh_len;
};

/* Plan a send of buf[0..len) on an fd with pair p and tail t: every byte of
 * buf goes out, the tail's copy instead of the program's bytes it continues,
 * and a message starting in buf rewritten. -1 without memory (nothing planned). */
SHIM_HIDDEN int rw_plan(const struct rw_pair *p, const struct rw_tail *t, const char *buf,
                        size_t len, struct rw_send *s);
/* The kernel took n bytes of the planned send (0 when it failed): t says what
 * is still owed; the plan's memory is given to t or freed. */
SHIM_HIDDEN void rw_done(struct rw_tail *t, struct rw_send *s, size_t n);
SHIM_HIDDEN void rw_tail_free(struct rw_tail *t);

#endif
