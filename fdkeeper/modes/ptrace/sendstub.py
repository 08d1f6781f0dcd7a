"""The Via rewrite of a per-call connection's later sends, done inside the traced program.

A kept per-call connection's messages after the first (sipp's ACK, BYE...) must name the kept
connection's IP:PORT, not the placeholder's (viarewrite.py). The tracer did that at a seccomp
stop of each send: one ptrace stop per message. Instead, at the first handoff of a process a
page of code is mapped into it (sendstub.c's fdk_send_flags: ``stub_function``) with a
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

The function comes from helpers/ptrace/sendstub.c, which `pip install` builds into the
extension fdkeeper._sendstub (setup.py; flags in helpers/shimbuild.py): its bytes are read from
that file's symbol table (``stub_function``). Where it was not built, every later message keeps
its stop, as before.

The program's connect() wrapper (`mov eax, 42; syscall`, the site of the connect the tracer saw
before the process's first handoff) is patched the same way, once the process is known to
make its first sends by plain send() (which the filter stops anyway): its trampoline calls
sendstub.c's fdk_connect, which answers a TCP socket's connect to the SuT with 0, without the
syscall (so without a stop), and notes the socket's inode as pending in the fd's table entry,
where the tracer finds it at the fd's first send (``pending``). Any other connect (another
address, not TCP, a forked child: see sendstub.c) runs the program's own syscall, which the
filter stops as before. One stop fewer per call.

The epoll_ctl() wrapper (`mov eax, 233; syscall`, the site of the EPOLL_CTL_ADD the tracer saw)
is patched with it: its trampoline calls fdk_epoll_ctl, which notes each registration of an fd
in the fd's table entry (read by ``registration`` at the fd's first send, to be made again on
the kept connection) and then makes the call with EPOLL_COOKIE in its 5th argument register
(ignored by the kernel), which the seccomp filter lets by. Stops per call for sipp -t tn: 1,
the first send.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import struct
from collections.abc import Callable
from pathlib import Path

from fdkeeper.modes.ptrace.injection import Injection
from fdkeeper.modes.ptrace.seccomp import EPOLL_COOKIE
from fdkeeper.modes.ptrace.tracer import Tracer

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
# The trampoline of a patched connect() site, entered in place of `mov eax, 42` with the
# connect's arguments in rdi (fd), rsi (address), rdx (its length):
#     lea rsp, [rsp-128]; push rbx; mov rbx, rsp; and rsp, -16     (past the red zone, aligned)
#     push rdi; push rsi; push rdx; push r8; push r9; push r10; push r11; push r11 (pad: aligned)
#     mov rcx, rdx; mov rdx, rsi; mov rsi, rdi; movabs rdi, TABLE; call CONNECT_FUNCTION
#     pop r11; pop r11; pop r10; pop r9; pop r8; pop rdx; pop rsi; pop rdi; mov rsp, rbx; pop rbx
#     lea rsp, [rsp+128]
#     cmp rax, 1; je plain                        (1: not answered by the stub)
#     jmp SITE+7                                  (past the program's `syscall`, rax its result)
#     plain: mov eax, 42; jmp SITE+5              (the program's own `syscall`)
CONNECT_HEAD = bytes.fromhex("488d642480534889e34883e4f0575652415041514152415341534889d14889f24889fe48bf")
CONNECT_MIDDLE = bytes.fromhex("415b415b415a415941585a5e5f4889dc5b488da424800000004883f8017405")
CONNECT_PLAIN = bytes.fromhex("b82a000000")  # mov eax, 42
CONNECT_SITE = bytes.fromhex("b82a0000000f05")  # mov eax, 42 (connect); syscall
# The trampoline of a patched epoll_ctl() site, entered in place of `mov eax, 233` with the
# call's arguments in rdi (epfd), rsi (op), rdx (fd), r10 (event):
#     lea rsp, [rsp-128]; push rbx; mov rbx, rsp; and rsp, -16     (past the red zone, aligned)
#     push rdi; push rsi; push rdx; push r8; push r9; push r10; push r11; push rcx
#     mov r8, r10; mov rcx, rdx; mov rdx, rsi; mov rsi, rdi; movabs rdi, TABLE; call EPOLL_FUNCTION
#     pop rcx; pop r11; pop r10; pop r9; pop r8; pop rdx; pop rsi; pop rdi; mov rsp, rbx; pop rbx
#     lea rsp, [rsp+128]
#     test rax, rax; jz plain                     (0: not noted, a forked child's: the filter stops it)
#     lea rsp, [rsp-128]; push r8                 (r8 as the program had it, as a syscall keeps it)
#     mov r8d, EPOLL_COOKIE                       (5th argument: the filter lets the call by)
#     mov eax, 233; syscall; pop r8; lea rsp, [rsp+128]; jmp SITE+7      (past the program's `syscall`)
#     plain: mov eax, 233; jmp SITE+5             (the program's own `syscall`)
EPOLL_HEAD = bytes.fromhex("488d642480534889e34883e4f05756524150415141524153514d89d04889d14889f24889fe48bf")
EPOLL_MIDDLE = bytes.fromhex("59415b415a415941585a5e5f4889dc5b488da424800000004885c07423488d642480415041b8")
EPOLL_CALL = bytes.fromhex("b8e90000000f054158488da42480000000")  # after the cookie: the call, r8 back
EPOLL_PLAIN = bytes.fromhex("b8e9000000")  # mov eax, 233
EPOLL_SITE = bytes.fromhex("b8e90000000f05")  # mov eax, 233 (epoll_ctl); syscall
MAX_SUT_ADDRESS = 32  # bytes of the SuT's sockaddr the table holds (sendstub.c SUT_ADDRESS)
JUMP = 0xE9  # jmp rel32
CALL = 0xE8  # call rel32
# nosignal, entries, messages rewritten, the process (tgid), the SuT's sockaddr's length and bytes (sendstub.c)
HEADER = struct.Struct("<QQQQQ32s")
COUNTERS = struct.Struct("<QQQ")  # the header's first three
SUT_AT = COUNTERS.size + 8  # the header's SuT sockaddr's length, then its bytes
# The kept connection's inode, length, placeholder, kept, the pending socket's inode, and the
# epoll registration noted: the socket's inode, epfd, events, data, in more than one set (sendstub.c)
ENTRY = struct.Struct("<QQ64s64sQQqQQQ")
PENDING_AT = struct.calcsize("<QQ64s64s")
REGISTRATION = struct.Struct("<QqQQQ")  # from ``added`` on
MAX_FDS = 1 << 17  # table entries (fds above are left to the stop per message): ~19 MB reserved, not used
PAGE = 4096
FUNCTION_ROOM = 768  # each function at most this long: the send's at 0, the connect's, epoll_ctl's
CONNECT_FUNCTION_AT = FUNCTION_ROOM
EPOLL_FUNCTION_AT = 2 * FUNCTION_ROOM
FIRST_TRAMPOLINE = 3 * FUNCTION_ROOM  # the functions first, then the trampolines
PROT_READ_WRITE, PROT_READ_EXEC = 3, 5
MAP_PRIVATE_ANONYMOUS, MAP_32BIT, MAP_NORESERVE = 0x22, 0x40, 0x4000
REACH = 1 << 31


STUB_MODULE = "fdkeeper._sendstub"  # built by pip install (setup.py)
STUB_SYMBOL = b"fdk_send_flags"
CONNECT_SYMBOL = b"fdk_connect"
EPOLL_SYMBOL = b"fdk_epoll_ctl"
_ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")  # Elf64_Ehdr
_SECTION = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr: name type flags addr offset size link info align entsize
_SYMBOL = struct.Struct("<IBBHQQ")  # Elf64_Sym: name info other shndx value size
_ELF64_LE_X86_64 = (b"\x7fELF\x02\x01", 62)
_SHT_DYNSYM = 11


def stub_function() -> bytes | None:
    """fdk_send_flags's bytes, read from the built fdkeeper._sendstub; None where it was not built
    or holds no such function that fits its room in the code page."""
    return library_function(STUB_SYMBOL)


@functools.cache
def library_function(symbol: bytes) -> bytes | None:
    """The bytes of ``symbol`` in the built fdkeeper._sendstub (None: not built, not there, or
    longer than FUNCTION_ROOM)."""
    spec = importlib.util.find_spec(STUB_MODULE)
    if spec is None or not spec.origin:
        return None
    try:
        code = elf_function(Path(spec.origin).read_bytes(), symbol)
    except (OSError, ValueError, IndexError, struct.error):
        return None
    return code if code and len(code) <= FUNCTION_ROOM else None


def elf_function(image: bytes, name: bytes) -> bytes | None:
    """The bytes of the function ``name`` in an x86-64 ELF shared object, found in its dynamic
    symbol table (None: not there). ValueError or struct.error for a file that is not one."""
    header = _ELF_HEADER.unpack_from(image)
    if (header[0][:6], header[2]) != _ELF64_LE_X86_64:
        raise ValueError("not an x86-64 ELF file")
    section_at, section_size, count = header[6], header[11], header[12]
    sections = [_SECTION.unpack_from(image, section_at + i * section_size) for i in range(count)]
    for table in (section for section in sections if section[1] == _SHT_DYNSYM):
        strings_at = sections[table[6]][4]
        for at in range(table[4], table[4] + table[5], _SYMBOL.size):
            name_at, _info, _other, index, value, size = _SYMBOL.unpack_from(image, at)
            start = strings_at + name_at
            if image[start : image.index(b"\0", start)] == name and 0 < index < len(sections):
                code = sections[index]
                offset = code[4] + value - code[3]  # the section's place in the file, plus the symbol's in it
                return image[offset : offset + size]
    return None


class ProcessStub:
    """The stub's code page and table in one process, and the sites patched to reach it."""

    __slots__ = ("code_at", "next_trampoline", "sites", "table_at")

    def __init__(self, code_at: int, table_at: int) -> None:
        self.code_at = code_at
        self.table_at = table_at
        # Each kind of wrapper's patched sites (the address of their `mov eax, N`).
        self.sites: dict[Wrapper, list[int]] = {wrapper: [] for wrapper in WRAPPERS}
        self.next_trampoline = code_at + FIRST_TRAMPOLINE


class SendStubs:
    """The send stub in each traced process (mapped at its first handoff)."""

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer
        self.processes: dict[int, ProcessStub] = {}
        self.counted: dict[int, int] = {}  # tgid -> messages its program's stub rewrote, as last read
        self.counted_before_exec = 0  # those of stubs an exec took away with their program

    def place(self, injection: Injection, tgid: int, nosignal: bool) -> None:
        """Map the code and its table into the held program (near its send), unless there."""
        code = stub_function()
        if code is None or (tgid in self.processes and self._there(injection.tid, self.processes[tgid], code)):
            return
        self.forget(tgid)  # an earlier program's, if any
        near = injection.syscall_ip
        # A static binary sits low: MAP_32BIT keeps the code within a rel32 jump of it.
        hint, flags = (0, MAP_32BIT) if near < REACH else (max(near - (REACH >> 1), PAGE) & ~(PAGE - 1), 0)
        code_at = injection.check("mmap", hint, PAGE, PROT_READ_EXEC, MAP_PRIVATE_ANONYMOUS | flags, -1, 0)
        size = HEADER.size + MAX_FDS * ENTRY.size
        table_at = injection.check("mmap", 0, size, PROT_READ_WRITE, MAP_PRIVATE_ANONYMOUS | MAP_NORESERVE, -1, 0)
        for wrapper in WRAPPERS:  # each function in its room (the send's among them: code)
            function = library_function(wrapper.symbol)
            if function is not None:  # /proc/PID/mem may write there, into a read-exec page
                self.tracer.write(injection.tid, code_at + wrapper.function_at, function)
        self.tracer.write(injection.tid, table_at, HEADER.pack(int(nosignal), MAX_FDS, 0, tgid, 0, b""))
        self.processes[tgid] = ProcessStub(code_at, table_at)

    def patch(self, tid: int, tgid: int, syscall_ip: int) -> bool:
        """Send the send wrapper whose `syscall` is at ``syscall_ip`` through the stub; True
        when it is (now or already), False when it cannot be (see the module's docstring)."""
        return self._patch(SEND, tid, tgid, syscall_ip)

    def patch_connect(self, tid: int, tgid: int, syscall_ip: int, sut: bytes) -> bool:
        """Send the connect wrapper whose `syscall` is at ``syscall_ip`` through fdk_connect, which
        answers the connects of TCP sockets to ``sut`` (the sockaddr's bytes as the program passed
        them) by itself; True when it is (now or already)."""
        if not 0 < len(sut) <= MAX_SUT_ADDRESS:
            return False
        # The SuT in the table before the jump: the function answers nothing until it names one.
        return self._patch(CONNECT, tid, tgid, syscall_ip, (SUT_AT, struct.pack("<Q32s", len(sut), sut)))

    def patch_epoll(self, tid: int, tgid: int, syscall_ip: int) -> bool:
        """Send the epoll_ctl() wrapper whose `syscall` is at ``syscall_ip`` through fdk_epoll_ctl
        (see the module's docstring); True when it is (now or already)."""
        return self._patch(EPOLL, tid, tgid, syscall_ip)

    def registration(self, tid: int, tgid: int, fd: int, inode: int) -> list[tuple[int, int, int]] | None:
        """The epoll registration fdk_epoll_ctl noted for the socket ``inode`` on ``fd``, as
        epoll.Registrations gives them; None when it noted none (or more than one set)."""
        process = self.processes.get(tgid)
        if process is None or not process.sites[EPOLL] or not 0 <= fd < MAX_FDS:
            return None
        at = process.table_at + HEADER.size + fd * ENTRY.size + PENDING_AT + 8
        try:
            added, epfd, events, data, many = REGISTRATION.unpack(self.tracer.read(tid, at, REGISTRATION.size))
        except (OSError, struct.error):
            return None
        return [(epfd, events, data)] if added == inode and not many else None

    def pending(self, tid: int, tgid: int, fd: int) -> int:
        """The inode of the socket whose connect() fdk_connect answered on ``fd`` and which has not
        sent yet (0: none); read and cleared, so that it is handed over once."""
        process = self.processes.get(tgid)
        if process is None or not process.sites[CONNECT] or not 0 <= fd < MAX_FDS:
            return 0
        at = process.table_at + HEADER.size + fd * ENTRY.size + PENDING_AT
        try:
            (inode,) = struct.unpack("<Q", self.tracer.read(tid, at, 8))
            if inode:
                self.tracer.write(tid, at, bytes(8))
        except (OSError, struct.error):
            return 0
        return int(inode)

    def _patch(
        self, wrapper: Wrapper, tid: int, tgid: int, syscall_ip: int, table_first: tuple[int, bytes] = (0, b"")
    ) -> bool:
        """Send the ``wrapper`` whose `syscall` is at ``syscall_ip`` through its stub function, and
        record its site; True when it is (now or already). ``table_first``: bytes written at that
        offset of the table before the site is patched (what the function must know first)."""
        process, site = self.processes.get(tgid), syscall_ip - 5
        if process is None or library_function(wrapper.symbol) is None:
            return False
        sites = process.sites[wrapper]
        if site in sites or (sites and wrapper.one_site):
            return site in sites
        if not self._patch_site(tid, tgid, process, wrapper, site, table_first):
            return False
        sites.append(site)
        return True

    def _patch_site(
        self, tid: int, tgid: int, process: ProcessStub, wrapper: Wrapper, site: int, table_first: tuple[int, bytes]
    ) -> bool:
        """The wrapper's trampoline placed at the process's next free room and the `mov` at
        ``site`` made a jump to it: only where it is certain to be safe (see the module's docstring)."""
        at = process.next_trampoline
        code = wrapper.trampoline(at, process.code_at + wrapper.function_at, process.table_at, site)
        if at + len(code) > process.code_at + PAGE or abs(at - site) >= REACH - PAGE:
            return False
        offset, first = table_first
        try:
            if self.tracer.read(tid, site, len(wrapper.shape)) != wrapper.shape or not _one_thread(tgid):
                return False
            if first:
                self.tracer.write(tid, process.table_at + offset, first)
            self.tracer.write(tid, at, code)
            self.tracer.write(tid, site, struct.pack("<Bi", JUMP, at - (site + 5)))
        except OSError:
            return False
        process.next_trampoline = at + len(code)
        return True

    def note(self, tid: int, tgid: int, fd: int, inode: int, old: bytes, new: bytes) -> None:
        """fd is now the kept connection of inode ``inode``: its sends get ``new`` for ``old``."""
        process = self.processes.get(tgid)
        if process is None or not process.sites[SEND] or not 0 <= fd < MAX_FDS or len(old) > 64:
            return
        entry = ENTRY.pack(inode, len(old), old, new, 0, 0, 0, 0, 0, 0)  # the kept connection there, nothing else
        self.tracer.write(tid, process.table_at + HEADER.size + fd * ENTRY.size, entry)

    def count(self, tid: int, tgid: int) -> None:
        """Read what the process's stub has rewritten so far, while its memory is there: at a
        thread's exit, and at an exec's entry (the exec takes the stub's page with the program)."""
        if tgid not in self.processes:
            return
        try:
            rewritten = COUNTERS.unpack(self.tracer.read(tid, self.processes[tgid].table_at, COUNTERS.size))[2]
        except (OSError, struct.error):
            return
        # The counter only grows while its program lives: the largest read is the latest.
        self.counted[tgid] = max(self.counted.get(tgid, 0), int(rewritten))

    def rewritten(self) -> int:
        """Messages the stubs rewrote, as last counted: those of programs an exec replaced too."""
        return self.counted_before_exec + sum(self.counted.values())

    def forget(self, tgid: int) -> None:
        """The process exec'd: its stub is gone, what it rewrote (counted at the exec's entry) stays."""
        self.processes.pop(tgid, None)
        self.counted_before_exec += self.counted.pop(tgid, 0)

    def _there(self, tid: int, process: ProcessStub, code: bytes) -> bool:
        try:
            return self.tracer.read(tid, process.code_at, len(code)) == code
        except OSError:
            return False


def trampoline(at: int, function_at: int, table_at: int, site: int) -> bytes:
    """The trampoline of the send site ``site``, placed at ``at`` (see TRAMPOLINE_HEAD)."""
    return _code(at, table_at, function_at, TRAMPOLINE_HEAD, TRAMPOLINE_MIDDLE, site + 5)


def epoll_trampoline(at: int, function_at: int, table_at: int, site: int) -> bytes:
    """The trampoline of the epoll_ctl() site ``site``, placed at ``at`` (see EPOLL_HEAD)."""
    middle = EPOLL_MIDDLE + struct.pack("<I", EPOLL_COOKIE) + EPOLL_CALL
    return _code(at, table_at, function_at, EPOLL_HEAD, middle, site + 7, EPOLL_PLAIN, site + 5)


def connect_trampoline(at: int, function_at: int, table_at: int, site: int) -> bytes:
    """The trampoline of the connect() site ``site``, placed at ``at`` (see CONNECT_HEAD)."""
    return _code(at, table_at, function_at, CONNECT_HEAD, CONNECT_MIDDLE, site + 7, CONNECT_PLAIN, site + 5)


def _code(at: int, table_at: int, function_at: int, head: bytes, *rest: bytes | int) -> bytes:
    """A trampoline placed at ``at``: ``head`` (ending in movabs rdi's opcode), the table's
    address, a call of the function, then ``rest``: bytes as they are, an int a jmp rel32 there."""
    code = bytearray(head) + struct.pack("<Q", table_at)
    code += struct.pack("<Bi", CALL, function_at - (at + len(code) + 5))
    for part in rest:
        code += part if isinstance(part, bytes) else struct.pack("<Bi", JUMP, part - (at + len(code) + 5))
    return bytes(code)


class Wrapper:
    """A kind of the program's syscall wrapper that is patched to reach the stub: the bytes at its
    site, the stub function its trampoline calls, and whether a process has one such site only."""

    __slots__ = ("function_at", "one_site", "shape", "symbol", "trampoline")

    def __init__(
        self,
        shape: bytes,
        symbol: bytes,
        function_at: int,
        trampoline: Callable[[int, int, int, int], bytes],
        one_site: bool,
    ) -> None:
        self.shape = shape  # `mov eax, N; syscall`: only exactly these bytes are patched
        self.symbol = symbol  # the stub function its trampoline calls (sendstub.c)
        self.function_at = function_at  # that function's room in the code page
        self.trampoline = trampoline  # (at, function_at, table_at, site) -> the trampoline's bytes
        # connect() and epoll_ctl(): the one site seen before the first handoff; send: each
        # wrapper a first send went through.
        self.one_site = one_site


SEND = Wrapper(SEND_SITE, STUB_SYMBOL, 0, trampoline, one_site=False)
CONNECT = Wrapper(CONNECT_SITE, CONNECT_SYMBOL, CONNECT_FUNCTION_AT, connect_trampoline, one_site=True)
EPOLL = Wrapper(EPOLL_SITE, EPOLL_SYMBOL, EPOLL_FUNCTION_AT, epoll_trampoline, one_site=True)
WRAPPERS = (SEND, CONNECT, EPOLL)


def _one_thread(tgid: int) -> bool:
    try:
        return len(os.listdir(f"/proc/{tgid}/task")) == 1
    except OSError:
        return False
