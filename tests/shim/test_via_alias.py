"""Seen from the SuT, a user's calls come from one client on one connection (issue 16, item 8).

sipp -t tn writes [local_port] (Via sent-by, Contact) from each call's own socket; through
fdkeeper that socket is a placeholder and the call leaves on the user's kept connection, so
fdkeeper sends the kept connection's port instead (helpers/shim/rewrite.c; ptrace: the same rewrite in
the traced sipp). Against a real Kamailio that aliases the Via port of every request to its
connection (force_tcp_alias(), testbed option alias_every_request): users register in one run,
make calls in two later runs and receive calls in a fourth; every Via the SuT sees from a user
names the user's kept connection, Kamailio never runs out of aliases, and no call is lost.
Runs with Debian's sipp 3.6.1 (preload) and with sipp 3.7.7's static build (ptrace).
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from fdkeeper import testbed
from fdkeeper.modes.ptrace import PtraceMode
from fdkeeper.pytest_plugin import Sipp
from fdkeeper.testbed.sipp import start_calls

USERS = 4
# (calls per user in each call run, call runs): 3.6.1 makes 12 calls per user, 13 Via ports per user
# without the rewrite, beyond what Kamailio aliases. sipp 3.7.7 leaves an ended call's socket open
# (its fd then shares the user's kept connection with the next call's, and sipp's blocking read
# on it hangs the run: a limit of per-call runs with 3.7.7 that is not this test's subject), so one
# call per user and run.
CALLS = {"3.6.1-preload": (6, 2), "3.7.7-preload": (1, 3), "3.7.7-static-ptrace": (1, 3)}
MAX_SOCKET = ("-max_socket", 4000)  # sipp -t tn refuses a -max_socket above the open-file limit
STOPS_BESIDE_HANDOFFS = 28  # as tests/ptrace/test_static_sipp.py: start-up and exit
STATIC_SIPP = testbed.sipp_build("sipp-static")
DYNAMIC_SIPP = testbed.sipp_build("sipp-tls")


def user_names(count: int) -> list[str]:
    return [f"user{index:04d}" for index in range(1, count + 1)]


def user_of(aor: str) -> str:
    return aor.removeprefix("sip:").split("@")[0]


def kept_local_by_user(keeper) -> dict[str, str]:
    return {user_of(c["aor"]): c["local"] for c in keeper.connections() if c["aor"] and c["state"] != "closed"}


def calls_to_callee(tmp_path: Path) -> Path:
    """uac-call-users.xml turned round: each CSV user calls sip:callee@domain."""
    text = (testbed.SCENARIOS_DIR / "uac-call-users.xml").read_text()
    text = (
        text.replace("INVITE sip:[field0]@[field1]", "INVITE sip:callee@[field1]")
        .replace("To: <sip:[field0]@[field1]>", "To: <sip:callee@[field1]>")
        .replace("<sip:caller@", "<sip:[field0]@")
    )
    path = tmp_path / "uac-user-calls-callee.xml"
    path.write_text(text)
    return path


def callee_scenario(tmp_path: Path) -> Path:
    """uas-answer.xml without its 180 and with its ACK optional: Kamailio's two UDP workers relay
    side by side, so a 180 may overtake the 200 (aborting the caller's call) and a BYE the ACK
    (bench/cpslib.py adapts the callee the same way)."""
    text = (testbed.SCENARIOS_DIR / "uas-answer.xml").read_text()
    text, dropped = re.subn(r"\n  <send>\s*<!\[CDATA\[\s*SIP/2.0 180 Ringing.*?</send>\n", "\n", text, flags=re.S)
    text, relaxed = re.subn(
        r'<recv request="ACK"[^>]*/>', '<recv request="ACK" optional="global" advance_state="false" crlf="true"/>', text
    )
    assert (dropped, relaxed) == (1, 1), "scenarios/uas-answer.xml changed: no 180 to drop, no ACK to relax"
    path = tmp_path / "uas-answer-no-180.xml"
    path.write_text(text)
    return path


@pytest.fixture
def aliasing_sut(tmp_path):
    workdir = Path(tempfile.mkdtemp(prefix="fdkv-"))  # the ctl socket's path must be short
    try:
        with testbed.Kamailio(workdir, alias_every_request=True) as kamailio:
            yield kamailio
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def sipp_under_test(build: str, plain: str) -> str:
    if build == "3.6.1-preload":
        return plain
    if build == "3.7.7-preload":
        if not DYNAMIC_SIPP.exists():
            pytest.skip(f"no sipp 3.7.7 at {DYNAMIC_SIPP}")
        return str(DYNAMIC_SIPP)
    if not STATIC_SIPP.exists():
        pytest.skip(f"no static sipp at {STATIC_SIPP}")
    if PtraceMode()._static_reason(Path(sys.executable).resolve()) is not None:
        pytest.skip("ptrace mode cannot run here")
    return str(STATIC_SIPP)


@pytest.mark.parametrize("build", ["3.6.1-preload", "3.7.7-preload", "3.7.7-static-ptrace"])
def test_a_users_requests_name_its_kept_connection(build, fdkeeper_keeper, fdkeeper_sipp_path, aliasing_sut, tmp_path):
    kamailio, keeper = aliasing_sut, fdkeeper_keeper
    sipp = Sipp(keeper, sipp_under_test(build, fdkeeper_sipp_path), tmp_path / "sipp")
    (tmp_path / "sipp").mkdir()
    names = user_names(USERS)
    users_csv = testbed.write_users_csv(tmp_path / "users.csv", names, kamailio.domain)
    per_run, runs = CALLS[build]
    calls = USERS * per_run
    callee_port = testbed.free_port()
    callee = testbed.start_sipp(
        fdkeeper_sipp_path,
        callee_scenario(tmp_path),
        kamailio.address,
        log_dir=tmp_path / "logs",
        name="callee",
        transport="u1",
        local_port=callee_port,
        calls=runs * calls,
        timeout=90,
    )
    try:
        kamailio.rpc(
            "ul.add", "location", "callee", f"sip:callee@127.0.0.1:{callee_port}", "3600", "1.0", "s:", "0", "0", "0"
        )
        common = ("-t", "tn", "-i", "127.0.0.1", "-timeout", 40, "-timeout_error", *MAX_SOCKET)
        registered = sipp.run(
            "-sf",
            "uac-register.xml",
            "-inf",
            users_csv,
            "-m",
            USERS,
            "-p",
            testbed.free_port(),
            *common,
            kamailio.address,
            name="register",
            timeout=60,
        )
        assert registered.ok, registered.tail()
        scenario = calls_to_callee(tmp_path)
        for run in range(1, runs + 1):
            made = sipp.run(
                "-sf",
                scenario,
                "-inf",
                users_csv,
                "-m",
                calls,
                "-r",
                20,
                "-l",
                2,
                "-p",
                testbed.free_port(),
                *common,
                kamailio.address,
                name=f"calls{run}",
                timeout=60,
                options=("--debug",) if "ptrace" in build else (),
            )  # --debug: the stop count
            assert made.ok, made.tail()
            if "ptrace" in build:  # 1 stop a call (the first send; the send stub notes epoll_ctl,
                # answers connect() and rewrites the ACK and the BYE inside sipp), start-up and exit
                stops, handoffs, rewritten = map(
                    int,
                    re.search(
                        r"(\d+) ptrace stops for (\d+) per-call handoff\(s\); (\d+) message", made.err.read_text()
                    ).groups(),
                )
                assert handoffs == calls and stops <= calls + STOPS_BESIDE_HANDOFFS, stops
                assert rewritten == 3 * calls  # INVITE, ACK, BYE
        answered_by_callee = callee.wait(30)
        assert answered_by_callee.successful == runs * calls, answered_by_callee.summary()

        answer = sipp.start(
            "-sf",
            "uas-answer.xml",
            "-m",
            USERS,
            "-p",
            testbed.free_port(),
            *common,
            kamailio.address,
            name="answer",
            timeout=60,
        )
        answer.wait_ready()
        incoming = start_calls(
            kamailio,
            names,
            log_dir=tmp_path / "logs",
            name="incoming",
            sipp=fdkeeper_sipp_path,
            local_port=testbed.free_port(),
            rate=20,
        )
        assert incoming.wait(40).successful == USERS
        assert answer.wait(40).ok
    finally:
        callee.terminate()

    kept = kept_local_by_user(keeper)
    assert sorted(kept) == names, "one kept connection per user"
    vias = [v for v in kamailio.request_vias() if v["user"] in kept]
    for name in names:
        own = [v for v in vias if v["user"] == name]
        assert len(own) == 1 + runs * 3 * per_run, own  # REGISTER, then INVITE, ACK and BYE of each call
        assert {v["sent_by"] for v in own} == {kept[name]}, own
        assert {v["source"] for v in own} == {kept[name]}
    assert kamailio.alias_failures() == 0, kamailio.log_tail()
