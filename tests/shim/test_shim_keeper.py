"""The LD_PRELOAD shim against the real keeper (fdkeeper.keeper in a temp state dir).

tests/shim/test_shim.py checks the shim's every detail against a fake keeper; these check that
the shim and the real keeper agree: a client connect handoff, a server accept handoff, fork
while another thread holds the shim's lock, and dup2/close/close_range on a kept fd. The
test program is tests/shim/shimprog.c, built with the shim as test_shim.py builds them.
"""

from __future__ import annotations

import socket

import pytest

from fdkeeper.client import KeeperClient
from tests.support.shim import Sut, parse, recv_until, run, shim_env


def kept_connection(keeper: KeeperClient, sut: Sut) -> socket.socket:
    """The keeper opens its connection to the SuT (one per remote); returns the SuT's end."""
    keeper.prepare(role="client", transport="tcp", remote=("127.0.0.1", sut.port), local="-")
    return sut.accept()


def assert_kept_open(keeper: KeeperClient, sut_ends: list[socket.socket]) -> None:
    """The program is gone, the keeper still holds every connection and the SuT saw no end."""
    assert len(keeper.status()["connections"]) == len(sut_ends)
    for sut_end in sut_ends:
        sut_end.settimeout(0.3)
        with pytest.raises(socket.timeout):
            sut_end.recv(100)


def test_client_connect_handoff(build, keeper, sut):
    """connect() gets the keeper's connection; data flows both ways; shutdown, SO_LINGER{1,0}
    and close end nothing; a second run gets the same connection again."""
    sut_end = kept_connection(keeper, sut)
    env = shim_env(build, keeper.path, remote=sut.addr, debug=True)
    for run_number in range(2):
        sut_end.sendall(b"pong\n")  # waits in the kept connection until the program reads it
        r = run(build, ["client", "127.0.0.1", str(sut.port)], env)
        assert r.returncode == 0, r.stdout + r.stderr
        kv = parse(r.stdout)
        assert kv["domain"] == "inet" and kv["peer"] == sut.addr
        assert kv["events"] == "1" and kv["data"] == "7" and kv["got"] == "pong"
        assert kv["shutdown"] == "0" and kv["close"] == "0"
        assert recv_until(sut_end, b"hello\n") == b"hello\n", run_number
        assert "handed over the kept connection" in r.stderr
    assert_kept_open(keeper, [sut_end])


def test_server_accept_handoff(build, keeper):
    """listen() in the server role: every kept connection comes out of accept()."""
    suts = [Sut() for _ in range(3)]
    try:
        sut_ends = [kept_connection(keeper, sut) for sut in suts]
        env = shim_env(build, keeper.path, role="server")
        r = run(build, ["server", "3", "v"], env)
        assert r.returncode == 0, r.stdout + r.stderr
        kv = parse(r.stdout)
        assert kv["accepted"] == "3" and kv["addr_ok"] == "3" and kv["cloexec"] == "3"
        got = sorted(recv_until(end, b"\n") for end in sut_ends)
        assert got == [b"srv 0\n", b"srv 1\n", b"srv 2\n"]
        assert r.stderr == ""
        assert_kept_open(keeper, sut_ends)
    finally:
        for sut in suts:
            sut.close()


def test_fork_while_another_thread_holds_the_lock(build, keeper, sut):
    """Children forked while a thread keeps taking the shim's lock use the shim at once:
    none hangs (the lock is taken across fork and fresh in the child), and the table the
    child inherits still knows the kept fd (shutdown on its copy is a no-op)."""
    sut_end = kept_connection(keeper, sut)
    env = shim_env(build, keeper.path, remote=sut.addr)
    r = run(build, ["threadfork", "127.0.0.1", str(sut.port), "200"], env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    kv = parse(r.stdout)
    assert kv["forks"] == "200" and kv["hung"] == "0" and kv["failed"] == "0"
    assert kv["send_after"] == "12" and kv["shutdown_kept"] == "0"
    assert recv_until(sut_end, b"after-forks\n") == b"after-forks\n"
    assert_kept_open(keeper, [sut_end])


@pytest.fixture
def other_sut():
    """A second listener: the plain connection that gets the kept fd's number back."""
    listener = Sut()
    yield listener
    listener.close()


def test_dup2_close_and_close_range_on_a_kept_fd(build, keeper, sut, other_sut):
    """close_range() does what close() does: a closed copy takes only its own state, the
    kept fd stays kept; closed itself it goes back to the keeper and its number is plain."""
    sut_end = kept_connection(keeper, sut)
    env = shim_env(build, keeper.path, remote=sut.addr)
    r = run(build, ["closerange", "127.0.0.1", str(sut.port), str(other_sut.port)], env)
    assert r.returncode == 0, r.stdout + r.stderr
    kv = parse(r.stdout)
    assert kv["dup2"] == "1"
    assert kv["cloexec_rc"] == "0" and kv["cloexec_flag"] == "1" and kv["shutdown_cloexec"] == "0"
    assert kv["range_rc"] == "0" and kv["gone"] == "1"
    assert kv["dup2_again"] == "1" and kv["close_copy"] == "0"
    assert kv["shutdown_udp"] == "-1" and kv["errno"] == "ENOTCONN"
    assert kv["send_kept"] == "18" and kv["shutdown_kept"] == "0"
    assert kv["range_kept_rc"] == "0"
    assert kv["reused"] == "1" and kv["send_other"] == "6" and kv["shutdown_reused"] == "0"
    other_end = other_sut.accept()
    assert recv_until(other_end, b"other\n") == b"other\n"
    assert other_end.recv(100) == b""  # the reused number's shutdown was real
    assert recv_until(sut_end, b"after-close-range\n") == b"after-close-range\n"
    assert r.stderr == ""
    assert_kept_open(keeper, [sut_end])
