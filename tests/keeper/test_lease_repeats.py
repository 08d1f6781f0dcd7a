"""A per-call run's repeated LEASE (keeper/leases.py answer_repeat): answered as the full path
answers it, and never where the full path would answer otherwise (closed, held by another run)."""

from __future__ import annotations

import os
import socket

import pytest

from fdkeeper.client import KeeperClient
from fdkeeper.errors import FdkeeperError
from fdkeeper.protocol import format_message, receive_packet
from fdkeeper.testbed import wait_until
from tests.support.keeper import remote_of


def per_user(remote: str, user: str) -> dict[str, object]:
    return {"role": "client", "transport": "tcp", "remote": remote, "local": "-", "aor": f"sip:{user}@fdkeeper.test"}


def lease_answer(client: KeeperClient, fields: dict[str, object]) -> tuple[list[int], list[str], list[str]]:
    """One LEASE's ids, peers and locals (its descriptors closed)."""
    leased = client.lease_connections(**fields)
    for fd in leased.fds:
        os.close(fd)
    return leased.ids, leased.peers, leased.locals


def test_a_repeated_lease_gets_the_same_answer_and_a_closed_connection_its_error(keeper, peer):
    remote = remote_of(peer)
    alice = per_user(remote, "alice")
    # The first opens (answered in full once open, and remembered), the rest as repeats.
    answers = [lease_answer(keeper, alice) for _ in range(4)]
    sut_side, _ = peer.accept()
    assert answers == [answers[0]] * 4 and answers[0][0] == [1]
    [row] = keeper.status()["connections"]
    assert (row["state"], row["holder_pid"], row["leases"], row["mode"]) == ("leased", os.getpid(), 1, "preload")
    sut_side.close()
    wait_until(lambda: keeper.status()["connections"][0]["state"] == "closed")
    with pytest.raises(FdkeeperError, match="was closed") as closed:
        lease_answer(keeper, alice)
    assert closed.value.code == "closed"


def test_a_repeat_of_a_connection_another_run_holds_is_busy(keeper, peer):
    remote = remote_of(peer)
    lease_answer(keeper, per_user(remote, "alice"))  # this process holds leases
    bob = per_user(remote, "bob")
    for _ in range(2):
        lease_answer(keeper, bob)  # answered in full, then kept as a repeat
    pid = os.fork()
    if pid == 0:  # another run asking for bob (never returns into pytest)
        status = 1
        try:
            with pytest.raises(FdkeeperError, match="leased by pid") as busy:
                lease_answer(keeper, bob)  # held by the parent: busy, as the full path says
            status = 0 if busy.value.code == "busy" else 1
        except BaseException as error:
            os.write(2, f"child: {error}\n".encode())
        os._exit(status)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def test_a_repeat_asked_inline_is_one_packet(keeper, peer):
    """inline=1 (the shim's per-call LEASE): the repeat's OK carries the FDS part and the descriptor."""
    request = format_message("LEASE", inline=True, **per_user(remote_of(peer), "carol"))
    replies, in_one = [], []
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(5)
        sock.connect(str(keeper.path))
        for _ in range(3):  # opened and answered in full once open (remembered), then repeats
            sock.send(request)
            data, fds = receive_packet(sock)
            in_one.append(bool(fds))
            if not fds:
                data, fds = receive_packet(sock)
            replies.append(data.split(b" ", 2)[-1] if data.startswith(b"OK") else data.split(b" ", 1)[1])
            for fd in fds:
                os.close(fd)
    assert replies[0].startswith(b"ids=1 peers=") and replies == [replies[0]] * 3
    assert in_one == [False, True, True]


def ok_lines(keeper: KeeperClient, request: bytes, times: int) -> list[bytes]:
    """The OK line of each of ``times`` answers to ``request`` on one control connection."""
    oks = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(5)
        sock.connect(str(keeper.path))
        for _ in range(times):
            sock.send(request)
            data, fds = receive_packet(sock)
            oks.append(data.split(b" ids=")[0])
            if not fds:
                _, fds = receive_packet(sock)
            for fd in fds:
                os.close(fd)
    return oks


def test_a_tcp_lease_asked_cache_may_be_kept(keeper, peer):
    """cache=1 (the shim's lease cache): a per-user TCP connection's OK says keep=1, in full and
    as a repeat; without cache=1 it never does (the ptrace mode's and older shims' requests)."""
    fields = per_user(remote_of(peer), "erin")
    cached = format_message("LEASE", inline=True, cache=True, **fields)
    assert ok_lines(keeper, cached, 3) == [b"OK count=1 keep=1"] * 3
    plain = format_message("LEASE", inline=True, **fields)
    assert ok_lines(keeper, plain, 2) == [b"OK count=1"] * 2
