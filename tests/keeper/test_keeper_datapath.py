"""The keeper's data path against a fake SuT scripted in the test (issue 10, items 3, 7, 8).

Bounded memory towards a SuT that stops reading, a keeper that never blocks on a connect, a
handshake or a pong, and complete requests that outlive the SuT's FIN, close_notify, RST or a
bad record. The SuT here is a plain socket server standing in for the SuT's socket layer, to
drive byte-exact faults; SIP behaviour with sipp and Kamailio is in the e2e tests.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import struct
import threading
import time

import psutil
import pytest

from fdkeeper.client import KeeperClient, ensure_keeper
from fdkeeper.testbed import wait_until
from fdkeeper.testbed.pki import make_test_pki


def sip(call_id: str, body: bytes = b"") -> bytes:
    return f"MESSAGE sip:a@b SIP/2.0\r\nCall-ID: {call_id}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_test_pki(tmp_path_factory.mktemp("pki"))


class FakeSut:
    """A loopback server that accepts connections and does only what the test tells it to.

    With ``pki`` it speaks TLS (server side); ``tls_handshake=False`` accepts TCP and never
    speaks at all. Accepted connections are in ``accepted`` (TLS-wrapped when TLS is on).
    """

    def __init__(self, pki=None, *, handshake: bool = True, pong: bool = False, strict_eof: bool = False) -> None:
        self.pong = pong
        self.strict_eof = strict_eof  # TLS: an end without close_notify raises SSLEOFError, not b""
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self.context = None
        if pki is not None and handshake:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(pki.server_cert, pki.server_key)
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            if self.context is not None:
                try:
                    raw = self.context.wrap_socket(raw, server_side=True, suppress_ragged_eofs=not self.strict_eof)
                    # The keeper pings right after the handshake (tls.past_our_finished): pong.
                    raw.settimeout(5)
                    if raw.recv(4) == b"\r\n\r\n":
                        raw.sendall(b"\r\n")
                    raw.settimeout(None)
                except (ssl.SSLError, OSError):
                    raw.close()
                    continue
            self.accepted.append(raw)
            if self.pong:
                threading.Thread(target=self._answer_pings, args=(raw,), daemon=True).start()

    @staticmethod
    def _answer_pings(sock: socket.socket) -> None:
        """Answer each RFC 5626 ping with a pong, as Kamailio does."""
        while True:
            try:
                data = sock.recv(4096)
            except OSError:
                return
            if not data:
                return
            for _ in range(data.count(b"\r\n\r\n")):
                sock.sendall(b"\r\n")

    def connection(self) -> socket.socket:
        return wait_until(lambda: self.accepted and self.accepted[-1], what="the keeper's connection")

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self._thread.join(5)
        for sock in self.accepted:
            try:
                sock.close()
            except OSError:
                pass


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets an RST instead of a FIN."""
    raw = sock if not isinstance(sock, ssl.SSLSocket) else socket.socket(fileno=os.dup(sock.fileno()))
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if raw is not sock:
        raw.close()
    sock.close()


def tls_fields(pki) -> dict:
    return {"tls_ca": str(pki.ca_cert)}


def open_connection(keeper: KeeperClient, sut: FakeSut, transport: str, pki) -> None:
    extra = tls_fields(pki) if transport == "tls" else {}
    keeper.prepare(role="client", transport=transport, remote=sut.address, local="-", **extra)


def lease(keeper: KeeperClient, sut: FakeSut, transport: str) -> socket.socket:
    [(_, fd)] = keeper.lease(role="client", transport=transport, remote=sut.address, local="-")
    leased = socket.socket(fileno=fd)
    leased.settimeout(3)
    return leased


def keeper_rss(keeper: KeeperClient) -> int:
    return psutil.Process(keeper.status()["keeper"]["pid"]).memory_info().rss


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


def end_connection(peer: socket.socket, how: str) -> None:
    if how == "fin":
        if isinstance(peer, ssl.SSLSocket):  # no close_notify: the socket underneath ends
            socket.socket(fileno=os.dup(peer.fileno())).shutdown(socket.SHUT_RDWR)
        else:
            peer.shutdown(socket.SHUT_WR)
    elif how == "close_notify":
        send_close_notify(peer)
    elif how == "rst":
        reset(peer)
    elif how == "bad record":  # an application-data record whose MAC cannot check out
        with socket.socket(fileno=os.dup(peer.fileno())) as raw:
            raw.sendall(bytes([0x17, 0x03, 0x03, 0x00, 0x20]) + b"x" * 0x20)


def send_close_notify(peer: ssl.SSLSocket) -> None:
    """End the SuT's sending side with close_notify and go on reading, as a SuT does that closes
    (Kamailio does not wait for the keeper's close_notify: the keeper sends one only when it is
    done sending too, as over a half-closed TCP connection)."""
    timeout = peer.gettimeout()
    peer.settimeout(0.3)
    try:
        peer.unwrap()  # sends close_notify, then waits for the keeper's, which does not come yet
    except (TimeoutError, ssl.SSLError):
        pass
    peer.settimeout(timeout)


def read_to_the_end(leased: socket.socket) -> tuple[bytes, str]:
    """Everything the run reads, and how the stream ended: "eof" or the errno name."""
    data = b""
    while True:
        try:
            chunk = leased.recv(65536)
        except OSError as error:
            return data, errno.errorcode.get(error.errno, str(error))
        if not chunk:
            return data, "eof"
        data += chunk


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
