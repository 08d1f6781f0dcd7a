"""The keeper's data path against a fake SuT scripted in the test (issue 10, items 3, 7, 8).

Bounded memory towards a SuT that stops reading, a keeper that never blocks on a connect, a
handshake or a pong, and complete requests that outlive the SuT's FIN, close_notify, RST or a
bad record. The SuT here is a plain socket server standing in for the SuT's socket layer, to
drive byte-exact faults; SIP behaviour with sipp and Kamailio is in the e2e tests.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from fdkeeper.client import KeeperClient, ensure_keeper
from fdkeeper.testbed import wait_until
from tests.support.fake_sut import FakeSut, end_connection, reset, sip
from tests.support.keeper import keeper_rss, lease, open_connection, read_to_the_end

# ---------------------------------------------------------------- item 3: bounded memory


def test_a_sut_that_stops_reading_pushes_back_on_the_run(keeper, pki):
    sut = FakeSut(pki)
    try:
        open_connection(keeper, sut, "tls", pki)
        sut.connection()  # accepted and never read from
        before = keeper_rss(keeper)
        with lease(keeper, sut, "tls") as run:
            run.setblocking(False)
            message = sip("flood", b"x" * 4000)
            written, stalled_since, deadline = 0, None, time.monotonic() + 6
            while time.monotonic() < deadline:
                try:
                    written += run.send(message)
                    stalled_since = None
                except BlockingIOError:
                    stalled_since = stalled_since or time.monotonic()
                    if time.monotonic() - stalled_since > 1.0:
                        break  # the run is blocked: back-pressure reached it
                    time.sleep(0.01)
            grown = keeper_rss(keeper) - before
        assert stalled_since is not None, f"the run never blocked ({written} bytes written)"
        # Kernel buffers (socketpair, TCP send and receive) plus the keeper's bounded buffers.
        assert written < 24 * 1024 * 1024, written
        assert grown < 8 * 1024 * 1024, f"keeper RSS grew by {grown} bytes"
    finally:
        sut.close()


# ---------------------------------------------------------------- item 7: nothing blocks the loop


def answers_quickly(keeper: KeeperClient) -> float:
    started = time.monotonic()
    keeper.status()
    return time.monotonic() - started


def test_a_port_that_never_speaks_tls_does_not_freeze_the_keeper(tmp_path, pki):
    keeper = ensure_keeper(tmp_path / "state", connect_timeout=3)
    silent = FakeSut(pki, handshake=False)  # accepts TCP, never answers the ClientHello
    outcome: list[BaseException | None] = []

    def prepare() -> None:
        try:
            open_connection(keeper, silent, "tls", pki)
            outcome.append(None)
        except BaseException as error:
            outcome.append(error)

    try:
        waiting = threading.Thread(target=prepare)
        waiting.start()
        silent.connection()  # the keeper connected and waits for the handshake
        assert answers_quickly(keeper) < 0.1
        waiting.join(10)
        assert outcome and "did not finish in time; is it a TLS port?" in str(outcome[0])
        assert keeper.status()["connections"] == []
    finally:
        keeper.stop()
        silent.close()


def test_a_sut_that_never_pongs_delays_only_its_own_lease(tmp_path):
    keeper = ensure_keeper(tmp_path / "state", keepalive=1)
    mute, answering = FakeSut(), FakeSut(pong=True)
    try:
        open_connection(keeper, mute, "tcp", None)
        open_connection(keeper, answering, "tcp", None)
        mute.connection(), answering.connection()

        def pinged(sut: FakeSut) -> bool:
            peer = sut.connection()
            peer.settimeout(0.05)
            try:
                return peer.recv(4, socket.MSG_PEEK) == b"\r\n\r\n"
            except TimeoutError:
                return False

        wait_until(lambda: pinged(mute), what="a keep-alive ping")
        # A lease of the mute one now waits (up to 2 s) for its pong, off the loop.
        waiting = threading.Thread(target=lambda: lease(keeper, mute, "tcp").close())
        waiting.start()
        time.sleep(0.1)
        started = time.monotonic()
        lease(keeper, answering, "tcp").close()
        assert time.monotonic() - started < 0.5
        waiting.join(5)
    finally:
        keeper.stop()
        mute.close()
        answering.close()


# ---------------------------------------------------------------- item 8: nothing lost on close

REQUESTS = sip("one") + sip("two", b"body")


CLOSE_CASES = [
    ("tcp", "fin", "eof"),
    ("tcp", "rst", "ECONNRESET"),
    ("tls", "fin", "eof"),
    ("tls", "close_notify", "eof"),
    ("tls", "rst", "ECONNRESET"),
    ("tls", "bad record", "ECONNRESET"),
]


@pytest.mark.parametrize("transport, how, ending", CLOSE_CASES)
def test_requests_sent_before_the_sut_ends_reach_the_next_run(keeper, pki, transport, how, ending):
    sut = FakeSut(pki if transport == "tls" else None)
    try:
        open_connection(keeper, sut, transport, pki)
        peer = sut.connection()
        peer.sendall(REQUESTS)
        end_connection(peer, how)

        def kept() -> dict | None:
            [connection] = keeper.status()["connections"]
            return connection if connection["ending"] else None

        connection = wait_until(kept, what="the SuT's end to be seen")
        assert connection["state"] == "idle" and connection["queued_bytes"] == len(REQUESTS)
        with lease(keeper, sut, transport) as run:
            assert read_to_the_end(run) == (REQUESTS, ending)
        if transport == "tls" and ending == "eof":  # half-closed: it sends for the run till its lease ends
            assert keeper.status()["connections"][0]["state"] == "leased"  # (test_keeper_tls_half_close.py)
        else:
            wait_until(lambda: keeper.status()["connections"][0]["state"] == "closed", what="closed once delivered")
    finally:
        sut.close()


@pytest.mark.parametrize("how", ["rst", "bad record"])
def test_a_leased_tls_connection_reset_by_the_sut_reads_as_a_reset(keeper, pki, how):
    sut = FakeSut(pki)
    try:
        open_connection(keeper, sut, "tls", pki)
        peer = sut.connection()
        with lease(keeper, sut, "tls") as run:
            peer.sendall(sip("answer"))
            end_connection(peer, how)
            assert read_to_the_end(run) == (sip("answer"), "ECONNRESET")
    finally:
        sut.close()


def test_a_leased_tcp_connection_reset_by_the_sut_reads_as_a_reset(keeper):
    """Found by the stateful test: the keeper named the reason from SO_ERROR, which cleared the
    socket's pending error under the run holding it, so the run read end of file."""
    sut = FakeSut()
    try:
        open_connection(keeper, sut, "tcp", None)
        peer = sut.connection()
        with lease(keeper, sut, "tcp") as run:
            reset(peer)
            wait_until(lambda: keeper.status()["connections"][0]["state"] == "closed", what="the reset seen")
            assert read_to_the_end(run) == (b"", "ECONNRESET")
        assert keeper.status()["connections"][0]["closed_reason"] == "the SuT reset it: ECONNRESET"
    finally:
        sut.close()


# ---------------------------------------------------------------- issue 11: --answer-options

OPTIONS = (
    b"OPTIONS sip:alice@127.0.0.1:5060 SIP/2.0\r\nVia: SIP/2.0/TCP 10.0.0.1;branch=z9hG4bKping1\r\n"
    b"From: <sip:ping@sut>;tag=s1\r\nTo: <sip:alice@sut>\r\nCall-ID: ping-1\r\nCSeq: 7 OPTIONS\r\n"
    b"Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
)


def read_message(peer: socket.socket) -> bytes:
    peer.settimeout(3)
    data = b""
    while b"\r\n\r\n" not in data:
        data += peer.recv(65536)
    return data


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_answer_options_between_runs(tmp_path, pki, transport):
    keeper = ensure_keeper(tmp_path / "state", answer_options=True)
    sut = FakeSut(pki if transport == "tls" else None)
    try:
        open_connection(keeper, sut, transport, pki)
        peer = sut.connection()
        for _ in range(2):
            peer.sendall(OPTIONS)
            reply = read_message(peer)
            assert reply.startswith(b"SIP/2.0 200 OK\r\n") and b"Call-ID: ping-1\r\n" in reply
            assert b"CSeq: 7 OPTIONS\r\n" in reply and b"branch=z9hG4bKping1" in reply
            assert b";tag=" in reply.split(b"To:", 1)[1].split(b"\r\n", 1)[0]
        peer.sendall(sip("for the run"))
        wait_until(lambda: keeper.status()["connections"][0]["queued_bytes"] == len(sip("for the run")))
        [connection] = keeper.status()["connections"]
        assert connection["options_answered"] == 2
        with lease(keeper, sut, transport) as run:
            assert run.recv(65536) == sip("for the run")  # no OPTIONS queued for it
            peer.sendall(OPTIONS)  # a run holds it: the run answers, not the keeper
            assert run.recv(65536) == OPTIONS
        assert keeper.status()["connections"][0]["options_answered"] == 2
    finally:
        keeper.stop()
        sut.close()


def test_sipp_reads_an_invite_queued_before_kamailio_closed_the_connection(sipp_path, kamailio, keeper_dir, tmp_path):
    """End to end: the INVITE Kamailio relayed while no run held the connection, then its
    FIN (Kamailio closing the connection), and the next sipp run still receives the INVITE."""
    from fdkeeper import testbed
    from fdkeeper.demo import start_through_fdkeeper

    logs = tmp_path / "logs"
    users = testbed.write_users_csv(tmp_path / "users.csv", ["alice"], kamailio.domain)

    def through_fdkeeper(name, scenario, **options):
        return start_through_fdkeeper(
            sipp_path,
            scenario,
            kamailio.address,
            directory=keeper_dir,
            log_dir=logs,
            name=name,
            transport="t1",
            **options,
        )

    registered = through_fdkeeper("register", "uac-register.xml", calls=1, timeout=15, extra=["-inf", str(users)]).wait(
        30
    )
    assert registered.ok, registered.summary()
    keeper = KeeperClient(keeper_dir)
    caller = testbed.start_sipp(
        sipp_path,
        "uac-call.xml",
        kamailio.address,
        log_dir=logs,
        name="caller",
        transport="u1",
        calls=1,
        timeout=10,
        extra=["-s", "alice", "-key", "domain", kamailio.domain],
    )
    wait_until(lambda: keeper.status()["connections"][0]["queued_bytes"] > 0, timeout=10, what="the INVITE queued")
    kamailio.close_connections()
    wait_until(lambda: keeper.status()["connections"][0]["ending"], what="the FIN seen")

    answer = through_fdkeeper("answer", "uas-answer.xml", calls=1, timeout=3, local_port=testbed.free_port()).wait(20)
    caller.terminate()
    received = answer.text("messages")
    assert "INVITE sip:" in received and "Call-ID:" in received, answer.summary()
    wait_until(lambda: keeper.status()["connections"][0]["state"] == "closed", what="closed once delivered")
