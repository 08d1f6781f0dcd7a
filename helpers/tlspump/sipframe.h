/* Buffers and SIP framing for the keeper's TLS pump (tlspump.c): framing.py's rules in C. */
#ifndef FDKEEPER_SIPFRAME_H
#define FDKEEPER_SIPFRAME_H

#include <stddef.h>
#include <stdint.h>

#define MAX_MESSAGE 65536 /* framing.py MAX_MESSAGE: sipp's own limit */

struct buffer {
    char *data;
    size_t length, capacity;
};

int buffer_reserve(struct buffer *buffer, size_t more);
int buffer_append(struct buffer *buffer, const char *data, size_t length);
void buffer_consume(struct buffer *buffer, size_t length);
void buffer_free(struct buffer *buffer);

typedef void (*sip_deliver)(void *context, const char *message, size_t length);
int sip_frame(struct buffer *framer, uint64_t *keepalives, sip_deliver deliver, void *context, char *error,
              size_t error_size);

#endif
