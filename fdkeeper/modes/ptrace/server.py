"""The server role of a traced run: kept connections handed over as accepted ones.

After the program's first successful listen() on a TCP socket, the kept connections are
leased and put into the program; epoll_wait() is made to report the listener readable
(its timeout cut to 0 meanwhile) and accept() on it returns them one by one, with their
peer addresses. When the last one is accepted, the role is done and the loop detaches.
"""

from __future__ import annotations

import collections
import errno
import os
import socket
import struct

from fdkeeper.address import Address
from fdkeeper.errors import FdkeeperError
from fdkeeper.modes.ptrace import procfs
from fdkeeper.modes.ptrace import raw as pt
from fdkeeper.modes.ptrace.injection import Injection
from fdkeeper.modes.ptrace.raw import LOW, SYS
from fdkeeper.modes.ptrace.seccomp import install_protection
from fdkeeper.modes.ptrace.services import Services
from fdkeeper.modes.ptrace.tracer import SyscallStop

EPOLLIN = 0x001
SOCK_NONBLOCK = 0o4000
EPOLL_WAITS = (SYS["epoll_wait"], SYS["epoll_pwait"])


class ServerRole:
    """Kept connections handed over as the accept()s after the program's first listen()."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.done = False
        self.tgid = 0
        self.listener = -1  # the program's listening fd, once handed over
        self.listening: dict[int, int] = {}  # tid -> fd whose listen() we wait to see succeed
        self.pending: collections.deque[tuple[int, bytes]] = collections.deque()  # (fd in program, sockaddr)
        self.registrations: dict[int, int] = {}  # epfd -> the listener's epoll data

    def on_entry(self, stop: SyscallStop) -> None:
        nr, args = stop.nr, stop.args
        if nr == SYS["listen"] and self.listener < 0:
            if self.services.is_tcp(stop.tid, args[0]):
                self.listening[stop.tid] = args[0] & LOW
        elif nr in EPOLL_WAITS and self._serving(stop.tid):
            regs = pt.ptrace_getregs(stop.tid)
            regs.r10 = 0  # never block while a kept connection waits to be accepted
            pt.ptrace_setregs(stop.tid, regs)
        elif nr in (SYS["accept"], SYS["accept4"]) and self._serving(stop.tid) and args[0] & LOW == self.listener:
            self._accept(stop)

    def on_exit(self, stop: SyscallStop, nr: int, args: tuple[int, ...]) -> None:
        if nr == SYS["listen"] and stop.tid in self.listening:
            fd = self.listening.pop(stop.tid)
            if stop.rval == 0 and self.listener < 0:
                self._hand_over(stop, fd)
        elif nr in EPOLL_WAITS and self._serving(stop.tid) and stop.rval >= 0:
            self._report_listener(stop, args)

    def on_exec(self, pid: int) -> None:
        pass  # not followed: the handoff is at the first listen() of whichever program listens

    def close(self) -> None:
        pass

    def _hand_over(self, stop: SyscallStop, listener: int) -> None:
        services = self.services
        tgid = services.tgid(stop.tid)
        injection = Injection(services.tracer, stop.tid, at_entry=False)
        try:
            kept = services.lease(
                tgid, role="server", remote=services.request.remote, local=self._identity(tgid, listener)
            )
        except FdkeeperError as error:
            services.tell(str(error))
            self.done = True
            injection.finish(-errno.ECONNREFUSED)
            return
        try:
            sockets = [socket.socket(fileno=fd) for fd in kept.fds]
            addresses = [procfs.peer_sockaddr(s, peer) for s, peer in zip(sockets, kept.peers, strict=False)]
            new = services.transfer.into(injection, tgid, kept.fds)
            install_protection(
                injection, new, [n for n, s in zip(new, sockets, strict=False) if s.family == socket.AF_UNIX]
            )
            self.pending.extend(zip(new, addresses, strict=False))
            for s in sockets:
                s.close()
        except OSError as error:
            services.tell(f"fdkeeper: cannot hand the kept connections to process {tgid}: {error}")
            self.done = True
            injection.finish(-(error.errno or errno.EIO))
            return
        self.tgid, self.listener = tgid, listener
        self._refresh_registrations()
        services.say(f"listen(fd {listener}): {len(new)} kept connection(s) pending as accepts (fds {new})")
        injection.finish(0)
        if not self.pending:
            self.done = True

    def _identity(self, tgid: int, listener: int) -> Address | None:
        """The run's identity: its -i/-p, or where the runner could only guess (sipp 3.7 without
        -p takes the first free port of 5060-5119), the port the program's listener did get."""
        request = self.services.request
        if request.local_known:
            return request.local
        try:
            with self.services.copy(tgid, listener) as sock:
                return procfs.normal(sock.getsockname()[:2])
        except OSError:
            return request.local

    def _serving(self, tid: int) -> bool:
        return self.listener >= 0 and bool(self.pending) and self.services.tgid(tid) == self.tgid

    def _refresh_registrations(self) -> None:
        with self.services.copy(self.tgid, self.listener) as listener:
            found = procfs.epoll_registrations(self.tgid, self.listener, os.fstat(listener.fileno()).st_ino)
        self.registrations = {epfd: data for epfd, _events, data in found}

    def _report_listener(self, stop: SyscallStop, args: tuple[int, ...]) -> None:
        """At epoll_wait()'s return, add the listener's EPOLLIN if the kernel did not."""
        tracer = self.services.tracer
        epfd, events, maxevents = args[0] & LOW, args[1], args[2] & LOW
        if epfd not in self.registrations:
            self._refresh_registrations()
        data = self.registrations.get(epfd)
        count = stop.rval
        if data is None or count >= maxevents:
            return
        got = tracer.read(stop.tid, events, 12 * count) if count else b""
        if any(struct.unpack_from("<IQ", got, 12 * i)[1] == data for i in range(count)):
            return
        tracer.write(stop.tid, events + 12 * count, struct.pack("<IQ", EPOLLIN, data))
        regs = pt.ptrace_getregs(stop.tid)
        regs.rax = count + 1
        pt.ptrace_setregs(stop.tid, regs)

    def _accept(self, stop: SyscallStop) -> None:
        services, tracer = self.services, self.services.tracer
        fd, sockaddr = self.pending.popleft()
        address, length_at = stop.args[1], stop.args[2]
        flags = stop.args[3] & LOW if stop.nr == SYS["accept4"] else 0
        injection = Injection(tracer, stop.tid, at_entry=True)
        with services.copy(self.tgid, fd) as copy:
            copy.setblocking(not flags & SOCK_NONBLOCK)  # what a real accept4() gives
        if address and length_at:
            (room,) = struct.unpack("<I", tracer.read(stop.tid, length_at, 4))
            tracer.write(stop.tid, address, sockaddr[: min(room, len(sockaddr))])
            tracer.write(stop.tid, length_at, struct.pack("<I", len(sockaddr)))
        services.say(f"accept(fd {self.listener}): handed over kept connection as fd {fd}")
        injection.finish(fd)
        if not self.pending:
            self.done = True
