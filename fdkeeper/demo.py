"""`fdkeeper demo`: the whole story against the embedded default SuT, step by step.

1. start a local Kamailio that delivers calls only over the connection a user registered on;
2. for comparison, without fdkeeper: bob registers over TCP with plain sipp, which exits,
   and a call to bob fails (the registrar has no connection left to reach him);
3. register alice over TCP through fdkeeper in one sipp run, which then exits;
4. start a second sipp run that answers calls;
5. a third party calls alice through Kamailio: the INVITE arrives over the kept connection
   and the second run answers it.

With `auth` (`fdkeeper demo --auth`) the SuT wants digest credentials, as real registrars
do: every REGISTER is challenged with 401 and the caller's INVITE with 407, and the
shipped scenarios answer with the passwords of the users CSV (and the caller's -au/-ap).

With `websocket` (`fdkeeper demo --ws`) the story is a WebRTC client's, over secure WebSocket
(WSS): no sipp speaks WebSocket, so there is no "without fdkeeper" step; alice registers over
WSS through `fdkeeper sipp --ws -t l1` (the keeper makes the TLS and the HTTP Upgrade and
keeps the connection), a call to her arrives while no sipp runs (it waits in the kept
connection, the only way the SuT can reach her), and the next run answers it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fdkeeper import testbed
from fdkeeper.client import KeeperClient
from fdkeeper.report import format_status
from fdkeeper.sipp.runner import find_sipp
from fdkeeper.testbed.process import missing_websocket_module
from fdkeeper.testbed.sipp import start_calls

USER = "alice"
PLAIN_USER = "bob"
# The SuT's accounts with --auth: the users and the third-party caller.
AUTH_USERS = {USER: "alice-secret", PLAIN_USER: "bob-secret", testbed.CALLER: "caller-secret"}


def start_through_fdkeeper(
    sipp: str,
    scenario: str,
    remote: str,
    *,
    directory: Path,
    log_dir: Path,
    name: str,
    options: tuple[str, ...] = (),
    **sipp_options: Any,
) -> testbed.SippProcess:
    """Start a terminal-less sipp run (see testbed.sipp_command, whose options sipp_options are)
    through `fdkeeper sipp`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = testbed.sipp_command(sipp, scenario, remote, log_dir=log_dir, name=name, **sipp_options)
    return testbed.SippProcess(testbed.fdkeeper_command(cmd, directory, *options), log_dir, name)


def run_demo(
    sipp: str | None = None,
    keep_files: bool = False,
    say: Callable[[str], None] = print,
    auth: bool = False,
    websocket: bool = False,
) -> bool:
    """The story step by step (`auth`: against a SuT that wants digest credentials; `websocket`:
    over WSS); True when it worked."""
    sipp_path = os.fspath(find_sipp(sipp))
    no_websocket = missing_websocket_module() if websocket else None
    if no_websocket is not None:
        say(f"fdkeeper demo --ws: {no_websocket}")
        return False
    workdir = Path(tempfile.mkdtemp(prefix="fdkeeper-demo-"))
    keeper_dir = workdir / "keeper"
    logs = workdir / "logs"
    pki = testbed.make_test_pki(workdir / "pki") if websocket else None
    kamailio = testbed.Kamailio(
        workdir / "kamailio",
        auth_users=AUTH_USERS if auth else None,
        tls=testbed.KamailioTls.server(pki) if pki is not None else None,
        websocket=websocket,
    )
    try:
        if pki is not None:
            return _websocket_steps(sipp_path, kamailio, pki, keeper_dir, logs, workdir, say)
        return _demo_steps(sipp_path, kamailio, keeper_dir, logs, workdir, say)
    finally:
        KeeperClient(keeper_dir).stop()
        kamailio.stop()
        if keep_files:
            say(f"files kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _demo_steps(
    sipp: str, kamailio: testbed.Kamailio, keeper_dir: Path, logs: Path, workdir: Path, say: Callable[[str], None]
) -> bool:
    say("step 1: start the SuT")
    kamailio.start()
    say(f"  Kamailio listens on {kamailio.address} (UDP and TCP); it reaches a user only over")
    say("  the connection that user registered on, and never opens one towards a user")
    if kamailio.auth_users is not None:
        say(f"  it wants digest credentials: REGISTER gets a 401 challenge, a call from {testbed.CALLER} a 407;")
        say("  the scenarios answer with the password of the users CSV (user;domain;password) and -au/-ap")

    say(f"step 2: for comparison, without fdkeeper: {PLAIN_USER} registers over TCP with plain sipp, which exits")
    _without_fdkeeper(sipp, kamailio, logs, workdir, say)

    say(f"step 3: register {USER} over TCP through fdkeeper in one sipp run (which then exits)")
    users = testbed.write_users_csv(workdir / "users.csv", [USER], kamailio.domain, kamailio.auth_users)
    register = start_through_fdkeeper(
        sipp,
        "uac-register.xml",
        kamailio.address,
        directory=keeper_dir,
        log_dir=logs,
        name="register",
        transport="t1",
        calls=1,
        timeout=20,
        extra=["-inf", str(users)],
    ).wait(30)
    if not register.ok:
        say(f"  FAILED: the register run did not succeed\n{register.summary()}")
        return False
    say(f"  registered; sipp exited with status {register.returncode}; the keeper still holds the connection:")
    for line in format_status(KeeperClient(keeper_dir).status()).splitlines():
        say(f"    {line}")

    answer_port = testbed.free_port()
    say(f"step 4: start a second sipp run that answers calls (server mode, -p {answer_port})")
    answer = start_through_fdkeeper(
        sipp,
        "uas-answer.xml",
        kamailio.address,
        directory=keeper_dir,
        log_dir=logs,
        name="answer",
        transport="t1",
        local_port=answer_port,
        calls=1,
        timeout=30,
    )

    say(f"step 5: a third party calls sip:{USER}@{kamailio.domain} through Kamailio (sipp over UDP)")
    call = testbed.place_calls(kamailio, USER, 1, sipp=sipp, timeout=20, log_dir=logs)
    answered = answer.wait(20)
    connections = kamailio.tcp_connections()
    say(f"  caller: {call.successful} call(s) completed, {call.failed} failed")
    say(f"  answering run: {answered.successful} call(s) answered, exit status {answered.returncode}")
    say(f"  TCP connections at the SuT: {len(connections)} (the one opened by the register run)")
    ok = call.ok and answered.ok and len(connections) == 1
    if not ok:
        say(call.summary())
        say(answered.summary())
    return ok


def _without_fdkeeper(
    sipp: str, kamailio: testbed.Kamailio, logs: Path, workdir: Path, say: Callable[[str], None]
) -> None:
    """The problem: once the register run's exit closed its connection, calls to the user fail."""
    users = testbed.write_users_csv(workdir / "plain-users.csv", [PLAIN_USER], kamailio.domain, kamailio.auth_users)
    testbed.run_sipp(
        sipp,
        "uac-register.xml",
        kamailio.address,
        log_dir=logs,
        name="plain-register",
        transport="t1",
        calls=1,
        timeout=10,
        extra=["-inf", str(users)],
    )
    call = testbed.place_calls(kamailio, PLAIN_USER, 1, sipp=sipp, timeout=10, log_dir=logs)
    final = re.search(r"SIP/2\.0 ([3-6]\d\d [^\r\n']*)", call.text("errors"))
    outcome = "answered (unexpected)" if call.ok else f"failed: {final.group(1) if final else 'no answer'}"
    say(f"  registered, then sipp exited and closed its connection; a call to {PLAIN_USER}: {outcome}")


def _websocket_steps(
    sipp: str,
    kamailio: testbed.Kamailio,
    pki: testbed.TestPki,
    keeper_dir: Path,
    logs: Path,
    workdir: Path,
    say: Callable[[str], None],
) -> bool:
    """The story over WSS: register, a call in the gap between runs, the next run answers it."""
    say("step 1: start the SuT, a WebRTC gateway")
    kamailio.start()
    wss = kamailio.wss_address
    if wss is None:  # not met: the demo's SuT is made with TLS and WebSocket
        raise RuntimeError(f"{kamailio} has no WSS listener")
    say(f"  Kamailio takes SIP over secure WebSocket at wss://{wss}/ (subprotocol sip); a WebSocket")
    say("  user's Contact is an .invalid host, so it is reached over the connection it registered on, or not at all")
    say("  (no sipp speaks WebSocket: fdkeeper makes the TLS and the HTTP Upgrade, and keeps the connection)")
    options = ("--ws", "--tls-ca", os.fspath(pki.ca_cert), "--tls-sni", pki.server_name)

    say(f"step 2: register {USER} over WSS through fdkeeper sipp --ws -t l1, in one sipp run (which then exits)")
    users = testbed.write_users_csv(workdir / "users.csv", [USER], kamailio.domain, kamailio.auth_users)
    port = testbed.free_port()
    register = _wss_run(
        sipp, "uac-register.xml", wss, keeper_dir, logs, "register", options, ["-inf", os.fspath(users)], port
    ).wait(30)
    if not register.ok:
        say(f"  FAILED: the register run did not succeed\n{register.summary()}")
        return False
    say(f"  registered; sipp exited with status {register.returncode}; the keeper still holds the WebSocket:")
    for line in format_status(KeeperClient(keeper_dir).status()).splitlines():
        say(f"    {line}")

    say(f"step 3: while no sipp runs, a third party calls sip:{USER}@{kamailio.domain} (sipp over UDP)")
    call = _call_in_the_gap(sipp, kamailio, keeper_dir, logs, say)
    if call is None:
        return False

    say("step 4: the next sipp run (server mode, fdkeeper sipp --ws -t l1) takes the connection and answers it")
    answer = _wss_run(sipp, "uas-answer.xml", wss, keeper_dir, logs, "answer", options, [], port)
    answered, called = answer.wait(30), call.wait(30)
    connections = kamailio.websocket_connections()
    say(f"  caller: {called.successful} call(s) completed, {called.failed} failed")
    say(f"  answering run: {answered.successful} call(s) answered, exit status {answered.returncode}")
    say(f"  WSS connections at the SuT: {len(connections)} (the one the register run opened)")
    ok = called.ok and answered.ok and [c["type"] for c in connections] == ["WSS"]
    if not ok:
        say(called.summary())
        say(answered.summary())
    return ok


def _call_in_the_gap(
    sipp: str, kamailio: testbed.Kamailio, keeper_dir: Path, logs: Path, say: Callable[[str], None]
) -> testbed.SippProcess | None:
    """The third party's call, once its INVITE waits in the kept connection (None: it never came)."""
    call = start_calls(
        kamailio, [USER], log_dir=logs, name="call-in-gap", sipp=sipp, local_port=testbed.free_port(), timeout=30
    )
    try:
        testbed.wait_until(lambda: _queued(keeper_dir) > 0, timeout=10, what="the INVITE to reach the kept WebSocket")
    except TimeoutError:
        say(f"  FAILED: the call did not reach the kept WebSocket\n{call.terminate().summary()}")
        return None
    say(f"  the INVITE waits in the kept connection ({_queued(keeper_dir)} bytes)")
    return call


def _wss_run(
    sipp: str,
    scenario: str,
    wss: str,
    keeper_dir: Path,
    logs: Path,
    name: str,
    options: tuple[str, ...],
    extra: list[str],
    local_port: int,
) -> testbed.SippProcess:
    """One sipp run over WSS through fdkeeper (register and answer alike on one -p: one identity)."""
    return start_through_fdkeeper(
        sipp,
        scenario,
        wss,
        directory=keeper_dir,
        log_dir=logs,
        name=name,
        options=options,
        transport="l1",
        local_port=local_port,
        calls=1,
        timeout=30,
        extra=extra,
    )


def _queued(keeper_dir: Path) -> int:
    """Bytes waiting in the kept connections (a request that arrived while no run held them)."""
    return sum(int(str(c.get("queued_bytes") or 0)) for c in KeeperClient(keeper_dir).status()["connections"])
