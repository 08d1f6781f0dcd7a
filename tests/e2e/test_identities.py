"""Connection identity (issue 11, item 1): caller and callee both through fdkeeper.

Plain sipp processes never share a connection: the SuT tells `-t t1`/`-t l1` runs apart by the
local address and port they bind (-i/-p). So must fdkeeper: a callee registering and later
answering on port A shares one kept connection across its runs, while a caller on port B gets
its own, concurrently, never refused and never handed the callee's (where its INVITE would come
back to itself). Real Debian sipp 3.6.1, real Kamailio.
"""

from __future__ import annotations

import pytest

from fdkeeper import testbed
from fdkeeper.client import KeeperClient
from fdkeeper.demo import start_through_fdkeeper
from fdkeeper.keeper.connection import KeptConnection
from fdkeeper.keeper.identity import identity_of
from fdkeeper.keeper.pool import of_identity
from fdkeeper.report import format_status

USER = "alice"


# ---------------------------------------------------------------- the identity itself (pure)


def test_identity_is_the_bound_address_as_the_sut_sees_it():
    sut = ("127.0.0.1", 5060)
    assert identity_of(None, sut) is None  # no -i/-p: sipp binds an ephemeral port
    assert identity_of(("0.0.0.0", 0), sut) is None  # what the shim reports for that bind
    assert identity_of(("0.0.0.0", 5063), sut) == ("127.0.0.1", 5063)  # -p alone: the route's source
    assert identity_of(("127.0.0.1", 5063), sut) == ("127.0.0.1", 5063)  # -i and -p: the same one
    assert identity_of(("127.0.0.2", 0), sut) is None  # -i alone: an ephemeral port all the same


def test_a_server_run_naming_no_sut_finds_its_identity_by_each_connections_sut():
    def kept(identity, aor=None):
        return KeptConnection(
            id=1,
            sock=None,
            transport="tcp",
            remote=("127.0.0.1", 5060),
            local=("127.0.0.1", 40000),
            aor=aor,
            identity=identity,
        )

    assert of_identity(kept(("127.0.0.1", 5063)), ("0.0.0.0", 5063))  # -p 5063, no remote host
    assert not of_identity(kept(("127.0.0.1", 5069)), ("0.0.0.0", 5063))
    assert of_identity(kept(None), None) and not of_identity(kept(None), ("0.0.0.0", 5063))
    assert of_identity(kept(None, aor="sip:alice@example.test"), ("0.0.0.0", 5063))  # per user: any server's


# ---------------------------------------------------------------- end to end


class Sut:
    """One SuT over one transport, and how `fdkeeper sipp` reaches it."""

    def __init__(self, kamailio: testbed.Kamailio, transport: str, options: tuple[str, ...]) -> None:
        self.kamailio = kamailio
        self.transport = transport
        self.options = options
        self.address = kamailio.tls_address if transport == "l1" else kamailio.address

    def start(self, keeper_dir, tmp_path, name, scenario, **sipp_options) -> testbed.SippProcess:
        return start_through_fdkeeper(
            testbed.find_sipp(),
            scenario,
            self.address,
            directory=keeper_dir,
            log_dir=tmp_path / "logs",
            name=name,
            options=self.options,
            transport=self.transport,
            **sipp_options,
        )

    def start_caller(self, keeper_dir, tmp_path, name, port) -> testbed.SippProcess:
        extra = ["-s", USER, "-key", "domain", self.kamailio.domain]
        return self.start(keeper_dir, tmp_path, name, "uac-call.xml", local_port=port, calls=1, timeout=25, extra=extra)

    def connection_ports(self) -> list[int]:
        return sorted(c["remote_port"] for c in self.kamailio.tcp_connections())


@pytest.fixture(params=["tcp", "tls", "tcp-ptrace"])
def sut(request) -> Sut:
    if request.param.startswith("tcp"):
        mode = ("--mode", "ptrace") if request.param == "tcp-ptrace" else ()
        return Sut(request.getfixturevalue("kamailio"), "t1", mode)
    pki = request.getfixturevalue("test_pki")
    return Sut(
        request.getfixturevalue("kamailio_tls"), "l1", ("--tls-ca", str(pki.ca_cert), "--tls-sni", pki.server_name)
    )


@pytest.fixture
def users(tmp_path):
    return testbed.write_users_csv(tmp_path / "users.csv", [USER], testbed.DEFAULT_DOMAIN)


def ok(process: testbed.SippProcess, timeout: float = 40) -> testbed.SippResult:
    result = process.wait(timeout)
    assert result.ok, result.summary() + "\n" + result.text("stderr")
    assert "leased by pid" not in result.text("stderr")
    return result


def test_caller_and_callee_through_fdkeeper_each_on_its_own_connection(sut, keeper_dir, tmp_path, users):
    callee, caller = testbed.free_port(), testbed.free_port()
    ok(
        sut.start(
            keeper_dir,
            tmp_path,
            "register",
            "uac-register.xml",
            local_port=callee,
            calls=1,
            timeout=15,
            extra=["-inf", str(users)],
        )
    )

    # A call in the gap: the caller's INVITE waits in the callee's kept connection for the answer run.
    in_the_gap = sut.start_caller(keeper_dir, tmp_path, "call-in-gap", caller)
    testbed.wait_until(lambda: len(sut.connection_ports()) == 2, timeout=10, what="the caller's own connection")
    answer = sut.start(keeper_dir, tmp_path, "answer", "uas-answer.xml", local_port=callee, calls=1, timeout=30)
    ok(in_the_gap)
    ok(answer)
    # A call during an answer run that started while the caller's kept connection was idle:
    # the answer run takes only its own, so the caller is neither refused nor hijacked.
    answer = sut.start(keeper_dir, tmp_path, "answer-2", "uas-answer.xml", local_port=callee, calls=1, timeout=30)
    testbed.wait_until(lambda: _held_by(keeper_dir, callee), timeout=10, what="the answer run's lease")
    ok(sut.start_caller(keeper_dir, tmp_path, "call-during", caller))
    answered = ok(answer)
    assert "no kept connection has this run's -i/-p" not in answered.text("stderr")

    assert sut.connection_ports() == sorted([callee, caller])  # one connection per identity
    status = KeeperClient(keeper_dir).status()
    identities = sorted(c["identity"] for c in status["connections"])
    assert identities == sorted([f"127.0.0.1:{callee}", f"127.0.0.1:{caller}"])
    table = format_status(status).splitlines()
    assert "IDENTITY" in table[1] and all(f"127.0.0.1:{port}" in "\n".join(table) for port in (callee, caller))


def test_answer_run_of_another_identity_keeps_working_and_says_so(kamailio, keeper_dir, tmp_path, users):
    """README's example: register without -p, answer with -p 5070: handed the idle connection."""
    sut = Sut(kamailio, "t1", ())
    ok(sut.start(keeper_dir, tmp_path, "register", "uac-register.xml", calls=1, timeout=15, extra=["-inf", str(users)]))
    [kept] = KeeperClient(keeper_dir).status()["connections"]
    answer = sut.start(
        keeper_dir, tmp_path, "answer", "uas-answer.xml", local_port=testbed.free_port(), calls=1, timeout=30
    )
    called = testbed.place_calls(kamailio, USER, 1, sipp=testbed.find_sipp(), timeout=15, log_dir=tmp_path / "logs")
    answered = ok(answer)
    assert called.ok, called.summary()
    lines = [line for line in answered.text("stderr").splitlines() if "no kept connection has this run's" in line]
    assert len(lines) == 1 and f"#{kept['id']} from {kept['local']}" in lines[0], answered.text("stderr")


def _held_by(keeper_dir, port: int) -> bool:
    """Whether the connection of identity 127.0.0.1:port is leased (and no other is)."""
    connections = KeeperClient(keeper_dir).status()["connections"]
    return [c["identity"] for c in connections if c["state"] == "leased"] == [f"127.0.0.1:{port}"]
