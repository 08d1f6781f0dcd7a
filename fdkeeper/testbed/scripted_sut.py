"""A scripted SuT and scripted runs, for tests that drive a real keeper step by step.

``ScriptedSut`` is a TCP or TLS server on loopback, served by one thread, that does only what
it is told, connection by connection: read at full speed, at a given rate or not at all, send
a request, end its side with a FIN, a TLS close_notify or an RST. It records every whole SIP
message it received, and how each connection ended and who ended it first. TLS is driven
through memory BIOs so that a close_notify is one direction only: the SuT goes on reading
after it, as it does after a FIN (a half-close), and the thread alone touches OpenSSL.

``ScriptedRun`` is a run: a process of its own (the keeper grants a lease to a process and
ends it when that process exits) that leases the kept connection over the control protocol,
then writes whole SIP messages (or the first bytes of one), reads what the SuT sent, exits or
is SIGKILLed, on command over a pipe. Runs are forked by a forkserver: a few milliseconds
each, and no fork of the test process with the SuT's thread running.

Messages carry their identity in the Call-ID (``run-N`` towards the SuT, ``sut-N`` from it);
``sip_message`` makes the bytes from that identity alone, so both ends can check a message is
exactly the one that was written.
"""

from __future__ import annotations

import errno
import multiprocessing
import multiprocessing.connection
import os
import queue
import re
import select
import signal
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from fdkeeper.address import format_address
from fdkeeper.sip.framing import SipFramer
from fdkeeper.tcp import unsent_bytes
from fdkeeper.testbed.net import bind_fresh_port, wait_until

_Value = TypeVar("_Value")
_Outcome = TypeVar("_Outcome", "WriteOutcome", "ReadOutcome")

CALL_ID = re.compile(rb"\r\nCall-ID: ([^\r\n]+)\r\n")
TICK = 0.005  # the SuT thread's longest sleep: command latency and rate-limit granularity
FULL_SPEED = None  # a reading rate: as fast as the keeper sends
PAUSED = 0


def sip_message(call_id: str, body_size: int = 0) -> bytes:
    """A SIP request whose bytes follow from its Call-ID and body size alone."""
    body = (call_id.encode() * (body_size // max(1, len(call_id)) + 1))[:body_size]
    return (
        f"MESSAGE sip:sut@fdkeeper.test SIP/2.0\r\nCall-ID: {call_id}\r\nCSeq: 1 MESSAGE\r\n"
        f"Content-Length: {body_size}\r\n\r\n"
    ).encode() + body


def call_id_of(message: bytes) -> str:
    found = CALL_ID.search(message)
    return found.group(1).decode() if found else "?"


# --------------------------------------------------------------------------- the SuT


@dataclass
class SutConnection:
    """One connection the keeper opened to the SuT, as the SuT sees it."""

    raw: socket.socket
    peer: str  # the keeper's side: what a lease's locals= names
    tls: ssl.SSLObject | None = None
    incoming: ssl.MemoryBIO | None = None
    outgoing: ssl.MemoryBIO | None = None
    handshaken: bool = False
    rate: float | None = FULL_SPEED
    allowance: float = 0.0
    framer: SipFramer = field(default_factory=SipFramer)
    pings_answered: int = 0
    received: list[bytes] = field(default_factory=list)
    garbage: str = ""  # set when the stream could not be cut into messages
    to_send: bytearray = field(default_factory=bytearray)  # raw bytes for the wire
    sut_ended: str = ""  # how the SuT ended its side: fin, close_notify, rst
    keeper_ended: str = ""  # what the SuT saw of the keeper's side: eof, close_notify, reset
    reading: bool = True  # False once the SuT's side neither reads nor writes any more

    @property
    def ready(self) -> bool:
        return self.tls is None or self.handshaken


class ScriptedSut:
    """A loopback SIP server (TCP, or TLS with ``cert``/``key``) that does what it is told.

    ``narrow=True`` gives its connections a 16 KiB receive buffer and 536-byte segments: on
    loopback the keeper's send buffer grows with the segment size (to 4 MB with loopback's
    64 KiB), so a slow SuT reaches the keeper's own writes only after megabytes; narrow, within
    a few hundred kB, as over a real network.
    """

    def __init__(self, cert: Path | None = None, key: Path | None = None, *, narrow: bool = False) -> None:
        self.context: ssl.SSLContext | None = None
        if cert is not None:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(cert, key)
        self.listener = socket.socket()
        if narrow:  # inherited by accepted sockets; set before listen() to shape the handshake's window
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
            self.listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
        bind_fresh_port(self.listener)
        self.listener.listen()
        self.listener.setblocking(False)
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self.connections: list[SutConnection] = []
        self.failure = ""  # an exception in the SuT's own thread: the test reports it
        # An action for the SuT's thread, and where its answer goes: (True, value) or (False, exception).
        self._commands: queue.Queue[tuple[Callable[[], Any], queue.Queue[tuple[bool, Any]]]] = queue.Queue()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="scripted-sut", daemon=True)
        self._thread.start()

    # -- the test's side: commands run in the SuT's thread, answered within a bound

    def call(self, action: Callable[[], _Value], timeout: float = 5.0) -> _Value:
        answer: queue.Queue[tuple[bool, Any]] = queue.Queue()
        self._commands.put((action, answer))
        ok, value = answer.get(timeout=timeout)
        if not ok:
            raise value
        return cast(_Value, value)  # what action returned, passed through the SuT's thread

    def connection(self, peer: str, timeout: float = 5.0) -> SutConnection:
        """The connection whose keeper side is ``peer`` (IP:PORT), once accepted and handshaken."""
        return wait_until(
            lambda: self._find(peer), timeout=timeout, interval=0.01, what=f"the SuT's connection from {peer}"
        )

    def _find(self, peer: str) -> SutConnection | None:
        for connection in list(self.connections):
            if connection.peer == peer and connection.ready:
                return connection
        return None

    def newest(
        self, wanted: Callable[[SutConnection], bool] = lambda connection: True, timeout: float = 5.0
    ) -> SutConnection:
        """The connection accepted last, once handshaken and ``wanted`` (e.g. not one seen before)."""

        def found() -> SutConnection | None:
            newest = self.connections[-1] if self.connections else None
            return newest if newest is not None and newest.ready and wanted(newest) else None

        return wait_until(found, timeout=timeout, interval=0.01, what="the keeper's new connection")

    def set_rate(self, connection: SutConnection, rate: float | None) -> None:
        """Bytes per second the SuT reads (raw, TLS records included); FULL_SPEED or PAUSED."""

        def action() -> None:
            connection.rate, connection.allowance = rate, 0.0

        self.call(action)

    def send(self, connection: SutConnection, message: bytes) -> None:
        self.call(lambda: self._write(connection, message))

    def fin(self, connection: SutConnection) -> None:
        """End the SuT's sending side with a TCP FIN (over TLS: no close_notify); go on reading."""

        def action() -> None:
            self._flush(connection, wait=True)
            connection.raw.shutdown(socket.SHUT_WR)
            connection.sut_ended = "fin"

        self.call(action)

    def close_notify(self, connection: SutConnection) -> None:
        """Send a TLS close_notify and go on reading (TLS 1.3 half-close)."""

        tls = connection.tls
        if tls is None:
            raise ValueError(f"close_notify: the connection from {connection.peer} is TCP, not TLS")

        def action() -> None:
            try:
                tls.unwrap()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass  # sent; the keeper's close_notify is not waited for
            self._flush(connection, wait=True)
            connection.sut_ended = "close_notify"

        self.call(action)

    def reset(self, connection: SutConnection) -> None:
        """Close with SO_LINGER 0 once what the SuT wrote has left it: the keeper gets an RST."""

        def action() -> None:
            self._flush(connection, wait=True)
            connection.raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            connection.raw.close()
            connection.sut_ended = "rst"
            connection.reading = False

        self.call(action)

    def received_ids(self, connection: SutConnection) -> list[str]:
        return self.call(lambda: [call_id_of(message) for message in connection.received])

    def close(self) -> None:
        self._stopping = True
        self._thread.join(5)
        self.listener.close()
        for connection in self.connections:
            connection.raw.close()

    # -- the SuT's thread

    def _serve(self) -> None:
        try:
            last = time.monotonic()
            while not self._stopping:
                self._run_commands()
                self._accept()
                now = time.monotonic()
                for connection in list(self.connections):
                    if connection.reading:
                        self._pump(connection, now - last)
                last = now
                self._wait()
        except Exception as error:
            self.failure = f"the scripted SuT's thread failed: {error!r}"
            raise

    def _wait(self) -> None:
        # A connection read at a rate is read on the tick (polling it would spin while its
        # allowance is spent and bytes wait); one paused is not read at all. poll(), not select():
        # a test process may hold descriptors past 1024.
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        for connection in self.connections:
            if not connection.reading:
                continue
            events = (select.POLLIN if connection.rate is FULL_SPEED else 0) | (
                select.POLLOUT if connection.to_send else 0
            )
            if events:
                poller.register(connection.raw, events)
        poller.poll(TICK * 1000)

    def _run_commands(self) -> None:
        while True:
            try:
                action, answer = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                answer.put((True, action()))
            except Exception as error:
                answer.put((False, error))

    def _accept(self) -> None:
        try:
            raw, peer = self.listener.accept()
        except BlockingIOError:
            return
        raw.setblocking(False)
        connection = SutConnection(raw, format_address(peer[:2]))
        if self.context is not None:
            connection.incoming, connection.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            connection.tls = self.context.wrap_bio(connection.incoming, connection.outgoing, server_side=True)
        self.connections.append(connection)

    def _pump(self, connection: SutConnection, elapsed: float) -> None:
        self._flush(connection)
        budget = self._budget(connection, elapsed)
        while budget > 0 and connection.reading:
            try:
                data = connection.raw.recv(min(budget, 65536))
            except BlockingIOError:
                break
            except ConnectionResetError:
                self._keeper_ended(connection, "reset")
                return
            except OSError as error:
                self._keeper_ended(connection, _errno_name(error))
                return
            if not data:
                self._keeper_ended(connection, "eof")
                return
            budget -= len(data)
            if connection.rate is not FULL_SPEED:
                connection.allowance -= len(data)
            self._take(connection, data)
        self._flush(connection)

    @staticmethod
    def _budget(connection: SutConnection, elapsed: float) -> int:
        if connection.rate is FULL_SPEED:
            return 1 << 30
        # A token bucket that never saves more than 50 ms worth: a rate, not bursts.
        connection.allowance = min(connection.allowance + connection.rate * elapsed, connection.rate * 0.05)
        return int(connection.allowance)

    def _take(self, connection: SutConnection, data: bytes) -> None:
        tls, incoming = connection.tls, connection.incoming
        if tls is None or incoming is None:  # TCP (the two are set together, for TLS)
            self._frame(connection, data)
            return
        incoming.write(data)
        if not connection.handshaken:
            try:
                tls.do_handshake()
                connection.handshaken = True
            except ssl.SSLWantReadError:
                return
            except ssl.SSLError as error:
                connection.garbage = f"TLS handshake failed: {error}"
                connection.reading = False
                return
        while True:
            try:
                plain = tls.read(65536)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLZeroReturnError:
                self._keeper_ended(connection, "close_notify")
                return
            except ssl.SSLError as error:
                self._keeper_ended(connection, f"TLS error {error.reason}")
                return
            if not plain:
                self._keeper_ended(connection, "close_notify")
                return
            self._frame(connection, plain)

    def _frame(self, connection: SutConnection, data: bytes) -> None:
        try:
            connection.received += connection.framer.feed(data)
        except ValueError as error:
            connection.garbage = f"unframeable bytes from the keeper: {error}"
            connection.reading = False
            return
        # The keeper pings (CRLFCRLF, counted as two CRLFs) after its TLS handshake: pong once each.
        pings = connection.framer.keepalives // 2
        while connection.pings_answered < pings and not connection.sut_ended:
            connection.pings_answered += 1
            self._write(connection, b"\r\n")

    def _keeper_ended(self, connection: SutConnection, how: str) -> None:
        connection.keeper_ended = connection.keeper_ended or how
        connection.reading = False

    def _write(self, connection: SutConnection, data: bytes) -> None:
        if connection.tls is None:
            connection.to_send += data
        else:
            connection.tls.write(data)
        self._flush(connection)

    def _flush(self, connection: SutConnection, wait: bool = False) -> None:
        """Move TLS output to the wire buffer and the wire buffer to the kernel; with ``wait``,
        until the kernel has delivered it too (before an end of the SuT's side)."""
        deadline = time.monotonic() + 3.0
        while True:
            if connection.outgoing is not None and connection.outgoing.pending:
                connection.to_send += connection.outgoing.read()
            if connection.to_send and not connection.sut_ended:
                try:
                    sent = connection.raw.send(connection.to_send)
                    del connection.to_send[:sent]
                except BlockingIOError:
                    pass
                except OSError:
                    connection.to_send.clear()
            if not wait or time.monotonic() > deadline:
                return
            if not connection.to_send and unsent_bytes(connection.raw) == 0:
                return
            time.sleep(TICK)


# --------------------------------------------------------------------------- runs


@dataclass
class WriteOutcome:
    """What a run's write command did: ``whole`` messages had every byte taken by send();
    ``partial`` bytes of the next one were taken before the write stalled; ``error`` is the
    errno name a send() failed with (the run was told)."""

    whole: int
    partial: int
    error: str | None


@dataclass
class ReadOutcome:
    """What a run read: the Call-IDs of whole messages, in order ("corrupt:ID" for one whose
    bytes are not what its Call-ID names), how the stream ended (None: still open; "eof"; an
    errno name), and bytes of a message left unfinished."""

    call_ids: list[str]
    end: str | None
    partial: int


def _errno_name(error: OSError) -> str:
    return errno.errorcode.get(error.errno, str(error)) if error.errno else type(error).__name__


def _run_main(
    commands: multiprocessing.connection.Connection, directory: str, transport: str, remote: tuple[str, int]
) -> None:
    """A run: lease, then obey until told to exit (or SIGKILLed)."""
    from fdkeeper.client import KeeperClient
    from fdkeeper.errors import FdkeeperError

    try:
        leased = KeeperClient(Path(directory)).lease_connections(
            role="client", transport=transport, remote=remote, local="-"
        )
    except FdkeeperError as error:
        commands.send(("refused", error.code, str(error)))
        os._exit(0)
    sock = socket.socket(fileno=leased.fds[0])
    commands.send(("leased", leased.locals[0]))
    while True:
        command, *arguments = commands.recv()
        if command == "write":
            outcome, _unsent = _write(sock, *arguments)
            commands.send(outcome)
        elif command == "read":
            commands.send(_read(sock, *arguments))
        elif command == "read_part":
            commands.send(_read_part(sock, *arguments))
        elif command == "exit":
            os._exit(0)


def _write(
    sock: socket.socket, call_ids: list[str], body_size: int, stall: float, part: int | None = None
) -> tuple[WriteOutcome, bytes]:
    """Write each message whole; stop at the first send() that takes nothing for ``stall`` s. With
    ``part``, only the first ``part`` bytes of the last one (a run about to die mid-message)."""
    sock.settimeout(stall)
    for index, call_id in enumerate(call_ids):
        message = memoryview(sip_message(call_id, body_size))
        if part is not None and index == len(call_ids) - 1:
            message = message[:part]
        taken = 0
        while taken < len(message):
            try:
                taken += sock.send(message[taken:])
            except TimeoutError:
                return WriteOutcome(index, taken, None), bytes(message[taken:])
            except OSError as error:
                return WriteOutcome(index, taken, _errno_name(error)), b""
    if part is not None:
        return WriteOutcome(len(call_ids) - 1, part, None), b""
    return WriteOutcome(len(call_ids), 0, None), b""


def _read(sock: socket.socket, expected: int, wait: float) -> ReadOutcome:
    """Read until ``expected`` whole messages came, the stream ended, or ``wait`` s passed; then
    finish a message begun (a run never stops mid-message: the next one would start there)."""
    framer, end = SipFramer(), None
    ids: list[str] = []
    deadline = time.monotonic() + wait
    while end is None:
        left = deadline - time.monotonic()
        if len(ids) >= expected and not framer.pending:
            left = min(left, 0.05)  # what is there already, without waiting for more
        if left <= 0 and not framer.pending:
            break
        sock.settimeout(max(left, 0.001) if not framer.pending else 2.0)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        except OSError as error:
            end = _errno_name(error)
            break
        if not data:
            end = "eof"
            break
        ids += [_checked_call_id(message) for message in framer.feed(data)]
    return ReadOutcome(ids, end, framer.pending)


def _read_part(sock: socket.socket, size: int, wait: float) -> ReadOutcome:
    """One recv() of at most ``size`` bytes, within ``wait`` s: a run that stops in the middle of
    a message (and is then killed, or exits) without reading the rest."""
    framer, end = SipFramer(), None
    sock.settimeout(wait)
    try:
        data = sock.recv(size)
        end = None if data else "eof"
    except TimeoutError:
        data = b""
    except OSError as error:
        data, end = b"", _errno_name(error)
    ids = [_checked_call_id(message) for message in framer.feed(data)]
    return ReadOutcome(ids, end, framer.pending)


def _checked_call_id(message: bytes) -> str:
    """The message's Call-ID; prefixed "corrupt:" when a Call-ID ending in -SIZE (what the SuT
    sends) names a message whose bytes are not sip_message's."""
    call_id = call_id_of(message)
    size = call_id.rpartition("-")[2]
    if size.isdigit() and message != sip_message(call_id, int(size)):
        return f"corrupt:{call_id}"
    return call_id


class ScriptedRun:
    """The test's handle on one run process; every wait is bounded."""

    _context: multiprocessing.context.ForkServerContext | None = None

    def __init__(self, directory: Path, transport: str, remote: tuple[str, int], timeout: float = 10.0) -> None:
        context = self._forkserver()
        self.commands, child_end = context.Pipe()
        self.process = context.Process(
            target=_run_main, args=(child_end, str(directory), transport, remote), daemon=True
        )
        self.process.start()
        if self.process.pid is None:  # not met: start() returns once the process exists
            raise RuntimeError("a scripted run's process did not start")
        self.pid: int = self.process.pid  # kept: a closed Process no longer says it
        child_end.close()
        self.timeout = timeout
        answer = self._answer(timeout)
        self.refused: tuple[str, str] | None = None
        self.local = ""
        if answer[0] == "refused":
            self.refused = (answer[1], answer[2])
            self._reap()
        else:
            self.local = answer[1]

    @classmethod
    def _forkserver(cls) -> multiprocessing.context.ForkServerContext:
        if cls._context is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["fdkeeper.testbed.scripted_sut", "fdkeeper.client"])
            cls._context = context
        return cls._context

    def _answer(self, timeout: float) -> Any:
        if not self.commands.poll(timeout):
            self.kill()
            raise TimeoutError(f"run {self.pid} did not answer within {timeout:g} s")
        try:
            return self.commands.recv()
        except EOFError:
            self.process.join(self.timeout)
            raise RuntimeError(f"run {self.pid} ended unasked (exit code {self.process.exitcode})") from None

    def _outcome(self, kind: type[_Outcome], timeout: float) -> _Outcome:
        answer = self._answer(timeout)
        if not isinstance(answer, kind):
            raise RuntimeError(f"run {self.pid} answered {answer!r}, not a {kind.__name__}")
        return answer

    def write(self, call_ids: list[str], body_size: int, stall: float, part: int | None = None) -> WriteOutcome:
        self.commands.send(("write", call_ids, body_size, stall, part))
        return self._outcome(WriteOutcome, self.timeout + stall * 2)

    def read(self, expected: int, wait: float) -> ReadOutcome:
        self.commands.send(("read", expected, wait))
        return self._outcome(ReadOutcome, self.timeout + wait)

    def read_part(self, size: int, wait: float) -> ReadOutcome:
        self.commands.send(("read_part", size, wait))
        return self._outcome(ReadOutcome, self.timeout + wait)

    def exit(self) -> None:
        self.commands.send(("exit",))
        self._reap()

    def kill(self) -> None:
        if not self.ended and self.process.is_alive():
            os.kill(self.pid, signal.SIGKILL)
        self._reap()

    @property
    def ended(self) -> bool:
        closed: bool = self.commands.closed
        return closed

    def _reap(self) -> None:
        """Wait for the process and release its pipe and sentinel (a long test makes thousands of runs)."""
        if self.ended:
            return
        self.process.join(self.timeout)
        if self.process.exitcode is None:
            os.kill(self.pid, signal.SIGKILL)
            self.process.join(self.timeout)
        self.commands.close()
        self.process.close()
