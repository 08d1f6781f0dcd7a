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
# A Content-Length line: the message's first line (match at its start), or any later one (search
# from its start: the leading newline is a literal the regex engine can skip to, where a
# MULTILINE ^ would be tried at every byte).
_CONTENT_LENGTH_FIRST = re.compile(rb"(?:content-length|l)[ \t]*:[ \t]*(\d+)[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)
_CONTENT_LENGTH = re.compile(rb"\n(?:content-length|l)[ \t]*:[ \t]*(\d+)[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)


class FramingError(ValueError):
    """The stream cannot be cut into SIP messages (oversized or malformed framing).

    ``messages`` holds the whole messages the same read completed before the bad part: they
    are good SIP and must still be delivered.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.messages: list[bytes] = []  # filled in by the read that met the bad part


class SipFramer:
    """Feed bytes in, get whole messages out; keep-alives are counted, never returned."""

    __slots__ = ("_buffer", "keepalives", "max_message")  # not a __dict__: two framers per kept TLS link

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
        buffer = self._buffer
        # A message begun in an earlier read goes on from the buffer (and a bytearray or
        # memoryview is copied: the messages handed out are bytes).
        if buffer or type(data) is not bytes:
            buffer += data
            data = bytes(buffer)
            buffer.clear()
        # Messages are cut from ``data`` by offset (whole reads are the common case: no copy
        # into the buffer and out again); only an incomplete tail is kept in the buffer.
        messages = []
        at = 0
        try:
            while True:
                while data.startswith(PONG, at):
                    self.keepalives += 1
                    at += len(PONG)
                end = self._message_end(data, at)
                if end is None:
                    break
                messages.append(data[at:end])
                at = end
        except FramingError as error:
            error.messages = messages
            raise
        finally:  # also on FramingError: the buffer keeps the unframeable rest for discard()
            if at < len(data):
                buffer += memoryview(data)[at:]
        return messages

    def discard(self) -> bytes:
        """Drop the partial message (its sender is gone); return what was dropped."""
        dropped = bytes(self._buffer)
        self._buffer.clear()
        return dropped

    def _message_end(self, data: bytes, at: int) -> int | None:
        """Where the message starting at ``at`` ends; None if it is not all there yet."""
        end = data.find(HEADER_END, at)
        if end < 0:
            if len(data) - at > self.max_message:
                raise FramingError(f"no end of SIP headers within {self.max_message} bytes")
            return None
        match = _CONTENT_LENGTH_FIRST.match(data, at, end + 2) or _CONTENT_LENGTH.search(data, at, end + 2)
        body = int(match.group(1)) if match else 0  # sipp: no Content-Length, no body
        total = end - at + len(HEADER_END) + body
        if total > self.max_message:
            raise FramingError(f"SIP message of {total} bytes is over {self.max_message}")
        if len(data) - at < total:
            return None
        return at + total
