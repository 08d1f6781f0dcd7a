"""The server's side of a WebSocket, as bytes: what a test server (or a hostile one) writes and how it
reads what a client (the keeper) sends. No sockets, so a test server of any shape can use it.

Written: frames as a server sends them (unmasked, or bent to any defect: reserved bits, a mask, a
header announcing another length, a wider length encoding than needed), a message whole or cut
into fragments, a Close payload, the 101 answer to an Upgrade. Read: a client's frames one by one
(``read_frame``), all at once asserting each is masked and final (``client_frames``), or as a
server must take them, reassembled, every broken client rule named (``KeeperFrames``).
The client's own side (handshake request, masked frames, the decoder) is the product's:
fdkeeper.websocket.
"""

from __future__ import annotations

import itertools
import re
import struct
from dataclasses import dataclass, field

from fdkeeper.websocket import OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT, accept_for, apply_mask

_KEY = re.compile(rb"^sec-websocket-key:[ \t]*(\S+)", re.IGNORECASE | re.MULTILINE)

# --------------------------------------------------------------------------- what a server writes


def server_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = None,
    length: int | None = None,
    width: int | None = None,
) -> bytes:
    """One frame as a server sends it: unmasked unless ``mask`` is given (a defect), ``rsv`` bits set
    (a defect). ``length`` announces another payload size than the real one; ``width`` forces the
    length's encoding (7, 16 or 64 bits)."""
    size = len(payload) if length is None else length
    if width is None:
        width = 7 if size < 126 else 16 if size < 0x10000 else 64
    first = (0x80 if fin else 0) | (rsv & 7) << 4 | opcode
    masked = 0x80 if mask is not None else 0
    if width == 7:
        header = bytes((first, masked | size))
    elif width == 16:
        header = struct.pack("!BBH", first, masked | 126, size)
    else:
        header = struct.pack("!BBQ", first, masked | 127, size)
    return header + payload if mask is None else header + mask + apply_mask(payload, mask)


def message_frames(message: bytes, cuts: list[int] | None = None, opcode: int = OP_TEXT) -> list[bytes]:
    """One message as a server sends it: one frame, or fragments cut at the payload offsets ``cuts``
    (a repeated offset makes an empty fragment), each frame apart (a write of its own, if wanted)."""
    bounds = [0, *sorted(min(max(cut, 0), len(message)) for cut in cuts or []), len(message)]
    pieces = [message[start:stop] for start, stop in itertools.pairwise(bounds)]
    return [
        server_frame(opcode if index == 0 else OP_CONTINUATION, piece, fin=index == len(pieces) - 1)
        for index, piece in enumerate(pieces)
    ]


def server_message(message: bytes, cuts: list[int] | None = None, opcode: int = OP_TEXT) -> bytes:
    """``message_frames`` as one stream of bytes."""
    return b"".join(message_frames(message, cuts, opcode))


def fragments(message: bytes, count: int, opcode: int = OP_TEXT) -> list[bytes]:
    """``message`` as ``count`` frames of about equal size (fewer for a short message)."""
    size = max(1, -(-len(message) // count))
    return message_frames(message, list(range(size, len(message), size)), opcode)


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode()


def upgrade_answer(
    key: str,
    *,
    status: str = "101 Switching Protocols",
    protocol: str | None = "sip",
    accept: str | None = None,
    extra: str = "",
) -> bytes:
    """A server's answer to an Upgrade with Sec-WebSocket-Key ``key``: the right accept (or ``accept``),
    ``protocol`` (None: no such header), and ``extra`` header lines (each ending in CRLF)."""
    lines = [f"HTTP/1.1 {status}", "Upgrade: websocket", "Connection: Upgrade"]
    lines.append(f"Sec-WebSocket-Accept: {accept_for(key) if accept is None else accept}")
    if protocol is not None:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def handshake_answer(
    request: bytes, *, status: str = "101 Switching Protocols", protocol: str | None = "sip", extra: str = ""
) -> bytes:
    """``upgrade_answer`` to a whole handshake ``request`` (its Sec-WebSocket-Key found in it)."""
    found = _KEY.search(request)
    assert found, "the request has no Sec-WebSocket-Key"
    return upgrade_answer(found.group(1).decode(), status=status, protocol=protocol, extra=extra)


# --------------------------------------------------------------------------- what a server reads


@dataclass(frozen=True)
class Frame:
    """One frame a client sent, its payload unmasked."""

    fin: bool
    rsv: int
    opcode: int
    masked: bool
    payload: bytes


def read_frame(data: bytes | bytearray, at: int = 0) -> tuple[Frame, int] | None:
    """The whole frame at offset ``at`` of ``data`` and the offset after it; None while it is cut."""
    if len(data) - at < 2:
        return None
    first, second = data[at], data[at + 1]
    size, start = second & 0x7F, at + 2
    if size >= 126:
        start += 2 if size == 126 else 8
        if len(data) < start:
            return None
        size = struct.unpack_from("!H" if size == 126 else "!Q", data, at + 2)[0]
    masked = bool(second & 0x80)
    begin = start + (4 if masked else 0)
    if len(data) < begin + size:
        return None
    payload = bytes(data[begin : begin + size])
    if masked:
        payload = apply_mask(payload, bytes(data[start:begin]))
    return Frame(bool(first & 0x80), (first >> 4) & 7, first & 0x0F, masked, payload), begin + size


def client_frames(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """The whole frames a client sent, as (opcode, unmasked payload), and the rest; asserts each is
    masked and final (a client of this project never fragments)."""
    frames, at = [], 0
    while (found := read_frame(data, at)) is not None:
        frame, at = found
        assert frame.masked, "a client frame without a mask"
        assert frame.fin, "a fragmented client frame"
        frames.append((frame.opcode, frame.payload))
    return frames, data[at:]


@dataclass
class KeeperFrames:
    """What the keeper sends after the handshake, decoded as a server must (RFC 6455 5.1-5.5):
    whole messages, pings and pongs, its Close; ``defects`` lists each client rule it broke."""

    buffer: bytearray = field(default_factory=bytearray)
    messages: list[bytes] = field(default_factory=list)
    message_kinds: list[int] = field(default_factory=list)  # OP_TEXT or OP_BINARY per message
    pings: list[bytes] = field(default_factory=list)
    pongs: list[bytes] = field(default_factory=list)
    close_code: int | None = None  # the keeper's Close: its status code (1005: none given)
    close_reason: str = ""
    defects: list[str] = field(default_factory=list)
    _parts: list[bytes] = field(default_factory=list)
    _opcode: int | None = None

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while self.close_code is None:
            found = read_frame(self.buffer)
            if found is None:
                return
            frame, end = found
            del self.buffer[:end]
            if not frame.masked:
                self.defects.append("an unmasked frame from the keeper")
            if frame.rsv:
                self.defects.append("reserved bits set by the keeper")
            self._take(frame)

    def _take(self, frame: Frame) -> None:
        opcode, payload = frame.opcode, frame.payload
        if opcode == OP_PING:
            self.pings.append(payload)
        elif opcode == OP_PONG:
            self.pongs.append(payload)
        elif opcode == OP_CLOSE:
            self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            self.close_reason = payload[2:].decode(errors="replace")
        elif opcode in (OP_TEXT, OP_BINARY, OP_CONTINUATION):
            if (opcode == OP_CONTINUATION) != (self._opcode is not None):
                self.defects.append(f"opcode {opcode} out of place in a fragmented message")
            if self._opcode is None:
                self._opcode = opcode
            self._parts.append(payload)
            if frame.fin:
                self.messages.append(b"".join(self._parts))
                self.message_kinds.append(self._opcode)
                self._parts, self._opcode = [], None
        else:
            self.defects.append(f"unknown opcode {opcode} from the keeper")
