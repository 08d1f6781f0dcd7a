"""The ptrace mode's side of the contract: what it can do, whether it can run here, and its
handoff, which runs the program traced and hands the connection over from outside it.

Imported on every start-up of every mode (the mode table), so it stays light: the session,
the injection machinery (ctypes) is imported only when a traced run starts.
"""

from __future__ import annotations

import errno
import functools
import os
import platform
import signal
import struct
from dataclasses import dataclass
from pathlib import Path

from fdkeeper.errors import FdkeeperError
from fdkeeper.modes.base import TRANSFERS, Capabilities, Handoff, HandoffRequest, Mode, ModeOptions, PtraceOptions
from fdkeeper.modes.ptrace import permission
from fdkeeper.process import FORWARDED_SIGNALS

EM_X86_64 = 62


@dataclass(kw_only=True)
class PtraceHandoff(Handoff):
    """A traced run: the command line plus what the tracer needs to do the handoff."""

    request: HandoffRequest
    options: PtraceOptions = PtraceOptions()

    def run(self) -> int:
        """Start the program traced, hand over at its connect() or listen(), return its exit status."""
        from fdkeeper.modes.ptrace.seccomp import percall_filter
        from fdkeeper.modes.ptrace.session import Session
        from fdkeeper.modes.ptrace.tracer import PtraceRefused, Tracer

        env = {k: v for k, v in os.environ.items() if not k.startswith("FDKEEPER_")}
        per_call_client = self.request.per_call and self.request.role == "client"
        try:
            tracer = Tracer.start(self.argv, {**env, **self.env}, percall_filter() if per_call_client else b"")
        except PtraceRefused as error:
            raise FdkeeperError(
                f"fdkeeper: ptrace refused for {self.argv[0]} ({error}): {permission.refusal_cause()}; "
                "nothing was handed over" + _other_mode_hint(Path(self.argv[0]))
            ) from None
        session = Session(tracer, self.request, self.options.transfer)
        forward = lambda signum, _frame: _kill_quietly(tracer.root, signum)  # noqa: E731
        previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
        try:
            status = session.run()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        code = os.waitstatus_to_exitcode(status)
        return code if code >= 0 else 128 - code


class PtraceMode(Mode):
    name = "ptrace"
    summary = "ptrace injection from outside sipp (static or setuid-free sipp, any agent)"
    suits = "static programs"
    # -t t1/l1 client: one handoff at the first connect(), then detached; -t tn/ln client:
    # attached under a seccomp filter that stops only connect(), epoll_ctl(ADD), sendto() without
    # an address and exec, a handoff per user.
    capabilities = Capabilities(per_call_roles=frozenset({"client", "server"}), transfers=TRANSFERS)

    def unsupported_reason(self, program: Path) -> str | None:
        reason = self._static_reason(program)
        if reason is None and permission.ptrace_in_doubt():
            reason = _probed_reason()
        return None if reason is None else reason + _other_mode_hint(program)

    def _static_reason(self, program: Path) -> str | None:
        machine = platform.machine()
        if machine != "x86_64":
            return f"ptrace mode injects x86_64 system calls and this machine is {machine}"
        reason = _program_reason(program)
        if reason is not None:
            return reason
        scope = permission.yama_scope()
        if scope == "3":
            return "ptrace is switched off (Yama ptrace_scope is 3; only a reboot undoes it)"
        if scope == "2" and not permission.has_capability(permission.CAP_SYS_PTRACE):
            return "Yama ptrace_scope is 2 and this process lacks CAP_SYS_PTRACE"
        return _pidfd_getfd_reason()

    def prepare(self, request: HandoffRequest, options: ModeOptions = ModeOptions()) -> Handoff:
        if options.ptrace.transfer not in TRANSFERS:
            raise FdkeeperError(f"fdkeeper: --transfer {options.ptrace.transfer}: use scm or pidfd")
        return PtraceHandoff(
            argv=[os.fspath(request.program), *request.args], env={}, request=request, options=options.ptrace
        )


@functools.lru_cache(maxsize=1)
def _probed_reason() -> str | None:
    """permission.probe_ptrace's answer, asked once a process: it starts a throw-away child."""
    return permission.probe_ptrace()


def _program_reason(program: Path) -> str | None:
    """Why this file cannot be traced as we need it, or None."""
    try:
        with open(program, "rb") as f:
            header = f.read(20)
    except OSError as error:
        return f"cannot read {program}: {error.strerror}"
    if header[:2] == b"#!":
        pass  # a script: its interpreter is traced from its exec on, like any program
    elif header[:4] != b"\x7fELF" or struct.unpack_from("<H", header, 18)[0] != EM_X86_64:
        return f"{program} is neither an x86_64 ELF program nor a #! script"
    if program.stat().st_mode & 0o6000 and os.geteuid() != 0:
        return f"{program} is setuid/setgid; the kernel runs a traced program without its privileges"
    return None


def _pidfd_getfd_reason() -> str | None:
    pidfd = os.pidfd_open(os.getpid())
    try:
        from fdkeeper.modes.ptrace.raw import pidfd_getfd

        os.close(pidfd_getfd(pidfd, pidfd))
    except OSError as error:
        if error.errno == errno.ENOSYS:
            return f"pidfd_getfd() is not available (Linux 5.6 or later needed; this is {platform.release()})"
    finally:
        os.close(pidfd)
    return None


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
