/* SIP over WebSocket frames for the keeper's pump, as fdkeeper/websocket.py has them: the
 * decoder of what the SuT (the server) sends, byte for byte WsDecoder (the same messages,
 * replies, closed text, errors and held bytes), and the masked frames a client sends.
 *
 * Masking keys come from getrandom() in batches (a pool per thread), not a syscall per frame. */
#define _GNU_SOURCE
#include "wsframe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

/* ------------------------------------------------------------------ masking keys */

#define MASK_POOL 512

static __thread unsigned char mask_pool[MASK_POOL];
static __thread size_t mask_pool_left;
static __thread uint64_t fallback_state;

/* splitmix64: only where getrandom() cannot give bytes without blocking (very early boot). */
static uint64_t fallback_next(void) {
    if (!fallback_state) {
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        fallback_state = ((uint64_t)now.tv_sec << 32) ^ (uint64_t)now.tv_nsec ^ (uintptr_t)&now;
    }
    uint64_t z = (fallback_state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static void refill_mask_pool(void) {
    ssize_t got = getrandom(mask_pool, sizeof(mask_pool), GRND_NONBLOCK);
    for (size_t at = got > 0 ? (size_t)got : 0; at < sizeof(mask_pool); at += sizeof(uint64_t)) {
        uint64_t word = fallback_next();
        size_t take = sizeof(mask_pool) - at < sizeof(word) ? sizeof(mask_pool) - at : sizeof(word);
        memcpy(mask_pool + at, &word, take);
    }
    mask_pool_left = sizeof(mask_pool);
}

static void random_mask(unsigned char mask[4]) {
    if (mask_pool_left < 4)
        refill_mask_pool();
    memcpy(mask, mask_pool + sizeof(mask_pool) - mask_pool_left, 4);
    mask_pool_left -= 4;
}

/* ------------------------------------------------------------------ encoding */

/* to[i] = from[i] ^ mask[i % 4], eight bytes at a time. */
static void copy_masked(unsigned char *to, const unsigned char *from, size_t length, const unsigned char mask[4]) {
    uint32_t mask32;
    memcpy(&mask32, mask, 4);
    uint64_t mask64 = ((uint64_t)mask32 << 32) | mask32;
    size_t at = 0;
    for (; at + 8 <= length; at += 8) {
        uint64_t word;
        memcpy(&word, from + at, 8);
        word ^= mask64;
        memcpy(to + at, &word, 8);
    }
    for (; at < length; at++)
        to[at] = from[at] ^ mask[at % 4];
}

int ws_encode(struct buffer *out, int opcode, const char *payload, size_t length, const unsigned char *mask) {
    if (buffer_reserve(out, WS_MAX_HEADER + length))
        return -1;
    unsigned char *at = (unsigned char *)out->data + out->length;
    *at++ = (unsigned char)(0x80 | opcode);
    if (length < 126) {
        *at++ = (unsigned char)(0x80 | length);
    } else if (length < 65536) {
        *at++ = 0x80 | 126;
        *at++ = (unsigned char)(length >> 8);
        *at++ = (unsigned char)length;
    } else {
        *at++ = 0x80 | 127;
        for (int shift = 56; shift >= 0; shift -= 8)
            *at++ = (unsigned char)((uint64_t)length >> shift);
    }
    unsigned char key[4];
    if (mask)
        memcpy(key, mask, 4);
    else
        random_mask(key);
    memcpy(at, key, 4);
    at += 4;
    copy_masked(at, (const unsigned char *)payload, length, key);
    out->length = (size_t)((char *)at + length - out->data);
    return 0;
}

/* ------------------------------------------------------------------ UTF-8 (Python's codec) */

/* The code point at data (length > 0) and its size in *size; -1 where it is not valid UTF-8,
 * *size then the maximal subpart Python's "replace" turns into one U+FFFD. */
static long utf8_next(const unsigned char *data, size_t length, size_t *size) {
    unsigned char lead = data[0];
    *size = 1;
    if (lead < 0x80)
        return lead;
    size_t need;
    unsigned char low = 0x80, high = 0xBF;
    long point;
    if (lead >= 0xC2 && lead <= 0xDF) {
        need = 1, point = lead & 0x1F;
    } else if (lead >= 0xE0 && lead <= 0xEF) {
        need = 2, point = lead & 0x0F;
        low = lead == 0xE0 ? 0xA0 : 0x80;
        high = lead == 0xED ? 0x9F : 0xBF;
    } else if (lead >= 0xF0 && lead <= 0xF4) {
        need = 3, point = lead & 0x07;
        low = lead == 0xF0 ? 0x90 : 0x80;
        high = lead == 0xF4 ? 0x8F : 0xBF;
    } else {
        return -1;
    }
    for (size_t i = 1; i <= need; i++) {
        if (i >= length || data[i] < low || data[i] > high) {
            *size = i;
            return -1;
        }
        point = (point << 6) | (data[i] & 0x3F);
        low = 0x80, high = 0xBF;
    }
    *size = need + 1;
    return point;
}

int ws_valid_utf8(const unsigned char *data, size_t length) {
    size_t size, at = 0;
    for (uint64_t word; at + 8 <= length; at += 8) { /* SIP is ASCII: eight bytes at a time */
        memcpy(&word, data + at, 8);
        if (word & 0x8080808080808080ULL)
            break;
    }
    for (; at < length; at += size) {
        if (data[at] < 0x80) {
            size = 1;
            continue;
        }
        if (utf8_next(data + at, length - at, &size) < 0)
            return 0;
    }
    return 1;
}

int ws_encode_message(struct buffer *out, const char *message, size_t length) {
    int opcode = ws_valid_utf8((const unsigned char *)message, length) ? WS_OP_TEXT : WS_OP_BINARY;
    return ws_encode(out, opcode, message, length, NULL);
}

int ws_encode_close(struct buffer *out, int code, const unsigned char *mask) {
    unsigned value = code == WS_NO_CODE ? 0 : (unsigned)code;
    char payload[2] = {(char)(value >> 8), (char)value};
    return ws_encode(out, WS_OP_CLOSE, payload, code == WS_NO_CODE ? 0 : 2, mask);
}

/* Append the peer's text as fdkeeper/textsafe.py escape_controls shows it (decoded with
 * "replace"), cut to what fits. */
static void append_safe_text(char *out, size_t out_size, const unsigned char *text, size_t length) {
    size_t used = strlen(out), size;
    for (size_t at = 0; at < length; at += size) {
        long point = utf8_next(text + at, length - at, &size);
        char piece[8];
        if (point == '\n' || point == '\r' || point == '\t')
            snprintf(piece, sizeof(piece), "\\%c", point == '\n' ? 'n' : point == '\r' ? 'r' : 't');
        else if ((point >= 0 && point < 0x20) || (point >= 0x7F && point <= 0x9F))
            snprintf(piece, sizeof(piece), "\\x%02lx", point);
        else if (point == 0x2028 || point == 0x2029)
            snprintf(piece, sizeof(piece), "\\u%04lx", point);
        else if (point < 0)
            memcpy(piece, "\xEF\xBF\xBD", 4); /* U+FFFD */
        else
            memcpy(piece, text + at, size), piece[size] = 0;
        size_t piece_length = strlen(piece);
        if (used + piece_length >= out_size)
            return;
        memcpy(out + used, piece, piece_length + 1);
        used += piece_length;
    }
}

/* ------------------------------------------------------------------ decoding */

#define WS_SCRATCH_KEPT 8192

struct frame {
    int fin, opcode;
    size_t header, length;
};

/* The error's text as str(WsProtocolError) has it; returns the close code. */
static int fail(char *error, size_t error_size, int code, const char *reason) {
    snprintf(error, error_size, "the WebSocket server broke the protocol (%d): %s", code, reason);
    return code;
}

/* RFC 6455's rules for a server's frame that its first two bytes allow checking, in
 * websocket.py's order: 0, or the close code of the first defect (error set). */
static int check_start(const struct ws_decoder *decoder, const unsigned char *data, char *error, size_t error_size) {
    int opcode = data[0] & 0x0F;
    if (data[1] & 0x80)
        return fail(error, error_size, WS_PROTOCOL_ERROR, "a masked frame from the server");
    if (data[0] & 0x70)
        return fail(error, error_size, WS_PROTOCOL_ERROR, "reserved bits set in a frame");
    if ((opcode > WS_OP_BINARY && opcode < WS_OP_CLOSE) || opcode > WS_OP_PONG) {
        char reason[32];
        snprintf(reason, sizeof(reason), "unknown opcode %d", opcode);
        return fail(error, error_size, WS_PROTOCOL_ERROR, reason);
    }
    if (opcode >= WS_OP_CLOSE && !(data[0] & 0x80))
        return fail(error, error_size, WS_PROTOCOL_ERROR, "a fragmented control frame");
    if (opcode == WS_OP_CONTINUATION && !decoder->begun)
        return fail(error, error_size, WS_PROTOCOL_ERROR, "a continuation frame with no message begun");
    if ((opcode == WS_OP_TEXT || opcode == WS_OP_BINARY) && decoder->begun)
        return fail(error, error_size, WS_PROTOCOL_ERROR, "a data frame inside a fragmented message");
    return 0;
}

/* The rules the announced length allows checking, before any of the payload is kept. */
static int check_size(const struct ws_decoder *decoder, const struct frame *frame, uint64_t length, char *error,
                      size_t error_size) {
    char reason[96];
    if (length >> 63)
        return fail(error, error_size, WS_PROTOCOL_ERROR, "a frame length with the top bit set");
    if (frame->opcode >= WS_OP_CLOSE) {
        if (length <= WS_MAX_CONTROL)
            return 0;
        snprintf(reason, sizeof(reason), "a control frame of %llu bytes (at most %d)", (unsigned long long)length,
                 WS_MAX_CONTROL);
        return fail(error, error_size, WS_PROTOCOL_ERROR, reason);
    }
    if (length > (uint64_t)MAX_MESSAGE - decoder->message_length) {
        snprintf(reason, sizeof(reason), "a message of %llu bytes (at most %d)",
                 (unsigned long long)(decoder->message_length + length), MAX_MESSAGE);
        return fail(error, error_size, WS_MESSAGE_TOO_BIG, reason);
    }
    if (decoder->framed - decoder->message_length + frame->header > WS_HEADER_ROOM) {
        snprintf(reason, sizeof(reason), "a message in too many fragments (over %d bytes of frame headers)",
                 WS_HEADER_ROOM);
        return fail(error, error_size, WS_MESSAGE_TOO_BIG, reason);
    }
    return 0;
}

/* The frame header at data: 1 parsed, 0 incomplete, or the close code of a defect (error set). */
static int parse_header(const struct ws_decoder *decoder, const unsigned char *data, size_t available,
                        struct frame *frame, char *error, size_t error_size) {
    if (available < 2)
        return 0;
    int defect = check_start(decoder, data, error, error_size);
    if (defect)
        return defect;
    frame->fin = (data[0] & 0x80) != 0;
    frame->opcode = data[0] & 0x0F;
    size_t short_length = data[1] & 0x7F;
    frame->header = 2 + (short_length == 126 ? 2 : short_length == 127 ? 8 : 0);
    if (available < frame->header)
        return 0;
    uint64_t length = short_length;
    if (short_length >= 126) {
        length = 0;
        for (size_t i = 2; i < frame->header; i++)
            length = (length << 8) | data[i];
    }
    defect = check_size(decoder, frame, length, error, error_size);
    frame->length = defect ? 0 : (size_t)length;
    return defect ? defect : 1;
}

/* A Close payload for people, as websocket.py close_text: "1000 (normal closure)", "4000
 * (application code): <reason>". */
static void close_text(char *out, size_t out_size, const unsigned char *payload, size_t length) {
    static const struct {
        int code;
        const char *name;
    } names[] = {
        {1000, "normal closure"},   {1001, "going away"},          {1002, "protocol error"},
        {1003, "unsupported data"}, {1005, "no status code"},      {1007, "invalid payload"},
        {1008, "policy violation"}, {1009, "message too big"},     {1010, "extension required"},
        {1011, "internal error"},   {1012, "service restart"},     {1013, "try again later"},
        {1014, "bad gateway"},
    };
    if (length < 2) {
        snprintf(out, out_size, "1005 (no status code)");
        return;
    }
    int code = (payload[0] << 8) | payload[1];
    const char *name = code >= 3000 && code <= 4999 ? "application code" : "unknown code";
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (names[i].code == code)
            name = names[i].name;
    snprintf(out, out_size, length > 2 ? "%d (%s): " : "%d (%s)", code, name);
    append_safe_text(out, out_size, payload + 2, length - 2);
}

/* A control frame: a ping's pong, a pong counted, the server's Close taken (its text, and the
 * reply echoing its code). 0, or the close code of a defect. */
static int on_control(struct ws_decoder *decoder, int opcode, const unsigned char *payload, size_t length,
                      char *error, size_t error_size) {
    if (opcode == WS_OP_PING) {
        decoder->pings++;
        ws_encode(&decoder->replies, WS_OP_PONG, (const char *)payload, length, NULL);
    } else if (opcode == WS_OP_PONG) {
        decoder->keepalives++;
    } else if (length == 1) {
        return fail(error, error_size, WS_PROTOCOL_ERROR, "a close frame of 1 byte (a status code takes 2)");
    } else {
        close_text(decoder->closed, sizeof(decoder->closed), payload, length);
        ws_encode_close(&decoder->replies, length ? (payload[0] << 8) | payload[1] : WS_NO_CODE, NULL);
    }
    return 0;
}

static int is_blank(const char *message, size_t length) {
    for (size_t i = 0; i < length; i++)
        if (!strchr(" \t\n\r\v\f", message[i]) || !message[i])
            return 0;
    return 1;
}

static void finish_message(struct ws_decoder *decoder, const char *message, size_t length, sip_deliver deliver,
                           void *context) {
    if (is_blank(message, length))
        decoder->keepalives++;
    else
        deliver(context, message, length);
}

/* The payloads of the whole data frames in raw[start, end), joined, delivered. */
static void finish_fragmented(struct ws_decoder *decoder, const struct buffer *raw, size_t start, size_t end,
                              sip_deliver deliver, void *context) {
    decoder->message.length = 0;
    if (buffer_reserve(&decoder->message, decoder->message_length))
        return;
    struct frame frame;
    char unused[8];
    struct ws_decoder continuing = {.begun = 0};
    for (size_t at = start; at < end; at += frame.header + frame.length) {
        parse_header(&continuing, (const unsigned char *)raw->data + at, end - at, &frame, unused, sizeof(unused));
        continuing.begun = 1;
        buffer_append(&decoder->message, raw->data + at + frame.header, frame.length);
    }
    finish_message(decoder, decoder->message.data, decoder->message.length, deliver, context);
    if (decoder->message.capacity > WS_SCRATCH_KEPT)
        buffer_free(&decoder->message); /* an idle link keeps no 64 KiB for a rare big message */
}

int ws_decode(struct ws_decoder *decoder, struct buffer *raw, sip_deliver deliver, void *context, char *error,
              size_t error_size) {
    if (decoder->closed[0]) {
        raw->length = decoder->framed; /* after the Close everything fed is ignored */
        return 0;
    }
    size_t base = 0, at = decoder->framed; /* raw[base, at): the held frames of the message begun */
    int result = 0;
    struct frame frame;
    for (;;) {
        decoder->framed = at - base;
        result = parse_header(decoder, (const unsigned char *)raw->data + at, raw->length - at, &frame, error,
                              error_size);
        if (result != 1 || raw->length - at - frame.header < frame.length) {
            result = result == 1 ? 0 : result;
            break;
        }
        const unsigned char *payload = (const unsigned char *)raw->data + at + frame.header;
        size_t end = at + frame.header + frame.length;
        if (frame.opcode >= WS_OP_CLOSE) {
            result = on_control(decoder, frame.opcode, payload, frame.length, error, error_size);
            if (result)
                break;
            if (decoder->begun) { /* not part of the message held: out of the raw bytes */
                memmove(raw->data + at, raw->data + end, raw->length - end);
                raw->length -= end - at;
            } else {
                at = base = end;
            }
            if (decoder->closed[0]) {
                decoder->framed = at - base;
                raw->length = at;
                break;
            }
            continue;
        }
        if (frame.fin && !decoder->begun) {
            finish_message(decoder, (const char *)payload, frame.length, deliver, context);
            at = base = end;
            continue;
        }
        decoder->begun = 1;
        decoder->message_length += frame.length;
        at = end;
        if (frame.fin) {
            finish_fragmented(decoder, raw, base, end, deliver, context);
            decoder->begun = 0;
            decoder->message_length = 0;
            base = end;
        }
    }
    buffer_consume(raw, base);
    return result;
}

void ws_reset(struct ws_decoder *decoder) {
    decoder->framed = decoder->message_length = 0;
    decoder->begun = 0;
    decoder->keepalives = decoder->pings = 0;
    decoder->replies.length = 0;
    decoder->closed[0] = 0;
}

void ws_free(struct ws_decoder *decoder) {
    buffer_free(&decoder->replies);
    buffer_free(&decoder->message);
    ws_reset(decoder);
}
