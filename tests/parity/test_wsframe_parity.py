"""WebSocket frames: the keeper's WsDecoder and encoder (fdkeeper/websocket.py) against the pump's
wsframe.c, fed the same streams cut at the same points. After every read both must have handed out
the same messages, queued the same replies (compared unmasked: each masking key is random),
counted the same keep-alives and pings, taken the same Close, held the same raw bytes, and refused
a broken stream at the same read with the same words and code. A hand-over (discard, then a fresh
decoder fed what was discarded) may come between any two reads."""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fdkeeper.sip.framing import MAX_MESSAGE
from fdkeeper.websocket import (
    HEADER_ROOM,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    WsDecoder,
    WsProtocolError,
    encode_frame,
    encode_message,
)


class Buffer(ctypes.Structure):
    """struct buffer of sipframe.h."""

    _fields_ = [("data", ctypes.c_void_p), ("length", ctypes.c_size_t), ("capacity", ctypes.c_size_t)]


class Decoder(ctypes.Structure):
    """struct ws_decoder of wsframe.h."""

    _fields_ = [
        ("framed", ctypes.c_size_t),
        ("message_length", ctypes.c_size_t),
        ("begun", ctypes.c_int),
        ("keepalives", ctypes.c_uint64),
        ("pings", ctypes.c_uint64),
        ("replies", Buffer),
        ("message", Buffer),
        ("closed", ctypes.c_char * 640),
    ]


DELIVER = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
# What one read gives: the messages handed out, and the error (its text and close code) if any.
Read = tuple[list[bytes], tuple[str, int] | None]


def contents(buffer: Buffer) -> bytes:
    return ctypes.string_at(buffer.data, buffer.length) if buffer.length else b""


class CDecoder:
    """The pump's decoder as tlspump.c drives it: bytes appended to the link's raw buffer, then ws_decode."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.library = library
        self.decoder = Decoder()
        self.raw = Buffer()

    def feed(self, data: bytes) -> Read:
        assert self.library.buffer_append(ctypes.byref(self.raw), data, len(data)) == 0
        messages: list[bytes] = []
        deliver = DELIVER(lambda _context, message, length: messages.append(ctypes.string_at(message, length)))
        error = ctypes.create_string_buffer(256)
        code = self.library.ws_decode(
            ctypes.byref(self.decoder), ctypes.byref(self.raw), deliver, None, error, len(error)
        )
        return messages, (error.value.decode(), code) if code else None

    def take_replies(self) -> bytes:
        replies = contents(self.decoder.replies)
        self.decoder.replies.length = 0
        return replies

    @property
    def pending(self) -> bytes:
        return contents(self.raw)

    def hand_over(self) -> bytes:
        """discard(), then a fresh decoder: the pump's attach keeps the raw bytes and resets the state."""
        raw = self.pending
        self.library.ws_reset(ctypes.byref(self.decoder))
        return raw

    def free(self) -> None:
        self.library.ws_free(ctypes.byref(self.decoder))
        self.library.buffer_free(ctypes.byref(self.raw))


MakeCDecoder = Callable[[], AbstractContextManager[CDecoder]]


@pytest.fixture(scope="module")
def library(twin_library: Callable[[str, list[str]], ctypes.CDLL]) -> ctypes.CDLL:
    library = twin_library("wsframe", ["tlspump/sipframe.c", "tlspump/wsframe.c"])
    library.buffer_append.argtypes = [ctypes.POINTER(Buffer), ctypes.c_char_p, ctypes.c_size_t]
    library.buffer_free.argtypes = [ctypes.POINTER(Buffer)]
    library.ws_decode.argtypes = [
        ctypes.POINTER(Decoder), ctypes.POINTER(Buffer), DELIVER, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
    ]  # fmt: skip
    library.ws_reset.argtypes = library.ws_free.argtypes = [ctypes.POINTER(Decoder)]
    library.ws_encode.argtypes = [ctypes.POINTER(Buffer), ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
    library.ws_encode.argtypes += [ctypes.c_char_p]
    library.ws_encode_message.argtypes = [ctypes.POINTER(Buffer), ctypes.c_char_p, ctypes.c_size_t]
    return library


@pytest.fixture(scope="module")
def c_decoder(library: ctypes.CDLL) -> MakeCDecoder:
    @contextmanager
    def make() -> Iterator[CDecoder]:
        decoder = CDecoder(library)
        try:
            yield decoder
        finally:
            decoder.free()

    return make


def python_feed(decoder: WsDecoder, data: bytes) -> Read:
    try:
        return decoder.feed(data), None
    except WsProtocolError as error:
        return error.messages, (str(error).removeprefix("fdkeeper: "), error.code)  # the pump's end_reason


def unmasked_frames(data: bytes) -> list[tuple[int, bytes]]:
    """The client frames in data as (first byte, payload), checked masked and whole."""
    frames, at = [], 0
    while at < len(data):
        first, second = data[at], data[at + 1]
        assert second & 0x80, "a client frame without a mask"
        size, at = second & 0x7F, at + 2
        if size >= 126:
            width = 2 if size == 126 else 8
            size, at = int.from_bytes(data[at : at + width], "big"), at + width
        mask, at = data[at : at + 4], at + 4
        payload = bytes(byte ^ mask[index % 4] for index, byte in enumerate(data[at : at + size]))
        frames.append((first, payload))
        at += size
    assert at == len(data)
    return frames


def assert_twins_agree(c_decoder: MakeCDecoder, stream: bytes, cuts: list[int], hand_overs: set[int]) -> None:
    python = WsDecoder()
    with c_decoder() as c:
        start = 0
        for index, cut in enumerate([*sorted(cuts), len(stream)]):
            chunk, start = stream[start:cut], cut
            python_read, c_read = python_feed(python, chunk), c.feed(chunk)
            assert python_read == c_read, (chunk, python_read, c_read)
            if python_read[1] is not None:
                return  # the link ends there: the state after an error is not defined
            assert unmasked_frames(bytes(python.replies)) == unmasked_frames(c.take_replies())
            python.replies.clear()
            assert (python.keepalives, python.pings) == (c.decoder.keepalives, c.decoder.pings)
            assert python.closed == c.decoder.closed.decode()
            assert python.pending == len(c.pending)
            if index in hand_overs and not python.closed:
                held = python.discard()
                assert held == c.hand_over()
                python = WsDecoder()
                assert python.feed(held) == []
        assert python.discard() == c.pending  # the unfinished message's raw bytes


def frame(opcode: int, payload: bytes = b"", fin: bool = True, first: int = 0, width: int = 0) -> bytes:
    """A server's frame (unmasked); first: extra bits of the first byte; width: force a 16/64-bit length."""
    size = len(payload)
    head = bytes([(0x80 if fin else 0) | first | opcode])
    if width == 8 or size >= 0x10000:
        head += bytes([127]) + struct.pack("!Q", size)
    elif width == 2 or size >= 126:
        head += bytes([126]) + struct.pack("!H", size)
    else:
        head += bytes([size])
    return head + payload


def header(opcode: int, size: int, fin: bool = True) -> bytes:
    """Only the header of a frame announcing size bytes (the payload never follows)."""
    return frame(opcode, fin=fin, width=8)[:2] + struct.pack("!Q", size)


SIP = b"MESSAGE sip:a@b SIP/2.0\r\nCall-ID: x\r\nContent-Length: 0\r\n\r\n"


@pytest.mark.parametrize(
    "stream",
    [
        frame(OP_TEXT, SIP) + frame(OP_BINARY, b"\xff" + SIP) + frame(OP_TEXT, b" \r\n") + frame(OP_TEXT),
        frame(OP_TEXT, SIP[:10], fin=False) + frame(OP_PING, b"hi") + frame(OP_CONTINUATION, SIP[10:]),
        frame(OP_PONG) + frame(OP_CLOSE, b"\x03\xe9bye\n\xe2\x80\xa8\xc2\x85\xff") + frame(OP_TEXT, SIP),
        frame(OP_TEXT, b"x", fin=False) + frame(OP_CLOSE) + frame(OP_TEXT, SIP),
        frame(OP_CLOSE, b"\x03"),
        frame(OP_TEXT, SIP) + bytes([0x81, 0x85]) + b"mask" + b"x" * 5,
        frame(OP_TEXT, SIP) + frame(OP_TEXT, first=0x40),
        frame(3) + frame(OP_PING, fin=False),
        frame(OP_CONTINUATION, b"x"),
        frame(OP_TEXT, b"a", fin=False) + frame(OP_BINARY, b"b"),
        frame(OP_PING, b"x" * 126),
        header(OP_TEXT, 1 << 63),
        header(OP_TEXT, MAX_MESSAGE + 1),
        frame(OP_TEXT, b"y" * 1000, fin=False) + header(OP_CONTINUATION, MAX_MESSAGE - 999),
        frame(OP_TEXT, b"z" * (MAX_MESSAGE - 10), fin=False) + frame(OP_CONTINUATION, b"z" * 10),
        frame(OP_TEXT, fin=False) + frame(OP_CONTINUATION, fin=False) * (HEADER_ROOM // 2) + frame(OP_CONTINUATION),
        frame(OP_TEXT, SIP, width=8) + frame(OP_TEXT, SIP[:5], width=2, fin=False) + frame(OP_CONTINUATION, width=8),
    ],
)
def test_known_streams(c_decoder: MakeCDecoder, stream: bytes) -> None:
    assert_twins_agree(c_decoder, stream, [], set())
    assert_twins_agree(c_decoder, stream, list(range(0, len(stream), 3)), {1, 5, 7})


@st.composite
def server_frames(draw: st.DrawFn) -> bytes:
    """A message in one frame or several (pings, pongs between them), a close, or a defect."""
    payload = draw(
        st.one_of(
            st.sampled_from([SIP, b"", b" \t\r\n", b"\x00", b"\xc3\x28"]),
            st.binary(max_size=300),
            st.integers(100, 70000).map(lambda size: b"s" * size),
        )
    )
    kind = draw(st.sampled_from(["whole", "fragments", "control", "close", "defect"]))
    width = draw(st.sampled_from([0, 0, 0, 2, 8]))
    if kind == "whole":
        return frame(draw(st.sampled_from([OP_TEXT, OP_BINARY])), payload, width=width)
    if kind == "fragments":
        cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=4)))
        pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
        frames = [frame(OP_TEXT if at == 0 else OP_CONTINUATION, piece, fin=at == len(pieces) - 1, width=width)
                  for at, piece in enumerate(pieces)]  # fmt: skip
        between = draw(st.lists(st.sampled_from([frame(OP_PING, b"p"), frame(OP_PONG), b""]), min_size=len(frames)))
        return b"".join(piece + extra for piece, extra in zip(frames, between, strict=False))
    if kind == "control":
        return frame(draw(st.sampled_from([OP_PING, OP_PONG])), payload[:125], width=width)
    if kind == "close":
        code = draw(st.one_of(st.sampled_from([b"", b"\x03\xe8", b"\x03\xe9", b"\x0f\xa0", b"\x00\x00"]), st.binary()))
        return frame(OP_CLOSE, (code + payload)[:125])
    first = draw(st.sampled_from([0x10, 0x20, 0x40]))
    opcode = draw(st.integers(0, 15))
    return draw(
        st.sampled_from(
            [
                frame(opcode, payload[:200], first=first),
                frame(opcode, payload[:200], fin=False),
                frame(OP_TEXT, payload[:10])[:1] + bytes([0x80 | min(len(payload), 10)]) + b"mask" + payload[:10],
                header(draw(st.sampled_from([OP_TEXT, OP_PING, OP_CONTINUATION])), draw(st.integers(0, 1 << 64 - 1))),
                payload,  # not a frame at all
            ]
        )
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(server_frames(), min_size=1, max_size=6).map(b"".join), st.data())
@example(frame(OP_TEXT, SIP, fin=False) + frame(OP_PING) + frame(OP_CONTINUATION, SIP), None)
def test_any_stream_cut_anywhere(c_decoder: MakeCDecoder, stream: bytes, data: st.DataObject | None) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8)) if data else []
    hand_overs = set(data.draw(st.lists(st.integers(0, 8), max_size=3))) if data else set()
    assert_twins_agree(c_decoder, stream, cuts, hand_overs)


def test_a_stream_split_at_every_byte(c_decoder: MakeCDecoder) -> None:
    stream = frame(OP_TEXT, SIP[:20], fin=False) + frame(OP_PING, b"x") + frame(OP_CONTINUATION, SIP[20:], width=8)
    stream += frame(OP_CLOSE, b"\x03\xe8ok")
    assert_twins_agree(c_decoder, stream, list(range(len(stream))), set(range(0, len(stream), 5)))


def c_encoded(library: ctypes.CDLL, call: Callable[[Buffer], int]) -> bytes:
    out = Buffer()
    try:
        assert call(out) == 0
        return contents(out)
    finally:
        library.buffer_free(ctypes.byref(out))


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG]),
    st.one_of(st.binary(max_size=300), st.integers(60000, 70000).map(lambda size: b"q" * size)),
    st.binary(min_size=4, max_size=4),
)
def test_encoded_frames_are_the_same(library: ctypes.CDLL, opcode: int, payload: bytes, mask: bytes) -> None:
    encoded = c_encoded(library, lambda out: library.ws_encode(ctypes.byref(out), opcode, payload, len(payload), mask))
    assert encoded == encode_frame(opcode, payload, mask)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=40), st.text(max_size=20).map(str.encode), st.just(SIP + "é".encode())))
def test_a_message_is_text_exactly_when_python_says_so(library: ctypes.CDLL, message: bytes) -> None:
    encoded = c_encoded(library, lambda out: library.ws_encode_message(ctypes.byref(out), message, len(message)))
    assert unmasked_frames(encoded) == unmasked_frames(encode_message(message)) == [(encoded[0], message)]


def test_each_frame_has_its_own_random_mask(library: ctypes.CDLL) -> None:
    masks = {
        c_encoded(library, lambda out: library.ws_encode_message(ctypes.byref(out), SIP, len(SIP)))[4:8]
        for _ in range(2000)  # several refills of the pool
    }
    assert len(masks) > 1990
