"""Pure logic of the control protocol: parsing, formatting, validation (no sockets)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fdkeeper.protocol import (
    MAX_MESSAGE,
    ProtocolError,
    format_address,
    format_error,
    format_message,
    parse_address,
    parse_reply,
    parse_request,
)


def test_lease_request_round_trip():
    message = format_message(
        "LEASE", role="client", transport="tcp", remote=("127.0.0.1", 5060), local=None, reconnect=True
    )
    assert message == b"LEASE role=client transport=tcp remote=127.0.0.1:5060 reconnect=1"
    request = parse_request(message)
    assert request.verb == "LEASE"
    assert request.fields == {"role": "client", "transport": "tcp", "remote": ("127.0.0.1", 5060), "reconnect": True}


@pytest.mark.parametrize("text, address", [("10.0.0.5:5061", ("10.0.0.5", 5061)), ("[::1]:5060", ("::1", 5060))])
def test_addresses(text, address):
    assert parse_address(text) == address
    assert format_address(address) == text


@pytest.mark.parametrize("text", ["host:5060", "1.2.3.4", "1.2.3.4:x", "1.2.3.4:70000", "[::1]5060", ""])
def test_bad_addresses(text):
    with pytest.raises(ValueError):
        parse_address(text)


def test_local_dash_means_no_bind():
    assert parse_request(b"PREPARE role=client transport=tcp local=-").fields["local"] is None


def test_duplicate_key_is_refused():
    with pytest.raises(ProtocolError, match="bad token"):
        parse_request(b"LEASE role=client role=server transport=tcp")


def test_error_reply_is_one_line():
    reply = parse_reply(format_error("busy", "fdkeeper: one\ntwo"))
    assert (reply.ok, reply.code, reply.text) == (False, "busy", "fdkeeper: one two")


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=MAX_MESSAGE + 10))
def test_any_bytes_parse_or_raise_protocol_error(data):
    try:
        request = parse_request(data)
    except ProtocolError as error:
        assert error.code in ("badrequest", "toolarge")
    else:
        assert request.verb in ("PING", "STATUS", "STOP", "LEASE", "PREPARE", "HANDOVER")


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["client", "server"]),
    st.ip_addresses(),
    st.integers(0, 65535),
    st.booleans(),
    st.floats(0, 86400, allow_nan=False),
)
def test_prepare_round_trips(role, ip, port, reconnect, wait):
    remote = (str(ip), port)
    message = format_message("PREPARE", role=role, transport="tcp", remote=remote, reconnect=reconnect, wait=wait)
    fields = parse_request(message).fields
    assert fields["remote"] == remote and fields["role"] == role and fields["reconnect"] == reconnect
    assert fields["wait"] == pytest.approx(wait)


# ---------------------------------------------------------------- field validation (issue 16)

from fdkeeper.protocol import VERBS  # noqa: E402


@pytest.mark.parametrize(
    "request_text, field, problem",
    [
        ("PREPARE role=client transport=tls remote=127.0.0.1:5061 tls_sni=%00", "tls_sni", "control character (NUL)"),
        ("PREPARE role=client transport=tls tls_sni=bad_label-.example", "tls_sni", "not a DNS name"),
        ("LEASE role=client transport=tls tls_ca=%00", "tls_ca", "control character (NUL)"),
        ("LEASE role=client transport=tls tls_keylog=keys.log", "tls_keylog", "not an absolute path"),
        ("LEASE role=client transport=tls tls_cert=%FF", "tls_cert", "not UTF-8"),
        ("LEASE role=client transport=tcp aor=sip:a%0Ab", "aor", "control character (U+000A)"),
        ("LEASE role=client transport=tcp for_pid=0", "for_pid", "out of range"),
        ("LEASE role=client transport=tcp for_pid=%D9%A1", "for_pid", "not a whole number"),
        ("PREPARE role=client transport=tcp wait=nan", "wait", "not a decimal number"),
        ("PREPARE role=client transport=tcp wait=1e309", "wait", "out of range"),
        ("PREPARE role=client transport=tcp wait=-1", "wait", "not a decimal number"),
        ("PREPARE role=client transport=tcp users=18446744073709551616", "users", "over 8"),
        ("PREPARE role=client transport=tcp remote=%D9%A1.0.0.1:5060", "remote", "not a numeric address"),
        ("STATUS state=busy", "state", "not one of the choices"),
        ("STATUS count=2", "count", "not a flag"),
        ("LEASE role=client transport=tcp aor=", "aor", "is empty"),
    ],
)
def test_a_bad_field_is_one_badrequest_naming_the_field_and_what_it_must_be(request_text, field, problem):
    with pytest.raises(ProtocolError) as refused:
        parse_request(request_text.encode())
    assert refused.value.code == "badrequest"
    assert f" {field}=" in refused.value.text and problem in refused.value.text
    assert f"; {field}= must be " in refused.value.text  # the fix
    assert "\n" not in refused.value.text and "\0" not in refused.value.text


def test_every_field_has_a_bound_and_a_description():
    for verb, schema in VERBS.items():
        for key, spec in schema.items():
            assert 0 < spec.max_length < MAX_MESSAGE and spec.what, (verb, key)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([(verb, key) for verb, schema in VERBS.items() for key in schema]), st.text(max_size=40))
def test_a_value_that_parses_has_no_control_character(verb_key, value):
    verb, key = verb_key
    fields = {"role": "client", "transport": "tcp"} if verb in ("LEASE", "PREPARE") else {}
    fields[key] = value
    if not value:
        return  # format_message refuses an empty value itself
    message = format_message(verb, **fields)
    if len(message) > MAX_MESSAGE:
        return
    try:
        parsed = parse_request(message).fields[key]
    except ProtocolError as error:
        assert error.code == "badrequest" and f"{key}=" in error.text
        return
    if isinstance(parsed, str):
        lines = parsed.split("\n") if VERBS[verb][key].lines else [parsed]  # ws_headers: LF between lines
        assert parsed and all(ord(c) >= 0x20 and not 0x7F <= ord(c) <= 0x9F for line in lines for c in line)


# ---------------------------------------------------------------- WebSocket fields (issue 19)

from fdkeeper.protocol import OVER_TLS, OVER_WEBSOCKET, TRANSPORTS, WS_KEYS  # noqa: E402
from fdkeeper.websocket import WsOptions  # noqa: E402


def test_ws_and_wss_are_transports_of_every_verb_that_names_one():
    assert {"ws", "wss"} <= set(TRANSPORTS) and {"tls", "wss"} == OVER_TLS and {"ws", "wss"} == OVER_WEBSOCKET
    for verb in ("LEASE", "PREPARE"):
        assert set(WS_KEYS) <= set(VERBS[verb]) and parse_request(f"{verb} role=client transport=wss".encode())
    assert parse_request(b"STATUS transport=ws").text("transport") == "ws"


def test_websocket_options_round_trip_through_a_request():
    options = WsOptions(path="/sip?x=1", origin="https://phone.example", headers=(("X-Token", "a b%c"), ("X-B", "2")))
    message = format_message("PREPARE", role="client", transport="wss", **options.as_fields())
    request = parse_request(message)
    parsed = WsOptions.from_fields(request.text("ws_path"), request.text("ws_origin"), request.text("ws_headers"))
    assert parsed == options


@pytest.mark.parametrize(
    "field, value",
    [
        ("ws_path", "sip"),  # not starting with /
        ("ws_path", "/a%20b"),  # a space would end the request line early
        ("ws_path", "/%C3%A9"),  # not ASCII
        ("ws_origin", "https://a%0D%0AHost:%20evil"),  # header injection through the Origin
        ("ws_headers", "X-A:%20b%0D%0AHost:%20evil"),  # CR: a header of its own
        ("ws_headers", "X-A:%20b%0AHost:%20evil"),  # the handshake's own header, on a line of its own
        ("ws_headers", "X-A:%20b%0A%0AGET%20/%20HTTP/1.1"),  # an empty line, then a request of its own
        ("ws_headers", "Sec-WebSocket-Protocol:%20other"),
        ("ws_headers", "no%20colon"),
        ("ws_headers", "%0A".join(f"X-{n}:%20v" for n in range(17))),  # 17 headers: at most 16
    ],
)
def test_a_bad_websocket_field_is_one_badrequest_naming_it(field, value):
    with pytest.raises(ProtocolError) as refused:
        parse_request(f"PREPARE role=client transport=ws {field}={value}".encode())
    text = refused.value.text
    assert refused.value.code == "badrequest" and f" {field}=" in text and f"; {field}= must be " in text
    assert "\n" not in text and "\r" not in text
