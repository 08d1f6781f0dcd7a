"""The keeper's TLS link against a Python TLS peer: verification, errors, message integrity.

The peer here is a plain TLS server standing in for the SuT's socket layer, to drive
byte-exact cases (half-written messages, half-read messages, pongs); SIP behaviour with
Debian's sipp and a real Kamailio over TLS is in test_e2e_tls.py.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading

import pytest

from fdkeeper.client import KeeperClient, ensure_keeper
from fdkeeper.errors import FdkeeperError
from fdkeeper.testbed import wait_until
from tests.support.fake_sut import sip


class TlsPeer:
    """A TLS server on loopback that accepts one connection and records what it reads."""

    def __init__(self, pki, *, cert=None, key=None, require_client_cert=False) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert or pki.server_cert, key or pki.server_key)
        if require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(pki.ca_cert)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self.context = context
        self.connection: ssl.SSLSocket | None = None
        self.received = bytearray()  # everything but keep-alive pings
        self.pings = 0
        self.accepts = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            self.accepts += 1
            self._take(raw)

    def _take(self, raw: socket.socket) -> None:
        """Serve one accepted connection (the next is accepted once it ends)."""
        try:
            connection = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()
            return
        self.connection = connection
        self._read_until_closed(connection)

    def _read_until_closed(self, connection: ssl.SSLSocket) -> None:
        while True:
            try:
                data = connection.recv(65536)
            except (ssl.SSLError, OSError):
                break
            if not data:
                break
            if data == b"\r\n\r\n":  # answer a keep-alive ping like Kamailio does
                self.pings += 1
                connection.sendall(b"\r\n")
            else:
                self.received += data
        # Only this thread touches the TLS object: OpenSSL aborts if another frees it mid-read.
        try:
            connection.unwrap()  # close_notify
        except (ssl.SSLError, OSError, ValueError):
            pass
        connection.close()

    def send(self, data: bytes) -> None:
        wait_until(lambda: self.connection is not None)
        self.connection.sendall(data)

    def close(self) -> None:
        """Wake the reader with a shutdown of the socket underneath; it closes TLS itself."""
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept(); close() would not
        except OSError:
            pass
        self.listener.close()
        if self.connection is not None and self.connection.fileno() >= 0:
            with socket.socket(fileno=os.dup(self.connection.fileno())) as alias:
                try:
                    alias.shutdown(socket.SHUT_RD)
                except OSError:
                    pass
        self._thread.join(5)


@pytest.fixture
def peer(pki):
    server = TlsPeer(pki)
    yield server
    server.close()


def prepare(keeper: KeeperClient, peer: TlsPeer, pki, **tls) -> None:
    fields = {"tls_ca": str(pki.ca_cert), **tls}
    keeper.prepare(role="client", transport="tls", remote=peer.address, local="-", **fields)


def lease_fd(keeper: KeeperClient, peer: TlsPeer) -> int:
    [(_, fd)] = keeper.lease(role="client", transport="tls", remote=peer.address, local="-")
    return fd


CHILD = """
import os, signal, sys, time
from pathlib import Path
from fdkeeper.client import KeeperClient
[(_, fd)] = KeeperClient(Path(sys.argv[1])).lease(
    role="client", transport="tls", remote=(sys.argv[2], int(sys.argv[3])), local="-")
action, argument = sys.argv[4], sys.argv[5]
if action == "write":
    os.write(fd, bytes.fromhex(argument))
    time.sleep(0.2)  # let the keeper read it before the SIGKILL
else:
    os.read(fd, int(argument))
os.kill(os.getpid(), signal.SIGKILL)
"""


def in_child(keeper: KeeperClient, peer: TlsPeer, action: str, argument: str) -> int:
    """A run (a separate process: no fork beside the peer's threads) that leases, acts, dies by SIGKILL."""
    command = [sys.executable, "-c", CHILD, str(keeper.directory), *map(str, peer.address), action, argument]
    return subprocess.run(command, timeout=30).returncode


def test_verified_connection_and_status(keeper, peer, pki):
    prepare(keeper, peer, pki, tls_sni=pki.server_name)
    [connection] = keeper.status()["connections"]
    tls = connection["tls"]
    assert connection["transport"] == "tls" and connection["state"] == "idle"
    assert tls["version"] in ("TLSv1.2", "TLSv1.3") and tls["cipher"]
    assert "CN=sut.test" in tls["peer_subject"] and tls["sni"] == "sut.test"


def test_address_is_verified_without_sni(keeper, peer, pki):
    prepare(keeper, peer, pki)  # the server cert has IP:127.0.0.1
    assert keeper.status()["connections"][0]["tls"]["sni"] is None


@pytest.mark.parametrize(
    "case, expected",
    [
        ("wrong ca", "certificate verification: unable to get local issuer certificate"),
        ("wrong name", "certificate verification: Hostname mismatch, certificate is not valid for 'sut.test';"),
        ("expired", "certificate verification: certificate has expired"),
        ("client cert required", "pass --tls-cert and --tls-key"),
    ],
)
def test_handshake_failures_are_one_clear_line(keeper, pki, case, expected):
    server = {
        "wrong ca": lambda: TlsPeer(pki),
        "wrong name": lambda: TlsPeer(pki, cert=pki.wrong_name_server_cert, key=pki.wrong_name_server_key),
        "expired": lambda: TlsPeer(pki, cert=pki.expired_server_cert, key=pki.expired_server_key),
        "client cert required": lambda: TlsPeer(pki, require_client_cert=True),
    }[case]()
    ca = pki.other_ca_cert if case == "wrong ca" else pki.ca_cert
    sni = pki.server_name
    try:
        with pytest.raises(FdkeeperError) as failure:
            prepare(keeper, server, pki, tls_ca=str(ca), tls_sni=sni)
        text = str(failure.value)
        assert text.startswith(f"fdkeeper: TLS handshake with the SuT at 127.0.0.1:{server.address[1]}/tls failed")
        assert expected in text, text
        assert "\n" not in text
        assert keeper.status()["connections"] == []  # nothing half-open
    finally:
        server.close()


def test_mutual_tls_with_a_client_certificate(keeper, pki):
    server = TlsPeer(pki, require_client_cert=True)
    try:
        prepare(keeper, server, pki, tls_cert=str(pki.client_cert), tls_key=str(pki.client_key))
        fd = lease_fd(keeper, server)
        os.write(fd, sip("mtls"))
        wait_until(lambda: bytes(server.received) == sip("mtls"))
        os.close(fd)
    finally:
        server.close()


def test_insecure_skips_verification(keeper, peer, pki):
    keeper.prepare(role="client", transport="tls", remote=peer.address, local="-", tls_insecure=True)
    assert keeper.status()["connections"][0]["tls"]["verified"] is False


def test_a_run_dying_mid_write_never_sends_half_a_message(keeper, peer, pki):
    prepare(keeper, peer, pki)
    whole, half = sip("whole", b"x" * 100), sip("half", b"y" * 1000)

    assert in_child(keeper, peer, "write", (whole + half[:500]).hex()) == -signal.SIGKILL
    wait_until(lambda: keeper.status()["connections"][0]["state"] == "idle")
    fd = lease_fd(keeper, peer)
    os.write(fd, sip("next"))
    wait_until(lambda: bytes(peer.received).endswith(sip("next")))
    assert bytes(peer.received) == whole + sip("next")
    assert keeper.status()["connections"][0]["tls"]["dropped_bytes"] == 500
    os.close(fd)


def test_requests_between_runs_are_kept_whole_and_pongs_never_reach_a_run(keeper, peer, pki):
    prepare(keeper, peer, pki)
    peer.send(sip("one") + b"\r\n" + sip("two", b"body"))  # a stray pong between two requests
    wait_until(lambda: keeper.status()["connections"][0]["queued_bytes"] == len(sip("one") + sip("two", b"body")))
    fd = lease_fd(keeper, peer)
    with socket.socket(fileno=fd) as leased:
        leased.settimeout(2)
        assert leased.recv(65536) == sip("one") + sip("two", b"body")


def test_a_run_that_read_half_a_message_leaves_the_next_on_a_boundary(keeper, peer, pki):
    prepare(keeper, peer, pki)
    first, second = sip("first", b"a" * 200), sip("second")
    peer.send(first + second)
    wait_until(lambda: keeper.status()["connections"][0]["queued_bytes"] == len(first + second))

    assert in_child(keeper, peer, "read", "100") == -signal.SIGKILL
    wait_until(lambda: keeper.status()["connections"][0]["state"] == "idle")
    with socket.socket(fileno=lease_fd(keeper, peer)) as leased:
        leased.settimeout(2)
        assert leased.recv(65536) == second


def test_close_notify_between_runs_is_seen(keeper, peer, pki):
    prepare(keeper, peer, pki)
    wait_until(lambda: peer.connection is not None)
    peer.close()
    wait_until(lambda: keeper.status()["connections"][0]["state"] == "closed")
    with pytest.raises(FdkeeperError, match="--reconnect"):
        prepare(keeper, peer, pki)


def test_keepalive_over_tls(tmp_path, peer, pki):
    client = ensure_keeper(tmp_path / "ka", keepalive=1)
    try:
        prepare(client, peer, pki)
        # One ping right after the handshake (see tls._catch_late_alert), then one a second.
        wait_until(lambda: peer.pings >= 3 and client.status()["connections"][0]["pongs"] >= 3)
        assert client.status()["connections"][0]["queued_bytes"] == 0
    finally:
        client.stop()


class TlsSutAtItsLimit(TlsPeer):
    """A TLS SuT that takes one connection, then is at its limit: it accepts every later one and
    closes it at once, in the handshake (Kamailio past tls_max_connections does so)."""

    def _take(self, raw: socket.socket) -> None:
        if self.connection is not None:
            raw.close()
            return
        try:
            self.connection = self.context.wrap_socket(raw, server_side=True)  # kept, left unread
        except (ssl.SSLError, OSError):
            raw.close()

    def close(self) -> None:
        super().close()
        if self.connection is not None:
            self.connection.close()


@pytest.mark.parametrize("with_cert", [False, True])
def test_a_tls_sut_at_its_limit_is_named_so_and_a_run_without_a_certificate_hears_of_that_cause_too(
    keeper, pki, with_cert
):
    """Once the keeper reached the SuT, a new connection closed in its handshake is named as the
    SuT's connection limit. A SuT that wants a client certificate the run lacks closes alike, so a
    run without one is told that cause as well; a run with one is not."""
    sut = TlsSutAtItsLimit(pki)
    cert = {"tls_cert": str(pki.client_cert), "tls_key": str(pki.client_key)} if with_cert else {}
    fields = {"role": "client", "transport": "tls", "remote": sut.address, "local": "-", "tls_sni": pki.server_name}
    try:
        keeper.prepare(aor="sip:first@example.com", tls_ca=str(pki.ca_cert), **fields, **cert)
        with pytest.raises(FdkeeperError) as closed:
            keeper.prepare(aor="sip:second@example.com", tls_ca=str(pki.ca_cert), **fields, **cert)
    finally:
        sut.close()
    text = str(closed.value)
    assert "closed the new connection at once" in text and "tls_max_connections" in text, text
    assert ("--tls-cert and --tls-key" in text) is not with_cert, text
    assert "\n" not in text and closed.value.code == "refused", text
