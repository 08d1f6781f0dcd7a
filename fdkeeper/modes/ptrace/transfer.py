"""Getting fdkeeper's descriptors (the kept connections it leased) into the traced program.

They reach the program by SCM_RIGHTS (a recvmsg() injected into it, from an abstract socket
only the program's process may take them from) or by pidfd_getfd() (injected, on a pidfd of
fdkeeper); the lease itself is services.py's.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import struct

from fdkeeper.modes.ptrace.injection import Injection
from fdkeeper.modes.ptrace.raw import libc
from fdkeeper.modes.ptrace.tracer import Tracer
from fdkeeper.protocol import MAX_FDS_PER_PACKET
from fdkeeper.statedir import peer_credentials

SOCK_CLOEXEC, MSG_CMSG_CLOEXEC = 0o2000000, 0x40000000
PR_SET_PTRACER = 0x59616D61


class Transfer:
    """Makes the held program take copies of our descriptors (close-on-exec there)."""

    def __init__(self, tracer: Tracer, how: str) -> None:
        self.tracer = tracer
        self.how = how
        self._scm: socket.socket | None = None
        self._program_pidfd: dict[int, int] = {}  # tgid -> fdkeeper's pidfd in it (-1: not allowed)

    def into(self, injection: Injection, tgid: int, fds: list[int]) -> list[int]:
        """Their numbers in the program, in the order of ``fds``."""
        if self.how == "pidfd":
            # Yama scope 1 lets only ancestors use pidfd_getfd on us unless we name the program.
            libc.prctl(PR_SET_PTRACER, tgid, 0, 0, 0)
            pidfd = injection.check("pidfd_open", os.getpid(), 0)
            try:
                return [injection.check("pidfd_getfd", pidfd, fd, 0) for fd in fds]
            finally:
                injection.call("close", pidfd)
        return self._by_scm(injection, tgid, fds)

    def one_into(self, injection: Injection, tgid: int, fd: int) -> int:
        """One descriptor into the program, the cheap way for a handoff per call: a pidfd of
        fdkeeper opened in the program once and kept there (close-on-exec), so each call costs
        one injected pidfd_getfd(); by SCM_RIGHTS where pidfd_getfd is not allowed."""
        if self._program_pidfd.get(tgid, 0) >= 0:
            for _attempt in range(2):
                try:
                    return injection.check("pidfd_getfd", self._pidfd_in(injection, tgid), fd, 0)
                except OSError as error:
                    self._program_pidfd.pop(tgid, None)
                    if error.errno != errno.EBADF:  # EBADF: the program closed our pidfd; else not allowed
                        self._program_pidfd[tgid] = -1
                        break
        return self._by_scm(injection, tgid, [fd])[0]

    def forget(self, tgid: int) -> None:
        """The program exec'd: our pidfd there is gone (pidfds are close-on-exec)."""
        self._program_pidfd.pop(tgid, None)

    def pidfd_in_program(self, tgid: int) -> int | None:
        """fdkeeper's pidfd in the program, once one_into() opened it there; else None."""
        pidfd = self._program_pidfd.get(tgid, -1)
        return pidfd if pidfd >= 0 else None

    def _pidfd_in(self, injection: Injection, tgid: int) -> int:
        if tgid not in self._program_pidfd:
            libc.prctl(PR_SET_PTRACER, tgid, 0, 0, 0)  # Yama scope 1: name the program
            self._program_pidfd[tgid] = injection.check("pidfd_open", os.getpid(), 0)
        return self._program_pidfd[tgid]

    def close(self) -> None:
        if self._scm is not None:
            self._scm.close()

    def _listener(self) -> socket.socket:
        if self._scm is None:
            self._scm = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            self._scm.bind(b"\0fdkeeper-ptrace-%d-%s" % (os.getpid(), os.urandom(8).hex().encode()))
            self._scm.listen(4)
            self._scm.settimeout(5)
        return self._scm

    def _accept_from(self, tgid: int) -> socket.socket:
        """Anyone may connect to an abstract name: only the program gets descriptors."""
        while True:
            connection, _ = self._listener().accept()
            pid = peer_credentials(connection)[0]
            if pid == tgid:
                return connection
            connection.close()

    def _by_scm(self, injection: Injection, tgid: int, fds: list[int]) -> list[int]:
        name = self._listener().getsockname()
        base = injection.scratch_area()
        self.tracer.write(injection.tid, base, struct.pack("<H", socket.AF_UNIX) + name)
        program_end = injection.check("socket", socket.AF_UNIX, socket.SOCK_SEQPACKET | SOCK_CLOEXEC, 0)
        received: list[int] = []
        try:
            injection.check("connect", program_end, base, 2 + len(name))
            with self._accept_from(tgid) as connection:
                for start in range(0, len(fds), MAX_FDS_PER_PACKET):
                    chunk = fds[start : start + MAX_FDS_PER_PACKET]
                    connection.sendmsg([b"F"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", chunk))])
                    received += self._receive_in_program(injection, program_end, base, len(chunk))
        finally:
            injection.call("close", program_end)
        return received

    def _receive_in_program(self, injection: Injection, program_end: int, base: int, count: int) -> list[int]:
        """An injected recvmsg() of one packet of ``count`` descriptors; their numbers there."""
        tid = injection.tid
        control = base + 512
        control_len = socket.CMSG_SPACE(4 * count)
        # msghdr (name, namelen, iov, iovlen, control, controllen, flags), one iovec, 16 bytes of data
        self.tracer.write(tid, base + 128, struct.pack("<QI4xQQQQi4x", 0, 0, base + 256, 1, control, control_len, 0))
        self.tracer.write(tid, base + 256, struct.pack("<QQ", base + 320, 16))
        injection.check("recvmsg", program_end, base + 128, MSG_CMSG_CLOEXEC)
        length, level, kind = struct.unpack("<Qii", self.tracer.read(tid, control, 16))
        if (level, kind) != (socket.SOL_SOCKET, socket.SCM_RIGHTS):
            raise OSError(errno.EPROTO, "no descriptors arrived in the traced program")
        got = (length - 16) // 4
        return list(struct.unpack(f"<{got}i", self.tracer.read(tid, control + 16, 4 * got)))
