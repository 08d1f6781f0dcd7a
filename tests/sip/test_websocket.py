"""SIP over WebSocket as a client speaks it (pure logic): the handshake, the frames, the bounded decoder."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fdkeeper.sip.framing import MAX_MESSAGE
from fdkeeper.testbed.wsframes import client_frames, handshake_answer, server_frame, server_message
from fdkeeper.websocket import (
    HEADER_ROOM,
    MAX_HANDSHAKE_ANSWER,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    WsDecoder,
    WsHandshakeError,
    WsOptions,
    WsProtocolError,
    accept_for,
    check_origin,
    check_path,
    close_frame,
    encode_frame,
    encode_message,
    handshake_request,
    new_key,
    parse_header_lines,
    ping_frame,
    pong_frame,
    read_handshake_answer,
)

INVITE = b"INVITE sip:bob@example.invalid SIP/2.0\r\nCall-ID: a\r\nContent-Length: 0\r\n\r\n"
WHERE = "127.0.0.1:8080"


def feed_all(decoder: WsDecoder, stream: bytes, cuts: list[int]) -> list[bytes]:
    """``stream`` fed in pieces cut at ``cuts``; the messages of all the feeds."""
    bounds = [0, *sorted(cuts), len(stream)]
    return [message for start, stop in itertools.pairwise(bounds) for message in decoder.feed(stream[start:stop])]


# -- the encoder ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_client_frames_are_masked_and_unmask_to_the_payload(size):
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    frame = encode_frame(OP_BINARY, payload)
    assert frame[1] & 0x80 and frame[0] == 0x80 | OP_BINARY
    assert client_frames(frame) == ([(OP_BINARY, payload)], b"")


def test_a_given_mask_is_used_and_fresh_masks_differ():
    frame = encode_frame(OP_TEXT, b"abcd", mask=b"\x01\x02\x03\x04")
    assert frame == b"\x81\x84\x01\x02\x03\x04" + bytes([0x61 ^ 1, 0x62 ^ 2, 0x63 ^ 3, 0x64 ^ 4])
    assert len({encode_frame(OP_TEXT, b"x")[2:6] for _ in range(8)}) > 1


def test_messages_go_as_text_when_utf8_else_binary():
    assert client_frames(encode_message(INVITE))[0] == [(OP_TEXT, INVITE)]
    assert client_frames(encode_message("é".encode()))[0] == [(OP_TEXT, "é".encode())]
    assert client_frames(encode_message(b"\xff\xfe"))[0] == [(OP_BINARY, b"\xff\xfe")]


def test_control_frames():
    assert client_frames(ping_frame(b"hi") + pong_frame(b"yo"))[0] == [(OP_PING, b"hi"), (OP_PONG, b"yo")]
    assert client_frames(close_frame())[0] == [(OP_CLOSE, struct.pack("!H", 1000))]
    assert client_frames(close_frame(None))[0] == [(OP_CLOSE, b"")]
    long_reason = close_frame(1001, "é" * 100)
    assert len(client_frames(long_reason)[0][0][1]) <= 125
    with pytest.raises(ValueError):
        ping_frame(bytes(126))


# -- the decoder ----------------------------------------------------------------------------------------------


def test_a_whole_message_in_one_frame_and_in_fragments():
    decoder = WsDecoder()
    assert decoder.feed(server_message(INVITE) + server_message(INVITE, [3, 10, 10], OP_BINARY)) == [INVITE] * 2
    assert decoder.pending == 0


def test_every_length_encoding_split_inside_its_header():
    biggest = bytes(MAX_MESSAGE - 1) + b"x"  # 64-bit length
    stream = (
        server_frame(OP_TEXT, INVITE, width=16)  # a longer encoding than needed is accepted
        + server_frame(OP_TEXT, INVITE, width=64)
        + server_message(INVITE * 3)  # 16-bit length
        + server_message(biggest)
    )
    for cut in [*range(1, 10), *range(len(stream) - len(biggest) - 9, len(stream) - len(biggest))]:
        assert feed_all(WsDecoder(), stream, [cut]) == [INVITE, INVITE, INVITE * 3, biggest]


def test_control_frames_between_fragments_are_handled_at_once():
    decoder = WsDecoder()
    fragments = server_message(INVITE, [20])
    first_end = 2 + 20
    assert decoder.feed(fragments[:first_end] + server_frame(OP_PING, b"p1") + server_frame(OP_PONG, b"")) == []
    assert decoder.pings == 1 and decoder.keepalives == 1
    assert client_frames(bytes(decoder.replies)) == ([(OP_PONG, b"p1")], b"")
    assert decoder.pending == first_end
    assert decoder.feed(fragments[first_end:]) == [INVITE]


def test_empty_and_blank_messages_are_keepalives():
    decoder = WsDecoder()
    assert decoder.feed(server_message(b"") + server_message(b"\r\n\r\n") + server_message(INVITE)) == [INVITE]
    assert decoder.keepalives == 2


@pytest.mark.parametrize(
    ("payload", "closed", "reply"),
    [
        (b"", "1005 (no status code)", b""),
        (struct.pack("!H", 1000), "1000 (normal closure)", struct.pack("!H", 1000)),
        (struct.pack("!H", 1001) + b"bye\nnow", "1001 (going away): bye\\nnow", struct.pack("!H", 1001)),
        (struct.pack("!H", 4321), "4321 (application code)", struct.pack("!H", 4321)),
    ],
)
def test_a_close_is_answered_and_ends_decoding(payload, closed, reply):
    decoder = WsDecoder()
    assert decoder.feed(server_message(INVITE) + server_frame(OP_CLOSE, payload) + server_message(INVITE)) == [INVITE]
    assert decoder.closed == closed
    assert client_frames(bytes(decoder.replies)) == ([(OP_CLOSE, reply)], b"")
    assert decoder.feed(server_frame(OP_PING, b"") + b"\x00garbage") == []
    assert decoder.pings == 0 and decoder.pending == 0


PROTOCOL_ERRORS = [
    (server_frame(OP_TEXT, INVITE, mask=b"abcd"), "a masked frame from the server", 1002),
    (server_frame(OP_TEXT, INVITE, rsv=4), "reserved bits set in a frame", 1002),
    (server_frame(3, b"x"), "unknown opcode 3", 1002),
    (server_frame(11, b"x"), "unknown opcode 11", 1002),
    (server_frame(OP_PING, bytes(200)), "a control frame of 200 bytes (at most 125)", 1002),
    (server_frame(OP_PING, b"x", fin=False), "a fragmented control frame", 1002),
    (server_frame(0, b"x"), "a continuation frame with no message begun", 1002),
    (server_frame(OP_TEXT, b"x", fin=False) + server_frame(OP_TEXT, b"y"), "a data frame inside a fragmented", 1002),
    (server_frame(OP_TEXT, b"", length=1 << 63, width=64), "a frame length with the top bit set", 1002),
    (server_frame(OP_CLOSE, b"\x03"), "a close frame of 1 byte", 1002),
    (server_frame(OP_TEXT, b"", length=MAX_MESSAGE + 1), f"a message of {MAX_MESSAGE + 1} bytes (at most", 1009),
]


@pytest.mark.parametrize(("stream", "reason", "code"), PROTOCOL_ERRORS)
def test_every_protocol_error_is_named_after_the_messages_before_it(stream, reason, code):
    with pytest.raises(WsProtocolError) as raised:
        WsDecoder().feed(server_message(INVITE) + stream)
    assert raised.value.reason.startswith(reason) and raised.value.code == code
    assert raised.value.messages == [INVITE]
    assert str(raised.value).startswith("fdkeeper: ") and "\n" not in str(raised.value)


messages_strategy = st.lists(st.binary(min_size=1, max_size=300).filter(lambda m: not m.isspace()), max_size=6)


@st.composite
def fragmented_stream(draw: st.DrawFn) -> tuple[list[bytes], bytes]:
    """Messages, each cut into fragments at drawn offsets, pings and pongs between the frames."""
    messages = draw(messages_strategy)
    stream = b""
    for message in messages:
        cuts = draw(st.lists(st.integers(0, len(message)), max_size=4))
        frames = server_message(message, cuts, draw(st.sampled_from([OP_TEXT, OP_BINARY])))
        stream += frames
        if draw(st.booleans()):
            stream += server_frame(draw(st.sampled_from([OP_PING, OP_PONG])), draw(st.binary(max_size=125)))
    return messages, stream


@settings(max_examples=200, deadline=None)
@given(fragmented_stream(), st.sampled_from(PROTOCOL_ERRORS), st.lists(st.integers(0, 4000), max_size=8))
def test_an_error_is_the_same_wherever_the_stream_is_cut(case, defect, cuts):
    messages, stream = case
    bad, reason, code = defect
    delivered: list[bytes] = []
    decoder = WsDecoder()
    whole = stream + bad
    bounds = [0, *sorted(cut for cut in cuts if cut <= len(whole)), len(whole)]
    with pytest.raises(WsProtocolError) as raised:
        for start, stop in itertools.pairwise(bounds):
            delivered += decoder.feed(whole[start:stop])
    assert raised.value.reason.startswith(reason) and raised.value.code == code
    assert delivered + raised.value.messages == messages


def test_an_oversized_message_is_refused_by_its_header_before_its_payload():
    decoder = WsDecoder()
    decoder.feed(server_frame(OP_TEXT, bytes(40000), fin=False))
    with pytest.raises(WsProtocolError, match="a message of 80000 bytes") as raised:
        decoder.feed(server_frame(0, b"", length=40000)[:4])  # the header only
    assert raised.value.code == 1009


def test_a_flood_of_empty_fragments_is_bounded():
    decoder = WsDecoder()
    decoder.feed(server_frame(OP_TEXT, b"x", fin=False))
    with pytest.raises(WsProtocolError, match="too many fragments") as raised:
        for _ in range(HEADER_ROOM):
            decoder.feed(server_frame(0, b"", fin=False))
            assert decoder.pending <= MAX_MESSAGE + HEADER_ROOM
    assert raised.value.code == 1009


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2000), st.integers(1, 64))
def test_pending_stays_bounded_under_garbage(garbage, step):
    decoder = WsDecoder()
    try:
        for at in range(0, len(garbage), step):
            decoder.feed(garbage[at : at + step])
            assert decoder.pending <= MAX_MESSAGE + HEADER_ROOM + 2 + 125
    except WsProtocolError as error:
        assert error.code in (1002, 1009)


def test_a_large_message_trickling_in_is_not_copied_again_each_read():
    stream = server_message(bytes(60000) + b"x")
    decoder = WsDecoder()
    for at in range(0, len(stream) - 1, 7):
        assert decoder.feed(stream[at : min(at + 7, len(stream) - 1)]) == []
    assert decoder.pending == len(stream) - 1
    assert decoder.feed(stream[-1:]) == [bytes(60000) + b"x"]


@settings(max_examples=300, deadline=None)
@given(fragmented_stream(), st.lists(st.integers(0, 4000), max_size=12))
def test_any_fragmenting_fed_at_any_cuts_gives_the_same_messages(case, cuts):
    messages, stream = case
    cuts = [cut for cut in cuts if cut <= len(stream)]
    assert feed_all(WsDecoder(), stream, cuts) == messages


def test_a_fragmented_message_with_pings_split_at_every_byte():
    message = INVITE * 2
    stream = server_message(message[:30])  # a whole one first
    fragments = server_message(message, [10, 40, 100])
    stream += fragments[:12] + server_frame(OP_PING, b"ab") + fragments[12:] + server_frame(OP_PONG, b"")  # 12: a frame
    whole = WsDecoder()
    assert whole.feed(stream) == [message[:30], message]
    for cut in range(len(stream) + 1):
        decoder = WsDecoder()
        assert feed_all(decoder, stream, [cut]) == [message[:30], message]
        assert (decoder.pings, decoder.keepalives, bytes(decoder.replies)[:2]) == (1, 1, bytes(whole.replies)[:2])
    decoder = WsDecoder()
    assert feed_all(decoder, stream, list(range(len(stream)))) == [message[:30], message]


@settings(max_examples=200, deadline=None)
@given(fragmented_stream(), st.data())
def test_discard_then_refeed_restores_the_state(case, data):
    messages, stream = case
    stop = data.draw(st.integers(0, len(stream)))
    first = WsDecoder()
    delivered = first.feed(stream[:stop])
    raw = first.discard()
    assert first.pending == 0 and len(raw) <= len(stream[:stop])
    second = WsDecoder()
    assert second.feed(raw) == []
    assert second.pending == len(raw)
    assert delivered + second.feed(stream[stop:]) == messages


def test_discard_holds_the_data_frames_not_the_control_frames():
    fragments = server_message(INVITE, [5])
    decoder = WsDecoder()
    decoder.feed(fragments[:7] + server_frame(OP_PING, b"") + fragments[7:9])
    assert decoder.discard() == fragments[:9]
    assert decoder.feed(server_message(INVITE)) == [INVITE]


# -- the handshake --------------------------------------------------------------------------------------------


def test_accept_key_of_rfc6455():
    assert accept_for("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert len(new_key()) == 24 and new_key() != new_key()


def test_the_request():
    options = WsOptions(path="/ws?x=1", origin="https://a.example", headers=(("X-Token", "t 1"),))
    request = handshake_request("sut.example:8443", options, "a2V5a2V5a2V5a2V5a2V5aw==").decode()
    assert request.split("\r\n") == [
        "GET /ws?x=1 HTTP/1.1",
        "Host: sut.example:8443",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: a2V5a2V5a2V5a2V5a2V5aw==",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Protocol: sip",
        "Origin: https://a.example",
        "X-Token: t 1",
        "",
        "",
    ]


def test_options_round_trip_through_fields():
    options = WsOptions(path="/sip", origin="http://o", headers=(("A", "1"), ("B", "two words")))
    fields = options.as_fields()
    assert fields == {"ws_path": "/sip", "ws_origin": "http://o", "ws_headers": "A: 1\nB: two words"}
    assert WsOptions.from_fields(**{key[3:]: value for key, value in fields.items()}) == options
    assert WsOptions().as_fields() == {"ws_path": None, "ws_origin": None, "ws_headers": None}
    assert WsOptions.from_fields(None, None, None) == WsOptions()


@pytest.mark.parametrize("path", ["ws", "/a b", "/\x7f", "/é", "/" + "a" * 1024])
def test_bad_paths(path):
    with pytest.raises(ValueError):
        check_path(path)


@pytest.mark.parametrize("origin", ["", "a\r\nb", "x" * 1025])
def test_bad_origins(origin):
    with pytest.raises(ValueError):
        check_origin(origin)


@pytest.mark.parametrize(
    "text",
    ["NoColon", "Bad Name: x", "X-A: a\x00b", "Host: h", "sec-websocket-protocol: x", "Origin: o", "A: b\n" * 17],
)
def test_bad_header_lines(text):
    with pytest.raises(ValueError):
        parse_header_lines(text)


def test_header_lines():
    assert parse_header_lines("A: 1\r\n\nB:2 ") == (("A", "1"), ("B", "2"))


@pytest.fixture
def request_and_key() -> tuple[bytes, str]:
    key = new_key()
    return handshake_request("h", WsOptions(path="/p"), key), key


def test_a_good_answer_split_anywhere_with_early_frames(request_and_key):
    request, key = request_and_key
    answer = handshake_answer(request, extra="Server: kamailio\r\nX-Folded: a\r\n b\r\n") + server_message(INVITE)
    end = answer.index(b"\r\n\r\n") + 4
    for cut in range(end):
        assert read_handshake_answer(answer[:cut], key, WsOptions(path="/p"), WHERE) is None
    handshake, early = read_handshake_answer(answer, key, WsOptions(path="/p"), WHERE)
    assert early == server_message(INVITE)
    assert (handshake.path, handshake.protocol, handshake.status) == ("/p", "sip", "HTTP/1.1 101 Switching Protocols")
    assert handshake.server_headers == (("Server", "kamailio"), ("X-Folded", "a b"))


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (
            {"status": "403 Forbidden"},
            "refused the upgrade: HTTP/1.1 403 Forbidden; check that it is a WebSocket port, --ws-path and --ws-origin",
        ),
        ({"protocol": None}, "answered without Sec-WebSocket-Protocol: sip (it does not speak SIP over WebSocket)"),
        ({"protocol": "chat"}, "answered with Sec-WebSocket-Protocol: chat, not sip (it does not speak SIP"),
        ({"extra": "Sec-WebSocket-Extensions: permessage-deflate\r\n"}, "Sec-WebSocket-Extensions: permessage-deflate"),
        ({"extra": "Sec-WebSocket-Protocol: sip\r\n"}, "with Sec-WebSocket-Protocol: sip, sip, not sip"),
        ({"extra": "Bad header\x1b\r\n"}, "malformed header line in its answer: 'Bad header\\x1b'"),
    ],
)
def test_answer_defects(request_and_key, kwargs, expected):
    request, key = request_and_key
    with pytest.raises(WsHandshakeError) as raised:
        read_handshake_answer(handshake_answer(request, **kwargs), key, WsOptions(), WHERE)
    text = str(raised.value)
    assert text.startswith(f"fdkeeper: the WebSocket server at {WHERE} ") and expected in text
    assert raised.value.code == "refused" and "\n" not in text and "\x1b" not in text


def test_a_wrong_accept_and_missing_upgrade_headers(request_and_key):
    request, key = request_and_key
    good = handshake_answer(request)
    for answer, expected in [
        (good, "sent a wrong Sec-WebSocket-Accept"),
        (good.replace(b"Upgrade: websocket", b"Upgrade: h2c"), "without Upgrade: websocket"),
        (good.replace(b"Connection: Upgrade", b"Connection: close"), "without Connection: Upgrade"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "something other than HTTP: 'SSH-2.0-OpenSSH'"),
    ]:
        with pytest.raises(WsHandshakeError, match=expected):
            read_handshake_answer(answer, new_key() if "Accept" in expected else key, WsOptions(), WHERE)


def test_an_answer_without_end_is_bounded(request_and_key):
    request, key = request_and_key
    endless = handshake_answer(request)[:-2] + b"X-Pad: " + b"a" * MAX_HANDSHAKE_ANSWER
    assert read_handshake_answer(endless[:MAX_HANDSHAKE_ANSWER], key, WsOptions(), WHERE) is None
    with pytest.raises(WsHandshakeError, match=f"more than {MAX_HANDSHAKE_ANSWER} bytes"):
        read_handshake_answer(endless, key, WsOptions(), WHERE)


def test_case_insensitive_headers_and_a_bare_lf_answer(request_and_key):
    request, key = request_and_key
    answer = handshake_answer(request, protocol="SIP").replace(b"Upgrade: websocket", b"upGRADE: WebSocket")
    handshake, early = read_handshake_answer(answer.replace(b"\r\n", b"\n") + b"x", key, WsOptions(), WHERE)
    assert handshake.protocol == "SIP" and early == b"x"
