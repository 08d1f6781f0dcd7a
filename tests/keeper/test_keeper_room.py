"""A per-user run (-t tn/ln) is told before it starts when its users would not fit under the
keeper's open-file limit, counting each transport's descriptors while the run holds it (tcp 1,
tls/ws/wss 3: the socketpair too, dropped once idle), and a server run when the socketpairs of the
relayed connections it would be handed would not fit. The keeper's soft limit is lowered with
prlimit: no scale needed (issue 20)."""

from __future__ import annotations

import subprocess

import pytest

from fdkeeper.errors import FdkeeperError
from fdkeeper.keeper.pool import RESERVED_DESCRIPTORS
from fdkeeper.testbed import wait_until
from fdkeeper.testbed.scripted_sut import ScriptedRun, ScriptedSut
from tests.support.keeper import keeper_process

SOFT = 200  # the keeper's soft limit in these tests: room for (200 - 64) tcp users


@pytest.fixture
def small_keeper(keeper):
    process = keeper_process(keeper)
    subprocess.run(["prlimit", f"--pid={process.pid}", f"--nofile={SOFT}:"], check=True)
    return keeper


def per_user_prepare(keeper, remote, transport: str, users: int):
    return keeper.prepare(role="client", transport=transport, remote=remote, local="-", per_call=True, users=users)


def test_users_past_the_keepers_open_file_limit_are_refused_before_the_run_naming_the_limit(small_keeper, peer):
    room = SOFT - RESERVED_DESCRIPTORS
    per_user_prepare(small_keeper, peer.getsockname(), "tcp", room)  # fits: nothing opened yet
    with pytest.raises(FdkeeperError) as refused:
        per_user_prepare(small_keeper, peer.getsockname(), "tcp", room + 1)
    said = str(refused.value)
    assert refused.value.code == "limit", said
    assert f"can hold {room} more tcp connections (open-file limit {SOFT}," in said, said
    assert f"this run may need {room + 1}" in said and "ulimit -n" in said, said


def test_ws_users_count_three_descriptors_each_while_the_run_holds_them(small_keeper, peer):
    room = (SOFT - RESERVED_DESCRIPTORS) // 3
    per_user_prepare(small_keeper, peer.getsockname(), "ws", room)
    with pytest.raises(FdkeeperError) as refused:
        per_user_prepare(small_keeper, peer.getsockname(), "ws", room + 1)
    said = str(refused.value)
    assert f"can hold {room} more ws connections" in said, said
    assert "holds 3 descriptors a user until it exits (1 once idle)" in said, said
    assert f"register at most {room} users a run" in said, said


def test_users_already_kept_need_no_more_room(small_keeper, peer):
    room = SOFT - RESERVED_DESCRIPTORS
    remote = peer.getsockname()
    for index in range(2):
        small_keeper.prepare(role="client", transport="tcp", remote=remote, local="-", aor=f"sip:u{index}@example.test")
    # Two users kept take two descriptors, and a run of N users brings N - 2 new ones.
    per_user_prepare(small_keeper, remote, "tcp", room)
    with pytest.raises(FdkeeperError, match=f"can hold {room - 2} more tcp"):
        per_user_prepare(small_keeper, remote, "tcp", room + 1)


def test_a_server_run_whose_tls_users_socketpairs_would_not_fit_is_refused_before_it_starts(keeper, pki):
    """An idle kept TLS user holds its TLS socket only; a run handed it needs its socketpair too
    (2 descriptors in the keeper) while it holds it: refused, naming the limit, when they do not fit."""
    sut = ScriptedSut(pki.server_cert, pki.server_key)
    try:
        keeper.prepare(role="client", transport="tls", remote=sut.address, local="-", tls_ca=str(pki.ca_cert))
        ScriptedRun(keeper.directory, "tls", sut.address).exit()  # its lease ended: the pair is dropped
        wait_until(lambda: keeper.status(state="idle", count=True)["count"] == 1)
        process = keeper_process(keeper)
        soft = RESERVED_DESCRIPTORS + 2  # the TLS socket and one more: no room for a pair
        subprocess.run(["prlimit", f"--pid={process.pid}", f"--nofile={soft}:"], check=True)
        with pytest.raises(FdkeeperError) as refused:
            keeper.prepare(role="server", transport="tls", remote=sut.address, local="-")
        said = str(refused.value)
        assert refused.value.code == "limit", said
        assert "handed 1 kept tls connections" in said and "socketpair (2 descriptors in the keeper)" in said, said
        assert f"open-file limit {soft}" in said, said
    finally:
        sut.close()
