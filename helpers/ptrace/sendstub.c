/* sendstub.c: the Via rewrite of a per-call fd's later sends, run by the traced program itself.

Built by `pip install` (setup.py, flags in helpers/shimbuild.py SENDSTUB_CFLAGS) into
fdkeeper/_sendstub*.so, from which fdkeeper/modes/ptrace/sendstub.py reads its three functions'
bytes and maps them into a traced program (that module says how each is reached): so each
function is whole in itself: no libc, no data of its own, no call (every helper always inlined),
no relocation.

fdk_send_flags(table, fd, buf, len, flags) is called at a plain send() (sendto without an
address) of the program: where fd is a kept per-call connection that fdkeeper noted in the
table (its inode still the one noted), the placeholder's "IP:PORT" where it stands whole in the
header part (up to the first blank line, 64 KiB at most) is replaced by the kept connection's,
same length, in the program's own buffer (as viarewrite.py does from the tracer); it returns
the flags the send is to run with: MSG_NOSIGNAL added for such an fd when the program ignores
SIGPIPE, so that the seccomp filter lets the send by without a ptrace stop.

fdk_connect(table, fd, addr, len) is called at the program's connect() (its wrapper patched
too): a TCP socket's connect to the SuT (addr the very bytes the program connected it with at
the connect the tracer saw, noted in the table), in the process the table is for (not a forked
child, which shares the page but not fdkeeper's notes of it), is not made: it returns 0 and
notes the socket's inode as pending for fd, where the tracer finds it at the fd's first send
(a stop the filter makes anyway) and hands the user's kept connection over there; -EISCONN for
a socket pending or kept already, as the kernel would say. Anything else returns
FDK_NOT_HANDLED: the trampoline makes the program's own syscall, which the filter stops as before.

fdk_epoll_ctl(table, epfd, op, fd, event) is called at the program's epoll_ctl() (its wrapper
patched too), in the process the table is for: it notes the registration of fd (its inode, the
epoll fd, events and data; added to a second epoll set, or changed otherwise than by a MOD in
the one noted, the tracer reads them all from /proc), follows MOD and DEL of it, and returns 1: the trampoline then makes the
call with FDK_COOKIE in its 5th argument register, which the kernel ignores and the seccomp
filter lets by without a stop. The tracer reads the noted registration at the fd's first send,
to make it again on the kept connection. In another process (a forked child) it returns 0: the
call is made as the program made it, and the filter stops its ADD as before.
*/

/* Every helper inlined: the function's bytes are copied alone, so it may call nothing. */
#define INLINE static inline __attribute__((always_inline))
#define MAX_LOOK 65536UL
#define ADDRESS 64
#define MSG_NOSIGNAL 0x4000L
#define SYS_FSTAT 5
#define SYS_GETSOCKOPT 55
#define SYS_GETPID 39
#define SOL_SOCKET 1
#define SO_TYPE 3
#define SO_DOMAIN 39
#define SOCK_STREAM 1
#define EISCONN 106
#define SUT_ADDRESS 32
#define FDK_NOT_HANDLED 1L
#define EPOLL_CTL_ADD 1
#define EPOLL_CTL_DEL 2
#define EPOLL_CTL_MOD 3

struct entry {
    unsigned long ino;      /* the kept connection's inode (0: no entry) */
    unsigned long len;      /* length of old and new */
    char old[ADDRESS];      /* the placeholder's IP:PORT */
    char new[ADDRESS];      /* the kept connection's, same length */
    unsigned long pending;  /* inode of the program's socket whose connect() was not made (0: none) */
    unsigned long added;    /* inode of the socket whose epoll registration follows (0: none) */
    long epfd;              /* the epoll fd it was added to */
    unsigned long events;   /* struct epoll_event's events */
    unsigned long data;     /* and data */
    unsigned long many;     /* added to more than one epoll set: read them from /proc */
};

struct epoll_event_packed {
    unsigned int events;
    unsigned long data;
} __attribute__((packed));

struct table {
    unsigned long nosignal; /* the program ignores SIGPIPE: MSG_NOSIGNAL changes nothing for it */
    unsigned long fds;      /* entries below */
    unsigned long rewritten; /* messages rewritten here, read by fdkeeper at a thread's exit and an exec */
    unsigned long tgid;     /* the process the table is for (0: connect() is never answered here) */
    unsigned long sut_len;  /* length of sut (0: as tgid 0) */
    unsigned char sut[SUT_ADDRESS]; /* the sockaddr the program connected its per-call sockets with */
    struct entry entry[];   /* by fd */
};

INLINE long fstat_ino(long fd)
{
    unsigned long st[18];   /* struct stat: st_ino at 8 */
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "0"(SYS_FSTAT), "D"(fd), "S"(st) : "rcx", "r11", "memory");
    return ret < 0 ? -1 : (long)st[1];
}

INLINE long syscall0(long nr)
{
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "0"(nr) : "rcx", "r11", "memory");
    return ret;
}

/* getsockopt(fd, SOL_SOCKET, name) of an int option; -1 when it fails. */
INLINE long socket_option(long fd, long name)
{
    int value = -1;
    unsigned int size = sizeof value;
    long ret;
    register long optval __asm__("r10") = (long)&value; /* 4th argument */
    register long optlen __asm__("r8") = (long)&size;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "0"(SYS_GETSOCKOPT), "D"(fd), "S"(SOL_SOCKET), "d"(name), "r"(optval), "r"(optlen)
                     : "rcx", "r11", "memory");
    /* cppcheck does not see the syscall write value: not the same expression in both branches */
    // cppcheck-suppress duplicateExpressionTernary
    return ret < 0 ? -1 : value;
}

INLINE int token_char(char c)
{
    return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '.' || c == ':' ||
           c == '_' || c == '-';
}

INLINE int at(const char *buf, unsigned long i, const char *what, unsigned long len)
{
    for (unsigned long k = 0; k < len; k++)
        if (buf[i + k] != what[k])
            return 0;
    return 1;
}

/* Where the header part ends: past its first blank line, else the whole of what is looked at. */
INLINE unsigned long header_end(const char *buf, unsigned long size)
{
    for (unsigned long i = 0; i + 4 <= size; i++)
        if (buf[i] == '\r' && buf[i + 1] == '\n' && buf[i + 2] == '\r' && buf[i + 3] == '\n')
            return i + 4;
    return size;
}

long fdk_send_flags(struct table *table, long fd, char *buf, unsigned long size, long flags)
{
    if (fd < 0 || (unsigned long)fd >= table->fds)
        return flags;
    struct entry *entry = &table->entry[fd];
    unsigned long len = entry->len;
    if (!entry->ino || !len || len > ADDRESS || fstat_ino(fd) != (long)entry->ino)
        return flags;
    unsigned long end = header_end(buf, size < MAX_LOOK ? size : MAX_LOOK);
    int rewritten = 0;
    for (unsigned long i = 0; i + len <= end; i++) {
        if (!at(buf, i, entry->old, len) || (i && token_char(buf[i - 1])) ||
            (i + len < end && buf[i + len] >= '0' && buf[i + len] <= '9'))
            continue;
        for (unsigned long k = 0; k < len; k++)
            buf[i + k] = entry->new[k];
        i += len - 1;
        rewritten = 1;
    }
    table->rewritten += rewritten;
    return table->nosignal ? flags | MSG_NOSIGNAL : flags;
}

long fdk_connect(struct table *table, long fd, const unsigned char *addr, unsigned long len)
{
    unsigned long sut_len = table->sut_len;
    if (fd < 0 || (unsigned long)fd >= table->fds || !sut_len || sut_len > SUT_ADDRESS || len != sut_len || !addr)
        return FDK_NOT_HANDLED;
    for (unsigned long k = 0; k < len; k++)
        if (addr[k] != table->sut[k])
            return FDK_NOT_HANDLED;
    /* A forked child shares this page, not fdkeeper's notes: its connect is the tracer's. */
    if ((unsigned long)syscall0(SYS_GETPID) != table->tgid)
        return FDK_NOT_HANDLED;
    long ino = fstat_ino(fd);
    if (ino <= 0 || socket_option(fd, SO_TYPE) != SOCK_STREAM || socket_option(fd, SO_DOMAIN) != (addr[0] | addr[1] << 8))
        return FDK_NOT_HANDLED;
    struct entry *entry = &table->entry[fd];
    if (entry->pending == (unsigned long)ino || entry->ino == (unsigned long)ino)
        return -EISCONN;
    entry->pending = (unsigned long)ino;
    return 0;
}

long fdk_epoll_ctl(struct table *table, long epfd, long op, long fd, const struct epoll_event_packed *event)
{
    if (fd < 0 || (unsigned long)fd >= table->fds || !table->tgid)
        return 0;
    if ((unsigned long)syscall0(SYS_GETPID) != table->tgid)
        return 0; /* a forked child's: the tracer's, by its stop */
    long ino = fstat_ino(fd);
    if (ino <= 0)
        return 1; /* not an open fd: the call fails by itself */
    struct entry *entry = &table->entry[fd];
    int ours = entry->added == (unsigned long)ino;
    if (op == EPOLL_CTL_ADD && event && ours && entry->epfd != epfd)
        entry->many = 1; /* in a second epoll set: the tracer reads them all from /proc */
    else if (op == EPOLL_CTL_ADD && event) { /* a new socket on fd, or the noted set again */
        entry->added = (unsigned long)ino;
        entry->epfd = epfd;
        entry->events = event->events;
        entry->data = event->data;
        entry->many = ours ? entry->many : 0;
    } else if (op == EPOLL_CTL_MOD && event && ours && entry->epfd == epfd) {
        entry->events = event->events;
        entry->data = event->data;
    } else if (ours && (op != EPOLL_CTL_MOD || entry->epfd != epfd))
        entry->added = 0; /* DEL, or what is not followed here: the tracer reads /proc */
    return 1;
}
