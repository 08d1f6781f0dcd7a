"""Handoff by ptrace: the shim's work done from outside the program (static sipp, any agent).

fdkeeper starts the program traced and watches its system calls until the handoff is done:

- client role: at connect() of an AF_INET/6 SOCK_STREAM socket to the SuT, fdkeeper leases
  the kept connection, makes the program take it (pidfd_getfd of fdkeeper's copy, or a
  recvmsg() of SCM_RIGHTS from fdkeeper), dup3()s it onto the program's descriptor, re-adds
  the epoll registrations the dup3 dropped (read from /proc/PID/fdinfo of the epoll fds),
  replays the program's socket options, and makes connect() return 0;
- server role: after the first listen() of a TCP socket it leases the kept connections,
  puts them into the program, makes epoll_wait() report the listener readable (timeouts
  cut to 0 meanwhile) and accept() on it return them one by one, with their peer address.

Before letting go it installs a seccomp filter in the program (all threads) that makes
shutdown() and SO_LINGER (and TCP options on a TLS socketpair end) no-ops on the kept
descriptors, then detaches: from then on the program runs untraced at full speed, and
its exit-time shutdown never reaches the kernel even if fdkeeper is gone.
"""

from __future__ import annotations

import array
import collections
import ctypes
import errno
import fcntl
import ipaddress
import os
import platform
import secrets
import signal
import socket
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fdkeeper.errors import FdkeeperError
from fdkeeper.modes.base import Handoff, HandoffRequest, Mode
from fdkeeper.process import FORWARDED_SIGNALS
from fdkeeper.protocol import Address, format_address, format_message, parse_address, parse_reply, receive_packet

TRANSFERS = ("scm", "pidfd")
EM_X86_64 = 62
EPOLLIN = 0x001
SOCK_NONBLOCK, SOCK_CLOEXEC, MSG_CMSG_CLOEXEC = 0o4000, 0o2000000, 0x40000000
SO_REUSEPORT = 15
PR_SET_PTRACER = 0x59616D61
NOT_REPLAYED = {(socket.SOL_SOCKET, socket.SO_LINGER), (socket.SOL_SOCKET, socket.SO_REUSEADDR), (socket.SOL_SOCKET, SO_REUSEPORT)}


@dataclass
class PtraceHandoff(Handoff):
    """The command line plus what the tracer needs to do the handoff."""

    request: HandoffRequest | None = None
    transfer: str = "scm"


@dataclass
class Kept:
    """Kept connections leased to this run, as descriptors fdkeeper holds."""

    ids: list[int]
    fds: list[int]
    peers: list[str]
    locals: list[str]


@dataclass
class ServerState:
    tgid: int
    listener: int
    pending: collections.deque = field(default_factory=collections.deque)  # (fd in program, sockaddr bytes)
    registrations: dict[int, int] = field(default_factory=dict)  # epfd -> the listener's epoll data


class PtraceMode(Mode):
    name = "ptrace"
    summary = "ptrace injection from outside sipp (static or setuid-free sipp, any agent)"
    _probe: str | None | bool = False  # False: not probed yet

    def unsupported_reason(self, sipp: Path) -> str | None:
        reason = self._static_reason(sipp)
        if reason is None and _ptrace_in_doubt():
            if PtraceMode._probe is False:
                PtraceMode._probe = _probe_ptrace()
            reason = PtraceMode._probe
        return None if reason is None else reason + _other_mode_hint(sipp)

    def _static_reason(self, sipp: Path) -> str | None:
        machine = platform.machine()
        if machine != "x86_64":
            return f"ptrace mode injects x86_64 system calls and this machine is {machine}"
        try:
            import ptrace.binding  # noqa: F401
        except ImportError:
            return "python-ptrace is not installed (pip install python-ptrace)"
        try:
            with open(sipp, "rb") as f:
                header = f.read(20)
        except OSError as error:
            return f"cannot read {sipp}: {error.strerror}"
        if header[:2] == b"#!":
            pass  # a script: its interpreter is traced from its exec on, like any program
        elif header[:4] != b"\x7fELF" or struct.unpack_from("<H", header, 18)[0] != EM_X86_64:
            return f"{sipp} is neither an x86_64 ELF program nor a #! script"
        if sipp.stat().st_mode & 0o6000 and os.geteuid() != 0:
            return f"{sipp} is setuid/setgid; the kernel runs a traced program without its privileges"
        scope = _read("/proc/sys/kernel/yama/ptrace_scope")
        if scope == "3":
            return "ptrace is switched off (Yama ptrace_scope is 3; only a reboot undoes it)"
        if scope == "2" and not _has_capability(19):
            return "Yama ptrace_scope is 2 and this process lacks CAP_SYS_PTRACE"
        pidfd = os.pidfd_open(os.getpid())
        try:
            from fdkeeper.injection import pidfd_getfd

            os.close(pidfd_getfd(pidfd, pidfd))
        except OSError as error:
            if error.errno == errno.ENOSYS:
                return f"pidfd_getfd() is not available (Linux 5.6 or later needed; this is {platform.release()})"
        finally:
            os.close(pidfd)
        return None

    def prepare(self, request: HandoffRequest) -> Handoff:
        args = request.args if request.args is not None else request.invocation.args
        transfer = getattr(request, "transfer", None) or os.environ.get("FDKEEPER_TRANSFER") or "scm"
        if transfer not in TRANSFERS:
            raise FdkeeperError(f"fdkeeper: --transfer {transfer}: use scm or pidfd")
        return PtraceHandoff(argv=[os.fspath(request.sipp), *args], env={}, request=request, transfer=transfer)

    def run(self, handoff: Handoff) -> int:
        assert isinstance(handoff, PtraceHandoff) and handoff.request is not None
        from fdkeeper.injection import PtraceRefused, Tracer

        env = {k: v for k, v in os.environ.items() if not k.startswith("FDKEEPER_")}
        try:
            tracer = Tracer.start(handoff.argv, {**env, **handoff.env})
        except PtraceRefused as error:
            raise FdkeeperError(
                f"fdkeeper: ptrace refused for {handoff.argv[0]} ({error}): {_refusal_cause()}; "
                "nothing was handed over" + _other_mode_hint(Path(handoff.argv[0]))
            ) from None
        session = Session(tracer, handoff.request, handoff.transfer)
        forward = lambda signum, _frame: _kill_quietly(tracer.root, signum)  # noqa: E731
        previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
        try:
            status = session.run()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        code = os.waitstatus_to_exitcode(status)
        return code if code >= 0 else 128 - code


class Session:
    """One traced run: watch syscalls until the program holds what it needs, then detach."""

    def __init__(self, tracer, request: HandoffRequest, transfer: str) -> None:
        self.tracer = tracer
        self.request = request
        self.transfer = transfer
        self.role = request.invocation.role
        self.remote = _normal(request.remote) if request.remote else None
        self.debug = request.debug
        self.done = False
        self.options: dict[tuple[int, int], list[tuple[int, int, bytes]]] = {}
        self.entries: dict[int, tuple[int, tuple[int, ...]]] = {}  # tid -> syscall in progress
        self.listening: dict[int, int] = {}  # tid -> fd whose listen() we wait to see succeed
        self.server: ServerState | None = None
        self._tgids: dict[int, int] = {}
        self._pidfds: dict[int, int] = {}
        self._scm: socket.socket | None = None

    def say(self, text: str) -> None:
        if self.debug:
            print(f"fdkeeper-ptrace: {text}", file=sys.stderr, flush=True)

    # ---------------------------------------------------------------- the loop

    def run(self) -> int:
        from fdkeeper.injection import TraceeGone

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
            self._close()
        if tracer.root_status is not None:
            return tracer.root_status
        while True:
            try:
                return os.waitpid(tracer.root, 0)[1]
            except ChildProcessError:  # reaped already (cannot happen for our own child)
                return 0

    def _on_entry(self, stop) -> bool:
        from fdkeeper.injection import SYS

        nr, args = stop.nr, stop.args
        self.entries[stop.tid] = (nr, args)
        if nr == SYS["setsockopt"] and args[4] <= 128:
            key = (self._tgid(stop.tid), args[0] & 0xFFFFFFFF)
            value = self.tracer.read(stop.tid, args[3], args[4]) if args[4] else b""
            self.options.setdefault(key, []).append((args[1] & 0xFFFFFFFF, args[2] & 0xFFFFFFFF, value))
        elif nr == SYS["close"]:
            self.options.pop((self._tgid(stop.tid), args[0] & 0xFFFFFFFF), None)
        elif nr == SYS["connect"] and self.role == "client":
            return self._maybe_client_handoff(stop)
        elif nr == SYS["listen"] and self.role == "server" and self.server is None:
            if self._is_tcp(stop.tid, args[0]):
                self.listening[stop.tid] = args[0] & 0xFFFFFFFF
        elif nr in (SYS["epoll_wait"], SYS["epoll_pwait"]) and self._serving(stop.tid):
            import ptrace.binding.func as pt

            regs = pt.ptrace_getregs(stop.tid)
            regs.r10 = 0  # never block while a kept connection waits to be accepted
            pt.ptrace_setregs(stop.tid, regs)
        elif nr in (SYS["accept"], SYS["accept4"]) and self._serving(stop.tid) and args[0] & 0xFFFFFFFF == self.server.listener:
            return self._accept(stop)
        return False

    def _on_exit(self, stop) -> bool:
        from fdkeeper.injection import SYS

        nr, args = self.entries.pop(stop.tid, (-1, ()))
        if nr == SYS["listen"] and stop.tid in self.listening:
            fd = self.listening.pop(stop.tid)
            if stop.rval == 0 and self.server is None:
                return self._server_handoff(stop, fd)
        elif nr in (SYS["epoll_wait"], SYS["epoll_pwait"]) and self._serving(stop.tid) and stop.rval >= 0:
            self._report_listener(stop, args)
        elif nr == SYS["socket"] and stop.rval >= 0:
            self.options.pop((self._tgid(stop.tid), stop.rval), None)
        return False

    # ---------------------------------------------------------------- client role

    def _maybe_client_handoff(self, stop) -> bool:
        from fdkeeper.injection import Injection, install_protection

        fd, address, length = stop.args[0] & 0xFFFFFFFF, stop.args[1], stop.args[2]
        target = _parse_sockaddr(self.tracer.read(stop.tid, address, min(length, 128))) if address else None
        if target is None or target != self.remote:
            return False
        tgid = self._tgid(stop.tid)
        program_socket = self._copy(tgid, fd)
        with program_socket:
            if program_socket.family not in (socket.AF_INET, socket.AF_INET6) or program_socket.type != socket.SOCK_STREAM:
                return False  # e.g. sipp's UDP probe for its own address
            self.done = True  # one handoff per run (t1), whatever happens next
            injection = Injection(self.tracer, stop.tid, at_entry=True)
            try:
                kept = self._lease(tgid, role="client", remote=self.request.remote, local="-", reconnect=self.request.reconnect or None)
            except FdkeeperError as error:
                print(str(error), file=sys.stderr, flush=True)
                injection.finish(-(errno.EBUSY if error.code == "busy" else errno.ECONNREFUSED))
                return True
            try:
                kept_socket = socket.socket(fileno=kept.fds[0])
                pair = kept_socket.family == socket.AF_UNIX
                _match_nonblocking(kept_socket, program_socket)
                for level, name, value in self.options.get((tgid, fd), []):
                    if (level, name) not in NOT_REPLAYED and not (pair and level == socket.IPPROTO_TCP):
                        _setsockopt_quietly(kept_socket, level, name, value)
                registrations = epoll_registrations(tgid, fd, os.fstat(program_socket.fileno()).st_ino)
                install_protection(injection, [fd], [fd] if pair else [])
                [new] = self._transfer(injection, tgid, kept.fds)
                injection.check("dup3", new, fd, SOCK_CLOEXEC)
                injection.call("close", new)
                self._restore_epoll(injection, fd, registrations)
                kept_socket.close()
                self.say(f"connect(fd {fd}) to {format_address(self.request.remote)}: handed over kept connection "
                         f"{kept.ids[0]} by {self.transfer}{' (a socketpair end the keeper relays)' if pair else ''}")
                injection.finish(0)
            except OSError as error:
                print(f"fdkeeper: cannot hand the kept connection to process {tgid}: {error}", file=sys.stderr, flush=True)
                injection.finish(-(error.errno or errno.EIO))
        return True

    def _restore_epoll(self, injection, fd: int, registrations: list[tuple[int, int, int]]) -> None:
        base = injection.scratch_area() + 2048
        for epfd, events, data in registrations:
            self.tracer.write(injection.tid, base, struct.pack("<IQ", events, data))
            if injection.call("epoll_ctl", epfd, 1, fd, base) == -errno.EEXIST:  # ADD, else MOD
                injection.call("epoll_ctl", epfd, 3, fd, base)

    # ---------------------------------------------------------------- server role

    def _server_handoff(self, stop, listener: int) -> bool:
        from fdkeeper.injection import Injection, install_protection

        tgid = self._tgid(stop.tid)
        injection = Injection(self.tracer, stop.tid, at_entry=False)
        try:
            kept = self._lease(tgid, role="server", remote=self.request.remote)
        except FdkeeperError as error:
            print(str(error), file=sys.stderr, flush=True)
            self.done = True
            injection.finish(-errno.ECONNREFUSED)
            return True
        state = ServerState(tgid, listener)
        try:
            sockets = [socket.socket(fileno=fd) for fd in kept.fds]
            addresses = [_peer_sockaddr(s, peer) for s, peer in zip(sockets, kept.peers)]
            new = self._transfer(injection, tgid, kept.fds)
            install_protection(injection, new, [n for n, s in zip(new, sockets) if s.family == socket.AF_UNIX])
            state.pending.extend(zip(new, addresses))
            for s in sockets:
                s.close()
        except OSError as error:
            print(f"fdkeeper: cannot hand the kept connections to process {tgid}: {error}", file=sys.stderr, flush=True)
            self.done = True
            injection.finish(-(error.errno or errno.EIO))
            return True
        self.server = state
        self._refresh_registrations()
        self.say(f"listen(fd {listener}): {len(new)} kept connection(s) pending as accepts (fds {new})")
        injection.finish(0)
        if not state.pending:
            self.done = True
        return True

    def _serving(self, tid: int) -> bool:
        return self.server is not None and bool(self.server.pending) and self._tgid(tid) == self.server.tgid

    def _refresh_registrations(self) -> None:
        state = self.server
        with self._copy(state.tgid, state.listener) as listener:
            found = epoll_registrations(state.tgid, state.listener, os.fstat(listener.fileno()).st_ino)
        state.registrations = {epfd: data for epfd, _events, data in found}

    def _report_listener(self, stop, args: tuple[int, ...]) -> None:
        """At epoll_wait()'s return, add the listener's EPOLLIN if the kernel did not."""
        import ptrace.binding.func as pt

        epfd, events, maxevents = args[0] & 0xFFFFFFFF, args[1], args[2] & 0xFFFFFFFF
        if epfd not in self.server.registrations:
            self._refresh_registrations()
        data = self.server.registrations.get(epfd)
        count = stop.rval
        if data is None or count >= maxevents:
            return
        got = self.tracer.read(stop.tid, events, 12 * count) if count else b""
        if any(struct.unpack_from("<IQ", got, 12 * i)[1] == data for i in range(count)):
            return
        self.tracer.write(stop.tid, events + 12 * count, struct.pack("<IQ", EPOLLIN, data))
        regs = pt.ptrace_getregs(stop.tid)
        regs.rax = count + 1
        pt.ptrace_setregs(stop.tid, regs)

    def _accept(self, stop) -> bool:
        from fdkeeper.injection import Injection

        state = self.server
        fd, sockaddr = state.pending.popleft()
        address, length_at = stop.args[1], stop.args[2]
        flags = stop.args[3] & 0xFFFFFFFF if stop.nr == 288 else 0
        injection = Injection(self.tracer, stop.tid, at_entry=True)
        with self._copy(state.tgid, fd) as copy:
            copy.setblocking(not flags & SOCK_NONBLOCK)  # what a real accept4() gives
        if address and length_at:
            room, = struct.unpack("<I", self.tracer.read(stop.tid, length_at, 4))
            self.tracer.write(stop.tid, address, sockaddr[: min(room, len(sockaddr))])
            self.tracer.write(stop.tid, length_at, struct.pack("<I", len(sockaddr)))
        self.say(f"accept(fd {state.listener}): handed over kept connection as fd {fd}")
        injection.finish(fd)
        if not state.pending:
            self.done = True
        return True

    # ---------------------------------------------------------------- leases and transfer

    def _lease(self, tgid: int, **fields: object) -> Kept:
        """LEASE for the traced process (for_pid=, checked by the keeper against TracerPid)."""
        base = {k: v for k, v in fields.items() if v is not None}
        base["transport"] = self.request.transport
        try:
            return _lease(self.request.control_socket, {**base, "for_pid": tgid, "mode": "ptrace", "transfer": self.transfer})
        except FdkeeperError as error:
            if error.code != "badrequest" or "for_pid" not in str(error):
                raise
        # A keeper without for_pid: the lease is this fdkeeper process's, which lives exactly
        # as long as the traced program (it waits for it), so it ends with it all the same.
        self.say("the keeper does not know for_pid=; the lease is held by fdkeeper itself")
        return _lease(self.request.control_socket, base)

    def _transfer(self, injection, tgid: int, fds: list[int]) -> list[int]:
        """Make the held program take copies of our descriptors; their numbers there (close-on-exec)."""
        if self.transfer == "pidfd":
            # Yama scope 1 lets only ancestors use pidfd_getfd on us unless we name the program.
            _libc_call("prctl", PR_SET_PTRACER, tgid, 0, 0, 0)
            pidfd = injection.check("pidfd_open", os.getpid(), 0)
            try:
                return [injection.check("pidfd_getfd", pidfd, fd, 0) for fd in fds]
            finally:
                injection.call("close", pidfd)
        return self._transfer_scm(injection, tgid, fds)

    def _transfer_scm(self, injection, tgid: int, fds: list[int]) -> list[int]:
        if self._scm is None:
            self._scm = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            self._scm.bind(b"\0fdkeeper-ptrace-%d-%s" % (os.getpid(), secrets.token_hex(8).encode()))
            self._scm.listen(4)
            self._scm.settimeout(5)
        name = self._scm.getsockname()
        base = injection.scratch_area()
        tid = injection.tid
        self.tracer.write(tid, base, struct.pack("<H", socket.AF_UNIX) + name)
        program_end = injection.check("socket", socket.AF_UNIX, socket.SOCK_SEQPACKET | SOCK_CLOEXEC, 0)
        received: list[int] = []
        try:
            injection.check("connect", program_end, base, 2 + len(name))
            while True:  # anyone may connect to an abstract name: only the program gets fds
                connection, _ = self._scm.accept()
                pid = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
                if pid == tgid:
                    break
                connection.close()
            with connection:
                for start in range(0, len(fds), 250):
                    chunk = fds[start : start + 250]
                    connection.sendmsg([b"F"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", chunk))])
                    control = base + 512
                    control_len = socket.CMSG_SPACE(4 * len(chunk))
                    # msghdr (name, namelen, iov, iovlen, control, controllen, flags), one iovec, 16 bytes of data
                    self.tracer.write(tid, base + 128, struct.pack("<QI4xQQQQi4x", 0, 0, base + 256, 1, control, control_len, 0))
                    self.tracer.write(tid, base + 256, struct.pack("<QQ", base + 320, 16))
                    injection.check("recvmsg", program_end, base + 128, MSG_CMSG_CLOEXEC)
                    length, level, kind = struct.unpack("<Qii", self.tracer.read(tid, control, 16))
                    if (level, kind) != (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                        raise OSError(errno.EPROTO, "no descriptors arrived in the traced program")
                    count = (length - 16) // 4
                    received += struct.unpack(f"<{count}i", self.tracer.read(tid, control + 16, 4 * count))
        finally:
            injection.call("close", program_end)
        return received

    # ---------------------------------------------------------------- small helpers

    def _tgid(self, tid: int) -> int:
        if tid not in self._tgids:
            status = _read(f"/proc/{tid}/status") or ""
            line = next((l for l in status.splitlines() if l.startswith("Tgid:")), f"Tgid: {tid}")
            self._tgids[tid] = int(line.split()[1])
        return self._tgids[tid]

    def _copy(self, tgid: int, fd: int) -> socket.socket:
        """Our own copy of one of the program's sockets (we are its tracer, so pidfd_getfd may)."""
        from fdkeeper.injection import pidfd_getfd

        if tgid not in self._pidfds:
            self._pidfds[tgid] = os.pidfd_open(tgid)
        return socket.socket(fileno=pidfd_getfd(self._pidfds[tgid], fd))

    def _is_tcp(self, tid: int, fd: int) -> bool:
        try:
            with self._copy(self._tgid(tid), fd & 0xFFFFFFFF) as copy:
                return copy.family in (socket.AF_INET, socket.AF_INET6) and copy.type == socket.SOCK_STREAM
        except OSError:
            return False

    def _close(self) -> None:
        for pidfd in self._pidfds.values():
            os.close(pidfd)
        self._pidfds.clear()
        if self._scm is not None:
            self._scm.close()


# -------------------------------------------------------------------- module helpers

def _lease(path: Path, fields: dict[str, object]) -> Kept:
    """One LEASE exchange on the keeper's control socket; the descriptors stay ours."""
    message = format_message("LEASE", **fields)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(10)
        try:
            sock.connect(os.fspath(path))
        except OSError as error:
            raise FdkeeperError(f"fdkeeper: cannot reach the keeper at {path}: {error.strerror}") from None
        sock.send(message)
        data, _ = receive_packet(sock)
        reply = parse_reply(data)
        if not reply.ok:
            raise FdkeeperError(reply.text, reply.code)
        kept = Kept([], [], [], [])
        while len(kept.fds) < int(reply.fields["count"]):
            data, fds = receive_packet(sock)
            packet = parse_reply(data).fields
            kept.ids += [int(i) for i in packet["ids"].split(",")]
            kept.fds += fds
            kept.peers += packet.get("peers", "").split(",")
            kept.locals += packet.get("locals", "").split(",")
        return kept


def epoll_registrations(tgid: int, fd: int, ino: int) -> list[tuple[int, int, int]]:
    """(epfd, events, data) of every epoll registration of ``fd`` in the process.

    Read from /proc/PID/fdinfo of its epoll descriptors rather than from traced
    epoll_ctl() calls: nothing to track, and registrations made before we looked count too.
    """
    found = []
    for name in os.listdir(f"/proc/{tgid}/fd"):
        try:
            if os.readlink(f"/proc/{tgid}/fd/{name}") != "anon_inode:[eventpoll]":
                continue
            text = _read(f"/proc/{tgid}/fdinfo/{name}") or ""
        except OSError:
            continue
        for line in text.splitlines():
            words = line.split()
            if words[:1] != ["tfd:"]:
                continue
            fields = dict(zip(words[::2], words[1::2]))
            extra = dict(w.split(":", 1) for w in words if ":" in w and not w.endswith(":"))
            if int(fields["tfd:"]) == fd and int(extra.get("ino", "0"), 16) == ino:
                found.append((int(name), int(fields["events:"], 16), int(fields["data:"], 16)))
    return found


def _parse_sockaddr(raw: bytes) -> Address | None:
    if len(raw) >= 8 and struct.unpack_from("<H", raw)[0] == socket.AF_INET:
        return _normal((socket.inet_ntop(socket.AF_INET, raw[4:8]), struct.unpack_from(">H", raw, 2)[0]))
    if len(raw) >= 24 and struct.unpack_from("<H", raw)[0] == socket.AF_INET6:
        return _normal((socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack_from(">H", raw, 2)[0]))
    return None


def _normal(address: Address) -> Address:
    try:
        return (str(ipaddress.ip_address(address[0])), int(address[1]))
    except ValueError:
        return (address[0], int(address[1]))


def _peer_sockaddr(sock: socket.socket, peer: str) -> bytes:
    """accept()'s address for a kept connection: the TCP peer, or the keeper's peers= for TLS."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            host, port = sock.getpeername()[:2]
        except OSError:
            return b""
    elif peer and peer != "-":
        host, port = parse_address(peer)
    else:
        return b""
    if ":" in host:
        return struct.pack("<H", socket.AF_INET6) + struct.pack(">HI", port, 0) + socket.inet_pton(socket.AF_INET6, host) + b"\0" * 4
    return struct.pack("<H", socket.AF_INET) + struct.pack(">H", port) + socket.inet_aton(host) + b"\0" * 8


def _match_nonblocking(kept: socket.socket, program: socket.socket) -> None:
    """File status flags live on the open file description: give the kept one the program's O_NONBLOCK."""
    want = fcntl.fcntl(program.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
    have = fcntl.fcntl(kept.fileno(), fcntl.F_GETFL)
    if have & os.O_NONBLOCK != want:
        fcntl.fcntl(kept.fileno(), fcntl.F_SETFL, (have & ~os.O_NONBLOCK) | want)


def _setsockopt_quietly(sock: socket.socket, level: int, name: int, value: bytes) -> None:
    try:
        sock.setsockopt(level, name, value)
    except OSError:
        pass


_libc = ctypes.CDLL(None, use_errno=True)


def _libc_call(name: str, *args: int) -> int:
    return getattr(_libc, name)(*args)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _has_capability(bit: int) -> bool:
    status = _read("/proc/self/status") or ""
    line = next((l for l in status.splitlines() if l.startswith("CapEff:")), "CapEff: 0")
    return bool(int(line.split()[1], 16) >> bit & 1)


def _refusal_cause() -> str:
    """Why the kernel said no to PTRACE_SEIZE of our own child: name the likely check."""
    scope = _read("/proc/sys/kernel/yama/ptrace_scope")
    if scope in ("2", "3"):
        return f"Yama ptrace_scope is {scope}" + ("" if scope == "3" else " and CAP_SYS_PTRACE is missing")
    status = _read("/proc/self/status") or ""
    seccomp = next((l.split()[1] for l in status.splitlines() if l.startswith("Seccomp:")), "0")
    if seccomp != "0":
        return "a seccomp filter on fdkeeper forbids ptrace (a container's default profile does; allow ptrace or use --mode preload)"
    if not _has_capability(19):
        return "CAP_SYS_PTRACE is missing and a security module refused ptrace"
    return "a security module (AppArmor/SELinux/Yama) refused ptrace"


def _ptrace_in_doubt() -> bool:
    """Whether anything here could refuse tracing our own child: a seccomp filter on us, a
    Yama scope above 1, or a missing CAP_SYS_PTRACE (then an LSM may object). Only then is
    the probe (a fork, a few ms) worth its cost; a refusal at start is reported just as well."""
    status = _read("/proc/self/status") or ""
    seccomp = next((l.split()[1] for l in status.splitlines() if l.startswith("Seccomp:")), "0")
    scope = _read("/proc/sys/kernel/yama/ptrace_scope") or "0"
    return seccomp != "0" or scope not in ("0", "1") or not _has_capability(19)


def _probe_ptrace() -> str | None:
    """Try PTRACE_SEIZE on a throw-away child: the one check that answers for every policy."""
    from fdkeeper.injection import PTRACE_SEIZE, pt

    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_w)
        os.read(ready_r, 1)
        os._exit(0)
    os.close(ready_r)
    try:
        pt.ptrace(PTRACE_SEIZE, pid, 0, 0)
        reason = None
    except pt.PtraceError as error:
        reason = f"ptrace refused ({os.strerror(error.errno or errno.EPERM)}): {_refusal_cause()}"
    os.close(ready_w)
    os.waitpid(pid, 0)
    return reason


def _other_mode_hint(program: Path) -> str:
    from fdkeeper.modes.preload import PreloadMode

    try:
        if PreloadMode().unsupported_reason(program) is None:
            return "; --mode preload works here"
    except OSError:
        pass
    return ""


def _kill_quietly(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
