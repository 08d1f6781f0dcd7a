"""A static sipp (sipp 3.7.7's own release build: LD_PRELOAD cannot reach it) at parity with
preload, through `--mode auto` (which picks ptrace for it), against the real Kamailio.

-t tn / -t ln: each user registers over its own kept connection (the keeper picks it by the
From AoR of the first request on each of sipp's per-call sockets); a call arriving in the gap
and calls during the answer run are answered, which Kamailio does only over the connection
the user registered on. t1/l1 stay as they were.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from fdkeeper import testbed
from fdkeeper.client import KeeperClient
from fdkeeper.demo import start_through_fdkeeper
from fdkeeper.modes import MODES, RunNeeds, choose_mode
from fdkeeper.modes.ptrace import PtraceMode
from fdkeeper.modes.ptrace.aor import from_aor

STATIC_SIPP = testbed.sipp_build("sipp-static")
USERS = 12
# start-up (exec, the first handoff call by call, the handoff code and the send stub mapped), exit
STOPS_BESIDE_HANDOFFS = 28


def user_names(count: int) -> list[str]:
    return [f"user{index:04d}" for index in range(1, count + 1)]


def user_of(aor: str) -> str:
    return aor.removeprefix("sip:").split("@")[0]


def kept(keeper_dir) -> list[dict]:
    return KeeperClient(keeper_dir).status()["connections"]


def source_port_by_aor(kamailio, names: list[str]) -> dict[str, int]:
    """Kamailio's view: the source port each user registered from."""
    return {user_of(c["aor"]): int(c["source"]["port"]) for c in kamailio.location(names)}


def local_port_by_aor(keeper_dir) -> dict[str, int]:
    """The keeper's view: the local port of each user's kept connection."""
    return {
        user_of(c["aor"]): int(c["local"].rsplit(":", 1)[1])
        for c in kept(keeper_dir)
        if c["aor"] and c["state"] != "closed"
    }


def through_fdkeeper(scenario, remote, keeper_dir, tmp_path, name, *, transport, options=(), **sipp_options):
    return start_through_fdkeeper(
        str(STATIC_SIPP),
        scenario,
        remote,
        directory=keeper_dir,
        log_dir=tmp_path / "logs",
        name=name,
        options=tuple(options),
        transport=transport,
        **sipp_options,
    )


def static_sipp_calls(kamailio, tmp_path, users_csv, count, name):
    """A plain static sipp over UDP calling each user of the CSV through Kamailio."""
    command = testbed.sipp_command(
        str(STATIC_SIPP),
        "uac-call-users.xml",
        kamailio.address,
        log_dir=tmp_path / "logs",
        name=name,
        transport="u1",
        local_ip=kamailio.host,
        calls=count,
        rate=50,
        timeout=30,
        extra=["-inf", str(users_csv)],
    )
    (tmp_path / "logs").mkdir(parents=True, exist_ok=True)
    return testbed.SippProcess(command, tmp_path / "logs", name)


pytestmark = [
    pytest.mark.skipif(not STATIC_SIPP.exists(), reason=f"no static sipp at {STATIC_SIPP}"),
    pytest.mark.skipif(
        PtraceMode()._static_reason(Path(sys.executable).resolve()) is not None, reason="ptrace mode cannot run here"
    ),
]


def test_auto_picks_ptrace_for_a_static_per_call_client():
    needs = RunNeeds(role="client", per_call_option="-t tn")
    assert choose_mode("auto", STATIC_SIPP, needs) is MODES["ptrace"]
    assert choose_mode("ptrace", STATIC_SIPP, needs) is MODES["ptrace"]


@pytest.mark.parametrize(
    "message, aor",
    [
        (
            b'REGISTER sip:d SIP/2.0\r\nVia: x\r\nFrom: "A <b>;c" <sip:alice@d;transport=tcp>;tag=1\r\n\r\n',
            "sip:alice@d",
        ),
        (b"INVITE sip:bob@d SIP/2.0\r\nf: sip:u@h;tag=2\r\n\r\n", "sip:u@h"),
        (b"INVITE sip:bob@d SIP/2.0\r\nFROM : <sip:u;x@h;lr?h=1>;tag=2\r\n\r\n", "sip:u;x@h"),
        (b"INVITE sip:bob@d SIP/2.0\r\nTo: <sip:bob@d>\r\n\r\nFrom: <sip:body@d>", None),
        (b"INVITE sip:bob@d SIP/2.0\r\nFrom: <sip:open@d\r\n\r\n", None),
    ],
)
def test_the_aor_is_read_as_the_shim_reads_it(message, aor):
    assert from_aor(message) == aor


def register_gap_answer(kamailio, remote, keeper_dir, tmp_path, transport, options=()):
    """The whole story for USERS users through `--mode auto` (ptrace for a static sipp)."""
    names = user_names(USERS)
    users_csv = testbed.write_users_csv(tmp_path / "users.csv", names, kamailio.domain)
    register = through_fdkeeper(
        "uac-register.xml",
        remote,
        keeper_dir,
        tmp_path,
        "register",
        transport=transport,
        options=(*options, "--debug"),
        calls=USERS,
        rate=200,
        timeout=30,
        extra=["-inf", str(users_csv), "-l", str(USERS), "-max_socket", "400"],
    ).wait(60)
    assert register.ok and register.successful == USERS, register.summary()
    assert register.text("stderr").count("fdkeeper-ptrace: send(fd ") == USERS  # a ptrace handoff per user
    # Each socket's epoll registration as noted at sipp's epoll_ctl, not read from /proc/PID/fdinfo
    # (which lists every registration: milliseconds per call with a thousand users), and re-added
    # without an injected call.
    assert register.text("stderr").count("1 epoll registration(s) noted at epoll_ctl, re-added from outside") == USERS
    # The first handoff of the run injects pidfd_getfd/dup3/close call by call and maps the code
    # that does all three; every later one runs that code: one stop instead of five.
    assert register.text("stderr").count("in one stop;") == USERS - 1
    assert register.text("stderr").count("connect() to the SuT answered by the stub") == 1
    assert register.text("stderr").count("epoll_ctl() registrations noted by the stub") == 1
    # sipp waits on the tracer at each ptrace stop: per handoff its send, the filter's one stop
    # (once the first send showed it is a plain send(), no thread steps to it: sipp's
    # fcntl(F_SETFL) runs unseen, and its connect() and epoll_ctl() wrappers are patched to the
    # send stub's fdk_connect, which answers it without a syscall, and fdk_epoll_ctl, which notes
    # the registration in the program); the first handoff and start-up add a few.
    stops, handoffs = map(
        int, re.search(r"(\d+) ptrace stops for (\d+) per-call handoff", register.text("stderr")).groups()
    )
    assert handoffs == USERS and stops <= USERS + STOPS_BESIDE_HANDOFFS, stops

    connections = kept(keeper_dir)
    assert len(connections) == USERS and all(c["state"] == "idle" for c in connections)
    assert sorted(user_of(c["aor"]) for c in connections) == names
    registered = source_port_by_aor(kamailio, names)
    assert registered == local_port_by_aor(keeper_dir)  # each user over its own kept connection
    assert len(set(registered.values())) == USERS

    # A call in the gap (no run attached) waits in the keeper for the answer run.
    gap = static_sipp_calls(
        kamailio, tmp_path, testbed.write_users_csv(tmp_path / "gap.csv", names[:1], kamailio.domain), 1, "gap"
    )
    answer = through_fdkeeper(
        "uas-answer.xml",
        remote,
        keeper_dir,
        tmp_path,
        "answer",
        transport=transport,
        options=options,
        calls=USERS + 1,
        timeout=60,
        local_port=testbed.free_port(),
        extra=["-max_socket", "400"],
    )
    during = static_sipp_calls(kamailio, tmp_path, users_csv, USERS, "during").wait(60)
    answered = answer.wait(60)
    gap_result = gap.wait(30)
    assert gap_result.ok and gap_result.successful == 1, gap_result.summary()
    assert during.ok and during.successful == USERS, during.summary()
    assert answered.ok and answered.successful == USERS + 1, answered.summary()  # a server run handed them all
    # The registrations outlived the register run, each still on its own connection.
    assert source_port_by_aor(kamailio, names) == registered


def test_tn_static_sipp_one_kept_connection_per_user(kamailio, keeper_dir, tmp_path):
    register_gap_answer(kamailio, kamailio.address, keeper_dir, tmp_path, "tn")
    assert len(kamailio.tcp_connections()) == USERS  # none added, none lost


def test_ln_static_sipp_one_kept_tls_connection_per_user(kamailio_tls, test_pki, keeper_dir, tmp_path):
    tls = ("--tls-ca", str(test_pki.ca_cert), "--tls-sni", test_pki.server_name)
    register_gap_answer(kamailio_tls, kamailio_tls.tls_address, keeper_dir, tmp_path, "ln", options=tls)
    assert len([c for c in kamailio_tls.tcp_connections() if str(c["type"]).lower() == "tls"]) == USERS


@pytest.mark.parametrize("transport", ["t1", "l1"])
def test_single_connection_static_sipp_still_works(kamailio_tls, test_pki, keeper_dir, tmp_path, transport):
    tls = transport == "l1"
    remote = kamailio_tls.tls_address if tls else kamailio_tls.address
    options = ("--tls-ca", str(test_pki.ca_cert), "--tls-sni", test_pki.server_name) if tls else ()
    users_csv = testbed.write_users_csv(tmp_path / "users.csv", ["alice"], kamailio_tls.domain)
    register = start_through_fdkeeper(
        str(STATIC_SIPP),
        "uac-register.xml",
        remote,
        directory=keeper_dir,
        log_dir=tmp_path / "logs",
        name="register",
        options=options,
        transport=transport,
        calls=1,
        timeout=15,
        extra=["-inf", str(users_csv)],
    ).wait(30)
    assert register.ok, register.summary()
    answer = start_through_fdkeeper(
        str(STATIC_SIPP),
        "uas-answer.xml",
        remote,
        directory=keeper_dir,
        log_dir=tmp_path / "logs",
        name="answer",
        options=options,
        transport=transport,
        calls=1,
        timeout=30,
        local_port=testbed.free_port(),
    )
    caller = testbed.place_calls(kamailio_tls, "alice", 1, sipp=str(STATIC_SIPP), timeout=15, log_dir=tmp_path / "logs")
    answered = answer.wait(30)
    assert caller.ok and caller.successful == 1, caller.summary()
    assert answered.ok and answered.successful == 1, answered.summary()
