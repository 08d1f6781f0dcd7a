"""Every field of every verb the control protocol knows, fed what an attacker or a broken
script would send: NUL and other control characters, overlong values, bytes that are not
UTF-8, path-like values (../, symlinks, /dev/zero, a FIFO) and numeric extremes. A real keeper
over its real control socket answers each with exactly one line (ERR, or OK where the value
is legal), answers the PING sent after it on the same connection, and counts no internal error.

The fields come from fdkeeper/protocol.py's own table (VERBS), so a field added there is
fuzzed here without a change to this file.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fdkeeper.client import KeeperClient, ensure_keeper
from fdkeeper.protocol import MAX_MESSAGE, VERBS, format_address

REPLY_TIMEOUT = 10.0  # generous: a loaded machine; a keeper blocked on a file never answers at all

# Values no field accepts: the keeper must refuse them when it parses the request, naming the field.
ALWAYS_REFUSED = {
    "NUL": "%00",
    "NUL inside": "a%00b",
    "line feed": "sip%0Aroot",
    "carriage return and line feed": "%0D%0A",
    "escape": "%1B[2J",
    "DEL": "%7F",
    "C1 control": "%C2%85",
    "not UTF-8": "%FF",
    "truncated UTF-8": "%C3",
    "overlong UTF-8": "%C0%AF",
    "empty": "",
}
# Absolute paths name only files that may be written: tls_keylog appends to (and makes 0600)
# a file of the keeper's user, and the keeper may run as root.
PATH_LIKE = ["../../etc/passwd", "./x", "~/x", "/proc/self/fd/0", "/dev/zero", "/dev/stdin", "/", "-"]
NUMERIC = [
    "-1",
    "0",
    "1",
    str(2**64),
    str(2**31),
    "nan",
    "inf",
    "-inf",
    "1e309",
    "-0",
    "1.5",
    "0x10",
    "1_0",
    " 1",
    "\u0661\u0662",
]


def raw_values(fifo: Path, symlink: Path, dotted: Path) -> list[tuple[str, bytes]]:
    """(category, value as it goes on the wire) for every value fed to every field."""
    values = [(name, value.encode()) for name, value in ALWAYS_REFUSED.items()]
    values += [("path-like", value.encode()) for value in [*PATH_LIKE, str(fifo), str(symlink), str(dotted)]]
    values += [("numeric", value.replace(" ", "%20").encode("ascii", "backslashreplace")) for value in NUMERIC[:-1]]
    values += [("numeric", b"%D9%A1%D9%A2")]  # Arabic-Indic digits: int() would read them
    values += [("raw byte not ASCII", b"\xff"), ("raw control character", b"a\x01b")]
    return values


def overlong_values(verb: str, key: str) -> list[tuple[str, bytes]]:
    """One character over the field's bound (a valid-looking path for paths), and a message over 4096."""
    bound = VERBS[verb][key].max_length
    return [("overlong field", b"/" + b"a" * bound), ("overlong message", b"a" * (MAX_MESSAGE + 1))]


@pytest.fixture(scope="module")
def sut():
    """A TCP listener for remote=: it accepts and closes at once, so a TCP open succeeds and
    a TLS handshake fails at once (no wait for a timeout per case)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stopping = threading.Event()

    def accept_and_close() -> None:
        while not stopping.is_set():
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            conn.close()

    thread = threading.Thread(target=accept_and_close, daemon=True)
    thread.start()
    yield format_address(listener.getsockname()[:2])
    stopping.set()
    thread.join(timeout=2)
    listener.close()


@pytest.fixture(scope="module")
def keeper(tmp_path_factory):
    client = ensure_keeper(tmp_path_factory.mktemp("fuzz") / "state", connect_timeout=2)
    yield client
    client.stop()


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("odd")
    fifo = directory / "fifo"
    os.mkfifo(fifo)
    plain = directory / "plain"
    plain.write_text("not a certificate\n")
    symlink = directory / "link"
    symlink.symlink_to(plain)
    dotted = directory / ".." / directory.name / "plain"  # absolute, through ..
    return fifo, symlink, dotted


def base_request(verb: str, key: str, remote: str, tls: bool = True) -> list[bytes]:
    """A legal request of ``verb`` without ``key``: the fuzzed value is the only thing wrong.

    With ``tls``, a TLS option goes with transport=tls, so that the keeper opens the files named."""
    if verb not in ("LEASE", "PREPARE"):
        return [verb.encode()]
    transport = "tls" if tls and key.startswith("tls_") else "tcp"  # TLS options are read only for TLS opens
    fields = {"role": "client", "transport": transport, "remote": remote, "local": "-"}
    fields.pop(key, None)
    return [verb.encode(), *(f"{k}={v}".encode() for k, v in fields.items())]


def exchange(keeper: KeeperClient, request: bytes) -> list[bytes]:
    """Send ``request`` and read its whole reply, then PING on the same connection: the next
    packet must be the PING's answer, so the request had exactly the reply returned.

    (A PING sent at once could be answered first: a request waiting for an open is answered
    when the open settles.) Descriptors a LEASE hands over are closed at once."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(REPLY_TIMEOUT)
        sock.connect(str(keeper.path))
        sock.send(request)
        packets = [receive(sock, request)]
        while not reply_complete(packets):
            packets.append(receive(sock, request))
        sock.send(b"PING")
        after = receive(sock, request)
        assert after.startswith(b"OK pid="), f"{request[:120]!r}: {packets} then {after!r} instead of the PING's answer"
        return packets


def receive(sock: socket.socket, request: bytes) -> bytes:
    data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE + 1, 255)
    for fd in fds:
        os.close(fd)
    assert data, f"the keeper closed the connection after {request[:120]!r}"
    return data


def reply_complete(packets: list[bytes]) -> bool:
    first = packets[0]
    if first.startswith(b"JSON "):  # STATUS: JSON packets, then END
        return packets[-1] == b"END"
    if first.startswith(b"OK count="):  # LEASE: OK, then FDS packets until count descriptors
        return sum(len(p.split(b"ids=")[1].split(b" ")[0].split(b",")) for p in packets[1:]) >= int(
            first.split(b"=")[1]
        )
    return True


def assert_one_answer(verb: str, key: str, category: str, request: bytes, packets: list[bytes]) -> None:
    shown = f"{category}: {request[:160]!r} -> {packets}"
    if verb in ("LEASE", "?") and packets[0].startswith(b"OK count="):
        assert all(p.startswith(b"FDS ") for p in packets[1:]), shown  # a granted lease: OK, then its descriptors
        return
    if verb in ("STATUS", "?") and packets[0].startswith(b"JSON "):
        assert packets[-1] == b"END" and all(p.startswith(b"JSON ") for p in packets[:-1]), (
            shown
        )  # the status: one reply
        return
    assert len(packets) == 1, shown
    reply = packets[0]
    assert reply.startswith((b"OK", b"ERR ")) and b"\n" not in reply, shown
    if category == "overlong message":
        assert reply.startswith(b"ERR toolarge "), shown
    elif category in ALWAYS_REFUSED or category in ("overlong field", "raw byte not ASCII", "raw control character"):
        assert reply.startswith(b"ERR badrequest "), shown
        if category not in ("raw byte not ASCII",):  # refused as a whole message, before any field
            assert f"{key}=".encode() in reply, shown
    assert b"internal" not in reply.split(b" ")[1:2], shown


def every_field() -> list[tuple[str, str]]:
    return [(verb, key) for verb, schema in VERBS.items() for key in schema]


def test_every_field_of_every_verb_is_fuzzed():
    fields = every_field()
    assert ("PREPARE", "tls_sni") in fields and ("STATUS", "count") in fields and len(fields) > 30


@pytest.mark.parametrize("verb, key", every_field(), ids=[f"{v}-{k}" for v, k in every_field()])
def test_each_bad_value_gets_one_line_and_the_keeper_answers_after_it(keeper, sut, odd_files, verb, key):
    for category, value in [*raw_values(*odd_files), *overlong_values(verb, key)]:
        request = b" ".join([*base_request(verb, key, sut), key.encode() + b"=" + value])
        assert_one_answer(verb, key, category, request, exchange(keeper, request))
    assert keeper.status()["keeper"]["internal_errors"] == 0


def test_tls_sni_nul_is_refused_at_parse_time(keeper, sut):
    # issue 16 item 2: this reached ssl.wrap_socket and raised a TypeError that ended the keeper
    [reply] = exchange(keeper, f"PREPARE role=client transport=tls remote={sut} local=- tls_sni=%00".encode())
    assert reply.startswith(b"ERR badrequest fdkeeper: PREPARE tls_sni=%00 has a control character (NUL)")
    assert keeper.alive()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_value_of_any_field_gets_one_line(keeper, sut, data):
    verb, key = data.draw(st.sampled_from(every_field()))
    value = data.draw(
        st.one_of(st.binary(max_size=80), st.text(max_size=80).map(lambda t: t.encode("utf-8", "surrogatepass")))
    )
    encoded = b"".join(bytes([b]) if 0x21 <= b < 0x7F and b not in b"%= " else b"%%%02X" % b for b in value)
    # transport=tcp: arbitrary absolute paths are checked, never opened (a key log would be created there)
    request = b" ".join([*base_request(verb, key, sut, tls=False), key.encode() + b"=" + encoded])
    packets = exchange(keeper, request)
    assert_one_answer(verb, key, "any", request, packets)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    message=st.one_of(
        st.binary(min_size=1, max_size=MAX_MESSAGE + 2),
        st.lists(
            st.sampled_from(
                [
                    b"LEASE",
                    b"PREPARE",
                    b"STATUS",
                    b"PING",
                    b"role=client",
                    b"transport=tcp",
                    b"=",
                    b"%",
                    b"%00",
                    b"tls_sni=",
                    b"aor=",
                    b"remote=",
                    b"\xff",
                    b" ",
                ]
            ),
            min_size=1,
            max_size=12,
        ).map(b"".join),
    )
)
def test_any_message_gets_one_line(keeper, message):
    if message.split(b" ")[0] in (b"STOP", b"HANDOVER"):
        return  # the two verbs that end this keeper on purpose
    packets = exchange(keeper, message)
    assert_one_answer("?", "?", "any", message, packets)  # "?": any verb


def test_the_keeper_is_alive_and_counted_no_internal_error_at_the_end(keeper):
    status = keeper.status()
    assert status["keeper"]["internal_errors"] == 0
    assert keeper.alive()
