"""The per-call role's address rewrites: each kept fd's sends name the kept connection.

At a per-call fd's first send the pair is made (viarewrite.rewrite_for: the placeholder's
IP:PORT, which sipp wrote into Via and Contact, and the kept connection's) and that message
rewritten; each later sendto() without an address on the fd (a seccomp stop) is rewritten the
same way, in the program's own buffer, before the kernel takes a byte of it.
"""

from __future__ import annotations

import os
import socket

from fdkeeper.address import split_host_port
from fdkeeper.modes.ptrace.permission import status_field
from fdkeeper.modes.ptrace.raw import LOW, SYS
from fdkeeper.modes.ptrace.services import Services
from fdkeeper.modes.ptrace.tracer import SyscallStop
from fdkeeper.modes.ptrace.viarewrite import Rewrite, rewrite_for

MAX_LOOK = 64 * 1024  # bytes of a send looked at (as the shim)
SIGPIPE_BIT = 1 << 12  # SIGPIPE (13) in /proc/PID/status SigIgn


class ViaRewrites:
    """The rewrite of each kept per-call fd of the traced program, and what they did."""

    def __init__(self, services: Services) -> None:
        self.services = services
        # (tgid, fd) -> the kept connection's address in place of the placeholder's in what fd sends
        self.rewrites: dict[tuple[int, int], Rewrite] = {}
        self.ignores_sigpipe: dict[int, bool] = {}  # tgid -> whether MSG_NOSIGNAL changes nothing for it
        self.rewritten = 0  # messages written to with the kept connection's address
        self.warned_length = False

    def forget(self, key: tuple[int, int]) -> None:
        """(tgid, fd) is a new socket: no rewrite of the old one's applies."""
        self.rewrites.pop(key, None)

    def first(
        self,
        stop: SyscallStop,
        tgid: int,
        fd: int,
        kept_fd: int,
        kept_local: str,
        program_socket: socket.socket | None = None,
        message: bytes | None = None,
    ) -> bool:
        """At the first send, with the user's connection leased: note what fd's sends are to
        name (the placeholder's address is the program's socket's, still on fd) and rewrite
        this first message; True when the send may rerun with MSG_NOSIGNAL, unseen.
        ``program_socket``: our copy of fd, if the caller holds one; ``message``: the send's
        first bytes, if the caller read them (no copy, no read made twice)."""
        key = (tgid, fd)
        self.rewrites.pop(key, None)
        try:
            if program_socket is None:
                with self.services.copy(tgid, fd) as program_socket:
                    placeholder = program_socket.getsockname()
            else:
                placeholder = program_socket.getsockname()
            # As the keeper wrote it (normalised): split, not parsed again.
            kept = split_host_port(kept_local) if kept_local not in ("", "-") else None
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
        self._rewrite_buffer(stop.tid, stop.args[1], stop.args[2], rewrite, message)
        return self.sigpipe_ignored(tgid)

    def on_send(self, stop: SyscallStop) -> None:
        """At a seccomp stop of sendto() without an address: a kept per-call fd's message names
        the kept connection, not the placeholder; any other send goes on as it is."""
        rewrite = self.rewrites.get((self.services.tgid(stop.tid), stop.args[0] & LOW))
        if rewrite is not None:
            self._rewrite_buffer(stop.tid, stop.args[1], stop.args[2], rewrite)

    def _rewrite_buffer(self, tid: int, buf: int, size: int, rewrite: Rewrite, message: bytes | None = None) -> None:
        """The placeholder's address replaced in the program's own buffer, before the kernel
        takes any of it (a tail the program sends again is then its copy of rewritten bytes);
        ``message``: its first min(size, MAX_LOOK) bytes, if read already."""
        if not buf or not size:
            return
        tracer = self.services.tracer
        try:
            if message is None:
                message = tracer.read(tid, buf, min(size, MAX_LOOK))
            offsets = rewrite.offsets(message)
            for at in offsets:
                tracer.write(tid, buf + at, rewrite.new)
        except OSError:
            return  # a bad pointer: the send fails with EFAULT by itself
        self.rewritten += bool(offsets)

    def sigpipe_ignored(self, tgid: int) -> bool:
        """Whether the program ignores SIGPIPE (so MSG_NOSIGNAL changes nothing for it)."""
        if tgid not in self.ignores_sigpipe:
            ignored = status_field("SigIgn", tgid)
            self.ignores_sigpipe[tgid] = bool(ignored and int(ignored, 16) & SIGPIPE_BIT)
        return self.ignores_sigpipe[tgid]

    def _warn_length(self, placeholder: tuple[object, ...], kept: tuple[object, ...]) -> None:
        if not self.warned_length:
            self.warned_length = True
            self.services.tell(
                f"fdkeeper: the kept connection's address {kept[0]}:{kept[1]} and the per-call socket's port "
                f"{placeholder[1]} differ in length; messages keep the per-call socket's port (a SuT that "
                "aliases Via ports to connections sees a new one per call)"
            )
