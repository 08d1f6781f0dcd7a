"""Reading sipp command lines as sipp reads them (pure logic)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fdkeeper.errors import FdkeeperError
from fdkeeper.sipp.args import parse_sipp_args
from fdkeeper.sipp.args import sipp_host_port as split_host_port
from fdkeeper.sipp.scenario import scenario_role

SCENARIOS = "scenarios"


def test_register_command_line():
    args = [
        "-sf",
        "scenarios/uac-register.xml",
        "-inf",
        "users.csv",
        "-t",
        "t1",
        "-i",
        "127.0.0.1",
        "-m",
        "1",
        "127.0.0.1:5070",
    ]
    invocation = parse_sipp_args(args)
    assert invocation.transport == "tcp" and not invocation.per_call_sockets
    assert invocation.role == "client"
    assert invocation.remote_address() == ("127.0.0.1", 5070)
    assert invocation.local_bind() == ("127.0.0.1", 0)
    assert invocation.args == args  # never changed


def test_answer_command_line_without_remote():
    invocation = parse_sipp_args(
        ["-sf", "scenarios/uas-answer.xml", "-t", "t1", "-i", "127.0.0.1", "-p", "5070", "-m", "5"]
    )
    assert invocation.role == "server"
    assert invocation.remote_address() is None
    assert invocation.local_bind() == ("127.0.0.1", 5070)


def test_flags_and_pairs_do_not_swallow_the_remote_host():
    invocation = parse_sipp_args(
        ["-bg", "-trace_err", "-set", "a", "b", "-key", "k", "v", "-nostdin", "sut.example:5080"]
    )
    assert invocation.remote_host == "sut.example:5080"
    assert invocation.options["set"] == ["a", "b"]


def test_builtin_scenarios_and_defaults():
    assert parse_sipp_args(["127.0.0.1"]).role == "client"  # sipp's default is -sn uac
    assert parse_sipp_args(["-sn", "uas"]).role == "server"
    assert parse_sipp_args(["-t", "un"]).transport == "udp"
    assert parse_sipp_args(["-t", "tn"]).per_call_sockets
    assert parse_sipp_args(["-t", "l1"]).transport == "tls"
    assert parse_sipp_args(["-v"]).info_only


@pytest.mark.parametrize(
    "text, expected",
    [
        ("10.0.0.5", ("10.0.0.5", 5060)),
        ("10.0.0.5:5070", ("10.0.0.5", 5070)),
        ("[::1]:5062", ("::1", 5062)),
        ("::1", ("::1", 5060)),
    ],
)
def test_remote_host_port(text, expected):
    assert split_host_port(text) == expected


def test_missing_value_is_clear():
    with pytest.raises(FdkeeperError, match="-sf needs a value"):
        parse_sipp_args(["-sf"])


def test_scenario_roles_of_shipped_scenarios():
    assert scenario_role(f"{SCENARIOS}/uac-register.xml") == "client"
    assert scenario_role(f"{SCENARIOS}/uas-answer.xml") == "server"


def test_scenario_errors_name_the_file(tmp_path):
    with pytest.raises(FdkeeperError, match="not found; check -sf"):
        scenario_role(tmp_path / "missing.xml")
    broken = tmp_path / "broken.xml"
    broken.write_text("<scenario><send>")
    with pytest.raises(FdkeeperError, match="not valid XML"):
        scenario_role(broken)


def test_sipps_tls_options_are_taken_out_for_the_keeper():
    given = [
        "-sf",
        "x.xml",
        "-tls_cert",
        "c.pem",
        "-t",
        "l1",
        "-tls_key",
        "k.pem",
        "-tls_ca",
        "ca.pem",
        "-tls_crl",
        "crl.pem",
        "-tls_version",
        "1.2",
        "-m",
        "1",
        "sut.test:5061",
    ]
    invocation = parse_sipp_args(given)
    assert invocation.tls == {"cert": "c.pem", "key": "k.pem", "ca": "ca.pem", "crl": "crl.pem", "version": "1.2"}
    assert invocation.args == ["-sf", "x.xml", "-t", "l1", "-m", "1", "sut.test:5061"]
    assert invocation.given == given
    assert invocation.args[invocation.transport_index : invocation.transport_index + 2] == ["-t", "l1"]
    assert invocation.args[invocation.scenario_index] == "-sf"


def test_rsa_is_where_the_connection_goes():
    invocation = parse_sipp_args(["-sn", "uac", "-t", "t1", "-rsa", "127.0.0.1:5999", "localhost:5070"])
    assert invocation.remote_address() == ("127.0.0.1", 5999)
    assert parse_sipp_args(["-t", "t1", "-rsa", "127.0.0.1", "localhost"]).remote_address() == ("127.0.0.1", 5060)


@pytest.mark.parametrize(
    "args, message",
    [
        (["-t", "t1", "-rsa", "127.0.0.1:99999", "127.0.0.1"], "-rsa '99999' is not a port number"),
        (["-t", "t1", "-rsa", "sut.invalid", "127.0.0.1"], "cannot resolve 'sut.invalid' (-rsa)"),
        (["-t", "t1", "-rsa", "127.0.0.1", "sut.invalid"], "cannot resolve 'sut.invalid' (sipp's remote host)"),
    ],
)
def test_bad_addresses_are_one_line(args, message):
    with pytest.raises(FdkeeperError) as failure:
        parse_sipp_args(args).remote_address()
    assert message in str(failure.value) and "\n" not in str(failure.value)


@pytest.mark.parametrize(
    "args, message",
    [
        (["-t", "t1", "-p", "70000", "127.0.0.1"], "-p '70000' is not a port number"),
        (["-t", "t1", "a.example", "b.example"], "sipp takes one remote host, got 'a.example' and 'b.example'"),
        (["-t", "t1", "-nosuchoption", "127.0.0.1"], "has no option -nosuchoption"),
        (["-rxsn", "uas", "127.0.0.1"], "use -rxsf FILE"),
    ],
)
def test_what_sipp_would_refuse_is_one_line(args, message):
    with pytest.raises(FdkeeperError, match=re.escape(message)):
        parse_sipp_args(args)


def test_double_dash_options_as_sipp_takes_them():
    assert parse_sipp_args(["--t", "t1", "--trace_err", "127.0.0.1"]).remote_host == "127.0.0.1"


def test_mixed_mode_is_a_client_run(tmp_path):
    invocation = parse_sipp_args(["-sn", "uac", "-rxsf", "uas.xml", "-t", "t1", "127.0.0.1"])
    assert invocation.mixed_mode and invocation.role == "client"


def test_scenario_that_is_a_directory_is_one_line(tmp_path):
    with pytest.raises(FdkeeperError, match="cannot read scenario file"):
        scenario_role(tmp_path)


def test_tls_run_copies_the_mixed_mode_scenario_too(tmp_path):
    from fdkeeper.sipp.scenario import tls_arguments

    rx = tmp_path / "rx.xml"
    rx.write_text(
        '<scenario><recv request="INVITE"/><send><![CDATA[SIP/2.0 200 OK\nVia: [last_Via:]\n;transport=[transport]]]></send></scenario>'
    )
    invocation = parse_sipp_args(
        ["-sf", f"{SCENARIOS}/uac-register.xml", "-rxsf", str(rx), "-t", "l1", "127.0.0.1:5061"]
    )
    args, copies = tls_arguments(invocation, Path("sipp"), tmp_path)
    try:
        assert args[args.index("-t") + 1] == "t1"
        assert args[args.index("-rxsf") + 1] == str(copies[0]) and args[args.index("-sf") + 1] == str(copies[1])
        assert "transport=TLS" in copies[0].read_text() and "[transport]" not in copies[1].read_text()
    finally:
        for copy in copies:
            copy.unlink()
