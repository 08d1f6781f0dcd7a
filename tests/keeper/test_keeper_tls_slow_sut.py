"""A TLS link to a SuT that reads slowly while runs lease it back to back (issue 16, item 1).

The SuT reads at about 80 kB/s, so at the end of a run the keeper holds a TLS write that has
not gone out yet. The next run takes the link at once and writes more. Every message of both
runs must reach the SuT whole and in order, with the C pump and with the Python relay alone:
the link's SSL writes are never handed between the two while one is still pending.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import threading
import time

import psutil
import pytest

from fdkeeper.client import KeeperClient, ensure_keeper
from fdkeeper.modes.ptrace.raw import pidfd_getfd
from fdkeeper.sip.framing import SipFramer
from fdkeeper.testbed import bind_fresh_port, wait_until
from tests.support.keeper import lease, open_connection

READ_RATE = 80_000  # bytes a second the SuT reads
BODY = b"b" * 2000


def sip(call_id: str) -> bytes:
    return (
        f"MESSAGE sip:sut@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TLS 127.0.0.1:5061;branch=z9hG4bK-{call_id}\r\n"
        f"Call-ID: {call_id}\r\nCSeq: 1 MESSAGE\r\nContent-Length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY


class SlowSut:
    """A TLS SuT on loopback that accepts one connection and reads it at READ_RATE, framing what it reads."""

    def __init__(self, pki) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(pki.server_cert, pki.server_key)
        # A small receive buffer and segment size: the keeper's send buffer on loopback grows with
        # the segment size (to 4 MB with loopback's 64 kB), and the SuT's slowness is to reach the
        # keeper's TLS writes within a few hundred kB, as it does over a real network.
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        self.listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
        bind_fresh_port(self.listener)
        self.listener.listen()
        self.address = self.listener.getsockname()[:2]
        self.call_ids: list[str] = []
        self.ended = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        raw, _ = self.listener.accept()
        tls = self.context.wrap_socket(raw, server_side=True)
        tls.settimeout(0.2)
        framer, started, taken = SipFramer(), time.monotonic(), 0
        while not self._stop.is_set():
            ahead = taken / READ_RATE - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
            try:
                data = tls.recv(4096)
            except TimeoutError:
                continue
            except (ssl.SSLError, OSError) as error:
                self.ended = f"error: {error}"
                return
            if not data:
                self.ended = "closed"
                return
            taken += len(data)
            for message in framer.feed(data):
                if message == b"\r\n\r\n":
                    continue
                self.call_ids.append(message.split(b"Call-ID: ", 1)[1].split(b"\r\n", 1)[0].decode())
            if framer.keepalives:  # the keeper's ping after its handshake: pong, as Kamailio does
                framer.keepalives = 0
                tls.sendall(b"\r\n")
        tls.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.listener.close()


def limit_send_buffer(keeper: KeeperClient, sut: SlowSut, size: int) -> None:
    """Give the keeper's TCP socket to the SuT the send buffer of a real network path.

    On loopback the kernel grows it to 4 MB (tcp_wmem), so a slow SuT would take seconds to
    push back on the keeper's TLS writes; the test sets it on the keeper's own socket (a copy
    by pidfd_getfd shares it), as a real path's bandwidth-delay product would.
    """
    pid = keeper.status()["keeper"]["pid"]
    [fd] = [c.fd for c in psutil.Process(pid).net_connections("tcp") if c.raddr and tuple(c.raddr) == sut.address]
    pidfd = os.pidfd_open(pid)
    try:
        with socket.socket(fileno=pidfd_getfd(pidfd, fd)) as shared:
            shared.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    finally:
        os.close(pidfd)


RUN_A = """
import os, sys
from pathlib import Path
from fdkeeper.client import KeeperClient
[(_, fd)] = KeeperClient(Path(sys.argv[1])).lease(
    role="client", transport="tls", remote=(sys.argv[2], int(sys.argv[3])), local="-")
data = bytes.fromhex(sys.stdin.read())
while data:
    data = data[os.write(fd, data):]
"""


@pytest.fixture(params=["pump", "python"])
def relay(request, monkeypatch):
    if request.param == "python":
        monkeypatch.setenv("FDKEEPER_TLS_PUMP", "0")
    return request.param


def test_runs_back_to_back_over_a_slow_sut_lose_nothing(tmp_path, pki, relay):
    sut = SlowSut(pki)
    keeper = ensure_keeper(tmp_path / "state")
    try:
        open_connection(keeper, sut, "tls", pki)
        limit_send_buffer(keeper, sut, 64 * 1024)
        first = [f"A-{number}" for number in range(135)]
        second = [f"B-{number}" for number in range(20)]
        command = [sys.executable, "-c", RUN_A, str(keeper.directory), *map(str, sut.address)]
        written = b"".join(sip(call_id) for call_id in first).hex()
        assert subprocess.run(command, input=written, text=True, timeout=30).returncode == 0
        # Run B takes the link while the keeper's TLS write of A's last messages is under way.
        wait_until(lambda: len(sut.call_ids) >= 45 or sut.ended, timeout=20, what="run A's messages going out")
        with lease(keeper, sut, "tls") as run_b:
            for call_id in second:
                run_b.sendall(sip(call_id))
            expected = first + second
            wait_until(
                lambda: len(sut.call_ids) >= len(expected) or sut.ended, timeout=20, what="every message at the SuT"
            )
            assert sut.call_ids == expected and not sut.ended
            [connection] = keeper.status()["connections"]
            assert connection["state"] == "leased" and connection["tls"]["dropped_bytes"] == 0
    finally:
        keeper.stop()
        sut.close()
