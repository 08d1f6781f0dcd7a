"""Per-call client runs (-t tn/ln) of a traced program: one kept connection per user.

The program runs under the seccomp filter of ``seccomp.percall_filter`` (installed before its
exec) and the tracer stays attached for the whole run, but the program stops only at
connect(), epoll_ctl(EPOLL_CTL_ADD) and sendto() without an address: everything else runs at
full speed. What the shim does in helpers/percall.c,
from outside:

- connect() of a TCP socket to the SuT is skipped and returns 0 (the program's socket stays
  unconnected, as the shim's placeholder stands in for the connection); from then on that
  one thread stops at every syscall ("stepping") until its first send on the socket, which
  in sipp follows at once (call::connect_socket_if_needed, then the send);
- at that send the From AoR of the message is read from the program's buffer, the user's
  kept connection is leased, its epoll registrations re-added from outside and the thread sent into
  handoff_code's HANDOFF_CODE, which puts the connection in place of the socket and reruns
  the send, now on the kept connection: no stop after the send's own. The thread runs on
  untraced until its next connect(). (The first handoff of a process injects the calls one
  by one and maps that code.)
- sipp wrote the placeholder's port ([local_port], read after its bind()) into Via and
  Contact; the kept connection's address replaces it in sipp's own buffer, at the first send
  and at each later sendto() stop on the fd (viarewrite.py), same length only, before the
  kernel takes a byte: a tail sipp resends is its copy of rewritten bytes. The first send
  reruns with MSG_NOSIGNAL (sipp ignores SIGPIPE), which the filter lets by: stops per call
  are 4, plus one per later message of the call.

The epoll registrations to re-add are the ones the program made: the filter also stops at
epoll_ctl(EPOLL_CTL_ADD) (sipp adds a call socket right before its connect), and while a
thread steps its EPOLL_CTL_MOD/DEL calls on a pending socket are seen too. Only a socket
whose registration was not seen that way (another program's habits) is looked up in
/proc/PID/fdinfo, which lists every registration of the epoll set and costs milliseconds
with a thousand users.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import sys
from typing import TYPE_CHECKING

from fdkeeper.address import parse_address
from fdkeeper.modes.ptrace import procfs
from fdkeeper.modes.ptrace.epoll import EPOLL_CTL_ADD, EPOLL_CTL_MOD, Registrations, add_from_outside
from fdkeeper.modes.ptrace.handoff_code import HandoffCode
from fdkeeper.modes.ptrace.injection import SYS, Injection, SyscallStop, pt, unsigned
from fdkeeper.modes.ptrace.permission import status_field
from fdkeeper.modes.ptrace.seccomp import MSG_NOSIGNAL
from fdkeeper.modes.ptrace.viarewrite import Rewrite, rewrite_for

if TYPE_CHECKING:
    from fdkeeper.modes.ptrace.session import Session

SOCK_CLOEXEC = 0o2000000
MAX_LOOK = 64 * 1024  # bytes of a send looked at for the From header (as the shim)
SENDS = (SYS["sendto"], SYS["write"], SYS["sendmsg"], SYS["writev"])
MAX_IOV = 64
LOW = 0xFFFFFFFF  # an int argument is the low half of its register
SIGPIPE_BIT = 1 << 12  # SIGPIPE (13) in /proc/PID/status SigIgn


class PerCallClient:
    """Faked connect()s and first sends of one traced program."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.pending: dict[tuple[int, int], int] = {}  # (tgid, fd) -> inode of the program's own socket
        self.waiting: dict[int, set[int]] = {}  # tid -> its pending fds (the tid is stepping)
        self.epolls: dict[int, list[int]] = {}  # tgid -> its epoll fds (found once, not per call)
        self.registrations = Registrations()
        self.code = HandoffCode(session.tracer)  # the handoff as code in the program, after its first
        self.handoffs = 0
        # (tgid, fd) -> the kept connection's address in place of the placeholder's in what fd sends
        self.rewrites: dict[tuple[int, int], Rewrite] = {}
        self.ignores_sigpipe: dict[int, bool] = {}  # tgid -> whether MSG_NOSIGNAL changes nothing for it
        self.rewritten = 0  # messages written to with the kept connection's address
        self.warned_length = False

    def on_entry(self, stop: SyscallStop) -> None:
        if stop.seccomp:
            if stop.nr == SYS["connect"]:
                self._on_connect(stop)
            elif stop.nr == SYS["epoll_ctl"]:
                self._on_epoll_add(stop)
            elif stop.nr == SYS["sendto"]:
                self._on_send(stop)
            return
        fds = self.waiting.get(stop.tid)
        done = self._on_stepping_entry(stop, fds) if fds else False
        if stop.emulated and not done:
            self.session.tracer.rerun(stop.tid)  # a call of the program's own: it runs

    def _on_stepping_entry(self, stop: SyscallStop, fds: set[int]) -> bool:
        """A stepping thread at a syscall's entry; True when the call was dealt with here (not
        to run as the program made it, if emulated)."""
        fd = stop.args[0] & LOW
        if stop.nr == SYS["epoll_ctl"] and stop.args[2] & LOW in fds and stop.args[1] & LOW != EPOLL_CTL_ADD:
            self._on_epoll_change(stop)
        elif fd not in fds:
            return False
        elif stop.nr in SENDS:
            self._first_send(stop, fd)
            return True
        elif stop.nr == SYS["fcntl"] and stop.emulated and stop.args[1] & LOW in (fcntl.F_GETFL, fcntl.F_SETFL):
            self._fcntl(stop, fd)
            return True
        elif stop.nr == SYS["close"]:
            self._forget(stop.tid, fd)
        return False

    def _fcntl(self, stop: SyscallStop, fd: int) -> None:
        """sipp's F_SETFL between connect() and the first send, done on our copy of the socket
        (file status flags belong to the open file, which we share): one stop, not two."""
        try:
            with self.session.copy(self.session.tgid(stop.tid), fd) as copy:
                result = fcntl.fcntl(copy.fileno(), stop.args[1] & LOW, stop.args[2] & LOW)
        except OSError as error:
            result = -(error.errno or errno.EBADF)
        self._skip(stop.tid, result)

    # ------------------------------------------------------------ epoll_ctl()

    def _on_epoll_add(self, stop: SyscallStop) -> None:
        """At a seccomp stop of EPOLL_CTL_ADD: note the registration of a socket."""
        session = self.session
        epfd, fd, event_at = stop.args[0] & LOW, stop.args[2] & LOW, stop.args[3]
        tgid = session.tgid(stop.tid)
        ino = session.socket_inode(tgid, fd)
        if ino is None or not event_at:
            return  # not a socket (or no event): none we will hand over
        try:
            events, data = struct.unpack("<IQ", session.tracer.read(stop.tid, event_at, 12))
        except OSError:
            return  # a bad pointer: the call fails with EFAULT by itself
        self.registrations.added((tgid, fd), ino, epfd, events, data)

    def _on_epoll_change(self, stop: SyscallStop) -> None:
        """At a stepping thread's entry to EPOLL_CTL_MOD/DEL of one of its pending sockets."""
        session = self.session
        epfd, op, fd, event_at = stop.args[0] & LOW, stop.args[1] & LOW, stop.args[2] & LOW, stop.args[3]
        events = data = 0
        if op == EPOLL_CTL_MOD:
            try:
                events, data = struct.unpack("<IQ", session.tracer.read(stop.tid, event_at, 12))
            except OSError:
                return
        self.registrations.changed((session.tgid(stop.tid), fd), op, epfd, events, data)

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
        self.rewrites.pop((tgid, fd), None)  # a new socket on that number
        with session.copy(tgid, fd) as program_socket:
            if (
                program_socket.family not in (socket.AF_INET, socket.AF_INET6)
                or program_socket.type != socket.SOCK_STREAM
            ):
                return  # e.g. sipp's UDP probe for its own address
            self.pending[(tgid, fd)] = os.fstat(program_socket.fileno()).st_ino
        self.waiting.setdefault(stop.tid, set()).add(fd)
        session.tracer.stepping.add(stop.tid)
        # Emulating: its next calls stop at their entry only (sipp's are fcntl(F_SETFL), done
        # here, and the send), not at entry and exit.
        session.tracer.emulating.add(stop.tid)
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
            self.session.tracer.emulating.discard(tid)
        return self.pending.pop((self.session.tgid(tid), fd), None)

    # ------------------------------------------------------------ the first send

    def _first_send(self, stop: SyscallStop, fd: int) -> None:
        session, tid = self.session, stop.tid
        tgid = session.tgid(tid)
        message = self._message(stop)
        ino = self._forget(tid, fd)
        if self.code.check_previous(tgid, tid) == -errno.EBADF:
            session.transfer.forget(tgid)  # the program closed our pidfd: open another, call by call
        # At an emulated stop the send is skipped already: injections start from its "exit".
        injection = Injection(session.tracer, tid, at_entry=not stop.emulated)
        aor = from_aor(message)
        if aor is None:
            print(
                f"fdkeeper: send(fd {fd}) to the SuT: the first message on a per-call connection has no From "
                "header (is it SIP?); each connection is leased for the user (AoR) in the From header of "
                "the first SIP message sent on it",
                file=sys.stderr,
                flush=True,
            )
            injection.finish(-errno.ECONNREFUSED)
            return
        kept = session.client_lease(injection, tgid, local="-", aor=aor)  # the user is the identity
        if kept is None:
            return
        by_code = tid not in session.tracer.stepping  # the code's own calls must not stop, nor be emulated
        no_stop = self._rewrite_first(stop, tgid, fd, kept.fds[0], kept.locals[0] if kept.locals else "")
        if no_stop:  # the rerun send is not seen again: the filter lets MSG_NOSIGNAL sends by
            injection.saved.r10 |= MSG_NOSIGNAL
        try:
            epoll = self._hand_over(injection, tgid, fd, ino, kept.fds[0], by_code)
        except OSError as error:
            print(
                f"fdkeeper: cannot hand {aor}'s kept connection to process {tgid}: {error}", file=sys.stderr, flush=True
            )
            injection.finish(-(error.errno or errno.EIO))
            return
        self.handoffs += 1
        session.say(f"send(fd {fd}): handed over {aor}'s kept connection {kept.ids[0]} ({epoll})")
        if not injection.left:
            # The send again, on the kept connection: at the resume that follows (untraced, as
            # the thread no longer steps), from the stop our last injected call left it in.
            injection.finish_rerun(stop_at_entry=False)
            session.tracer.run_again(tid)

    # ------------------------------------------------------------ the kept connection's address

    def _rewrite_first(self, stop: SyscallStop, tgid: int, fd: int, kept_fd: int, kept_local: str) -> bool:
        """At the first send, with the user's connection leased: note what fd's sends are to
        name (the placeholder's address is the program's socket's, still on fd) and rewrite
        this first message; True when the send may rerun with MSG_NOSIGNAL, unseen."""
        key = (tgid, fd)
        self.rewrites.pop(key, None)
        try:
            with self.session.copy(tgid, fd) as program_socket:
                placeholder = program_socket.getsockname()
            kept = parse_address(kept_local) if kept_local not in ("", "-") else None
            if kept is None:
                with socket.socket(fileno=os.dup(kept_fd)) as kept_socket:
                    kept = kept_socket.getsockname()[:2]
        except (OSError, ValueError):
            return False
        if not isinstance(placeholder, tuple) or not isinstance(kept, tuple) or placeholder[1] == kept[1]:
            return False
        rewrite = rewrite_for(placeholder, kept)
        if rewrite is None:
            self._warn_length(placeholder, kept)
            return False
        self.rewrites[key] = rewrite
        if stop.nr != SYS["sendto"] or stop.args[4]:
            return False  # only sendto() without an address is seen again (the filter)
        self._rewrite_buffer(stop.tid, stop.args[1], stop.args[2], rewrite)
        return self._ignores_sigpipe(tgid)

    def _on_send(self, stop: SyscallStop) -> None:
        """At a seccomp stop of sendto() without an address: a kept per-call fd's message names
        the kept connection, not the placeholder; any other send goes on as it is."""
        rewrite = self.rewrites.get((self.session.tgid(stop.tid), stop.args[0] & LOW))
        if rewrite is not None:
            self._rewrite_buffer(stop.tid, stop.args[1], stop.args[2], rewrite)

    def _rewrite_buffer(self, tid: int, buf: int, size: int, rewrite: Rewrite) -> None:
        """The placeholder's address replaced in the program's own buffer, before the kernel
        takes any of it (a tail the program sends again is then its copy of rewritten bytes)."""
        if not buf or not size:
            return
        try:
            message = self.session.tracer.read(tid, buf, min(size, MAX_LOOK))
            offsets = rewrite.offsets(message)
            for at in offsets:
                self.session.tracer.write(tid, buf + at, rewrite.new)
        except OSError:
            return  # a bad pointer: the send fails with EFAULT by itself
        self.rewritten += bool(offsets)

    def _ignores_sigpipe(self, tgid: int) -> bool:
        if tgid not in self.ignores_sigpipe:
            ignored = status_field("SigIgn", tgid)
            self.ignores_sigpipe[tgid] = bool(ignored) and bool(int(ignored, 16) & SIGPIPE_BIT)
        return self.ignores_sigpipe[tgid]

    def _warn_length(self, placeholder: tuple, kept: tuple) -> None:
        if not self.warned_length:
            self.warned_length = True
            print(
                f"fdkeeper: the kept connection's address {kept[0]}:{kept[1]} and the per-call socket's port "
                f"{placeholder[1]} differ in length; messages keep the per-call socket's port (a SuT that "
                "aliases Via ports to connections sees a new one per call)",
                file=sys.stderr,
                flush=True,
            )

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

    def _hand_over(self, injection: Injection, tgid: int, fd: int, ino: int | None, kept_fd: int, by_code: bool) -> str:
        """Put the kept connection on ``fd``; how, and how its epoll registrations were restored."""
        session = self.session
        with socket.socket(fileno=kept_fd) as kept_socket, session.copy(tgid, fd) as program_socket:
            if ino is not None and os.fstat(program_socket.fileno()).st_ino != ino:
                raise OSError(errno.EBADF, f"fd {fd} is no longer the socket the program connected")
            procfs.match_nonblocking(kept_socket, program_socket)
            registrations, found = self._registrations(tgid, fd, os.fstat(program_socket.fileno()).st_ino)
            pidfd = session.transfer.pidfd_in_program(tgid)
            # By code (HANDOFF_CODE), the registrations first: made from outside on the kept
            # connection under the number ``fd``, they are the ones the program's fd will have
            # once the code's dup3 ran (epoll keys on file and number, not on whose table).
            if (
                by_code
                and pidfd is not None
                and self.code.usable(injection.tid, tgid, pidfd)
                and add_from_outside(session.pidfd(tgid), fd, kept_fd, registrations)
                and self.code.start(injection, tgid, pidfd, kept_fd, fd)
            ):
                return f"in one stop; {len(registrations)} epoll registration(s) {found}, re-added from outside"
            new = session.transfer.one_into(injection, tgid, kept_fd)
            injection.check("dup3", new, fd, SOCK_CLOEXEC)
            injection.call("close", new)
            if session.transfer.pidfd_in_program(tgid) is not None:  # by SCM_RIGHTS only, the code cannot help
                self.code.place(injection, tgid)
            if add_from_outside(session.pidfd(tgid), fd, kept_fd, registrations):
                return f"call by call; {len(registrations)} epoll registration(s) {found}, re-added from outside"
            session.restore_epoll(injection, fd, registrations, injection.stack_area())
            return f"call by call; {len(registrations)} epoll registration(s) {found}, re-added by injection"

    def _registrations(self, tgid: int, fd: int, ino: int) -> tuple[list[tuple[int, int, int]], str]:
        """sipp adds a call socket to its epoll set before connect(): that registration, and
        where it was found (as noted at epoll_ctl, else from /proc)."""
        known = self.registrations.of((tgid, fd), ino)
        if known is not None:
            return known, "noted at epoll_ctl"
        if tgid in self.epolls:
            found = procfs.epoll_registrations(tgid, fd, ino, self.epolls[tgid])
            if found:
                return found, "read from /proc fdinfo"
        self.epolls[tgid] = procfs.epoll_fds(tgid)
        return procfs.epoll_registrations(tgid, fd, ino, self.epolls[tgid]), "read from /proc fdinfo"


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
