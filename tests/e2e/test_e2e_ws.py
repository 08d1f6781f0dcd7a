"""The matrix of issue 19: every sipp people run x SIP over WebSocket, through `fdkeeper sipp --ws`
with `--mode auto`, against one real Kamailio with WS and WSS listeners shared by the module.

Sipps: Debian's 3.6.1, 3.7.7 built with TLS (dynamic), 3.7.7 static (ptrace mode). Transports:
WS with -t t1 (one user over one kept WebSocket), WSS with -t l1, and WSS with -t ln (three users,
one WebSocket each, as WebRTC clients have). No sipp speaks WebSocket: the keeper makes the
Upgrade, frames each message, and hands sipp plain SIP; sipp's scenario copy says WS/WSS.
Each cell tells the story of tests/e2e/test_matrix.py: a register run; a call arriving in the
gap between runs (it waits in the kept connection); the answer run (a server scenario through
`fdkeeper sipp --ws`) answers it; a call arriving during that run is answered too. The SuT
reaches a WebSocket user only over the connection it registered on, and saw the REGISTERs
with WS/WSS Vias. `fdkeeper demo --ws` tells the same story over WSS.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from fdkeeper import testbed
from fdkeeper.client import KeeperClient
from fdkeeper.demo import start_through_fdkeeper
from fdkeeper.modes import MODES
from fdkeeper.testbed import wait_until
from fdkeeper.testbed.sipp import start_calls

DEBIAN_SIPP = Path("/usr/bin/sipp")
# name: (binary, the mode --mode auto must pick for it)
SIPPS = {
    "3.6.1-debian": (DEBIAN_SIPP, "preload"),
    "3.7.7-tls": (testbed.sipp_build("sipp-tls"), "preload"),
    "3.7.7-static": (testbed.sipp_build("sipp-static"), "ptrace"),
}
# name: (sipp's -t, the keeper's transport, users)
TRANSPORTS = {"ws-t1": ("t1", "ws", 1), "wss-l1": ("l1", "wss", 1), "wss-ln": ("ln", "wss", 3)}
# sipp -t tn/ln refuses to start while its -max_socket (50000) exceeds the open-file limit.
PER_CALL_OPTIONS = ["-max_socket", "100"]


def cannot_run(name: str) -> str | None:
    """Why this machine cannot run the cells of sipp `name`, or None."""
    binary, mode = SIPPS[name]
    if not binary.is_file():
        return f"no sipp at {binary}"
    return MODES[mode].unsupported_reason(binary)


@pytest.fixture(scope="module")
def sut(tmp_path_factory, test_pki):
    """One Kamailio for the whole matrix (each cell has users of its own), WS and WSS."""
    kamailio = testbed.Kamailio(
        tmp_path_factory.mktemp("ws-matrix") / "kamailio", tls=testbed.KamailioTls.server(test_pki), websocket=True
    )
    kamailio.start()
    yield kamailio
    kamailio.stop()
    print(f"--- kamailio log tail ({kamailio.log_path}) ---\n{kamailio.log_tail(60)}")


@dataclass
class Cell:
    """One sipp over one WebSocket transport through one keeper, with the users of this cell."""

    sipp: Path
    mode: str  # the mode --mode auto must pick for it
    transport: str  # sipp's -t
    kept_transport: str  # "ws" or "wss"
    users: list[str]
    remote: str
    options: tuple[str, ...]
    keeper_dir: Path
    log_dir: Path
    port: int  # the callee's -p, register and answer run alike: one identity

    @property
    def per_call(self) -> bool:
        return self.transport in ("tn", "ln")

    def start(self, name: str, scenario: str, calls: int, timeout: int, extra=()) -> testbed.SippProcess:
        extra = [*extra, *(PER_CALL_OPTIONS if self.per_call else ())]
        return start_through_fdkeeper(
            str(self.sipp),
            scenario,
            self.remote,
            directory=self.keeper_dir,
            log_dir=self.log_dir,
            name=name,
            options=self.options,
            transport=self.transport,
            local_port=self.port,
            calls=calls,
            rate=100,
            timeout=timeout,
            extra=extra,
        )

    def connections(self) -> list[dict]:
        return KeeperClient(self.keeper_dir).status()["connections"]

    def connection_of(self, user: str) -> dict:
        """The kept connection a call to `user` arrives on (-t t1/l1: the only one)."""
        connections = self.connections()
        if not self.per_call:
            [connection] = connections
            return connection
        [connection] = [c for c in connections if (c["aor"] or "").startswith(f"sip:{user}@")]
        return connection


@pytest.fixture(params=list(TRANSPORTS))
def transport(request) -> str:
    return request.param


@pytest.fixture(params=list(SIPPS))
def cell(request, transport, sut, test_pki, keeper_dir, tmp_path) -> Cell:
    reason = cannot_run(request.param)
    if reason:
        pytest.skip(reason)
    sipp_transport, kept, users = TRANSPORTS[transport]
    secure = kept == "wss"
    return Cell(
        sipp=SIPPS[request.param][0],
        mode=SIPPS[request.param][1],
        transport=sipp_transport,
        kept_transport=kept,
        users=[f"{request.param}-{transport}-u{index}" for index in range(1, users + 1)],
        remote=sut.wss_address if secure else sut.ws_address,
        options=("--ws", *(("--tls-ca", str(test_pki.ca_cert), "--tls-sni", test_pki.server_name) if secure else ())),
        keeper_dir=keeper_dir,
        log_dir=tmp_path / "logs",
        port=testbed.free_port(),
    )


def calls_from_the_sut(sut, cell: Cell, users: list[str], name: str) -> testbed.SippProcess:
    return start_calls(
        sut, users, log_dir=cell.log_dir, name=name, sipp=str(DEBIAN_SIPP), local_port=testbed.free_port(), timeout=15
    )


def answered(process: testbed.SippProcess, count: int, timeout: float = 30) -> testbed.SippResult:
    result = process.wait(timeout)
    assert result.ok and result.successful == count, result.summary()
    return result


def test_register_a_call_in_the_gap_answer_a_call_during(cell, sut, tmp_path):
    users_csv = testbed.write_users_csv(tmp_path / "users.csv", cell.users, sut.domain)
    answered(
        cell.start("register", "uac-register.xml", calls=len(cell.users), timeout=10, extra=["-inf", str(users_csv)]),
        len(cell.users),
    )
    assert len(cell.connections()) == len(cell.users)
    # The SuT saw sipp's scenario copy speak WebSocket, over the transport it came by.
    registers = [r for r in sut.websocket_requests() if r["method"] == "REGISTER" and r["user"] in cell.users]
    assert {r["user"] for r in registers} == set(cell.users)
    assert {(r["transport"], r["via"].split()[0]) for r in registers} == {
        (cell.kept_transport, f"SIP/2.0/{cell.kept_transport.upper()}")
    }

    # The gap: no run holds the connection; the INVITE waits in it for the answer run.
    gap = calls_from_the_sut(sut, cell, cell.users[:1], "call-in-gap")
    wait_until(
        lambda: cell.connection_of(cell.users[0])["queued_bytes"] > 0,
        timeout=10,
        what="the INVITE in the gap to reach the kept connection",
    )

    # One call per user per run: -t ln calls the other users during the run, -t t1/l1 the one user again.
    during_users = cell.users[1:] if cell.per_call else cell.users
    answer = cell.start("answer", "uas-answer.xml", calls=1 + len(during_users), timeout=20)
    wait_until(
        lambda: all(c["state"] == "leased" for c in cell.connections()),
        timeout=10,
        what="the answer run to hold the kept connections",
    )
    during = calls_from_the_sut(sut, cell, during_users, "calls-during")

    answered(gap, 1)
    answered(during, len(during_users))
    answered(answer, 1 + len(during_users))  # its scenario answered the call in the gap too
    connections = cell.connections()
    assert {c["mode"] for c in connections} == {cell.mode}  # what --mode auto picked
    assert {c["transport"] for c in connections} == {cell.kept_transport}
    assert len(connections) == len(cell.users)  # none lost, none added
    # Each kept connection is one the SuT knows as a WebSocket of that kind, and nothing more.
    kinds = {c["remote_port"]: c["type"] for c in sut.websocket_connections()}
    assert {kinds.get(int(c["local"].rsplit(":", 1)[1])) for c in connections} == {cell.kept_transport.upper()}


def test_the_demo_over_wss():
    """`fdkeeper demo --ws`: register over WSS, a call in the gap, the next run answers it."""
    result = subprocess.run(
        [sys.executable, "-m", "fdkeeper", "demo", "--ws"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "demo PASSED" in result.stdout, result.stdout + result.stderr
    assert "the INVITE waits in the kept connection" in result.stdout
    assert "WebSocket /, protocol sip" in result.stdout  # fdkeeper status shows the handshake
