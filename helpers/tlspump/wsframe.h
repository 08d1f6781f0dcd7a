/* SIP over WebSocket for the keeper's pump (tlspump.c): fdkeeper/websocket.py's WsDecoder and
 * frame encoder in C (tests/parity/test_wsframe_parity.py holds the two side by side). */
#ifndef FDKEEPER_WSFRAME_H
#define FDKEEPER_WSFRAME_H

#include "sipframe.h"

#include <stddef.h>
#include <stdint.h>

#define WS_OP_CONTINUATION 0
#define WS_OP_TEXT 1
#define WS_OP_BINARY 2
#define WS_OP_CLOSE 8
#define WS_OP_PING 9
#define WS_OP_PONG 10
#define WS_MAX_CONTROL 125
#define WS_MAX_HEADER 14    /* 2 + 8 (64-bit length) + 4 (mask) */
#define WS_HEADER_ROOM 4096 /* websocket.py HEADER_ROOM: frame headers held for one fragmented message */
#define WS_PROTOCOL_ERROR 1002
#define WS_MESSAGE_TOO_BIG 1009
#define WS_NO_CODE (-1) /* ws_encode_close: an empty close frame */
#define WS_CLOSED_SIZE 640                /* the closed text: a 123-byte reason escaped, and its code */

/* The SuT -> keeper direction. It works in place on the caller's buffer of raw bytes (the pump
 * reads the wire into it): what stays there is exactly WsDecoder.discard(), the data frames of
 * the unfinished message as received plus a trailing partial frame, so a hand-over passes that
 * buffer as it is, and a decoder reset to zero re-derives its state from it at the next call. */
struct ws_decoder {
    size_t framed;         /* raw[0, framed): the whole data frames of the message begun */
    size_t message_length; /* their payload bytes */
    int begun;             /* a message has begun whose final frame has not come */
    uint64_t keepalives;   /* pongs and empty (or blank) messages received */
    uint64_t pings;
    struct buffer replies; /* frames to send back, in order: pongs, the close reply */
    struct buffer message; /* scratch: a fragmented message reassembled */
    char closed[WS_CLOSED_SIZE]; /* "" until the server's Close, then its code and reason */
};

/* Decode raw: each whole message goes to deliver(context, ...). Returns 0, or the close code
 * (1002 protocol error, 1009 message too big) with error set when raw is not a WebSocket stream
 * a client takes (every whole message before the bad part was delivered first). */
int ws_decode(struct ws_decoder *decoder, struct buffer *raw, sip_deliver deliver, void *context, char *error,
              size_t error_size);
/* Forget the state (the raw buffer is the caller's): the next ws_decode starts from raw's start. */
void ws_reset(struct ws_decoder *decoder);
void ws_free(struct ws_decoder *decoder);

/* The keeper -> SuT direction: one frame, FIN set, masked (RFC 6455 client rule) with mask,
 * or with a fresh random one when mask is NULL; appended to out. 0, or -1 out of memory. */
int ws_encode(struct buffer *out, int opcode, const char *payload, size_t length, const unsigned char *mask);
/* One SIP message as one frame: text when it is valid UTF-8, else binary (websocket.py). */
int ws_encode_message(struct buffer *out, const char *message, size_t length);
/* A close frame with code (and no reason); WS_NO_CODE: an empty close frame. */
int ws_encode_close(struct buffer *out, int code, const unsigned char *mask);
int ws_valid_utf8(const unsigned char *data, size_t length);

#endif
