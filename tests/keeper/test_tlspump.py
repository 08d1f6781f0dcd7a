"""The keeper's C pump (helpers/tlspump/tlspump.c) while a run holds a TLS or WebSocket link.

Each TLS test first lets the run send one message, so that the pump holds the link (the status
says "relay": "pump"), then drives the byte-exact case through it: framing (split messages,
CRLF pongs, compact Content-Length, oversize), the SuT ending mid-run with whole messages
delivered first, a run dying mid-write, back-pressure both ways, and the Python fallback.

The WebSocket and plain-TCP tests drive a PumpedLink directly (a SuT socket, a socketpair,
attach, release), over a TCP and a TLS wire: messages both ways, pings answered while pumped,
the SuT's Close and a protocol error handed back with their close frames sent, a hand-over
in the middle of a fragmented message restored exactly.
"""

from __future__ import annotations

import logging
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psutil
import pytest

from fdkeeper.client import KeeperClient, ensure_keeper
from fdkeeper.keeper import tlspump
from fdkeeper.testbed import wait_until
from fdkeeper.testbed.pki import TestPki
from fdkeeper.testbed.wsframes import client_frames, server_frame, server_message
from fdkeeper.websocket import OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT, WsDecoder
from tests.support.fake_sut import FakeSut, end_connection, sip
from tests.support.keeper import keeper_rss, lease, open_connection, read_to_the_end

pytestmark = pytest.mark.skipif(tlspump._library_path() is None, reason="fdkeeper/_tlspump*.so is not built")


@pytest.fixture
def sut(pki):
    server = FakeSut(pki)
    yield server
    server.close()


def read_exactly(sock: socket.socket, length: int) -> bytes:
    data = b""
    while len(data) < length:
        chunk = sock.recv(length - len(data))
        assert chunk, f"end of stream after {len(data)} of {length} bytes"
        data += chunk
    return data


def pumped_run(keeper: KeeperClient, sut: FakeSut, pki) -> tuple[socket.socket, socket.socket]:
    """A leased run whose link the pump holds, and the SuT's end of the TLS connection."""
    open_connection(keeper, sut, "tls", pki)
    peer = sut.connection()
    run = lease(keeper, sut, "tls")
    run.sendall(sip("warm-up"))
    peer.settimeout(3)
    assert read_exactly(peer, len(sip("warm-up"))) == sip("warm-up")
    assert keeper.status()["connections"][0]["tls"]["relay"] == "pump"
    return run, peer


def nothing_to_read(sock: socket.socket, wait: float = 0.3) -> bool:
    sock.settimeout(wait)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except TimeoutError:
        return True
    finally:
        sock.settimeout(3)
    return False


def test_split_messages_and_pongs_reach_the_run_whole(keeper, sut, pki):
    run, peer = pumped_run(keeper, sut, pki)
    first, compact = sip("split", b"0123456789"), b"OPTIONS sip:a@b SIP/2.0\r\nl: 4\r\nCall-ID: c\r\n\r\nbody"
    for piece in (first[:20], first[20:52], first[52:-3]):  # cut in the headers, at Content-Length, in the body
        peer.sendall(piece)
        assert nothing_to_read(run), "half a message reached the run"
    peer.sendall(first[-3:] + b"\r\n" + compact + b"\r\n\r\n")  # a pong, then a CRLFCRLF between messages
    assert read_exactly(run, len(first + compact)) == first + compact
    assert nothing_to_read(run), "a keep-alive CRLF reached the run"
    assert keeper.status()["connections"][0]["tls"]["messages_to_sipp"] == 2
    run.close()


def test_an_oversized_message_from_the_sut_ends_the_link_after_the_whole_ones(keeper, sut, pki):
    run, peer = pumped_run(keeper, sut, pki)
    peer.sendall(sip("whole") + b"MESSAGE sip:a@b SIP/2.0\r\nX-Long: " + b"y" * 70000)
    assert read_to_the_end(run) == (sip("whole"), "eof")
    wait_until(lambda: keeper.status()["connections"][0]["state"] == "closed", what="the link closed")
    assert "unframeable" in keeper.status()["connections"][0]["closed_reason"]


@pytest.mark.parametrize(
    "how, ending", [("close_notify", "eof"), ("fin", "eof"), ("rst", "ECONNRESET"), ("bad record", "ECONNRESET")]
)
def test_the_sut_ending_mid_run_delivers_whole_messages_first(keeper, sut, pki, how, ending):
    run, peer = pumped_run(keeper, sut, pki)
    half = sip("half", b"z" * 100)[:60]
    peer.sendall(sip("one") + sip("two", b"body") + half)
    end_connection(peer, how)
    assert read_to_the_end(run) == (sip("one") + sip("two", b"body"), ending)
    if ending == "eof":  # half-closed: it still sends what the run writes (test_keeper_tls_half_close.py)
        assert keeper.status()["connections"][0]["ending"].startswith("the SuT closed it")
    else:
        wait_until(lambda: keeper.status()["connections"][0]["state"] == "closed", what="the link closed")


WRITER = """
import os, signal, sys, time
from pathlib import Path
from fdkeeper.client import KeeperClient
[(_, fd)] = KeeperClient(Path(sys.argv[1])).lease(
    role="client", transport="tls", remote=(sys.argv[2], int(sys.argv[3])), local="-")
for piece in sys.argv[4:]:
    os.write(fd, bytes.fromhex(piece))
    time.sleep(0.2)  # one read each: the pump holds the link after the first
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_run_dying_mid_write_leaves_its_half_message_unsent(keeper, sut, pki):
    open_connection(keeper, sut, "tls", pki)
    peer = sut.connection()
    whole, half = sip("whole", b"x" * 100), sip("half", b"y" * 1000)
    pieces = [sip("first").hex(), (whole + half[:500]).hex(), half[500:700].hex()]
    command = [sys.executable, "-c", WRITER, str(keeper.directory), *map(str, sut.address), *pieces]
    assert subprocess.run(command, timeout=30).returncode == -signal.SIGKILL
    wait_until(lambda: keeper.status()["connections"][0]["state"] == "idle", what="the lease to end")
    tls = keeper.status()["connections"][0]["tls"]
    assert tls["relay"] == "pump" and tls["dropped_bytes"] == 700
    with lease(keeper, sut, "tls") as run:
        run.sendall(sip("next"))
        expected = sip("first") + whole + sip("next")
        peer.settimeout(3)
        assert read_exactly(peer, len(expected)) == expected


def test_a_sut_that_stops_reading_blocks_the_run_and_bounds_the_keeper(keeper, sut, pki):
    run, _peer = pumped_run(keeper, sut, pki)  # the SuT never reads again
    before, message, written = keeper_rss(keeper), sip("flood", b"x" * 4000), 0
    run.settimeout(1.0)  # blocked a whole second: back-pressure reached the run
    with pytest.raises(TimeoutError):
        while written < 64 * 1024 * 1024:
            run.sendall(message)
            written += len(message)
    assert keeper_rss(keeper) - before < 8 * 1024 * 1024, f"after {written} bytes written"
    run.close()


def test_a_run_that_stops_reading_bounds_the_keeper_and_then_gets_every_message(keeper, sut, pki):
    run, peer = pumped_run(keeper, sut, pki)
    messages = [sip(f"m{number}", b"x" * 2000) for number in range(3000)]  # about 6 MB
    blocked = threading.Event()

    def flood() -> None:
        for message in messages:
            peer.sendall(message)
        blocked.set()

    sender = threading.Thread(target=flood, daemon=True)
    before = keeper_rss(keeper)
    sender.start()
    time.sleep(1.5)  # the run reads nothing meanwhile
    assert not blocked.is_set(), "the keeper took all the SuT sent while the run read nothing"
    assert keeper_rss(keeper) - before < 8 * 1024 * 1024
    expected = b"".join(messages)
    assert read_exactly(run, len(expected)) == expected
    sender.join(10)
    run.close()


def test_without_the_pump_python_relays(tmp_path, sut, pki, monkeypatch):
    monkeypatch.setenv("FDKEEPER_TLS_PUMP", "0")
    client = ensure_keeper(tmp_path / "state")
    try:
        open_connection(client, sut, "tls", pki)
        peer = sut.connection()
        with lease(client, sut, "tls") as run:
            run.sendall(sip("one"))
            peer.settimeout(3)
            assert read_exactly(peer, len(sip("one"))) == sip("one")
            peer.sendall(sip("two"))
            assert read_exactly(run, len(sip("two"))) == sip("two")
        assert client.status()["connections"][0]["tls"]["relay"] == "python"
    finally:
        client.stop()


def test_an_ssl_object_that_does_not_check_out_is_left_to_python(sut, pki, monkeypatch, caplog):
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    context.check_hostname = False
    first = context.wrap_socket(socket.create_connection(sut.address))
    second = context.wrap_socket(socket.create_connection(sut.address))
    try:
        assert tlspump.PumpedLink.create(first) is not None
        # The pointer of another connection: its descriptor is not this socket's.
        original = tlspump.ssl_pointer
        monkeypatch.setattr(tlspump, "ssl_pointer", lambda tls: original(second))
        monkeypatch.setattr(tlspump._LIBRARY, "_warned", False)
        with caplog.at_level(logging.WARNING, logger="fdkeeper.tls"):
            assert tlspump.PumpedLink.create(first) is None
        assert "did not check out" in caplog.text
    finally:
        first.close()
        second.close()


# -- WebSocket and plain TCP links, driven directly


@dataclass
class Pumped:
    """A link in the pump: the keeper's wire, the SuT's end of it, the run's pair end."""

    link: tlspump.PumpedLink
    wire: socket.socket
    sut: socket.socket
    run: socket.socket
    keeper_end: socket.socket
    sut_bytes: bytes = b""

    def attach(self, from_sut: bytes = b"") -> None:
        fds = (self.wire.fileno(), self.keeper_end.fileno(), self.run.fileno())
        assert self.link.attach(fds, b"", b"", (from_sut, b""), [])

    def frames_to_sut(self, count: int) -> list[tuple[int, bytes]]:
        """The next ``count`` frames the keeper sent the SuT, unmasked."""
        frames: list[tuple[int, bytes]] = []
        while len(frames) < count:
            chunk = self.sut.recv(65536)
            assert chunk, f"end of stream after {len(frames)} of {count} frames"
            found, self.sut_bytes = client_frames(self.sut_bytes + chunk)
            frames += found
        assert len(frames) == count, frames
        return frames

    def ended(self, kind: int) -> tlspump.Handback:
        wait_until(lambda: self.link.live_state().end_kind == kind, what=f"end kind {kind}")
        return self.link.release()


def connected_pair(pki: TestPki, wire: str) -> tuple[socket.socket, socket.socket]:
    """The keeper's non-blocking client socket to a loopback SuT (TLS or plain TCP), and the SuT's end."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname()[:2])
        server, _ = listener.accept()
    if wire == "tls":
        server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_context.load_cert_chain(pki.server_cert, pki.server_key)
        client_context = ssl.create_default_context(cafile=str(pki.ca_cert))
        client_context.check_hostname = False
        accepted: list[ssl.SSLSocket] = []
        handshake = threading.Thread(
            target=lambda: accepted.append(server_context.wrap_socket(server, server_side=True))
        )
        handshake.start()
        client = client_context.wrap_socket(client)
        handshake.join(5)
        server = accepted[0]
    client.setblocking(False)
    server.settimeout(3)
    return client, server


@pytest.fixture(params=["tcp", "tls"])
def ws_link(request: pytest.FixtureRequest, pki: TestPki) -> Iterator[Pumped]:
    with pumped_link(pki, request.param, websocket=True) as pumped:
        yield pumped


@contextmanager
def pumped_link(pki: TestPki, wire: str, websocket: bool) -> Iterator[Pumped]:
    client, server = connected_pair(pki, wire)
    run, keeper_end = socket.socketpair()
    keeper_end.setblocking(False)
    run.settimeout(3)
    link = tlspump.PumpedLink.create(client, websocket=websocket)
    assert link is not None
    pumped = Pumped(link, client, server, run, keeper_end)
    pumped.attach()
    try:
        yield pumped
    finally:
        link.release()
        link.free()
        for sock in (client, server, run, keeper_end):
            sock.close()


def test_ws_messages_go_both_ways_and_pings_are_answered_while_pumped(ws_link):
    first, second = sip("ws-one", b"v=0"), sip("ws-two", "é".encode())
    ws_link.sut.sendall(server_message(first, cuts=[7, 30]) + server_frame(OP_PING, b"hb") + server_message(second))
    assert read_exactly(ws_link.run, len(first + second)) == first + second
    assert ws_link.frames_to_sut(1) == [(OP_PONG, b"hb")]
    ws_link.sut.sendall(server_frame(OP_PONG, b"") + server_message(b" \r\n"))  # keep-alives, not messages
    ws_link.run.sendall(sip("up-1") + sip("up-2", b"x" * 70))
    assert ws_link.frames_to_sut(2) == [(OP_TEXT, sip("up-1")), (OP_TEXT, sip("up-2", b"x" * 70))]
    back = ws_link.link.release()
    assert (back.messages_to_sipp, back.messages_to_sut, back.pings, back.keepalives) == (2, 2, 1, 2)
    assert back.end_kind == tlspump.END_NONE and not back.from_sut and not back.to_sipp


def test_ws_close_while_pumped_is_answered_and_handed_back(ws_link):
    ws_link.sut.sendall(server_message(sip("last")) + server_frame(OP_CLOSE, b"\x03\xe9bye\n"))
    assert read_exactly(ws_link.run, len(sip("last"))) == sip("last")
    assert ws_link.frames_to_sut(1) == [(OP_CLOSE, b"\x03\xe9")]  # its code echoed
    back = ws_link.ended(tlspump.END_WS_CLOSE)
    assert back.end_reason == "1001 (going away): bye\\n"  # WsDecoder.closed, escaped


@pytest.mark.parametrize(
    "defect, code, reason",
    [
        (server_frame(OP_TEXT, b"x", mask=b"abcd"), 1002, "a masked frame from the server"),
        (server_frame(OP_TEXT, b"", length=70000), 1009, "a message of 70000 bytes (at most 65536)"),
    ],
)
def test_a_ws_protocol_error_sends_its_close_and_ends_the_link(ws_link, defect, code, reason):
    ws_link.sut.sendall(server_message(sip("whole")) + defect)
    assert read_exactly(ws_link.run, len(sip("whole"))) == sip("whole")
    assert ws_link.frames_to_sut(1) == [(OP_CLOSE, code.to_bytes(2, "big"))]
    back = ws_link.ended(tlspump.END_UNFRAMEABLE)
    assert back.end_reason == f"the WebSocket server broke the protocol ({code}): {reason}"


def test_a_hand_over_mid_fragment_restores_the_message_exactly(ws_link):
    message = sip("fragmented", b"y" * 300)
    first = server_frame(OP_TEXT, message[:100], fin=False) + server_frame(OP_CONTINUATION, message[100:200], fin=False)
    ws_link.sut.sendall(first + server_frame(OP_PING, b"between"))
    assert ws_link.frames_to_sut(1) == [(OP_PONG, b"between")]  # the pump has read it all
    back = ws_link.link.release()
    python = WsDecoder()
    assert python.feed(first + server_frame(OP_PING, b"between")) == []
    assert back.from_sut == python.discard() == first  # the ping handled: not in the held bytes
    ws_link.attach(back.from_sut)
    ws_link.sut.sendall(server_frame(OP_CONTINUATION, message[200:]))
    assert read_exactly(ws_link.run, len(message)) == message
    assert nothing_to_read(ws_link.run, 0.1)


@pytest.mark.parametrize(
    "how, kind, reason",
    [("fin", tlspump.END_EOF, "the SuT closed it: FIN"), ("rst", tlspump.END_FAILED, "the SuT reset it: ECONNRESET")],
)
def test_a_plain_tcp_sip_link_is_pumped(pki, how, kind, reason):
    with pumped_link(pki, "tcp", websocket=False) as pumped:
        pumped.run.sendall(sip("to-sut"))
        assert read_exactly(pumped.sut, len(sip("to-sut"))) == sip("to-sut")
        pumped.sut.sendall(sip("to-run") + b"\r\n" + sip("half")[:20])
        assert read_exactly(pumped.run, len(sip("to-run"))) == sip("to-run")
        end_connection(pumped.sut, how)
        back = pumped.ended(kind)
        assert (back.end_reason, back.from_sut, back.keepalives) == (reason, sip("half")[:20], 1)


def test_only_a_connected_tcp_socket_is_a_plain_wire(monkeypatch):
    monkeypatch.setattr(tlspump._LIBRARY, "_warned", True)  # said once: not in this test's log
    first, second = socket.socketpair()
    unconnected = socket.socket()
    try:
        assert tlspump.PumpedLink.create(first, websocket=True) is None
        assert tlspump.PumpedLink.create(unconnected) is None
    finally:
        for sock in (first, second, unconnected):
            sock.close()


def test_a_ping_flood_from_a_sut_that_does_not_read_leaves_the_pongs_bounded(ws_link):
    pings = 100_000  # 13 MB of pongs: far more than the socket buffers and BUFFER_LIMIT hold
    flood = server_frame(OP_PING, b"p" * 125) * pings
    before = psutil.Process().memory_info().rss
    sender = threading.Thread(target=ws_link.sut.sendall, args=(flood,))
    sender.start()
    wait_until(lambda: ws_link.link.live_state().pings == pings, timeout=30, what="every ping read")
    assert psutil.Process().memory_info().rss - before < 4 * 1024 * 1024, "the unread pongs grew the keeper"
    sender.join(5)
    assert ws_link.link.release().end_kind == tlspump.END_NONE
