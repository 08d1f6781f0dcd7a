"""A hostile WebSocket server on loopback (plain or TLS), one named misbehaviour per script.

Tests point a real keeper at ``HostileWsServer(script)`` with transport ws (or wss with
``pki``) and check what it does with a server that breaks RFC 6455 / RFC 7118 in one named
way: a bad handshake answer (``HANDSHAKE_SCRIPTS``: the keeper refuses the connection in one
line) or bad frames once the link is up (``FRAME_SCRIPTS``: the keeper ends the link with a
named Close code, having delivered every whole message that came before).

Each accepted connection is served by a thread of its own, the only one that touches its
socket (OpenSSL must not see one SSL object from two threads). After a correct handshake the
connection waits for the keeper's first whole message (a run's request) and then plays its
script: what it writes goes through an outbox of separate writes, so a message can be cut at
every byte; what the keeper sends is decoded by ``KeeperFrames``, which also records how the
keeper broke the client rules if it ever does (unmasked frames, reserved bits). The frames and
answers themselves are written and read by fdkeeper/testbed/wsframes.py, shared with the tests.

Messages the server sends carry their identity in the Call-ID (``sip_message`` of
scripted_sut), so a test checks that exactly the whole ones came through.
"""

from __future__ import annotations

import base64
import collections
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fdkeeper.address import format_address
from fdkeeper.sip.framing import MAX_MESSAGE
from fdkeeper.testbed.net import bind_fresh_port, wait_until
from fdkeeper.testbed.pki import TestPki
from fdkeeper.testbed.scripted_sut import sip_message
from fdkeeper.testbed.wsframes import KeeperFrames, close_payload, fragments, server_frame, upgrade_answer
from fdkeeper.websocket import OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT, accept_for

MAX_REQUEST = 16 * 1024  # the keeper's handshake request, before its blank line
TICK = 0.01  # a connection thread's longest wait for the keeper's bytes
BEFORE = ("before-1-0", "before-2-300")  # whole messages every frame script sends ahead of its defect
FLOOD_BYTES = 16 * 1024 * 1024  # the ping flood's most bytes of pings
FLOOD_SECONDS = 4.0  # and its longest time
FLOOD_STALL = 1.0  # the flood stops once the keeper took nothing of it for this long
PING = bytes(range(125))  # a ping's payload: the longest a control frame may carry
SERVER_HEADER = "Server: fdkeeper-hostile-ws\r\n"


# --------------------------------------------------------------------------- scripts


@dataclass(frozen=True)
class Script:
    """A named misbehaviour: the handshake answer, and what is done once the keeper's first message came."""

    answer: Callable[[str], bytes]  # the client's Sec-WebSocket-Key -> the HTTP answer (and any early bytes)
    act: Callable[[HostileConnection], None] | None = None  # None: a handshake script, or a well-behaved server
    narrow: bool = False  # small socket buffers: the keeper's writes back up within a few hundred kB
    note: str = ""  # what the keeper is expected to do


def upgrade(key: str, *, protocol: str | None = "sip", accept: str | None = None) -> bytes:
    """The server's 101 answer; ``protocol``/``accept`` replaced (or left out with None) by hostile scripts."""
    return upgrade_answer(key, protocol=protocol, accept=accept, extra=SERVER_HEADER)


def refusal(key: str) -> bytes:
    body = "origin not allowed here"
    return (
        f"HTTP/1.1 403 Forbidden\r\n{SERVER_HEADER}Content-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}"
    ).encode()


def whole(call_ids: tuple[str, ...] | list[str]) -> list[bytes]:
    """Each message of ``call_ids`` (Call-ID ``name-SIZE``: SIZE bytes of body) as one text frame."""
    return [server_frame(OP_TEXT, message_for(call_id)) for call_id in call_ids]


def message_for(call_id: str) -> bytes:
    return sip_message(call_id, int(call_id.rpartition("-")[2]))


def _then(defect: Callable[[], bytes | list[bytes]]) -> Callable[[HostileConnection], None]:
    """An act: the BEFORE messages, then the defect (one write, or a write per item)."""

    def act(connection: HostileConnection) -> None:
        connection.write(*whole(BEFORE))
        made = defect()
        connection.write(*(made if isinstance(made, list) else [made]))

    return act


def _every_byte(connection: HostileConnection) -> None:
    """Each message in three fragments, every byte of them a write of its own."""
    for call_id in ("split-1-0", "split-2-700"):
        stream = b"".join(fragments(message_for(call_id), 3))
        connection.write(*(stream[index : index + 1] for index in range(len(stream))))


def _interleaved_pings(connection: HostileConnection) -> None:
    """Fragments of each message with a ping between every two of them."""
    for number, call_id in enumerate(("pinged-1-0", "pinged-2-500")):
        parts = fragments(message_for(call_id), 3)
        connection.write(parts[0], server_frame(OP_PING, b"p%d-a" % number), parts[1])
        connection.write(server_frame(OP_PING, b"p%d-b" % number), parts[2])


def _close_mid_message(connection: HostileConnection) -> None:
    connection.write(*whole(BEFORE))
    first = fragments(message_for("cut-1-400"), 2)[0]
    connection.write(first + server_frame(OP_CLOSE, close_payload(1001, "going away")))
    connection.sent_close = True


def _too_big_in_fragments() -> list[bytes]:
    part = b"x" * 4096
    count = MAX_MESSAGE // len(part) + 4
    return [server_frame(OP_TEXT, part, fin=False)] + [
        server_frame(OP_CONTINUATION, part, fin=index == count - 1) for index in range(1, count)
    ]


def _ping_flood(connection: HostileConnection) -> None:
    """The BEFORE messages, pings as fast as the keeper takes them without reading its pongs,
    then one more message (once reading again): the link is to survive it."""
    connection.write(*whole(BEFORE))
    connection.flood()
    connection.write(*whole(["after-flood-0"]))


SCRIPTS: dict[str, Script] = {
    "good": Script(upgrade, note="a well-behaved server: the control case"),
    "early_message": Script(
        lambda key: upgrade(key) + server_frame(OP_TEXT, message_for("early-1-0")),
        note="a message in the same write as the 101: delivered",
    ),
    "bad_accept": Script(lambda key: upgrade(key, accept=accept_for(key + "x")), note="refused"),
    "wrong_subprotocol": Script(lambda key: upgrade(key, protocol="chat"), note="refused"),
    "no_subprotocol": Script(lambda key: upgrade(key, protocol=None), note="refused"),
    "refused_403": Script(refusal, note="refused, naming 403 Forbidden"),
    "masked_frames": Script(
        upgrade, _then(lambda: server_frame(OP_TEXT, message_for("masked-0"), mask=b"abcd")), note="close 1002"
    ),
    "oversized_header": Script(
        upgrade, _then(lambda: server_frame(OP_TEXT, length=1 << 40)), note="close 1009 at the header"
    ),
    "too_big_in_fragments": Script(upgrade, _then(_too_big_in_fragments), note="close 1009"),
    "reserved_bits": Script(
        upgrade, _then(lambda: server_frame(OP_TEXT, message_for("rsv-0"), rsv=4)), note="close 1002"
    ),
    "garbage": Script(upgrade, _then(lambda: b"GARBAGE, NOT A FRAME\r\n\r\n"), note="close 1002"),
    "every_byte": Script(upgrade, _every_byte, note="every message whole"),
    "interleaved_pings": Script(upgrade, _interleaved_pings, note="every message whole, each ping ponged"),
    "close_mid_message": Script(upgrade, _close_mid_message, note="the whole ones delivered, a Close back"),
    "ping_flood": Script(upgrade, _ping_flood, narrow=True, note="memory bounded, the link alive"),
}
HANDSHAKE_SCRIPTS = ("bad_accept", "wrong_subprotocol", "no_subprotocol", "refused_403")
FRAME_SCRIPTS = ("masked_frames", "oversized_header", "too_big_in_fragments", "reserved_bits", "garbage")


# --------------------------------------------------------------------------- connections


@dataclass
class HostileConnection:
    """One connection the keeper opened, as the hostile server sees and drives it."""

    sock: socket.socket
    peer: str
    script: Script
    request: str = ""  # the keeper's handshake request, headers and all
    request_defects: list[str] = field(default_factory=list)
    frames: KeeperFrames = field(default_factory=KeeperFrames)
    outbox: collections.deque[bytes] = field(default_factory=collections.deque)  # one entry per write
    reading: bool = True
    answered_pings: list[bytes] = field(default_factory=list)  # the keeper's pings this server ponged
    acted: bool = False
    sent_close: bool = False
    flood_bytes: int = 0  # bytes of pings the keeper took during the flood
    flood_done: bool = False
    ended: str = ""  # how the connection ended: eof, reset, an error, closed (by the server)
    commands: queue.Queue[Callable[[], None]] = field(default_factory=queue.Queue)

    @property
    def path(self) -> str:
        return self.request.split(" ", 2)[1] if self.request.count(" ") >= 2 else ""

    def header(self, name: str) -> str | None:
        """A header of the keeper's handshake request (the first by that name), or None."""
        for line in self.request.split("\r\n")[1:]:
            found, _, value = line.partition(":")
            if found.strip().lower() == name.lower():
                return value.strip()
        return None

    def write(self, *chunks: bytes) -> None:
        """Queue each chunk as a write of its own (a TLS record of its own over TLS)."""
        self.outbox.extend(chunks)
        self.flush(wait=True)

    def flush(self, wait: bool = False, stall: float = 5.0) -> int:
        """Send what the outbox holds; with ``wait`` until it is empty or nothing went for ``stall``
        s (reading the keeper meanwhile: it may wait for us to take its pongs first). Bytes sent."""
        total, last_progress = 0, time.monotonic()
        while self.outbox and not self.ended:
            sent = self._send_some()
            total += sent
            if sent:
                last_progress = time.monotonic()
            if not wait or time.monotonic() - last_progress > stall:
                break
            if self.reading and not sent:
                self.read_once()
        return total

    def _send_some(self) -> int:
        try:
            sent = self.sock.send(self.outbox[0])
        except (TimeoutError, ssl.SSLWantWriteError):
            return 0
        except OSError as error:
            self.ended = f"send failed: {error}"
            return 0
        if sent < len(self.outbox[0]):
            self.outbox[0] = self.outbox[0][sent:]
        else:
            self.outbox.popleft()
        return sent

    def flood(self) -> None:
        """Pings as fast as the keeper takes them, not reading meanwhile (bounded in bytes and time)."""
        chunk = server_frame(OP_PING, PING) * 256
        started = last_progress = time.monotonic()
        self.reading = False
        while self.flood_bytes < FLOOD_BYTES and time.monotonic() - started < FLOOD_SECONDS and not self.ended:
            if len(self.outbox) < 2:
                self.outbox.append(chunk)
            sent = self.flush()
            self.flood_bytes += sent
            if sent:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > FLOOD_STALL:
                break
        self.reading = True
        self.flood_done = True
        self.flush(wait=True, stall=10.0)  # the rest of a chunk begun, taking the pongs again

    def read_once(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (TimeoutError, ssl.SSLWantReadError):
            return
        except ConnectionResetError:
            self.ended = "reset"
            return
        except (OSError, ssl.SSLError) as error:
            self.ended = f"read failed: {error}"
            return
        if not data:
            self.ended = "eof"
            return
        self.frames.feed(data)
        self._answer_the_keeper()

    def _answer_the_keeper(self) -> None:
        """Pong the keeper's pings; answer its Close and end the TCP connection (RFC 6455 7.1.1)."""
        for payload in self.frames.pings[len(self.answered_pings) :]:
            self.answered_pings.append(payload)
            self.outbox.append(server_frame(OP_PONG, payload))
        if self.frames.close_code is not None and not self.ended:
            if not self.sent_close:
                self.sent_close = True
                self.outbox.append(server_frame(OP_CLOSE, close_payload(self.frames.close_code)))
            self.flush(wait=True, stall=1.0)
            self.ended = "closed after the keeper's Close"
        else:
            self.flush()


class HostileWsServer:
    """A loopback WebSocket server (TLS with ``pki``) that plays ``script`` on every connection."""

    def __init__(self, script: str, pki: TestPki | None = None) -> None:
        self.script = SCRIPTS[script]
        self.name = script
        self.context: ssl.SSLContext | None = None
        if pki is not None:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(pki.server_cert, pki.server_key)
        self.listener = socket.socket()
        if self.script.narrow:  # inherited by accepted sockets: set before listen()
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
            self.listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
        bind_fresh_port(self.listener)
        self.listener.listen()
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self.connections: list[HostileConnection] = []
        self.failures: list[str] = []  # exceptions in the server's threads: a test reports them
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, name=f"hostile-ws-{script}", daemon=True)
        self._accepter.start()

    def newest(self, timeout: float = 5.0) -> HostileConnection:
        """The connection accepted last, once its handshake request came."""
        return wait_until(
            lambda: self.connections[-1] if self.connections and self.connections[-1].request else None,
            timeout=timeout,
            interval=0.01,
            what=f"the keeper's connection to the {self.name} server",
        )

    def call(self, connection: HostileConnection, action: Callable[[], None], timeout: float = 10.0) -> None:
        """Run ``action`` in the connection's own thread and wait for it."""
        done = threading.Event()

        def wrapped() -> None:
            try:
                action()
            finally:
                done.set()

        connection.commands.put(wrapped)
        if not done.wait(timeout):
            raise TimeoutError(f"the {self.name} server's connection did not run a command within {timeout:g} s")

    def close(self) -> None:
        self._stopping.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept()
        except OSError:
            pass
        self.listener.close()
        for thread in [self._accepter, *self._threads]:
            thread.join(5)

    # -- the server's threads

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                raw, peer = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(raw, format_address(peer[:2])), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, raw: socket.socket, peer: str) -> None:
        try:
            sock = raw
            if self.context is not None:
                raw.settimeout(5)
                sock = self.context.wrap_socket(raw, server_side=True)
            sock.settimeout(TICK)
            connection = HostileConnection(sock, peer, self.script)
            self.connections.append(connection)
            try:
                self._converse(connection)
            finally:
                sock.close()
        except (OSError, ssl.SSLError) as error:
            raw.close()
            if not self._stopping.is_set():
                self.failures.append(f"the {self.name} server's connection from {peer} failed: {error!r}")
        except Exception as error:  # reported by the test, not lost in a thread
            self.failures.append(f"the {self.name} server's thread failed: {error!r}")
            raise

    def _converse(self, connection: HostileConnection) -> None:
        key = self._read_request(connection)
        if key is None:
            return
        connection.write(self.script.answer(key))
        while not connection.ended and not self._stopping.is_set():
            while not connection.commands.empty():
                connection.commands.get_nowait()()
            connection.flush()
            connection.read_once()
            if self.script.act is not None and connection.frames.messages and not connection.acted:
                connection.acted = True
                self.script.act(connection)

    def _read_request(self, connection: HostileConnection) -> str | None:
        """The keeper's handshake request: its Sec-WebSocket-Key, or None (the connection ended)."""
        data = b""
        deadline = time.monotonic() + 5
        while b"\r\n\r\n" not in data:
            if len(data) > MAX_REQUEST or time.monotonic() > deadline:
                connection.ended = "no handshake request"
                return None
            try:
                chunk = connection.sock.recv(4096)
            except (TimeoutError, ssl.SSLWantReadError):
                continue
            if not chunk:
                connection.ended = "eof before the handshake request"
                return None
            data += chunk
        head, _, early = data.partition(b"\r\n\r\n")
        connection.request = head.decode(errors="replace")
        connection.request_defects = request_defects(connection)
        if early:
            connection.frames.feed(early)
        return connection.header("Sec-WebSocket-Key") or ""


def request_defects(connection: HostileConnection) -> list[str]:
    """How the keeper's handshake request breaks RFC 6455 4.1 / RFC 7118 2.1, if it does."""
    defects = []
    if not connection.request.startswith("GET ") or not connection.request.split("\r\n")[0].endswith(" HTTP/1.1"):
        defects.append(f"request line {connection.request.splitlines()[0]!r}")
    expected = {"Upgrade": "websocket", "Sec-WebSocket-Version": "13", "Sec-WebSocket-Protocol": "sip"}
    for name, value in expected.items():
        if (connection.header(name) or "").lower() != value:
            defects.append(f"{name}: {connection.header(name)!r}")
    if "upgrade" not in (connection.header("Connection") or "").lower():
        defects.append(f"Connection: {connection.header('Connection')!r}")
    key = connection.header("Sec-WebSocket-Key") or ""
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            defects.append(f"Sec-WebSocket-Key {key!r} is not 16 bytes")
    except ValueError:
        defects.append(f"Sec-WebSocket-Key {key!r} is not base64")
    if connection.header("Host") is None:
        defects.append("no Host")
    return defects
