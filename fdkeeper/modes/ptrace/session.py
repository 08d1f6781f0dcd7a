"""One traced run: watch the program's system calls until it holds what it needs, then detach.

The client role is handled here (the handoff at connect()); the server role's accept()
handoff is in server.py.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import sys

from fdkeeper.address import Address, format_address
from fdkeeper.client import Leased
from fdkeeper.errors import FdkeeperError
from fdkeeper.modes.base import HandoffRequest
from fdkeeper.modes.ptrace import procfs
from fdkeeper.modes.ptrace.injection import SYS, Injection, SyscallStop, TraceeGone, Tracer, pidfd_getfd
from fdkeeper.modes.ptrace.percall import PerCallClient
from fdkeeper.modes.ptrace.permission import status_field
from fdkeeper.modes.ptrace.seccomp import install_protection
from fdkeeper.modes.ptrace.server import ServerHandoff
from fdkeeper.modes.ptrace.transfer import Transfer, lease_for

SO_REUSEPORT = 15
SOCK_CLOEXEC = 0o2000000
# Options not replayed onto the kept connection: they concern the program's own socket's life.
NOT_REPLAYED = {
    (socket.SOL_SOCKET, socket.SO_LINGER),
    (socket.SOL_SOCKET, socket.SO_REUSEADDR),
    (socket.SOL_SOCKET, SO_REUSEPORT),
}


class Session:
    """The syscall loop, the client-role handoff, and what both roles share."""

    def __init__(self, tracer: Tracer, request: HandoffRequest, transfer: str) -> None:
        self.tracer = tracer
        self.request = request
        self.transfer = Transfer(tracer, transfer)
        self.remote = procfs.normal(request.remote) if request.remote else None
        self.done = False
        self.options: dict[tuple[int, int], list[tuple[int, int, bytes]]] = {}  # (tgid, fd) -> setsockopt calls
        # (tgid, fd) -> the address its last successful bind() asked for (port 0: an ephemeral one).
        # The run's identity is what the program binds (keeper/identity.py), as the shim reports it.
        self.binds: dict[tuple[int, int], Address] = {}
        self.entries: dict[int, tuple[int, tuple[int, ...]]] = {}  # tid -> syscall in progress
        self.server = ServerHandoff(self) if request.role == "server" else None
        # -t tn/ln client: attached for the whole run, a handoff per connect (never done).
        self.percall = PerCallClient(self) if request.per_call and request.role == "client" else None
        self._tgids: dict[int, int] = {}
        self._pidfds: dict[int, int] = {}
        tracer.on_exec = self._on_exec

    def _on_exec(self, pid: int) -> None:
        """A new program in process ``pid``: what we placed in the old one is gone (its
        descriptor numbers may name other files now)."""
        self.transfer.forget(pid)
        if self.percall is not None:
            self.percall.code.forget(pid)
            self.percall.registrations.forget_process(pid)

    def say(self, text: str) -> None:
        if self.request.debug:
            print(f"fdkeeper-ptrace: {text}", file=sys.stderr, flush=True)

    def run(self) -> int:
        tracer = self.tracer
        try:
            while not self.done:
                stop = tracer.next_stop()
                if stop is None:
                    break
                try:
                    # Handlers leave the thread in a syscall stop (an injection's too).
                    self._on_entry(stop) if stop.entry else self._on_exit(stop)
                except TraceeGone:
                    continue
                if self.done:
                    tracer.detach_all(current=stop.tid)
                    self.say("detached; the program runs untraced from here")
                    break
                tracer.resume(stop.tid)
        finally:
            if tracer.tasks:
                tracer.detach_all()
            if self.percall is not None:
                self.say(
                    f"{tracer.stops} ptrace stops for {self.percall.handoffs} per-call handoff(s); "
                    f"{self.percall.rewritten} message(s) given the kept connection's address"
                )
            self._close()
        if tracer.root_status is not None:
            return tracer.root_status
        while True:
            try:
                return os.waitpid(tracer.root, 0)[1]
            except ChildProcessError:  # reaped already (cannot happen for our own child)
                return 0

    def _on_entry(self, stop: SyscallStop) -> None:
        if self.percall is not None:
            self.percall.on_entry(stop)
            return
        nr, args = stop.nr, stop.args
        self.entries[stop.tid] = (nr, args)
        if nr == SYS["setsockopt"] and args[4] <= 128:
            key = (self.tgid(stop.tid), args[0] & 0xFFFFFFFF)
            value = self.tracer.read(stop.tid, args[3], args[4]) if args[4] else b""
            self.options.setdefault(key, []).append((args[1] & 0xFFFFFFFF, args[2] & 0xFFFFFFFF, value))
        elif nr == SYS["close"]:
            self.options.pop((self.tgid(stop.tid), args[0] & 0xFFFFFFFF), None)
            self.binds.pop((self.tgid(stop.tid), args[0] & 0xFFFFFFFF), None)
        elif nr == SYS["connect"] and self.request.role == "client":
            self._maybe_client_handoff(stop)
        elif self.server is not None:
            self.server.on_entry(stop)

    def _on_exit(self, stop: SyscallStop) -> None:
        if self.percall is not None:
            return
        nr, args = self.entries.pop(stop.tid, (-1, ()))
        if nr == SYS["socket"] and stop.rval >= 0:
            self.options.pop((self.tgid(stop.tid), stop.rval), None)
            self.binds.pop((self.tgid(stop.tid), stop.rval), None)
        elif nr == SYS["bind"] and stop.rval == 0 and self.request.role == "client":
            self._note_bind(stop.tid, args)
        elif self.server is not None:
            self.server.on_exit(stop, nr, args)

    # ---------------------------------------------------------------- client role

    def _maybe_client_handoff(self, stop: SyscallStop) -> None:
        fd, address, length = stop.args[0] & 0xFFFFFFFF, stop.args[1], stop.args[2]
        target = procfs.parse_sockaddr(self.tracer.read(stop.tid, address, min(length, 128))) if address else None
        if target is None or target != self.remote:
            return
        tgid = self.tgid(stop.tid)
        with self.copy(tgid, fd) as program_socket:
            if (
                program_socket.family not in (socket.AF_INET, socket.AF_INET6)
                or program_socket.type != socket.SOCK_STREAM
            ):
                return  # e.g. sipp's UDP probe for its own address
            self.done = True  # one handoff per run (t1), whatever happens next
            injection = Injection(self.tracer, stop.tid, at_entry=True)
            kept = self.client_lease(injection, tgid, local=self.binds.get((tgid, fd)) or "-")
            if kept is None:
                return
            try:
                self._hand_over(injection, tgid, fd, program_socket, kept.fds[0], kept.ids[0])
                injection.finish(0)
            except OSError as error:
                print(
                    f"fdkeeper: cannot hand the kept connection to process {tgid}: {error}", file=sys.stderr, flush=True
                )
                injection.finish(-(error.errno or errno.EIO))

    def _note_bind(self, tid: int, args: tuple[int, ...]) -> None:
        """Remember what a successful bind() asked for (sipp 3.7 binds its client connection twice;
        the second, failing, one does not count), read before the program can reuse the memory."""
        address = procfs.parse_sockaddr(self.tracer.read(tid, args[1], min(args[2], 128))) if args[1] else None
        if address is not None:
            self.binds[(self.tgid(tid), args[0] & 0xFFFFFFFF)] = address

    def _hand_over(
        self, injection: Injection, tgid: int, fd: int, program_socket: socket.socket, kept_fd: int, kept_id: int
    ) -> None:
        """Put the kept connection in the place of the program's socket ``fd``, as it had set it up."""
        with socket.socket(fileno=kept_fd) as kept_socket:
            pair = kept_socket.family == socket.AF_UNIX
            procfs.match_nonblocking(kept_socket, program_socket)
            for level, name, value in self.options.get((tgid, fd), []):
                if (level, name) not in NOT_REPLAYED and not (pair and level == socket.IPPROTO_TCP):
                    procfs.setsockopt_quietly(kept_socket, level, name, value)
            registrations = procfs.epoll_registrations(tgid, fd, os.fstat(program_socket.fileno()).st_ino)
            install_protection(injection, [fd], [fd] if pair else [])
            [new] = self.transfer.into(injection, tgid, [kept_fd])
            injection.check("dup3", new, fd, SOCK_CLOEXEC)
            injection.call("close", new)
            self.restore_epoll(injection, fd, registrations)
        assert self.request.remote is not None  # a client handoff happens only at connect() to it
        self.say(
            f"connect(fd {fd}) to {format_address(self.request.remote)}: handed over kept connection "
            f"{kept_id} by {self.transfer.how}{' (a socketpair end the keeper relays)' if pair else ''}"
        )

    def restore_epoll(
        self, injection: Injection, fd: int, registrations: list[tuple[int, int, int]], base: int | None = None
    ) -> None:
        base = injection.scratch_area() + 2048 if base is None else base
        for epfd, events, data in registrations:
            self.tracer.write(injection.tid, base, struct.pack("<IQ", events, data))
            if injection.call("epoll_ctl", epfd, 1, fd, base) == -errno.EEXIST:  # ADD, else MOD
                injection.call("epoll_ctl", epfd, 3, fd, base)

    # ---------------------------------------------------------------- shared by both roles

    def lease(self, tgid: int, **fields: object) -> Leased:
        return lease_for(self.request, tgid, self.transfer.how, self.say, **fields)

    def client_lease(self, injection: Injection, tgid: int, **fields: object) -> Leased | None:
        """A client lease for the held call; on refusal one line on stderr, and the call fails."""
        try:
            return self.lease(
                tgid, role="client", remote=self.request.remote, reconnect=self.request.reconnect or None, **fields
            )
        except FdkeeperError as error:
            print(str(error), file=sys.stderr, flush=True)
            injection.finish(-(errno.EBUSY if error.code == "busy" else errno.ECONNREFUSED))
            return None

    def tgid(self, tid: int) -> int:
        if tid not in self._tgids:
            self._tgids[tid] = int(status_field("Tgid", tid) or tid)
        return self._tgids[tid]

    def copy(self, tgid: int, fd: int) -> socket.socket:
        """Our own copy of one of the program's sockets (we are its tracer, so pidfd_getfd may)."""
        return socket.socket(fileno=pidfd_getfd(self.pidfd(tgid), fd))

    def pidfd(self, tgid: int) -> int:
        """Our pidfd of the program (opened once per process)."""
        if tgid not in self._pidfds:
            self._pidfds[tgid] = os.pidfd_open(tgid)
        return self._pidfds[tgid]

    def socket_inode(self, tgid: int, fd: int) -> int | None:
        """The inode of the program's descriptor ``fd`` if it is a socket, else None."""
        try:
            copy = pidfd_getfd(self.pidfd(tgid), fd)
        except OSError:
            return None
        try:
            info = os.fstat(copy)
        finally:
            os.close(copy)
        return info.st_ino if stat.S_ISSOCK(info.st_mode) else None

    def is_tcp(self, tid: int, fd: int) -> bool:
        try:
            with self.copy(self.tgid(tid), fd & 0xFFFFFFFF) as copy:
                return copy.family in (socket.AF_INET, socket.AF_INET6) and copy.type == socket.SOCK_STREAM
        except OSError:
            return False

    def _close(self) -> None:
        for pidfd in self._pidfds.values():
            os.close(pidfd)
        self._pidfds.clear()
        self.transfer.close()
        if self.percall is not None:
            self.percall.code.close()
