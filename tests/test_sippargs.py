"""Reading sipp command lines as sipp 3.6.1 does (pure logic)."""

from __future__ import annotations

import pytest

from fdkeeper.errors import FdkeeperError
from fdkeeper.sipp.args import parse_sipp_args, sipp_host_port as split_host_port
from fdkeeper.sipp.scenario import scenario_role

SCENARIOS = "scenarios"


def test_register_command_line():
    args = "-sf scenarios/uac-register.xml -inf users.csv -t t1 -i 127.0.0.1 -m 1 127.0.0.1:5070".split()
    invocation = parse_sipp_args(args)
    assert invocation.transport == "tcp" and not invocation.per_call_sockets
    assert invocation.role == "client"
    assert invocation.remote_address() == ("127.0.0.1", 5070)
    assert invocation.local_bind() == ("127.0.0.1", 0)
    assert invocation.args == args  # never changed


def test_answer_command_line_without_remote():
    invocation = parse_sipp_args("-sf scenarios/uas-answer.xml -t t1 -i 127.0.0.1 -p 5070 -m 5".split())
    assert invocation.role == "server"
    assert invocation.remote_address() is None
    assert invocation.local_bind() == ("127.0.0.1", 5070)


def test_flags_and_pairs_do_not_swallow_the_remote_host():
    invocation = parse_sipp_args(["-bg", "-trace_err", "-set", "a", "b", "-key", "k", "v", "-nostdin", "sut.example:5080"])
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
    [("10.0.0.5", ("10.0.0.5", 5060)), ("10.0.0.5:5070", ("10.0.0.5", 5070)), ("[::1]:5062", ("::1", 5062)), ("::1", ("::1", 5060))],
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
