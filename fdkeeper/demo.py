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
    sipp: str | None = None, keep_files: bool = False, say: Callable[[str], None] = print, auth: bool = False
) -> bool:
    """The story step by step (`auth`: against a SuT that wants digest credentials); True when it worked."""
    sipp_path = os.fspath(find_sipp(sipp))
    workdir = Path(tempfile.mkdtemp(prefix="fdkeeper-demo-"))
    keeper_dir = workdir / "keeper"
    logs = workdir / "logs"
    kamailio = testbed.Kamailio(workdir / "kamailio", auth_users=AUTH_USERS if auth else None)
    try:
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
