"""Where sipp sends and which sipp runs, end to end (real sipp, real Kamailio).

-rsa HOST:PORT (an outbound proxy or SBC) is where the connection goes while the remote host
still names the SuT; sipp 3.7.7's own options are read with its own table (a flag 3.6.1 lacks
does not swallow the remote host); a -rxsf mixed-mode run keeps its connection like any
client run; sipp's own -tls_* options are the keeper's TLS options and never reach a sipp
that no longer does the TLS.
"""

from __future__ import annotations

import subprocess

import pytest

from fdkeeper import testbed
from fdkeeper.address import format_address
from fdkeeper.client import KeeperClient
from fdkeeper.errors import FdkeeperError
from fdkeeper.testbed import fdkeeper_command

USER = "alice"
SIPP_377 = testbed.sipp_build("sipp-tls")
needs_sipp_377 = pytest.mark.skipif(not SIPP_377.is_file(), reason=f"no sipp 3.7.7 at {SIPP_377}")


@pytest.fixture
def users(tmp_path, kamailio):
    return testbed.write_users_csv(tmp_path / "users.csv", [USER], kamailio.domain)


def run(sipp, keeper_dir, tmp_path, name, scenario, remote: str | None, *, wait=True, **sipp_options):
    """A terminal-less sipp run through `fdkeeper sipp`; remote None: no remote host argument."""
    log_dir = tmp_path / "logs"
    log_dir.mkdir(exist_ok=True)
    settings = {"transport": "t1", "calls": 1, "timeout": 15, **sipp_options}
    command = testbed.sipp_command(sipp, scenario, remote or "-", log_dir=log_dir, name=name, **settings)
    if remote is None:
        command.pop()
    process = testbed.SippProcess(fdkeeper_command(command, keeper_dir), log_dir, name)
    return process.wait(30) if wait else process


def kept(keeper_dir) -> list[dict]:
    try:
        return KeeperClient(keeper_dir).status()["connections"]
    except FdkeeperError:
        return []


def nobody_listens() -> str:
    """localhost:PORT with nothing there: a run reaching the SuT did not go to the remote host."""
    return f"localhost:{testbed.free_port()}"


def answer_one_call(sipp, kamailio, keeper_dir, tmp_path, *, remote=None, extra=()):
    answer = run(
        sipp,
        keeper_dir,
        tmp_path,
        "answer",
        "uas-answer.xml",
        remote,
        wait=False,
        timeout=30,
        local_port=testbed.free_port(),
        extra=list(extra),
    )
    caller = testbed.place_calls(kamailio, USER, 1, sipp=sipp, timeout=15, log_dir=tmp_path / "logs")
    answered = answer.wait(30)
    assert caller.ok, caller.summary()
    assert answered.ok, answered.summary()


def test_rsa_is_where_register_and_answer_go(sipp_path, kamailio, keeper_dir, tmp_path, users):
    remote = nobody_listens()
    rsa = ["-rsa", kamailio.address]
    registered = run(
        sipp_path, keeper_dir, tmp_path, "register", "uac-register.xml", remote, extra=["-inf", str(users), *rsa]
    )
    assert registered.ok, registered.summary()
    [connection] = kept(keeper_dir)
    assert connection["remote"] == kamailio.address
    # The answer run names the same remote host and -rsa: it is handed that connection.
    answer_one_call(sipp_path, kamailio, keeper_dir, tmp_path, remote=remote, extra=rsa)
    assert [c["id"] for c in kept(keeper_dir)] == [connection["id"]]


def test_remote_host_that_does_not_resolve_is_refused_as_sipp_refuses_it(sipp_path, kamailio, keeper_dir, tmp_path):
    # sipp resolves its remote host even with -rsa ("Unknown remote host"): one line before any connection.
    command = fdkeeper_command(
        [sipp_path, "-sn", "uac", "-t", "t1", "-m", "1", "-rsa", kamailio.address, "sut.invalid"], keeper_dir
    )
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "fdkeeper: cannot resolve 'sut.invalid' (sipp's remote host): Name or service not known; check the name"
    ]
    assert kept(keeper_dir) == []


@needs_sipp_377
def test_sipp_377_flag_before_the_remote_host_and_mixed_mode(kamailio, keeper_dir, tmp_path, users, sipp_path):
    sipp, local_port = str(SIPP_377), testbed.free_port()  # one identity for both runs
    # -rfc3339 takes no value in 3.7.5+: read as 3.6.1 reads options, it would swallow the remote host.
    registered = run(
        sipp,
        keeper_dir,
        tmp_path,
        "register",
        "uac-register.xml",
        kamailio.address,
        local_port=local_port,
        extra=["-inf", str(users), "-rfc3339"],
    )
    assert registered.ok, registered.summary()
    [connection] = kept(keeper_dir)
    # A mixed-mode run (-rxsf: a server scenario for what arrives) keeps its connection like a client run.
    mixed = run(
        sipp,
        keeper_dir,
        tmp_path,
        "mixed",
        "uac-register.xml",
        kamailio.address,
        local_port=local_port,
        extra=["-inf", str(users), "-rxsf", str(testbed.SCENARIOS_DIR / "uas-answer.xml")],
    )
    assert mixed.ok, mixed.summary()
    assert [c["id"] for c in kept(keeper_dir)] == [connection["id"]]
    answer_one_call(sipp_path, kamailio, keeper_dir, tmp_path)


def test_sipp_36_refuses_a_37_flag_in_one_line(sipp_path, kamailio, keeper_dir):
    command = fdkeeper_command([sipp_path, "-sn", "uac", "-t", "t1", "-rfc3339", kamailio.address], keeper_dir)
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "fdkeeper: sipp 3.6.1 has no option -rfc3339 (sipp 3.7.5 and later have it: pass --sipp PATH to one); see 'sipp -h'"
    )


@pytest.fixture
def mutual_tls_kamailio(tmp_path, test_pki):
    instance = testbed.Kamailio(
        tmp_path / "kamailio-mtls", tls=testbed.KamailioTls.server(test_pki, require_client_cert=True)
    )
    instance.start()
    yield instance
    instance.stop()
    print(f"--- kamailio log tail ---\n{instance.log_tail(40)}")


def test_sipps_own_tls_options_give_mutual_tls(sipp_path, mutual_tls_kamailio, keeper_dir, tmp_path, test_pki):
    """Debian's sipp has no TLS and refuses -tls_*: fdkeeper uses them and passes them on to nobody."""
    kamailio = mutual_tls_kamailio
    users = testbed.write_users_csv(tmp_path / "users.csv", [USER], kamailio.domain)
    own_tls = [
        "-tls_ca",
        str(test_pki.ca_cert),
        "-tls_cert",
        str(test_pki.client_cert),
        "-tls_key",
        str(test_pki.client_key),
    ]
    registered = run(
        sipp_path,
        keeper_dir,
        tmp_path,
        "register",
        "uac-register.xml",
        kamailio.tls_address,
        transport="l1",
        extra=["-inf", str(users), *own_tls],
    )
    assert registered.ok, registered.summary()
    [connection] = kept(keeper_dir)
    assert connection["transport"] == "tls"
    [handshake] = [h for h in kamailio.tls_handshakes() if h["direction"] == "in"]
    assert handshake["client_cert"] and handshake["peer_subject"].endswith(f"CN={test_pki.client_name}")


def test_without_sipps_ca_the_error_says_sipp_would_not_have_verified(sipp_path, kamailio_tls, keeper_dir, tmp_path):
    command = fdkeeper_command(
        [sipp_path, "-sn", "uac", "-t", "l1", "-m", "1", format_address(("127.0.0.1", kamailio_tls.tls_port))],
        keeper_dir,
    )
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert "certificate verification" in line and "only when given -tls_ca" in line and "-tls_ca FILE" in line


def test_tls_options_reach_the_keeper_not_sipp(sipp_path, kamailio_tls, keeper_dir, tmp_path, test_pki):
    kamailio = kamailio_tls
    users = testbed.write_users_csv(tmp_path / "users.csv", [USER], kamailio.domain)
    registered = run(
        sipp_path,
        keeper_dir,
        tmp_path,
        "register",
        "uac-register.xml",
        kamailio.tls_address,
        transport="l1",
        extra=["-inf", str(users), "-tls_ca", str(test_pki.ca_cert), "-tls_version", "1.2"],
    )
    assert registered.ok, registered.summary()
    [connection] = kept(keeper_dir)
    assert connection["tls"]["version"] == "TLSv1.2"  # -tls_version 1.2 pins the version, as in sipp


@pytest.mark.parametrize(
    "args, message",
    [
        (["-sf", "/nonexistent.xml", "-t", "t1", "127.0.0.1"], "scenario file /nonexistent.xml not found"),
        (["-sf", "/etc/hostname", "-t", "t1", "127.0.0.1"], "is not valid XML"),
        (["-sf", "/tmp", "-t", "t1", "127.0.0.1"], "cannot read scenario file /tmp: Is a directory"),
        (["-sn", "uac", "-t", "zz", "127.0.0.1"], "transport -t zz is not kept"),
        (["-sn", "uac", "-t", "t1", "-p", "65536", "127.0.0.1"], "-p '65536' is not a port number"),
        (["-sn", "uac", "-t", "t1", "-rsa", "[::1", "127.0.0.1"], "-rsa '[::1' is not [IPv6]:PORT"),
        (["-sn", "uac", "-t", "t1", "-rsa", "sbc.invalid:5060", "127.0.0.1"], "cannot resolve 'sbc.invalid' (-rsa)"),
        (["-sn", "uac", "-t", "t1", "sut.invalid"], "cannot resolve 'sut.invalid' (sipp's remote host)"),
        (["-sn", "uac", "-t", "l1", "-tls_version", "1.1", "127.0.0.1"], "fdkeeper speaks TLS 1.2 and 1.3 only"),
        (
            ["-sn", "uac", "-t", "l1", "-tls_cert", "/nonexistent.pem", "127.0.0.1"],
            "-tls_cert file /nonexistent.pem not found",
        ),
        (["-sn", "uac", "-t", "t1", "-m"], "sipp option -m needs a value"),
    ],
)
def test_odd_inputs_are_one_line_and_exit_2(sipp_path, keeper_dir, args, message):
    done = subprocess.run(fdkeeper_command([sipp_path, *args], keeper_dir), capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("fdkeeper: ") and message in line, line
