"""ptrace(2) through ctypes: the few requests the ptrace mode makes, and x86_64's registers.

Our own rather than python-ptrace's binding: importing that package costs milliseconds of
every traced run's start-up (its tools, logging and CPU-info modules), and its wrapper adds
work to each of the many ptrace calls of a per-call run, where the program waits on us.
"""

from __future__ import annotations

import ctypes
import os

libc = ctypes.CDLL("libc.so.6", use_errno=True)
_ptrace = libc.ptrace
_ptrace.restype = ctypes.c_long
_ptrace.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)

PTRACE_GETREGS, PTRACE_SETREGS, PTRACE_DETACH, PTRACE_SYSCALL = 12, 13, 17, 24
PTRACE_GETEVENTMSG = 0x4201
PTRACE_O_TRACESYSGOOD, PTRACE_O_TRACEFORK, PTRACE_O_TRACEVFORK, PTRACE_O_TRACECLONE, PTRACE_O_TRACEEXEC = (
    1,
    2,
    4,
    8,
    0x10,
)
PTRACE_EVENT_FORK, PTRACE_EVENT_VFORK, PTRACE_EVENT_CLONE, PTRACE_EVENT_EXEC = 1, 2, 3, 4


class PtraceError(OSError):
    """A ptrace request failed; ``errno`` says why (ESRCH: the task is gone or not stopped)."""


class UserRegs(ctypes.Structure):
    """struct user_regs_struct of x86_64 (sys/user.h), in its order."""

    _fields_ = [
        (name, ctypes.c_ulong)
        for name in (
            "r15",
            "r14",
            "r13",
            "r12",
            "rbp",
            "rbx",
            "r11",
            "r10",
            "r9",
            "r8",
            "rax",
            "rcx",
            "rdx",
            "rsi",
            "rdi",
            "orig_rax",
            "rip",
            "cs",
            "eflags",
            "rsp",
            "ss",
            "fs_base",
            "gs_base",
            "ds",
            "es",
            "fs",
            "gs",
        )
    ]


def ptrace(request: int, pid: int, addr: int = 0, data: int = 0) -> int:
    result = _ptrace(request, pid, addr, data)
    if result == -1:
        error = ctypes.get_errno()
        if error:
            raise PtraceError(error, f"ptrace({request:#x}, {pid}): {os.strerror(error)}")
    return result


def ptrace_getregs(pid: int) -> UserRegs:
    regs = UserRegs()
    ptrace(PTRACE_GETREGS, pid, 0, ctypes.addressof(regs))
    return regs


def ptrace_setregs(pid: int, regs: UserRegs) -> None:
    ptrace(PTRACE_SETREGS, pid, 0, ctypes.addressof(regs))


def ptrace_syscall(pid: int, signal: int = 0) -> None:
    ptrace(PTRACE_SYSCALL, pid, 0, signal)


def ptrace_detach(pid: int, signal: int = 0) -> None:
    ptrace(PTRACE_DETACH, pid, 0, signal)


def ptrace_geteventmsg(pid: int) -> int:
    message = ctypes.c_ulong()
    ptrace(PTRACE_GETEVENTMSG, pid, 0, ctypes.addressof(message))
    return message.value
