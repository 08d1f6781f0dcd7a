"""Cutting SIP streams into whole messages (pure logic)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fdkeeper.sip.framing import FramingError, SipFramer


def message(body: bytes = b"", compact: bool = False) -> bytes:
    length = f"l: {len(body)}" if compact else f"Content-Length: {len(body)}"
    return f"OPTIONS sip:a@b SIP/2.0\r\nCall-ID: x\r\n{length}\r\n\r\n".encode() + body


def test_whole_split_and_several_messages():
    framer = SipFramer()
    one, two = message(b"v=0\r\n"), message(compact=True)
    assert framer.feed(one[:10]) == []
    assert framer.feed(one[10:] + two[:5]) == [one]
    assert framer.pending == 5
    assert framer.feed(two[5:]) == [two]


def test_keepalives_are_counted_never_returned():
    framer = SipFramer()
    assert framer.feed(b"\r\n\r\n" + message() + b"\r\n") == [message()]
    assert framer.feed(message()) == [message()]
    assert framer.keepalives == 3


def test_a_lone_pong_counts_at_once():
    framer = SipFramer()
    assert framer.feed(b"\r\n") == []
    assert framer.keepalives == 1 and framer.pending == 0


def test_no_content_length_means_no_body():
    framer = SipFramer()
    bare = b"BYE sip:a@b SIP/2.0\r\nCall-ID: y\r\n\r\n"
    assert framer.feed(bare + bare) == [bare, bare]


def test_oversized_messages_are_refused():
    with pytest.raises(FramingError):
        SipFramer().feed(b"X" * 70000)
    with pytest.raises(FramingError):
        SipFramer().feed(b"INVITE x SIP/2.0\r\nContent-Length: 99999\r\n\r\n")


def test_discard_returns_the_partial_message():
    framer = SipFramer()
    framer.feed(message()[:20])
    assert framer.discard() == message()[:20]
    assert framer.pending == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=8), st.data())
def test_any_split_of_a_stream_gives_the_same_messages(bodies, data):
    stream = b"".join(message(body) for body in bodies)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    framer, got, start = SipFramer(), [], 0
    for cut in [*cuts, len(stream)]:
        got += framer.feed(stream[start:cut])
        start = cut
    assert got == [message(body) for body in bodies]


def test_whole_messages_before_unframeable_data_are_kept():
    good = b"OPTIONS sip:a SIP/2.0\r\nContent-Length: 0\r\n\r\n"
    framer = SipFramer()
    with pytest.raises(FramingError) as raised:
        framer.feed(good + good + b"INVITE x SIP/2.0\r\nContent-Length: 99999\r\n\r\n")
    assert raised.value.messages == [good, good]
