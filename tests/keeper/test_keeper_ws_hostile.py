"""A real keeper against a hostile WebSocket server (fdkeeper/testbed/hostile_ws.py), ws and wss.

Per script: a bad upgrade answer is one line naming the defect (code "refused", what a run
exits 2 with) and nothing kept; bad frames end the link with the named Close code sent to the
server (1002 protocol error, 1009 message too big) after every whole message before them
reached the run; messages cut at every byte or with pings between their fragments arrive
whole; a ping flood and oversized frames leave the keeper's memory bounded. After each case
the keeper still answers PING and serves a well-behaved server. One keeper for the module, run
twice: with the C pump relaying leased links (its own WebSocket decoder) and with the Python
relay alone; each case has a server (a port) of its own.
"""

from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Iterator

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fdkeeper.client import KeeperClient, ensure_keeper
from fdkeeper.errors import FdkeeperError
from fdkeeper.sip.framing import SipFramer
from fdkeeper.testbed import wait_until
from fdkeeper.testbed.hostile_ws import BEFORE, HostileConnection, HostileWsServer, message_for
from fdkeeper.testbed.pki import TestPki
from fdkeeper.testbed.scripted_sut import call_id_of, sip_message
from fdkeeper.testbed.wsframes import fragments, server_frame
from fdkeeper.websocket import OP_TEXT

WS_PATH = "/sip-ws"
ORIGIN = "https://webrtc.fdkeeper.test"
# The keeper's RSS growth allowed while a case runs: its link holds at most about 2 x 256 kB
# each way plus a message being reassembled (keeper/tlslink.py BUFFER_LIMIT, sip MAX_MESSAGE); the
# flood offers 16 MB of pings (as many bytes of pongs), the oversized header announces 1 TB.
MEMORY_BOUND = 8 * 1024 * 1024


@pytest.fixture(scope="module", params=["pump", "python"])
def ws_keeper(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeeperClient]:
    """The module's keeper, once with the C pump relaying leased links (its WebSocket decoder in C,
    helpers/tlspump/wsframe.c) and once with the Python relay alone (fdkeeper/websocket.py)."""
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "python":
            patch.setenv("FDKEEPER_TLS_PUMP", "0")
        client = ensure_keeper(tmp_path_factory.mktemp(f"ws-hostile-{request.param}") / "state")
    client.relay = request.param  # type: ignore[attr-defined]  # what the cases expect in status
    yield client
    client.stop()


def fields(server: HostileWsServer, transport: str, pki: TestPki) -> dict[str, object]:
    extra: dict[str, object] = {"tls_ca": str(pki.ca_cert)} if transport == "wss" else {}
    return {
        "role": "client",
        "transport": transport,
        "remote": server.address,
        "local": "-",
        "ws_path": WS_PATH,
        "ws_origin": ORIGIN,
        **extra,
    }


def open_and_lease(keeper: KeeperClient, server: HostileWsServer, transport: str, pki: TestPki) -> socket.socket:
    """PREPARE the kept WebSocket connection, lease it to this process (a run), as the shim does."""
    keeper.prepare(**fields(server, transport, pki))
    [(_, fd)] = keeper.lease(**fields(server, transport, pki))
    leased = socket.socket(fileno=fd)
    leased.settimeout(5)
    return leased


def read_messages(leased: socket.socket, expected: int | None = None) -> tuple[list[str], str | None]:
    """Call-IDs of the whole messages the run reads; until ``expected`` came, or else to the
    stream's end ("eof" or the errno name). Messages are checked byte for byte against their ids."""
    framer, ids = SipFramer(), []
    while expected is None or len(ids) < expected:
        try:
            data = leased.recv(65536)
        except TimeoutError:
            return ids, "timeout"
        except OSError as error:
            return ids, errno.errorcode.get(error.errno or 0, str(error))
        if not data:
            return ids, "eof"
        for message in framer.feed(data):
            call_id = call_id_of(message)
            ids.append(call_id if message == message_for(call_id) else f"corrupt:{call_id}")
    return ids, None


class RssWatch:
    """The keeper's peak RSS growth while the block runs, sampled every 20 ms."""

    def __init__(self, keeper: KeeperClient) -> None:
        self.process = psutil.Process(keeper.status()["keeper"]["pid"])
        self.start = self.peak = self.process.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(2)

    @property
    def growth(self) -> int:
        return self.peak - self.start


def assert_keeper_serves_on(keeper: KeeperClient, transport: str, pki: TestPki) -> None:
    """After a hostile case: the keeper answers PING, and a well-behaved server gets a kept link both ways."""
    assert keeper.alive() is not None
    server = HostileWsServer("good", pki if transport == "wss" else None)
    try:
        with open_and_lease(keeper, server, transport, pki) as leased:
            leased.sendall(sip_message("after-0"))
            connection = server.newest()
            wait_until(lambda: connection.frames.messages, what="the run's message at the good server")
            assert connection.frames.messages == [sip_message("after-0")]
            server.call(connection, lambda: connection.write(server_frame(OP_TEXT, message_for("answer-0"))))
            assert read_messages(leased, 1) == (["answer-0"], None)
    finally:
        server.close()
    assert not server.failures, server.failures


def assert_client_rules_kept(connection: HostileConnection) -> None:
    """What the keeper sent was a correct RFC 6455 client's: the upgrade request, masked frames."""
    assert connection.request_defects == [], connection.request
    assert connection.path == WS_PATH and connection.header("Origin") == ORIGIN
    assert connection.frames.defects == []


# --------------------------------------------------------------------------- handshakes

REFUSALS = {  # script -> what the one line names
    "bad_accept": "Sec-WebSocket-Accept",
    "wrong_subprotocol": "Sec-WebSocket-Protocol",
    "no_subprotocol": "Sec-WebSocket-Protocol",
    "refused_403": "403 Forbidden",
}


@pytest.mark.parametrize(
    "script, transport", [(script, "ws") for script in REFUSALS] + [("bad_accept", "wss"), ("refused_403", "wss")]
)
def test_a_bad_upgrade_answer_is_one_line_and_nothing_kept(ws_keeper, pki, script, transport):
    server = HostileWsServer(script, pki if transport == "wss" else None)
    try:
        with pytest.raises(FdkeeperError) as refused:
            ws_keeper.prepare(**fields(server, transport, pki))
        text = str(refused.value)
        assert refused.value.code == "refused", text
        assert "\n" not in text and text.startswith("fdkeeper: ") and REFUSALS[script] in text, text
        assert f"127.0.0.1:{server.address[1]}" in text, text
        assert_client_rules_kept(server.newest())
        assert ws_keeper.status(remote=f"127.0.0.1:{server.address[1]}")["connections"] == []
    finally:
        server.close()
    assert_keeper_serves_on(ws_keeper, transport, pki)


def test_a_lease_of_a_refused_upgrade_is_the_same_line(ws_keeper, pki):
    server = HostileWsServer("refused_403")
    try:
        with pytest.raises(FdkeeperError) as refused:
            ws_keeper.lease(**fields(server, "ws", pki))
        assert refused.value.code == "refused" and "403 Forbidden" in str(refused.value), refused.value
    finally:
        server.close()


# --------------------------------------------------------------------------- bad frames

DEFECTS = {  # script -> (the Close code the server gets, words of the keeper's reason)
    "masked_frames": (1002, "masked frame"),
    "oversized_header": (1009, "at most"),
    "too_big_in_fragments": (1009, "at most"),
    "reserved_bits": (1002, "reserved bits"),
    "garbage": (1002, "reserved bits"),
}


@pytest.mark.parametrize(
    "script, transport",
    [(script, "ws") for script in DEFECTS] + [("masked_frames", "wss"), ("oversized_header", "wss")],
)
def test_bad_frames_end_the_link_with_a_named_close_after_the_whole_messages(ws_keeper, pki, script, transport):
    code, reason = DEFECTS[script]
    server = HostileWsServer(script, pki if transport == "wss" else None)
    try:
        with RssWatch(ws_keeper) as rss, open_and_lease(ws_keeper, server, transport, pki) as leased:
            leased.sendall(sip_message("go-0"))  # the server plays its script once a request came
            ids, end = read_messages(leased)
        assert ids == list(BEFORE) and end in ("eof", "ECONNRESET"), (ids, end)
        connection = server.newest()
        wait_until(lambda: connection.frames.close_code is not None, what=f"the keeper's Close to {script}")
        assert connection.frames.close_code == code, connection.frames.close_reason
        assert connection.frames.messages == [sip_message("go-0")]
        assert_client_rules_kept(connection)
        log = ws_keeper.directory / "keeper.log"
        wait_until(lambda: reason in log.read_text(), what=f"the keeper's log naming the defect ({reason!r})")
        assert "Traceback" not in log.read_text()
        assert rss.growth < MEMORY_BOUND, rss.growth
        print(f"{script} over {transport}: keeper RSS +{rss.growth} bytes")
    finally:
        server.close()
    assert not server.failures, server.failures
    assert_keeper_serves_on(ws_keeper, transport, pki)


def test_a_close_in_the_middle_of_a_message_is_answered_and_the_whole_ones_delivered(ws_keeper, pki):
    server = HostileWsServer("close_mid_message")
    try:
        with open_and_lease(ws_keeper, server, "ws", pki) as leased:
            leased.sendall(sip_message("go-0"))
            ids, end = read_messages(leased)
        assert ids == list(BEFORE) and end == "eof", (ids, end)
        connection = server.newest()
        wait_until(lambda: connection.frames.close_code is not None, what="the keeper's Close reply")
        assert connection.frames.close_code in (1000, 1001), connection.frames.close_code
        assert_client_rules_kept(connection)
    finally:
        server.close()
    assert_keeper_serves_on(ws_keeper, "ws", pki)


# --------------------------------------------------------------------------- legal but awkward


@pytest.mark.parametrize("transport", ["ws", "wss"])
def test_messages_cut_at_every_byte_arrive_whole(ws_keeper, pki, transport):
    server = HostileWsServer("every_byte", pki if transport == "wss" else None)
    try:
        with open_and_lease(ws_keeper, server, transport, pki) as leased:
            leased.sendall(sip_message("go-0"))
            assert read_messages(leased, 2) == (["split-1-0", "split-2-700"], None)
            [kept] = ws_keeper.status(remote=f"127.0.0.1:{server.address[1]}")["connections"]
            assert kept["websocket"]["relay"] == ws_keeper.relay, kept
            connection = server.newest()
            assert connection.frames.close_code is None and not connection.ended
            assert_client_rules_kept(connection)
    finally:
        server.close()
    assert not server.failures, server.failures


def test_pings_between_fragments_are_answered_in_order_and_the_messages_arrive_whole(ws_keeper, pki):
    server = HostileWsServer("interleaved_pings")
    try:
        with open_and_lease(ws_keeper, server, "ws", pki) as leased:
            leased.sendall(sip_message("go-0"))
            assert read_messages(leased, 2) == (["pinged-1-0", "pinged-2-500"], None)
            connection = server.newest()
            expected = [b"p0-a", b"p0-b", b"p1-a", b"p1-b"]
            wait_until(lambda: len(connection.frames.pongs) >= 4, what="a pong for each ping")
            assert connection.frames.pongs == expected
            assert_client_rules_kept(connection)
    finally:
        server.close()


def test_a_message_in_the_same_write_as_the_upgrade_answer_is_kept_for_the_run(ws_keeper, pki):
    server = HostileWsServer("early_message")
    try:
        with open_and_lease(ws_keeper, server, "ws", pki) as leased:
            assert read_messages(leased, 1) == (["early-1-0"], None)
    finally:
        server.close()


def test_a_ping_flood_leaves_memory_bounded_and_the_link_alive(ws_keeper, pki):
    server = HostileWsServer("ping_flood")
    try:
        with RssWatch(ws_keeper) as rss, open_and_lease(ws_keeper, server, "ws", pki) as leased:
            leased.sendall(sip_message("go-0"))
            assert read_messages(leased, 2) == (list(BEFORE), None)
            connection = server.newest()
            wait_until(lambda: connection.flood_done, timeout=15, what="the end of the ping flood")
            assert ws_keeper.alive() is not None  # answered while flooded
            leased.settimeout(15)
            assert read_messages(leased, 1) == (["after-flood-0"], None)
        print(f"ping flood: {connection.flood_bytes} bytes of pings taken, keeper RSS +{rss.growth} bytes")
        assert connection.flood_bytes >= 64 * 1024, connection.flood_bytes  # a flood, whatever the keeper took of it
        assert rss.growth < MEMORY_BOUND, rss.growth
        assert len(connection.frames.pongs) <= connection.flood_bytes // 127 + 1
        assert connection.frames.close_code is None and connection.frames.defects == []
    finally:
        server.close()
    assert not server.failures, server.failures
    assert_keeper_serves_on(ws_keeper, "ws", pki)


# --------------------------------------------------------------------------- property: any cut, any fragments


@pytest.fixture(scope="module")
def good_link(
    ws_keeper: KeeperClient, pki: TestPki
) -> Iterator[tuple[HostileWsServer, HostileConnection, socket.socket]]:
    server = HostileWsServer("good")
    leased = open_and_lease(ws_keeper, server, "ws", pki)
    try:
        yield server, server.newest(), leased
    finally:
        leased.close()
        server.close()


@settings(max_examples=40, deadline=None)
@given(
    body=st.integers(min_value=0, max_value=3000),
    count=st.integers(min_value=1, max_value=6),
    cuts=st.lists(st.integers(min_value=1, max_value=4000), max_size=12),
)
def test_any_fragmentation_and_any_cut_of_the_stream_delivers_the_message_whole(good_link, body, count, cuts):
    server, connection, leased = good_link
    call_id = f"prop-{body}"
    stream = b"".join(fragments(message_for(call_id), count))
    points = sorted({cut for cut in cuts if cut < len(stream)})
    chunks = [stream[start:end] for start, end in zip([0, *points], [*points, len(stream)], strict=True)]
    server.call(connection, lambda: connection.write(*chunks))
    assert read_messages(leased, 1) == ([call_id], None)


def test_every_module_server_thread_kept_well(good_link):
    server, connection, _ = good_link
    assert not server.failures and not connection.ended, (server.failures, connection.ended)
