/* Unit test driver of helpers/shim/rewrite.c (tests/shim/test_shim_rewrite.py), linked
 * with it directly: no shim, no sockets.
 *
 *   rewrite_test apply FROM TO          stdin: one message; prints "end=E count=C",
 *                                       a newline, then the message as rewritten
 *   rewrite_test stream FROM TO SEED    stdin: messages separated by NUL bytes, sent
 *                                       the way sipp sends them (send, and the untaken
 *                                       tail resent from its offset) into a "kernel"
 *                                       that takes a random number of bytes each time;
 *                                       prints every byte the kernel took (and
 *                                       "sends=N partial=P" on stderr)
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rewrite.h"

static char *read_all(size_t *len)
{
    size_t cap = 1 << 16, n = 0, r;
    char *buf = malloc(cap);

    while (buf && (r = fread(buf + n, 1, cap - n, stdin)) > 0) {
        n += r;
        if (n == cap && !(buf = realloc(buf, cap *= 2)))
            break;
    }
    if (!buf)
        exit(3);
    *len = n;
    return buf;
}

static int cmd_apply(const struct rw_pair *p)
{
    size_t len, end;
    char *msg = read_all(&len), *out = malloc(len + 1);
    size_t count;

    end = rw_last_end(p, msg, len);
    count = rw_apply(p, msg, end, out);
    memcpy(out + end, msg + end, len - end);
    printf("end=%zu count=%zu\n", end, count);
    fwrite(out, 1, len, stdout);
    free(msg);
    free(out);
    return 0;
}

/* The "kernel": takes 0..all of the planned bytes, appends them to stdout. */
static size_t kernel_take(const struct rw_send *s, const char *buf, size_t len, unsigned *seed)
{
    size_t total = len, n = (size_t)rand_r(seed) % (total + 1), left;

    if (rand_r(seed) % 3 == 0)
        n = total; /* often all of it, as a socket with room does */
    left = n;
    if (!s->changed) {
        fwrite(buf, 1, n, stdout);
        return n;
    }
    for (int i = 0; i < s->iovcnt && left; i++) {
        size_t k = s->iov[i].iov_len < left ? s->iov[i].iov_len : left;
        fwrite(s->iov[i].iov_base, 1, k, stdout);
        left -= k;
    }
    return n;
}

static int cmd_stream(const struct rw_pair *p, unsigned seed)
{
    size_t len, sends = 0, partial = 0;
    char *all = read_all(&len), *msg = all, *end = all + len;
    struct rw_tail tail = { 0 };

    while (msg < end) {
        char *stop = memchr(msg, 0, (size_t)(end - msg));
        size_t mlen = (size_t)((stop ? stop : end) - msg), off = 0;

        while (off < mlen) { /* sipp: send, then its buffered tail from the offset */
            struct rw_send s;
            size_t n;

            if (rw_plan(p, &tail, msg + off, mlen - off, &s) != 0)
                return 3;
            n = kernel_take(&s, msg + off, mlen - off, &seed);
            rw_done(&tail, &s, n);
            sends++;
            partial += n < mlen - off;
            off += n;
        }
        msg += mlen + (stop != NULL);
    }
    rw_tail_free(&tail);
    fprintf(stderr, "sends=%zu partial=%zu\n", sends, partial);
    free(all);
    return 0;
}

int main(int argc, char **argv)
{
    struct rw_pair p;

    if (argc < 4)
        return 1;
    if (rw_pair_set(&p, argv[2], argv[3]) != 0) {
        printf("pair=refused\n");
        return 0;
    }
    if (!strcmp(argv[1], "apply"))
        return cmd_apply(&p);
    if (!strcmp(argv[1], "stream") && argc >= 5)
        return cmd_stream(&p, (unsigned)strtoul(argv[4], NULL, 10));
    return 1;
}
