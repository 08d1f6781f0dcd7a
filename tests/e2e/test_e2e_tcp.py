"""End to end over TCP: Debian's sipp through `fdkeeper sipp`, against a real Kamailio.

Kamailio (fdkeeper/testbed/) reaches a registered user only over the connection the
REGISTER came in on and never dials out to a user, so a call can only be answered if the
register run's connection is still open and the answering run is reading it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fdkeeper import testbed
from fdkeeper.client import KeeperClient
from fdkeeper.demo import start_through_fdkeeper
from fdkeeper.errors import FdkeeperError
from fdkeeper.testbed import fdkeeper_command, wait_until

USER = "alice"


@pytest.fixture
def users(tmp_path, kamailio):
    return testbed.write_users_csv(tmp_path / "users.csv", [USER], kamailio.domain)


def start(sipp_path, kamailio, keeper_dir, tmp_path, name, scenario, *, options=(), **sipp_options):
    return start_through_fdkeeper(
        sipp_path,
        scenario,
        kamailio.address,
        directory=keeper_dir,
        log_dir=tmp_path / "logs",
        name=name,
        options=tuple(options),
        transport="t1",
        **sipp_options,
    )


def register(sipp_path, kamailio, keeper_dir, tmp_path, users, name="register", options=(), **sipp_options):
    result = start(
        sipp_path,
        kamailio,
        keeper_dir,
        tmp_path,
        name,
        "uac-register.xml",
        options=options,
        calls=1,
        timeout=15,
        extra=["-inf", str(users)],
        **sipp_options,
    ).wait(30)
    assert result.ok, result.summary()
    return result


def start_answer(sipp_path, kamailio, keeper_dir, tmp_path, name="answer", calls=1, options=()):
    return start(
        sipp_path,
        kamailio,
        keeper_dir,
        tmp_path,
        name,
        "uas-answer.xml",
        options=options,
        calls=calls,
        timeout=30,
        local_port=testbed.free_port(),
    )


def call(kamailio, sipp_path, tmp_path, count=1, timeout=15):
    return testbed.place_calls(kamailio, USER, count, sipp=sipp_path, timeout=timeout, log_dir=tmp_path / "logs")


def kept(keeper_dir) -> list[dict]:
    """The keeper's connections; [] while no keeper runs yet."""
    try:
        return KeeperClient(keeper_dir).status()["connections"]
    except FdkeeperError:
        return []


def registered_source_ports(kamailio) -> set[int]:
    return {int(c["received"].rsplit(":", 1)[1].split(";")[0]) for c in kamailio.location() if c.get("received")}


def fdkeeper_cli(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "fdkeeper", *args], capture_output=True, text=True, timeout=timeout)


def test_register_then_answer_over_the_kept_connection(sipp, kamailio_sut, fdkeeper_keeper, tmp_path):
    """With the pytest plugin's fixtures (fdkeeper/pytest_plugin.py): `sipp` runs through
    the test's own keeper, `kamailio_sut` is the embedded SuT."""
    users = kamailio_sut.users_csv(tmp_path / "users.csv", [USER])
    # A -p of its own: without one sipp takes 5060 if free, and two runs side by side (pytest -n)
    # race for it; with it, register and answer runs share one identity, as over UDP.
    port = testbed.free_port()
    registered = sipp.run(
        "-sf",
        "uac-register.xml",
        "-inf",
        users,
        "-t",
        "t1",
        "-i",
        "127.0.0.1",
        "-p",
        port,
        "-m",
        1,
        kamailio_sut.address,
        timeout=30,
    )
    assert registered.ok, registered.tail()
    [connection] = fdkeeper_keeper.connections()
    assert connection["state"] == "idle"
    local_port = int(connection["local"].rsplit(":", 1)[1])
    assert registered_source_ports(kamailio_sut.kamailio) == {local_port}

    answer = sipp.start(
        "-sf", "uas-answer.xml", "-t", "t1", "-i", "127.0.0.1", "-p", port, "-m", 3, kamailio_sut.address, timeout=30
    )
    caller = kamailio_sut.call(USER, count=3, timeout=15)
    answered = answer.wait(30)
    assert caller.ok and caller.successful == 3, caller.summary()
    assert answered.ok and answered.successful == 3, answered.tail()
    assert len(kamailio_sut.kamailio.tcp_connections()) == 1  # the same connection all along
    assert fdkeeper_keeper.connections()[0]["leases"] == 2


def test_without_a_run_holding_it_an_invite_waits_for_the_next_run(sipp_path, kamailio, keeper_dir, tmp_path, users):
    register(sipp_path, kamailio, keeper_dir, tmp_path, users)
    caller = testbed.start_sipp(
        sipp_path,
        "uac-call.xml",
        kamailio.address,
        log_dir=tmp_path / "logs",
        name="early-call",
        transport="u1",
        local_ip=kamailio.host,
        calls=1,
        timeout=25,
        extra=["-s", USER, "-key", "domain", kamailio.domain],
    )
    # The INVITE reaches the kept connection while no sipp holds it: it waits in the socket.
    wait_until(lambda: kept(keeper_dir)[0]["queued_bytes"] > 0, timeout=10)
    assert kept(keeper_dir)[0]["state"] == "idle"
    answer = start_answer(sipp_path, kamailio, keeper_dir, tmp_path)
    answered = answer.wait(30)
    called = caller.wait(30)
    assert answered.ok, answered.summary()
    assert called.ok, called.summary()


def test_register_run_killed_with_sigkill_the_next_run_still_answers(sipp_path, kamailio, keeper_dir, tmp_path, users):
    holding = tmp_path / "register-and-hold.xml"
    text = (testbed.SCENARIOS_DIR / "uac-register.xml").read_text()
    holding.write_text(text.replace("</scenario>", '  <pause milliseconds="60000"/>\n</scenario>'))
    run = start(
        sipp_path,
        kamailio,
        keeper_dir,
        tmp_path,
        "register-hold",
        str(holding),
        calls=1,
        timeout=60,
        extra=["-inf", str(users)],
    )
    wait_until(
        lambda: any(c["aor"].startswith(f"sip:{USER}@") or c["aor"].startswith(USER) for c in kamailio.location()),
        timeout=10,
    )
    os.killpg(run.pid, signal.SIGKILL)  # the whole run, as a CI timeout does it
    run.wait(10)
    wait_until(lambda: kept(keeper_dir)[0]["state"] == "idle", timeout=10)

    answer = start_answer(sipp_path, kamailio, keeper_dir, tmp_path)
    caller = call(kamailio, sipp_path, tmp_path)
    answered = answer.wait(30)
    assert caller.ok, caller.summary()
    assert answered.ok, answered.summary()


def test_sut_restart_gives_a_clear_error_and_reconnect_recovers(sipp_path, kamailio, keeper_dir, tmp_path, users):
    register(sipp_path, kamailio, keeper_dir, tmp_path, users)
    kamailio.restart()
    wait_until(lambda: kept(keeper_dir)[0]["state"] == "closed", timeout=10)

    refused = start_answer(sipp_path, kamailio, keeper_dir, tmp_path, name="answer-closed").wait(15)
    assert refused.returncode == 2
    assert "was closed at" in refused.text("stderr") and "--reconnect" in refused.text("stderr")

    reregister = register(sipp_path, kamailio, keeper_dir, tmp_path, users, name="reregister", options=("--reconnect",))
    assert "registrations made over the old one must be redone" in reregister.text("stderr")
    answer = start_answer(sipp_path, kamailio, keeper_dir, tmp_path)
    caller = call(kamailio, sipp_path, tmp_path)
    answered = answer.wait(30)
    assert caller.ok, caller.summary()
    assert answered.ok, answered.summary()


def test_keepalive_pongs_never_reach_the_next_run(sipp_path, kamailio, keeper_dir, tmp_path, users):
    register(sipp_path, kamailio, keeper_dir, tmp_path, users, options=("--keepalive", "1"))
    wait_until(lambda: kept(keeper_dir)[0]["pongs"] >= 2, timeout=10)  # Kamailio answered our CRLFCRLF pings
    assert kept(keeper_dir)[0]["queued_bytes"] == 0
    answer = start_answer(sipp_path, kamailio, keeper_dir, tmp_path)
    caller = call(kamailio, sipp_path, tmp_path)
    answered = answer.wait(30)
    # A stray CRLF would have been glued onto the INVITE and the call lost.
    assert caller.ok, caller.summary()
    assert answered.ok, answered.summary()


def test_the_kept_connection_leaves_from_the_address_and_port_sipp_binds(
    sipp_path, kamailio, keeper_dir, tmp_path, users
):
    port = testbed.free_port()
    register(sipp_path, kamailio, keeper_dir, tmp_path, users, local_port=port)
    assert kept(keeper_dir)[0]["local"] == f"127.0.0.1:{port}"
    assert registered_source_ports(kamailio) == {port}


def test_a_server_run_without_remote_host_gets_every_kept_connection(sipp_path, kamailio, keeper_dir, tmp_path, users):
    register(sipp_path, kamailio, keeper_dir, tmp_path, users)
    log_dir = tmp_path / "logs"
    cmd = testbed.sipp_command(
        sipp_path,
        "uas-answer.xml",
        kamailio.address,
        log_dir=log_dir,
        name="answer-any",
        transport="t1",
        local_port=testbed.free_port(),
        calls=1,
        timeout=30,
    )[:-1]  # no remote host
    answer = testbed.SippProcess(fdkeeper_command(cmd, keeper_dir), log_dir, "answer-any")
    caller = call(kamailio, sipp_path, tmp_path)
    answered = answer.wait(30)
    assert caller.ok, caller.summary()
    assert answered.ok, answered.summary()


def test_a_busy_connection_names_its_holder_and_wait_waits(sipp_path, kamailio, keeper_dir, tmp_path, users):
    holding = tmp_path / "register-and-hold.xml"
    text = (testbed.SCENARIOS_DIR / "uac-register.xml").read_text()
    holding.write_text(text.replace("</scenario>", '  <pause milliseconds="3000"/>\n</scenario>'))
    first = start(
        sipp_path, kamailio, keeper_dir, tmp_path, "hold", str(holding), calls=1, timeout=20, extra=["-inf", str(users)]
    )
    wait_until(lambda: kept(keeper_dir) and kept(keeper_dir)[0]["state"] == "leased", timeout=10)
    holder = kept(keeper_dir)[0]["holder_pid"]

    busy = start(
        sipp_path,
        kamailio,
        keeper_dir,
        tmp_path,
        "busy",
        "uac-register.xml",
        calls=1,
        timeout=10,
        extra=["-inf", str(users)],
    ).wait(20)
    assert busy.returncode == 2
    assert f"is leased by pid {holder} (sipp)" in busy.text("stderr") and "--wait" in busy.text("stderr")

    waited = start(
        sipp_path,
        kamailio,
        keeper_dir,
        tmp_path,
        "waited",
        "uac-register.xml",
        options=("--wait", "20"),
        calls=1,
        timeout=20,
        extra=["-inf", str(users)],
    ).wait(40)
    assert waited.ok, waited.summary()
    assert first.wait(20).ok


def test_bad_inputs_are_one_line_and_exit_2(tmp_path, kamailio, users, keeper_dir):
    scenario = str(testbed.SCENARIOS_DIR / "uac-register.xml")
    base = ["sipp", "--dir", str(keeper_dir)]
    cases = {
        "no sipp": (
            ["--sipp", str(tmp_path / "no-such-sipp"), "-sf", scenario, "-t", "t1", kamailio.address],
            "sipp not found",
        ),
        "no remote": (["-sf", scenario, "-t", "t1", "-i", "127.0.0.1"], "needs the SuT's address"),
        "refused": (
            ["-sf", scenario, "-t", "t1", "-i", "127.0.0.1", "-inf", str(users), f"127.0.0.1:{testbed.free_port()}"],
            "refused the connection",
        ),
        "sctp": (["-sf", scenario, "-t", "s1", kamailio.address], "-t s1 is not kept by fdkeeper"),
        "missing scenario": (["-sf", str(tmp_path / "nope.xml"), "-t", "t1", kamailio.address], "not found; check -sf"),
    }
    for name, (args, expected) in cases.items():
        result = fdkeeper_cli(*base, *args)
        assert result.returncode == 2, (name, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fdkeeper: ") and expected in lines[0], (name, result.stderr)
    unwritable = tmp_path / "a-file"
    unwritable.write_text("")
    result = fdkeeper_cli("sipp", "--dir", str(unwritable / "state"), "-sf", scenario, "-t", "t1", kamailio.address)
    assert result.returncode == 2 and "cannot create the state directory" in result.stderr


def test_udp_passes_straight_through_with_a_notice(sipp_path, kamailio, keeper_dir, tmp_path, users):
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    cmd = testbed.sipp_command(
        sipp_path,
        "uac-register.xml",
        kamailio.address,
        log_dir=log_dir,
        name="udp",
        transport="u1",
        calls=1,
        timeout=10,
        extra=["-inf", str(users)],
    )
    result = testbed.SippProcess(fdkeeper_command(cmd, keeper_dir), log_dir, "udp").wait(20)
    assert result.ok, result.summary()
    assert "UDP transport: there is no connection to keep" in result.text("stderr")
    assert not (keeper_dir / "control.sock").exists()  # no keeper was needed


def test_sipp_exit_status_is_passed_through(sipp_path, kamailio, keeper_dir, tmp_path, users):
    port = testbed.free_port()  # one identity: an answer run on another -p would get a notice (test_identities.py)
    register(sipp_path, kamailio, keeper_dir, tmp_path, users, local_port=port)
    # An answer run that times out without a call: sipp's own failure status, not fdkeeper's.
    result = start(
        sipp_path, kamailio, keeper_dir, tmp_path, "no-call", "uas-answer.xml", calls=1, timeout=2, local_port=port
    ).wait(20)
    assert result.returncode not in (0, 2)
    assert "fdkeeper:" not in result.text("stderr")


def test_sigterm_to_fdkeeper_sipp_reaches_sipp_and_spares_the_keeper(sipp_path, kamailio, keeper_dir, tmp_path, users):
    register(sipp_path, kamailio, keeper_dir, tmp_path, users)
    answer = start_answer(sipp_path, kamailio, keeper_dir, tmp_path)
    wait_until(lambda: kept(keeper_dir)[0]["state"] == "leased", timeout=10)
    sipp_pid = kept(keeper_dir)[0]["holder_pid"]
    os.kill(answer.pid, signal.SIGTERM)  # fdkeeper sipp alone; it passes the signal on
    result = answer.wait(10)
    assert result.returncode is not None  # sipp ended on the signal; its status is its own
    wait_until(lambda: not Path(f"/proc/{sipp_pid}").exists(), timeout=10)
    wait_until(lambda: kept(keeper_dir)[0]["state"] == "idle", timeout=10)
    assert len(kamailio.tcp_connections()) == 1


def test_status_and_stop_from_the_command_line(sipp_path, kamailio, keeper_dir, tmp_path, users):
    register(sipp_path, kamailio, keeper_dir, tmp_path, users)
    table = fdkeeper_cli("status", "--dir", str(keeper_dir))
    assert table.returncode == 0 and "idle" in table.stdout and kamailio.address in table.stdout
    document = json.loads(fdkeeper_cli("status", "--dir", str(keeper_dir), "--json").stdout)
    [connection] = document["connections"]
    assert set(connection) >= {"id", "transport", "local", "remote", "state", "holder_pid", "age"}
    assert connection["remote"] == kamailio.address
    stopped = fdkeeper_cli("stop", "--dir", str(keeper_dir))
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    wait_until(lambda: len(kamailio.tcp_connections()) == 0, timeout=10)
    after = fdkeeper_cli("status", "--dir", str(keeper_dir))
    assert after.returncode == 2 and "no keeper runs for" in after.stderr


def test_demo_passes(sipp_path):
    result = fdkeeper_cli("demo", "--sipp", sipp_path, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo PASSED" in result.stdout
    assert "a call to bob: failed" in result.stdout  # the problem, shown without fdkeeper
