"""SIP over WebSocket (RFC 7118) as a client speaks it (RFC 6455): the HTTP Upgrade and the frames.

Pure logic, no sockets: the keeper's opening (keeper/opening.py) sends ``handshake_request`` and
checks the server's answer (``read_handshake_answer``, in fdkeeper/wshandshake.py with the
options and their validators); its links (keeper/tlslink.py) encode each SIP message as one masked
frame and decode what the SuT sends with a bounded ``WsDecoder``. The C pump's twin is
helpers/tlspump/wsframe.c (tests/parity).
"""

from __future__ import annotations

import os
import struct

from fdkeeper.errors import FdkeeperError
from fdkeeper.sip.framing import MAX_MESSAGE
from fdkeeper.textsafe import escape_controls
from fdkeeper.wshandshake import (
    MAX_HANDSHAKE_ANSWER,
    WsHandshake,
    WsHandshakeError,
    WsOptions,
    accept_for,
    check_origin,
    check_path,
    handshake_request,
    new_key,
    parse_header_lines,
    read_handshake_answer,
)

__all__ = [
    "HEADER_ROOM",
    "MAX_CONTROL",
    "MAX_HANDSHAKE_ANSWER",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONTINUATION",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "WsDecoder",
    "WsHandshake",
    "WsHandshakeError",
    "WsOptions",
    "WsProtocolError",
    "accept_for",
    "apply_mask",
    "check_origin",
    "check_path",
    "close_frame",
    "close_text",
    "encode_frame",
    "encode_message",
    "handshake_request",
    "new_key",
    "parse_header_lines",
    "ping_frame",
    "pong_frame",
    "read_handshake_answer",
]

OP_CONTINUATION = 0
OP_TEXT = 1
OP_BINARY = 2
OP_CLOSE = 8
OP_PING = 9
OP_PONG = 10
_DATA_OPCODES = (OP_CONTINUATION, OP_TEXT, OP_BINARY)
_CONTROL_OPCODES = (OP_CLOSE, OP_PING, OP_PONG)
MAX_CONTROL = 125  # RFC 6455 §5.5: a control frame's payload
# Room for the frame headers of one fragmented message beyond its payload: 4096 bytes hold 292
# fragments with 64-bit lengths, or 2048 empty ones; more is a flood, refused as too big.
HEADER_ROOM = 4096
PROTOCOL_ERROR = 1002
MESSAGE_TOO_BIG = 1009
_CLOSE_NAMES = {
    1000: "normal closure",
    1001: "going away",
    1002: "protocol error",
    1003: "unsupported data",
    1005: "no status code",
    1007: "invalid payload",
    1008: "policy violation",
    1009: "message too big",
    1010: "extension required",
    1011: "internal error",
    1012: "service restart",
    1013: "try again later",
    1014: "bad gateway",
}


def apply_mask(payload: bytes, mask: bytes) -> bytes:
    """``payload`` XORed with the repeated 4-byte ``mask`` (masking and unmasking alike), as two big ints."""
    size = len(payload)
    if not size:
        return b""
    key = (mask * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(size, "little")


def encode_frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """One final frame, masked as a client's must be (a random key unless ``mask`` is given)."""
    if mask is None:
        mask = os.urandom(4)
    size = len(payload)
    first = 0x80 | opcode
    if size < 126:
        header = bytes((first, 0x80 | size))
    elif size < 0x10000:
        header = struct.pack("!BBH", first, 0x80 | 126, size)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, size)
    return header + mask + apply_mask(payload, mask)


def encode_message(message: bytes) -> bytes:
    """One SIP message as one frame (RFC 7118 §5.1): text when it is UTF-8, else binary."""
    if message.isascii():
        return encode_frame(OP_TEXT, message)
    try:
        message.decode("utf-8")
    except UnicodeDecodeError:
        return encode_frame(OP_BINARY, message)
    return encode_frame(OP_TEXT, message)


def ping_frame(payload: bytes = b"") -> bytes:
    if len(payload) > MAX_CONTROL:
        raise ValueError(f"a ping payload of {len(payload)} bytes (at most {MAX_CONTROL})")
    return encode_frame(OP_PING, payload)


def pong_frame(payload: bytes) -> bytes:
    if len(payload) > MAX_CONTROL:
        raise ValueError(f"a pong payload of {len(payload)} bytes (at most {MAX_CONTROL})")
    return encode_frame(OP_PONG, payload)


def close_frame(code: int | None = 1000, reason: str = "") -> bytes:
    """A Close frame: ``code`` and ``reason`` (cut to fit 125 bytes), or no payload when code is None."""
    if code is None:
        return encode_frame(OP_CLOSE, b"")
    cut = reason.encode("utf-8")[: MAX_CONTROL - 2].decode("utf-8", "ignore").encode("utf-8")
    return encode_frame(OP_CLOSE, struct.pack("!H", code) + cut)


def close_text(payload: bytes) -> str:
    """A Close frame's payload for people: "1000 (normal closure)", "1001 (going away): <reason>"."""
    if len(payload) < 2:
        return "1005 (no status code)"
    code = struct.unpack_from("!H", payload)[0]
    name = _CLOSE_NAMES.get(code, "application code" if 3000 <= code <= 4999 else "unknown code")
    reason = escape_controls(payload[2:].decode("utf-8", "replace"))
    return f"{code} ({name}): {reason}" if reason else f"{code} ({name})"


class WsProtocolError(FdkeeperError):
    """The server broke RFC 6455: ``reason`` names the defect, ``code`` is the Close code to answer
    with (1002 protocol error, 1009 message too big), ``messages`` the whole messages decoded before."""

    # The Close code, as the interface names it, where FdkeeperError has a word (the keeper's error
    # replies map a code they do not know to "internal", so an int there is harmless).
    code: int  # type: ignore[assignment]

    def __init__(self, reason: str, code: int = PROTOCOL_ERROR) -> None:
        super().__init__(f"the WebSocket server broke the protocol ({code}): {reason}")
        self.reason = reason
        self.code = code
        self.messages: list[bytes] = []


class WsDecoder:
    """Feed what the SuT sends, get whole SIP messages (one per WebSocket message); a SipFramer twin.

    Control frames are handled as they come, between fragments too: a ping queues its pong in
    ``replies``, a pong counts in ``keepalives``, a Close sets ``closed`` and queues the Close reply
    (echoing the server's code), and everything after it is ignored. What is held is the unfinished
    message's data frames as received (``_held``, only for a fragmented message) and the trailing
    partial frame (``_tail``): ``discard()`` hands exactly those bytes over.

    A frame is checked as soon as its bytes allow, in this order (wsframe.c keeps it): on its first
    two bytes the mask bit, the RSV bits, the opcode, then a fragmented control frame, a continuation
    with no message begun, a data frame inside a fragmented message; once its length is read, a
    64-bit length with the top bit set, a control payload over 125, the message over ``max_message``
    (1009), the held frame headers over HEADER_ROOM (1009); when whole, a Close payload of 1 byte.
    After a WsProtocolError the connection is over: the decoder's state is not defined.
    """

    # Slots, not a __dict__: one decoder per kept WebSocket connection.
    __slots__ = (
        "_held",
        "_need",
        "_opened",
        "_payload",
        "_spans",
        "_tail",
        "closed",
        "keepalives",
        "max_message",
        "pings",
        "replies",
    )

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self.max_message = max_message
        self.keepalives = 0
        self.pings = 0
        self.replies = bytearray()
        self.closed = ""
        self._held = bytearray()  # raw data frames of a fragmented message not yet final
        self._spans: list[tuple[int, int]] = []  # their payloads in _held
        self._payload = 0  # the payload bytes held
        self._opened = False  # a fragmented message is begun
        self._tail = bytearray()  # a partial frame
        self._need = 2  # bytes _tail must reach before it is parsed again (its header, or its whole frame)

    @property
    def pending(self) -> int:
        """Raw bytes held for the unfinished message: its data frames and a trailing partial frame."""
        return len(self._held) + len(self._tail)

    def discard(self) -> bytes:
        """Remove and return the held raw bytes; a fresh decoder fed them is in this one's state."""
        raw = bytes(self._held + self._tail)
        self._held.clear()
        self._spans.clear()
        self._payload = 0
        self._opened = False
        self._tail.clear()
        self._need = 2
        return raw

    def feed(self, data: bytes) -> list[bytes]:
        if self.closed:
            return []
        tail = self._tail
        if tail:
            tail += data
            if len(tail) < self._need:  # a frame trickling in is appended, not parsed again each read
                return []
            data = bytes(tail)
            tail.clear()
        elif type(data) is not bytes:
            data = bytes(data)
        messages: list[bytes] = []
        try:
            at = self._frames(data, messages)
        except WsProtocolError as error:
            error.messages = messages
            raise
        if at < len(data) and not self.closed:
            tail += memoryview(data)[at:]
        return messages

    def _frames(self, data: bytes, messages: list[bytes]) -> int:
        """Handle the whole frames of ``data``; returns where the first incomplete one starts."""
        at, end = 0, len(data)
        while not self.closed:
            if end - at < 2:
                self._need = 2
                return at
            first, second = data[at], data[at + 1]
            opcode = self._check_start(first, second)
            size, start = second & 0x7F, at + 2
            if size >= 126:
                start += 2 if size == 126 else 8
                if end < start:
                    self._need = start - at
                    return at
                size = struct.unpack_from("!H" if size == 126 else "!Q", data, at + 2)[0]
            self._check_size(opcode, size, start - at)
            stop = start + size
            if end < stop:
                self._need = stop - at
                return at
            if opcode >= OP_CLOSE:
                self._control(opcode, data[start:stop])
            elif first & 0x80 and not self._opened:  # a whole message in one frame: the common case
                self._deliver(data[start:stop], messages)
            else:
                self._fragment(data, at, start, stop, bool(first & 0x80), messages)
            at = stop
        return end

    def _check_start(self, first: int, second: int) -> int:
        """The frame's opcode, once its first two bytes pass RFC 6455's rules for a server's frame."""
        opcode = first & 0x0F
        if second & 0x80:
            raise WsProtocolError("a masked frame from the server")
        if first & 0x70:
            raise WsProtocolError("reserved bits set in a frame")
        if opcode not in _DATA_OPCODES and opcode not in _CONTROL_OPCODES:
            raise WsProtocolError(f"unknown opcode {opcode}")
        if opcode >= OP_CLOSE:
            if not first & 0x80:
                raise WsProtocolError("a fragmented control frame")
        elif opcode == OP_CONTINUATION:
            if not self._opened:
                raise WsProtocolError("a continuation frame with no message begun")
        elif self._opened:
            raise WsProtocolError("a data frame inside a fragmented message")
        return opcode

    def _check_size(self, opcode: int, size: int, header: int) -> None:
        """Refuse a frame by the length its header announces, before any of its payload is kept."""
        if size >> 63:
            raise WsProtocolError("a frame length with the top bit set")
        if opcode >= OP_CLOSE:
            if size > MAX_CONTROL:
                raise WsProtocolError(f"a control frame of {size} bytes (at most {MAX_CONTROL})")
            return
        if self._payload + size > self.max_message:
            raise WsProtocolError(f"a message of {self._payload + size} bytes (at most {self.max_message})", 1009)
        if len(self._held) - self._payload + header > HEADER_ROOM:  # the frame headers held, and this one
            raise WsProtocolError(f"a message in too many fragments (over {HEADER_ROOM} bytes of frame headers)", 1009)

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            self.pings += 1
            self.replies += pong_frame(payload)
        elif opcode == OP_PONG:
            self.keepalives += 1
        else:
            if len(payload) == 1:
                raise WsProtocolError("a close frame of 1 byte (a status code takes 2)")
            self.closed = close_text(payload)
            self.replies += close_frame(struct.unpack_from("!H", payload)[0] if payload else None)

    def _fragment(self, data: bytes, at: int, start: int, stop: int, final: bool, messages: list[bytes]) -> None:
        """Keep one frame of a fragmented message; deliver the message on its final frame."""
        held = self._held
        base = len(held) + start - at
        held += memoryview(data)[at:stop]
        self._spans.append((base, base + stop - start))
        self._payload += stop - start
        self._opened = True
        if final:
            view = memoryview(held)
            message = b"".join([view[begin:end] for begin, end in self._spans])
            view.release()
            held.clear()
            self._spans.clear()
            self._payload = 0
            self._opened = False
            self._deliver(message, messages)

    def _deliver(self, message: bytes, messages: list[bytes]) -> None:
        """An empty or whitespace-only message is a keep-alive; anything else is one SIP message."""
        if not message or message.isspace():
            self.keepalives += 1
        else:
            messages.append(message)
