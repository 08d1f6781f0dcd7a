/* Buffers and SIP framing for the keeper's TLS pump, byte for byte as fdkeeper/sip/framing.py:
 * CRLF keep-alives between messages are counted and dropped, a message ends at CRLFCRLF plus
 * its Content-Length (or compact "l:", the first one), and none may exceed MAX_MESSAGE. */
#define _GNU_SOURCE
#include "sipframe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

int buffer_reserve(struct buffer *buffer, size_t more) {
    size_t wanted = buffer->length + more;
    if (wanted <= buffer->capacity)
        return 0;
    size_t capacity = buffer->capacity ? buffer->capacity : 4096;
    while (capacity < wanted)
        capacity *= 2;
    char *data = realloc(buffer->data, capacity);
    if (!data)
        return -1;
    buffer->data = data;
    buffer->capacity = capacity;
    return 0;
}

int buffer_append(struct buffer *buffer, const char *data, size_t length) {
    if (length == 0)
        return 0;
    if (buffer_reserve(buffer, length))
        return -1;
    memcpy(buffer->data + buffer->length, data, length);
    buffer->length += length;
    return 0;
}

void buffer_consume(struct buffer *buffer, size_t length) {
    memmove(buffer->data, buffer->data + length, buffer->length - length);
    buffer->length -= length;
}

void buffer_free(struct buffer *buffer) {
    free(buffer->data);
    memset(buffer, 0, sizeof(*buffer));
}

/* ------------------------------------------------------------------ SIP framing (framing.py) */

static int is_blank(char c) { return c == ' ' || c == '\t'; }

/* A Content-Length line starting at line (framing.py's regex): its value, or -1. */
static long content_length_at(const char *line, const char *limit) {
    static const char long_name[] = "content-length";
    const char *at = line;
    if ((size_t)(limit - at) >= sizeof(long_name) - 1 && strncasecmp(at, long_name, sizeof(long_name) - 1) == 0)
        at += sizeof(long_name) - 1;
    else if (at < limit && (*at == 'l' || *at == 'L'))
        at += 1;
    else
        return -1;
    while (at < limit && is_blank(*at))
        at++;
    if (at >= limit || *at != ':')
        return -1;
    at++;
    while (at < limit && is_blank(*at))
        at++;
    if (at >= limit || *at < '0' || *at > '9')
        return -1;
    long value = 0;
    for (; at < limit && *at >= '0' && *at <= '9'; at++)
        value = value > 100000000 ? value : value * 10 + (*at - '0'); /* capped: over MAX anyway */
    while (at < limit && is_blank(*at))
        at++;
    if (at < limit && *at == '\r')
        at++;
    return at == limit || *at == '\n' ? value : -1;
}

/* The body length of the message whose headers are [start, limit): the first Content-Length. */
static long body_length(const char *start, const char *limit) {
    long value = content_length_at(start, limit);
    for (const char *at = start; value < 0 && at < limit; at++)
        if (*at == '\n' && at + 1 < limit)
            value = content_length_at(at + 1, limit);
    return value < 0 ? 0 : value; /* sipp: no Content-Length, no body */
}

/* Where the message at data[at] ends: > at, 0 when incomplete, -1 with error set when unframeable. */
static long message_end(const char *data, size_t length, size_t at, char *error, size_t error_size) {
    const char *headers_end = memmem(data + at, length - at, "\r\n\r\n", 4);
    if (!headers_end) {
        if (length - at > MAX_MESSAGE) {
            snprintf(error, error_size, "no end of SIP headers within %d bytes", MAX_MESSAGE);
            return -1;
        }
        return 0;
    }
    size_t end = (size_t)(headers_end - data);
    long total = (long)(end - at) + 4 + body_length(data + at, data + end + 2);
    if (total > MAX_MESSAGE) {
        snprintf(error, error_size, "SIP message of %ld bytes is over %d", total, MAX_MESSAGE);
        return -1;
    }
    return length - at < (size_t)total ? 0 : (long)(at + total);
}

/* Cut whole messages off the front of framer and hand each to deliver(context, ...); CRLFs
 * between messages are counted in *keepalives. Returns 0, or -1 when the rest is unframeable
 * (framer then holds only that rest; every whole message went first). */
int sip_frame(struct buffer *framer, uint64_t *keepalives, sip_deliver deliver, void *context, char *error,
              size_t error_size) {
    size_t at = 0;
    int result = 0;
    for (;;) {
        while (framer->length - at >= 2 && framer->data[at] == '\r' && framer->data[at + 1] == '\n') {
            ++*keepalives;
            at += 2;
        }
        long end = message_end(framer->data, framer->length, at, error, error_size);
        if (end < 0)
            result = -1;
        if (end <= 0)
            break;
        deliver(context, framer->data + at, (size_t)end - at);
        at = (size_t)end;
    }
    buffer_consume(framer, at);
    return result;
}
