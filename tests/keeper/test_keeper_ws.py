"""The keeper's WebSocket link (ws over plain TCP, wss over TLS), driven in this process.

Each test holds one link as the keeper does (transports.transport_for after a real WebSocket
handshake on loopback, watched by ConnectionHealth on a Reactor this test turns) and plays
the server's end byte by byte with fdkeeper/testbed/wsframes.py, and the run's end on the leased
socketpair; the last one replaces a real keeper (--replace) holding a ws connection. The
keeper's requests and hostile servers are in test_keeper_ws_opening.py and
test_keeper_ws_hostile.py; real sipp and Kamailio in tests/e2e.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from fdkeeper.client import KeeperClient
from fdkeeper.keeper.connection import KeptConnection
from fdkeeper.keeper.health import PONG_TIMEOUT, ConnectionHealth
from fdkeeper.keeper.transports import RelayedTransport, transport_for
from fdkeeper.loop import Reactor
from fdkeeper.testbed import wait_until
from fdkeeper.testbed.hostile_ws import HostileWsServer
from fdkeeper.testbed.pki import TestPki
from fdkeeper.testbed.wsframes import client_frames, handshake_answer, server_frame, server_message
from fdkeeper.tls import TlsOptions
from fdkeeper.websocket import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    WsOptions,
    handshake_request,
    new_key,
    read_handshake_answer,
)
from tests.support.fake_sut import sip

WAIT = 3.0


class Link:
    """One kept WebSocket link in this process, the server's end of it, and a run's end."""

    def __init__(self, pki: TestPki | None, early: bytes = b"") -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(listener.getsockname()[:2])
        server, _ = listener.accept()
        listener.close()
        options = TlsOptions(ca=str(pki.ca_cert), sni=pki.server_name) if pki else None
        if pki:
            client, server = _tls_pair(client, server, pki)
        where = f"127.0.0.1:{client.getpeername()[1]}"
        key = new_key()
        client.sendall(handshake_request(where, WsOptions(path="/sip"), key))
        request = b""
        while b"\r\n\r\n" not in request:
            request += server.recv(4096)
        server.sendall(handshake_answer(request, extra="Server: test-ws\r\n") + early)
        answer, data = None, b""
        while answer is None:
            data += client.recv(4096)
            answer = read_handshake_answer(data, key, WsOptions(path="/sip"), where)
        handshake, rest = answer
        client.setblocking(False)
        server.setblocking(False)
        self.server = server
        self.reactor = Reactor()
        self.health = ConnectionHealth(self.reactor, keepalive=None)
        io = transport_for(client, options, rest, websocket=handshake)
        assert isinstance(io, RelayedTransport)
        self.io = io
        local, remote = client.getsockname()[:2], client.getpeername()[:2]
        self.connection = KeptConnection(
            id=1, sock=io.leased_socket(client), transport="wss" if pki else "ws", remote=remote, local=local, io=io
        )
        self.run = socket.socket(fileno=os.dup(self.connection.fileno()))  # the run's copy, as a lease gives
        self.run.setblocking(False)
        self.received = b""  # what the server read, not yet taken as frames
        self.frames: list[tuple[int, bytes]] = []
        self.server_eof = False
        self.health.watch(self.connection)

    def spin(self, done: Callable[[], bool], what: str) -> None:
        """Turn the keeper's loop (and read the server's end) until ``done()``."""
        deadline = time.monotonic() + WAIT
        while not done():
            assert time.monotonic() < deadline, f"not within {WAIT} s: {what}"
            self.reactor.run_once(0.01)
            self._read_server()

    def _read_server(self) -> None:
        while not self.server_eof:
            try:
                data = self.server.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError):
                return
            except OSError:
                data = b""
            if not data:
                self.server_eof = True
                return
            self.received += data
            frames, self.received = client_frames(self.received)  # asserts each frame is masked, final
            self.frames += frames

    def frames_of(self, opcode: int) -> list[bytes]:
        return [payload for kind, payload in self.frames if kind == opcode]

    def send(self, data: bytes) -> None:
        self.server.sendall(data) if not isinstance(self.server, ssl.SSLSocket) else _ssl_sendall(self.server, data)

    def run_reads(self, length: int) -> bytes:
        data = b""

        def enough() -> bool:
            nonlocal data
            try:
                data += self.run.recv(65536)
            except BlockingIOError:
                pass
            return len(data) >= length

        self.spin(enough, f"{length} bytes for the run")
        return data

    def run_reads_to_the_end(self) -> tuple[bytes, str]:
        """What the run reads, then how its stream ended: "eof" or the errno name."""
        data, end = b"", ""

        def ended() -> bool:
            nonlocal data, end
            try:
                chunk = self.run.recv(65536)
            except BlockingIOError:
                return False
            except OSError as error:
                end = errno.errorcode[error.errno or 0]
                return True
            data += chunk
            end = "" if chunk else "eof"
            return bool(end)

        self.spin(ended, "the end of the run's stream")
        return data, end

    def hold(self) -> None:
        self.connection.holder_pid = os.getpid()

    def end_lease(self) -> None:
        self.connection.holder_pid = None
        self.health.end_of_lease(self.connection)

    def close(self) -> None:
        if self.connection.sock is not None:
            self.health.close_connection(self.connection, "test over")
        self.server.close()
        self.run.close()
        self.reactor.close()


def _tls_pair(client: socket.socket, server: socket.socket, pki: TestPki) -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
    """Both ends through a TLS handshake (the server's in a thread, the client's here)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    wrapped: list[ssl.SSLSocket] = []
    thread = threading.Thread(target=lambda: wrapped.append(context.wrap_socket(server, server_side=True)))
    thread.start()
    tls = ssl.create_default_context(cafile=str(pki.ca_cert)).wrap_socket(client, server_hostname=pki.server_name)
    thread.join(WAIT)
    return tls, wrapped[0]


def _ssl_sendall(sock: ssl.SSLSocket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except ssl.SSLWantWriteError:
            time.sleep(0.001)


def close_code(payload: bytes) -> int:
    return int.from_bytes(payload[:2], "big")


@pytest.fixture(params=["ws", "wss"])
def link(request: pytest.FixtureRequest, pki: TestPki) -> Iterator[Link]:
    made = Link(pki if request.param == "wss" else None)
    yield made
    made.close()


@pytest.fixture
def ws_link() -> Iterator[Link]:
    made = Link(None)
    yield made
    made.close()


def test_sip_goes_both_ways_one_masked_frame_per_message_and_fragments_come_whole(link):
    first, second = sip("one"), sip("two", b"body")
    link.hold()
    link.run.sendall(first + second)
    link.spin(lambda: len(link.frames) == 2, "two frames at the server")
    assert link.frames == [(OP_TEXT, first), (OP_TEXT, second)]
    answer, request = sip("answer"), sip("request", b"0123456789")
    link.send(server_message(answer, cuts=[1, 20, 20, len(answer) - 1]) + server_message(request))
    assert link.run_reads(len(answer + request)) == answer + request
    status = link.connection.as_dict()
    websocket = status["websocket"]
    assert websocket["path"] == "/sip" and websocket["protocol"] == "sip", websocket
    assert websocket["status"].startswith("HTTP/1.1 101") and ["Server", "test-ws"] in websocket["server_headers"]
    assert (websocket["messages_to_sut"], websocket["messages_to_sipp"], websocket["close"]) == (2, 2, "")
    assert (status["tls"] is None) == (link.connection.transport == "ws")


def test_pings_are_answered_between_runs_and_while_held(ws_link):
    ws_link.send(server_frame(OP_PING, b"idle"))
    ws_link.spin(lambda: ws_link.frames_of(OP_PONG) == [b"idle"], "the pong between runs")
    ws_link.hold()
    ws_link.send(server_frame(OP_PING, b"held") + server_message(sip("after-ping")))
    assert ws_link.run_reads(len(sip("after-ping"))) == sip("after-ping")
    ws_link.spin(lambda: ws_link.frames_of(OP_PONG) == [b"idle", b"held"], "the pong while held")
    assert ws_link.connection.as_dict()["websocket"]["pings_answered"] == 2


def test_keepalive_pings_take_pongs_and_close_a_silent_server(ws_link):
    io, health, connection = ws_link.io, ws_link.health, ws_link.connection
    io.keep_alive(health, connection, time.monotonic() + 60, 30.0)
    ws_link.spin(lambda: len(ws_link.frames_of(OP_PING)) == 1, "a keep-alive ping")
    ws_link.send(server_frame(OP_PONG, b""))
    ws_link.spin(lambda: io.link.ping_sent_at is None, "the pong taken")
    assert connection.as_dict()["pongs"] == 1
    io.keep_alive(health, connection, time.monotonic() + 60, 30.0)
    ws_link.spin(lambda: len(ws_link.frames_of(OP_PING)) == 2, "a second ping")
    io.keep_alive(health, connection, time.monotonic() + PONG_TIMEOUT + 1, 30.0)
    assert connection.closed_reason.startswith("no keep-alive pong")
    ws_link.spin(lambda: ws_link.server_eof, "the server's end closed")
    assert close_code(ws_link.frames_of(OP_CLOSE)[0]) == 1000


def test_the_servers_close_ends_the_run_after_what_came_before_and_nothing_more_is_sent(ws_link):
    ws_link.hold()
    ws_link.send(server_message(sip("last")) + server_frame(OP_CLOSE, (1001).to_bytes(2, "big") + b"restart"))
    assert ws_link.run_reads_to_the_end() == (sip("last"), "eof")
    ws_link.spin(lambda: bool(ws_link.frames_of(OP_CLOSE)), "the Close reply")
    assert close_code(ws_link.frames_of(OP_CLOSE)[0]) == 1001
    # What the run writes now must never reach the server. The keeper may already have closed its
    # end (a Close ends the run once it has read everything), so the write fails with EPIPE; or
    # the write lands before that and the keeper drops it. Either keeps the contract.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        ws_link.run.sendall(sip("too-late"))
    ws_link.end_lease()
    ws_link.spin(lambda: ws_link.connection.sock is None, "the link closed")
    assert ws_link.connection.closed_reason == "the SuT closed the WebSocket: 1001 (going away): restart"
    assert ws_link.frames_of(OP_TEXT) == [] and len(ws_link.frames_of(OP_CLOSE)) == 1


def test_a_protocol_error_sends_close_1002_after_delivering_the_whole_messages(link):
    link.hold()
    link.send(server_message(sip("whole")) + server_frame(OP_TEXT, b"bad", mask=b"abcd"))
    data, end = link.run_reads_to_the_end()
    assert data.startswith(sip("whole")) and end in ("eof", "ECONNRESET"), (data, end)
    link.spin(lambda: link.server_eof, "the server's end closed")
    assert [close_code(payload) for payload in link.frames_of(OP_CLOSE)] == [1002]
    assert "masked frame" in (link.connection.ending or link.connection.closed_reason)


def test_an_ended_runs_unfinished_message_is_dropped_not_sent(ws_link):
    whole, next_one = sip("whole"), sip("next")
    ws_link.hold()
    ws_link.run.sendall(whole + sip("cut")[:30])
    ws_link.spin(lambda: len(ws_link.frames) == 1, "the whole message at the server")
    ws_link.end_lease()
    ws_link.hold()
    ws_link.run.sendall(next_one)
    ws_link.spin(lambda: len(ws_link.frames) == 2, "the next run's message at the server")
    assert ws_link.frames == [(OP_TEXT, whole), (OP_TEXT, next_one)]
    assert ws_link.connection.as_dict()["websocket"]["dropped_bytes"] == 30


@pytest.mark.parametrize("going_away", [True, False])
def test_the_keeper_closes_with_a_close_frame(link, going_away):
    link.health.close_connection(link.connection, "keeper stopped", going_away=going_away)
    link.spin(lambda: link.server_eof, "the server's end closed")
    assert [close_code(payload) for payload in link.frames_of(OP_CLOSE)] == [1001 if going_away else 1000]


def test_frames_that_came_with_the_handshake_answer_are_read():
    early = Link(None, early=server_message(sip("early"), cuts=[5]) + server_frame(OP_PING, b"e"))
    try:
        assert early.run_reads(len(sip("early"))) == sip("early")
        early.spin(lambda: early.frames_of(OP_PONG) == [b"e"], "the pong of the early ping")
    finally:
        early.close()


def test_a_ws_link_moves_only_while_it_holds_nothing(link):
    assert link.io.movable == (link.connection.transport == "ws")  # a TLS session never moves
    link.send(server_message(sip("waiting"))[:-3])
    link.spin(lambda: link.io.link.codec.pending > 0, "the partial frame held")
    assert not link.io.movable
    link.send(server_message(sip("waiting"))[-3:])
    link.spin(lambda: link.connection.queued_bytes() > 0, "the message waiting for a run")
    assert not link.io.movable
    assert link.run_reads(len(sip("waiting"))) == sip("waiting")
    assert link.io.movable == (link.connection.transport == "ws")


def test_replace_moves_an_idle_ws_connection_with_its_handshake(keeper: KeeperClient):
    server = HostileWsServer("good")
    fields = {"role": "client", "transport": "ws", "remote": server.address, "local": "-", "ws_path": "/moved"}
    try:
        keeper.prepare(**fields)
        [before] = keeper.status()["connections"]
        old_pid = keeper.status()["keeper"]["pid"]
        with open(keeper.directory / "replace.log", "ab") as log:
            command = [sys.executable, "-m", "fdkeeper", "keeper", "--dir", str(keeper.directory), "--replace"]
            subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True
            )
        wait_until(lambda: (keeper.alive() or None) and keeper.status()["keeper"]["pid"] != old_pid, timeout=15)
        [after] = keeper.status()["connections"]
        assert (after["id"], after["local"], after["transport"], after["state"]) == (
            before["id"], before["local"], "ws", "idle",
        )  # fmt: skip
        assert after["websocket"]["path"] == "/moved" and after["websocket"]["status"] == before["websocket"]["status"]
        connection = server.newest()
        [(_, fd)] = keeper.lease(**fields)
        with socket.socket(fileno=fd) as run:
            run.sendall(sip("after-replace"))
            wait_until(lambda: connection.frames.messages, timeout=5, what="the message over the moved connection")
        assert connection.frames.messages == [sip("after-replace")] and connection.frames.close_code is None
        assert len(server.connections) == 1 and not connection.ended
    finally:
        server.close()
