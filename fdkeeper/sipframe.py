"""Cutting a SIP byte stream into whole messages (RFC 3261 §18.3), as sipp itself does.

Where the keeper stands between sipp and the SuT (TLS), it forwards only whole messages:
the SuT never sees half a message from a run that died mid-write, and CRLF keep-alives
(RFC 5626 pings and pongs) are taken out of the stream instead of reaching sipp, which
would glue a stray CRLF onto the next message.
"""

from __future__ import annotations

import re

# sipp's own limit: a message over 64 KiB is fatal to it.
MAX_MESSAGE = 65536
HEADER_END = b"\r\n\r\n"
PING = b"\r\n\r\n"
PONG = b"\r\n"
_CONTENT_LENGTH = re.compile(rb"^(?:content-length|l)[ \t]*:[ \t]*(\d+)[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)


class FramingError(ValueError):
    """The stream cannot be cut into SIP messages (oversized or malformed framing)."""


class SipFramer:
    """Feed bytes in, get whole messages out; keep-alives are counted, never returned."""

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._buffer = bytearray()
        # CRLFs seen between messages: RFC 5626 keep-alives. Towards a client only the SuT's
        # pongs (CRLF) are expected; a server's CRLFCRLF ping would count as two.
        self.keepalives = 0

    @property
    def pending(self) -> int:
        """Bytes of a message not yet complete."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        messages = []
        while True:
            self._skip_keepalives()
            message = self._take_message()
            if message is None:
                return messages
            messages.append(message)

    def discard(self) -> bytes:
        """Drop the partial message (its sender is gone); return what was dropped."""
        dropped = bytes(self._buffer)
        self._buffer.clear()
        return dropped

    def _skip_keepalives(self) -> None:
        buffer = self._buffer
        while buffer.startswith(PONG):
            self.keepalives += 1
            del buffer[: len(PONG)]

    def _take_message(self) -> bytes | None:
        buffer = self._buffer
        end = buffer.find(HEADER_END)
        if end < 0:
            if len(buffer) > self.max_message:
                raise FramingError(f"no end of SIP headers within {self.max_message} bytes")
            return None
        match = _CONTENT_LENGTH.search(buffer, 0, end + 2)
        body = int(match.group(1)) if match else 0  # sipp: no Content-Length, no body
        total = end + len(HEADER_END) + body
        if total > self.max_message:
            raise FramingError(f"SIP message of {total} bytes is over {self.max_message}")
        if len(buffer) < total:
            return None
        message = bytes(buffer[:total])
        del buffer[:total]
        return message
