"""What the keeper's epoll watches of a kept TLS link across leases (keeper/transports.py ``made``).

A lease makes the link's socketpair anew (tlslink.py): only its ``keeper_end`` is new, so only
it is watched; the SuT's socket stays registered as it was, never unwatched and watched again.
Checked in-process on the real pool, leases and health, with the C pump and with the Python
relay, messages relayed both ways at each lease, and after every step the masks the link
records are the ones the kernel's epoll holds (/proc/self/fdinfo of the Reactor's epoll).
"""

from __future__ import annotations

import os
import re
import select
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from fdkeeper.keeper import tlspump
from fdkeeper.keeper.connection import KeptConnection
from fdkeeper.keeper.health import ConnectionHealth
from fdkeeper.keeper.leases import Leases
from fdkeeper.keeper.pool import ConnectionPool
from fdkeeper.keeper.transports import RelayedTransport, transport_for
from fdkeeper.loop import Reactor
from fdkeeper.testbed.pki import TestPki
from fdkeeper.tls import TlsOptions
from tests.support.fake_sut import sip

ALWAYS_REPORTED = select.EPOLLERR | select.EPOLLHUP  # the kernel adds them to every registration


@dataclass
class Kept:
    """A TLS link the pool keeps, the SuT's end of it, and the Reactor calls made, by descriptor."""

    reactor: Reactor
    leases: Leases
    connection: KeptConnection
    io: RelayedTransport
    sut: ssl.SSLSocket
    relay: str
    calls: list[tuple[str, int]] = field(default_factory=list)

    def calls_on(self, fd: int) -> list[str]:
        return [name for name, called in self.calls if called == fd]

    def run_until(self, done: Callable[[], bool], what: str) -> None:
        for _ in range(500):
            if done():
                return
            self.reactor.run_once(max_wait=0.01)
        raise AssertionError(f"the keeper's loop did not {what}")

    def epoll_masks(self) -> dict[int, int]:
        """What the kernel's epoll watches now: descriptor -> events."""
        with open(f"/proc/self/fdinfo/{self.reactor._epoll.fileno()}") as info:
            found = re.findall(r"^tfd:\s*(\d+)\s+events:\s*([0-9a-f]+)", info.read(), re.MULTILINE)
        return {int(fd): int(events, 16) & ~ALWAYS_REPORTED for fd, events in found}

    def assert_masks_recorded(self) -> None:
        link, masks = self.io.link, self.epoll_masks()
        assert masks.get(link.wire.sock.fileno()) == link.watched_sut & ~ALWAYS_REPORTED
        if link.keeper_end.fileno() >= 0:
            assert masks.get(link.keeper_end.fileno()) == link.watched_pair & ~ALWAYS_REPORTED

    def lease_and_relay(self, number: int) -> int:
        """One run: lease, a message each way, release; the pair's keeper_end descriptor."""
        pid = os.getpid()
        self.leases.grant(self.connection, pid)
        run = socket.socket(fileno=os.dup(self.connection.fileno()))  # as the run receives it
        keeper_end = self.io.link.keeper_end.fileno()
        self.assert_masks_recorded()
        try:
            run.sendall(sip(f"to-sut-{number}"))
            received = bytearray()
            self.run_until(lambda: _read_some(self.sut, received) >= len(sip(f"to-sut-{number}")), "relay to the SuT")
            assert bytes(received) == sip(f"to-sut-{number}")
            self.sut.sendall(sip(f"to-run-{number}"))
            run.settimeout(0)
            got = bytearray()
            self.run_until(lambda: _read_some(run, got) >= len(sip(f"to-run-{number}")), "relay to the run")
            assert bytes(got) == sip(f"to-run-{number}")
        finally:
            run.close()
        self.leases.release(pid)
        self.run_until(lambda: self.io.link.keeper_end.fileno() < 0, "drop the idle pair")
        self.assert_masks_recorded()
        return keeper_end


def _read_some(sock: socket.socket, into: bytearray) -> int:
    try:
        into += sock.recv(65536)
    except (BlockingIOError, ssl.SSLWantReadError):
        pass
    return len(into)


def _tls_to_sut(pki: TestPki) -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
    """The keeper's non-blocking TLS session to a loopback SuT, and the SuT's end (non-blocking too)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname()[:2])
        server, _ = listener.accept()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(pki.server_cert, pki.server_key)
    accepted: list[ssl.SSLSocket] = []
    handshake = threading.Thread(target=lambda: accepted.append(server_context.wrap_socket(server, server_side=True)))
    handshake.start()
    client_context = ssl.create_default_context(cafile=str(pki.ca_cert))
    client_context.check_hostname = False
    session = client_context.wrap_socket(client)
    handshake.join(5)
    session.setblocking(False)
    accepted[0].setblocking(False)
    return session, accepted[0]


@pytest.fixture(params=["pump", "python"])
def kept(request: pytest.FixtureRequest, pki: TestPki, monkeypatch: pytest.MonkeyPatch) -> Iterator[Kept]:
    if request.param == "pump" and tlspump._library_path() is None:
        pytest.skip("fdkeeper/_tlspump*.so is not built")
    monkeypatch.setenv("FDKEEPER_TLS_PUMP", "1" if request.param == "pump" else "0")
    monkeypatch.setattr(tlspump, "_LIBRARY", tlspump._Library())  # loaded anew: as that variable says
    reactor = Reactor()
    health = ConnectionHealth(reactor, keepalive=None)
    connections: dict[int, KeptConnection] = {}
    leases = Leases(reactor, connections, health, on_release=lambda: None)
    pool = ConnectionPool(connections, health, leases, connect_timeout=5.0, tls_defaults=TlsOptions())
    session, sut = _tls_to_sut(pki)
    io = transport_for(session, TlsOptions(insecure=True), b"")
    assert isinstance(io, RelayedTransport)
    address = session.getpeername()[:2]
    connection = KeptConnection(
        id=1, sock=io.leased_socket(session), transport="tls", remote=address, local=session.getsockname()[:2], io=io
    )
    connections[connection.id] = connection
    kept = Kept(reactor, leases, connection, io, sut, request.param)
    for name in ("watch_by", "rewatch", "unwatch"):
        real = getattr(reactor, name)

        def spy(fd: int, *rest: object, _name: str = name, _real: Callable[..., None] = real) -> None:
            kept.calls.append((_name, fd))
            _real(fd, *rest)

        monkeypatch.setattr(reactor, name, spy)
    pool.watch_kept(connection)
    yield kept
    pool.close("test over")
    sut.close()
    reactor.close()


def test_a_lease_watches_its_new_pair_only_and_leaves_the_suts_socket_as_it_is(kept):
    sut_fd = kept.io.link.wire.sock.fileno()
    assert kept.calls_on(sut_fd) == ["watch_by"]  # once, when the pool began keeping it
    assert kept.io.link.keeper_end.fileno() < 0  # an idle link holds the SuT's connection only
    kept.assert_masks_recorded()
    for number in (1, 2):
        kept.calls.clear()
        pair_fd = kept.lease_and_relay(number)
        assert "watch_by" not in kept.calls_on(sut_fd) and "unwatch" not in kept.calls_on(sut_fd), kept.calls
        assert kept.calls_on(pair_fd)[:1] == ["watch_by"] and kept.calls_on(pair_fd)[-1] == "unwatch", kept.calls
        assert kept.calls_on(pair_fd).count("watch_by") == 1
    assert kept.io.link.relay == kept.relay
