"""The traced program's epoll registrations: noted as it makes them, re-added from outside.

A handoff dup3()s the kept connection onto the program's socket, and the kernel drops the
epoll registrations of the file that number held. Re-adding them needs what the program
registered (events, data): the per-call filter stops at EPOLL_CTL_ADD, and stepping threads
show their EPOLL_CTL_MOD/DEL, so we note them (Registrations) rather than read
/proc/PID/fdinfo of the epoll descriptor, which lists every registration of the set.

Re-adding is done from fdkeeper's side when it can (add_from_outside): an epoll
registration is keyed by (file, descriptor number), and the epoll instance is shared, so
our copy of the program's epoll descriptor and our copy of the kept connection under the
same number as in the program make exactly the registration the program's own epoll_ctl()
would, with no syscall injected into the program. It outlives our copies: the kernel drops
a registration only when the file's last descriptor anywhere is closed.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct

from fdkeeper.modes.ptrace.raw import SYS, libc, pidfd_getfd

EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD = 1, 2, 3


class Registrations:
    """The epoll registrations of the program's sockets as it made them, by (tgid, fd), each
    with the inode of the socket it was made for (a number reused by another socket of the
    program, registered where we did not look, never passes for it)."""

    def __init__(self) -> None:
        self.by_fd: dict[
            tuple[int, int], tuple[int, dict[int, tuple[int, int]]]
        ] = {}  # -> (inode, {epfd: (events, data)})

    def added(self, key: tuple[int, int], ino: int, epfd: int, events: int, data: int) -> None:
        known = self.by_fd.get(key)
        if known is None or known[0] != ino:
            known = self.by_fd[key] = (ino, {})
        known[1][epfd] = (events, data)

    def changed(self, key: tuple[int, int], op: int, epfd: int, events: int, data: int) -> None:
        """EPOLL_CTL_MOD or _DEL by a stepping thread, on a socket whose registrations we hold."""
        known = self.by_fd.get(key)
        if known is None or epfd not in known[1]:
            return
        if op == EPOLL_CTL_DEL:
            del known[1][epfd]
        else:
            known[1][epfd] = (events, data)

    def forget_process(self, tgid: int) -> None:
        """The process exec'd: its epoll descriptors may be other files now."""
        for key in [key for key in self.by_fd if key[0] == tgid]:
            del self.by_fd[key]

    def of(self, key: tuple[int, int], ino: int) -> list[tuple[int, int, int]] | None:
        """(epfd, events, data) of each registration of that socket; None when unknown."""
        known = self.by_fd.pop(key, None)
        if known is None or known[0] != ino:
            return None
        return [(epfd, events, data) for epfd, (events, data) in known[1].items()]


def add_from_outside(pidfd: int, fd: int, kept_fd: int, registrations: list[tuple[int, int, int]]) -> bool:
    """Register the kept connection, now the program's ``fd``, in the program's epoll sets as
    ``registrations`` say; False (nothing done) when ``fd`` is taken in our own descriptor
    table, so the caller injects the epoll_ctl() calls instead."""
    if not registrations:
        return True
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
        return False  # a descriptor of ours has that number
    except OSError as error:
        if error.errno != errno.EBADF:
            return False
    try:
        os.dup2(kept_fd, fd, inheritable=False)
    except OSError:
        return False  # e.g. above our own open-file limit
    try:
        for epfd, events, data in registrations:
            ours = pidfd_getfd(pidfd, epfd)
            try:
                _epoll_ctl(ours, fd, events, data)
            finally:
                os.close(ours)
    finally:
        os.close(fd)
    return True


def _epoll_ctl(epfd: int, fd: int, events: int, data: int) -> None:
    """EPOLL_CTL_ADD with any 64-bit data (Python's epoll only registers data = fd); MOD
    when it is there already."""
    event = ctypes.create_string_buffer(struct.pack("<IQ", events, data), 12)  # packed on x86_64
    for op in (EPOLL_CTL_ADD, EPOLL_CTL_MOD):
        if libc.syscall(SYS["epoll_ctl"], epfd, op, fd, event) == 0:
            return
        error = ctypes.get_errno()
        if op == EPOLL_CTL_MOD or error != errno.EEXIST:
            raise OSError(error, f"epoll_ctl on the program's epoll descriptor: {os.strerror(error)}")
