"""A per-call handoff run by the program itself, with no stop of its own.

At the first send on a per-call socket the thread is held at the send's entry stop. Rather
than inject pidfd_getfd, dup3 and close one by one (two stops each), or run them as code that
ends in an int3 (one more stop, then the send rerun), the thread is sent, from that stop, into a
small piece of code mapped into the program once: it takes the kept connection (pidfd_getfd on
fdkeeper's pidfd), puts it on the program's descriptor (dup3), closes the extra copy, restores
the registers the send needs and jumps back onto the send's `syscall` instruction. The send
then runs on the kept connection at full speed, untraced: one stop per handoff instead of two.

The registers to restore live in a slot of a read-write page beside the code, one slot per
thread (never on the thread's stack, where a signal frame could land). Should pidfd_getfd or
dup3 fail in the program, the code jumps past the `syscall` instead, so the send itself
returns that error (the program sees its call fail, as with any failed handoff), and notes it
in the slot: fdkeeper reports it at that thread's next handoff. fdkeeper keeps its copy of the
kept connection open until the thread is seen again, so the number the code takes never names
another file meanwhile.
"""

from __future__ import annotations

import os
import struct
import sys

from fdkeeper.modes.ptrace.injection import Injection
from fdkeeper.modes.ptrace.raw import signed
from fdkeeper.modes.ptrace.tracer import Tracer

# In: rdi = fdkeeper's pidfd in the program, rsi = the kept connection's fd in fdkeeper,
# r15 = the thread's slot: [0] the send's number, [8] rdi, [16] rsi, [24] rdx, [32] address of
# the send's `syscall`, [40] r15, [48] the program's fd to replace, [56] result (0, or -errno).
#     mov eax, 438 (pidfd_getfd); xor edx, edx; syscall; test rax, rax; js fail
#     mov [r15+56], rax; mov rdi, rax; mov rsi, [r15+48]; mov edx, O_CLOEXEC; mov eax, 292 (dup3); syscall
#     mov rsi, rax; mov rdi, [r15+56]; mov eax, 3 (close); syscall; mov rax, rsi; test rax, rax; js fail
#     mov qword [r15+56], 0; mov rcx, [r15+32]; mov rax, [r15]; jmp restore
#     fail: mov [r15+56], rax; mov rcx, [r15+32]; add rcx, 2      (past the syscall: rax is its result)
#     restore: mov rdi, [r15+8]; mov rsi, [r15+16]; mov rdx, [r15+24]; mov r15, [r15+40]; jmp rcx
# rcx and r11 are clobbered, as the `syscall` instruction the program was at clobbers them.
HANDOFF_CODE = bytes.fromhex(
    "b8b6010000"
    "31d2"
    "0f05"
    "4885c0"
    "783e"
    "49894738"
    "4889c7"
    "498b7730"
    "ba00000800"
    "b824010000"
    "0f05"
    "4889c6"
    "498b7f38"
    "b803000000"
    "0f05"
    "4889f0"
    "4885c0"
    "7811"
    "49c7473800000000"
    "498b4f20"
    "498b07"
    "eb0c"
    "49894738"
    "498b4f20"
    "4883c102"
    "498b7f08"
    "498b7710"
    "498b5718"
    "4d8b7f28"
    "ffe1"
)
PROT_READ_WRITE, PROT_READ_EXEC, MAP_PRIVATE_ANONYMOUS = 3, 5, 0x22
PAGE = 4096
SLOT = struct.Struct("<8Q")
SLOTS = PAGE // SLOT.size  # threads of one process that can hand over this way; others inject
RUNNING = 1  # a slot's result before the code ran


class ProcessCode:
    """The code and slot page in one process, and what its threads' handoffs left to check."""

    __slots__ = ("code_at", "kept", "slot_of", "slots_at")

    def __init__(self, code_at: int, slots_at: int) -> None:
        self.code_at = code_at
        self.slots_at = slots_at
        self.slot_of: dict[int, int] = {}  # tid -> its slot's address
        self.kept: dict[int, int] = {}  # tid -> fdkeeper's copy of the connection its code takes


class HandoffCode:
    """HANDOFF_CODE in each traced process (mapped at its first handoff, made call by call)."""

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer
        self.processes: dict[int, ProcessCode] = {}

    def place(self, injection: Injection, tgid: int) -> None:
        """Map the code and its slots into the held program, unless there already."""
        if tgid in self.processes and self._there(injection.tid, self.processes[tgid]):
            return
        self.forget(tgid)
        code_at = injection.check("mmap", 0, PAGE, PROT_READ_EXEC, MAP_PRIVATE_ANONYMOUS, -1, 0)
        slots_at = injection.check("mmap", 0, PAGE, PROT_READ_WRITE, MAP_PRIVATE_ANONYMOUS, -1, 0)
        self.tracer.write(injection.tid, code_at, HANDOFF_CODE)  # /proc/PID/mem may write there
        self.processes[tgid] = ProcessCode(code_at, slots_at)

    def usable(self, tid: int, tgid: int, pidfd: int | None) -> bool:
        """Can start() send this thread into the code: code in place, fdkeeper's pidfd in the
        program, a slot for the thread."""
        process = self.processes.get(tgid)
        if process is None or pidfd is None or not self._there(tid, process):
            return False
        return tid in process.slot_of or len(process.slot_of) < SLOTS

    def start(self, injection: Injection, tgid: int, pidfd: int, kept_fd: int, fd: int) -> bool:
        """Send the held thread into the code from the resume that follows (usable() said it
        can); False (nothing changed) if it cannot after all. The send's flags (r10, which the
        code's own calls leave alone) are the saved ones, which the caller may have changed."""
        process, tid = self.processes.get(tgid), injection.tid
        if process is None:
            return False
        slot = process.slot_of.get(tid)
        if slot is None:
            if len(process.slot_of) >= SLOTS:
                return False
            slot = process.slot_of[tid] = process.slots_at + SLOT.size * len(process.slot_of)
        saved = injection.saved
        self.tracer.write(
            tid,
            slot,
            SLOT.pack(saved.orig_rax, saved.rdi, saved.rsi, saved.rdx, injection.syscall_ip, saved.r15, fd, RUNNING),
        )
        ours = os.dup(kept_fd)  # stays open until the thread is seen again: the number names this file
        process.kept[tid] = ours
        injection.jump(process.code_at, rdi=pidfd, rsi=ours, r15=slot, r10=injection.saved.r10)
        return True

    def check_previous(self, tgid: int, tid: int) -> int:
        """The thread's last handoff by code has run (the thread stopped again since): close our
        copy, and report a failure the program's send returned; that result (0: none)."""
        process = self.processes.get(tgid)
        ours = process.kept.pop(tid, None) if process else None
        if process is None or ours is None:
            return 0
        os.close(ours)
        try:
            result = signed(SLOT.unpack(self.tracer.read(tid, process.slot_of[tid], SLOT.size))[7])
        except OSError:
            return 0
        if result < 0:
            print(
                f"fdkeeper: handing a kept connection to process {tgid} failed in it ({os.strerror(-result)}); "
                "that call's send failed with it",
                file=sys.stderr,
                flush=True,
            )
        return min(result, 0)

    def forget(self, tgid: int) -> None:
        """The process exec'd or ended: its code is gone."""
        process = self.processes.pop(tgid, None)
        for ours in process.kept.values() if process else ():
            os.close(ours)

    def close(self) -> None:
        for tgid in list(self.processes):
            self.forget(tgid)

    def _there(self, tid: int, process: ProcessCode) -> bool:
        """Our code still in place (an exec replaces the whole address space)."""
        try:
            return self.tracer.read(tid, process.code_at, len(HANDOFF_CODE)) == HANDOFF_CODE
        except OSError:
            return False
