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
