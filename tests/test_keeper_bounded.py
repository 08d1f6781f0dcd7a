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
import time
from pathlib import Path

from fdkeeper.client import KeeperClient, ensure_keeper
from fdkeeper.keeper.diagnostics import ENV
from fdkeeper.loop import COMPACT_AT_CANCELLED
from fdkeeper.testbed import wait_until

from test_keeper import peer, remote_of  # noqa: F401 - the fixture: a TCP listener standing in for the SuT

CYCLES = COMPACT_AT_CANCELLED + 50


def lease_with_reconnect(client: KeeperClient, remote) -> int:
    """Fork a run that leases the connection (reconnecting a closed one) and exits at once."""
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        status = 0
        try:
            client.lease(role="client", transport="tcp", remote=remote, local="-", aor="sip:u@t", reconnect=True)
        except BaseException as error:  # noqa: BLE001 - report anything to the parent
            os.write(2, f"child: {error}\n".encode())
            status = 1
        os._exit(status)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def last_sizes(log: Path, after: int) -> dict[str, int] | None:
    lines = [line for line in log.read_text().splitlines()[after:] if " sizes: " in line]
    if not lines:
        return None
    return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", lines[-1])}


def test_reconnect_cycles_leave_connections_and_timers_bounded(tmp_path, monkeypatch, peer):  # noqa: F811
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


def test_requests_sent_before_a_fin_outlive_a_run_killed_while_holding_it(tmp_path, peer):  # noqa: F811
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
        wait_until(lambda: only_connection(client)["ending"] or only_connection(client)["state"] == "closed",
                   what="the FIN seen")
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
