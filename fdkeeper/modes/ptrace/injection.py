"""Injection: a thread of the traced program held at a syscall stop, made to run syscalls of ours.

The handoff's work inside the program (socket, connect, recvmsg, pidfd_getfd, dup3, epoll_ctl,
seccomp, mmap...) is done by loading a held thread's registers with a call of ours, stepping it
through that call's entry and exit stops (tracer.py) and reading its result; then the thread
is let go with the result the intercepted call is to return, or sent back onto that call.
"""

from __future__ import annotations

import errno
import os

from fdkeeper.modes.ptrace import raw as pt
from fdkeeper.modes.ptrace.raw import SYS, signed, unsigned
from fdkeeper.modes.ptrace.tracer import Tracer

SYSCALL_INSN = b"\x0f\x05"
SCRATCH_SIZE = 8192


class Injection:
    """One thread held at a syscall stop, made to run syscalls of ours, then let go.

    Every injection runs from an exit stop: rewind rip onto the `syscall` instruction just
    executed, load the registers, step through entry and exit, read rax. Held at an entry
    stop, the first injected call takes the place of the intercepted one (one stop, not
    three); if none is made, the intercepted call is turned into getpid before the finish.
    """

    def __init__(self, tracer: Tracer, tid: int, at_entry: bool) -> None:
        self.tracer, self.tid = tracer, tid
        self.saved = pt.ptrace_getregs(tid)
        self.syscall_ip = self.saved.rip - 2
        if tracer.read(tid, self.syscall_ip, 2) != SYSCALL_INSN:
            raise OSError(errno.ENOTSUP, "the intercepted call was not made with a syscall instruction")
        self.scratch = 0
        self.at_entry = at_entry  # still at the intercepted call's entry stop
        self.left = False  # sent into code of ours by jump(): nothing to finish

    def call(self, name: str, *args: int) -> int:
        """Run one syscall in the thread; its raw result (-errno on failure)."""
        regs = pt.ptrace_getregs(self.tid)
        if self.at_entry:  # the kernel runs what orig_rax and the argument registers say now
            regs.orig_rax = SYS[name]
        else:
            regs.rip, regs.rax = self.syscall_ip, SYS[name]
        for reg, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args, strict=False):
            setattr(regs, reg, unsigned(value))
        pt.ptrace_setregs(self.tid, regs)
        if not self.at_entry:
            self.tracer.wait_syscall_stop(self.tid)  # entry
        self.at_entry = False
        self.tracer.wait_syscall_stop(self.tid)  # exit
        return signed(pt.ptrace_getregs(self.tid).rax)

    def jump(self, address: int, **registers: int) -> None:
        """Let the thread run code of ours at ``address`` from the resume that follows, with no
        stop of ours after it (the code returns to the program's flow by itself). Held at the
        entry stop, the intercepted call is skipped first. Nothing is to be finished after."""
        regs = pt.ptrace_getregs(self.tid)
        if self.at_entry:
            regs.orig_rax = unsigned(-1)
        regs.rip = address
        for reg, value in registers.items():
            setattr(regs, reg, unsigned(value))
        pt.ptrace_setregs(self.tid, regs)
        self.at_entry = False
        self.left = True

    def _leave_entry(self) -> None:
        """Held at the entry stop with nothing injected: let the call be a getpid, to its exit."""
        if self.at_entry:
            self.call("getpid")

    def check(self, name: str, *args: int) -> int:
        result = self.call(name, *args)
        if -4096 < result < 0:
            raise OSError(-result, f"{name} in the traced program: {os.strerror(-result)}")
        return result

    def scratch_area(self) -> int:
        """A private page pair in the program for our structures (unmapped by finish)."""
        if not self.scratch:
            self.scratch = self.check("mmap", 0, SCRATCH_SIZE, 3, 0x22, -1, 0)  # RW, PRIVATE|ANONYMOUS
        return self.scratch

    def stack_area(self) -> int:
        """Room for small structures below the held thread's stack red zone: no mmap needed.

        Nothing else runs on this stack while we hold the thread (its signals are held back).
        """
        rsp: int = self.saved.rsp
        return (rsp - 4096) & ~0xFFF

    def finish(self, value: int) -> None:
        """Let the intercepted call return ``value`` (a result or -errno) without running it."""
        self._leave_entry()
        self._release_scratch()
        regs = self.saved
        regs.rax = unsigned(value)
        pt.ptrace_setregs(self.tid, regs)

    def finish_rerun(self, stop_at_entry: bool = True) -> None:
        """Let the intercepted call run as the program made it; the thread stops at its entry,
        or (``stop_at_entry`` False) runs it at the next resume without a stop of its own."""
        self._leave_entry()
        self._release_scratch()
        regs = self.saved
        regs.rip, regs.rax = self.syscall_ip, regs.orig_rax
        pt.ptrace_setregs(self.tid, regs)
        if stop_at_entry:
            self.tracer.wait_syscall_stop(self.tid)

    def _release_scratch(self) -> None:
        if self.scratch:
            self.call("munmap", self.scratch, SCRATCH_SIZE)
            self.scratch = 0
