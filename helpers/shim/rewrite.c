/* The placeholder's address rewritten in what a per-call fd sends (see
 * rewrite.h). Pure logic: no I/O, no locks, no shim state. */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>

#include "rewrite.h"

int rw_pair_set(struct rw_pair *p, const char *from, const char *to)
{
    size_t n = strlen(from);

    memset(p, 0, sizeof *p);
    if (n == 0 || n >= RW_MAX_ADDR || strlen(to) != n)
        return -1;
    memcpy(p->from, from, n);
    memcpy(p->to, to, n);
    p->len = n;
    return 0;
}

/* Bytes that would make an occurrence part of a longer name or number. */
static int continues_before(char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           c == '.' || c == ':' || c == '-' || c == '_';
}

static int continues_after(char c)
{
    return c >= '0' && c <= '9';
}

/* The header part: up to and including the first blank line, capped. */
static size_t header_part(const char *msg, size_t len)
{
    size_t cap = len < RW_MAX_HEADERS ? len : RW_MAX_HEADERS;
    const char *blank = memmem(msg, cap, "\r\n\r\n", 4);

    return blank ? (size_t)(blank - msg) + 4 : cap;
}

/* The next occurrence of p->from at address boundaries in msg[at..end), or NULL. */
static const char *next_token(const struct rw_pair *p, const char *msg, size_t at, size_t end)
{
    while (at + p->len <= end) {
        const char *hit = memmem(msg + at, end - at, p->from, p->len);
        size_t i;

        if (!hit)
            return NULL;
        i = (size_t)(hit - msg);
        if ((i == 0 || !continues_before(msg[i - 1])) &&
            (i + p->len == end || !continues_after(msg[i + p->len])))
            return hit;
        at = i + 1;
    }
    return NULL;
}

size_t rw_last_end(const struct rw_pair *p, const char *msg, size_t len)
{
    size_t end = header_part(msg, len), last = 0, at = 0;
    const char *hit;

    if (!p->len)
        return 0;
    while ((hit = next_token(p, msg, at, end))) {
        at = (size_t)(hit - msg) + p->len;
        last = at;
    }
    return last;
}

size_t rw_apply(const struct rw_pair *p, const char *msg, size_t end, char *out)
{
    size_t n = 0, at = 0;
    const char *hit;

    memcpy(out, msg, end);
    if (!p->len)
        return 0;
    while ((hit = next_token(p, msg, at, end))) {
        at = (size_t)(hit - msg);
        memcpy(out + at, p->to, p->len);
        at += p->len;
        n++;
    }
    return n;
}

static void add_iov(struct rw_send *s, const void *base, size_t len)
{
    if (!len)
        return;
    if (s->iovcnt > 0 && (const char *)s->iov[s->iovcnt - 1].iov_base +
                                 s->iov[s->iovcnt - 1].iov_len == (const char *)base) {
        s->iov[s->iovcnt - 1].iov_len += len; /* the program's bytes, contiguous */
        return;
    }
    s->iov[s->iovcnt].iov_base = (void *)base;
    s->iov[s->iovcnt].iov_len = len;
    s->iovcnt++;
}

static size_t min_size(size_t a, size_t b)
{
    return a < b ? a : b;
}

int rw_plan(const struct rw_pair *p, const struct rw_tail *t, const char *buf, size_t len,
            struct rw_send *s)
{
    size_t at, end;

    memset(s, 0, sizeof *s);
    s->from_tail = t->copy ? min_size(len, t->copy_len - t->copy_off) : 0;
    s->from_plain = min_size(len - s->from_tail, t->plain);
    at = s->from_tail + s->from_plain;
    s->msg_len = len - at;
    end = s->msg_len ? rw_last_end(p, buf + at, s->msg_len) : 0;
    if (end) {
        if (!(s->fresh = malloc(end)))
            return -1;
        rw_apply(p, buf + at, end, s->fresh);
        s->fresh_len = end;
    }
    s->changed = s->from_tail || s->fresh;
    if (!s->changed)
        return 0;
    if (s->from_tail)
        add_iov(s, t->copy + t->copy_off, s->from_tail);
    add_iov(s, buf + s->from_tail, s->from_plain);
    if (s->fresh)
        add_iov(s, s->fresh, s->fresh_len);
    add_iov(s, buf + at + s->fresh_len, s->msg_len - s->fresh_len);
    return 0;
}

void rw_tail_free(struct rw_tail *t)
{
    free(t->copy);
    memset(t, 0, sizeof *t);
}

void rw_done(struct rw_tail *t, struct rw_send *s, size_t n)
{
    size_t k = min_size(n, s->from_tail);

    t->copy_off += k;
    n -= k;
    if (t->copy && t->copy_off == t->copy_len) {
        free(t->copy);
        t->copy = NULL;
        t->copy_off = t->copy_len = 0;
    }
    k = min_size(n, s->from_plain);
    t->plain -= k;
    n -= k;
    if (n == 0 || !s->msg_len) { /* the new message (if any) is sent again, whole */
        free(s->fresh);
        s->fresh = NULL;
        return;
    }
    /* n bytes of a new message went: the tail is now that message's (the
     * previous one is complete, or n would have stopped above). */
    if (s->fresh && n < s->fresh_len) {
        t->copy = s->fresh;
        t->copy_off = n;
        t->copy_len = s->fresh_len;
        t->plain = s->msg_len - s->fresh_len;
    } else {
        free(s->fresh);
        t->plain = s->msg_len - n;
    }
    s->fresh = NULL;
}
