"""One SIP message as bytes: its start line, headers found by position, and edits applied in one join.

Nothing here copies or lowers a whole head: headers are found with case-insensitive patterns
searched between offsets, and changes are (start, end, text) replacements joined once. This is
the per-message path of the converter; keep it lean.
"""

from __future__ import annotations

import hashlib
import operator
import re

Span = tuple[int, int, int]  # (line start, value start, line end) of one header line

TAG = re.compile(rb";[ \t]*tag[ \t]*=", re.IGNORECASE)
_HEADER_NAME = re.compile(rb"[!-9;-~]+")
_METHODS = frozenset(
    {
        b"INVITE",
        b"ACK",
        b"BYE",
        b"CANCEL",
        b"OPTIONS",
        b"REGISTER",
        b"SUBSCRIBE",
        b"NOTIFY",
        b"REFER",
        b"MESSAGE",
        b"INFO",
        b"PRACK",
        b"UPDATE",
        b"PUBLISH",
    }
)
_LINEAR_SPACE = (b" ", b"\t", b"\r", b"\n")


class Malformed(ValueError):
    """A message that cannot be handled; ``kind`` names the counter."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


# --------------------------------------------------------------------------
# finding headers by position in the head
# --------------------------------------------------------------------------


def header_pattern(*names: bytes) -> re.Pattern[bytes]:
    """A header line with one of these names, any case: "\\nname :" . Case-insensitive
    matching of the message itself spares a lowered copy of every head."""
    return re.compile(rb"\n(?:" + b"|".join(re.escape(n) for n in names) + rb")[ \t]*:[ \t]*", re.IGNORECASE)


VIA = header_pattern(b"via", b"v")
ROUTE = header_pattern(b"route")
TO = header_pattern(b"to", b"t")
CALL_ID = header_pattern(b"call-id", b"i")
CONTENT_LENGTH = header_pattern(b"content-length", b"l")
MAX_FORWARDS = header_pattern(b"max-forwards")
OUTBOUND = header_pattern(b"x-outbound-proxy")


# The text of one comma-separated element: runs of anything but , < " and whole <...> or "..."
# (commas inside do not count). It stops at a comma, or at an unclosed < or " .
_ELEMENT = re.compile(rb'(?:[^,<"]+|<[^>]*>|"[^"]*")*')


def end_of_element(data: bytes, at: int, end: int) -> int:
    """Where the first comma-separated element of the header value data[at:end] ends
    (absolute); an unclosed < or " runs to the end of the value."""
    element = _ELEMENT.match(data, at, end)
    assert element is not None  # the pattern matches the empty string too
    stop = element.end()
    if stop < end and data[stop] != 0x2C:  # not a comma: an unclosed < or "
        return end
    return stop


def next_element(data: bytes, element_end: int) -> int:
    """Where the element after the comma at ``element_end`` starts (past linear white space)."""
    at = element_end + 1
    while data[at : at + 1] in _LINEAR_SPACE:
        at += 1
    return at


# --------------------------------------------------------------------------
# a parsed message (just enough of it)
# --------------------------------------------------------------------------


class Message:
    """One SIP message: start line, head (searched up to ``limit``: just past the CRLF of its
    last header), body length."""

    __slots__ = ("body_length", "data", "has_length", "head_end", "is_request", "limit", "method", "start_end")

    def __init__(self, data: bytes, datagram: bool) -> None:
        head_end = data.find(b"\r\n\r\n")
        if head_end < 0:
            raise Malformed("no end of headers")
        start_end = data.find(b"\r\n")
        # The start line is read in place (bounded searches): no copy of it.
        if data.startswith(b"SIP/2.0 "):
            if start_end < 11 or not data[8:11].isdigit() or (start_end > 11 and data[11] != 0x20):
                raise Malformed("bad status line")
            self.is_request, self.method = False, b""
        else:
            space = data.find(b" ", 0, start_end)
            if not data.endswith(b" SIP/2.0", 0, start_end) or data.count(b" ", 0, start_end) != 2 or space <= 0:
                raise Malformed("bad request line")
            method = data[:space]
            if method not in _METHODS and not _HEADER_NAME.fullmatch(method):
                raise Malformed("bad request line")
            self.is_request, self.method = True, method
        self.data, self.limit = data, head_end + 2  # what header() searches
        span = self.header(CONTENT_LENGTH)
        body = len(data) - head_end - 4
        if span is None:
            if not datagram and body:
                raise Malformed("no Content-Length")  # the framer never gives us this
            self.has_length, length = False, body
        else:
            text = data[span[1] : span[2]].strip()
            if not text.isdigit():
                raise Malformed("bad Content-Length")
            self.has_length, length = True, int(text)
            if length > body:
                raise Malformed("truncated body")
            if length < body:  # RFC 3261 §18.3: bytes past Content-Length are discarded
                self.data = data[: head_end + 4 + length]
        self.head_end, self.start_end, self.body_length = head_end, start_end, length

    def header(self, pattern: re.Pattern[bytes], start: int = 0) -> Span | None:
        """The first header line (at or after ``start``) that ``pattern`` (header_pattern) finds
        in the head: (line start, value start, line end); line end is that line's CRLF (folded
        lines included). The hottest function of the converter: kept to one call."""
        data = self.data
        match = pattern.search(data, start, self.limit)
        if match is None:
            return None
        value = match.end()
        end = data.find(b"\r\n", value)
        while data[end + 2] in b" \t":  # a folded line goes on (the head is followed by CRLF)
            end = data.find(b"\r\n", end + 2)
        return match.start() + 1, value, end

    def value(self, span: Span) -> bytes:
        return self.data[span[1] : span[2]]

    def request_uri(self) -> bytes:
        return self.data[: self.start_end].split(b" ")[1]

    def top_via(self) -> tuple[Span, int]:
        """The top Via header's span and where its first element ends (absolute)."""
        span = self.header(VIA)
        if span is None:
            raise Malformed("no Via")
        return span, end_of_element(self.data, span[1], span[2])

    def next_via(self, span: Span, element_end: int) -> bytes:
        """The Via element after the top one (``top_via()``): later in its line, or the next Via line."""
        data = self.data
        if element_end < span[2]:
            at = next_element(data, element_end)
            return data[at : end_of_element(data, at, span[2])]
        following = self.header(VIA, span[2])
        if following is None:
            raise Malformed("response with no Via after ours")
        return data[following[1] : end_of_element(data, following[1], following[2])]

    def has_to_tag(self) -> bool:
        span = self.header(TO)
        if span is None:
            raise Malformed("no To")
        return bool(TAG.search(self.data, span[1], span[2]))

    def call_id(self) -> bytes:
        span = self.header(CALL_ID)
        return self.data[span[1] : span[2]].strip() if span else b""


# --------------------------------------------------------------------------
# editing
# --------------------------------------------------------------------------


_START = operator.itemgetter(0)


class Edits(list[tuple[int, int, bytes]]):
    """Replacements on a message's bytes, applied in one join: append((start, end, text)).
    A plain list underneath: adding an edit is a C call, not a Python one."""

    __slots__ = ()

    def apply(self, data: bytes) -> bytes:
        if not self:
            return data
        if len(self) == 1:  # the usual case for a response: our Via out
            start, end, text = self[0]
            return b"".join((data[:start], text, data[end:]))
        self.sort(key=_START)  # stable: insertions at one place keep their order
        parts, at = [], 0
        for start, end, text in self:
            parts.append(data[at:start])
            parts.append(text)
            at = max(at, end)
        parts.append(data[at:])
        return b"".join(parts)


def remove_element(message: Message, span: Span, element_end: int, edits: Edits) -> None:
    """Remove the first element of a header: the whole line if it is the only one."""
    if element_end >= span[2]:
        edits.append((span[0], span[2] + 2, b""))
    else:
        edits.append((span[1], next_element(message.data, element_end), b""))


def count_hop(message: Message, edits: Edits) -> bool:
    """Max-Forwards down by one (70 added where there is none); False if it was 0 already:
    the request must not go on (RFC 3261 §16.3: answer 483)."""
    span = message.header(MAX_FORWARDS)
    if span is None:
        edits.append((message.start_end + 2, message.start_end + 2, b"Max-Forwards: 70\r\n"))
        return True
    text = message.value(span).strip()
    if not text.isdigit():
        raise Malformed("bad Max-Forwards")
    hops = int(text)
    if hops == 0:
        return False
    edits.append((span[1], span[2], b"%d" % (hops - 1)))
    return True


def make_reply(message: Message, code: int, reason: str) -> bytes:
    """A stateless reply to a request: its Via, From, To (with a tag), Call-ID and CSeq."""
    keep = []
    head = message.data[message.start_end + 2 : message.head_end + 2]
    for line in head.split(b"\r\n"):
        name = line.split(b":", 1)[0].strip().lower()
        if name in (b"via", b"v", b"from", b"f", b"call-id", b"i", b"cseq"):
            keep.append(line)
        elif name in (b"to", b"t"):
            keep.append(
                line if TAG.search(line) else line + b";tag=fdk" + hashlib.md5(message.data).hexdigest()[:10].encode()
            )
    return b"SIP/2.0 %d %s\r\n%s\r\nServer: fdkeeper-converter\r\nContent-Length: 0\r\n\r\n" % (
        code,
        reason.encode(),
        b"\r\n".join(keep),
    )
