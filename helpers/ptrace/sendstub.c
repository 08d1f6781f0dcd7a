/* sendstub.c: the Via rewrite of a per-call fd's later sends, run by the traced program itself.

Built by `pip install` (setup.py, flags in helpers/shimbuild.py SENDSTUB_CFLAGS) into
fdkeeper/_sendstub*.so, from which fdkeeper/modes/ptrace/sendstub.py reads this one function's
bytes and maps them into a traced program (that module says how it is reached): so the function
is whole in itself: no libc, no data of its own, no call (every helper always inlined), no
relocation.

fdk_send_flags(table, fd, buf, len, flags) is called at a plain send() (sendto without an
address) of the program: where fd is a kept per-call connection that fdkeeper noted in the
table (its inode still the one noted), the placeholder's "IP:PORT" where it stands whole in the
header part (up to the first blank line, 64 KiB at most) is replaced by the kept connection's,
same length, in the program's own buffer (as viarewrite.py does from the tracer); it returns
the flags the send is to run with: MSG_NOSIGNAL added for such an fd when the program ignores
SIGPIPE, so that the seccomp filter lets the send by without a ptrace stop.
*/

/* Every helper inlined: the function's bytes are copied alone, so it may call nothing. */
#define INLINE static inline __attribute__((always_inline))
#define MAX_LOOK 65536UL
#define ADDRESS 64
#define MSG_NOSIGNAL 0x4000L
#define SYS_FSTAT 5

struct entry {
    unsigned long ino;      /* the kept connection's inode (0: no entry) */
    unsigned long len;      /* length of old and new */
    char old[ADDRESS];      /* the placeholder's IP:PORT */
    char new[ADDRESS];      /* the kept connection's, same length */
};

struct table {
    unsigned long nosignal; /* the program ignores SIGPIPE: MSG_NOSIGNAL changes nothing for it */
    unsigned long fds;      /* entries below */
    unsigned long rewritten; /* messages rewritten here, read by fdkeeper when the process ends */
    struct entry entry[];   /* by fd */
};

INLINE long fstat_ino(long fd)
{
    unsigned long st[18];   /* struct stat: st_ino at 8 */
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "0"(SYS_FSTAT), "D"(fd), "S"(st) : "rcx", "r11", "memory");
    return ret < 0 ? -1 : (long)st[1];
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
