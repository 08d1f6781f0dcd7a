"""The Via rewrite of a per-call connection's later sends, done inside the traced program.

A kept per-call connection's messages after the first (sipp's ACK, BYE...) must name the kept
connection's IP:PORT, not the placeholder's (viarewrite.py). The tracer did that at a seccomp
stop of each send: one ptrace stop per message. Instead, at the first handoff of a process a
page of code is mapped into it (sendstub.c's fdk_send_flags, compiled: STUB_FUNCTION) with a
table beside it, one entry per fd (the kept connection's inode, the placeholder's and the kept
connection's addresses), and the send wrapper the program's first send went through is
patched: its `mov eax, 44` (sendto's number), right before the `syscall`, becomes a jump into
a trampoline that calls fdk_send_flags on the send's arguments, then does that `mov` and jumps
back onto the program's own `syscall`. The function rewrites the buffer of a send on a noted fd
(its inode checked, so a number reused by another socket is left alone) and adds MSG_NOSIGNAL
to its flags when the program ignores SIGPIPE, which the seccomp filter lets by: no stop.

Patched only where it is safe and certain: the 7 bytes `mov eax, 44; syscall` (the shape of
glibc's and musl's send/sendto wrappers), one thread in the process (no other thread can be
running the bytes being changed), the trampoline within a rel32 jump. Anything else keeps the
stop per message, as before. The `syscall` instruction itself is never changed, so the tracer
may still send a thread back onto it (the first send's rerun) and code jumping to it directly
is unaffected.

STUB_FUNCTION is rebuilt with (gcc on x86_64; the test checks the bytes when gcc is there):
  gcc -O2 -ffreestanding -fno-builtin -nostdlib -fPIC -mgeneral-regs-only -fno-stack-protector \
      -fno-asynchronous-unwind-tables -fcf-protection=none -fno-jump-tables -c sendstub.c -o s.o
  objcopy -O binary -j .text s.o s.bin
"""

from __future__ import annotations

import os
import struct

from fdkeeper.modes.ptrace.injection import Injection
from fdkeeper.modes.ptrace.tracer import Tracer

BUILD_FLAGS = (  # how STUB_FUNCTION was compiled (the test rebuilds it)
    "-O2",
    "-ffreestanding",
    "-fno-builtin",
    "-nostdlib",
    "-fPIC",
    "-mgeneral-regs-only",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fcf-protection=none",
    "-fno-jump-tables",
)
STUB_FUNCTION = bytes.fromhex(
    "4885f60f88570100004155415455534889fb4889f74883ec18483b73080f8325010000488d2cf500000000488d443500"
    "48c1e0044801d848837818004c8b48200f8402010000498d41ff4883f83f0f87f40000004989d2488d7424884889cab8"
    "050000000f054885c00f887d010000488b4c2490488d443d0048c1e00448394c03180f85c000000041bb000001004c39"
    "da4c0f46da4883fa03763dba04000000eb0f660f1f4400004883c2014939d3722741807c12fc0d75ef41807c12fd0a75"
    "e741807c12fe0d75df41807c12ff0a75d74989d30f1f40004d39cb0f82030100004801fd31c04531ed48c1e504488d74"
    "2b28488d3c2b4c89cd0f1f800000000031d2498d0c02eb110f1f8400000000004883c2014939d1744f440fb624164438"
    "241174ec4883c001498d2c014939eb73cf4c016b1048833b00740d4c89c080cc40eb080f1f4400004c89c04883c4185b"
    "5d415c415dc3662e0f1f8400000000004c89c0c30f1f40004885c07433450fb66402ff4489e283e2df83ea4180fa1976"
    "a34183ec2d4180fc32771548ba04c0fffffffffbff4c0fa3e273890f1f4400004c39dd733b410fb6142a448d62d031d2"
    "4180fc090f866affffff660f1f4400000fb64417688804114883c2014939d175ef4889e841bd01000000e949ffffff90"
    "31d2ebdc4531ede945ffffff48c7c1ffffffffe97cfeffff"
)
# The trampoline of one patched site (88 bytes), entered in place of `mov eax, 44` with the
# send's arguments in rdi, rsi, rdx, r10, r8 (its address: none for a plain send()), r9:
#     test r8, r8; jnz plain                      (a send with an address: not a connection's)
#     lea rsp, [rsp-128]; push rbx; mov rbx, rsp; and rsp, -16     (past the red zone, aligned)
#     push rdi; push rsi; push rdx; push r8; push r9; push r11
#     mov r8, r10; mov rcx, rdx; mov rdx, rsi; mov rsi, rdi; movabs rdi, TABLE; call FUNCTION
#     mov r10, rax                                (the flags to send with)
#     pop r11; pop r9; pop r8; pop rdx; pop rsi; pop rdi; mov rsp, rbx; pop rbx; lea rsp, [rsp+128]
#     plain: mov eax, 44; jmp SITE+5              (the program's own `syscall`)
TRAMPOLINE_HEAD = bytes.fromhex("4d85c07549488d642480534889e34883e4f05756524150415141534d89d04889d14889f24889fe48bf")
TRAMPOLINE_MIDDLE = bytes.fromhex(
    "49 89 c2 41 5b 41 59 41 58 5a 5e 5f 48 89 dc 5b 48 8d a4 24 80 00 00 00 b8 2c 00 00 00"
)
TRAMPOLINE_SIZE = len(TRAMPOLINE_HEAD) + 8 + 5 + len(TRAMPOLINE_MIDDLE) + 5
SEND_SITE = bytes.fromhex("b82c0000000f05")  # mov eax, 44 (sendto); syscall
JUMP = 0xE9  # jmp rel32
CALL = 0xE8  # call rel32
HEADER = struct.Struct("<QQQ")  # nosignal, entries, messages rewritten (sendstub.c)
ENTRY = struct.Struct("<QQ64s64s")  # the kept connection's inode, length, placeholder, kept (sendstub.c)
MAX_FDS = 1 << 17  # table entries (fds above are left to the stop per message): ~19 MB reserved, not used
PAGE = 4096
FIRST_TRAMPOLINE = 512
PROT_READ_WRITE, PROT_READ_EXEC = 3, 5
MAP_PRIVATE_ANONYMOUS, MAP_32BIT, MAP_NORESERVE = 0x22, 0x40, 0x4000
REACH = 1 << 31


class ProcessStub:
    """The stub's code page and table in one process, and the sites patched to reach it."""

    __slots__ = ("code_at", "sites", "table_at")

    def __init__(self, code_at: int, table_at: int) -> None:
        self.code_at = code_at
        self.table_at = table_at
        self.sites: list[int] = []  # addresses of the patched `mov eax, 44`


class SendStubs:
    """The send stub in each traced process (mapped at its first handoff)."""

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer
        self.processes: dict[int, ProcessStub] = {}

    def place(self, injection: Injection, tgid: int, nosignal: bool) -> None:
        """Map the code and its table into the held program (near its send), unless there."""
        if tgid in self.processes and self._there(injection.tid, self.processes[tgid]):
            return
        self.processes.pop(tgid, None)
        near = injection.syscall_ip
        # A static binary sits low: MAP_32BIT keeps the code within a rel32 jump of it.
        hint, flags = (0, MAP_32BIT) if near < REACH else (max(near - (REACH >> 1), PAGE) & ~(PAGE - 1), 0)
        code_at = injection.check("mmap", hint, PAGE, PROT_READ_EXEC, MAP_PRIVATE_ANONYMOUS | flags, -1, 0)
        size = HEADER.size + MAX_FDS * ENTRY.size
        table_at = injection.check("mmap", 0, size, PROT_READ_WRITE, MAP_PRIVATE_ANONYMOUS | MAP_NORESERVE, -1, 0)
        self.tracer.write(injection.tid, code_at, STUB_FUNCTION)  # /proc/PID/mem may write there
        self.tracer.write(injection.tid, table_at, HEADER.pack(int(nosignal), MAX_FDS, 0))
        self.processes[tgid] = ProcessStub(code_at, table_at)

    def patch(self, tid: int, tgid: int, syscall_ip: int) -> bool:
        """Send the send wrapper whose `syscall` is at ``syscall_ip`` through the stub; True
        when it is (now or already), False when it cannot be (see the module's docstring)."""
        process, site = self.processes.get(tgid), syscall_ip - 5
        if process is None:
            return False
        if site in process.sites:
            return True
        at = process.code_at + FIRST_TRAMPOLINE + TRAMPOLINE_SIZE * len(process.sites)
        if at + TRAMPOLINE_SIZE > process.code_at + PAGE or abs(at - site) >= REACH - PAGE:
            return False
        try:
            if self.tracer.read(tid, site, len(SEND_SITE)) != SEND_SITE or not _one_thread(tgid):
                return False
            self.tracer.write(tid, at, trampoline(at, process.code_at, process.table_at, site))
            self.tracer.write(tid, site, struct.pack("<Bi", JUMP, at - (site + 5)))
        except OSError:
            return False
        process.sites.append(site)
        return True

    def note(self, tid: int, tgid: int, fd: int, inode: int, old: bytes, new: bytes) -> None:
        """fd is now the kept connection of inode ``inode``: its sends get ``new`` for ``old``."""
        process = self.processes.get(tgid)
        if process is None or not process.sites or not 0 <= fd < MAX_FDS or len(old) > 64:
            return
        entry = ENTRY.pack(inode, len(old), old, new)
        self.tracer.write(tid, process.table_at + HEADER.size + fd * ENTRY.size, entry)

    def rewritten(self, tid: int, tgid: int) -> int:
        """Messages the process's stub has rewritten so far (0 without a stub)."""
        process = self.processes.get(tgid)
        if process is None:
            return 0
        try:
            return int(HEADER.unpack(self.tracer.read(tid, process.table_at, HEADER.size))[2])
        except (OSError, struct.error):
            return 0

    def forget(self, tgid: int) -> None:
        """The process exec'd or ended: its stub is gone."""
        self.processes.pop(tgid, None)

    def _there(self, tid: int, process: ProcessStub) -> bool:
        try:
            return self.tracer.read(tid, process.code_at, len(STUB_FUNCTION)) == STUB_FUNCTION
        except OSError:
            return False


def trampoline(at: int, function_at: int, table_at: int, site: int) -> bytes:
    """The trampoline of the site ``site``, placed at ``at`` (see TRAMPOLINE_HEAD)."""
    code = bytearray(TRAMPOLINE_HEAD)
    code += struct.pack("<Q", table_at)
    code += struct.pack("<Bi", CALL, function_at - (at + len(code) + 5))
    code += TRAMPOLINE_MIDDLE
    code += struct.pack("<Bi", JUMP, site + 5 - (at + len(code) + 5))
    return bytes(code)


def _one_thread(tgid: int) -> bool:
    try:
        return len(os.listdir(f"/proc/{tgid}/task")) == 1
    except OSError:
        return False
