"""The kernel's x86_64 interface through ctypes: ptrace(2) requests, registers, syscall numbers.

The few ptrace requests the ptrace mode makes, x86_64's register struct and syscall numbers,
and pidfd_getfd(), which Python's os module lacks.

Our own rather than python-ptrace's binding: importing that package costs milliseconds of
every traced run's start-up (its tools, logging and CPU-info modules), and its wrapper adds
work to each of the many ptrace calls of a per-call run, where the program waits on us.
"""

from __future__ import annotations

import ctypes
import os
import struct

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
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_GET_SYSCALL_INFO = 0x420E
PTRACE_EVENT_STOP = 128
PTRACE_EVENT_SECCOMP = 7
PTRACE_EVENT_EXIT, PTRACE_O_TRACEEXIT = 6, 0x40
PTRACE_CONT = 7
PTRACE_SYSEMU = 31
PTRACE_O_TRACESECCOMP = 0x80
PTRACE_O_EXITKILL = 0x00100000

# x86_64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl).
SYS = {
    "write": 1,
    "close": 3,
    "mmap": 9,
    "writev": 20,
    "sendto": 44,
    "sendmsg": 46,
    "munmap": 11,
    "getpid": 39,
    "socket": 41,
    "connect": 42,
    "accept": 43,
    "bind": 49,
    "recvmsg": 47,
    "shutdown": 48,
    "listen": 50,
    "setsockopt": 54,
    "execve": 59,
    "fcntl": 72,
    "prctl": 157,
    "epoll_wait": 232,
    "epoll_ctl": 233,
    "epoll_pwait": 281,
    "accept4": 288,
    "dup3": 292,
    "seccomp": 317,
    "execveat": 322,
    "pidfd_open": 434,
    "pidfd_getfd": 438,
}
FilterProgram = tuple[ctypes.Array[ctypes.c_char], ctypes.Array[ctypes.c_char]]  # sock_fprog, its code
LOW = 0xFFFFFFFF  # an int argument is the low half of its register

libc.syscall.restype = ctypes.c_long


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
    result: int = _ptrace(request, pid, addr, data)
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


def pidfd_getfd(pidfd: int, fd: int) -> int:
    """A copy of another process's descriptor (needs ptrace rights over it: we are its tracer)."""
    result: int = libc.syscall(SYS["pidfd_getfd"], pidfd, fd, 0)
    if result < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return result


def signed(value: int) -> int:
    """A register's 64 bits as the signed number a syscall returned (-errno on failure)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def unsigned(value: int) -> int:
    """A number (maybe negative) as the 64 bits a register holds."""
    return value & ((1 << 64) - 1)


def filter_program(code: bytes) -> FilterProgram:
    """struct sock_fprog for the seccomp filter ``code`` (made before a fork: the child only calls)."""
    instructions = ctypes.create_string_buffer(code, len(code))
    fprog = ctypes.create_string_buffer(struct.pack("<HxxxxxxQ", len(code) // 8, ctypes.addressof(instructions)), 16)
    return fprog, instructions


def install_filter_here(fprog: FilterProgram) -> None:
    """In the forked child: no_new_privs (needed without CAP_SYS_ADMIN), then the filter."""
    if (
        libc.prctl(38, 1, 0, 0, 0) != 0
        or libc.syscall(SYS["seccomp"], 1, 0, ctypes.c_void_p(ctypes.addressof(fprog[0]))) != 0
    ):
        raise OSError(ctypes.get_errno(), "installing the seccomp filter: " + os.strerror(ctypes.get_errno()))
