"""The matrix of issue 19: every sipp people run x SIP over WebSocket, through `fdkeeper sipp --ws`
with `--mode auto`, against one real Kamailio with WS and WSS listeners shared by the module.

Sipps: Debian's 3.6.1, 3.7.7 built with TLS (dynamic), 3.7.7 static (ptrace mode). Transports:
WS with -t t1 (one user over one kept WebSocket), WSS with -t l1, and WSS with -t ln (three users,
one WebSocket each, as WebRTC clients have). No sipp speaks WebSocket: the keeper makes the
Upgrade, frames each message, and hands sipp plain SIP; sipp's scenario copy says WS/WSS.
Each cell tells the story of tests/support/matrix.py: a register run; a call arriving in the
gap between runs (it waits in the kept connection); the answer run (a server scenario through
`fdkeeper sipp --ws`) answers it; a call arriving during that run is answered too. The SuT
reaches a WebSocket user only over the connection it registered on, and saw the REGISTERs
with WS/WSS Vias. `fdkeeper demo --ws` tells the same story over WSS.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from fdkeeper import testbed
from fdkeeper.client import KeeperClient
from fdkeeper.testbed import wait_until
from tests.support.matrix import SIPPS, Cell, answered, calls_from_the_sut, tell_the_story

# name: (sipp's -t, the keeper's transport, users)
TRANSPORTS = {"ws-t1": ("t1", "ws", 1), "wss-l1": ("l1", "wss", 1), "wss-ln": ("ln", "wss", 3)}


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


@pytest.fixture(params=list(TRANSPORTS))
def transport(request) -> str:
    return request.param


@pytest.fixture(params=list(SIPPS))
def cell(request, transport, sut, test_pki, keeper_dir, tmp_path) -> Cell:
    sipp_transport, kept, users = TRANSPORTS[transport]
    tls = ("--tls-ca", str(test_pki.ca_cert), "--tls-sni", test_pki.server_name) if kept == "wss" else ()
    return Cell.of_sipp(
        request.param,
        sipp_transport,
        kept,
        users,
        remote=sut.wss_address if kept == "wss" else sut.ws_address,
        options=("--ws", *tls),
        keeper_dir=keeper_dir,
        log_dir=tmp_path / "logs",
    )


def test_register_a_call_in_the_gap_answer_a_call_during(cell, sut, tmp_path):
    connections = tell_the_story(cell, sut, tmp_path)  # its checks: mode, transport, none lost or added
    # The SuT saw sipp's scenario copy speak WebSocket, over the transport it came by.
    registers = [r for r in sut.websocket_requests() if r["method"] == "REGISTER" and r["user"] in cell.users]
    assert {r["user"] for r in registers} == set(cell.users)
    assert {(r["transport"], r["via"].split()[0]) for r in registers} == {
        (cell.kept_transport, f"SIP/2.0/{cell.kept_transport.upper()}")
    }
    # Each kept connection is one the SuT knows as a WebSocket of that kind.
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


def test_the_gateways_pings_are_answered_while_no_run_holds_the_websocket(tmp_path, test_pki, keeper_dir):
    """Kamailio pings an idle WebSocket (websocket keepalive, here every second) and closes one
    that does not answer: the keeper answers for the absent sipp, and the user stays reachable."""
    with testbed.Kamailio(
        tmp_path / "kamailio", tls=testbed.KamailioTls.server(test_pki), websocket=True, ws_keepalive=1
    ) as sut:
        cell = Cell.of_sipp(
            "3.6.1-debian",
            "l1",
            "wss",
            1,
            remote=sut.wss_address,
            options=("--ws", "--tls-ca", str(test_pki.ca_cert), "--tls-sni", test_pki.server_name),
            keeper_dir=keeper_dir,
            log_dir=tmp_path / "logs",
        )
        users_csv = testbed.write_users_csv(tmp_path / "users.csv", cell.users, sut.domain)
        answered(cell.start("register", "uac-register.xml", calls=1, timeout=10, extra=["-inf", str(users_csv)]), 1)
        wait_until(
            lambda: cell.connection_of(cell.users[0])["websocket"]["pings_answered"] >= 2,
            timeout=15,
            what="the keeper to answer two of Kamailio's pings",
        )
        answer = cell.start("answer", "uas-answer.xml", calls=1, timeout=20)
        answered(calls_from_the_sut(sut, cell, cell.users, "call"), 1)
        answered(answer, 1)
        assert [c["type"] for c in sut.websocket_connections()] == ["WSS"]  # the same one all along


def test_a_websocket_caller_reaches_a_websocket_callee(sut, test_pki, keeper_dir, tmp_path):
    """Both ends WebRTC-like through one keeper: a caller over WS (-t t1) calls a user registered over
    WSS; INVITE, ACK and BYE come in over the caller's WebSocket and go out over the callee's."""
    where = {"keeper_dir": keeper_dir, "log_dir": tmp_path / "logs"}
    tls = ("--tls-ca", str(test_pki.ca_cert), "--tls-sni", test_pki.server_name)
    callee = Cell.of_sipp("3.6.1-debian", "l1", "callee", 1, remote=sut.wss_address, options=("--ws", *tls), **where)
    caller = Cell.of_sipp("3.6.1-debian", "t1", "caller", 1, remote=sut.ws_address, options=("--ws",), **where)
    users_csv = testbed.write_users_csv(tmp_path / "users.csv", callee.users, sut.domain)
    answered(callee.start("register", "uac-register.xml", calls=1, timeout=10, extra=["-inf", str(users_csv)]), 1)
    answer = callee.start("answer", "uas-answer.xml", calls=1, timeout=20)
    wait_until(lambda: callee.connections()[0]["state"] == "leased", timeout=10, what="the answer run to hold it")
    call = ["-s", callee.users[0], "-key", "domain", sut.domain]
    answered(caller.start("call", "uac-call.xml", calls=1, timeout=15, extra=call), 1)
    answered(answer, 1)
    assert {c["transport"] for c in KeeperClient(keeper_dir).status()["connections"]} == {"ws", "wss"}
    [caller_ws] = [c for c in KeeperClient(keeper_dir).status()["connections"] if c["transport"] == "ws"]
    from_caller = [r["method"] for r in sut.websocket_requests() if r["source"] == caller_ws["local"]]
    assert from_caller == ["INVITE", "ACK", "BYE"]
