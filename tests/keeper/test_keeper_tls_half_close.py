"""Half-close over TLS behaves as over TCP (issue 16, item 4).

After the SuT's clean end (TLS close_notify, or a FIN alone) on an idle TLS link, the next run
reads the requests queued before it, then end of file, and what the run writes still reaches
the SuT while the SuT's side accepts it, as a half-closed TCP socket delivers it. A reset still
reads as ECONNRESET (test_keeper_datapath.py).
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys

import pytest

from fdkeeper.client import ensure_keeper
from fdkeeper.testbed import wait_until
from tests.support.fake_sut import FakeSut, send_close_notify
from tests.support.keeper import lease, open_connection, read_to_the_end

INVITE = (
    b"INVITE sip:alice@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TLS 127.0.0.1:5061;branch=z9hG4bK-half\r\n"
    b"From: <sip:bob@sut>;tag=b1\r\nTo: <sip:alice@sut>\r\nCall-ID: half-close\r\nCSeq: 1 INVITE\r\n"
    b"Content-Length: 0\r\n\r\n"
)
RINGING = (
    b"SIP/2.0 180 Ringing\r\nVia: SIP/2.0/TLS 127.0.0.1:5061;branch=z9hG4bK-half\r\n"
    b"From: <sip:bob@sut>;tag=b1\r\nTo: <sip:alice@sut>;tag=a1\r\nCall-ID: half-close\r\nCSeq: 1 INVITE\r\n"
    b"Content-Length: 0\r\n\r\n"
)


def end_cleanly(peer: ssl.SSLSocket, how: str) -> None:
    """The SuT ends its sending side and goes on reading."""
    if how == "close_notify":
        send_close_notify(peer)
    else:  # a FIN alone, no close_notify
        with socket.socket(fileno=os.dup(peer.fileno())) as raw:
            raw.shutdown(socket.SHUT_WR)


def read_message(peer: ssl.SSLSocket, length: int) -> bytes:
    peer.settimeout(3)
    data = b""
    while len(data) < length:
        chunk = peer.recv(length - len(data))
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture(params=["pump", "python"])
def keeper(request, tmp_path, monkeypatch):
    if request.param == "python":
        monkeypatch.setenv("FDKEEPER_TLS_PUMP", "0")
    client = ensure_keeper(tmp_path / "state")
    yield client
    client.stop()


@pytest.mark.parametrize("how", ["close_notify", "fin"])
def test_the_answer_to_a_request_queued_before_the_sut_ended_reaches_it(keeper, pki, how):
    sut = FakeSut(pki)
    try:
        open_connection(keeper, sut, "tls", pki)
        peer = sut.connection()
        peer.sendall(INVITE)
        end_cleanly(peer, how)
        wait_until(lambda: keeper.status()["connections"][0]["ending"], what="the SuT's end seen")
        with lease(keeper, sut, "tls") as run:
            assert read_to_the_end(run) == (INVITE, "eof")
            run.sendall(RINGING)
            assert read_message(peer, len(RINGING)) == RINGING
        assert keeper.status()["connections"][0]["ending"].startswith("the SuT closed it")
    finally:
        sut.close()


@pytest.mark.parametrize("how", ["close_notify", "fin"])
def test_a_run_holding_the_link_answers_after_the_sut_ended(keeper, pki, how):
    sut = FakeSut(pki)
    try:
        open_connection(keeper, sut, "tls", pki)
        peer = sut.connection()
        with lease(keeper, sut, "tls") as run:
            trying = RINGING.replace(b"180 Ringing", b"100 Trying")
            run.sendall(trying)  # the pump, where there is one, holds the link from here
            assert read_message(peer, len(trying)) == trying
            peer.sendall(INVITE)
            end_cleanly(peer, how)
            assert read_to_the_end(run) == (INVITE, "eof")
            run.sendall(RINGING)
            assert read_message(peer, len(RINGING)) == RINGING
    finally:
        sut.close()


RUN = """
import os, sys
from pathlib import Path
from fdkeeper.client import KeeperClient
[(_, fd)] = KeeperClient(Path(sys.argv[1])).lease(
    role="client", transport="tls", remote=(sys.argv[2], int(sys.argv[3])), local="-")
data = b""
while chunk := os.read(fd, 65536):
    data += chunk
assert data.startswith(b"INVITE "), data
os.write(fd, bytes.fromhex(sys.argv[4]))
"""


def test_the_link_closes_once_the_run_that_answered_has_ended(keeper, pki):
    sut = FakeSut(pki)
    try:
        open_connection(keeper, sut, "tls", pki)
        peer = sut.connection()
        peer.sendall(INVITE)
        end_cleanly(peer, "close_notify")
        wait_until(lambda: keeper.status()["connections"][0]["ending"], what="the SuT's end seen")
        command = [sys.executable, "-c", RUN, str(keeper.directory), *map(str, sut.address), RINGING.hex()]
        assert subprocess.run(command, timeout=30).returncode == 0
        assert read_message(peer, len(RINGING)) == RINGING
        wait_until(lambda: keeper.status()["connections"][0]["state"] == "closed", what="closed after the run")
        assert keeper.status()["connections"][0]["closed_reason"] == "the SuT closed it: TLS close_notify"
    finally:
        sut.close()


def test_the_keeper_ends_its_side_with_close_notify(keeper, pki):
    sut = FakeSut(pki, strict_eof=True)
    sut.context.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)  # a FIN alone raises SSLEOFError
    try:
        open_connection(keeper, sut, "tls", pki)
        peer = sut.connection()
        send_close_notify(peer)
        wait_until(lambda: keeper.status()["connections"][0]["state"] == "closed", what="closed, nothing to deliver")
        peer.settimeout(3)
        assert peer.recv(100) == b""  # the keeper's close_notify: a clean end, not a truncation
    finally:
        sut.close()
