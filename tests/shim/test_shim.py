"""Tests of the LD_PRELOAD shim (helpers/shim/*.c) with a fake keeper.

The shim is compiled exactly as the package build does, preloaded into small C
programs (tests/shim/shimprog.c) that use their sockets the way sipp 3.6.1
does, and once into the real sipp. The fake keeper answers LEASE requests per
docs/protocol.md with descriptors of TCP connections it opened to a listener
the test owns (the "SuT"), or, for transport=tls, with one end of a
socketpair(AF_UNIX, SOCK_STREAM) whose other end the test uses as the SuT
(standing in for the keeper's TLS relay).
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
import time

import pytest

from fdkeeper.testbed import free_port, wait_until
from tests.support.fake_keeper import FakeKeeper, ReusingKeeper, fmt_addr
from tests.support.shim import Sut, exchange_over_lease, parse, recv_until, run, shim_env, start_client

SIPP = shutil.which("sipp")


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def keeper_dir(tmp_path):
    d = tmp_path / "k"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
def keeper(keeper_dir, sut):
    k = FakeKeeper(keeper_dir / "control.sock", sut)
    yield k
    k.close()


def still_open(keeper_end: socket.socket, sut_end: socket.socket, tag: bytes = b"ping"):
    """The connection works both ways through the keeper's copy, and the SuT saw no EOF."""
    sut_end.settimeout(0.3)
    try:
        data = sut_end.recv(100)
    except TimeoutError:
        data = None
    assert data is None, f"SuT side got {data!r} (b'' means the connection was ended)"
    sut_end.settimeout(5)
    keeper_end.settimeout(5)
    keeper_end.sendall(tag + b"-k\n")
    assert sut_end.recv(100) == tag + b"-k\n"
    sut_end.sendall(tag + b"-s\n")
    assert keeper_end.recv(100) == tag + b"-s\n"


# --------------------------------------------------------------------------- client role


def test_client_handoff(build, keeper, sut):
    """connect() to the SuT becomes the kept connection: data, peer, epoll,
    setsockopt replay; shutdown and SO_LINGER{1,0} do not end it."""
    env = shim_env(build, keeper.path, remote=sut.addr, debug=True)
    p = start_client(build, env, "127.0.0.1", str(sut.port), "127.0.0.1")
    out, err = exchange_over_lease(keeper, p)
    assert p.returncode == 0, out + err
    kv = parse(out)
    assert keeper.requests == [f"LEASE role=client transport=tcp remote={sut.addr} local=127.0.0.1:0"]
    assert keeper.peer_pids == [p.pid]
    assert kv["connected"] != "-1" and kv["errno"] == "0"
    assert kv["domain"] == "inet"
    assert kv["peer"] == sut.addr and kv["errno_after_name"] == "EXDEV"
    assert kv["trunc"] == "0,16,1" and kv["zero"] == "0,16"
    assert kv["nodelay"] == "0"
    # The program's fd is the keeper's connection (same local address).
    kept = keeper.kept[0]
    assert kv["local"] == "{}:{}".format(*kept.getsockname())
    assert kv["cloexec"] == "1" and kv["nonblock"] == "0"
    # Its epoll registration (data 7) survived the dup3.
    assert kv["events"] == "1" and kv["data"] == "7"
    assert kv["got"] == "pong"
    assert kv["linger"] == "0" and kv["shutdown"] == "0" and kv["close"] == "0"
    # TCP_NODELAY set before connect was replayed onto the kept socket.
    assert kept.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    # SO_LINGER was not: a close by the program must not reset anything.
    assert kept.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER) == 0
    still_open(kept, keeper.sut_side[0])
    lines = [ln for ln in err.splitlines() if ln]
    assert all(ln.startswith("fdkeeper-shim: ") for ln in lines), err
    assert any("handed over the kept connection" in ln for ln in lines), err
    assert any("shutdown(fd" in ln and "ignored" in ln for ln in lines), err


def test_reconnect_flag_and_no_bind(build, keeper, sut):
    env = shim_env(build, keeper.path, remote=sut.addr, FDKEEPER_RECONNECT="1")
    p = start_client(build, env, "127.0.0.1", str(sut.port))
    out, err = exchange_over_lease(keeper, p, reply=b"x\n")
    assert p.returncode == 0, out + err
    assert err == ""
    assert keeper.requests == [f"LEASE role=client transport=tcp remote={sut.addr} local=- reconnect=1"]


def test_udp_and_other_connect_untouched(build, keeper, sut):
    other = Sut()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(5)
    try:
        env = shim_env(build, keeper.path, remote=sut.addr, debug=True)
        r = run(build, ["untouched", "127.0.0.1", str(sut.port), str(other.port), str(udp.getsockname()[1])], env)
        assert r.returncode == 0, r.stdout + r.stderr
        kv = parse(r.stdout)
        assert keeper.requests == []
        assert kv["udp_connect"] == "0" and kv["udp_send"] == "4"
        assert udp.recv(100) == b"udp\n"
        assert kv["udp_shutdown"] == "0"
        assert kv["other_connect"] == "0" and kv["other_send"] == "6"
        conn = other.accept()
        assert recv_until(conn, b"other\n") == b"other\n"
        assert conn.recv(100) == b""  # the real shutdown reached the peer
        assert kv["other_shutdown"] == "0"
        assert "not the SuT" in r.stderr
    finally:
        udp.close()
        other.close()


def test_dup_dup2_fcntl_close(build, keeper, sut):
    other = Sut()
    try:
        env = shim_env(build, keeper.path, remote=sut.addr)
        r = run(build, ["dup", "127.0.0.1", str(sut.port), str(other.port)], env)
        assert r.returncode == 0, r.stdout + r.stderr
        kv = parse(r.stdout)
        assert kv["dups"] == "1,1,1"
        # shutdown on every copy of the kept fd is a no-op ...
        assert kv["shutdown_dup"] == kv["shutdown_dup2"] == kv["shutdown_dupfd"] == "0"
        assert kv["send_dupfd"] == "8"
        # ... a dup2 over a copy drops that copy's state (real shutdown: ENOTCONN on UDP) ...
        assert kv["shutdown_over"] == "-1" and kv["errno"] == "ENOTCONN"
        assert kv["shutdown_kept"] == "0"
        # ... and the reused number of the closed kept fd is a plain socket again.
        assert kv["reused"] == "1" and kv["send_other"] == "6" and kv["shutdown_reused"] == "0"
        conn = other.accept()
        assert recv_until(conn, b"other\n") == b"other\n"
        assert conn.recv(100) == b""
        assert len(keeper.requests) == 1
        peer = keeper.sut_side[0]
        assert recv_until(peer, b"via-dup\n") == b"via-dup\n"
        still_open(keeper.kept[0], peer)
    finally:
        other.close()


def test_fork_child_keeps_table(build, keeper, sut):
    env = shim_env(build, keeper.path, remote=sut.addr)
    r = run(build, ["fork", "127.0.0.1", str(sut.port)], env)
    assert r.returncode == 0, r.stdout + r.stderr
    kv = parse(r.stdout)
    assert kv["child_shutdown"] == "0" and kv["parent_shutdown"] == "0"
    assert kv["parent_send"] == "7"
    peer = keeper.sut_side[0]
    assert recv_until(peer, b"parent\n") == b"child\nparent\n"
    still_open(keeper.kept[0], peer)


@pytest.mark.parametrize(
    "code,errname",
    [
        ("busy", "EBUSY"),
        ("timeout", "ETIMEDOUT"),
        ("closed", "ECONNREFUSED"),
        ("refused", "ECONNREFUSED"),
        ("none", "ECONNREFUSED"),
        ("internal", "ECONNREFUSED"),
    ],
)
def test_error_reply(build, keeper_dir, sut, code, errname):
    text = f"fdkeeper: kept connection to {sut.addr}/tcp: {code} (test)"
    k = FakeKeeper(keeper_dir / "control.sock", sut, error=f"{code} {text}")
    try:
        r = run(build, ["connect", "127.0.0.1", str(sut.port)], shim_env(build, k.path, remote=sut.addr))
        kv = parse(r.stdout)
        assert kv == {"rc": "-1", "errno": errname}
        assert r.stderr == text + "\n"
        assert len(k.requests) == 1
    finally:
        k.close()


def test_keeper_not_running(build, keeper_dir, sut):
    path = keeper_dir / "control.sock"
    r = run(build, ["connect", "127.0.0.1", str(sut.port)], shim_env(build, path, remote=sut.addr))
    assert parse(r.stdout) == {"rc": "-1", "errno": "ECONNREFUSED"}
    assert r.stderr == (
        f"fdkeeper: cannot reach the keeper at {path}: No such file or directory; "
        "start it with 'fdkeeper keeper' or run through 'fdkeeper sipp'\n"
    )


def test_inert_without_socket(build, keeper, sut):
    """FDKEEPER_SOCKET unset: the program's own connection, a real shutdown."""
    env = shim_env(build, None, FDKEEPER_ROLE="client", FDKEEPER_REMOTE=sut.addr, FDKEEPER_DEBUG="1")
    p = start_client(build, env, "127.0.0.1", str(sut.port))
    conn = sut.accept()
    program_end = "{}:{}".format(*conn.getpeername())
    assert recv_until(conn, b"hello\n") == b"hello\n"
    conn.sendall(b"pong\n")
    out, err = p.communicate(timeout=10)
    assert p.returncode == 0
    kv = parse(out)
    assert kv["local"] == program_end
    assert kv["got"] == "pong" and kv["cloexec"] == "0"
    # shutdown (FIN) and SO_LINGER {1,0} + close (RST) were real: the connection ended.
    try:
        assert conn.recv(100) == b""
    except ConnectionResetError:
        pass
    assert err == "" and keeper.requests == []


def test_client_tls_socketpair(build, keeper_dir, sut):
    """transport=tls: the program's TCP fd becomes a socketpair end; its names are
    the TLS connection's, TCP options are accepted, data flows both ways, and
    shutdown/close leave the keeper's end alone."""
    remote = f"127.0.0.1:{free_port()}"  # nothing listens there
    k = FakeKeeper(keeper_dir / "control.sock", sut, pairs=True, peer_addr=remote, local_addr="127.0.0.1:40312")
    try:
        env = shim_env(build, k.path, remote=remote, debug=True, FDKEEPER_TRANSPORT="tls")
        p = start_client(build, env, *remote.split(":"), "127.0.0.1")
        out, err = exchange_over_lease(k, p)
        assert p.returncode == 0, out + err
        kv = parse(out)
        assert k.requests == [f"LEASE role=client transport=tls remote={remote} local=127.0.0.1:0"]
        assert k.packets == [f"FDS ids=1 peers={remote} locals=127.0.0.1:40312"]
        assert kv["connected"] != "-1" and kv["errno"] == "0"
        assert kv["domain"] == "unix"
        assert kv["peer"] == remote and kv["local"] == "127.0.0.1:40312"
        assert kv["errno_after_name"] == "EXDEV"
        # sockaddr_in is 16 bytes: 6 copied into the short buffer, 16 reported.
        assert kv["trunc"] == "0,16,1" and kv["zero"] == "0,16"
        assert kv["nodelay"] == "0"
        assert kv["cloexec"] == "1" and kv["nonblock"] == "0"
        assert kv["events"] == "1" and kv["data"] == "7"
        assert kv["got"] == "pong"
        assert kv["linger"] == "0" and kv["shutdown"] == "0" and kv["close"] == "0"
        kept = k.kept[0]
        assert kept.family == socket.AF_UNIX
        # SO_SNDBUF (a SOL_SOCKET option) was replayed onto the pair end.
        assert kept.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 65535
        still_open(kept, k.sut_side[0])
        assert "IPPROTO_TCP option" in err and "ignored" in err, err
        assert "socketpair" in err, err
    finally:
        k.close()


def test_client_tcp_with_fds_addresses(build, keeper_dir, sut):
    """A real TCP kept socket: peers=/locals= are parsed but the kernel answers."""
    k = FakeKeeper(keeper_dir / "control.sock", sut, fds_extra=" peers=192.0.2.1:5060 locals=[2001:db8::1]:4000")
    try:
        p = start_client(build, shim_env(build, k.path, remote=sut.addr), "127.0.0.1", str(sut.port), "127.0.0.1")
        out, err = exchange_over_lease(k, p)
        assert p.returncode == 0 and err == "", out + err
        kv = parse(out)
        assert kv["domain"] == "inet" and kv["nodelay"] == "0" and kv["got"] == "pong"
        assert kv["peer"] == sut.addr
        assert kv["local"] == fmt_addr(k.kept[0].getsockname())
        still_open(k.kept[0], k.sut_side[0])
    finally:
        k.close()


@pytest.mark.parametrize(
    "extra",
    [
        " peers=192.0.2.1:5060,192.0.2.2:5060 locals=127.0.0.1:1",  # two peers for one id
        " peers=192.0.2.1 locals=127.0.0.1:1",  # no port
        " peers=192.0.2.1:5060 locals=",  # empty list
        " peers=[2001:db8::1:5060 locals=127.0.0.1:1",  # bad IPv6 form
    ],
)
def test_bad_fds_addresses(build, keeper_dir, sut, extra):
    k = FakeKeeper(keeper_dir / "control.sock", sut, fds_extra=extra)
    try:
        r = run(build, ["connect", "127.0.0.1", str(sut.port)], shim_env(build, k.path, remote=sut.addr))
        assert parse(r.stdout) == {"rc": "-1", "errno": "ECONNREFUSED"}
        assert r.stderr.startswith(f"fdkeeper: unexpected reply from the keeper at {k.path}: packet 'FDS ids=1"), (
            r.stderr
        )
        assert "address for each id" in r.stderr and r.stderr.count("\n") == 1
    finally:
        k.close()


def test_fds_unknown_address_dash(build, keeper_dir, sut):
    """'-' in peers=/locals= means unknown: the kernel's answer (AF_UNIX) stays."""
    remote = f"127.0.0.1:{free_port()}"
    k = FakeKeeper(
        keeper_dir / "control.sock", sut, pairs=True, peer_addr=remote, fds_extra=f" peers={remote} locals=-"
    )
    try:
        p = start_client(build, shim_env(build, k.path, remote=remote, FDKEEPER_TRANSPORT="tls"), *remote.split(":"))
        out, err = exchange_over_lease(k, p)
        assert p.returncode == 0 and err == "", out + err
        kv = parse(out)
        assert kv["peer"] == remote
        assert kv["local"] == "family1/len2"  # an unnamed AF_UNIX socket
    finally:
        k.close()


# shimprog server's wait for a connection where the keeper hands over none: the lease is answered
# before listen() returns, so a kept connection would be waiting at the first epoll_wait already.
NONE_TO_ACCEPT = {"SHIMPROG_IDLE_MS": "200"}


@pytest.mark.parametrize("role", ["client", "server"])
def test_bad_transport(build, keeper, sut, role):
    """An unknown FDKEEPER_TRANSPORT: one line at the first handoff, no lease,
    the program's own calls go ahead."""
    env = shim_env(build, keeper.path, role=role, remote=sut.addr, FDKEEPER_TRANSPORT="udp", **NONE_TO_ACCEPT)
    if role == "client":
        p = start_client(build, env, "127.0.0.1", str(sut.port))
        conn = sut.accept()  # the program's own connection
        assert recv_until(conn, b"hello\n") == b"hello\n"
        conn.sendall(b"pong\n")
        out, err = p.communicate(timeout=10)
        assert parse(out)["got"] == "pong"
        what = r"connect\(fd \d+\) to " + re.escape(sut.addr)
    else:
        r = run(build, ["server", "1"], env, timeout=30)
        out, err = r.stdout, r.stderr
        assert parse(out)["accepted"] == "0"
        what = r"listen\(fd \d+\)"
    assert keeper.requests == []
    assert re.fullmatch(
        "fdkeeper: FDKEEPER_TRANSPORT 'udp' is none of 'tcp', 'tls', 'ws', 'wss'; "
        f"{what} goes ahead without the keeper "
        r"\(no kept connection is handed over\)\n",
        err,
    ), err


# --------------------------------------------------------------------------- server role


@pytest.mark.parametrize("addrs", [False, True], ids=["plain", "addrs"])
def test_server_handoff_300(build, keeper, sut, addrs):
    """300 kept TCP connections, in FDS packets with or without peers=/locals=."""
    n = 300
    keeper.addrs = addrs
    keeper.open_server_conns(n)
    env = shim_env(build, keeper.path, role="server", remote=sut.addr)
    r = run(build, ["server", str(n), "v"], env, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    kv = parse(r.stdout)
    assert keeper.requests == [f"LEASE role=server transport=tcp remote={sut.addr}"]
    assert kv["accepted"] == str(n)
    assert kv["addr_ok"] == str(n)
    assert kv["blocking"] == str(n) and kv["cloexec"] == str(n)
    assert r.stderr == ""
    for i in range(n):  # the kernel's addresses
        peer, local = keeper.server_addrs[i]
        assert kv[f"acc{i}"] == f"{peer},{local},inet"
    # 250 descriptors per packet; with addresses the 4096-byte limit cuts first.
    assert len(keeper.packets) == 2 if not addrs else len(keeper.packets) > 2
    assert all(("peers=" in m) == addrs for m in keeper.packets)
    # Every kept connection got exactly one message, in order, and is still open.
    for i, sut_end in enumerate(keeper.sut_side):
        assert recv_until(sut_end, b"\n") == f"srv {i}\n".encode()
    for i in (0, n // 2, n - 1):
        still_open(keeper.server_conns[i], keeper.sut_side[i], tag=b"p%d" % i)


def test_server_without_remote_and_empty(build, keeper, sut):
    env = shim_env(build, keeper.path, role="server", **NONE_TO_ACCEPT)
    r = run(build, ["server", "1"], env, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert keeper.requests == ["LEASE role=server transport=tcp"]
    assert parse(r.stdout)["accepted"] == "0"


@pytest.mark.parametrize("from_listener", [False, True], ids=["known", "likely"])
def test_server_identity_is_the_listeners_port_where_only_the_likely_one_was_known(build, keeper, sut, from_listener):
    """sipp 3.7 without -p listens on the first free port of 5060-5119; the runner can only
    name the likely one, so the lease names the port the listener really got."""
    extra = {"FDKEEPER_LOCAL": "127.0.0.1:5060"}
    if from_listener:
        extra["FDKEEPER_LOCAL_FROM_LISTENER"] = "1"
    env = shim_env(build, keeper.path, role="server", **extra, **NONE_TO_ACCEPT)
    r = run(build, ["server", "1"], env, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    [request] = keeper.requests
    local = request.split("local=")[1]
    assert local.startswith("127.0.0.1:")
    port = int(local.rsplit(":", 1)[1])
    assert (port != 5060 and port > 0) if from_listener else port == 5060, request


@pytest.mark.parametrize("transport", ["ws", "wss"])
def test_websocket_transports_lease_a_socketpair(build, keeper_dir, sut, transport):
    """transport=ws/wss (the keeper speaks WebSocket, over TLS for wss): the lease says so, and
    the program gets a socketpair end carrying plain SIP, as for tls, in both roles."""
    remote = f"127.0.0.1:{free_port()}"  # nothing listens there: the keeper's relay stands in
    k = FakeKeeper(keeper_dir / "control.sock", sut, pairs=True, peer_addr=remote, local_addr="127.0.0.1:40312")
    try:
        env = shim_env(build, k.path, remote=remote, FDKEEPER_TRANSPORT=transport)
        out, err = exchange_over_lease(k, start_client(build, env, *remote.split(":"), "127.0.0.1"))
        kv = parse(out)
        assert kv["domain"] == "unix" and kv["peer"] == remote and kv["got"] == "pong", out + err
        k.open_server_pairs(tls_server_addrs(2))
        env = shim_env(build, k.path, role="server", FDKEEPER_TRANSPORT=transport)
        served = run(build, ["server", "2"], env, timeout=30)
        assert parse(served.stdout)["accepted"] == "2", served.stdout + served.stderr
        assert k.requests == [
            f"LEASE role=client transport={transport} remote={remote} local=127.0.0.1:0",
            f"LEASE role=server transport={transport}",
        ]
    finally:
        k.close()


def tls_server_addrs(n: int) -> list[tuple[str, str]]:
    """(peer, local) per kept TLS connection, IPv4 and IPv6 mixed."""
    out = []
    for i in range(n):
        if i % 3 == 2:
            out.append((f"[2001:db8::{i:x}]:5061", f"[2001:db8:1::1]:{40000 + i}"))
        else:
            out.append((f"192.0.2.{i % 250 + 1}:5061", f"198.51.100.1:{40000 + i}"))
    return out


def test_server_tls_socketpairs(build, keeper_dir, sut):
    """transport=tls server role: accept()/accept4() return the socketpair ends with
    the stored peer addresses (getsockname/getpeername agree), injected through
    epoll as for TCP; shutdown/close leave the keeper's ends alone."""
    n = 300
    k = FakeKeeper(keeper_dir / "control.sock", sut, pairs=True)
    try:
        k.open_server_pairs(tls_server_addrs(n))
        env = shim_env(build, k.path, role="server", FDKEEPER_TRANSPORT="tls")
        r = run(build, ["server", str(n), "v"], env, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stderr == ""
        kv = parse(r.stdout)
        assert k.requests == ["LEASE role=server transport=tls"]
        assert len(k.packets) > 2 and all(len(m) <= 4096 for m in k.packets)
        assert kv["accepted"] == str(n) and kv["addr_ok"] == str(n)
        assert kv["blocking"] == str(n) and kv["cloexec"] == str(n)
        for i, (peer, local) in enumerate(k.server_addrs):
            assert kv[f"acc{i}"] == f"{peer},{local},unix"
        for i, end in enumerate(k.sut_side):
            assert recv_until(end, b"\n") == f"srv {i}\n".encode()
        for i in (0, 2, n // 2, n - 1):
            still_open(k.server_conns[i], k.sut_side[i], tag=b"p%d" % i)
    finally:
        k.close()


# --------------------------------------------------------------------------- real sipp


class SipReader:
    """Splits a TCP byte stream into SIP messages (CRLFCRLF + Content-Length)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def next(self, timeout=10) -> bytes:
        self.sock.settimeout(timeout)
        while True:
            if b"\r\n\r\n" in self.buf:
                head, rest = self.buf.split(b"\r\n\r\n", 1)
                length = 0
                for ln in head.split(b"\r\n"):
                    name = ln.split(b":", 1)[0].strip().lower()
                    if name in (b"content-length", b"l"):
                        length = int(ln.split(b":", 1)[1])
                if len(rest) >= length:
                    self.buf = rest[length:]
                    return head + b"\r\n\r\n" + rest[:length]
            chunk = self.sock.recv(65536)
            assert chunk, f"connection ended; got {self.buf!r}"
            self.buf += chunk


def sip_response(request: bytes, code: str) -> bytes:
    head = request.split(b"\r\n\r\n", 1)[0].decode()
    lines = head.split("\r\n")
    keep = [ln for ln in lines[1:] if ln.split(":", 1)[0].strip().lower() in ("via", "from", "to", "call-id", "cseq")]
    keep = [ln + ";tag=sut1" if ln.lower().startswith("to:") and "tag=" not in ln else ln for ln in keep]
    return (
        f"SIP/2.0 {code}\r\n" + "\r\n".join(keep) + "\r\nContact: <sip:sut@127.0.0.1>\r\nContent-Length: 0\r\n\r\n"
    ).encode()


@pytest.fixture(params=["tcp", "tls"])
def transport_keeper(request, keeper_dir, sut):
    """(transport, keeper, SuT address sipp is pointed at): tcp hands real TCP
    connections to the SuT listener, tls socketpair ends (nothing listens at the
    address; the test plays the SuT on the pair's other end)."""
    if request.param == "tcp":
        k = FakeKeeper(keeper_dir / "control.sock", sut)
        remote = sut.addr
    else:
        remote = f"127.0.0.1:{free_port()}"
        k = FakeKeeper(keeper_dir / "control.sock", sut, pairs=True, peer_addr=remote, local_addr="127.0.0.1:40999")
    yield request.param, k, remote
    k.close()


@pytest.mark.skipif(SIPP is None, reason="sipp is not installed")
def test_real_sipp_uac(build, transport_keeper, tmp_path):
    """sipp -sn uac -t t1 runs a whole call over the kept connection (tls: a
    socketpair end); afterwards the keeper's copy is still open."""
    transport, keeper, remote = transport_keeper
    env = shim_env(build, keeper.path, remote=remote, debug=True, FDKEEPER_TRANSPORT=transport)
    p = subprocess.Popen(
        [
            SIPP,
            "-sn",
            "uac",
            "-t",
            "t1",
            "-m",
            "1",
            "-l",
            "1",
            "-nostdin",
            "-i",
            "127.0.0.1",
            "-timeout",
            "20s",
            "-trace_err",
            remote,
        ],
        env=env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(lambda: keeper.sut_side or p.poll() is not None, timeout=15)
        assert keeper.sut_side, f"sipp did not lease: {p.communicate(timeout=5)!r}"
        peer = keeper.sut_side[0]
        sip = SipReader(peer)
        invite = sip.next()
        assert invite.startswith(b"INVITE sip:")
        peer.sendall(sip_response(invite, "200 OK"))
        assert sip.next().startswith(b"ACK sip:")
        bye = sip.next()
        assert bye.startswith(b"BYE sip:")
        peer.sendall(sip_response(bye, "200 OK"))
        out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, (out[-2000:], err[-2000:])
    assert keeper.peer_pids == [p.pid]
    assert keeper.requests[0].startswith(f"LEASE role=client transport={transport} ")
    assert b"handed over the kept connection" in err
    assert (b"socketpair" in err) == (transport == "tls")
    still_open(keeper.kept[0], peer)


@pytest.mark.skipif(SIPP is None, reason="sipp is not installed")
def test_real_sipp_uas(build, transport_keeper, tmp_path):
    """sipp -sn uas -t t1 gets the keeper's connection (tls: a socketpair end) as an
    accepted one (epoll_wait injection + accept) and answers a call the SuT sends
    over it."""
    transport, keeper, remote = transport_keeper
    if transport == "tcp":
        keeper.open_server_conns(1)
    else:
        keeper.open_server_pairs([(remote, "127.0.0.1:40999")])
    kept, peer = keeper.server_conns[0], keeper.sut_side[0]
    port = free_port()
    env = shim_env(build, keeper.path, role="server", remote=remote, debug=True, FDKEEPER_TRANSPORT=transport)
    p = subprocess.Popen(
        [SIPP, "-sn", "uas", "-t", "t1", "-m", "1", "-nostdin", "-i", "127.0.0.1", "-p", str(port), "-timeout", "20s"],
        env=env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(lambda: keeper.requests or p.poll() is not None, timeout=15)
        assert keeper.requests == [f"LEASE role=server transport={transport} remote={remote}"]
        local = remote
        common = (
            f"Via: SIP/2.0/TCP {local};branch=z9hG4bK-t1\r\n"
            f"From: <sip:sut@{local}>;tag=sut1\r\n"
            f"To: <sip:sipp@127.0.0.1:{port}>\r\n"
            "Call-ID: fdkeeper-test-1@127.0.0.1\r\n"
        )
        peer.sendall(
            (
                f"INVITE sip:sipp@127.0.0.1:{port} SIP/2.0\r\n"
                + common
                + f"CSeq: 1 INVITE\r\nContact: <sip:sut@{local};transport=tcp>\r\n"
                "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
            ).encode()
        )
        sip = SipReader(peer)
        assert sip.next().startswith(b"SIP/2.0 180")
        ok = sip.next()
        assert ok.startswith(b"SIP/2.0 200")
        to = next(ln for ln in ok.split(b"\r\n") if ln.lower().startswith(b"to:")).decode()
        common = common.replace(f"To: <sip:sipp@127.0.0.1:{port}>", to.replace("to:", "To:", 1))
        peer.sendall(
            (
                f"ACK sip:sipp@127.0.0.1:{port} SIP/2.0\r\n"
                + common
                + "CSeq: 1 ACK\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
            ).encode()
        )
        peer.sendall(
            (
                f"BYE sip:sipp@127.0.0.1:{port} SIP/2.0\r\n"
                + common.replace("z9hG4bK-t1", "z9hG4bK-t2")
                + "CSeq: 2 BYE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
            ).encode()
        )
        assert sip.next().startswith(b"SIP/2.0 200")
        out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, (out[-2000:], err[-2000:])
    assert b"handed over the kept connection" in err
    still_open(kept, peer)


# --------------------------------------------------------------------------- per call (-t tn)


class SutResponder:
    """Plays the SuT on every connection the fake keeper opened (new ones are picked
    up as they come; index = index in keeper.kept). mode "tag": each request gets the
    line "<index>:<Call-ID>"; mode "sip": INVITE and BYE get 200 OK, ACK nothing."""

    def __init__(self, keeper: FakeKeeper, mode: str = "tag"):
        self.keeper = keeper
        self.mode = mode
        self.bufs: dict[int, bytes] = {}
        self.log: list[tuple[int, str, str]] = []  # (index, method, Call-ID)
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @staticmethod
    def _split(buf: bytes):
        """Complete messages at the start of buf, and the rest."""
        out = []
        while b"\r\n\r\n" in buf:
            head, rest = buf.split(b"\r\n\r\n", 1)
            length = 0
            for ln in head.split(b"\r\n"):
                name, _, value = ln.partition(b":")
                if name.strip().lower() in (b"content-length", b"l"):
                    length = int(value)
            if len(rest) < length:
                break
            out.append(head + b"\r\n\r\n" + rest[:length])
            buf = rest[length:]
        return out, buf

    def _answer(self, i: int, sock: socket.socket, msg: bytes):
        head = msg.split(b"\r\n\r\n", 1)[0].decode()
        method = head.split(" ", 1)[0]
        callid = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in head.split("\r\n")[1:]
                if ln.split(":", 1)[0].strip().lower() in ("call-id", "i")
            ),
            "",
        )
        self.log.append((i, method, callid))
        if self.mode == "tag":
            sock.sendall(f"{i}:{callid}\r\n".encode())
        elif method in ("INVITE", "BYE"):
            sock.sendall(sip_response(msg, "200 OK"))

    def _run(self):
        import select

        while not self._stop:
            socks = list(self.keeper.sut_side)
            if not socks:
                time.sleep(0.02)
                continue
            readable, _, _ = select.select(socks, [], [], 0.05)
            for sock in readable:
                i = socks.index(sock)
                try:
                    chunk = sock.recv(65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    continue
                msgs, self.bufs[i] = self._split(self.bufs.get(i, b"") + chunk)
                for m in msgs:
                    self._answer(i, sock, m)

    def stop(self):
        self._stop = True
        self.thread.join(2)


PERCALL_CALLS = [
    # (how the program sends, its From header line, the AoR the LEASE must name)
    ("send", 'From: "Alice" <sip:alice@fdkeeper.test;transport=tcp>;tag=a1', "sip:alice@fdkeeper.test"),
    ("sendto", "f:sip:bob@fdkeeper.test;tag=b1", "sip:bob@fdkeeper.test"),
    ("writev", "FROM : <sip:alice@fdkeeper.test>;tag=a2", "sip:alice@fdkeeper.test"),
    (
        "sendmsg",
        'from:  "Carol <c>" <sips:+4930123;npdi@fdkeeper.test;user=phone?x=1>',
        "sips:+4930123;npdi@fdkeeper.test",
    ),
    ("write", "From: <sip:dave%20d@fdkeeper.test>", "sip:dave%2520d@fdkeeper.test"),
    ("dup", "f: sip:bob@fdkeeper.test", "sip:bob@fdkeeper.test"),
]


def percall_keeper(keeper_dir, sut, transport):
    """(keeper, remote) for transport tcp (TCP connections to the SuT listener) or tls
    (socketpair ends; nothing listens at the remote address)."""
    if transport == "tcp":
        return FakeKeeper(keeper_dir / "control.sock", sut), sut.addr
    remote = f"127.0.0.1:{free_port()}"
    return FakeKeeper(
        keeper_dir / "control.sock", sut, pairs=True, peer_addr=remote, local_addr="127.0.0.1:40999"
    ), remote


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_per_call_leases_at_first_send(build, keeper_dir, sut, transport):
    """FDKEEPER_PER_CALL=1: connect() returns 0 on a quiet placeholder; the first
    send leases the From AoR's connection (aor= without URI parameters, in every
    header form), puts it on the fd with its epoll registration, and data flows; a
    later call for the same user gets that user's connection again."""
    k, remote = percall_keeper(keeper_dir, sut, transport)
    responder = SutResponder(k)
    try:
        env = shim_env(build, k.path, remote=remote, debug=True, FDKEEPER_PER_CALL="1", FDKEEPER_TRANSPORT=transport)
        r = run(
            build,
            ["percall", *remote.split(":"), "127.0.0.1", *(f"{how}|{line}" for how, line, _ in PERCALL_CALLS)],
            env,
        )
    finally:
        responder.stop()
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        kv = parse(r.stdout)
        assert k.requests == [
            f"LEASE role=client transport={transport} remote={remote} local=127.0.0.1:0 cache=1 inline=1 aor={aor}"
            for _, _, aor in PERCALL_CALLS
        ]
        assert k.peer_pids == [k.peer_pids[0]] * len(PERCALL_CALLS)
        # alice, bob, alice, carol, dave, bob: four users, four connections.
        assert k.leased == [0, 1, 0, 2, 3, 1]
        assert len(k.kept) == 4
        base = int(kv["fds_base"])
        for c, (how, _, _) in enumerate(PERCALL_CALLS):
            conn = k.leased[c]
            assert kv[f"c{c}_connect"] == "0" and kv[f"c{c}_err"] == "0"
            # The placeholder: nothing to read, no hangup, one more fd (its other end).
            assert kv[f"c{c}_poll"] == "0,0" and kv[f"c{c}_quiet"] == "0"
            # From the second call on, the shim's control connection too (kept open after the
            # first lease for the next: helpers/shim/control.c).
            assert int(kv[f"c{c}_fds"]) == base + 2 + (c > 0)
            assert kv[f"c{c}_peer"] == remote
            assert kv[f"c{c}_nodelay"] == "0"
            assert kv[f"c{c}_send"] == "1", (how, r.stdout, r.stderr)
            # The epoll registration made before connect() survived both dup3s.
            assert kv[f"c{c}_events"] == "1" and kv[f"c{c}_data"] == str(100 + c)
            assert kv[f"c{c}_got"] == f"{conn}:call-{c}"
            assert kv[f"c{c}_domain"] == ("inet" if transport == "tcp" else "unix")
        # Every placeholder end and every kept fd is closed again; the control connection stays.
        assert int(kv["fds_end"]) == base + 1
        assert [(i, cid) for i, _, cid in responder.log] == [
            (k.leased[c], f"call-{c}") for c in range(len(PERCALL_CALLS))
        ]
        lines = [ln for ln in r.stderr.splitlines() if ln]
        assert all(ln.startswith("fdkeeper-shim: ") for ln in lines), r.stderr
        assert sum("leased at its first send" in ln for ln in lines) == len(PERCALL_CALLS)
        assert sum("handed over the kept connection" in ln and " of sip" in ln for ln in lines) == len(PERCALL_CALLS)
        for i in range(len(k.kept)):  # the program's closes ended nothing
            still_open(k.kept[i], k.sut_side[i], tag=b"p%d" % i)
        if transport == "tcp":  # TCP_NODELAY set before connect() was replayed
            assert k.kept[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        k.close()


def test_per_call_no_from_header(build, keeper, sut):
    """A first message without a From header: no lease, one line, ECONNREFUSED;
    close() still releases the placeholder."""
    env = shim_env(build, keeper.path, remote=sut.addr, FDKEEPER_PER_CALL="1")
    r = run(
        build,
        ["percall", "127.0.0.1", str(sut.port), "127.0.0.1", "send|-", "send|X-From: <sip:alice@fdkeeper.test>"],
        env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    kv = parse(r.stdout)
    assert keeper.requests == []
    for c in (0, 1):
        assert kv[f"c{c}_connect"] == "0" and kv[f"c{c}_quiet"] == "0"
        assert kv[f"c{c}_send"] == "-1" and kv[f"c{c}_send_errno"] == "ECONNREFUSED"
    assert kv["fds_end"] == kv["fds_base"]
    lines = r.stderr.splitlines()
    assert len(lines) == 2, r.stderr
    assert re.fullmatch(
        r"fdkeeper: send\(fd \d+\) to " + re.escape(sut.addr) + r": the first message on this "
        r"per-call connection has no From header \(is it SIP\?\); with FDKEEPER_PER_CALL=1 "
        r"each connection is leased for the user \(AoR\) in the From header of the first SIP "
        r"message sent on it",
        lines[0],
    ), lines[0]


def test_per_call_keeper_error(build, keeper_dir, sut):
    """An ERR reply at the first send: its text, one line, the errno for its code."""
    text = f"fdkeeper: kept connection to {sut.addr}/tcp for sip:alice@fdkeeper.test is busy (test)"
    k = FakeKeeper(keeper_dir / "control.sock", sut, error=f"busy {text}")
    try:
        r = run(
            build,
            ["percall", "127.0.0.1", str(sut.port), "127.0.0.1", "send|From: <sip:alice@fdkeeper.test>;tag=1"],
            shim_env(build, k.path, remote=sut.addr, FDKEEPER_PER_CALL="1"),
        )
        kv = parse(r.stdout)
        assert kv["c0_connect"] == "0"
        assert kv["c0_send"] == "-1" and kv["c0_send_errno"] == "EBUSY"
        assert r.stderr == text + "\n"
        assert k.requests == [
            f"LEASE role=client transport=tcp remote={sut.addr} local=127.0.0.1:0 cache=1 inline=1 aor=sip:alice@fdkeeper.test"
        ]
        assert int(kv["fds_end"]) == int(kv["fds_base"]) + 1  # the control connection, kept after ERR too
    finally:
        k.close()


def test_per_call_unset_is_t1(build, keeper, sut):
    """FDKEEPER_PER_CALL unset: every connect() leases at once, without aor=."""
    responder = SutResponder(keeper)
    try:
        env = shim_env(build, keeper.path, remote=sut.addr)
        r = run(
            build,
            [
                "percall",
                "127.0.0.1",
                str(sut.port),
                "127.0.0.1",
                "send|From: <sip:alice@fdkeeper.test>",
                "writev|From: <sip:bob@x>",
            ],
            env,
        )
    finally:
        responder.stop()
    assert r.returncode == 0, r.stdout + r.stderr
    kv = parse(r.stdout)
    assert keeper.requests == [f"LEASE role=client transport=tcp remote={sut.addr} local=127.0.0.1:0"] * 2
    base = int(kv["fds_base"])
    for c in (0, 1):
        assert int(kv[f"c{c}_fds"]) == base + 2  # no placeholder: the kept fd and the control connection
        assert kv[f"c{c}_got"] == f"{c}:call-{c}" and kv[f"c{c}_domain"] == "inet"
    assert r.stderr == ""


@pytest.mark.parametrize(
    "inline,close_after,accepted",
    [(False, 1000, 1), (False, 1, 3), (True, 1000, 1)],
    ids=["kept", "closed-after-each", "inline"],
)
def test_control_connection_kept_between_leases(build, keeper_dir, sut, inline, close_after, accepted):
    """One control connection carries a process's leases; one the keeper closed meanwhile is
    replaced at the next lease, which still gets its answer; an answer inline (the OK packet
    with the descriptor) is taken as the two packets are."""
    k = ReusingKeeper(keeper_dir / "control.sock", sut, close_after=close_after, inline=inline)
    responder = SutResponder(k)
    try:
        calls = [f"send|From: <sip:u{c}@fdkeeper.test>" for c in range(3)]
        r = run(
            build,
            ["percall", "127.0.0.1", str(sut.port), "127.0.0.1", *calls],
            shim_env(build, k.path, remote=sut.addr, FDKEEPER_PER_CALL="1"),
        )
    finally:
        responder.stop()
        k.close()
    assert r.returncode == 0, r.stdout + r.stderr
    kv = parse(r.stdout)
    assert [kv[f"c{c}_got"] for c in range(3)] == [f"{c}:call-{c}" for c in range(3)]
    assert len(k.requests) == 3 and len(set(k.peer_pids)) == 1
    assert all(" inline=1 aor=" in request for request in k.requests)
    # Each descriptor went with the OK (inline) or in an FDS packet of its own.
    assert [packet.split(" ids=")[0] for packet in k.packets] == ["OK count=1" if inline else "FDS"] * 3
    assert k.accepted == accepted
    assert r.stderr == ""


PERCALL_SCENARIO = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="fdkeeper per-call uac">
  <send retrans="500">
    <![CDATA[
      INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "[field0]" <sip:[field0]@fdkeeper.test>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: <sip:[field0]@[local_ip]:[local_port];transport=[transport]>
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="200" rtd="true"/>
  <send>
    <![CDATA[
      ACK sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "[field0]" <sip:[field0]@fdkeeper.test>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 1 ACK
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <send retrans="500">
    <![CDATA[
      BYE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "[field0]" <sip:[field0]@fdkeeper.test>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 2 BYE
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="200" crlf="true"/>
</scenario>
"""


@pytest.mark.skipif(SIPP is None, reason="sipp is not installed")
def test_real_sipp_per_call(build, keeper_dir, sut, tmp_path):
    """sipp -t tn, three calls for alice, bob, alice (-inf): each call's socket leases
    its user's connection at the INVITE; alice's second call goes out on alice's
    first connection; whole calls run over them and they stay open."""
    (tmp_path / "uac.xml").write_text(PERCALL_SCENARIO)
    (tmp_path / "users.csv").write_text("SEQUENTIAL\nalice;\nbob;\nalice;\n")
    k = FakeKeeper(keeper_dir / "control.sock", sut)
    responder = SutResponder(k, mode="sip")
    try:
        env = shim_env(build, k.path, remote=sut.addr, debug=True, FDKEEPER_PER_CALL="1")
        p = subprocess.run(
            [
                SIPP,
                "-sf",
                "uac.xml",
                "-inf",
                "users.csv",
                "-t",
                "tn",
                "-max_socket",
                "100",
                "-m",
                "3",
                "-l",
                "1",
                "-nostdin",
                "-i",
                "127.0.0.1",
                "-timeout",
                "20s",
                "-trace_err",
                sut.addr,
            ],
            env=env,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=40,
        )
    finally:
        responder.stop()
    try:
        assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-2000:])
        assert k.requests == [
            f"LEASE role=client transport=tcp remote={sut.addr} local=127.0.0.1:0 cache=1 inline=1 aor=sip:{user}@fdkeeper.test"
            for user in ("alice", "bob", "alice")
        ]
        assert k.leased == [0, 1, 0]
        assert k.peer_pids == [k.peer_pids[0]] * 3
        calls = {}
        for i, method, callid in responder.log:
            calls.setdefault(callid, []).append((i, method))
        assert sorted(calls.values()) == sorted(
            [
                [(0, "INVITE"), (0, "ACK"), (0, "BYE")],
                [(1, "INVITE"), (1, "ACK"), (1, "BYE")],
                [(0, "INVITE"), (0, "ACK"), (0, "BYE")],
            ]
        ), responder.log
        assert p.stderr.count(b"leased at its first send") == 3
        for i in range(2):
            still_open(k.kept[i], k.sut_side[i], tag=b"p%d" % i)
    finally:
        k.close()


def percall_arg(prefix: str, user: str) -> str:
    """shimprog percall's argument for a call of ``user`` sent with send, after ``prefix`` (fork ...)."""
    return f"{prefix + '+' if prefix else ''}send|From: <sip:{user}@fdkeeper.test>"


def lease_cache_run(build, k, remote, calls, transport="tcp", **extra):
    """shimprog percall of ``calls`` ("[PREFIX+]+user": a call of that user sent with send) against
    a fake keeper that answers keep=1; its key=value output and stderr."""
    responder = SutResponder(k)
    try:
        args = [percall_arg(*call.rpartition("+")[::2]) for call in calls]
        env = shim_env(build, k.path, remote=remote, FDKEEPER_PER_CALL="1", FDKEEPER_TRANSPORT=transport, **extra)
        r = run(build, ["percall", "127.0.0.1", str(k.sut.port), "127.0.0.1", *args], env)
    finally:
        responder.stop()
    assert r.returncode == 0, r.stdout + r.stderr
    return parse(r.stdout), r.stderr


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_lease_cache_repeats_without_the_keeper(build, keeper_dir, sut, transport):
    """keep=1: a user's next call takes the process's own copy of its connection (no request);
    the copies stay open after the program's close, one per user, and work as the keeper's."""
    pairs = {"pairs": True, "peer_addr": sut.addr, "local_addr": "127.0.0.1:40999"} if transport == "tls" else {}
    k = ReusingKeeper(keeper_dir / "control.sock", sut, keep=True, **pairs)
    try:
        kv, err = lease_cache_run(build, k, sut.addr, ["+alice", "+bob", "+alice", "+alice", "+bob"], transport)
        assert len(k.requests) == 2 and all(" cache=1 inline=1 aor=" in r for r in k.requests), k.requests
        assert [kv[f"c{c}_got"] for c in range(5)] == [f"{i}:call-{c}" for c, i in enumerate([0, 1, 0, 0, 1])]
        assert [kv[f"c{c}_domain"] for c in range(5)] == ["inet" if transport == "tcp" else "unix"] * 5
        assert [kv[f"c{c}_peer"] for c in range(5)] == [sut.addr] * 5
        # The control connection and the two copies.
        assert int(kv["fds_end"]) == int(kv["fds_base"]) + 3
        assert err == ""
        for i in range(2):
            still_open(k.kept[i], k.sut_side[i], tag=b"k%d" % i)
    finally:
        k.close()


@pytest.mark.parametrize("bound,requests,copies", [("1", 3, 1), ("0", 3, 0)])
def test_lease_cache_bound(build, keeper_dir, sut, bound, requests, copies):
    """FDKEEPER_LEASE_CACHE: copies kept at most (the least recently used closed first); 0: none,
    and no cache=1 asked."""
    k = ReusingKeeper(keeper_dir / "control.sock", sut, keep=True)
    try:
        kv, err = lease_cache_run(build, k, sut.addr, ["+alice", "+bob", "+alice"], FDKEEPER_LEASE_CACHE=bound)
        assert len(k.requests) == requests and all(("cache=1" in r) == (bound != "0") for r in k.requests)
        assert [kv[f"c{c}_got"] for c in range(3)] == ["0:call-0", "1:call-1", "0:call-2"]
        assert int(kv["fds_end"]) == int(kv["fds_base"]) + 1 + copies
        assert err == ""
    finally:
        k.close()


def test_lease_cache_fork_close_range(build, keeper_dir, sut):
    """A forked child holds no lease: it closes its copies of its parent's and asks the keeper
    itself (the parent's copy serves the parent's next call); close_range over the copies'
    numbers makes them the program's, and the next call asks the keeper again."""
    k = ReusingKeeper(keeper_dir / "control.sock", sut, keep=True)
    try:
        calls = ["+alice", "fork+alice", "+alice", "closerange+alice", "+alice"]
        kv, err = lease_cache_run(build, k, sut.addr, calls)
        assert [kv[f"c{c}_got"] for c in range(5)] == [f"0:call-{c}" for c in range(5)]
        parent, child = k.peer_pids[0], k.peer_pids[1]
        assert len(k.requests) == 3 and k.peer_pids == [parent, child, parent]
        # In the child at its call: only the placeholder's two ends (no control connection, no copy).
        assert int(kv["c1_fds"]) == int(kv["c0_fds"])
        assert int(kv["fds_end"]) == int(kv["fds_base"]) + 2
        assert err == ""
    finally:
        k.close()


def test_lease_cache_gives_way_when_the_program_runs_out_of_descriptors(build, keeper_dir, sut):
    """A socket() or placeholder that finds no descriptor free (EMFILE) closes the older half of
    the copies and is made again: the copies never cost the program a call."""
    k = ReusingKeeper(keeper_dir / "control.sock", sut, keep=True)
    try:
        kv, err = lease_cache_run(build, k, sut.addr, ["+alice", "+bob", "hog+alice"], FDKEEPER_DEBUG="1")
        assert [kv[f"c{c}_got"] for c in range(3)] == ["0:call-0", "1:call-1", "0:call-2"]
        assert len(k.requests) == 3  # alice's copy, the oldest, made room
        assert "out of descriptors: closed 1 of the lease cache's copies" in err
        assert all(line.startswith("fdkeeper-shim: ") for line in err.splitlines()), err
    finally:
        k.close()


def test_lease_cache_copy_the_sut_ended_is_asked_again(build, keeper_dir, sut):
    """A copy whose peer hung up (the SuT's FIN) is not handed again: the keeper is asked."""
    k = ReusingKeeper(keeper_dir / "control.sock", sut, keep=True)
    responder = SutResponder(k)
    args = ["send|From: <sip:alice@fdkeeper.test>", "wait+send|From: <sip:alice@fdkeeper.test>"]
    env = shim_env(build, k.path, remote=sut.addr, FDKEEPER_PER_CALL="1")
    p = subprocess.Popen(
        [build["prog"], "percall", "127.0.0.1", str(sut.port), "127.0.0.1", *args],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: responder.log or p.poll() is not None, timeout=15)
        k.sut_side[0].shutdown(socket.SHUT_RDWR)  # the SuT ends alice's connection: FIN
        del k.by_aor["sip:alice@fdkeeper.test"]  # the keeper opens her a new one
        out, err = p.communicate("go\n", timeout=20)
    finally:
        responder.stop()
        k.close()
    assert p.returncode == 0, out + err
    kv = parse(out)
    assert (kv["c0_got"], kv["c1_got"]) == ("0:call-0", "1:call-1")
    assert len(k.requests) == 2 and err == ""
