"""End to end over TLS: Debian's sipp (no TLS of its own) through `fdkeeper sipp -t l1`,
against a real Kamailio with kamailio-tls-modules and certificates made by the tests.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fdkeeper import testbed
from fdkeeper.client import KeeperClient
from fdkeeper.demo import start_through_fdkeeper
from fdkeeper.errors import FdkeeperError
from fdkeeper.testbed import wait_until

USER = "alice"


def start_kamailio(tmp_path: Path, pki, **tls):
    instance = testbed.Kamailio(tmp_path / "kamailio-tls", tls=testbed.KamailioTls.server(pki, **tls))
    instance.start()
    return instance


@pytest.fixture
def kamailio_tls(tmp_path, pki):
    instance = start_kamailio(tmp_path, pki)
    yield instance
    instance.stop()
    print(f"--- kamailio log tail ---\n{instance.log_tail(60)}")


@pytest.fixture
def users(tmp_path):
    return testbed.write_users_csv(tmp_path / "users.csv", [USER], testbed.DEFAULT_DOMAIN)


def verified(pki) -> tuple[str, ...]:
    return ("--tls-ca", str(pki.ca_cert), "--tls-sni", pki.server_name)


def start(sipp_path, kamailio, keeper_dir, tmp_path, name, scenario, *, options=(), **sipp_options):
    return start_through_fdkeeper(
        sipp_path,
        scenario,
        kamailio.tls_address,
        directory=keeper_dir,
        log_dir=tmp_path / "logs",
        name=name,
        options=tuple(options),
        transport="l1",
        **sipp_options,
    )


def register(sipp_path, kamailio, keeper_dir, tmp_path, users, *, options, name="register", local_port=None):
    return start(
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
        local_port=local_port,
    ).wait(30)


def start_answer(sipp_path, kamailio, keeper_dir, tmp_path, name="answer", calls=1):
    return start(
        sipp_path,
        kamailio,
        keeper_dir,
        tmp_path,
        name,
        "uas-answer.xml",
        calls=calls,
        timeout=30,
        local_port=testbed.free_port(),
    )


def call(kamailio, sipp_path, tmp_path, count=1):
    return testbed.place_calls(kamailio, USER, count, sipp=sipp_path, timeout=15, log_dir=tmp_path / "logs")


def kept(keeper_dir) -> list[dict]:
    try:
        return KeeperClient(keeper_dir).status()["connections"]
    except FdkeeperError:
        return []


def tls_connections(kamailio) -> list[dict]:
    return [c for c in kamailio.tcp_connections() if str(c.get("type", "")).lower() == "tls"]


def answer_a_call(sipp_path, kamailio, keeper_dir, tmp_path, name="answer"):
    answer = start_answer(sipp_path, kamailio, keeper_dir, tmp_path, name=name)
    caller = call(kamailio, sipp_path, tmp_path)
    answered = answer.wait(30)
    assert caller.ok, caller.summary()
    assert answered.ok, answered.summary()


def test_register_then_answer_over_one_tls_session(sipp_path, kamailio_tls, keeper_dir, tmp_path, users, pki):
    registered = register(sipp_path, kamailio_tls, keeper_dir, tmp_path, users, options=verified(pki))
    assert registered.ok, registered.summary()
    [connection] = kept(keeper_dir)
    assert connection["transport"] == "tls" and connection["tls"]["peer_subject"].startswith("CN=sut.test")
    table = subprocess.run(
        [sys.executable, "-m", "fdkeeper", "status", "--dir", str(keeper_dir)], capture_output=True, text=True
    )
    assert "TLSv1.3" in table.stdout and "peer CN=sut.test" in table.stdout and "SNI sut.test" in table.stdout
    [contact] = kamailio_tls.location()
    assert "transport=TLS" in contact["contact"]  # [transport] said TLS, as a TLS sipp would
    assert contact["source"]["transport"].lower() == "tls"
    before = tls_connections(kamailio_tls)
    assert len(before) == 1

    answer = start_answer(sipp_path, kamailio_tls, keeper_dir, tmp_path, calls=2)
    caller = call(kamailio_tls, sipp_path, tmp_path, count=2)
    answered = answer.wait(30)
    assert caller.ok and caller.successful == 2, caller.summary()
    assert answered.ok and answered.successful == 2, answered.summary()
    after = tls_connections(kamailio_tls)
    assert [(c["id"], c["remote"]) for c in after] == [(c["id"], c["remote"]) for c in before]  # same session


def test_wrong_ca_is_one_clear_line(sipp_path, kamailio_tls, keeper_dir, tmp_path, users, pki):
    result = register(
        sipp_path,
        kamailio_tls,
        keeper_dir,
        tmp_path,
        users,
        options=("--tls-ca", str(pki.other_ca_cert), "--tls-sni", pki.server_name),
    )
    assert result.returncode == 2
    [line] = result.text("stderr").strip().splitlines()
    assert f"TLS handshake with the SuT at {kamailio_tls.tls_address}/tls failed: certificate verification" in line
    assert kept(keeper_dir) == []


def test_insecure_works_and_warns(sipp_path, kamailio_tls, keeper_dir, tmp_path, users):
    result = register(sipp_path, kamailio_tls, keeper_dir, tmp_path, users, options=("--tls-insecure",))
    assert result.ok, result.summary()
    assert "warning: --tls-insecure" in result.text("stderr")


def test_mutual_tls(sipp_path, tmp_path, keeper_dir, users, pki):
    kamailio = start_kamailio(tmp_path, pki, require_client_cert=True)
    try:
        refused = register(sipp_path, kamailio, keeper_dir, tmp_path, users, options=verified(pki), name="no-cert")
        assert refused.returncode == 2
        assert "pass --tls-cert and --tls-key" in refused.text("stderr")
        with_cert = (*verified(pki), "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key))
        registered = register(sipp_path, kamailio, keeper_dir, tmp_path, users, options=with_cert)
        assert registered.ok, registered.summary()
        answer_a_call(sipp_path, kamailio, keeper_dir, tmp_path)
    finally:
        kamailio.stop()


def test_register_run_sigkilled_the_next_run_answers(sipp_path, kamailio_tls, keeper_dir, tmp_path, users, pki):
    holding = tmp_path / "register-and-hold.xml"
    holding.write_text(
        (testbed.SCENARIOS_DIR / "uac-register.xml")
        .read_text()
        .replace("</scenario>", '  <pause milliseconds="60000"/>\n</scenario>')
    )
    run = start(
        sipp_path,
        kamailio_tls,
        keeper_dir,
        tmp_path,
        "hold",
        str(holding),
        options=verified(pki),
        calls=1,
        timeout=60,
        extra=["-inf", str(users)],
    )
    wait_until(lambda: len(kamailio_tls.location()) == 1, timeout=10)
    import os

    os.killpg(run.pid, signal.SIGKILL)
    run.wait(10)
    wait_until(lambda: kept(keeper_dir)[0]["state"] == "idle", timeout=10)
    answer_a_call(sipp_path, kamailio_tls, keeper_dir, tmp_path)
    assert len(tls_connections(kamailio_tls)) == 1


DYING_RUN = """
import os, signal, sys
from pathlib import Path
from fdkeeper.client import KeeperClient
host, port = sys.argv[2].rsplit(":", 1)
local = sys.argv[5]  # the register run's -p (or "-": none): the same identity (keeper/identity.py)
[(_, fd)] = KeeperClient(Path(sys.argv[1])).lease(role="client", transport="tls", remote=(host, int(port)), local=local)
if sys.argv[3] == "write":
    os.write(fd, sys.argv[4].encode())
    import time; time.sleep(0.3)
else:
    os.read(fd, int(sys.argv[4]))
os.kill(os.getpid(), signal.SIGKILL)
"""


def dying_run(keeper_dir, kamailio, action, argument, port=None) -> None:
    """A run (from -p port) that leases the TLS connection, writes or reads part of a message, and is SIGKILLed."""
    local = f"127.0.0.1:{port}" if port else "-"
    command = [sys.executable, "-c", DYING_RUN, str(keeper_dir), kamailio.tls_address, action, argument, local]
    assert subprocess.run(command, timeout=30).returncode == -signal.SIGKILL


def test_a_run_killed_mid_write_leaves_the_sut_parsing(sipp_path, kamailio_tls, keeper_dir, tmp_path, users, pki):
    # Both REGISTERs from the same -p: one Contact, so the call below is not forked to two.
    port = testbed.free_port()
    registered = register(sipp_path, kamailio_tls, keeper_dir, tmp_path, users, options=verified(pki), local_port=port)
    assert registered.ok, registered.summary()
    big = "x" * 20000
    half = (
        f"MESSAGE sip:{USER}@{testbed.DEFAULT_DOMAIN} SIP/2.0\r\nVia: SIP/2.0/TLS 127.0.0.1:5999;branch=z9hG4bKhalf\r\n"
        f"Content-Length: {len(big)}\r\n\r\n{big[:9000]}"
    )
    dying_run(keeper_dir, kamailio_tls, "write", half, port)
    wait_until(lambda: kept(keeper_dir)[0]["state"] == "idle", timeout=10)
    assert kept(keeper_dir)[0]["tls"]["dropped_bytes"] == len(half)
    # The SuT never saw the half message: the next run's REGISTER parses and succeeds.
    again = register(
        sipp_path, kamailio_tls, keeper_dir, tmp_path, users, options=verified(pki), name="reregister", local_port=port
    )
    assert again.ok, again.summary()
    answer_a_call(sipp_path, kamailio_tls, keeper_dir, tmp_path)


def test_a_run_killed_mid_read_leaves_the_next_on_a_message_boundary(
    sipp_path, kamailio_tls, keeper_dir, tmp_path, users, pki
):
    registered = register(sipp_path, kamailio_tls, keeper_dir, tmp_path, users, options=verified(pki))
    assert registered.ok, registered.summary()
    first = testbed.start_sipp(
        sipp_path,
        "uac-call.xml",
        kamailio_tls.address,
        log_dir=tmp_path / "logs",
        name="lost-call",
        transport="u1",
        local_ip=kamailio_tls.host,
        calls=1,
        timeout=10,
        extra=["-s", USER, "-key", "domain", testbed.DEFAULT_DOMAIN],
    )
    wait_until(lambda: kept(keeper_dir)[0]["queued_bytes"] > 0, timeout=10)  # the INVITE waits for a run
    dying_run(keeper_dir, kamailio_tls, "read", "100")  # reads the start of it and dies
    wait_until(lambda: kept(keeper_dir)[0]["state"] == "idle", timeout=10)
    assert kept(keeper_dir)[0]["queued_bytes"] == 0  # the rest of that INVITE was dropped
    first.wait(20)
    answer_a_call(sipp_path, kamailio_tls, keeper_dir, tmp_path)  # and the next call is clean


def test_sut_closing_the_tls_connection_between_runs(sipp_path, kamailio_tls, keeper_dir, tmp_path, users, pki):
    registered = register(sipp_path, kamailio_tls, keeper_dir, tmp_path, users, options=verified(pki))
    assert registered.ok, registered.summary()
    kamailio_tls.close_connections()  # close_notify, then FIN
    wait_until(lambda: kept(keeper_dir)[0]["state"] == "closed", timeout=10)
    status = subprocess.run(
        [sys.executable, "-m", "fdkeeper", "status", "--dir", str(keeper_dir)], capture_output=True, text=True
    )
    assert "closed" in status.stdout
    refused = start_answer(sipp_path, kamailio_tls, keeper_dir, tmp_path, name="refused").wait(15)
    assert refused.returncode == 2 and "--reconnect" in refused.text("stderr")
    again = register(
        sipp_path, kamailio_tls, keeper_dir, tmp_path, users, options=(*verified(pki), "--reconnect"), name="again"
    )
    assert again.ok, again.summary()
    answer_a_call(sipp_path, kamailio_tls, keeper_dir, tmp_path)


def test_builtin_scenario_over_tls(sipp_path, kamailio_tls, keeper_dir, tmp_path, pki):
    """-sn uac through -t l1: the embedded scenario is dumped and its [transport] written as TLS."""
    log_dir = tmp_path / "logs"
    log_dir.mkdir(exist_ok=True)
    cmd = [
        sipp_path,
        "-sn",
        "uac",
        "-t",
        "l1",
        "-i",
        "127.0.0.1",
        "-m",
        "1",
        "-nostdin",
        "-timeout",
        "10s",
        "-trace_msg",
        "-message_file",
        str(log_dir / "uac.messages.log"),
        kamailio_tls.tls_address,
    ]
    from fdkeeper.testbed import fdkeeper_command

    result = subprocess.run(
        fdkeeper_command(cmd, keeper_dir, *verified(pki)), capture_output=True, text=True, timeout=30
    )
    sent = (log_dir / "uac.messages.log").read_text()
    assert "SIP/2.0/TLS" in sent and "SIP/2.0/TCP" not in sent, result.stderr
    assert kept(keeper_dir)[0]["tls"]["messages_to_sut"] >= 1
