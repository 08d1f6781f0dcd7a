"""Per-call client runs (-t tn/ln) of a traced program: one kept connection per user.

The program runs under the seccomp filter of ``seccomp.percall_filter`` (installed before its
exec) and the tracer stays attached for the whole run, but the program stops only at
connect(): everything else runs at full speed. What the shim does in helpers/percall.c,
from outside:

- connect() of a TCP socket to the SuT is skipped and returns 0 (the program's socket stays
  unconnected, as the shim's placeholder stands in for the connection); from then on that
  one thread stops at every syscall ("stepping") until its first send on the socket, which
  in sipp follows at once (call::connect_socket_if_needed, then the send);
- at that send the From AoR of the message is read from the program's buffer, the user's
  kept connection is leased, put in place of the socket (dup3, epoll registrations
  re-added) and the send runs again, now on the kept connection; the thread runs on
  untraced until its next connect().
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
from typing import TYPE_CHECKING

from fdkeeper.modes.ptrace import procfs
from fdkeeper.modes.ptrace.injection import SYS, Injection, SyscallStop, pt, unsigned

if TYPE_CHECKING:
    from fdkeeper.modes.ptrace.session import Session

SOCK_CLOEXEC = 0o2000000
MAX_LOOK = 64 * 1024  # bytes of a send looked at for the From header (as the shim)
SENDS = (SYS["sendto"], SYS["write"], SYS["sendmsg"], SYS["writev"])
MAX_IOV = 64


class PerCallClient:
    """Faked connect()s and first sends of one traced program."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.pending: dict[tuple[int, int], int] = {}  # (tgid, fd) -> inode of the program's own socket
        self.waiting: dict[int, set[int]] = {}  # tid -> its pending fds (the tid is stepping)
        self.epolls: dict[int, list[int]] = {}  # tgid -> its epoll fds (found once, not per call)

    def on_entry(self, stop: SyscallStop) -> None:
        if stop.seccomp:
            if stop.nr == SYS["connect"]:
                self._on_connect(stop)
            return
        fds = self.waiting.get(stop.tid)
        fd = stop.args[0] & 0xFFFFFFFF
        if not fds or fd not in fds:
            return
        if stop.nr in SENDS:
            self._first_send(stop, fd)
        elif stop.nr == SYS["close"]:
            self._forget(stop.tid, fd)

    # ------------------------------------------------------------ connect()

    def _on_connect(self, stop: SyscallStop) -> None:
        session = self.session
        fd, address, length = stop.args[0] & 0xFFFFFFFF, stop.args[1], stop.args[2]
        target = procfs.parse_sockaddr(session.tracer.read(stop.tid, address, min(length, 128))) if address else None
        if target is None or target != session.remote:
            return
        tgid = session.tgid(stop.tid)
        if (tgid, fd) in self.pending:
            self._skip(stop.tid, -errno.EISCONN)  # "connected" already, as far as the program knows
            return
        with session.copy(tgid, fd) as program_socket:
            if program_socket.family not in (socket.AF_INET, socket.AF_INET6) or program_socket.type != socket.SOCK_STREAM:
                return  # e.g. sipp's UDP probe for its own address
            self.pending[(tgid, fd)] = os.fstat(program_socket.fileno()).st_ino
        self.waiting.setdefault(stop.tid, set()).add(fd)
        session.tracer.stepping.add(stop.tid)
        self._skip(stop.tid, 0)
        session.say(f"connect(fd {fd}): per-call connection, leased at its first send")

    @staticmethod
    def _skip(tid: int, result: int) -> None:
        """At a seccomp stop: the call does not run and returns ``result``."""
        regs = pt.ptrace_getregs(tid)
        regs.orig_rax, regs.rax = unsigned(-1), unsigned(result)
        pt.ptrace_setregs(tid, regs)

    def _forget(self, tid: int, fd: int) -> int | None:
        fds = self.waiting.get(tid, set())
        fds.discard(fd)
        if not fds:
            self.waiting.pop(tid, None)
            self.session.tracer.stepping.discard(tid)
        return self.pending.pop((self.session.tgid(tid), fd), None)

    # ------------------------------------------------------------ the first send

    def _first_send(self, stop: SyscallStop, fd: int) -> None:
        session, tid = self.session, stop.tid
        tgid = session.tgid(tid)
        message = self._message(stop)
        ino = self._forget(tid, fd)
        injection = Injection(session.tracer, tid, at_entry=True)
        aor = from_aor(message)
        if aor is None:
            print(f"fdkeeper: send(fd {fd}) to the SuT: the first message on a per-call connection has no From "
                  "header (is it SIP?); each connection is leased for the user (AoR) in the From header of "
                  "the first SIP message sent on it", file=sys.stderr, flush=True)
            injection.finish(-errno.ECONNREFUSED)
            return
        kept = session.client_lease(injection, tgid, local="-", aor=aor)  # the user is the identity
        if kept is None:
            return
        try:
            self._hand_over(injection, tgid, fd, ino, kept.fds[0])
        except OSError as error:
            print(f"fdkeeper: cannot hand {aor}'s kept connection to process {tgid}: {error}", file=sys.stderr, flush=True)
            injection.finish(-(error.errno or errno.EIO))
            return
        session.say(f"send(fd {fd}): handed over {aor}'s kept connection {kept.ids[0]}")
        # The send again, on the kept connection: at the resume that follows (untraced, as the
        # thread no longer steps), from the exit stop of our last injected call.
        injection.finish_rerun(stop_at_entry=False)

    def _message(self, stop: SyscallStop) -> bytes:
        """The first bytes the program sends (the buffer, or its iovecs flattened)."""
        read, (_, buf, size) = self.session.tracer.read, stop.args[:3]
        tid = stop.tid
        if stop.nr in (SYS["sendto"], SYS["write"]):
            return read(tid, buf, min(size, MAX_LOOK)) if buf and size else b""
        if stop.nr == SYS["sendmsg"]:  # struct msghdr: iov at 16, iovlen at 24
            buf, size = struct.unpack("<QQ", read(tid, buf + 16, 16))
        data = b""
        vectors = read(tid, buf, 16 * min(size, MAX_IOV)) if buf else b""
        for base, length in struct.iter_unpack("<QQ", vectors):
            if len(data) >= MAX_LOOK:
                break
            data += read(tid, base, min(length, MAX_LOOK - len(data))) if length else b""
        return data

    def _hand_over(self, injection: Injection, tgid: int, fd: int, ino: int | None, kept_fd: int) -> None:
        session = self.session
        with socket.socket(fileno=kept_fd) as kept_socket, session.copy(tgid, fd) as program_socket:
            if ino is not None and os.fstat(program_socket.fileno()).st_ino != ino:
                raise OSError(errno.EBADF, f"fd {fd} is no longer the socket the program connected")
            procfs.match_nonblocking(kept_socket, program_socket)
            registrations = self._registrations(tgid, fd, os.fstat(program_socket.fileno()).st_ino)
            new = session.transfer.one_into(injection, tgid, kept_fd)
            injection.check("dup3", new, fd, SOCK_CLOEXEC)
            injection.call("close", new)
            session.restore_epoll(injection, fd, registrations, injection.stack_area())

    def _registrations(self, tgid: int, fd: int, ino: int) -> list[tuple[int, int, int]]:
        """sipp adds a call socket to its epoll set before connect(): find that registration."""
        if tgid in self.epolls:
            found = procfs.epoll_registrations(tgid, fd, ino, self.epolls[tgid])
            if found:
                return found
        self.epolls[tgid] = procfs.epoll_fds(tgid)
        return procfs.epoll_registrations(tgid, fd, ino, self.epolls[tgid])


def from_aor(message: bytes) -> str | None:
    """The URI of the From header (or f) of a SIP message, without parameters: its AoR.

    Python twin of helpers/aor.c (shim_from_aor), so both modes lease by the same key.
    """
    head = message.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    for line in head.split(b"\n")[1:]:
        line = line.rstrip(b"\r")
        name, colon, value = line.partition(b":")
        if not colon or line[:1] in (b" ", b"\t") or name.strip().lower() not in (b"from", b"f"):
            continue
        uri = _from_uri(value)
        return uri.decode("latin-1") if uri else None
    return None


def _from_uri(value: bytes) -> bytes | None:
    quoted, at = False, 0
    while at < len(value):
        char = value[at : at + 1]
        if quoted and char == b"\\":
            at += 1
        elif char == b'"':
            quoted = not quoted
        elif not quoted and char == b"<":
            end = value.find(b">", at + 1)
            if end < 0:
                return None
            value = value[at + 1 : end]
            break
        at += 1
    else:
        value = value.split(b";", 1)[0]  # addr-spec form: header parameters follow ';'
    value = value.strip(b" \t")
    user_end = value.find(b"@")
    tail = value[max(user_end, 0) :]
    cut = min((i for i in (tail.find(b";"), tail.find(b"?")) if i >= 0), default=len(tail))
    uri = value[: max(user_end, 0) + cut].rstrip(b" \t")
    return uri or None
