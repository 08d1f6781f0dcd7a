"""SIP framing: the keeper's SipFramer (fdkeeper/sip/framing.py) against the TLS pump's sip_frame
(helpers/tlspump/sipframe.c), fed the same streams cut at the same points. After every read both
must have handed out the same messages, counted the same keep-alives, kept the same partial
message, and refused unframeable data at the same read with the same reason."""

from __future__ import annotations

import ctypes
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fdkeeper.sip.framing import MAX_MESSAGE, FramingError, SipFramer


class Buffer(ctypes.Structure):
    """struct buffer of sipframe.h."""

    _fields_ = [("data", ctypes.c_void_p), ("length", ctypes.c_size_t), ("capacity", ctypes.c_size_t)]


DELIVER = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
# What one read gives: the messages handed out, and the reason when the rest is unframeable.
Read = tuple[list[bytes], str | None]


class CFramer:
    """The pump's framing as tlspump.c drives it: bytes appended to the link's buffer, then sip_frame."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.library = library
        self.buffer = Buffer()
        self.keepalives = ctypes.c_uint64(0)

    def feed(self, data: bytes) -> Read:
        assert self.library.buffer_append(ctypes.byref(self.buffer), data, len(data)) == 0
        messages: list[bytes] = []
        deliver = DELIVER(lambda _context, message, length: messages.append(ctypes.string_at(message, length)))
        error = ctypes.create_string_buffer(256)
        failed = self.library.sip_frame(
            ctypes.byref(self.buffer), ctypes.byref(self.keepalives), deliver, None, error, len(error)
        )
        return messages, error.value.decode() if failed else None

    @property
    def pending(self) -> bytes:
        return ctypes.string_at(self.buffer.data, self.buffer.length) if self.buffer.length else b""

    def free(self) -> None:
        self.library.buffer_free(ctypes.byref(self.buffer))


MakeCFramer = Callable[[], AbstractContextManager[CFramer]]


def python_feed(framer: SipFramer, data: bytes) -> Read:
    try:
        return framer.feed(data), None
    except FramingError as error:
        return error.messages, str(error)


@pytest.fixture(scope="module")
def c_framer(twin_library: Callable[[str, list[str]], ctypes.CDLL]) -> MakeCFramer:
    library = twin_library("sipframe", ["tlspump/sipframe.c"])
    library.buffer_append.argtypes = [ctypes.POINTER(Buffer), ctypes.c_char_p, ctypes.c_size_t]
    library.sip_frame.argtypes = [
        ctypes.POINTER(Buffer), ctypes.POINTER(ctypes.c_uint64), DELIVER, ctypes.c_void_p, ctypes.c_char_p,
        ctypes.c_size_t,
    ]  # fmt: skip
    library.buffer_free.argtypes = [ctypes.POINTER(Buffer)]

    @contextmanager
    def make() -> Iterator[CFramer]:
        framer = CFramer(library)
        try:
            yield framer
        finally:
            framer.free()

    return make


def same_reason(python: str | None, c: str | None) -> bool:
    """The same reason; the C caps a Content-Length past 10^8 (over MAX_MESSAGE either way), so
    with such a number only the words must agree."""
    if python is None or c is None:
        return python is c
    if any(int(number) >= 10**8 for number in re.findall(r"\d+", python)):
        return re.sub(r"\d+", "N", python) == re.sub(r"\d+", "N", c)
    return python == c


def assert_twins_agree(c_framer: MakeCFramer, stream: bytes, cuts: list[int]) -> None:
    python = SipFramer()
    with c_framer() as c:
        start = 0
        for cut in [*sorted(cuts), len(stream)]:
            chunk, start = stream[start:cut], cut
            python_read, c_read = python_feed(python, chunk), c.feed(chunk)
            assert python_read[0] == c_read[0], (chunk, python_read, c_read)
            assert same_reason(python_read[1], c_read[1]), (python_read[1], c_read[1])
            assert python.keepalives == c.keepalives.value
            assert python.pending == len(c.pending)
            if python_read[1] is not None:
                break  # the pump ends the link there, the keeper the connection
        assert python.discard() == c.pending  # the partial message (or the unframeable rest)


def message(body: bytes = b"", length: str = "Content-Length: {n}", eol: bytes = b"\r\n") -> bytes:
    header = length.format(n=len(body)).encode()
    return b"OPTIONS sip:a@b SIP/2.0" + eol + b"Call-ID: x" + eol + header + eol + eol + body


@pytest.mark.parametrize(
    "stream",
    [
        message(b"v=0\r\n") + message(length="l: {n}"),
        b"\r\n\r\n" + message() + b"\r\n" + message(b"x" * 10),
        b"BYE sip:a@b SIP/2.0\r\nCall-ID: y\r\n\r\n" * 2,
        b"X" * (MAX_MESSAGE + 1),
        message(length="Content-Length: 99999") + b"x",
        message(length="Content-Length: 99999999999999999999"),
        message(b"abc", length="content-length :\t{n} \r\nl: 999"),
        message(b"abc", length="Content-Length: {n}x"),
        b"l: 3\r\n\r\nabc" + message(),
    ],
)
def test_known_streams(c_framer: MakeCFramer, stream: bytes) -> None:
    assert_twins_agree(c_framer, stream, [])
    assert_twins_agree(c_framer, stream, list(range(0, len(stream), 7)))


LENGTH_NAMES = st.sampled_from(
    ["Content-Length", "content-length", "CONTENT-LENGTH", "l", "L", "Content-Lengthx", "xl"]
)
LENGTH_VALUES = st.one_of(
    st.just("{n}"),
    st.sampled_from(["0", "{n}0", "0{n}", "-{n}", "+{n}", "{n} {n}", "", "65536", "65500", "99999999999"]),
    st.integers(0, 70000).map(str),
)


@st.composite
def sip_message(draw: st.DrawFn) -> bytes:
    """A message with its Content-Length right, wrong, odd or absent, maybe twice, CRLF or LF."""
    eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))
    body = draw(st.binary(max_size=200))
    lines = [draw(st.sampled_from([b"INVITE sip:b@x SIP/2.0", b"SIP/2.0 200 OK", b""]))]
    lines += draw(st.lists(st.sampled_from([b"Via: SIP/2.0/TLS x", b"Call-ID: 1@x", b"CSeq: 1 INVITE"]), max_size=3))
    for _ in range(draw(st.integers(0, 2))):
        name = draw(LENGTH_NAMES)
        separator = draw(st.sampled_from([":", ": ", " : ", "\t:\t", ":  "]))
        value = draw(LENGTH_VALUES).format(n=len(body))
        trail = draw(st.sampled_from(["", " ", "\t", "\r", " x"]))
        lines.insert(draw(st.integers(0, len(lines))), f"{name}{separator}{value}{trail}".encode())
    return eol.join(lines) + b"\r\n\r\n" + body


PIECES = st.one_of(
    sip_message(),
    st.sampled_from([b"\r\n", b"\r\n\r\n", b"\n", b"\r"]),  # keep-alives and stray line ends
    st.lists(
        st.sampled_from([b"\r\n", b"\r\n\r\n", b"\n", b"l:", b"Content-Length:", b" ", b"12", b"0", b"x"]), max_size=12
    ).map(b"".join),
    st.integers(MAX_MESSAGE - 100, MAX_MESSAGE + 100).map(lambda size: b"X" * size),  # around the limit
    st.integers(MAX_MESSAGE - 80, MAX_MESSAGE + 10).map(lambda n: b"M x SIP/2.0\r\nl: %d\r\n\r\n" % n),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(PIECES, min_size=1, max_size=6).map(b"".join), st.data())
@example(b"\r\n" + message() + b"\r\n\r\n", None)
def test_any_stream_cut_anywhere(c_framer: MakeCFramer, stream: bytes, data: st.DataObject | None) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8)) if data else []
    assert_twins_agree(c_framer, stream, cuts)
