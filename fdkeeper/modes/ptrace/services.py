"""What every role of a traced run calls on: leases, the program's sockets, handing over, saying.

One Services per traced run, made by the loop (session.py) and given to its role: it leases
kept connections from the keeper for the program, makes our own copies of the program's
sockets, puts a descriptor in the place of one of the program's by injection (with the
program's socket options replayed, NOT_REPLAYED aside, and its epoll registrations re-added),
and says what happened (debug lines, and the one line on stderr an error is worth). It knows
no role and no loop, so both can use it without importing each other.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import sys

from fdkeeper.client import Leased
from fdkeeper.errors import FdkeeperError
from fdkeeper.modes.base import HandoffRequest
from fdkeeper.modes.ptrace import procfs
from fdkeeper.modes.ptrace.epoll import EPOLL_CTL_ADD, EPOLL_CTL_MOD
from fdkeeper.modes.ptrace.injection import Injection
from fdkeeper.modes.ptrace.permission import status_field
from fdkeeper.modes.ptrace.raw import LOW, pidfd_getfd
from fdkeeper.modes.ptrace.runclient import RunClient
from fdkeeper.modes.ptrace.tracer import SyscallStop, Tracer
from fdkeeper.modes.ptrace.transfer import Transfer

SO_REUSEPORT = 15
# Options not replayed onto the kept connection: they concern the program's own socket's life.
# Python twin of the shim's list (helpers/shim/replay.c).
NOT_REPLAYED = {
    (socket.SOL_SOCKET, socket.SO_LINGER),
    (socket.SOL_SOCKET, socket.SO_REUSEADDR),
    (socket.SOL_SOCKET, SO_REUSEPORT),
}


class Services:
    """The traced run's services to its role (see the module's docstring)."""

    def __init__(self, tracer: Tracer, request: HandoffRequest, transfer: str) -> None:
        self.tracer = tracer
        self.request = request
        self.transfer = Transfer(tracer, transfer)
        self.remote = procfs.normal(request.remote) if request.remote else None
        self._tgids: dict[int, int] = {}
        self._pidfds: dict[int, int] = {}
        self.keeper = RunClient(request.directory)  # one control connection for every lease

    # ------------------------------------------------------------ saying

    def say(self, text: str) -> None:
        """A line of what the handoff did, with --debug."""
        if self.request.debug:
            print(f"fdkeeper-ptrace: {text}", file=sys.stderr, flush=True)

    @staticmethod
    def tell(text: str) -> None:
        """A line the user must see: what failed, and so what the program's call returned."""
        print(text, file=sys.stderr, flush=True)

    # ------------------------------------------------------------ leasing

    def lease(self, tgid: int, for_program: bool = True, **fields: object) -> Leased:
        """LEASE for the traced process (for_pid=, checked by the keeper against TracerPid), or
        (``for_program`` False) held by this fdkeeper process, which lives exactly as long as
        the traced program (it waits for it), so the lease ends with it all the same."""
        keeper = self.keeper
        base = {k: v for k, v in fields.items() if v is not None}
        base["transport"] = self.request.transport
        if not for_program:
            return keeper.lease_connections(**base, mode="ptrace", transfer=self.transfer.how)
        try:
            return keeper.lease_connections(**base, for_pid=tgid, mode="ptrace", transfer=self.transfer.how)
        except FdkeeperError as error:
            if error.code != "badrequest" or "for_pid" not in str(error):
                raise
        self.say("the keeper does not know for_pid=; the lease is held by fdkeeper itself")
        return keeper.lease_connections(**base)

    def client_lease(
        self, injection: Injection, tgid: int, for_program: bool = True, **fields: object
    ) -> Leased | None:
        """A client lease for the held call; on refusal one line on stderr, and the call fails."""
        try:
            return self.lease(
                tgid,
                for_program,
                role="client",
                remote=self.request.remote,
                reconnect=self.request.reconnect or None,
                **fields,
            )
        except FdkeeperError as error:
            self.tell(str(error))
            injection.finish(-(errno.EBUSY if error.code == "busy" else errno.ECONNREFUSED))
            return None

    # ------------------------------------------------------------ the program's processes and sockets

    def tgid(self, tid: int) -> int:
        if tid not in self._tgids:
            self._tgids[tid] = int(status_field("Tgid", tid) or tid)
        return self._tgids[tid]

    def pidfd(self, tgid: int) -> int:
        """Our pidfd of the program (opened once per process)."""
        if tgid not in self._pidfds:
            self._pidfds[tgid] = os.pidfd_open(tgid)
        return self._pidfds[tgid]

    def copy(self, tgid: int, fd: int) -> socket.socket:
        """Our own copy of one of the program's sockets (we are its tracer, so pidfd_getfd may)."""
        return socket.socket(fileno=pidfd_getfd(self.pidfd(tgid), fd))

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
            with self.copy(self.tgid(tid), fd & LOW) as copy:
                return is_tcp_socket(copy)
        except OSError:
            return False

    def connects_to_sut(self, stop: SyscallStop) -> bool:
        """At a connect() entry: whether its address is the SuT's."""
        address, length = stop.args[1], stop.args[2]
        target = procfs.parse_sockaddr(self.tracer.read(stop.tid, address, min(length, 128))) if address else None
        return target is not None and target == self.remote

    # ------------------------------------------------------------ handing over

    def place(self, injection: Injection, new: int, fd: int) -> None:
        """The descriptor the program got as ``new`` moved onto its ``fd`` (close-on-exec there)."""
        injection.check("dup3", new, fd, socket.SOCK_CLOEXEC)
        injection.call("close", new)

    @staticmethod
    def replay_options(kept: socket.socket, options: list[tuple[int, int, bytes]]) -> None:
        """The program's setsockopt() calls on its own socket, made again on the kept connection
        (those replays_option lets through)."""
        pair = kept.family == socket.AF_UNIX
        for level, name, value in options:
            if replays_option(level, name, pair):
                procfs.setsockopt_quietly(kept, level, name, value)

    def restore_epoll(
        self, injection: Injection, fd: int, registrations: list[tuple[int, int, int]], base: int | None = None
    ) -> None:
        """The program's epoll registrations of ``fd`` (dropped by the dup3) made again, by
        injected epoll_ctl() calls; ``base``: room in the program for the event (else scratch)."""
        base = injection.scratch_area() + 2048 if base is None else base
        for epfd, events, data in registrations:
            self.tracer.write(injection.tid, base, struct.pack("<IQ", events, data))
            if injection.call("epoll_ctl", epfd, EPOLL_CTL_ADD, fd, base) == -errno.EEXIST:
                injection.call("epoll_ctl", epfd, EPOLL_CTL_MOD, fd, base)

    # ------------------------------------------------------------ life

    def on_exec(self, pid: int) -> None:
        """A new program in process ``pid``: our pidfd in the old one is gone."""
        self.transfer.forget(pid)

    def close(self) -> None:
        for pidfd in self._pidfds.values():
            os.close(pidfd)
        self._pidfds.clear()
        self.transfer.close()
        self.keeper.close()


def replays_option(level: int, name: int, pair: bool) -> bool:
    """Whether an option the program set on its socket is set again on the kept connection: all
    but NOT_REPLAYED, and no TCP option on a socketpair end (``pair``: TLS, the keeper relays).
    Python twin of helpers/shim/replay.c (handoff_replays_option)."""
    return (level, name) not in NOT_REPLAYED and not (pair and level == socket.IPPROTO_TCP)


def is_tcp_socket(sock: socket.socket) -> bool:
    """An AF_INET/6 SOCK_STREAM socket (not, e.g., sipp's UDP probe for its own address)."""
    return sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
