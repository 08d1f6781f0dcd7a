"""The client role of a traced run (-t t1/l1): the kept connection handed over at connect().

Until then it notes what the program does to its sockets: each setsockopt() (replayed onto
the kept connection) and each bind() (the run's identity, as the shim reports it). At the
program's connect() of a TCP socket to the SuT it leases the kept connection, puts it in the
place of the program's socket as the program had set it up (options, O_NONBLOCK, epoll
registrations, the seccomp protection), makes connect() return 0, and is done: one handoff
per run, whatever happens next.
"""

from __future__ import annotations

import errno
import os
import socket

from fdkeeper.address import Address, format_address
from fdkeeper.modes.ptrace import procfs
from fdkeeper.modes.ptrace.injection import Injection
from fdkeeper.modes.ptrace.raw import LOW, SYS
from fdkeeper.modes.ptrace.seccomp import install_protection
from fdkeeper.modes.ptrace.services import Services, is_tcp_socket
from fdkeeper.modes.ptrace.tracer import SyscallStop

MAX_OPTION = 128  # bytes of a setsockopt() value noted; a longer one is no option we replay


class ClientRole:
    """One handoff at the program's connect() to the SuT."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.done = False
        self.options: dict[tuple[int, int], list[tuple[int, int, bytes]]] = {}  # (tgid, fd) -> setsockopt calls
        # (tgid, fd) -> the address its last successful bind() asked for (port 0: an ephemeral one).
        # The run's identity is what the program binds (keeper/identity.py), as the shim reports it.
        self.binds: dict[tuple[int, int], Address] = {}

    def on_entry(self, stop: SyscallStop) -> None:
        nr, args = stop.nr, stop.args
        if nr == SYS["setsockopt"] and args[4] <= MAX_OPTION:
            key = (self.services.tgid(stop.tid), args[0] & LOW)
            value = self.services.tracer.read(stop.tid, args[3], args[4]) if args[4] else b""
            self.options.setdefault(key, []).append((args[1] & LOW, args[2] & LOW, value))
        elif nr == SYS["close"]:
            self._forget((self.services.tgid(stop.tid), args[0] & LOW))
        elif nr == SYS["connect"] and self.services.connects_to_sut(stop):
            self._connect(stop)

    def on_exit(self, stop: SyscallStop, nr: int, args: tuple[int, ...]) -> None:
        if nr == SYS["socket"] and stop.rval >= 0:
            self._forget((self.services.tgid(stop.tid), stop.rval))
        elif nr == SYS["bind"] and stop.rval == 0:
            self._note_bind(stop.tid, args)

    def on_exec(self, pid: int) -> None:
        pass  # what it notes is read at connect(), in the program of that moment

    def close(self) -> None:
        pass

    def _forget(self, key: tuple[int, int]) -> None:
        """A socket closed or a new one made under that number: what we noted is not its."""
        self.options.pop(key, None)
        self.binds.pop(key, None)

    def _note_bind(self, tid: int, args: tuple[int, ...]) -> None:
        """Remember what a successful bind() asked for (sipp 3.7 binds its client connection twice;
        the second, failing, one does not count), read before the program can reuse the memory."""
        tracer = self.services.tracer
        address = procfs.parse_sockaddr(tracer.read(tid, args[1], min(args[2], 128))) if args[1] else None
        if address is not None:
            self.binds[(self.services.tgid(tid), args[0] & LOW)] = address

    def _connect(self, stop: SyscallStop) -> None:
        services = self.services
        fd = stop.args[0] & LOW
        tgid = services.tgid(stop.tid)
        with services.copy(tgid, fd) as program_socket:
            if not is_tcp_socket(program_socket):
                return  # e.g. sipp's UDP probe for its own address
            self.done = True  # one handoff per run (t1), whatever happens next
            injection = Injection(services.tracer, stop.tid, at_entry=True)
            kept = services.client_lease(injection, tgid, local=self.binds.get((tgid, fd)) or "-")
            if kept is None:
                return
            try:
                self._hand_over(injection, tgid, fd, program_socket, kept.fds[0], kept.ids[0])
                injection.finish(0)
            except OSError as error:
                services.tell(f"fdkeeper: cannot hand the kept connection to process {tgid}: {error}")
                injection.finish(-(error.errno or errno.EIO))

    def _hand_over(
        self, injection: Injection, tgid: int, fd: int, program_socket: socket.socket, kept_fd: int, kept_id: int
    ) -> None:
        """Put the kept connection in the place of the program's socket ``fd``, as it had set it up."""
        services = self.services
        with socket.socket(fileno=kept_fd) as kept_socket:
            pair = kept_socket.family == socket.AF_UNIX
            procfs.match_nonblocking(kept_socket, program_socket)
            services.replay_options(kept_socket, self.options.get((tgid, fd), []))
            registrations = procfs.epoll_registrations(tgid, fd, os.fstat(program_socket.fileno()).st_ino)
            install_protection(injection, [fd], [fd] if pair else [])
            [new] = services.transfer.into(injection, tgid, [kept_fd])
            services.place(injection, new, fd)
            services.restore_epoll(injection, fd, registrations)
        assert services.request.remote is not None  # a client handoff happens only at connect() to it
        services.say(
            f"connect(fd {fd}) to {format_address(services.request.remote)}: handed over kept connection "
            f"{kept_id} by {services.transfer.how}{' (a socketpair end the keeper relays)' if pair else ''}"
        )
