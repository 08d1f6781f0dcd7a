"""A defect in the keeper's code while opening or holding one connection ends only that one,
with its reason named (issue 16: fault isolation, as the Reactor hands faults to their owner).

In-process: the keeper's own Reactor, Opener and ConnectionHealth over real loopback sockets,
with one callback made to raise as a bug would.
"""

from __future__ import annotations

import logging
import socket
import time

import pytest

from fdkeeper.errors import FdkeeperError
from fdkeeper.keeper.connection import KeptConnection
from fdkeeper.keeper.health import ConnectionHealth
from fdkeeper.keeper.opening import Opener, Pending
from fdkeeper.loop import Reactor


@pytest.fixture
def reactor():
    loop = Reactor()
    yield loop
    loop.close()


@pytest.fixture
def listener():
    server = socket.create_server(("127.0.0.1", 0))
    yield server
    server.close()


def run_until(reactor: Reactor, done, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        reactor.run_once(max_wait=0.05)


def test_a_fault_keeping_an_opened_connection_fails_that_open_only(reactor, listener, caplog):
    opener = Opener(reactor, timeout=3)
    key = (listener.getsockname()[:2], "tcp", None, None)
    outcome: list[FdkeeperError | None] = []

    def keep(sock: socket.socket, _early: bytes, _websocket: object) -> None:
        raise RuntimeError("a bug keeping it")

    with pytest.raises(Pending) as pending:
        opener.open(key, None, None, keep)
    pending.value.then(outcome.append)
    with caplog.at_level(logging.ERROR, logger="fdkeeper.loop"):
        run_until(reactor, lambda: outcome)
    [error] = outcome
    assert error.code == "internal" and "RuntimeError" in str(error) and "\n" not in str(error)
    assert "a bug keeping it" in caplog.text  # the traceback is logged once, by the Reactor
    assert reactor.internal_errors == 1 and key not in opener.in_progress
    with pytest.raises(Pending):  # asked again: a fresh open, not a stuck one
        opener.open(key, None, None, lambda sock, early, websocket: None)


def watched_connection(reactor, listener) -> tuple[ConnectionHealth, KeptConnection, socket.socket]:
    """A kept TCP connection to ``listener``, watched by a ConnectionHealth; and the SuT's end."""
    health = ConnectionHealth(reactor, keepalive=None)
    sock = socket.create_connection(listener.getsockname()[:2])
    peer, _ = listener.accept()
    connection = KeptConnection(
        id=1, sock=sock, transport="tcp", remote=peer.getsockname()[:2], local=sock.getsockname()[:2]
    )
    health.watch(connection)
    return health, connection, peer


def test_a_fault_in_a_connections_handler_closes_it_with_the_reason_named(reactor, listener, monkeypatch):
    _health, connection, peer = watched_connection(reactor, listener)

    def broken(_connection: KeptConnection) -> bool:
        raise RuntimeError("a bug")

    monkeypatch.setattr(KeptConnection, "holds_whole_message", broken)  # what a FIN makes the TCP transport ask
    peer.shutdown(socket.SHUT_WR)
    run_until(reactor, lambda: connection.sock is None)
    assert connection.closed_reason == "internal error in the keeper (RuntimeError); see its log"
    assert reactor.internal_errors == 1
    peer.close()


def test_a_fault_ending_a_lease_closes_that_holders_connections(reactor, listener):
    import subprocess
    import sys

    from fdkeeper.keeper.leases import Leases

    health, connection, peer = watched_connection(reactor, listener)
    released: list[bool] = []
    leases = Leases(reactor, {1: connection}, health, on_release=lambda: released.append(True))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        leases.grant(connection, holder.pid)

        def broken(_connection: KeptConnection) -> None:
            raise RuntimeError("a bug")

        health.end_of_lease = broken  # what a holder's exit makes the lease's end call
        holder.kill()
        holder.wait()
        run_until(reactor, lambda: connection.sock is None)
        assert connection.closed_reason == "internal error in the keeper (RuntimeError); see its log"
        assert leases.holders == {} and released and reactor.internal_errors == 1
    finally:
        holder.kill()
        peer.close()
