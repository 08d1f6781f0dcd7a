"""The AoR of a SIP message (the URI of its From header): the ptrace mode's from_aor
(fdkeeper/modes/ptrace/aor.py) against the shim's shim_from_aor (helpers/shim/aor.c), on the
same messages. Both lease by this key: one user must get one connection whichever mode runs.

The shim percent-encodes the AoR for the control protocol; the keeper decodes it, so the
bytes after decoding are what must agree."""

from __future__ import annotations

import ctypes
import re
from collections.abc import Callable
from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fdkeeper.modes.ptrace.aor import from_aor

START_LINES = [b"INVITE sip:bob@example.test SIP/2.0", b"REGISTER sip:example.test SIP/2.0", b"SIP/2.0 200 OK"]
OTHER_HEADERS = [
    b"Via: SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bK-1",
    b"To: <sip:bob@example.test>",
    b"t: sip:bob@example.test",
    b"Call-ID: 1-2@127.0.0.1",
    b"Contact: <sip:alice@127.0.0.1:5060;transport=tcp>",
    b"Max-Forwards: 70",
    b"Fromage: <sip:cheese@example.test>",
    b"X-From: <sip:not-me@example.test>",
]

# The shim's AoR of a message, percent-decoded (None: no usable From header).
ShimAor = Callable[[bytes], bytes | None]


@pytest.fixture(scope="module")
def shim_aor(twin_library: Callable[[str, list[str]], ctypes.CDLL]) -> ShimAor:
    function = twin_library("aor", ["shim/aor.c"]).shim_from_aor
    function.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]
    function.restype = ctypes.c_int

    def aor(message: bytes) -> bytes | None:
        out = ctypes.create_string_buffer(3 * len(message) + 4)  # room for every byte encoded
        length = function(message, len(message), out, len(out))
        assert length >= 0, "the AoR cannot be longer than the message, encoded"
        encoded = out.raw[:length]
        assert re.fullmatch(rb"(?:[\x21-\x24\x26-\x7e]|%[0-9A-F]{2})*", encoded), encoded
        return unquote_to_bytes(encoded) if length else None

    return aor


def ptrace_aor(message: bytes) -> bytes | None:
    aor = from_aor(message)
    return None if aor is None else aor.encode("latin-1")


def assert_twins_agree(shim_aor: ShimAor, message: bytes) -> None:
    assert shim_aor(message) == ptrace_aor(message), message


@pytest.mark.parametrize(
    ("from_header", "aor"),
    [
        (b'From: "Alice" <sip:alice@example.test>;tag=1', b"sip:alice@example.test"),
        (b"f: sip:alice@example.test;tag=1", b"sip:alice@example.test"),
        (b"FROM  :  <sip:alice@example.test;transport=tcp?x=y>", b"sip:alice@example.test"),
        (b'From: "a <fake@x> \\" b" <sip:real@example.test>', b"sip:real@example.test"),
        (b"From: <sip:al;ice@example.test;user=phone>", b"sip:al;ice@example.test"),
        (b"From: <sips:%41lice@example.test>", b"sips:%41lice@example.test"),
        (b"From: <sip:alice@example.test", None),
        (b"From: ;tag=1", None),
    ],
)
def test_known_headers(shim_aor: ShimAor, from_header: bytes, aor: bytes | None) -> None:
    message = b"INVITE sip:bob@example.test SIP/2.0\r\nVia: x\r\n" + from_header + b"\r\nCall-ID: c\r\n\r\n"
    assert shim_aor(message) == ptrace_aor(message) == aor


def test_only_the_header_part_counts(shim_aor: ShimAor) -> None:
    message = b"MESSAGE sip:b@x SIP/2.0\r\nCall-ID: c\r\n\r\nFrom: <sip:in-the-body@x>\r\n"
    assert shim_aor(message) is None and ptrace_aor(message) is None


# Pieces a From value is made of, hostile ones weighted in: quotes, escapes, angle brackets,
# parameters, separators, whitespace of every kind, bytes outside ASCII.
VALUE_PIECES = st.sampled_from(
    [b"sip:", b"sips:", b"tel:+1", b"alice", b"@", b"example.test", b":5060", b";tag=1", b";", b"?h=v",
     b"<", b">", b'"', b"\\", b" ", b"\t", b"Alice Smith", b"%", b"\xff", b"\xc3\xa9", b"\x00", b"\r", b"\x0b"]
)  # fmt: skip
FROM_NAMES = st.sampled_from(
    [b"From", b"from", b"FROM", b"f", b"F", b"From ", b"f\t", b"Fro", b"Fromm", b" From", b"\x0bFrom", b"f\x0c", b"\rf"]
)
FROM_VALUES = st.lists(VALUE_PIECES, max_size=14).map(b"".join)
EOLS = st.sampled_from([b"\r\n", b"\n"])


@st.composite
def sip_messages(draw: st.DrawFn) -> bytes:
    """A start line, headers (a From among them, maybe folded, maybe two), a blank line, a body."""
    eol = draw(EOLS)
    lines = [draw(st.sampled_from(START_LINES))]
    headers = draw(st.lists(st.sampled_from(OTHER_HEADERS), max_size=4))
    for _ in range(draw(st.integers(0, 2))):
        header = draw(FROM_NAMES) + b":" + draw(FROM_VALUES)
        if draw(st.booleans()):  # folded: the value goes on on a line that starts with whitespace
            header += draw(EOLS) + draw(st.sampled_from([b" ", b"\t"])) + draw(FROM_VALUES)
        headers.insert(draw(st.integers(0, len(headers))), header)
    lines += headers
    body = draw(st.sampled_from([b"", b"v=0" + eol + b"From: <sip:body@x>" + eol]))
    return eol.join(lines) + eol + eol + body


@settings(max_examples=400, deadline=None)
@given(sip_messages())
@example(b"INVITE x SIP/2.0\r\nFrom: <sip:a@b>\r\n\r\n")
def test_realistic_and_hostile_messages(shim_aor: ShimAor, message: bytes) -> None:
    assert_twins_agree(shim_aor, message)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_after_a_from(shim_aor: ShimAor, tail: bytes) -> None:
    assert_twins_agree(shim_aor, b"INVITE x SIP/2.0\r\nFrom:" + tail)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([b"\r", b"\n", b"From", b"f", b":", b" ", b"<sip:a@b>", b"x"]), max_size=20))
def test_line_ends_and_blank_lines(shim_aor: ShimAor, pieces: list[bytes]) -> None:
    assert_twins_agree(shim_aor, b"OPTIONS x SIP/2.0\r\n" + b"".join(pieces))
