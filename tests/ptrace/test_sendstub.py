"""The send stub (fdkeeper/modes/ptrace/sendstub.py) run in this process: same rewrite as the tracer's.

The function pip built (fdkeeper/_sendstub*.so, read as the ptrace mode reads it) and a patched
send wrapper are mapped here, executable, and called through ctypes: what a traced sipp runs at
each later send of a kept per-call connection.
"""

from __future__ import annotations

import ctypes
import errno
import importlib.util
import mmap
import os
import select
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from fdkeeper.modes.ptrace import sendstub
from fdkeeper.modes.ptrace.sendstub import (
    CONNECT_SYMBOL,
    COUNTERS,
    ENTRY,
    EPOLL_SYMBOL,
    HEADER,
    PENDING_AT,
    REGISTRATION,
    STUB_SYMBOL,
    ProcessStub,
    SendStubs,
    elf_function,
    stub_function,
)
from fdkeeper.modes.ptrace.tracer import Tracer
from fdkeeper.modes.ptrace.viarewrite import Rewrite
from tests.support.shim import SENDSTUB_CFLAGS, WERROR, sendstub_source

MSG_NOSIGNAL = 0x4000
OLD, NEW = b"127.0.0.1:40001", b"127.0.0.1:51234"
FDS = 1024
MESSAGES = [
    b"INVITE sip:bob@x SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:40001;branch=z9\r\n"
    b"Contact: <sip:alice@127.0.0.1:40001;transport=tcp>\r\nContent-Length: 20\r\n\r\nc=IN IP4 127.0.0.1:40001",
    b"ACK sip:bob@x SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:400012;x\r\nX: 9127.0.0.1:40001\r\n\r\n",  # not whole
    b"BYE sip:bob@x SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:40001\r\n",  # no blank line: all looked at
    b"127.0.0.1:40001",
    b"",
]


MOV_R10_RCX = bytes.fromhex("4989ca")  # a wrapper's 4th argument into the syscall's register


class Patched:
    """A syscall wrapper (page 0: ``prefix``, the ``wrapper`` kind's `mov eax, N; syscall`, ret), its
    `mov` patched to the kind's trampoline, which calls the built stub function (page 1), and a
    table, in executable memory: what a traced sipp runs at that call."""

    def __init__(self, wrapper: sendstub.Wrapper, prefix: bytes = b"") -> None:
        self.code = mmap.mmap(-1, 2 * mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self.table = mmap.mmap(-1, HEADER.size + FDS * ENTRY.size)
        self.code_at, self.table_at = address_of(self.code), address_of(self.table)
        function = sendstub.library_function(wrapper.symbol)
        assert function is not None, "fdkeeper/_sendstub*.so not built: bash .ci/install"
        self.code[0 : len(prefix) + len(wrapper.shape) + 1] = prefix + wrapper.shape + b"\xc3"
        self.function_at, site = self.code_at + mmap.PAGESIZE, self.code_at + len(prefix)
        trampoline_at = self.function_at + sendstub.FIRST_TRAMPOLINE
        self.code[mmap.PAGESIZE : mmap.PAGESIZE + len(function)] = function
        self.trampoline = wrapper.trampoline(trampoline_at, self.function_at, self.table_at, site)
        at = trampoline_at - self.code_at
        self.code[at : at + len(self.trampoline)] = self.trampoline
        self.code[len(prefix) : len(prefix) + 5] = struct.pack("<Bi", sendstub.JUMP, trampoline_at - (site + 5))

    def header(self, nosignal: bool = True, tgid: int = 0, sut: bytes = b"") -> None:
        self.table[0 : HEADER.size] = HEADER.pack(int(nosignal), FDS, 0, tgid, len(sut), sut)


class Stub(Patched):
    """The send stub and a sendto() wrapper (mov r10, rcx; mov eax, 44; syscall; ret) patched to it."""

    def __init__(self) -> None:
        super().__init__(sendstub.SEND, MOV_R10_RCX)
        assert len(self.trampoline) == sendstub.TRAMPOLINE_SIZE
        args = (ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_long)
        self.flags_for = ctypes.CFUNCTYPE(ctypes.c_long, *args)(self.function_at)
        self.sendto = ctypes.CFUNCTYPE(ctypes.c_long, *args[1:], ctypes.c_void_p, ctypes.c_int)(self.code_at)

    def note(self, fd: int, inode: int) -> None:
        at = HEADER.size + fd * ENTRY.size
        self.table[at : at + ENTRY.size] = ENTRY.pack(inode, len(OLD), OLD, NEW, 0, 0, 0, 0, 0, 0)

    def rewritten(self) -> int:
        return int(COUNTERS.unpack(self.table[0 : COUNTERS.size])[2])


def address_of(area: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(area))


@pytest.fixture
def stub():
    made = Stub()
    made.header(nosignal=True)
    yield made
    del made.flags_for, made.sendto


@pytest.fixture
def pair():
    ends = socket.socketpair()
    yield ends
    for end in ends:
        end.close()


@pytest.mark.parametrize("message", MESSAGES)
def test_the_stub_rewrites_as_the_tracer_does(stub, pair, message):
    stub.note(pair[0].fileno(), os.fstat(pair[0].fileno()).st_ino)
    buf = ctypes.create_string_buffer(message, len(message))
    flags = stub.flags_for(stub.table_at, pair[0].fileno(), buf, len(message), 0x40)
    assert buf.raw == Rewrite(OLD, NEW).apply(message)
    assert flags == 0x40 | MSG_NOSIGNAL  # a kept fd's send: no seccomp stop
    assert stub.rewritten() == int(buf.raw != message)


def test_another_socket_on_the_number_or_no_entry_is_left_alone(stub, pair):
    message = MESSAGES[0]
    buf = ctypes.create_string_buffer(message, len(message))
    stub.note(pair[0].fileno(), os.fstat(pair[1].fileno()).st_ino)  # the number now names another socket
    assert stub.flags_for(stub.table_at, pair[0].fileno(), buf, len(message), 0) == 0  # the filter stops it
    assert stub.flags_for(stub.table_at, pair[1].fileno(), buf, len(message), 0) == 0  # no entry
    assert stub.flags_for(stub.table_at, FDS + 5, buf, len(message), 0) == 0  # beyond the table
    assert buf.raw == message and stub.rewritten() == 0


def test_without_sigpipe_ignored_the_flags_stay(stub, pair):
    stub.header(nosignal=False)
    stub.note(pair[0].fileno(), os.fstat(pair[0].fileno()).st_ino)
    buf = ctypes.create_string_buffer(MESSAGES[0], len(MESSAGES[0]))
    assert stub.flags_for(stub.table_at, pair[0].fileno(), buf, len(MESSAGES[0]), 0) == 0
    assert buf.raw == Rewrite(OLD, NEW).apply(MESSAGES[0])


def test_a_patched_send_wrapper_sends_the_rewritten_message(stub, pair):
    stub.note(pair[0].fileno(), os.fstat(pair[0].fileno()).st_ino)
    message = MESSAGES[0]
    buf = ctypes.create_string_buffer(message, len(message))
    assert stub.sendto(pair[0].fileno(), buf, len(message), 0, None, 0) == len(message)
    assert pair[1].recv(4096) == Rewrite(OLD, NEW).apply(message)
    plain = ctypes.create_string_buffer(message, len(message))
    assert stub.sendto(pair[1].fileno(), plain, len(message), 0, None, 0) == len(message)  # not a kept fd
    assert pair[0].recv(4096) == message


def test_a_send_with_an_address_goes_straight_through(stub):
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as to,
    ):
        to.bind(("127.0.0.1", 0))
        stub.note(sender.fileno(), os.fstat(sender.fileno()).st_ino)
        address = struct.pack(
            "<HH4s8x", socket.AF_INET, socket.htons(to.getsockname()[1]), socket.inet_aton("127.0.0.1")
        )
        message = MESSAGES[0]
        buf = ctypes.create_string_buffer(message, len(message))
        assert stub.sendto(sender.fileno(), buf, len(message), 0, address, len(address)) == len(message)
        assert to.recv(4096) == message and stub.rewritten() == 0


@pytest.mark.skipif(not (shutil.which("gcc") and shutil.which("readelf")), reason="no gcc/readelf")
def test_the_stub_function_is_whole_in_itself(tmp_path):
    """Its bytes are copied alone into the traced program: no call, no data, no relocation."""
    out = tmp_path / "sendstub.o"
    subprocess.run(["gcc", *SENDSTUB_CFLAGS, *WERROR, "-c", sendstub_source(), "-o", str(out)], check=True)
    relocations = subprocess.run(["readelf", "-r", str(out)], capture_output=True, text=True, check=True).stdout
    symbols = subprocess.run(["nm", str(out)], capture_output=True, text=True, check=True).stdout.split("\n")
    assert "There are no relocations in this file." in relocations
    found = sorted(line.split()[1:] for line in symbols if line)
    assert found == [["T", CONNECT_SYMBOL.decode()], ["T", EPOLL_SYMBOL.decode()], ["T", STUB_SYMBOL.decode()]]


def test_the_function_is_read_from_the_built_library_by_its_symbol():
    spec = importlib.util.find_spec(sendstub.STUB_MODULE)
    assert spec is not None and spec.origin, "fdkeeper/_sendstub*.so not built: bash .ci/install"
    library = Path(spec.origin).read_bytes()
    assert stub_function() == elf_function(library, b"fdk_send_flags")
    assert elf_function(library, b"fdk_no_such_function") is None
    with pytest.raises(ValueError):
        elf_function(Path(sendstub.__file__).read_bytes(), b"fdk_send_flags")


class ConnectStub(Patched):
    """fdk_connect and a connect wrapper (mov eax, 42; syscall; ret) patched to its trampoline,
    with a table naming process ``tgid`` and ``sut``'s sockaddr: what a traced sipp runs at connect()."""

    def __init__(self, sut: bytes, tgid: int) -> None:
        super().__init__(sendstub.CONNECT)
        self.header(tgid=tgid, sut=sut)
        self.connect = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long, ctypes.c_char_p, ctypes.c_ulong)(self.code_at)

    def pending(self, fd: int) -> int:
        at = HEADER.size + fd * ENTRY.size + PENDING_AT
        return int(struct.unpack("<Q", self.table[at : at + 8])[0])


def sockaddr_in(address: tuple[str, int]) -> bytes:
    return struct.pack("<H", socket.AF_INET) + struct.pack(">H", address[1]) + socket.inet_aton(address[0]) + bytes(8)


@pytest.fixture
def sut():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield listener


def test_a_tcp_connect_to_the_sut_is_answered_and_noted_pending(sut):
    address = sockaddr_in(sut.getsockname())
    stub = ConnectStub(address, os.getpid())
    with socket.socket() as program_socket:
        fd = program_socket.fileno()
        assert stub.connect(fd, address, len(address)) == 0
        assert stub.pending(fd) == os.fstat(fd).st_ino
        with pytest.raises(OSError):
            program_socket.getpeername()  # not connected: the kept connection takes its place
        assert stub.connect(fd, address, len(address)) == -errno.EISCONN
    del stub.connect


def test_any_other_connect_is_the_programs_own(sut):
    """Another address, a UDP socket, another process (a forked child): the real syscall."""
    address = sockaddr_in(sut.getsockname())
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        elsewhere = sockaddr_in(closed.getsockname())  # bound, not listening: refused
    stub = ConnectStub(address, os.getpid())
    child = ConnectStub(address, os.getpid() + 1)
    with socket.socket() as other, socket.socket(type=socket.SOCK_DGRAM) as udp, socket.socket() as forked:
        assert stub.connect(other.fileno(), elsewhere, len(elsewhere)) == -errno.ECONNREFUSED
        assert stub.connect(udp.fileno(), address, len(address)) == 0
        assert udp.getpeername() == sut.getsockname()
        assert child.connect(forked.fileno(), address, len(address)) == 0
        assert forked.getpeername() == sut.getsockname()  # really connected
        assert stub.pending(other.fileno()) == stub.pending(udp.fileno()) == child.pending(forked.fileno()) == 0
    del stub.connect, child.connect


class EpollStub(Patched):
    """fdk_epoll_ctl and an epoll_ctl wrapper (mov r10, rcx; mov eax, 233; syscall; ret) patched to
    its trampoline, with a table naming process ``tgid``: what a traced sipp runs at epoll_ctl()."""

    def __init__(self, tgid: int) -> None:
        super().__init__(sendstub.EPOLL, MOV_R10_RCX)
        self.header(tgid=tgid)
        args = (ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_char_p)
        self.epoll_ctl = ctypes.CFUNCTYPE(ctypes.c_long, *args)(self.code_at)

    def noted(self, fd: int) -> tuple[int, ...]:
        at = HEADER.size + fd * ENTRY.size + PENDING_AT + 8
        return REGISTRATION.unpack(self.table[at : at + REGISTRATION.size])


def event(events: int, data: int) -> bytes:
    return struct.pack("<IQ", events, data)


def test_epoll_ctl_is_made_and_its_registration_noted(pair):
    stub = EpollStub(os.getpid())
    with select.epoll() as epoll:
        fd, ino = pair[0].fileno(), os.fstat(pair[0].fileno()).st_ino
        assert stub.epoll_ctl(epoll.fileno(), 1, fd, event(select.EPOLLIN, 77)) == 0  # ADD
        pair[1].send(b"x")
        assert epoll.poll(1) == [(77, select.EPOLLIN)]  # made, with the program's data
        assert stub.noted(fd) == (ino, epoll.fileno(), select.EPOLLIN, 77, 0)
        assert stub.epoll_ctl(epoll.fileno(), 3, fd, event(select.EPOLLOUT, 78)) == 0  # MOD
        assert stub.noted(fd) == (ino, epoll.fileno(), select.EPOLLOUT, 78, 0)
        with select.epoll() as other:
            assert stub.epoll_ctl(other.fileno(), 1, fd, event(select.EPOLLIN, 79)) == 0
            assert stub.noted(fd)[4] == 1  # in two sets: the tracer reads /proc
        assert stub.epoll_ctl(epoll.fileno(), 2, fd, None) == 0  # DEL
        assert stub.noted(fd)[0] == 0
        assert stub.epoll_ctl(epoll.fileno(), 2, fd, None) == -errno.ENOENT  # the kernel's own answer
    del stub.epoll_ctl


def test_another_process_epoll_ctl_is_not_noted(pair):
    stub = EpollStub(os.getpid() + 1)  # a forked child's view of its parent's table
    with select.epoll() as epoll:
        assert stub.epoll_ctl(epoll.fileno(), 1, pair[0].fileno(), event(select.EPOLLIN, 1)) == 0
        assert stub.noted(pair[0].fileno())[0] == 0
    del stub.epoll_ctl


def test_what_a_stub_rewrote_before_an_exec_stays_counted():
    """An exec takes the stub's page, and its count, with the program: the count read at the exec's
    entry is kept and added to the next program's stub's, which counts from 0 again. An exec that
    fails leaves the program, and its stub counting on: counted once."""
    tracer, pid = Tracer(os.getpid()), os.getpid()  # this process's memory, read as a traced one's
    stubs = SendStubs(tracer)

    def stub_of_a_program(rewritten: int) -> mmap.mmap:
        table = mmap.mmap(-1, HEADER.size)
        table[0 : HEADER.size] = HEADER.pack(1, FDS, rewritten, pid, 0, b"")
        stubs.processes[pid] = ProcessStub(0, address_of(table))
        return table

    try:
        before = stub_of_a_program(rewritten=3)
        stubs.count(pid, pid)  # an execve() that fails
        before[0 : HEADER.size] = HEADER.pack(1, FDS, 4, pid, 0, b"")
        stubs.count(pid, pid)  # at the execve() that succeeds
        stubs.forget(pid)  # its event
        after = stub_of_a_program(rewritten=1)
        stubs.count(pid, pid)  # a thread's exit
        after[0 : HEADER.size] = HEADER.pack(1, FDS, 2, pid, 0, b"")
        stubs.count(pid, pid)  # the last one's
        assert stubs.rewritten() == 4 + 2
    finally:
        tracer._forget_memory()  # its /proc/PID/mem
