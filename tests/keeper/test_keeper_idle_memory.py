"""What an idle kept connection costs the keeper (issue 20: 1 kB per TCP, 20 kB per TLS connection).

The figures themselves are bench/keeper_scale.py's; here the levers that make them: an idle TLS
session's OpenSSL buffers freed (tlspump.free_buffers, which the link calls after a read that
found nothing), the session still carrying data both ways afterwards, the per-connection
objects without a __dict__ (slots), and a bound on the Python bytes an idle TCP user's
connection costs, opened through the pool as a PREPARE opens it.
"""

from __future__ import annotations

import ctypes
import gc
import socket
import ssl
import tracemalloc
from collections.abc import Iterator

import pytest

from fdkeeper.keeper import tlspump
from fdkeeper.keeper.connection import KeptConnection
from fdkeeper.keeper.health import ConnectionHealth
from fdkeeper.keeper.leases import Leases
from fdkeeper.keeper.opening import Pending
from fdkeeper.keeper.pool import ConnectionPool
from fdkeeper.keeper.transports import RelayedTransport, TcpTransport, transport_for
from fdkeeper.keeper.wire import TlsWire
from fdkeeper.loop import Reactor
from fdkeeper.protocol import parse_request
from fdkeeper.testbed.pki import TestPki
from fdkeeper.tls import TlsOptions, client_context

needs_pump = pytest.mark.skipif(tlspump._library_path() is None, reason="fdkeeper/_tlspump*.so is not built")


def tls_pair(pki: TestPki) -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
    """A client session made as the keeper makes them (client_context) and its server, handshakes
    done, both non-blocking."""
    client_sock, server_sock = socket.socketpair()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    client = client_context(TlsOptions(insecure=True)).wrap_socket(client_sock, do_handshake_on_connect=False)
    server = server_context.wrap_socket(server_sock, server_side=True, do_handshake_on_connect=False)
    client.setblocking(False)
    server.setblocking(False)
    done = {client: False, server: False}
    for _ in range(100):
        for end in (client, server):
            if not done[end]:
                try:
                    end.do_handshake()
                    done[end] = True
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
        if all(done.values()):
            return client, server
    raise AssertionError("the TLS handshake did not finish")


@pytest.fixture
def sessions(pki: TestPki) -> Iterator[tuple[ssl.SSLSocket, ssl.SSLSocket]]:
    client, server = tls_pair(pki)
    yield client, server
    client.close()
    server.close()


def malloced() -> int:
    """Bytes glibc's malloc has handed out now (OpenSSL's allocations among them)."""

    class MallInfo2(ctypes.Structure):
        fields = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
        _fields_ = [(name, ctypes.c_size_t) for name in fields.split()]

    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc without mallinfo2")
    libc.mallinfo2.restype = MallInfo2
    return int(libc.mallinfo2().uordblks)


def receive(sock: ssl.SSLSocket, length: int) -> bytes:
    data = b""
    for _ in range(1000):
        try:
            data += sock.recv(length - len(data))
        except ssl.SSLWantReadError:
            continue
        if len(data) == length:
            return data
    raise AssertionError(f"{len(data)} of {length} bytes")


@needs_pump
def test_an_idle_sessions_read_buffer_is_freed_and_the_session_goes_on(pki):
    if tlspump._LIBRARY.load() is None:
        pytest.skip(f"no pump: {tlspump._LIBRARY.unavailable}")
    pairs = [tls_pair(pki) for _ in range(10)]
    for client, _server in pairs:
        with pytest.raises(ssl.SSLWantReadError):
            client.recv(4096)  # the server's session tickets, then nothing: OpenSSL keeps its read buffer
    before = malloced()
    assert all(tlspump.free_buffers(client) for client, _server in pairs)
    freed = (before - malloced()) / len(pairs)
    assert freed >= 8 * 1024, f"{freed:.0f} bytes freed per session: OpenSSL's read buffer (about 13 kB) was not"
    for client, server in pairs:
        server.send(b"ping")
        assert receive(client, 4) == b"ping"
        client.send(b"pong")
        assert receive(server, 4) == b"pong"
        client.close()
        server.close()


@needs_pump
def test_the_wire_frees_them_after_a_read_that_found_nothing(sessions, monkeypatch):
    client, server = sessions
    shed: list[TlsWire] = []
    monkeypatch.setattr(TlsWire, "shed_buffers", lambda wire: shed.append(wire))
    wire = TlsWire(client)
    assert wire.read() is None and shed == [wire]  # the session tickets, then nothing
    server.send(b"ping")
    assert receive(client, 4) == b"ping"


def test_the_free_is_refused_only_where_openssl_could_free_a_buffer_in_use():
    assert not tlspump._free_buffers_safe((3, 0, 0, 13, 0))  # CVE-2024-4741
    assert tlspump._free_buffers_safe((3, 0, 0, 14, 0))
    assert not tlspump._free_buffers_safe((3, 3, 0, 0, 0))
    assert tlspump._free_buffers_safe((3, 4, 0, 0, 0))
    assert not tlspump._free_buffers_safe((1, 1, 1, 23, 0))


@needs_pump
def test_the_objects_of_a_kept_link_have_no_dict(sessions):
    client, _server = sessions
    io = transport_for(client, TlsOptions(insecure=True), b"")
    assert isinstance(io, RelayedTransport)
    link = io.link
    for thing in (io, link, link.wire, link.codec, link.codec._decoder, link.from_sipp, TcpTransport()):
        assert not hasattr(thing, "__dict__"), f"{type(thing).__name__} has a __dict__ (slots: bench/keeper_scale.py)"
    io.close()


def test_every_connection_holds_the_same_transport_and_host_strings():
    def kept(number: int) -> KeptConnection:
        host = ".".join(["127", "0", "0", "1"])  # a new string each time, as a request's
        address = (host, 5060 + number)
        return KeptConnection(id=number, sock=None, transport="".join(["t", "cp"]), remote=address, local=address)

    first, second = kept(1), kept(2)
    assert first.transport is second.transport and first.remote[0] is second.local[0]


# Python bytes an idle TCP user's connection costs the keeper: measured 645 (the connection, its
# socket object and transport, the Reactor's and the pool's entries, its AoR and local port);
# the RSS bench/keeper_scale.py reads is about 1.2x that. Headroom for a changed field or two.
IDLE_TCP_BYTES = 780
USERS = 256


def test_an_idle_tcp_users_connection_costs_the_keeper_under_a_bound():
    reactor = Reactor()
    health = ConnectionHealth(reactor, keepalive=None)
    connections: dict[int, KeptConnection] = {}
    leases = Leases(reactor, connections, health, on_release=lambda: None)
    pool = ConnectionPool(connections, health, leases, connect_timeout=5.0, tls_defaults=TlsOptions())
    listener = socket.create_server(("127.0.0.1", 0), backlog=USERS)
    port = listener.getsockname()[1]
    # Parsed before counting: the parser's bounded cache is not the connections' cost.
    requests = [
        parse_request(f"PREPARE role=client transport=tcp remote=127.0.0.1:{port} local=- aor=sip:u{n}@t.test".encode())
        for n in range(USERS + 1)
    ]
    peers: list[socket.socket] = []

    def open_all(batch: list) -> None:
        for request in batch:
            with pytest.raises(Pending):
                pool.select(request, None)
        expected = len(connections) + len(batch)
        for _ in range(2000):
            if len(connections) == expected:
                break
            reactor.run_once(max_wait=0.01)
            while len(peers) < expected:
                peers.append(listener.accept()[0])
        assert len(connections) == expected, "the pool did not keep every connection"

    try:
        open_all(requests[:1])  # the first: the keeper's own one-off structures
        gc.collect()
        tracemalloc.start()
        before = _keeper_bytes()
        for first in range(1, USERS + 1, 16):  # a few opening at a time, as a run opens them
            open_all(requests[first : first + 16])
        gc.collect()
        each = (_keeper_bytes() - before) / USERS
        tracemalloc.stop()
        assert each <= IDLE_TCP_BYTES, (
            f"an idle TCP connection costs the keeper {each:.0f} Python bytes (bound {IDLE_TCP_BYTES})"
        )
    finally:
        tracemalloc.stop()
        pool.close("test over")
        for peer in peers:
            peer.close()
        listener.close()
        reactor.close()


def _keeper_bytes() -> int:
    """Bytes traced now that fdkeeper's code allocated (not the test's: the SuT's accepted ends)."""
    keeper = tracemalloc.Filter(True, "*/fdkeeper/*", all_frames=True)
    return sum(stat.size for stat in tracemalloc.take_snapshot().filter_traces([keeper]).statistics("filename"))
