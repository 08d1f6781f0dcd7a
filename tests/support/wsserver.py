"""The server's side of a WebSocket, for tests: frames as a server writes them (unmasked, or bent to
any defect), its answer to a client's Upgrade request, and a reader of the frames a client sends
(which must be masked). Pure bytes: no sockets, so a test server of any shape can use it."""

from __future__ import annotations

import itertools
import re
import struct

from fdkeeper.websocket import OP_CONTINUATION, OP_TEXT, accept_for, apply_mask

_KEY = re.compile(rb"^sec-websocket-key:[ \t]*(\S+)", re.IGNORECASE | re.MULTILINE)


def server_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = None,
    length: int | None = None,
    width: int | None = None,
) -> bytes:
    """One frame as a server sends it: unmasked unless ``mask`` is given (a defect). ``length`` announces
    another payload size than the real one; ``width`` forces the length's encoding (7, 16 or 64 bits)."""
    size = len(payload) if length is None else length
    if width is None:
        width = 7 if size < 126 else 16 if size < 0x10000 else 64
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    masked = 0x80 if mask is not None else 0
    if width == 7:
        header = bytes((first, masked | size))
    elif width == 16:
        header = struct.pack("!BBH", first, masked | 126, size)
    else:
        header = struct.pack("!BBQ", first, masked | 127, size)
    if mask is None:
        return header + payload
    return header + mask + apply_mask(payload, mask)


def server_message(message: bytes, cuts: list[int] | None = None, opcode: int = OP_TEXT) -> bytes:
    """One message as a server sends it: one frame, or fragments cut at the payload offsets ``cuts``
    (a repeated offset makes an empty fragment)."""
    bounds = [0, *sorted(min(max(cut, 0), len(message)) for cut in cuts or []), len(message)]
    pieces = [message[start:stop] for start, stop in itertools.pairwise(bounds)]
    return b"".join(
        server_frame(opcode if index == 0 else OP_CONTINUATION, piece, fin=index == len(pieces) - 1)
        for index, piece in enumerate(pieces)
    )


def handshake_answer(
    request: bytes, *, status: str = "101 Switching Protocols", protocol: str | None = "sip", extra: str = ""
) -> bytes:
    """A server's answer to ``request``: the right accept key, ``protocol`` (None: no such header),
    and ``extra`` header lines (each ending in CRLF)."""
    found = _KEY.search(request)
    assert found, "the request has no Sec-WebSocket-Key"
    lines = [f"HTTP/1.1 {status}", "Upgrade: websocket", "Connection: Upgrade"]
    lines.append(f"Sec-WebSocket-Accept: {accept_for(found.group(1).decode())}")
    if protocol is not None:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def client_frames(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """The whole frames a client sent, as (opcode, unmasked payload), and the rest; asserts each is
    masked and final (a client of this project never fragments)."""
    frames = []
    at = 0
    while len(data) - at >= 2:
        first, second = data[at], data[at + 1]
        assert second & 0x80, "a client frame without a mask"
        assert first & 0x80, "a fragmented client frame"
        size, start = second & 0x7F, at + 2
        if size >= 126:
            start += 2 if size == 126 else 8
            if len(data) < start:
                break
            size = struct.unpack_from("!H" if size == 126 else "!Q", data, at + 2)[0]
        if len(data) < start + 4 + size:
            break
        mask = data[start : start + 4]
        payload = data[start + 4 : start + 4 + size]
        frames.append((first & 0x0F, apply_mask(payload, mask)))
        at = start + 4 + size
    return frames, data[at:]
