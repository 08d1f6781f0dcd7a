"""The keeper's WebSocket upgrade (ws over TCP, wss over TLS) as an Opening step on its Reactor
(keeper/opening.py): the request as sent, the answer checked and bounded, the bytes after it
passed on, and each failure one line that ends only that open.

In-process: the keeper's own Reactor and Opener against a small threaded WebSocket server on
loopback that reads one upgrade request and answers as the test says. A real keeper (one per
module) shows that it serves on while an upgrade waits, that what the server sends with its
answer reaches the run, that status shows the handshake, and that a per-user run's LEASE opens
with the options its PREPARE gave.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from fdkeeper.client import KeeperClient, ensure_keeper
from fdkeeper.errors import FdkeeperError
from fdkeeper.keeper.opening import Opener, Pending
from fdkeeper.loop import Reactor
from fdkeeper.report import format_status
from fdkeeper.testbed.pki import TestPki
from fdkeeper.testbed.wsframes import handshake_answer, server_message
from fdkeeper.tls import TlsOptions
from fdkeeper.websocket import MAX_HANDSHAKE_ANSWER, WsHandshake, WsOptions
from tests.support.fake_sut import sip

EARLY = b"\x81\x05hello"  # an unmasked text frame the server sends right after its answer
OTHER_KEY = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"  # RFC 6455's sample: not the keeper's

# What the server does once it has read the upgrade request: (its socket, the request).
Behaviour = Callable[[socket.socket, bytes], None]


def answer(
    *,
    status: str = "101 Switching Protocols",
    protocol: str | None = "sip",
    wrong_accept: bool = False,
    after: bytes = b"",
) -> Behaviour:
    """Answer the upgrade (with a Server header, and the accept for another key if ``wrong_accept``), then ``after``."""

    def behave(sock: socket.socket, request: bytes) -> None:
        answered = OTHER_KEY if wrong_accept else request
        sock.sendall(
            handshake_answer(answered, status=status, protocol=protocol, extra="Server: fake-ws/1.0\r\n") + after
        )

    return behave


def close_mid_answer(sock: socket.socket, _request: bytes) -> None:
    sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgr")
    sock.close()


def oversized_answer(sock: socket.socket, _request: bytes) -> None:
    padding = "a" * 1000
    lines = MAX_HANDSHAKE_ANSWER // 1000 + 4
    head = "HTTP/1.1 101 Switching Protocols\r\n" + "".join(f"X-Pad-{n}: {padding}\r\n" for n in range(lines))
    try:
        sock.sendall(head.encode())  # over 16 kB, no blank line: the keeper stops reading
    except OSError:
        pass


def silent(_sock: socket.socket, _request: bytes) -> None:
    pass


class FakeWsServer:
    """A loopback WebSocket server (TLS 1.3 with ``pki``; ``client_certificates``: it wants one
    the test CA signed): reads each connection's upgrade request into ``requests`` and hands it
    to ``behave``; keeps the sockets open until closed, a failed TLS handshake's too (so the
    keeper reads the alert, not a reset)."""

    def __init__(self, behave: Behaviour, pki: TestPki | None = None, client_certificates: bool = False) -> None:
        self.behave = behave
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self.context: ssl.SSLContext | None = None
        if pki is not None:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.minimum_version = ssl.TLSVersion.TLSv1_3  # a refused certificate: an alert after the handshake
            self.context.load_cert_chain(pki.server_cert, pki.server_key)
            if client_certificates:
                self.context.verify_mode = ssl.CERT_REQUIRED
                self.context.load_verify_locations(pki.ca_cert)
        self.requests: list[bytes] = []
        self.sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            sock.settimeout(5)
            try:
                if self.context is not None:
                    sock = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                    self.sockets.append(sock)
                    sock.do_handshake()
                else:
                    self.sockets.append(sock)
                request = b""
                while b"\r\n\r\n" not in request and (chunk := sock.recv(4096)):
                    request += chunk
            except OSError:
                continue
            self.requests.append(request)
            self.behave(sock, request)

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    loop = Reactor()
    yield loop
    loop.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., FakeWsServer]]:
    servers: list[FakeWsServer] = []

    def start(behave: Behaviour, pki: TestPki | None = None, client_certificates: bool = False) -> FakeWsServer:
        servers.append(FakeWsServer(behave, pki, client_certificates))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


Kept = tuple[socket.socket, bytes, WsHandshake | None]


def open_ws(
    reactor: Reactor,
    server: FakeWsServer,
    websocket: WsOptions | None = None,
    tls: TlsOptions | None = None,
    timeout: float = 3.0,
) -> tuple[FdkeeperError | None, list[Kept]]:
    """Open a ws (wss with ``tls``) connection to ``server`` on ``reactor``: the open's outcome
    (None: kept) and what was kept."""
    opener = Opener(reactor, timeout)
    key = (server.address, "wss" if tls else "ws", None, None)
    kept: list[Kept] = []
    outcome: list[FdkeeperError | None] = []

    def keep(sock: socket.socket, early: bytes, handshake: WsHandshake | None) -> None:
        kept.append((sock, early, handshake))

    with pytest.raises(Pending) as pending:
        opener.open(key, None, tls, keep, websocket or WsOptions())
    pending.value.then(outcome.append)
    deadline = time.monotonic() + timeout + 5
    while not outcome:
        assert time.monotonic() < deadline, "the open never ended"
        reactor.run_once(max_wait=0.05)
    assert key not in opener.in_progress
    for sock, _, _ in kept:
        sock.close()
    return outcome[0], kept


def headers_of(request: bytes) -> dict[str, str]:
    lines = request.decode().split("\r\n")[1:]
    return {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines if line)}


# ---------------------------------------------------------------- upgrades that succeed


def test_an_upgrade_over_tcp_sends_what_was_asked_and_passes_on_the_early_frames(reactor, serve):
    server = serve(answer(after=EARLY))
    options = WsOptions(path="/sip/ws?room=1", origin="https://phone.example", headers=(("X-Token", "abc def"),))
    error, [(_, early, handshake)] = open_ws(reactor, server, options)
    assert error is None
    [request] = server.requests
    assert request.startswith(b"GET /sip/ws?room=1 HTTP/1.1\r\n")
    headers = headers_of(request)
    assert headers["host"] == f"127.0.0.1:{server.address[1]}"
    assert headers["upgrade"].lower() == "websocket" and "upgrade" in headers["connection"].lower()
    assert headers["sec-websocket-version"] == "13" and headers["sec-websocket-protocol"] == "sip"
    assert headers["origin"] == "https://phone.example" and headers["x-token"] == "abc def"
    assert early == EARLY
    assert handshake is not None
    assert (handshake.path, handshake.protocol) == ("/sip/ws?room=1", "sip")
    assert handshake.status == "HTTP/1.1 101 Switching Protocols"
    assert ("Server", "fake-ws/1.0") in handshake.server_headers


def test_an_upgrade_over_tls_comes_right_after_the_handshake_without_a_sip_ping(reactor, serve, pki):
    server = serve(answer(after=EARLY), pki)
    error, [(sock, early, handshake)] = open_ws(reactor, server, tls=TlsOptions(ca=str(pki.ca_cert)))
    assert error is None
    [request] = server.requests
    assert request.startswith(b"GET / HTTP/1.1\r\n")  # no CRLFCRLF ping before it
    assert isinstance(sock, ssl.SSLSocket) and early == EARLY
    assert handshake is not None and handshake.path == "/"


# ---------------------------------------------------------------- upgrades that fail: one line each


@pytest.mark.parametrize(
    ("behave", "code", "words"),
    [
        (answer(status="403 Forbidden"), "refused", ["refused the upgrade", "403 Forbidden", "--ws-path"]),
        (answer(wrong_accept=True), "refused", ["Sec-WebSocket-Accept"]),
        (answer(protocol=None), "refused", ["Sec-WebSocket-Protocol"]),
        (oversized_answer, "refused", ["WebSocket"]),
        (close_mid_answer, "refused", ["closed the connection during the WebSocket handshake", "/ws"]),
    ],
    ids=["403", "wrong accept", "no protocol", "answer over 16 kB", "closed mid-answer"],
)
def test_a_failed_upgrade_is_one_line_naming_the_server(reactor, serve, behave, code, words):
    server = serve(behave)
    error, kept = open_ws(reactor, server)
    assert kept == [] and error is not None
    text = str(error)
    assert error.code == code and text.startswith("fdkeeper: ") and "\n" not in text and "\r" not in text
    assert f"127.0.0.1:{server.address[1]}" in text
    for word in words:
        assert word in text


def test_a_server_that_resets_during_the_upgrade_over_tls_is_named(reactor, serve, pki):
    def reset(sock: socket.socket, _request: bytes) -> None:
        raw = socket.socket(fileno=sock.detach())
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.close()

    server = serve(reset, pki)
    error, _ = open_ws(reactor, server, tls=TlsOptions(ca=str(pki.ca_cert)))
    assert error is not None and error.code == "refused"
    assert "closed the connection during the WebSocket handshake" in str(error) and "/wss" in str(error)


def test_a_client_certificate_refused_after_the_tls_handshake_is_read_with_the_answer(reactor, serve, pki):
    server = serve(silent, pki, client_certificates=True)
    stranger = TlsOptions(ca=str(pki.ca_cert), cert=str(pki.other_ca_client_cert), key=str(pki.other_ca_client_key))
    error, kept = open_ws(reactor, server, tls=stranger)
    assert kept == [] and error is not None and error.code == "refused"
    assert "TLS handshake" in str(error) and "unknown ca" in str(error), str(error)  # the alert, not a bare close
    assert "/wss failed" in str(error), str(error)  # named as what the run asked for, not /tls


def test_a_server_that_never_answers_times_out_naming_the_option(reactor, serve):
    server = serve(silent)
    error, _ = open_ws(reactor, server, timeout=0.3)
    assert error is not None and error.code == "timeout"
    assert "WebSocket handshake" in str(error) and "--connect-timeout" in str(error) and "0.3 s" in str(error)


# ---------------------------------------------------------------- a real keeper: profiles, early frames, status


@pytest.fixture(scope="module")
def keeper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeeperClient]:
    client = ensure_keeper(tmp_path_factory.mktemp("ws") / "state", connect_timeout=1.5)
    yield client
    client.stop()


def test_the_keeper_serves_on_while_an_upgrade_waits_and_answers_its_request_after(keeper, serve):
    server = serve(silent)
    outcome: list[BaseException] = []

    def prepare() -> None:
        try:
            keeper.prepare(role="client", transport="ws", remote=server.address, local="-", ws_path="/ws")
        except FdkeeperError as error:
            outcome.append(error)

    waiting = threading.Thread(target=prepare)
    waiting.start()
    while not server.requests:
        time.sleep(0.01)
    started = time.monotonic()
    assert keeper.request(b"PING").ok  # answered at once, though the upgrade waits
    assert time.monotonic() - started < 0.5
    waiting.join(10)
    [error] = outcome
    assert isinstance(error, FdkeeperError) and error.code == "timeout" and "WebSocket handshake" in str(error)
    assert server.requests[0].startswith(b"GET /ws HTTP/1.1\r\n")


def test_a_message_sent_with_the_answer_reaches_the_run_and_status_shows_the_handshake(keeper, serve):
    server = serve(answer(after=server_message(sip("early-1"))))
    keeper.prepare(role="client", transport="ws", remote=server.address, local="-", ws_path="/early")
    [(connection_id, fd)] = keeper.lease(role="client", transport="ws", remote=server.address, local="-")
    with socket.socket(fileno=fd) as leased:
        leased.settimeout(5)
        assert leased.recv(65536) == sip("early-1")
    [shown] = [c for c in keeper.status(transport="ws")["connections"] if c["id"] == connection_id]
    assert all(c["transport"] == "wss" for c in keeper.status(transport="wss")["connections"])
    assert shown["transport"] == "ws" and shown["tls"] is None
    websocket = shown["websocket"]
    assert (websocket["path"], websocket["protocol"]) == ("/early", "sip")
    assert websocket["status"] == "HTTP/1.1 101 Switching Protocols"
    assert ["Server", "fake-ws/1.0"] in websocket["server_headers"]


def test_a_per_user_lease_opens_wss_with_the_options_its_prepare_gave(keeper, serve, pki):
    server = serve(answer(), pki)
    keeper.prepare(
        role="client",
        transport="wss",
        remote=server.address,
        local="-",
        per_call=True,
        users=1,
        tls_ca=str(pki.ca_cert),
        ws_path="/from-prepare",
        ws_origin="https://phone.example",
    )
    assert server.requests == []  # a per-user run's PREPARE opens nothing
    [(_, fd)] = keeper.lease(
        role="client", transport="wss", remote=server.address, local="-", aor="sip:alice@example.com"
    )
    os.close(fd)
    [request] = server.requests
    assert request.startswith(b"GET /from-prepare HTTP/1.1\r\n")  # the shim's LEASE carries no ws_*
    assert headers_of(request)["origin"] == "https://phone.example"


# ---------------------------------------------------------------- what `fdkeeper status` shows


def test_status_shows_a_websocket_connections_handshake_on_a_line_of_its_own():
    connection = {
        "id": 7,
        "transport": "wss",
        "local": "127.0.0.1:40000",
        "remote": "127.0.0.1:8443",
        "aor": None,
        "state": "idle",
        "closed_reason": None,
        "holder_pid": None,
        "age": 3,
        "leases": 1,
        "queued_bytes": 0,
        "tls": None,
        "websocket": {
            "path": "/ws",
            "protocol": "sip",
            "status": "HTTP/1.1 101 Switching Protocols",
            "server_headers": [["Server", "kamailio (5.8)"], ["X-Evil", "a\r\nforged row"]],
            "pings_answered": 2,
            "close": "",
        },
    }
    status = {"keeper": {"pid": 1, "uptime": 5, "directory": "/d"}, "connections": [connection]}
    table = format_status(status).splitlines()
    assert len(table) == 4 and "wss" in table[2]
    assert table[3].strip() == (
        "WebSocket /ws, protocol sip, HTTP/1.1 101 Switching Protocols, "
        "server headers: Server: kamailio (5.8); X-Evil: a\\r\\nforged row, pings answered 2"
    )
