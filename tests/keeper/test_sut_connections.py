"""Seen from the SuT, a run through fdkeeper opens exactly the connections plain sipp opens
(issue 16, item 7), from the port plain sipp binds.

sipp 3.6.1 binds its -t t1 client connection to -p, else to an ephemeral port; sipp 3.7.x binds
it to its main socket's port: -p, else the first free one of 5060-5119 (src/socket.cpp, commit
c4d9c9a). A fresh keeper used to open a "shared" connection from an ephemeral port at PREPARE
and then, for 3.7.x without -p, the run's own from 5060 at the lease: two connections where
plain sipp opens one, and a SuT that accepts one connection refused the registration.

Each case runs plain sipp and the same run through `fdkeeper sipp` against a SuT of its own (a
small scripted registrar, or Kamailio for TLS) and compares what each SuT saw. Runs of 3.7.x
without -p may find 5060 taken by another test: sipp then takes the next free port, and the
tests compare against the port sipp's own Via names ([local_port], its main socket's port).
"""

from __future__ import annotations

import re
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fdkeeper import testbed
from fdkeeper.client import KeeperClient
from fdkeeper.modes import MODES
from fdkeeper.sip.framing import SipFramer
from fdkeeper.sipp.binding import SIPP_DEFAULT_PORTS
from fdkeeper.testbed import fdkeeper_command

DEBIAN_SIPP = Path("/usr/bin/sipp")
# name: (binary, the mode --mode auto picks for it, whether its client connection binds the main socket's port)
SIPPS = {
    "3.6.1-debian": (DEBIAN_SIPP, "preload", False),
    "3.7.7-tls": (testbed.sipp_build("sipp-tls"), "preload", True),
    "3.7.7-static": (testbed.sipp_build("sipp-static"), "ptrace", True),
    "3.6.1-debian-ptrace": (DEBIAN_SIPP, "ptrace", False),  # the tracer reports what the program bound
}
USER = "alice"


def cannot_run(name: str) -> str | None:
    binary, mode, _ = SIPPS[name]
    if not binary.is_file():
        return f"no sipp at {binary}"
    return MODES[mode].unsupported_reason(binary)


def mode_of(name: str) -> tuple[str, ...]:
    return ("--mode", SIPPS[name][1])


# ---------------------------------------------------------------- a registrar that counts connections


@dataclass
class Registrar:
    """A TCP SuT on loopback: answers 200 to every REGISTER, notes each connection's source.

    ``accept_once``: accepts one connection and closes its listening socket, as sipp's own
    regression helpers do; a second connection is refused by the kernel.
    """

    accept_once: bool = False
    peers: list[tuple[str, int]] = field(default_factory=list)
    registers: list[tuple[tuple[str, int], bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._listener = socket.socket()
        testbed.bind_fresh_port(self._listener)
        self._listener.listen(8)
        self.address = "{}:{}".format(*self._listener.getsockname())
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, peer = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.peers.append(peer)
                self._sockets.append(conn)
            threading.Thread(target=self._serve, args=(conn, peer), daemon=True).start()
            if self.accept_once:
                self._listener.close()
                return

    def _serve(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        framer = SipFramer()
        while True:
            try:
                chunk = conn.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            for message in framer.feed(chunk):
                if message.startswith(b"REGISTER "):
                    with self._lock:
                        self.registers.append((peer, message))
                    conn.sendall(_ok(message))

    def close(self) -> None:
        self._closing = True
        self._listener.close()
        for conn in self._sockets:
            conn.close()


def _ok(request: bytes) -> bytes:
    """200 OK to ``request``: its Via, From, To, Call-ID and CSeq, a To tag."""
    head = request.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    copied = [
        line for line in head if line.split(b":", 1)[0].strip().lower() in (b"via", b"from", b"to", b"call-id", b"cseq")
    ]
    copied = [line + b";tag=registrar" if line.lower().startswith(b"to:") else line for line in copied]
    return b"SIP/2.0 200 OK\r\n" + b"\r\n".join(copied) + b"\r\nContent-Length: 0\r\n\r\n"


def via_port(message: bytes) -> int:
    """The sent-by port of the top Via (sipp writes [local_port]: its main socket's port)."""
    found = re.search(rb"^Via: SIP/2\.0/\w+ [^:;\s]+:(\d+)", message, re.MULTILINE | re.IGNORECASE)
    assert found, message
    return int(found.group(1))


@pytest.fixture
def registrars():
    made: list[Registrar] = []

    def make(accept_once: bool = False) -> Registrar:
        made.append(Registrar(accept_once=accept_once))
        return made[-1]

    yield make
    for registrar in made:
        registrar.close()


@pytest.fixture
def users(tmp_path):
    return testbed.write_users_csv(tmp_path / "users.csv", [USER], testbed.DEFAULT_DOMAIN)


def register_command(
    sipp: Path,
    remote: str,
    tmp_path: Path,
    name: str,
    users: Path | None,
    port: int | None,
    transport: str = "t1",
    scenario: str = "uac-register.xml",
) -> tuple[list[str], Path]:
    log_dir = tmp_path / "logs"
    log_dir.mkdir(exist_ok=True)
    extra = ["-inf", str(users)] if users else []
    return testbed.sipp_command(
        str(sipp),
        scenario,
        remote,
        log_dir=log_dir,
        name=name,
        transport=transport,
        local_port=port,
        calls=1,
        timeout=15 if users else 30,
        extra=extra,
    ), log_dir


def run_plain(sipp: Path, remote: str, tmp_path: Path, users: Path, port: int | None) -> testbed.SippResult:
    command, log_dir = register_command(sipp, remote, tmp_path, "plain", users, port)
    return testbed.SippProcess(command, log_dir, "plain").wait(30)


def run_kept(
    sipp: Path,
    remote: str,
    tmp_path: Path,
    users: Path,
    port: int | None,
    keeper_dir: Path,
    name: str = "kept",
    transport: str = "t1",
    options: tuple[str, ...] = (),
) -> testbed.SippResult:
    command, log_dir = register_command(sipp, remote, tmp_path, name, users, port, transport)
    return testbed.SippProcess(fdkeeper_command(command, keeper_dir, *options), log_dir, name).wait(30)


def expected_port(name: str, port: int | None, register: bytes) -> int | None:
    """The source port plain sipp `name` uses: -p, else (3.7.x) its main socket's, else ephemeral (None)."""
    if port is not None:
        return port
    return via_port(register) if SIPPS[name][2] else None


def check_source(name: str, port: int | None, peer: tuple[str, int], register: bytes) -> None:
    wanted = expected_port(name, port, register)
    if wanted is None:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        assert peer[1] >= low and peer[1] not in SIPP_DEFAULT_PORTS, f"{name}: not an ephemeral port: {peer}"
    else:
        assert peer[1] == wanted, f"{name}: connection from {peer}, plain sipp binds port {wanted}"


# ---------------------------------------------------------------- the cases


@pytest.mark.parametrize("with_port", [False, True], ids=["no-p", "with-p"])
@pytest.mark.parametrize("name", list(SIPPS))
def test_the_sut_sees_the_connections_plain_sipp_opens(name, with_port, registrars, users, tmp_path, keeper_dir):
    reason = cannot_run(name)
    if reason:
        pytest.skip(reason)
    sipp = SIPPS[name][0]
    port = testbed.free_port() if with_port else None

    plain_sut = registrars()
    plain = run_plain(sipp, plain_sut.address, tmp_path, users, port)
    assert plain.ok, plain.summary() + plain.text("stderr")
    [plain_peer] = plain_sut.peers
    check_source(name, port, plain_peer, plain_sut.registers[0][1])  # the rule, checked on plain sipp itself

    kept_sut = registrars()
    kept = run_kept(sipp, kept_sut.address, tmp_path, users, port, keeper_dir, options=mode_of(name))
    assert kept.ok, kept.summary() + kept.text("stderr")
    assert len(kept_sut.peers) == 1, f"the SuT saw {kept_sut.peers}; plain sipp opens one connection"
    [(peer, register)] = kept_sut.registers
    assert peer == kept_sut.peers[0]
    check_source(name, port, peer, register)

    # The next run of the same identity is handed the kept connection: still one. (A 3.7 run
    # without -p finding its port taken meanwhile by another test's sipp binds the next one, as
    # plain sipp would: then it is another identity, with a connection of its own from there.)
    again = run_kept(sipp, kept_sut.address, tmp_path, users, port, keeper_dir, name="again", options=mode_of(name))
    assert again.ok, again.summary() + again.text("stderr")
    [_, (peer_again, register_again)] = kept_sut.registers
    check_source(name, port, peer_again, register_again)
    moved = peer_again[1] != peer[1]
    assert not moved or (SIPPS[name][2] and port is None), (
        f"{name}: the kept connection was not reused: {kept_sut.peers}"
    )
    assert kept_sut.peers == ([peer, peer_again] if moved else [peer])


@pytest.mark.parametrize("name", list(SIPPS))
def test_a_sut_that_accepts_one_connection_gets_the_registration(name, registrars, users, tmp_path, keeper_dir):
    reason = cannot_run(name)
    if reason:
        pytest.skip(reason)
    sut = registrars(accept_once=True)
    result = run_kept(SIPPS[name][0], sut.address, tmp_path, users, None, keeper_dir, options=mode_of(name))
    assert result.ok, result.summary() + result.text("stderr")
    assert len(sut.registers) == 1 and sut.registers[0][0] == sut.peers[0]
    check_source(name, None, *sut.registers[0])
    [connection] = KeeperClient(keeper_dir).status()["connections"]
    assert connection["local"].endswith(f":{sut.peers[0][1]}")


@pytest.mark.parametrize("with_port", [False, True], ids=["no-p", "with-p"])
def test_tls_through_the_keeper_opens_one_connection_from_sipps_port(
    with_port, kamailio_tls, test_pki, users, tmp_path, keeper_dir
):
    """sipp 3.7.7 with TLS, -t l1: Kamailio sees one TLS connection, from the port sipp binds."""
    name = "3.7.7-tls"
    reason = cannot_run(name)
    if reason:
        pytest.skip(reason)
    port = testbed.free_port() if with_port else None
    options = ("--tls-ca", str(test_pki.ca_cert), "--tls-sni", test_pki.server_name)
    result = run_kept(
        SIPPS[name][0], kamailio_tls.tls_address, tmp_path, users, port, keeper_dir, transport="l1", options=options
    )
    assert result.ok, result.summary() + result.text("stderr")
    seen = kamailio_tls.tcp_connections()
    assert len(seen) == 1, f"Kamailio saw {seen}; plain sipp opens one connection"
    register = (tmp_path / "logs" / "kept.messages.log").read_bytes()
    assert seen[0]["remote_port"] == (port or via_port(register[register.index(b"REGISTER ") :]))


def test_sipp_3_7_finding_5060_taken_connects_from_the_port_it_falls_back_to(registrars, users, tmp_path, keeper_dir):
    """sipp 3.7 without -p takes the next free port of 5060-5119 when a process listens on 5060:
    the one connection the SuT sees comes from there (the runner's guess is only a guess)."""
    name = "3.7.7-tls"
    reason = cannot_run(name)
    if reason:
        pytest.skip(reason)
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        holder.bind(("0.0.0.0", SIPP_DEFAULT_PORTS[0]))
        holder.listen(1)
        held = True
    except OSError:  # another process has it: taken all the same
        held = False
    try:
        sut = registrars()
        result = run_kept(SIPPS[name][0], sut.address, tmp_path, users, None, keeper_dir)
    finally:
        holder.close()
    assert result.ok, result.summary() + result.text("stderr")
    [(peer, register)] = sut.registers
    assert sut.peers == [peer] and peer[1] == via_port(register)
    assert not held or peer[1] != SIPP_DEFAULT_PORTS[0]


@pytest.mark.parametrize("name", ["3.6.1-debian", "3.7.7-tls"])
def test_udp_mode_the_converter_opens_one_connection_for_the_runs(name, registrars, users, tmp_path, keeper_dir):
    """--mode udp: the converter's one connection carries every run's messages; none is opened
    beside it (it is the converter's own, from its own port: see the README on udp mode)."""
    from fdkeeper.modes.udp import stop_converters

    reason = cannot_run(name)
    if reason:
        pytest.skip(reason)
    sut = registrars()
    try:
        for run in ("first", "second"):
            result = run_kept(
                SIPPS[name][0], sut.address, tmp_path, users, None, keeper_dir, name=run, options=("--mode", "udp")
            )
            assert result.ok, result.summary() + result.text("stderr")
    finally:
        stop_converters(keeper_dir)
    assert len(sut.peers) == 1 and [peer for peer, _ in sut.registers] == sut.peers * 2


@pytest.mark.parametrize("name", ["3.7.7-tls", "3.7.7-static"])
def test_sipp_3_7_register_and_answer_without_p_are_one_identity(name, kamailio, users, tmp_path, keeper_dir):
    """Without -p, sipp 3.7 registers from its main socket's port and answers listening on it:
    the answer run's own connection is the register run's, the one Kamailio sees."""
    reason = cannot_run(name)
    if reason:
        pytest.skip(reason)
    sipp = SIPPS[name][0]
    registered = run_kept(
        sipp, kamailio.address, tmp_path, users, None, keeper_dir, name="register", options=mode_of(name)
    )
    assert registered.ok, registered.summary() + registered.text("stderr")
    register_port = via_port(_first(tmp_path / "logs" / "register.messages.log", b"REGISTER "))
    [seen] = kamailio.tcp_connections()
    assert seen["remote_port"] == register_port

    command, log_dir = register_command(
        sipp, kamailio.address, tmp_path, "answer", None, None, scenario="uas-answer.xml"
    )
    answer = testbed.SippProcess(fdkeeper_command(command, keeper_dir, *mode_of(name)), log_dir, "answer")
    testbed.wait_until(lambda: _leased(keeper_dir), timeout=15, what="the answer run's lease")
    called = testbed.place_calls(kamailio, USER, 1, sipp=str(DEBIAN_SIPP), timeout=15, log_dir=tmp_path / "calls")
    answered = answer.wait(30)
    assert called.ok and answered.ok, called.summary() + answered.summary() + answered.text("stderr")
    assert [c["remote_port"] for c in kamailio.tcp_connections()] == [register_port]
    answer_port = int(
        re.search(rb"Contact: <sip:[^:>]+:(\d+)", _first(log_dir / "answer.messages.log", b"SIP/2.0 200")).group(1)
    )
    if answer_port == register_port:  # else another test's sipp moved it: a borrowed one, and said so
        assert "no kept connection has this run's" not in answered.text("stderr")


def _first(log: Path, start: bytes) -> bytes:
    text = log.read_bytes()
    return text[text.index(start) :]


def _leased(keeper_dir: Path) -> bool:
    return any(c["state"] == "leased" for c in KeeperClient(keeper_dir).status()["connections"])


def test_udp_mode_runs_of_different_p_get_connections_of_their_own_from_there(registrars, users, tmp_path, keeper_dir):
    """--mode udp keeps identities apart as the keeper does: one converter per -i/-p, its
    connection from that port as plain sipp's would be; the same -p again shares it."""
    from fdkeeper.modes.udp import stop_converters

    sipp = SIPPS["3.6.1-debian"][0]
    sut = registrars()
    first, second = testbed.free_port(), testbed.free_port()
    try:
        for run, port in (("a", first), ("b", second), ("a-again", first)):
            result = run_kept(sipp, sut.address, tmp_path, users, port, keeper_dir, name=run, options=("--mode", "udp"))
            assert result.ok, result.summary() + result.text("stderr")
    finally:
        stop_converters(keeper_dir)
    assert [peer[1] for peer in sut.peers] == [first, second]
    assert [peer[1] for peer, _ in sut.registers] == [first, second, first]


def test_udp_mode_a_server_run_with_no_converter_opens_nothing(registrars, tmp_path, keeper_dir):
    """A server scenario never connects: with no converter for its SuT it is refused in one
    line (as through the keeper), rather than starting one the SuT would see connect."""
    sut = registrars()
    command, log_dir = register_command(
        DEBIAN_SIPP, sut.address, tmp_path, "answer", None, testbed.free_port(), scenario="uas-answer.xml"
    )
    result = testbed.SippProcess(fdkeeper_command(command, keeper_dir, "--mode", "udp"), log_dir, "answer").wait(30)
    assert result.returncode == 2 and "no converter runs for" in result.text("stderr"), result.text("stderr")
    assert sut.peers == []
