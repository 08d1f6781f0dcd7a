"""Per-call client runs (-t tn/ln) of a traced program: one kept connection per user.

The program runs under the seccomp filter of ``seccomp.percall_filter`` (installed before its
exec) and the tracer stays attached for the whole run, but the program stops only at
connect(), epoll_ctl(EPOLL_CTL_ADD) and sendto() without an address (and at an exec, where the
send stub's count of rewritten messages is read before the exec takes it): everything else
runs at full speed. What the shim does in helpers/shim/percall.c,
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
- once a process's first send was a plain send() (sendto without an address or
  MSG_NOSIGNAL: sipp -t tn's), its threads no longer step after a faked connect(): the
  filter stops that send anyway, and the handoff is made there (no stop at sipp's fcntl, none
  at the send's exit). A pending socket closed unsent is told from a new one by its inode.
- sipp wrote the placeholder's port ([local_port], read after its bind()) into Via and
  Contact; the kept connection's address replaces it in sipp's own buffer, at the first send
  (rewrites.py), same length only, before the kernel takes a byte: a tail sipp resends is its
  copy of rewritten bytes. The first send reruns with MSG_NOSIGNAL (sipp ignores SIGPIPE),
  which the filter lets by. Later sends on the fd are rewritten by the program itself: the
  send wrapper its first send went through is patched into a stub mapped at the process's
  first handoff (sendstub.py), which also adds MSG_NOSIGNAL, so the filter lets them by.
  Where the stub cannot be placed, each later sendto() without an address stops and is
  rewritten by the tracer, as before.
- in such a process the connect() wrapper of the connect seen before its first handoff is
  patched too (sendstub.py): the stub answers a TCP socket's connect to the SuT with 0 by
  itself and notes the socket as pending in its table, where the first send's stop finds it
  (``SendStubs.pending``). So is the epoll_ctl() wrapper of its EPOLL_CTL_ADD: the stub
  notes the registration in its table (``SendStubs.registration``) and makes the call so that
  the filter lets it by. Stops per call for sipp -t tn: 1 (the first send), whatever the
  number of messages; one more for each of connect() and epoll_ctl() whose wrapper cannot
  be patched.

The epoll registrations to re-add are the ones the program made: the filter also stops at
epoll_ctl(EPOLL_CTL_ADD) (sipp adds a call socket right before its connect), and while a
thread steps its EPOLL_CTL_MOD/DEL calls on a pending socket are seen too. Only a socket
whose registration was not seen that way (another program's habits) is looked up in
/proc/PID/fdinfo, which lists every registration of the epoll set and costs milliseconds
with a thousand users.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import struct

from fdkeeper.modes.ptrace import procfs
from fdkeeper.modes.ptrace import raw as pt
from fdkeeper.modes.ptrace.aor import from_aor
from fdkeeper.modes.ptrace.epoll import EPOLL_CTL_ADD, EPOLL_CTL_MOD, Registrations, add_from_outside
from fdkeeper.modes.ptrace.handoff_code import HandoffCode
from fdkeeper.modes.ptrace.injection import Injection
from fdkeeper.modes.ptrace.raw import LOW, SYS, unsigned
from fdkeeper.modes.ptrace.rewrites import MAX_LOOK, ViaRewrites
from fdkeeper.modes.ptrace.seccomp import MSG_NOSIGNAL
from fdkeeper.modes.ptrace.sendstub import MAX_SUT_ADDRESS, SendStubs
from fdkeeper.modes.ptrace.services import Services, is_tcp_socket
from fdkeeper.modes.ptrace.tracer import SyscallStop

SENDS = (SYS["sendto"], SYS["write"], SYS["sendmsg"], SYS["writev"])
EXECS = (SYS["execve"], SYS["execveat"])
MAX_IOV = 64
SYSCALL_SIZE = 2  # the `syscall` instruction: a seccomp stop's rip is past it


class PerCallRole:
    """Faked connect()s and first sends of one traced program (never done: attached for the run)."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.done = False
        self.pending: dict[tuple[int, int], int] = {}  # (tgid, fd) -> inode of the program's own socket
        self.waiting: dict[int, set[int]] = {}  # tid -> its pending fds (the tid is stepping)
        self.epolls: dict[int, list[int]] = {}  # tgid -> its epoll fds (found once, not per call)
        self.registrations = Registrations()
        self.code = HandoffCode(services.tracer)  # the handoff as code in the program, after its first
        self.handoffs = 0
        self.rewrites = ViaRewrites(services)
        self.stubs = SendStubs(services.tracer)  # the rewrite of later sends, in the program
        services.tracer.on_exit = self._on_thread_exit
        # Processes whose first sends were plain send()s (sendto without an address or
        # MSG_NOSIGNAL), which the filter stops at anyway: their threads need not step from
        # connect() to the send (no stop at sipp's fcntl, none at the send's exit).
        self.sends_seen_by_filter: set[int] = set()
        self.lease_owner = 0  # the process whose per-user leases fdkeeper holds itself (see _first_send)
        # tgid -> (the `syscall` of its connect() to the SuT, the sockaddr's bytes), until its
        # connect wrapper's one try at a patch (_later_sends_by_stub); None after it, till exec
        self.connect_sites: dict[int, tuple[int, bytes] | None] = {}
        # tgid -> the `syscall` of its epoll_ctl(ADD), until its one try; 0 after it, till exec
        self.epoll_sites: dict[int, int] = {}

    def on_entry(self, stop: SyscallStop) -> None:
        if stop.seccomp:
            if stop.nr == SYS["connect"]:
                self._on_connect(stop)
            elif stop.nr == SYS["epoll_ctl"]:
                self._on_epoll_add(stop)
            elif stop.nr == SYS["sendto"] and not self._first_send_seen_by_filter(stop):
                self.rewrites.on_send(stop)
            elif stop.nr in EXECS:  # the last moment the stub's count is there to read
                self.stubs.count(stop.tid, self.services.tgid(stop.tid))
            return
        fds = self.waiting.get(stop.tid)
        done = self._on_stepping_entry(stop, fds) if fds else False
        if stop.emulated and not done:
            self.services.tracer.rerun(stop.tid)  # a call of the program's own: it runs

    def on_exit(self, stop: SyscallStop, nr: int, args: tuple[int, ...]) -> None:
        pass  # a stepping thread's exits (its program's own calls, run): nothing to do there

    def on_exec(self, pid: int) -> None:
        self.code.forget(pid)
        self.stubs.forget(pid)
        self.sends_seen_by_filter.discard(pid)  # another program: how it sends is to be seen again
        self.connect_sites.pop(pid, None)
        self.epoll_sites.pop(pid, None)
        self.registrations.forget_process(pid)

    def _on_thread_exit(self, tid: int) -> None:
        """A thread about to exit: what its process's stub rewrote, while its memory is there."""
        self.stubs.count(tid, self.services.tgid(tid))

    def close(self) -> None:
        rewritten = self.rewrites.rewritten + self.stubs.rewritten()
        self.services.say(
            f"{self.services.tracer.stops} ptrace stops for {self.handoffs} per-call handoff(s); "
            f"{rewritten} message(s) given the kept connection's address"
        )
        self.code.close()

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

    def _first_send_seen_by_filter(self, stop: SyscallStop) -> bool:
        """At a seccomp stop of a plain send(): the first send on a pending socket that no
        thread steps for is handed over here; True when it was (or failed as the call's own)."""
        fd, tgid = stop.args[0] & LOW, self.services.tgid(stop.tid)
        ino = self.pending.get((tgid, fd))
        by_stub = self.stubs.pending(stop.tid, tgid, fd)  # connected by the send stub's fdk_connect
        if not (ino or by_stub) or fd in self.waiting.get(stop.tid, ()):
            return False
        try:
            program_socket = self.services.copy(tgid, fd)
        except OSError:
            self.pending.pop((tgid, fd), None)  # closed unsent
            return False
        # One copy of the program's socket for the whole stop (checked here, then the handoff's
        # flags, epoll registrations and Via rewrite): pidfd_getfd is a syscall and a descriptor.
        with program_socket:
            info = os.fstat(program_socket.fileno())
            if not stat.S_ISSOCK(info.st_mode) or info.st_ino not in (ino, by_stub):
                self.pending.pop((tgid, fd), None)  # closed unsent; the number names another socket now
                return False
            self.pending[(tgid, fd)] = info.st_ino
            self._first_send(stop, fd, program_socket)
        return True

    def _fcntl(self, stop: SyscallStop, fd: int) -> None:
        """sipp's F_SETFL between connect() and the first send, done on our copy of the socket
        (file status flags belong to the open file, which we share): one stop, not two."""
        try:
            with self.services.copy(self.services.tgid(stop.tid), fd) as copy:
                result = fcntl.fcntl(copy.fileno(), stop.args[1] & LOW, stop.args[2] & LOW)
        except OSError as error:
            result = -(error.errno or errno.EBADF)
        self._skip(stop.tid, result)

    # ------------------------------------------------------------ epoll_ctl()

    def _on_epoll_add(self, stop: SyscallStop) -> None:
        """At a seccomp stop of EPOLL_CTL_ADD: note the registration of a socket."""
        services = self.services
        epfd, fd, event_at = stop.args[0] & LOW, stop.args[2] & LOW, stop.args[3]
        tgid = services.tgid(stop.tid)
        ino = services.socket_inode(tgid, fd)
        if ino is None or not event_at:
            return  # not a socket (or no event): none we will hand over
        try:
            events, data = struct.unpack("<IQ", services.tracer.read(stop.tid, event_at, 12))
        except OSError:
            return  # a bad pointer: the call fails with EFAULT by itself
        self.registrations.added((tgid, fd), ino, epfd, events, data)
        if tgid not in self.epoll_sites:
            self.epoll_sites[tgid] = int(pt.ptrace_getregs(stop.tid).rip) - SYSCALL_SIZE  # patched at a handoff

    def _on_epoll_change(self, stop: SyscallStop) -> None:
        """At a stepping thread's entry to EPOLL_CTL_MOD/DEL of one of its pending sockets."""
        services = self.services
        epfd, op, fd, event_at = stop.args[0] & LOW, stop.args[1] & LOW, stop.args[2] & LOW, stop.args[3]
        events = data = 0
        if op == EPOLL_CTL_MOD:
            try:
                events, data = struct.unpack("<IQ", services.tracer.read(stop.tid, event_at, 12))
            except OSError:
                return
        self.registrations.changed((services.tgid(stop.tid), fd), op, epfd, events, data)

    # ------------------------------------------------------------ connect()

    def _on_connect(self, stop: SyscallStop) -> None:
        services = self.services
        if not services.connects_to_sut(stop):
            return
        fd, tgid = stop.args[0] & LOW, services.tgid(stop.tid)
        with services.copy(tgid, fd) as program_socket:
            if not is_tcp_socket(program_socket):
                return  # e.g. sipp's UDP probe for its own address
            ino = os.fstat(program_socket.fileno()).st_ino
        if self.pending.get((tgid, fd)) == ino:
            self._skip(stop.tid, -errno.EISCONN)  # "connected" already, as far as the program knows
            return
        self.rewrites.forget((tgid, fd))  # a new socket on that number
        self.pending[(tgid, fd)] = ino
        if tgid not in self.sends_seen_by_filter:
            self.waiting.setdefault(stop.tid, set()).add(fd)
            services.tracer.stepping.add(stop.tid)
            # Emulating: its next calls stop at their entry only (sipp's are fcntl(F_SETFL), done
            # here, and the send), not at entry and exit.
            services.tracer.emulating.add(stop.tid)
        syscall_ip = self._skip(stop.tid, 0)
        if self.connect_sites.get(tgid, ()) is not None:  # not tried yet
            self._note_connect_site(stop, tgid, syscall_ip)
        if services.request.debug:
            services.say(f"connect(fd {fd}): per-call connection, leased at its first send")

    def _note_connect_site(self, stop: SyscallStop, tgid: int, syscall_ip: int) -> None:
        """Where the process's connect() to the SuT is made, and with which bytes: its wrapper
        is patched at the next handoff (_later_sends_by_stub)."""
        try:
            sut = self.services.tracer.read(stop.tid, stop.args[1], min(stop.args[2], MAX_SUT_ADDRESS + 1))
        except OSError:
            return
        self.connect_sites[tgid] = (syscall_ip, sut)

    @staticmethod
    def _skip(tid: int, result: int) -> int:
        """At a seccomp stop: the call does not run and returns ``result``; the address of the
        call's `syscall` instruction."""
        regs = pt.ptrace_getregs(tid)
        regs.orig_rax, regs.rax = unsigned(-1), unsigned(result)
        pt.ptrace_setregs(tid, regs)
        return int(regs.rip) - SYSCALL_SIZE

    def _forget(self, tid: int, fd: int) -> int | None:
        fds = self.waiting.get(tid, set())
        fds.discard(fd)
        if not fds:
            self.waiting.pop(tid, None)
            self.services.tracer.stepping.discard(tid)
            self.services.tracer.emulating.discard(tid)
        return self.pending.pop((self.services.tgid(tid), fd), None)

    # ------------------------------------------------------------ the first send

    def _first_send(self, stop: SyscallStop, fd: int, program_socket: socket.socket | None = None) -> None:
        """The handoff at the first send on a pending ``fd`` (``program_socket``: our copy of it,
        when the caller holds one already)."""
        services, tid = self.services, stop.tid
        tgid = services.tgid(tid)
        message = self._message(stop)
        ino = self._forget(tid, fd)
        if self.code.check_previous(tgid, tid) == -errno.EBADF:
            services.transfer.forget(tgid)  # the program closed our pidfd: open another, call by call
        # At an emulated stop the send is skipped already: injections start from its "exit".
        injection = Injection(services.tracer, tid, at_entry=not stop.emulated)
        aor = from_aor(message)
        if aor is None:
            services.tell(
                f"fdkeeper: send(fd {fd}) to the SuT: the first message on a per-call connection has no From "
                "header (is it SIP?); each connection is leased for the user (AoR) in the From header of "
                "the first SIP message sent on it"
            )
            injection.finish(-errno.ECONNREFUSED)
            return
        # The user is the identity. Held by fdkeeper, not for_pid= the program: the request is
        # then the same from run to run, so the keeper answers it by its repeat path (no parsing,
        # no pool), where one naming this run's pid never is one (1.8 -> 0.7 ms of sipp's wait
        # a call, at 300 calls/s on a busy machine). Only for the first process that hands over:
        # another one's leases name it, so that no user's connection is given to two at once.
        self.lease_owner = self.lease_owner or tgid
        for_program = tgid != self.lease_owner
        kept = services.client_lease(injection, tgid, for_program, local="-", aor=aor)
        if kept is None:
            return
        if stop.nr == SYS["sendto"] and not stop.args[4] and not stop.args[3] & MSG_NOSIGNAL:
            self.sends_seen_by_filter.add(tgid)  # its next first sends stop without stepping
        by_code = tid not in services.tracer.stepping  # the code's own calls must not stop, nor be emulated
        kept_local = kept.locals[0] if kept.locals else ""
        no_stop = self.rewrites.first(stop, tgid, fd, kept.fds[0], kept_local, program_socket, message)
        if no_stop:  # the rerun send is not seen again: the filter lets MSG_NOSIGNAL sends by
            injection.saved.r10 |= MSG_NOSIGNAL
        kept_inode = os.fstat(kept.fds[0]).st_ino
        try:
            epoll = self._hand_over(injection, tgid, fd, ino, kept.fds[0], by_code, program_socket)
        except OSError as error:
            services.tell(f"fdkeeper: cannot hand {aor}'s kept connection to process {tgid}: {error}")
            injection.finish(-(error.errno or errno.EIO))
            return
        self.handoffs += 1
        if services.request.debug:  # not even the line's formatting per call otherwise
            services.say(f"send(fd {fd}): handed over {aor}'s kept connection {kept.ids[0]} ({epoll})")
        if stop.nr == SYS["sendto"]:
            self._later_sends_by_stub(injection, tgid, fd, kept_inode)
        if not injection.left:
            # The send again, on the kept connection: at the resume that follows (untraced, as
            # the thread no longer steps), from the stop our last injected call left it in.
            injection.finish_rerun(stop_at_entry=False)
            services.tracer.run_again(tid)

    def _later_sends_by_stub(self, injection: Injection, tgid: int, fd: int, kept_inode: int) -> None:
        """The fd's later sends rewritten by the program itself (sendstub.py), with no stop:
        the stub mapped at the process's first handoff (the one made call by call), the send
        wrapper just used patched to reach it, and the fd's rewrite noted in its table."""
        if not injection.left:
            try:
                self.stubs.place(injection, tgid, nosignal=self.rewrites.sigpipe_ignored(tgid))
            except OSError as error:
                self.services.say(f"no send stub in process {tgid} ({error}): a stop per later message")
                return
        rewrite = self.rewrites.rewrites.get((tgid, fd))
        if rewrite is not None and self.stubs.patch(injection.tid, tgid, injection.syscall_ip):
            self.stubs.note(injection.tid, tgid, fd, kept_inode, rewrite.old, rewrite.new)
        site = self.connect_sites.get(tgid)
        if site is not None and tgid in self.sends_seen_by_filter:
            self.connect_sites[tgid] = None  # one try: where it cannot be patched, connect() keeps its stop
            if self.stubs.patch_connect(injection.tid, tgid, *site):
                self.services.say(f"process {tgid}: its connect() to the SuT answered by the stub, no stop")
        epoll_site = self.epoll_sites.get(tgid)
        if epoll_site and tgid in self.sends_seen_by_filter:
            self.epoll_sites[tgid] = 0  # one try, as connect()'s
            if self.stubs.patch_epoll(injection.tid, tgid, epoll_site):
                self.services.say(f"process {tgid}: its epoll_ctl() registrations noted by the stub, no stop")

    def _message(self, stop: SyscallStop) -> bytes:
        """The first bytes the program sends (the buffer, or its iovecs flattened)."""
        read, (_, buf, size) = self.services.tracer.read, stop.args[:3]
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

    def _hand_over(
        self,
        injection: Injection,
        tgid: int,
        fd: int,
        ino: int | None,
        kept_fd: int,
        by_code: bool,
        held: socket.socket | None = None,
    ) -> str:
        """Put the kept connection on ``fd`` (``held``: our copy of the program's socket, if
        the caller has one); how, and how its epoll registrations were restored."""
        services = self.services
        copy = services.copy(tgid, fd) if held is None else contextlib.nullcontext(held)
        with socket.socket(fileno=kept_fd) as kept_socket, copy as program_socket:
            if held is not None and ino is not None:
                program_inode = ino  # the caller checked its copy against ino in this stop already
            else:
                program_inode = os.fstat(program_socket.fileno()).st_ino
                if ino is not None and program_inode != ino:
                    raise OSError(errno.EBADF, f"fd {fd} is no longer the socket the program connected")
            procfs.match_nonblocking(kept_socket, program_socket)
            registrations, found = self._registrations(injection.tid, tgid, fd, program_inode)
            pidfd = services.transfer.pidfd_in_program(tgid)
            # By code (HANDOFF_CODE), the registrations first: made from outside on the kept
            # connection under the number ``fd``, they are the ones the program's fd will have
            # once the code's dup3 ran (epoll keys on file and number, not on whose table).
            if (
                by_code
                and pidfd is not None
                and self.code.usable(injection.tid, tgid, pidfd)
                and add_from_outside(services.pidfd(tgid), fd, kept_fd, registrations)
                and self.code.start(injection, tgid, pidfd, kept_fd, fd)
            ):
                return f"in one stop; {len(registrations)} epoll registration(s) {found}, re-added from outside"
            services.place(injection, services.transfer.one_into(injection, tgid, kept_fd), fd)
            if services.transfer.pidfd_in_program(tgid) is not None:  # by SCM_RIGHTS only, the code cannot help
                self.code.place(injection, tgid)
            if add_from_outside(services.pidfd(tgid), fd, kept_fd, registrations):
                return f"call by call; {len(registrations)} epoll registration(s) {found}, re-added from outside"
            services.restore_epoll(injection, fd, registrations, injection.stack_area())
            return f"call by call; {len(registrations)} epoll registration(s) {found}, re-added by injection"

    def _registrations(self, tid: int, tgid: int, fd: int, ino: int) -> tuple[list[tuple[int, int, int]], str]:
        """sipp adds a call socket to its epoll set before connect(): that registration, and
        where it was found (as noted at epoll_ctl, else from /proc)."""
        known = self.registrations.of((tgid, fd), ino)
        if known is not None:
            return known, "noted at epoll_ctl"
        known = self.stubs.registration(tid, tgid, fd, ino)
        if known is not None:
            return known, "noted at epoll_ctl"  # by the stub, in the program
        if tgid in self.epolls:
            found = procfs.epoll_registrations(tgid, fd, ino, self.epolls[tgid])
            if found:
                return found, "read from /proc fdinfo"
        self.epolls[tgid] = procfs.epoll_fds(tgid)
        return procfs.epoll_registrations(tgid, fd, ino, self.epolls[tgid]), "read from /proc fdinfo"
