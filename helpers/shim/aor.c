/* The address of record (AoR) of a SIP message: the URI of its From header.
 *
 * Used by the per-call mode (FDKEEPER_PER_CALL=1) at the first send on a
 * socket, to ask the keeper for that user's own connection. */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "shim.h"

static int is_ws(char c) { return c == ' ' || c == '\t'; }

/* Whitespace around a header name: as Python's bytes.strip(), so that the ptrace mode's twin
 * (from_aor in fdkeeper/modes/ptrace/) finds the same header (tests/parity/). */
static int is_space(char c) { return is_ws(c) || c == '\r' || c == '\n' || c == '\v' || c == '\f'; }

/* Is [name, name+n) the header name From or its compact form f? */
static int is_from(const char *name, size_t n)
{
    while (n && is_space(name[n - 1]))
        n--;
    while (n && is_space(*name)) {
        name++;
        n--;
    }
    return (n == 4 && strncasecmp(name, "from", 4) == 0) || (n == 1 && (name[0] | 0x20) == 'f');
}

/* Where the header part of msg ends: at its first CRLFCRLF, or LFLF if one comes first (the
 * body may hold a From line too). */
static const char *header_end(const char *msg, size_t len)
{
    const char *crlf = memmem(msg, len, "\r\n\r\n", 4), *lf = memmem(msg, len, "\n\n", 2);

    if (!crlf)
        return lf ? lf : msg + len;
    return lf && lf < crlf ? lf : crlf;
}

/* The URI of a From header value [v, end): inside <...> when there is one
 * (outside quoted strings), else the value up to ';'. *uri and *ulen set;
 * 0 or -1. */
static int from_uri(const char *v, const char *end, const char **uri, size_t *ulen)
{
    const char *p, *e;
    int quoted = 0;

    while (v < end && is_ws(*v))
        v++;
    for (p = v; p < end; p++) {
        if (quoted && *p == '\\' && p + 1 < end) {
            p++;
        } else if (*p == '"') {
            quoted = !quoted;
        } else if (!quoted && *p == '<') {
            const char *gt = memchr(p + 1, '>', (size_t)(end - p - 1));
            if (!gt)
                return -1;
            v = p + 1;
            end = gt;
            break;
        }
    }
    if (p == end) { /* addr-spec form: header parameters follow ';' */
        const char *semi = memchr(v, ';', (size_t)(end - v));
        if (semi)
            end = semi;
    }
    while (v < end && is_ws(*v))
        v++;
    /* URI parameters and headers: after the host part (a user part may hold ';'). */
    p = memchr(v, '@', (size_t)(end - v));
    for (e = p ? p : v; e < end && *e != ';' && *e != '?'; e++)
        ;
    while (e > v && is_ws(e[-1]))
        e--;
    if (e == v)
        return -1;
    *uri = v;
    *ulen = (size_t)(e - v);
    return 0;
}

int shim_from_aor(const char *msg, size_t len, char *out, size_t outlen)
{
    const char *end = header_end(msg, len), *line, *uri = NULL;
    size_t ulen = 0, o = 0;

    /* Skip the start line; then one header per line (folded lines skipped). */
    line = memchr(msg, '\n', (size_t)(end - msg));
    while (line && ++line < end) {
        const char *eol = memchr(line, '\n', (size_t)(end - line));
        const char *lend = eol ? eol : end, *colon;
        while (lend > line && lend[-1] == '\r')
            lend--;
        if (lend > line && !is_ws(*line) && (colon = memchr(line, ':', (size_t)(lend - line))) &&
            is_from(line, (size_t)(colon - line))) {
            if (from_uri(colon + 1, lend, &uri, &ulen) != 0)
                return 0;
            break;
        }
        line = eol;
    }
    if (!uri)
        return 0;
    for (size_t i = 0; i < ulen; i++) {
        unsigned char c = (unsigned char)uri[i];
        if (c > 0x20 && c < 0x7f && c != '%') {
            if (o + 1 >= outlen)
                return -1;
            out[o++] = (char)c;
        } else {
            if (o + 3 >= outlen)
                return -1;
            snprintf(out + o, 4, "%%%02X", c);
            o += 3;
        }
    }
    if (o >= outlen)
        return -1;
    out[o] = 0;
    return (int)o;
}
