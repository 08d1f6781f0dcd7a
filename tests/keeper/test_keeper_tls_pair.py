"""A TLS link's socketpair exists only while a run needs it (issue 20): an idle kept TLS user holds
one descriptor in the keeper (the TLS session's socket), a lease makes the pair, and once the
run's lease has ended the link drops it; nothing either side sent is lost across that boundary.

Counted from the keeper's own /proc/<pid>/fd, against a scripted TLS SuT; runs are processes
of their own (ScriptedRun) whose exit ends their lease. Each test runs with the C pump and with
the Python relay alone (FDKEEPER_TLS_PUMP=0 in the keeper's environment).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fdkeeper.client import KeeperClient, ensure_keeper
from fdkeeper.testbed import wait_until
from fdkeeper.testbed.scripted_sut import ScriptedRun, ScriptedSut, SutConnection, sip_message
from tests.support.keeper import keeper_process


@pytest.fixture(params=["pump", "python-relay"])
def keeper(request, tmp_path, monkeypatch) -> Iterator[KeeperClient]:
    """A keeper of this module's own: with the TLS pump, or with the Python relay alone."""
    if request.param == "python-relay":
        monkeypatch.setenv("FDKEEPER_TLS_PUMP", "0")  # the keeper started next inherits it
    client = ensure_keeper(tmp_path / "state")
    yield client
    client.stop()


@pytest.fixture
def sut(pki) -> Iterator[ScriptedSut]:
    server = ScriptedSut(pki.server_cert, pki.server_key)
    yield server
    server.close()


def sockets(keeper: KeeperClient) -> int:
    """The keeper's socket descriptors (its epoll, eventfds and pidfds are not sockets; the pump
    makes an epoll and an eventfd of its own at its first use)."""
    process = keeper_process(keeper)
    assert process is not None
    fds = Path(f"/proc/{process.pid}/fd")
    return sum(1 for fd in fds.iterdir() if _readlink(fd).startswith("socket:"))


def only_the_control_socket(keeper: KeeperClient) -> int:
    """The keeper's socket count at rest: its control socket alone, once the connections of
    requests just answered (the fixture's own) have gone, which they do shortly after."""
    wait_until(lambda: sockets(keeper) == 1, timeout=5, what="the keeper to hold its control socket alone")
    return 1


def _readlink(path: Path) -> str:
    try:
        return os.readlink(path)
    except FileNotFoundError:  # closed while listed
        return ""


def kept(keeper: KeeperClient, sut: ScriptedSut, pki) -> SutConnection:
    """A kept TLS connection to ``sut`` (opened by a client PREPARE), the SuT's side of it."""
    keeper.prepare(role="client", transport="tls", remote=sut.address, local="-", tls_ca=str(pki.ca_cert))
    return sut.newest(lambda _connection: True)


def run(keeper: KeeperClient, sut: ScriptedSut) -> ScriptedRun:
    handle = ScriptedRun(Path(keeper.directory), "tls", sut.address)
    assert handle.refused is None, handle.refused
    return handle


def test_an_idle_link_holds_one_descriptor_and_a_lease_makes_its_pair(keeper, sut, pki):
    base = only_the_control_socket(keeper)
    connection = kept(keeper, sut, pki)
    first = run(keeper, sut)
    first.write(["one-100"], 100, 1.0)
    wait_until(lambda: sut.received_ids(connection) == ["one-100"])
    first.exit()
    wait_until(lambda: sockets(keeper) == base + 1, timeout=5)  # the lease ended: the TLS socket only

    second = run(keeper, sut)  # a fresh pair, working both ways
    wait_until(lambda: sockets(keeper) == base + 3, timeout=5)  # the TLS socket and the pair
    second.write(["two-0"], 0, 1.0)
    wait_until(lambda: sut.received_ids(connection) == ["one-100", "two-0"])
    sut.send(connection, sip_message("answer-0"))
    assert second.read(1, 2.0).call_ids == ["answer-0"]
    second.exit()
    wait_until(lambda: sockets(keeper) == base + 1, timeout=5)


def test_what_the_sut_sends_while_there_is_no_pair_reaches_the_next_lease(keeper, sut, pki):
    base = only_the_control_socket(keeper)
    connection = kept(keeper, sut, pki)
    run(keeper, sut).exit()
    wait_until(lambda: sockets(keeper) == base + 1, timeout=5)  # no pair

    sut.send(connection, sip_message("between-300", 300) + sip_message("between-0"))
    wait_until(lambda: keeper.status()["connections"][0]["tls"]["messages_to_sipp"] == 2)  # in to_sipp
    assert run(keeper, sut).read(2, 2.0).call_ids == ["between-300", "between-0"]


def test_what_a_run_did_not_read_reaches_the_next_run_after_the_pair_is_dropped(keeper, sut, pki):
    connection = kept(keeper, sut, pki)
    first = run(keeper, sut)
    sut.send(connection, sip_message("unread-0") + sip_message("unread-2000", 2000))
    wait_until(lambda: keeper.status()["connections"][0]["queued_bytes"] > 0)  # in the run's pair, unread
    first.exit()
    wait_until(lambda: keeper.status()["connections"][0]["state"] == "idle")
    sut.send(connection, sip_message("later-0"))
    assert run(keeper, sut).read(3, 2.0).call_ids == ["unread-0", "unread-2000", "later-0"]


def test_a_run_that_read_half_a_message_leaves_the_next_on_a_boundary_across_the_drop(keeper, sut, pki):
    connection = kept(keeper, sut, pki)
    first = run(keeper, sut)
    sut.send(connection, sip_message("begun-3000", 3000) + sip_message("whole-0"))
    first.read_part(100, 2.0)
    first.exit()
    assert run(keeper, sut).read(1, 2.0).call_ids == ["whole-0"]


def test_a_repeat_lease_in_one_process_after_its_close_gets_a_working_pair(keeper, sut, pki):
    """As a per-call run's next call to a user: the same LEASE again (the keeper's repeat path)."""
    keeper.prepare(
        role="client", transport="tls", remote=sut.address, local="-", per_call=True, users=1, tls_ca=str(pki.ca_cert)
    )
    client = KeeperClient(Path(keeper.directory))
    lease = {"role": "client", "transport": "tls", "remote": sut.address, "local": "-", "aor": "sip:u1@sut.test"}
    [(_, fd)] = client.lease(**lease)
    connection = sut.newest(lambda _connection: True)
    os.write(fd, sip_message("call-1"))
    os.close(fd)  # the call ended: the run closed its copy
    [(_, again)] = client.lease(**lease)
    os.write(again, sip_message("call-2"))
    wait_until(lambda: sut.received_ids(connection) == ["call-1", "call-2"])
    sut.send(connection, sip_message("to-call-2"))
    os.set_blocking(again, True)
    assert b"to-call-2" in os.read(again, 65536)
    os.close(again)
