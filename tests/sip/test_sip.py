"""SIP text (pure logic): messages, headers found by position, edits, URIs and Via.
Stream framing has its own file, test_sipframe.py."""

from __future__ import annotations

import pytest

from fdkeeper.sip.message import (
    CALL_ID,
    ROUTE,
    VIA,
    Edits,
    Malformed,
    Message,
    end_of_element,
    make_reply,
    remove_element,
)
from fdkeeper.sip.uri import uri_hostport, uri_ip_address, via_param, via_parts, via_reply_address

REQUEST = (
    b"OPTIONS sip:bob@example.test SIP/2.0\r\n"
    b"v: SIP/2.0/UDP 10.0.0.1:5080;branch=z9hG4bK1, SIP/2.0/TCP 10.0.0.2;branch=z9hG4bK2\r\n"
    b"VIA : SIP/2.0/UDP 10.0.0.3:5090;received=10.9.9.9;rport=6000\r\n"
    b"Route: <sip:a.test;lr>,\r\n <sip:b.test;lr>\r\n"
    b'From: <sip:a@example.test>;tag=1\r\nTo: "Bob, B" <sip:bob@example.test>\r\nCall-ID: x@y\r\n'
    b"CSeq: 1 OPTIONS\r\nContent-Length: 4\r\n\r\nbody"
)


def test_headers_are_found_in_any_case_and_compact_form_and_folded_lines_belong_to_them():
    message = Message(REQUEST, datagram=False)
    first = message.header(VIA)
    assert message.value(first).startswith(b"SIP/2.0/UDP 10.0.0.1")
    second = message.header(VIA, first[2])
    assert message.value(second).startswith(b"SIP/2.0/UDP 10.0.0.3")
    route = message.header(ROUTE)
    assert message.value(route) == b"<sip:a.test;lr>,\r\n <sip:b.test;lr>"
    assert message.call_id() == b"x@y" and not message.has_to_tag()
    assert message.header(CALL_ID, message.limit) is None  # the body is not searched


def test_elements_end_at_a_comma_outside_brackets_and_quotes():
    value = b'"Bob, B" <sip:b@x;a=1,2>, <sip:c@y>'
    assert value[: end_of_element(value, 0, len(value))] == b'"Bob, B" <sip:b@x;a=1,2>'
    unclosed = b"<sip:b@x, <sip:c@y>"
    assert end_of_element(unclosed, 0, len(unclosed)) == len(unclosed)


def test_top_via_element_removed_and_the_next_one_found():
    message = Message(REQUEST, datagram=False)
    span, end = message.top_via()
    assert message.next_via(span, end) == b"SIP/2.0/TCP 10.0.0.2;branch=z9hG4bK2"
    edits = Edits()
    remove_element(message, span, end, edits)
    assert edits.apply(message.data).startswith(b"OPTIONS sip:bob@example.test SIP/2.0\r\nv: SIP/2.0/TCP 10.0.0.2")


def test_edits_apply_in_position_order_insertions_keeping_theirs():
    edits = Edits([(6, 6, b"X"), (0, 1, b"a"), (6, 6, b"Y"), (3, 5, b"")])
    assert edits.apply(b"ABCDEFGH") == b"aBCFXYGH"
    assert Edits().apply(b"same") == b"same"


@pytest.mark.parametrize(
    "data, kind",
    [
        (b"OPTIONS sip:a SIP/2.0\r\nContent-Length: 0\r\n", "no end of headers"),
        (b"SIP/2.0 2000 OK\r\n\r\n", "bad status line"),
        (b"OPTIONS  sip:a SIP/2.0\r\n\r\n", "bad request line"),
        (b"OPT:IONS sip:a SIP/2.0\r\n\r\n", "bad request line"),
        (b"OPTIONS sip:a SIP/2.0\r\nl: x\r\n\r\n", "bad Content-Length"),
        (b"OPTIONS sip:a SIP/2.0\r\nl: 5\r\n\r\nabc", "truncated body"),
    ],
)
def test_malformed_messages_name_their_kind(data, kind):
    with pytest.raises(Malformed) as raised:
        Message(data, datagram=True)
    assert raised.value.kind == kind


def test_body_length_bytes_past_content_length_and_datagrams_without_one():
    message = Message(b"SIP/2.0 200 OK\r\nl: 2\r\n\r\nabcd", datagram=True)
    assert message.data.endswith(b"\r\n\r\nab") and message.has_length and not message.is_request
    bare = Message(b"MESSAGE sip:a SIP/2.0\r\n\r\nhello", datagram=True)
    assert not bare.has_length and bare.body_length == 5 and bare.method == b"MESSAGE"
    with pytest.raises(Malformed):
        Message(b"MESSAGE sip:a SIP/2.0\r\n\r\nhello", datagram=False)


def test_reply_keeps_the_transaction_headers_and_tags_the_to():
    reply = make_reply(Message(REQUEST, datagram=False), 503, "Service Unavailable")
    head = reply.split(b"\r\n")
    assert head[0] == b"SIP/2.0 503 Service Unavailable"
    assert [line.split(b":")[0] for line in head[1:7]] == [b"v", b"VIA ", b"From", b"To", b"Call-ID", b"CSeq"]
    assert head[4].startswith(b'To: "Bob, B" <sip:bob@example.test>;tag=fdk') and reply.endswith(
        b"Content-Length: 0\r\n\r\n"
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        (b"sip:bob@Example.TEST", (b"example.test", 5060, b"")),
        (b"<sips:bob@example.test:5071>", (b"example.test", 5071, b"tls")),
        (b'"B" <sip:[::1]:5070;transport=TCP;lr>', (b"::1", 5070, b"tcp")),
        (b"sip:10.0.0.1;lr?h=1", (b"10.0.0.1", 5060, b"")),
        (b"10.0.0.9:5070", (b"10.0.0.9", 5070, b"")),
        (b"sip:a@host:99999", None),
        (b"sip:a@:5060", None),
        (b"sip:a@[::1", None),
    ],
)
def test_uri_host_port_and_transport(text, expected):
    assert uri_hostport(text) == expected
    assert uri_hostport(text) == expected  # the memoized answer is the same


def test_uri_ip_address_only_for_ip_hosts():
    assert uri_ip_address(b"sip:a@127.0.0.1:6000") == ("127.0.0.1", 6000)
    assert uri_ip_address(b"sip:a@[::1]") == ("::1", 5060)
    assert uri_ip_address(b"sip:a@example.test") is None
    assert uri_ip_address(b"sip:a@\xff\xfe") is None


def test_via_parts_params_and_where_a_response_goes():
    assert via_parts(b"SIP/2.0/UDP 10.0.0.1:5080;branch=z9hG4bK1") == (b"", b"10.0.0.1", 5080, b";branch=z9hG4bK1")
    assert via_parts(b"SIP/2.0/TLS Host.Test")[1:3] == (b"host.test", 5061)
    assert via_parts(b"SIP / 2.0 / TCP [::1] : 5070 ;rport")[1:3] == (b"[::1]", 5070)
    for bad in (b"SIP/2.0/UDP", b"SIP/2.0/UDP a:0", b"SIP/2.0/UDP a:5060 junk"):
        with pytest.raises(Malformed):
            via_parts(bad)
    params = b";branch=z9hG4bK1;rport;received=10.9.9.9"
    assert via_param(params, b"branch") == b"z9hG4bK1" and via_param(params, b"rport") == b""
    assert via_param(params, b"maddr") is None
    assert via_reply_address(b"SIP/2.0/UDP 10.0.0.3:5090;received=10.9.9.9;rport=6000") == ("10.9.9.9", 6000)
    assert via_reply_address(b"SIP/2.0/UDP [::1]:5090;rport") == ("::1", 5090)
