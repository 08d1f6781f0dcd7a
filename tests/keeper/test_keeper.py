"""The keeper on its own: leases, lease end, close detection, keep-alive, abuse, limits.

These drive the real keeper process over its real control socket with plain TCP peers on
loopback (no SIP needed for what is checked here); SIP behaviour is in test_e2e_tcp.py.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fdkeeper.client import KeeperClient, ensure_keeper
from fdkeeper.errors import FdkeeperError
from fdkeeper.protocol import MAX_MESSAGE, parse_reply
from fdkeeper.statedir import socket_path
from fdkeeper.testbed import wait_until
from tests.support.keeper import keeper_process, remote_of


def lease_in_child(client: KeeperClient, remote, payload: bytes = b"", hold: float = 0.0) -> int:
    """Fork a child that leases the connection, writes payload, holds it, exits; return its pid."""
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        status = 0
        try:
            [(_, fd)] = client.lease(role="client", transport="tcp", remote=remote, local="-")
            if payload:
                os.write(fd, payload)
            time.sleep(hold)
        except BaseException as error:
            os.write(2, f"child: {error}\n".encode())
            status = 1
        os._exit(status)
    return pid


def wait_child(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def connection(client: KeeperClient, index: int = 0) -> dict:
    return client.status()["connections"][index]


def test_prepare_opens_once_and_lease_outlives_the_holder(keeper, peer):
    remote = remote_of(peer)
    keeper.prepare(role="client", transport="tcp", remote=remote, local="-")
    sut_side, _ = peer.accept()
    for word in (b"one", b"two"):
        assert wait_child(lease_in_child(keeper, remote, word)) == 0
        assert sut_side.recv(10) == word
    wait_until(lambda: connection(keeper)["state"] == "idle")
    status = connection(keeper)
    assert status["leases"] == 2 and status["holder_pid"] is None
    peer.settimeout(0.2)
    with pytest.raises(TimeoutError):
        peer.accept()  # one connection for everything


def test_sigkilled_holder_frees_the_lease_and_the_connection_stays(keeper, peer):
    remote = remote_of(peer)
    pid = lease_in_child(keeper, remote, b"x", hold=30)
    sut_side, _ = peer.accept()
    wait_until(lambda: connection(keeper)["state"] == "leased")
    with pytest.raises(FdkeeperError) as busy:
        keeper.prepare(role="client", transport="tcp", remote=remote, local="-")
    assert busy.value.code == "busy" and f"pid {pid}" in str(busy.value)
    os.kill(pid, signal.SIGKILL)
    wait_child(pid)
    wait_until(lambda: connection(keeper)["state"] == "idle")
    sut_side.settimeout(0.2)
    assert sut_side.recv(10) == b"x"  # still open: no FIN after the holder died
    with pytest.raises(TimeoutError):
        sut_side.recv(10)


def test_wait_waits_for_the_holder(keeper, peer):
    remote = remote_of(peer)
    pid = lease_in_child(keeper, remote, hold=0.5)
    _sut_side, _ = peer.accept()  # keep it: a dropped socket would close
    wait_until(lambda: connection(keeper)["state"] == "leased")
    started = time.monotonic()
    reply = keeper.prepare(role="client", transport="tcp", remote=remote, local="-", wait=10)
    assert reply.fields["ids"] == "1"
    assert 0.2 < time.monotonic() - started < 5
    wait_child(pid)


def test_wait_times_out_with_the_holder_named(keeper, peer):
    remote = remote_of(peer)
    pid = lease_in_child(keeper, remote, hold=10)
    _sut_side, _ = peer.accept()  # keep it: a dropped socket would close
    wait_until(lambda: connection(keeper)["state"] == "leased")
    with pytest.raises(FdkeeperError, match=rf"leased by pid {pid} .*waited 0.5 s"):
        keeper.prepare(role="client", transport="tcp", remote=remote, local="-", wait=0.5)
    os.kill(pid, signal.SIGKILL)
    wait_child(pid)


def test_requests_queued_between_runs_are_left_for_the_next_run(keeper, peer):
    remote = remote_of(peer)
    keeper.prepare(role="client", transport="tcp", remote=remote, local="-")
    sut_side, _ = peer.accept()
    request = b"OPTIONS sip:u@x SIP/2.0\r\nContent-Length: 0\r\n\r\n"
    sut_side.sendall(request)
    wait_until(lambda: connection(keeper)["queued_bytes"] == len(request))
    [(_, fd)] = keeper.lease(role="client", transport="tcp", remote=remote, local="-")
    with socket.socket(fileno=fd) as leased:
        assert leased.recv(1000) == request


def test_sut_closing_is_seen_and_reconnect_replaces(keeper, peer):
    remote = remote_of(peer)
    keeper.prepare(role="client", transport="tcp", remote=remote, local="-")
    sut_side, _ = peer.accept()
    sut_side.sendall(b"queued")  # unread SIP bytes must not hide the FIN
    sut_side.close()
    wait_until(lambda: connection(keeper)["state"] == "closed")
    assert "FIN" in connection(keeper)["closed_reason"]
    with pytest.raises(FdkeeperError, match=r"was closed at .*--reconnect") as closed:
        keeper.prepare(role="client", transport="tcp", remote=remote, local="-")
    assert closed.value.code == "closed"
    with pytest.raises(FdkeeperError, match="was closed"):
        keeper.prepare(role="server", transport="tcp", remote=remote)
    reply = keeper.prepare(role="client", transport="tcp", remote=remote, local="-", reconnect=True)
    assert reply.fields == {"ids": "2", "replaced": "1"}
    sut_side, _ = peer.accept()  # keep it: a dropped socket would close
    assert [c["state"] for c in keeper.status()["connections"]] == ["idle"]


def test_reconnect_refused_while_the_sut_restarts_can_be_tried_again(keeper, peer):
    remote = remote_of(peer)
    keeper.prepare(role="client", transport="tcp", remote=remote, local="-")
    sut_side, _ = peer.accept()
    sut_side.close()
    wait_until(lambda: connection(keeper)["state"] == "closed")
    peer.close()  # the SuT is down: the reconnect is refused
    for _ in range(2):  # and refused the same way again, not an internal error
        with pytest.raises(FdkeeperError) as refused:
            keeper.prepare(role="client", transport="tcp", remote=remote, local="-", reconnect=True)
        assert refused.value.code != "internal", str(refused.value)
    with socket.create_server(remote) as back:  # the SuT is back on the same port
        reply = keeper.prepare(role="client", transport="tcp", remote=remote, local="-", reconnect=True)
        assert reply.fields["replaced"] == "1"
        sut_side, _ = back.accept()  # keep it: a dropped socket would close
        assert [c["state"] for c in keeper.status()["connections"]] == ["idle"]


def test_reset_is_seen(keeper, peer):
    remote = remote_of(peer)
    keeper.prepare(role="client", transport="tcp", remote=remote, local="-")
    sut_side, _ = peer.accept()
    sut_side.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sut_side.close()  # linger 0: RST
    wait_until(lambda: connection(keeper)["state"] == "closed")
    assert "reset" in connection(keeper)["closed_reason"]


def test_server_lease_hands_every_kept_connection(keeper):
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]
    for listener in listeners:
        keeper.prepare(role="client", transport="tcp", remote=remote_of(listener), local="-")
    leased = keeper.lease(role="server", transport="tcp")
    assert sorted(i for i, _ in leased) == [1, 2, 3]
    only = keeper.lease(role="server", transport="tcp", remote=remote_of(listeners[1]))
    assert [i for i, _ in only] == [2]
    for _, fd in leased + only:
        os.close(fd)
    for listener in listeners:
        listener.close()


def test_a_large_server_lease_is_cut_into_packets_that_fit():
    from fdkeeper.keeper.connection import KeptConnection
    from fdkeeper.keeper.server import _fds_batches
    from fdkeeper.protocol import MAX_FDS_PER_PACKET, format_message

    connections = [
        KeptConnection(id=i, sock=None, transport="tcp", remote=("2001:db8::1", 5061), local=("2001:db8::2", 40000 + i))
        for i in range(1000, 1600)
    ]
    batches = _fds_batches(connections)
    assert [c for batch in batches for c in batch] == connections
    for batch in batches:
        assert len(batch) <= MAX_FDS_PER_PACKET
        format_message(  # raises if over MAX_MESSAGE
            "FDS",
            ids=",".join(str(c.id) for c in batch),
            peers=",".join("[2001:db8::1]:5061" for _ in batch),
            locals=",".join(f"[2001:db8::2]:{c.local[1]}" for c in batch),
        )


def test_local_address_is_bound_as_asked(keeper, peer):
    with socket.socket() as probe:  # find a free port to ask for
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    keeper.prepare(role="client", transport="tcp", remote=remote_of(peer), local=f"127.0.0.1:{port}")
    _, source = peer.accept()
    assert source == ("127.0.0.1", port)


def test_refused_and_unanswered_connects_are_one_clear_line(tmp_path, keeper):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    with pytest.raises(FdkeeperError, match=rf"SuT at 127.0.0.1:{closed_port}/tcp refused") as refused:
        keeper.prepare(role="client", transport="tcp", remote=("127.0.0.1", closed_port), local="-")
    assert refused.value.code == "refused"
    slow = ensure_keeper(tmp_path / "slow", connect_timeout=0.3)
    try:
        # A listener whose backlog is full never completes the handshake: a silent SuT.
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(0)
            fillers = [socket.socket() for _ in range(3)]
            for filler in fillers:
                filler.setblocking(False)
                filler.connect_ex(silent.getsockname())
            with pytest.raises(FdkeeperError, match=r"did not answer within 0.3 s") as timeout:
                slow.prepare(role="client", transport="tcp", remote=silent.getsockname(), local="-")
            assert timeout.value.code == "timeout"
            for filler in fillers:
                filler.close()
    finally:
        slow.stop()
    assert keeper.alive()  # and the first keeper never noticed


def test_keepalive_pings_and_consumes_the_pong(tmp_path, peer):
    client = ensure_keeper(tmp_path / "ka", keepalive=1)
    try:
        remote = remote_of(peer)
        client.prepare(role="client", transport="tcp", remote=remote, local="-")
        sut_side, _ = peer.accept()
        sut_side.settimeout(5)
        assert sut_side.recv(4) == b"\r\n\r\n"
        sut_side.sendall(b"\r\n")
        wait_until(lambda: connection(client)["pongs"] == 1)
        assert connection(client)["queued_bytes"] == 0  # the pong never reaches a run
    finally:
        client.stop()


def test_stop_closes_connections_and_removes_the_socket(tmp_path, peer):
    client = ensure_keeper(tmp_path / "s")
    client.prepare(role="client", transport="tcp", remote=remote_of(peer), local="-")
    sut_side, _ = peer.accept()
    assert client.stop()
    sut_side.settimeout(5)
    assert sut_side.recv(10) == b""  # FIN
    assert not socket_path(tmp_path / "s").exists()
    assert not client.stop()


def test_a_stale_socket_of_a_dead_keeper_is_replaced(tmp_path):
    directory = tmp_path / "stale"
    first = ensure_keeper(directory)
    os.kill(int(first.alive().fields["pid"]), signal.SIGKILL)
    time.sleep(0.1)
    assert socket_path(directory).exists()  # left behind by the SIGKILL
    second = ensure_keeper(directory)
    try:
        assert second.alive()
    finally:
        second.stop()


def test_a_second_keeper_for_the_same_directory_refuses(keeper):
    result = subprocess.run(
        [sys.executable, "-m", "fdkeeper", "keeper", "--dir", str(keeper.directory)],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert result.returncode == 2
    assert "a keeper already runs for" in result.stderr and "fdkeeper stop" in result.stderr


def test_unwritable_directory_is_one_clear_line(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(FdkeeperError, match=r"cannot create the state directory .* pass --dir"):
        ensure_keeper(blocked / "state")


def test_state_directory_is_private(keeper):
    assert keeper.directory.stat().st_mode & 0o777 == 0o700
    assert socket_path(keeper.directory).stat().st_mode & 0o777 == 0o600


def raw_exchange(client: KeeperClient, payload: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(5)
        sock.connect(str(client.path))
        sock.send(payload)
        return sock.recv(MAX_MESSAGE + 100)


@pytest.mark.parametrize(
    "payload, code",
    [
        (b"HELLO", "badrequest"),
        (b"LEASE", "badrequest"),
        (b"LEASE role=client", "badrequest"),
        (b"LEASE role=client transport=udp remote=1.2.3.4:5", "badrequest"),
        (b"LEASE role=client transport=tcp remote=nowhere", "badrequest"),
        (b"LEASE role=client transport=tcp remote=127.0.0.1:99999", "badrequest"),
        (b"PREPARE role=client transport=tcp remote=127.0.0.1:1 wait=-1", "badrequest"),
        (b"PING\0", "badrequest"),
        (b"\xff\xfe", "badrequest"),
        (b"LEASE role=server transport=tcp", "none"),
        (b"LEASE role=client transport=tcp", "badrequest"),  # refused by the handler, not the parser
        (b"A" * (MAX_MESSAGE + 1), "toolarge"),
        (b"A" * 60000, "toolarge"),
    ],
)
def test_malformed_control_messages_get_an_error_reply(keeper, payload, code):
    reply = parse_reply(raw_exchange(keeper, payload))
    assert (reply.ok, reply.code) == (False, code)
    assert keeper.alive()


def test_random_and_truncated_frames_never_stop_the_keeper(keeper, peer):
    import random

    keeper.prepare(role="client", transport="tcp", remote=remote_of(peer), local="-")
    rng = random.Random(1)
    valid = b"PREPARE role=client transport=tcp remote=%s:%d local=-" % (
        remote_of(peer)[0].encode(),
        remote_of(peer)[1],
    )
    for _ in range(300):
        choice = rng.random()
        if choice < 0.4:
            frame = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        elif choice < 0.8:
            frame = valid[: rng.randrange(1, len(valid))]
        else:
            frame = b""  # a zero-length packet looks like a hang-up
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.connect(str(keeper.path))
            sock.send(frame)
            if rng.random() < 0.5:
                continue  # hang up without reading the reply
            sock.settimeout(5)
            if frame:
                sock.recv(MAX_MESSAGE)
    assert keeper.alive()
    assert connection(keeper)["state"] == "idle"


@pytest.fixture
def open_keeper():
    """A keeper whose directory and socket another uid can reach (normally they cannot)."""
    import tempfile

    parent = Path(tempfile.mkdtemp(prefix="fdk-uid-", dir="/tmp"))
    parent.chmod(0o755)
    client = ensure_keeper(parent / "state")
    # Open the path up so the keeper's own SO_PEERCRED check is what refuses.
    client.directory.chmod(0o755)
    client.path.chmod(0o666)
    yield client
    client.stop()
    import shutil

    shutil.rmtree(parent, ignore_errors=True)


def test_a_peer_of_another_uid_is_refused(open_keeper):
    if os.getuid() != 0:
        pytest.skip("needs root to drop privileges to nobody")
    keeper = open_keeper
    nobody = pwd.getpwnam("nobody")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)
        try:
            answer = raw_exchange(keeper, b"LEASE role=server transport=tcp")
        except OSError as error:
            answer = f"oserror {error}".encode()
        os.write(write_end, answer)
        os._exit(0)
    os.close(write_end)
    wait_child(pid)
    answer = os.read(read_end, 4096)
    os.close(read_end)
    assert answer.startswith(b"ERR denied")
    assert keeper.alive()


def test_a_lease_for_another_pid_needs_to_be_its_tracer(keeper, peer):
    keeper.prepare(role="client", transport="tcp", remote=remote_of(peer), local="-")
    _sut_side, _ = peer.accept()
    child = subprocess.Popen(["sleep", "30"])
    try:
        with pytest.raises(
            FdkeeperError, match=rf"may not lease for pid {child.pid}: only the process tracing it may"
        ) as denied:
            keeper.lease(role="client", transport="tcp", remote=remote_of(peer), local="-", for_pid=child.pid)
        assert denied.value.code == "denied"
        assert connection(keeper)["state"] == "idle"
    finally:
        child.kill()
        child.wait()


def test_two_hundred_leases_keep_fds_and_memory_flat(keeper, peer):
    remote = remote_of(peer)
    keeper.prepare(role="client", transport="tcp", remote=remote, local="-")
    _sut_side, _ = peer.accept()  # keep it: a dropped socket would close
    process = keeper_process(keeper)
    assert process is not None, "the keeper's process is gone"

    def run_leases(count: int) -> None:
        for _ in range(count):
            assert wait_child(lease_in_child(keeper, remote)) == 0
        wait_until(lambda: connection(keeper)["state"] == "idle")

    def settled_fds() -> int:
        # The last run's control connection may close a moment after its lease ends.
        time.sleep(0.2)
        return process.num_fds()

    run_leases(20)  # warm up allocator and caches
    fds, rss = settled_fds(), process.memory_info().rss
    run_leases(200)
    assert settled_fds() <= fds
    assert process.memory_info().rss - rss < 1024 * 1024
    assert connection(keeper)["leases"] == 220
