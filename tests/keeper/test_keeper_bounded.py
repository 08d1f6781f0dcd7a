"""What bench/soak.py found, in small: the keeper stays bounded through many open/close cycles,
and requests the SuT sent before its FIN outlive a run killed while holding the connection.

The first drives the real keeper process with FDKEEPER_DEBUG_SIZES set, so that it logs the
sizes of its structures (fdkeeper/keeper/diagnostics.py), and reads them from keeper.log.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

from fdkeeper.client import KeeperClient, ensure_keeper
from fdkeeper.keeper.diagnostics import ENV
from fdkeeper.keeper.tlslink import BUFFER_LIMIT
from fdkeeper.loop import COMPACT_AT_CANCELLED
from fdkeeper.sip.framing import MAX_MESSAGE, SipFramer
from fdkeeper.testbed import wait_until
from tests.support.fake_sut import FakeSut
from tests.support.fake_sut import sip as datapath_sip
from tests.support.keeper import lease, open_connection, remote_of

CYCLES = COMPACT_AT_CANCELLED + 50


def lease_with_reconnect(client: KeeperClient, remote) -> int:
    """Fork a run that leases the connection (reconnecting a closed one) and exits at once."""
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        status = 0
        try:
            client.lease(role="client", transport="tcp", remote=remote, local="-", aor="sip:u@t", reconnect=True)
        except BaseException as error:
            os.write(2, f"child: {error}\n".encode())
            status = 1
        os._exit(status)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def last_sizes(log: Path, after: int) -> dict[str, int] | None:
    lines = [line for line in log.read_text().splitlines()[after:] if " sizes: " in line]
    if not lines:
        return None
    return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", lines[-1])}


def test_reconnect_cycles_leave_connections_and_timers_bounded(tmp_path, monkeypatch, peer):
    monkeypatch.setenv(ENV, "0.2")
    # A long connect timeout: each open's cancelled timeout timer would stay in the heap for it.
    client = ensure_keeper(tmp_path / "state", connect_timeout=60)
    log = tmp_path / "state" / "keeper.log"
    remote = remote_of(peer)
    try:
        for cycle in range(CYCLES):
            assert lease_with_reconnect(client, remote) == 0
            sut_side, _ = peer.accept()
            sut_side.close()  # the SuT ends it: the next run reconnects
            wait_until(lambda: client.status()["connections"][-1]["state"] == "closed", what=f"close {cycle} seen")
        seen = len(log.read_text().splitlines())
        sizes = wait_until(lambda: last_sizes(log, seen), what="a sizes line after the cycles")
    finally:
        client.stop()
    # One record per user, however often it was replaced; cancelled timers do not pile up.
    assert sizes["connections"] == 1 and sizes["by_key"] == 1
    assert sizes["holders"] == 0 and sizes["opening"] == 0
    assert sizes["timers"] <= COMPACT_AT_CANCELLED + 5, sizes


def sip(call_id: str) -> bytes:
    return f"OPTIONS sip:a@b SIP/2.0\r\nCall-ID: {call_id}\r\nContent-Length: 0\r\n\r\n".encode()


def only_connection(client: KeeperClient) -> dict:
    [connection] = client.status()["connections"]
    return connection


def hold_in_child(client: KeeperClient, remote) -> int:
    """Fork a run that leases the connection and holds it, reading nothing, until killed."""
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            client.lease(role="client", transport="tcp", remote=remote, local="-")
            time.sleep(30)
        finally:
            os._exit(1)
    return pid


def test_requests_sent_before_a_fin_outlive_a_run_killed_while_holding_it(tmp_path, peer):
    client = ensure_keeper(tmp_path / "state")
    remote = remote_of(peer)
    try:
        client.prepare(role="client", transport="tcp", remote=remote, local="-")
        sut_side, _ = peer.accept()
        holder = hold_in_child(client, remote)
        wait_until(lambda: only_connection(client)["holder_pid"] == holder, what="the run's lease")
        requests = sip("one") + sip("two")
        sut_side.sendall(requests)
        sut_side.shutdown(socket.SHUT_WR)  # the SuT ends it while the run holds it
        wait_until(
            lambda: only_connection(client)["ending"] or only_connection(client)["state"] == "closed",
            what="the FIN seen",
        )
        os.kill(holder, signal.SIGKILL)  # a sipp killed before it read them
        os.waitpid(holder, 0)
        [(_, fd)] = client.lease(role="client", transport="tcp", remote=remote, local="-")
        with socket.socket(fileno=fd) as run:
            run.settimeout(3)
            received = b""
            while chunk := run.recv(65536):
                received += chunk
        assert received == requests
        wait_until(lambda: only_connection(client)["state"] == "closed", what="closed once delivered")
    finally:
        client.stop()


# ------------------------------------------------ runs ending against a TLS SuT that does not read


def flood_until_blocked(run: socket.socket, message: bytes) -> int:
    """Write messages without blocking until the keeper stops taking them; the last one may be
    cut (as a run killed mid-write leaves it). Return the whole messages written."""
    run.setblocking(False)
    whole, stalled_since = 0, None
    while stalled_since is None or time.monotonic() - stalled_since < 0.5:
        try:
            sent = run.send(message)
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            time.sleep(0.02)
            continue
        stalled_since = None
        if sent < len(message):
            return whole  # the rest of this one never comes: an unfinished message
        whole += 1
    return whole


def flood_in_child(client: KeeperClient, sut: FakeSut, message: bytes) -> int:
    """A run (a forked child: its exit ends the lease) that floods the TLS link and exits;
    return the whole messages it wrote."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        status = 0
        try:
            os.write(writer, str(flood_until_blocked(lease(client, sut, "tls"), message)).encode())
        except BaseException as error:
            os.write(2, f"child: {error}\n".encode())
            status = 1
        os._exit(status)
    os.close(writer)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    with os.fdopen(reader) as result:
        return int(result.read())


def test_runs_ending_against_a_sut_that_does_not_read_leave_the_keeper_bounded(tmp_path, monkeypatch, pki):
    monkeypatch.setenv(ENV, "0.2")
    client = ensure_keeper(tmp_path / "state")
    log = tmp_path / "state" / "keeper.log"
    sut = FakeSut(pki)
    try:
        open_connection(client, sut, "tls", pki)
        sut.connection()  # accepted, never read from
        for number in range(3):
            flood_in_child(client, sut, datapath_sip(f"flood{number}", b"x" * 4000))
            wait_until(lambda: only_connection(client)["state"] == "idle", what=f"run {number}'s lease to end")
        seen = len(log.read_text().splitlines())
        sizes = wait_until(lambda: last_sizes(log, seen), what="a sizes line after the runs")
    finally:
        client.stop()
        sut.close()
    # Before: every ended run's full socketpair buffer joined the queue towards the SuT for good.
    assert sizes["tls_to_sut_bytes"] <= BUFFER_LIMIT + MAX_MESSAGE, sizes


def test_an_ended_runs_unfinished_message_is_dropped_only_where_its_bytes_end(keeper, pki):
    sut = FakeSut(pki)
    try:
        open_connection(keeper, sut, "tls", pki)
        peer = sut.connection()  # not read until both runs have written
        # The run's last message unfinished, and much of what it wrote still in the socketpair.
        whole = flood_in_child(keeper, sut, datapath_sip("flood", b"x" * 4000))
        wait_until(lambda: keeper.status()["connections"][0]["state"] == "idle", what="the first lease to end")
        second = lease(keeper, sut, "tls")
        writer = threading.Thread(target=second.sendall, args=(datapath_sip("next"),), daemon=True)
        writer.start()  # blocks until the SuT reads
        framer, received = SipFramer(), []
        peer.settimeout(5)
        while not received or b"Call-ID: next" not in received[-1]:
            data = peer.recv(65536)
            assert data, "the keeper ended the connection"
            received += framer.feed(data)  # raises on bytes that are not SIP: a spliced message
        writer.join(5)
        second.close()
    finally:
        sut.close()
    assert [message for message in received if b"Call-ID: flood" in message] == [
        datapath_sip("flood", b"x" * 4000)
    ] * whole
    assert received[-1] == datapath_sip("next") and framer.pending == 0
