/* The keeper's TLS pump: while a sipp run holds a TLS link, one C thread moves whole SIP
 * messages between the keeper's TLS connection (the SSL* of Python's ssl.SSLSocket) and the
 * unix socketpair end the run was leased, so the keeper's Python loop is off the data path.
 *
 * A link's wire is an SSL* (tls, wss) or a plain TCP descriptor (ws: SSL NULL, the pump reads
 * and writes the socket itself); its codec towards the SuT is the SIP stream (tls) or WebSocket
 * (ws, wss: wsframe.c decodes what the SuT sends into whole messages, answers its pings, and
 * sends each SIP message from sipp as one masked frame).
 *
 * Loaded with ctypes by fdkeeper/keeper/tlspump.py; never imported as a Python module and
 * never calls into Python. One thread and one epoll serve every attached link. A link is
 * attached with the state Python's relay had (buffers, partial messages, the lengths of
 * messages written towards sipp) and released with the state the pump leaves: Python never
 * touches the SSL object while the pump owns it (the mutex below orders the two).
 *
 * No SSL write in progress ever changes hands. OpenSSL requires a write that returned
 * WANT_WRITE to be retried with at least the bytes it had taken, and only its caller knows
 * how many those were. Python attaches a link only when no write of its own is pending
 * (tlslink.py), and at release the pump keeps the SSL object while a write of its own is
 * pending ("finishing"): the pair side and every buffer but to_sut go back at once, the SSL
 * object and the rest of to_sut once that one write has completed or failed, announced on
 * an eventfd the keeper's loop watches (tlspump_wakeup_fd).
 *
 * The framing is fdkeeper/sip/framing.py's, byte for byte (sipframe.c). Built by
 * helpers/shimbuild.py (compile_tlspump).
 */
#define _GNU_SOURCE
#include "sipframe.h"
#include "wsframe.h"

#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

/* The few OpenSSL 3 calls used, declared here (their ABI is stable across 3.x) so the build
 * needs no libssl-dev: the library links to libssl.so.3 by name (shimbuild.py), the one
 * CPython's _ssl module has loaded already. */
typedef struct ssl_st SSL;
int SSL_read(SSL *ssl, void *buffer, int length);
int SSL_write(SSL *ssl, const void *buffer, int length);
int SSL_get_error(const SSL *ssl, int result);
int SSL_get_fd(const SSL *ssl);
int SSL_is_init_finished(const SSL *ssl);
int SSL_version(const SSL *ssl);
int SSL_has_pending(const SSL *ssl);
long SSL_ctrl(SSL *ssl, int command, long larg, void *parg);
int SSL_free_buffers(SSL *ssl);
unsigned long ERR_peek_error(void);
void ERR_clear_error(void);
const char *ERR_reason_error_string(unsigned long error);
#define SSL_ERROR_SSL 1
#define SSL_ERROR_WANT_READ 2
#define SSL_ERROR_WANT_WRITE 3
#define SSL_ERROR_SYSCALL 5
#define SSL_ERROR_ZERO_RETURN 6
#define SSL_CTRL_GET_READ_AHEAD 40
#define SSL_CTRL_SET_READ_AHEAD 41
#define SSL_CTRL_MODE 33
#define SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER 0x2L
#define TLS1_VERSION 0x0301
#define TLS1_3_VERSION 0x0304
#define SSL_R_UNEXPECTED_EOF_WHILE_READING 294
#define ERR_SYSTEM_FLAG 0x80000000UL /* OpenSSL 3 err.h: a system error, errno in the low bits */
#define ERR_REASON_MASK 0x7FFFFFUL
#define LIBRARY_REASON(error) (((error) & ERR_SYSTEM_FLAG) ? 0 : (int)((error) & ERR_REASON_MASK))

#define BUFFER_LIMIT (256 * 1024) /* tlslink.py BUFFER_LIMIT: back-pressure bound per direction */
#define READ_CHUNK (64 * 1024)
#define LENGTHS_PRUNE 1024     /* ask the kernel what sipp read once this many lengths are kept */
#define MAX_EVENTS 64
#define BUSY_WAIT_NS 1000000L /* epoll_wait found events within 1 ms: traffic is dense */
#define GATHER_NS 2000000L    /* then wait 2 ms for the rest of the burst (gather_events) */

/* How the SuT's side ended, for Python to report as its relay would (tlslink.py). */
enum end_kind { END_NONE = 0, END_CLOSE_NOTIFY = 1, END_EOF = 2, END_FAILED = 3, END_UNFRAMEABLE = 4, END_WS_CLOSE = 5 };

/* Counters and the end, read by Python through ctypes (tlspump.py PumpState mirrors it). */
struct pump_state {
    uint64_t messages_to_sut, messages_to_sipp, keepalives, dropped_bytes, unframeable_from_sipp;
    int64_t last_activity_ns; /* CLOCK_MONOTONIC, as Python's time.monotonic() */
    int32_t end_kind;
    char end_reason[WS_CLOSED_SIZE]; /* room for a WebSocket close's escaped reason */
    uint64_t pings; /* WebSocket pings answered */
};

struct link {
    struct pump_state state; /* first: Python reads it at the link's address */
    SSL *ssl;     /* NULL: a plain TCP wire */
    int websocket; /* the codec towards the SuT: WebSocket frames, else the SIP stream */
    struct ws_decoder ws;
    int wire_fd, pair_fd, sipp_fd;
    int attached;
    uint32_t watched_wire, watched_pair;
    long read_ahead; /* Python's setting, restored at detach */
    int write_pending; /* an SSL_write to retry with at least this length */
    int write_wants_read;
    int read_wants_write;
    int finishing; /* released with write_pending: the pump completes that write, then lets go */
    int finished;  /* done: Python takes the SSL object and the rest of to_sut back */
    char finish_failure[128]; /* why that write failed, if it did */
    struct buffer to_sut, to_sipp, from_sut, from_sipp;
    uint32_t *lengths; /* of the messages in to_sipp and in the pair not yet read whole by sipp */
    size_t lengths_count, lengths_capacity;
    struct link *next_dead;
};

static pthread_mutex_t pump_lock = PTHREAD_MUTEX_INITIALIZER;
static int pump_epoll = -1;
static int pump_wakeup = -1; /* eventfd: a finishing link has finished (the keeper's loop watches it) */
static int pump_running;
static struct link *dead_links; /* freed by the pump thread between two epoll_waits */

static int64_t now_ns(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
}

/* ------------------------------------------------------------------ towards sipp */

static void remember_length(struct link *link, uint32_t length) {
    if (link->lengths_count == link->lengths_capacity) {
        size_t capacity = link->lengths_capacity ? link->lengths_capacity * 2 : 256;
        uint32_t *lengths = realloc(link->lengths, capacity * sizeof(*lengths));
        if (!lengths)
            return; /* the bookkeeping only realigns a later run; the message itself still goes */
        link->lengths = lengths;
        link->lengths_capacity = capacity;
    }
    link->lengths[link->lengths_count++] = length;
}

/* Forget the lengths of messages sipp has read whole (tlslink.py _forget_consumed). */
static void forget_consumed(struct link *link) {
    int queued = 0;
    if (ioctl(link->sipp_fd, FIONREAD, &queued) < 0)
        return;
    uint64_t in_pair = 0;
    for (size_t i = 0; i < link->lengths_count; i++)
        in_pair += link->lengths[i];
    in_pair -= link->to_sipp.length;
    uint64_t consumed = in_pair - (uint64_t)queued;
    size_t forgotten = 0;
    while (forgotten < link->lengths_count && link->lengths[forgotten] <= consumed)
        consumed -= link->lengths[forgotten++];
    memmove(link->lengths, link->lengths + forgotten, (link->lengths_count - forgotten) * sizeof(*link->lengths));
    link->lengths_count -= forgotten;
}

static void deliver_to_sipp(void *context, const char *message, size_t length) {
    struct link *link = context;
    if (link->lengths_count >= LENGTHS_PRUNE)
        forget_consumed(link);
    if (buffer_append(&link->to_sipp, message, length) == 0) {
        remember_length(link, (uint32_t)length);
        link->state.messages_to_sipp++;
    }
}

static void flush_to_sipp(struct link *link) {
    while (link->to_sipp.length) {
        ssize_t sent = send(link->pair_fd, link->to_sipp.data, link->to_sipp.length, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (sent <= 0)
            return; /* full: EPOLLOUT; the pair never fails while the keeper holds both ends */
        buffer_consume(&link->to_sipp, (size_t)sent);
    }
}

/* ------------------------------------------------------------------ the SuT's side */

static void end_link(struct link *link, int kind, const char *reason) {
    if (link->state.end_kind)
        return;
    link->state.end_kind = kind;
    snprintf(link->state.end_reason, sizeof(link->state.end_reason), "%s", reason);
    /* Level-triggered HUP/ERR would wake the pump until Python takes the link back. */
    epoll_ctl(pump_epoll, EPOLL_CTL_DEL, link->wire_fd, NULL);
    /* Wake the keeper's loop: it watches the TLS socket for EPOLLRDHUP, which a local
     * shutdown of the read side raises too. Nothing more is read from the SuT anyway. */
    shutdown(link->wire_fd, SHUT_RD);
}

static void read_failed(struct link *link, int ssl_error, int saved_errno) {
    unsigned long queued = ERR_peek_error();
    if (ssl_error == SSL_ERROR_ZERO_RETURN) {
        end_link(link, END_CLOSE_NOTIFY, "the SuT closed it: TLS close_notify");
    } else if (ssl_error == SSL_ERROR_SYSCALL && !queued && saved_errno == 0) {
        end_link(link, END_EOF, "the SuT closed it: FIN without TLS close_notify");
    } else if (ssl_error == SSL_ERROR_SYSCALL && !queued) {
        char reason[128];
        snprintf(reason, sizeof(reason), "the SuT's TLS connection failed: %s", strerror(saved_errno));
        end_link(link, END_FAILED, reason);
    } else if (LIBRARY_REASON(queued) == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
        end_link(link, END_EOF, "the SuT closed it: FIN without TLS close_notify");
    } else {
        const char *what = queued ? ERR_reason_error_string(queued) : NULL;
        char reason[128];
        snprintf(reason, sizeof(reason), "the SuT's TLS connection failed: %s", what ? what : "TLS error");
        end_link(link, END_FAILED, reason);
    }
    ERR_clear_error();
}

/* Whether the SuT's FIN is next in the socket: then OpenSSL is not asked to read it, as it
 * would take the end of a stream without close_notify for an attack and refuse to write
 * after it, where a half-closed TCP socket still sends (the run's answers go out). */
static int at_fin(struct link *link) {
    char byte;
    return !SSL_has_pending(link->ssl) && recv(link->wire_fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT) == 0;
}

/* The plain wire's end or failure: a FIN is a clean end, anything else as tcp.py reports it. */
static void plain_failed(struct link *link, int saved_errno) {
    if (saved_errno == 0) {
        end_link(link, END_EOF, "the SuT closed it: FIN");
    } else if (saved_errno == ECONNRESET) {
        end_link(link, END_FAILED, "the SuT reset it: ECONNRESET");
    } else {
        char reason[128];
        snprintf(reason, sizeof(reason), "the SuT's TCP connection failed: %s", strerror(saved_errno));
        end_link(link, END_FAILED, reason);
    }
}

/* One read from the wire into from_sut: the bytes read, or 0 (nothing now, or the end: then
 * end_link has said how). */
static int read_wire_once(struct link *link) {
    char *into = link->from_sut.data + link->from_sut.length;
    if (!link->ssl) {
        ssize_t got = recv(link->wire_fd, into, READ_CHUNK, MSG_DONTWAIT);
        if (got == 0 || (got < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
            plain_failed(link, got == 0 ? 0 : errno);
        return got > 0 ? (int)got : 0;
    }
    ERR_clear_error();
    errno = 0;
    int got = SSL_read(link->ssl, into, READ_CHUNK);
    if (got <= 0) {
        int saved_errno = errno, ssl_error = SSL_get_error(link->ssl, got);
        link->read_wants_write = ssl_error == SSL_ERROR_WANT_WRITE;
        if (ssl_error != SSL_ERROR_WANT_READ && ssl_error != SSL_ERROR_WANT_WRITE)
            read_failed(link, ssl_error, saved_errno);
        else
            ERR_clear_error();
        return 0;
    }
    return got;
}

static void flush_to_sut(struct link *link);

/* The SuT's WebSocket frames: whole messages to sipp, pongs and the close reply to the SuT
 * (pongs only while to_sut is under its bound: RFC 6455 lets a pong answer the latest ping
 * alone, and a ping flood from a SuT that does not read must not grow the keeper). A Close or
 * a protocol error ends the link once its close frame has been given to the wire. */
static void decode_websocket(struct link *link) {
    char error[192];
    int code = ws_decode(&link->ws, &link->from_sut, deliver_to_sipp, link, error, sizeof(error));
    link->state.keepalives = link->ws.keepalives;
    link->state.pings = link->ws.pings;
    size_t queued = link->to_sut.length;
    if (link->ws.replies.length && (queued < BUFFER_LIMIT || link->ws.closed[0]))
        buffer_append(&link->to_sut, link->ws.replies.data, link->ws.replies.length);
    link->ws.replies.length = 0;
    if (code)
        ws_encode_close(&link->to_sut, code, NULL);
    if (link->to_sut.length > queued)
        flush_to_sut(link);
    if (code)
        end_link(link, END_UNFRAMEABLE, error); /* websocket.py: whole messages went first */
    else if (link->ws.closed[0])
        end_link(link, END_WS_CLOSE, link->ws.closed);
}

static void decode_sip(struct link *link) {
    char error[96];
    if (sip_frame(&link->from_sut, &link->state.keepalives, deliver_to_sipp, link, error, sizeof(error))) {
        char reason[160];
        snprintf(reason, sizeof(reason), "the SuT sent unframeable data: %s", error);
        end_link(link, END_UNFRAMEABLE, reason); /* framing.py: the rest stays, whole ones went */
    }
}

/* Read what the SuT sent while sipp keeps up (bounded) or, at release, what OpenSSL still
 * holds; peer_closed: the socket has seen the SuT's FIN (EPOLLRDHUP), or may have. */
static void read_wire_records(struct link *link, int bounded, int peer_closed) {
    while (!link->state.end_kind && (link->to_sipp.length < BUFFER_LIMIT || !bounded)) {
        if (link->ssl && peer_closed && at_fin(link)) {
            end_link(link, END_EOF, "the SuT closed it: FIN without TLS close_notify");
            break;
        }
        if (buffer_reserve(&link->from_sut, READ_CHUNK))
            return;
        int got = read_wire_once(link);
        if (got <= 0)
            break;
        link->from_sut.length += (size_t)got;
        link->state.last_activity_ns = now_ns();
        if (link->websocket)
            decode_websocket(link);
        else
            decode_sip(link);
        flush_to_sipp(link); /* before the bound is checked: stop only when the pair is full */
        if (link->ssl ? !SSL_has_pending(link->ssl) : got < READ_CHUNK)
            break; /* the socket's readiness says when there is more: no read just for EAGAIN */
    }
    flush_to_sipp(link);
}

static void read_wire(struct link *link, uint32_t mask) { read_wire_records(link, 1, (mask & EPOLLRDHUP) != 0); }

/* One write of to_sut's front: the bytes sent, or 0 (the wire is full, or it failed). A plain
 * wire has no write to finish: a partial one leaves the rest in to_sut, whoever sends it. */
static int write_wire_once(struct link *link, size_t length) {
    if (!link->ssl) {
        ssize_t sent = send(link->wire_fd, link->to_sut.data, length, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (sent < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            plain_failed(link, errno);
        return sent > 0 ? (int)sent : 0;
    }
    if ((int)length < link->write_pending)
        length = (size_t)link->write_pending; /* OpenSSL: a retried write is never shorter */
    ERR_clear_error();
    errno = 0;
    int sent = SSL_write(link->ssl, link->to_sut.data, (int)length);
    if (sent <= 0) {
        int saved_errno = errno, ssl_error = SSL_get_error(link->ssl, sent);
        if (ssl_error == SSL_ERROR_WANT_WRITE || ssl_error == SSL_ERROR_WANT_READ) {
            link->write_pending = (int)length;
            link->write_wants_read = ssl_error == SSL_ERROR_WANT_READ;
            ERR_clear_error();
            return 0;
        }
        read_failed(link, ssl_error == SSL_ERROR_ZERO_RETURN ? SSL_ERROR_SSL : ssl_error, saved_errno);
        return 0;
    }
    link->write_pending = 0;
    return sent;
}

static void flush_to_sut(struct link *link) {
    while (link->to_sut.length && !link->state.end_kind) {
        int sent = write_wire_once(link, link->to_sut.length < READ_CHUNK ? link->to_sut.length : READ_CHUNK);
        if (sent <= 0)
            return;
        buffer_consume(&link->to_sut, (size_t)sent);
    }
}

/* ------------------------------------------------------------------ from sipp */

static void deliver_to_sut(void *context, const char *message, size_t length) {
    struct link *link = context;
    int failed = link->websocket ? ws_encode_message(&link->to_sut, message, length)
                                 : buffer_append(&link->to_sut, message, length);
    if (!failed)
        link->state.messages_to_sut++;
}

static void read_pair(struct link *link) {
    char error[96];
    uint64_t ignored_keepalives = 0; /* sipp sends none; the SuT's pongs are what is counted */
    while (link->to_sut.length < BUFFER_LIMIT) {
        size_t room = BUFFER_LIMIT - link->to_sut.length;
        size_t want = room < READ_CHUNK ? room : READ_CHUNK;
        if (buffer_reserve(&link->from_sipp, want))
            return;
        ssize_t got = recv(link->pair_fd, link->from_sipp.data + link->from_sipp.length, want, MSG_DONTWAIT);
        if (got <= 0)
            break;
        link->from_sipp.length += (size_t)got;
        link->state.last_activity_ns = now_ns();
        if (sip_frame(&link->from_sipp, &ignored_keepalives, deliver_to_sut, link, error, sizeof(error))) {
            /* tlslink.py: not SIP from sipp is dropped (Python logs it at detach), whole ones go */
            link->state.dropped_bytes += link->from_sipp.length;
            link->state.unframeable_from_sipp++;
            link->from_sipp.length = 0;
        }
        flush_to_sut(link); /* before the bound is checked: stop only when the SuT stops reading */
        if ((size_t)got < want)
            break;
    }
}

/* ------------------------------------------------------------------ the pump thread */

static uint32_t wants_wire(struct link *link) {
    if (link->state.end_kind)
        return 0;
    uint32_t events = 0;
    if (link->to_sipp.length < BUFFER_LIMIT)
        events |= EPOLLIN | EPOLLRDHUP; /* no RDHUP while not reading: it would fire on and on */
    if (link->to_sut.length || (link->ssl && link->read_wants_write))
        events |= EPOLLOUT;
    return events;
}

static uint32_t wants_pair(struct link *link) {
    uint32_t events = link->to_sut.length < BUFFER_LIMIT && !link->state.end_kind ? EPOLLIN : 0;
    return events | (link->to_sipp.length ? EPOLLOUT : 0);
}

/* epoll data: the link's address with the low bit telling the pair's event from the TLS one. */
static void rewatch(struct link *link) {
    uint32_t tls = wants_wire(link), pair = wants_pair(link);
    if (tls != link->watched_wire && !link->state.end_kind) { /* ended: no longer watched */
        struct epoll_event event = {.events = tls, .data.u64 = (uintptr_t)link};
        epoll_ctl(pump_epoll, EPOLL_CTL_MOD, link->wire_fd, &event);
        link->watched_wire = tls;
    }
    if (pair != link->watched_pair) {
        struct epoll_event event = {.events = pair, .data.u64 = (uintptr_t)link | 1};
        epoll_ctl(pump_epoll, EPOLL_CTL_MOD, link->pair_fd, &event);
        link->watched_pair = pair;
    }
}

static void finish_write(struct link *link);

static void on_event(struct link *link, int pair_side, uint32_t mask) {
    if (link->finishing) {
        finish_write(link);
        return;
    }
    if (!link->attached)
        return; /* released after this epoll_wait returned */
    if (pair_side) {
        if (mask & EPOLLOUT) {
            size_t before = link->to_sipp.length;
            flush_to_sipp(link);
            if (before >= BUFFER_LIMIT && link->to_sipp.length < BUFFER_LIMIT)
                read_wire(link, EPOLLRDHUP); /* OpenSSL may hold decrypted bytes the socket no longer shows */
        }
        if (mask & EPOLLIN)
            read_pair(link);
    } else {
        if (mask & EPOLLOUT) {
            flush_to_sut(link);
            if (link->ssl && link->read_wants_write)
                read_wire(link, EPOLLRDHUP);
        }
        if (mask & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
            read_wire(link, mask);
    }
    rewatch(link);
}

/* ------------------------------------------------------------------ releasing at a clean point */

static void wake_keeper(void) {
    uint64_t one = 1;
    if (write(pump_wakeup, &one, sizeof(one)) < 0) {
        /* the counter is full: the keeper has a wake-up to read already */
    }
}

/* Retry the one SSL_write left pending at release with exactly its length; then let go. */
static void finish_write(struct link *link) {
    ERR_clear_error();
    errno = 0;
    int sent = SSL_write(link->ssl, link->to_sut.data, link->write_pending);
    if (sent > 0) {
        buffer_consume(&link->to_sut, (size_t)sent);
    } else {
        int saved_errno = errno, ssl_error = SSL_get_error(link->ssl, sent);
        if (ssl_error == SSL_ERROR_WANT_WRITE || ssl_error == SSL_ERROR_WANT_READ) {
            uint32_t events = ssl_error == SSL_ERROR_WANT_READ ? EPOLLIN : EPOLLOUT;
            struct epoll_event event = {.events = events, .data.u64 = (uintptr_t)link};
            epoll_ctl(pump_epoll, EPOLL_CTL_MOD, link->wire_fd, &event);
            ERR_clear_error();
            return;
        }
        unsigned long queued = ERR_peek_error();
        const char *what = queued ? ERR_reason_error_string(queued) : saved_errno ? strerror(saved_errno) : NULL;
        snprintf(link->finish_failure, sizeof(link->finish_failure), "the SuT's TLS connection failed: %s",
                 what ? what : "TLS error");
        ERR_clear_error();
    }
    epoll_ctl(pump_epoll, EPOLL_CTL_DEL, link->wire_fd, NULL);
    link->write_pending = 0;
    link->finishing = 0;
    link->finished = 1;
    wake_keeper();
}

static void free_dead_links(void) {
    while (dead_links) {
        struct link *link = dead_links;
        dead_links = link->next_dead;
        buffer_free(&link->to_sut);
        buffer_free(&link->to_sipp);
        buffer_free(&link->from_sut);
        buffer_free(&link->from_sipp);
        ws_free(&link->ws);
        free(link->lengths);
        free(link);
    }
}

/* Wake-ups, not crypto, are much of the pump's CPU under load (issue 20, -t ln at 300 calls/s:
 * 5 context switches a call; OpenSSL under a fifth of the pump's CPU). When epoll_wait found events
 * at once (the previous batch's processing overlapped the next messages), the pump sleeps
 * GATHER_NS before waiting again, so one wake-up serves every message that came meanwhile; a
 * message waits at most that much longer. Sparse traffic (epoll_wait blocked for longer) is
 * served at once, and a full batch (MAX_EVENTS: saturated) never sleeps, so throughput has no cap. */
static void gather_events(void) {
    struct timespec gather = {.tv_sec = 0, .tv_nsec = GATHER_NS};
    nanosleep(&gather, NULL);
}

static void *pump_main(void *unused) {
    (void)unused;
    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        pthread_mutex_lock(&pump_lock);
        free_dead_links(); /* no event of an earlier epoll_wait can name them any more */
        int running = pump_running;
        pthread_mutex_unlock(&pump_lock);
        if (!running)
            return NULL;
        int64_t waited_from = now_ns();
        int count = epoll_wait(pump_epoll, events, MAX_EVENTS, 1000);
        int busy = now_ns() - waited_from < BUSY_WAIT_NS;
        pthread_mutex_lock(&pump_lock);
        for (int i = 0; i < count && pump_running; i++) {
            uintptr_t data = (uintptr_t)events[i].data.u64;
            if (data)
                on_event((struct link *)(data & ~(uintptr_t)1), (int)(data & 1), events[i].events);
        }
        pthread_mutex_unlock(&pump_lock);
        if (count > 0 && count < MAX_EVENTS && busy)
            gather_events(); /* a burst is under way: let it gather before the next wake-up */
    }
}

static int start_pump(void) {
    if (pump_epoll >= 0)
        return 0;
    pump_wakeup = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (pump_wakeup < 0)
        return -1;
    pump_epoll = epoll_create1(EPOLL_CLOEXEC);
    if (pump_epoll < 0) {
        close(pump_wakeup);
        pump_wakeup = -1;
        return -1;
    }
    pump_running = 1;
    pthread_t thread;
    pthread_attr_t attributes;
    pthread_attr_init(&attributes);
    pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&thread, &attributes, pump_main, NULL)) {
        close(pump_epoll);
        pump_epoll = -1;
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ the API (tlspump.py) */

/* Whether fd is a connected TCP socket: a plain wire (the pump reads and writes it itself). */
static int connected_tcp(int fd) {
    int type = 0, domain = 0;
    socklen_t size = sizeof(type);
    struct sockaddr_storage peer;
    socklen_t peer_size = sizeof(peer);
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &size) || type != SOCK_STREAM)
        return 0;
    size = sizeof(domain);
    if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &size) || (domain != AF_INET && domain != AF_INET6))
        return 0;
    return getpeername(fd, (struct sockaddr *)&peer, &peer_size) == 0;
}

/* Whether ssl is a live client TLS session on fd (guards the pointer read from the SSLSocket),
 * or, ssl NULL, whether fd is a connected TCP socket. */
EXPORT int tlspump_validate(SSL *ssl, int fd) {
    if (!ssl)
        return connected_tcp(fd);
    if (SSL_get_fd(ssl) != fd || !SSL_is_init_finished(ssl))
        return 0;
    int version = SSL_version(ssl);
    return version >= TLS1_VERSION && version <= TLS1_3_VERSION;
}

/* Free an idle session's read and write buffers: OpenSSL keeps its 17 kB read buffer after a read
 * that found nothing (SSL_MODE_RELEASE_BUFFERS frees it only after a record), most of an idle
 * kept TLS connection's memory. 1 if freed; 0 if bytes are in them (they stay) or the pointer did
 * not check out. Only for a session no pump thread holds: Python's, between runs. */
EXPORT int tlspump_free_buffers(SSL *ssl, int fd) { return ssl && tlspump_validate(ssl, fd) && SSL_free_buffers(ssl); }

EXPORT struct link *tlspump_new(void) { return calloc(1, sizeof(struct link)); }

static int set_buffer(struct buffer *buffer, const char *data, size_t length) {
    buffer->length = 0;
    return buffer_append(buffer, data, length);
}

/* Take the link over with Python's relay state; 0 on success, -1 (link untouched) otherwise.
 * ssl NULL: wire_fd is a plain TCP socket; websocket: the SuT speaks WebSocket frames, and
 * from_sut is then WsDecoder.discard()'s raw bytes (the decoder re-derives its state from them). */
EXPORT int tlspump_attach(struct link *link, SSL *ssl, int websocket, int wire_fd, int pair_fd, int sipp_fd,
                          const char *to_sut, size_t to_sut_length, const char *to_sipp, size_t to_sipp_length,
                          const char *from_sut, size_t from_sut_length, const char *from_sipp,
                          size_t from_sipp_length, const uint32_t *lengths, size_t lengths_count) {
    pthread_mutex_lock(&pump_lock);
    int result = -1;
    if (link->attached || link->finishing || link->finished || start_pump())
        goto out; /* Python attaches only once it has taken everything back */
    memset(&link->state, 0, sizeof(link->state));
    link->ssl = ssl;
    link->websocket = websocket;
    ws_reset(&link->ws);
    link->wire_fd = wire_fd;
    link->pair_fd = pair_fd;
    link->sipp_fd = sipp_fd;
    link->write_pending = link->write_wants_read = link->read_wants_write = 0; /* Python had no write pending */
    link->lengths_count = 0;
    if (set_buffer(&link->to_sut, to_sut, to_sut_length) || set_buffer(&link->to_sipp, to_sipp, to_sipp_length) ||
        set_buffer(&link->from_sut, from_sut, from_sut_length) ||
        set_buffer(&link->from_sipp, from_sipp, from_sipp_length))
        goto out;
    for (size_t i = 0; i < lengths_count; i++)
        remember_length(link, lengths[i]);
    link->watched_wire = wants_wire(link);
    link->watched_pair = wants_pair(link);
    struct epoll_event tls = {.events = link->watched_wire, .data.u64 = (uintptr_t)link};
    struct epoll_event pair = {.events = link->watched_pair, .data.u64 = (uintptr_t)link | 1};
    if (epoll_ctl(pump_epoll, EPOLL_CTL_ADD, wire_fd, &tls))
        goto out;
    if (epoll_ctl(pump_epoll, EPOLL_CTL_ADD, pair_fd, &pair)) {
        epoll_ctl(pump_epoll, EPOLL_CTL_DEL, wire_fd, NULL);
        goto out;
    }
    link->attached = 1;
    result = 0;
    if (ssl) {
        /* CPython sets it too: to_sut may grow */
        SSL_ctrl(ssl, SSL_CTRL_MODE, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER, NULL);
        /* Read-ahead: one read() per burst of records instead of two per record; what it
         * buffers is drained into to_sipp at detach, as Python's relay watches only the socket. */
        link->read_ahead = SSL_ctrl(ssl, SSL_CTRL_GET_READ_AHEAD, 0, NULL);
        SSL_ctrl(ssl, SSL_CTRL_SET_READ_AHEAD, 1, NULL);
        /* SSL may already hold decrypted bytes no socket event will announce: read them now. */
        if (SSL_has_pending(link->ssl))
            on_event(link, 0, EPOLLIN);
    }
out:
    pthread_mutex_unlock(&pump_lock);
    return result;
}

/* Hand the link back. The pump stops reading both sides at once, so the pair and every
 * buffer are Python's when this returns. Returns 1 when an SSL_write of the pump's is still
 * pending: the pump keeps the SSL object and to_sut until that write completes or fails
 * (tlspump_finished, then tlspump_take_rest); 0 when everything is Python's already. */
EXPORT int tlspump_release(struct link *link) {
    pthread_mutex_lock(&pump_lock);
    if (link->attached) {
        if (!link->state.end_kind)
            epoll_ctl(pump_epoll, EPOLL_CTL_DEL, link->wire_fd, NULL);
        epoll_ctl(pump_epoll, EPOLL_CTL_DEL, link->pair_fd, NULL);
        link->attached = 0;
        if (link->ssl) {
            read_wire_records(link, 0, 1); /* records read ahead: beyond the bound by one buffer at most */
            SSL_ctrl(link->ssl, SSL_CTRL_SET_READ_AHEAD, link->read_ahead, NULL);
        }
        /* A WebSocket's close frame is still to go after its protocol error: finished too. */
        int dead = link->state.end_kind == END_FAILED ||
                   (link->state.end_kind == END_UNFRAMEABLE && !link->websocket);
        if (link->write_pending && !dead) {
            uint32_t events = link->write_wants_read ? EPOLLIN : EPOLLOUT;
            struct epoll_event event = {.events = events, .data.u64 = (uintptr_t)link};
            link->finish_failure[0] = 0;
            link->finishing = epoll_ctl(pump_epoll, EPOLL_CTL_ADD, link->wire_fd, &event) == 0;
            if (!link->finishing)
                snprintf(link->finish_failure, sizeof(link->finish_failure),
                         "the keeper could not finish its TLS write: %s", strerror(errno));
            link->finished = !link->finishing;
            if (link->finished)
                wake_keeper();
        }
        if (!link->finishing)
            link->write_pending = 0; /* none, or the link failed: nothing to finish */
    }
    int finishing = link->finishing || link->finished;
    pthread_mutex_unlock(&pump_lock);
    return finishing;
}

/* Whether a finishing link's write is done (or failed): tlspump_take_rest may be called. */
EXPORT int tlspump_finished(struct link *link) {
    pthread_mutex_lock(&pump_lock);
    int finished = link->finished;
    pthread_mutex_unlock(&pump_lock);
    return finished;
}

/* After finishing: the rest of to_sut (tlspump_buffer 0) and why the write failed ("" if it
 * did not) are Python's, with the SSL object; the link may be attached again. */
EXPORT const char *tlspump_take_rest(struct link *link) {
    pthread_mutex_lock(&pump_lock);
    link->finished = 0;
    pthread_mutex_unlock(&pump_lock);
    return link->finish_failure;
}

EXPORT int tlspump_wakeup_fd(void) {
    pthread_mutex_lock(&pump_lock);
    int fd = start_pump() == 0 ? pump_wakeup : -1;
    pthread_mutex_unlock(&pump_lock);
    return fd;
}

static void stop_finishing(struct link *link) {
    if (link->finishing)
        epoll_ctl(pump_epoll, EPOLL_CTL_DEL, link->wire_fd, NULL);
    link->finishing = link->finished = 0;
}

/* A buffer's bytes after detach: 0 to_sut, 1 to_sipp, 2 from_sut (partial), 3 from_sipp (partial). */
EXPORT const char *tlspump_buffer(struct link *link, int which, size_t *length) {
    struct buffer *buffers[] = {&link->to_sut, &link->to_sipp, &link->from_sut, &link->from_sipp};
    *length = buffers[which]->length;
    return buffers[which]->data;
}

EXPORT const uint32_t *tlspump_lengths(struct link *link, size_t *count) {
    *count = link->lengths_count;
    return link->lengths;
}

/* Free it once the pump thread can no longer hold an event naming it. */
EXPORT void tlspump_free(struct link *link) {
    tlspump_release(link);
    pthread_mutex_lock(&pump_lock);
    stop_finishing(link); /* the link closes: its pending write goes with it */
    if (pump_epoll >= 0) {
        link->next_dead = dead_links;
        dead_links = link;
    } else {
        link->next_dead = NULL;
        dead_links = link;
        free_dead_links();
    }
    pthread_mutex_unlock(&pump_lock);
}

/* At exit: the pump stops touching every link (Python frees the SSL objects next). */
EXPORT void tlspump_stop(void) {
    pthread_mutex_lock(&pump_lock);
    pump_running = 0;
    pthread_mutex_unlock(&pump_lock);
}
