"""Issue 19's "everything that holds for TCP and TLS holds for WebSocket", end to end beyond the
matrix of test_e2e_ws.py (register, a call in the gap, answer, a call during, for three sipps,
the static sipp under ptrace over WSS -t ln included): Debian's sipp through fdkeeper against
one real Kamailio shared by the module, its WS and WSS listeners on the path /ws only.

A server run SIGKILLed while it holds a kept WSS connection leaves it to the next run; two -p
identities over WS get a WebSocket each; -rsa names where the WebSocket goes; `fdkeeper exec
--ws` runs sipp as `fdkeeper sipp --ws` does; --tls-keylog writes a WSS session's secrets;
`fdkeeper status` shows the handshake; a refused upgrade is one line and exit 2.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fdkeeper import testbed
from fdkeeper.client import KeeperClient
from fdkeeper.demo import start_through_fdkeeper
from fdkeeper.testbed import fdkeeper_command, wait_until
from fdkeeper.testbed.sipp import start_calls

SIPP = "/usr/bin/sipp"
WS_PATH = "/ws"

pytestmark = pytest.mark.skipif(not Path(SIPP).is_file(), reason=f"no Debian sipp at {SIPP}")


@pytest.fixture(scope="module")
def sut(tmp_path_factory, test_pki):
    """One Kamailio for the module (each test has users of its own): WS and WSS upgrades on /ws only."""
    kamailio = testbed.Kamailio(
        tmp_path_factory.mktemp("ws-more") / "kamailio",
        tls=testbed.KamailioTls.server(test_pki),
        websocket=True,
        ws_path=WS_PATH,
    )
    kamailio.start()
    yield kamailio
    kamailio.stop()
    print(f"--- kamailio log tail ({kamailio.log_path}) ---\n{kamailio.log_tail(60)}")


@pytest.fixture
def user(request) -> str:
    """A user of this test alone in the shared SuT."""
    return "ws-" + request.node.name.removeprefix("test_").replace("_", "-")[:40]


class Ws:
    """One test's runs through `fdkeeper sipp --ws` against the module's SuT, over WS (-t t1) or WSS (-t l1)."""

    def __init__(self, sut: testbed.Kamailio, pki: testbed.TestPki, keeper_dir: Path, log_dir: Path, kind: str):
        self.sut, self.keeper_dir, self.log_dir, self.kind = sut, keeper_dir, log_dir, kind
        self.remote = sut.wss_address if kind == "wss" else sut.ws_address
        self.transport = "l1" if kind == "wss" else "t1"
        self.tls = ("--tls-ca", str(pki.ca_cert), "--tls-sni", pki.server_name) if kind == "wss" else ()
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, scenario: str, *, options: tuple[str, ...] = (), **sipp: Any) -> testbed.SippProcess:
        settings: dict[str, Any] = {"transport": self.transport, "calls": 1, "timeout": 20, "remote": self.remote}
        settings.update(sipp)
        return start_through_fdkeeper(
            SIPP,
            scenario,
            settings.pop("remote"),
            directory=self.keeper_dir,
            log_dir=self.log_dir,
            name=name,
            options=("--ws", "--ws-path", WS_PATH, *self.tls, *options),
            **settings,
        )

    def register(self, user: str, name: str = "register", **sipp: Any) -> testbed.SippResult:
        users = testbed.write_users_csv(self.log_dir / f"{name}.users.csv", [user], self.sut.domain)
        extra = ["-inf", str(users), *sipp.pop("extra", ())]
        return ok(self.start(name, "uac-register.xml", extra=extra, **sipp))

    def call(self, user: str, name: str) -> testbed.SippProcess:
        """A call to `user` from the SuT's side (plain UDP sipp), in the background."""
        return start_calls(
            self.sut, [user], log_dir=self.log_dir, name=name, sipp=SIPP, local_port=testbed.free_port(), timeout=15
        )

    def kept(self) -> list[dict[str, Any]]:
        connections: list[dict[str, Any]] = KeeperClient(self.keeper_dir).status()["connections"]
        return connections

    def sut_side(self, connection: dict[str, Any]) -> list[dict[str, Any]]:
        """The SuT's WebSocket connections from the keeper's end of `connection`."""
        port = int(connection["local"].rsplit(":", 1)[1])
        return [c for c in self.sut.websocket_connections() if c["remote_port"] == port]


@pytest.fixture
def ws(sut, test_pki, keeper_dir, tmp_path) -> Ws:
    return Ws(sut, test_pki, keeper_dir, tmp_path / "logs", "ws")


@pytest.fixture
def wss(sut, test_pki, keeper_dir, tmp_path) -> Ws:
    return Ws(sut, test_pki, keeper_dir, tmp_path / "logs", "wss")


def ok(process: testbed.SippProcess, timeout: float = 30) -> testbed.SippResult:
    result = process.wait(timeout)
    assert result.ok, result.summary() + "\n" + result.text("stderr")
    return result


def fdkeeper(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fdkeeper", *args], capture_output=True, text=True, timeout=timeout)


def test_a_server_run_sigkilled_mid_run_leaves_the_kept_wss_connection_to_the_next(wss, user):
    wss.register(user)
    [kept] = wss.kept()
    [websocket] = wss.sut_side(kept)
    assert kept["transport"] == "wss" and websocket["type"] == "WSS"

    doomed = wss.start("doomed", "uas-answer.xml", local_port=testbed.free_port(), timeout=60)
    wait_until(lambda: wss.kept()[0]["state"] == "leased", timeout=10, what="the server run to hold the connection")
    os.killpg(doomed.pid, signal.SIGKILL)  # fdkeeper sipp and sipp alike: nothing says goodbye
    doomed.wait(10)
    wait_until(lambda: wss.kept()[0]["state"] == "idle", timeout=10, what="the keeper to take the connection back")
    assert [(c["id"], c["type"]) for c in wss.sut_side(kept)] == [(websocket["id"], "WSS")]

    # A call in the gap, answered by the next server run over the same WebSocket.
    caller = wss.call(user, "call")
    wait_until(lambda: wss.kept()[0]["queued_bytes"] > 0, timeout=10, what="the INVITE to wait in the kept connection")
    answered = ok(wss.start("answer", "uas-answer.xml", local_port=testbed.free_port()))
    assert answered.successful == 1
    assert ok(caller).successful == 1
    assert [c["id"] for c in wss.kept()] == [kept["id"]]
    assert [(c["id"], c["type"]) for c in wss.sut_side(kept)] == [(websocket["id"], "WSS")]  # one throughout


def test_two_identities_over_ws_each_get_their_own_websocket(ws, user):
    """tests/e2e/test_identities.py over WS: the callee's -p and the caller's -p are two identities."""
    callee, caller = testbed.free_port(), testbed.free_port()
    ws.register(user, local_port=callee)
    call = ["-s", user, "-key", "domain", ws.sut.domain]
    # The caller's INVITE waits in the callee's kept WebSocket for the answer run.
    in_the_gap = ws.start("call-in-gap", "uac-call.xml", local_port=caller, timeout=25, extra=call)
    wait_until(lambda: len(ws.kept()) == 2, timeout=10, what="the caller's own WebSocket")
    answer = ws.start("answer", "uas-answer.xml", local_port=callee, timeout=25)
    ok(in_the_gap)
    answered = ok(answer)
    assert answered.successful == 1 and "no kept connection has this run's -i/-p" not in answered.text("stderr")

    kept = ws.kept()
    assert sorted(c["identity"] for c in kept) == sorted(f"127.0.0.1:{port}" for port in (callee, caller))
    assert {c["transport"] for c in kept} == {"ws"}
    assert sorted(c["type"] for k in kept for c in ws.sut_side(k)) == ["WS", "WS"]
    assert all(c["local"] == c["identity"] for c in kept)  # the keeper binds the run's -p, as over TCP


def test_rsa_is_where_the_websocket_goes(ws, user):
    """-rsa HOST:PORT over WS: the remote host names nobody; the WebSocket goes to -rsa."""
    nobody = f"localhost:{testbed.free_port()}"
    rsa = ["-rsa", ws.sut.ws_address]
    ws.register(user, remote=nobody, extra=rsa)
    [kept] = ws.kept()
    assert kept["remote"] == ws.sut.ws_address and kept["transport"] == "ws"
    caller = ws.call(user, "call")
    answered = ok(ws.start("answer", "uas-answer.xml", remote=nobody, local_port=testbed.free_port(), extra=rsa))
    assert answered.successful == 1 and ok(caller).successful == 1
    assert [c["id"] for c in ws.kept()] == [kept["id"]]  # handed the same one


def test_exec_of_sipp_over_wss_works_as_fdkeeper_sipp_does(wss, user):
    """`fdkeeper exec --ws --transport tls -- sipp -t t1 ...`: sipp speaks plain TCP to its end,
    the keeper WSS to the SuT; register in one run, a call answered by an exec --role server run."""

    def exec_sipp(role: str, name: str, scenario: str, **sipp: Any) -> testbed.SippProcess:
        sipp_cmd = testbed.sipp_command(
            SIPP, scenario, wss.remote, log_dir=wss.log_dir, name=name, transport="t1", calls=1, timeout=20, **sipp
        )
        command = [sys.executable, "-m", "fdkeeper", "exec", "--dir", str(wss.keeper_dir), "--sut", wss.remote]
        command += ["--role", role, "--transport", "tls", "--ws", "--ws-path", WS_PATH, *wss.tls, "--", *sipp_cmd]
        return testbed.SippProcess(command, wss.log_dir, name)

    users = testbed.write_users_csv(wss.log_dir / "users.csv", [user], wss.sut.domain)
    ok(exec_sipp("client", "register", "uac-register.xml", extra=["-inf", str(users)]))
    [kept] = wss.kept()
    assert kept["transport"] == "wss" and kept["websocket"]["path"] == WS_PATH
    caller = wss.call(user, "call")
    answered = ok(exec_sipp("server", "answer", "uas-answer.xml", local_port=testbed.free_port()))
    assert answered.successful == 1 and ok(caller).successful == 1
    assert [c["id"] for c in wss.kept()] == [kept["id"]]
    assert [c["type"] for c in wss.sut_side(kept)] == ["WSS"]
    # exec runs any agent and rewrites no scenario: the Via says what the scenario says (TCP here), the
    # SuT saw the REGISTER come over WSS and reached the user over that connection.
    assert [(r["method"], r["transport"]) for r in wss.sut.websocket_requests() if r["user"] == user] == [
        ("REGISTER", "wss")
    ]


def test_tls_keylog_over_wss_writes_the_sessions_secrets(wss, user, tmp_path):
    keylog = tmp_path / "keys.log"
    wss.register(user, options=("--tls-keylog", str(keylog)))
    [kept] = wss.kept()
    assert kept["tls"]["version"] == "TLSv1.3"
    secrets = [line.split() for line in keylog.read_text().splitlines() if line and not line.startswith("#")]
    assert sorted(label for label, _, _ in secrets) == sorted(
        [
            "CLIENT_HANDSHAKE_TRAFFIC_SECRET",
            "SERVER_HANDSHAKE_TRAFFIC_SECRET",
            "CLIENT_TRAFFIC_SECRET_0",
            "SERVER_TRAFFIC_SECRET_0",
            "EXPORTER_SECRET",
        ]
    ), keylog.read_text()  # one TLS 1.3 session: each secret once
    assert len({client_random for _, client_random, _ in secrets}) == 1  # of one handshake
    assert oct(keylog.stat().st_mode & 0o777) == oct(0o600)


def test_status_shows_the_websocket_handshake(ws, user):
    ws.register(user)
    table = fdkeeper("status", "--dir", str(ws.keeper_dir))
    assert table.returncode == 0, table.stderr
    [line] = [line for line in table.stdout.splitlines() if "WebSocket" in line]
    assert f"WebSocket {WS_PATH}, protocol sip, HTTP/1.1 101 " in line, table.stdout

    answer = fdkeeper("status", "--dir", str(ws.keeper_dir), "--json")
    [connection] = json.loads(answer.stdout)["connections"]
    websocket = connection["websocket"]
    assert (websocket["path"], websocket["protocol"]) == (WS_PATH, "sip")
    assert websocket["status"].startswith("HTTP/1.1 101 ")
    headers = {name.lower(): value for name, value in websocket["server_headers"]}
    assert headers, websocket  # Kamailio's own headers (its Server line), not the handshake's
    assert not {"upgrade", "connection", "sec-websocket-accept", "sec-websocket-protocol"} & set(headers)
    for name, value in websocket["server_headers"]:
        assert f"{name}: {value}" in line


@pytest.mark.parametrize(
    "where, path, status",
    [("sip-port", WS_PATH, "HTTP/1.1 403 Forbidden"), ("wrong-path", "/nope", "HTTP/1.1 404 Not Found")],
)
def test_a_refused_upgrade_is_one_line_and_exit_2(sut, keeper_dir, tmp_path, where, path, status):
    remote = sut.address if where == "sip-port" else sut.ws_address
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    command = testbed.sipp_command(SIPP, "uac-register.xml", remote, log_dir=log_dir, name="refused", transport="t1")
    done = subprocess.run(
        fdkeeper_command(command, keeper_dir, "--ws", "--ws-path", path), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("fdkeeper: ") and f"refused the upgrade: {status}" in line, line
    assert "WebSocket port, --ws-path" in line, line
    assert KeeperClient(keeper_dir).status()["connections"] == []
