"""`fdkeeper sipp --ws`: the transport the keeper speaks (ws over -t t1/tn, wss over -t l1/ln),
the scenario copies that say WS/WSS in [transport], the run's request and PREPARE fields, and
every misuse of the --ws options as one line and exit status 2 before sipp starts."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from fdkeeper.cli import main
from fdkeeper.cli.options import make_ws_options
from fdkeeper.errors import FdkeeperError
from fdkeeper.sipp.args import parse_sipp_args
from fdkeeper.sipp.request import keeper_transport, sipp_needs, sipp_request
from fdkeeper.sipp.runner import RunOptions, SippRun
from fdkeeper.sipp.scenario import remove_tls_copies, tls_arguments
from fdkeeper.websocket import WsOptions
from tests.support.paths import REPO

REGISTER = REPO / "scenarios" / "uac-register.xml"
SIPP = shutil.which("sipp")


@pytest.mark.parametrize(("option", "transport"), [("t1", "ws"), ("tn", "ws"), ("l1", "wss"), ("ln", "wss")])
def test_ws_runs_over_tcp_or_tls(option, transport):
    invocation = parse_sipp_args(["-sf", str(REGISTER), "-t", option, "127.0.0.1:8080"])
    assert keeper_transport(invocation, websocket=True) == transport
    assert keeper_transport(invocation) == invocation.transport  # without --ws: -t's own
    needs = sipp_needs(invocation, transport=transport)
    assert needs.websocket and needs.tls == (transport == "wss")


@pytest.mark.parametrize(
    ("args", "named"), [(["-t", "u1"], "not -t u1"), (["-t", "un"], "not -t un"), ([], "not sipp's default -t u1")]
)
def test_ws_over_udp_is_one_line(args, named):
    invocation = parse_sipp_args(["-sf", str(REGISTER), *args, "127.0.0.1:8080"])
    with pytest.raises(FdkeeperError, match=f"--ws runs over TCP or TLS, {named}: give sipp -t t1") as error:
        keeper_transport(invocation, websocket=True)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("option", "transport"), [("t1", "ws"), ("l1", "wss")])
def test_scenario_copy_says_ws_or_wss_and_sipp_speaks_tcp(tmp_path, option, transport):
    rx = tmp_path / "rx.xml"
    rx.write_text(
        '<scenario><recv request="INVITE"/><send><![CDATA[SIP/2.0 200 OK\n;transport=[transport]]]></send></scenario>'
    )
    invocation = parse_sipp_args(["-sf", str(REGISTER), "-rxsf", str(rx), "-t", option, "127.0.0.1:8443"])
    args, copies = tls_arguments(invocation, Path("sipp"), tmp_path, transport)
    written = transport.upper()
    assert args[args.index("-t") + 1] == "t1"  # the keeper does the TLS under wss
    assert args[args.index("-rxsf") + 1] == str(copies[0]) and args[args.index("-sf") + 1] == str(copies[1])
    assert [copy.name.endswith(f".{transport}.xml") for copy in copies] == [True, True]
    text = copies[1].read_text()
    assert "[transport]" not in text and f"Via: SIP/2.0/{written} " in text
    assert ";transport=ws>" in text and ";transport=ws" in copies[0].read_text()  # RFC 7118: ws in URIs, both
    assert remove_tls_copies(tmp_path) == 2  # `fdkeeper stop` sweeps them with the TLS ones


@pytest.mark.skipif(SIPP is None, reason="needs sipp (its embedded uac scenario)")
def test_builtin_scenario_copy_says_wss(tmp_path):
    invocation = parse_sipp_args(["-sn", "uac", "-t", "ln", "127.0.0.1:8443"])
    args, [copy] = tls_arguments(invocation, Path(str(SIPP)), tmp_path, "wss")
    try:
        assert args[:2] == ["-sf", str(copy)] and args[args.index("-t") + 1] == "tn"
        text = copy.read_text(encoding="iso-8859-1")
        assert "[transport]" not in text and "SIP/2.0/WSS " in text
    finally:
        copy.unlink()


def test_request_and_prepare_of_a_wss_run(tmp_path):
    invocation = parse_sipp_args(["-sf", str(REGISTER), "-t", "l1", "-p", "5072", "127.0.0.1:8443"])
    websocket = WsOptions(path="/ws", origin="https://app.example", headers=(("X-Token", "abc"),))
    request = sipp_request(Path("/usr/bin/sipp"), invocation, tmp_path / "control.sock", ("127.0.0.1", 8443), "wss")
    assert request.transport == "wss" and request.args == invocation.args
    options = RunOptions(directory=tmp_path, websocket=websocket)
    plan = SippRun(Path("/usr/bin/sipp"), invocation, ("127.0.0.1", 8443), tmp_path, options, "wss").plan()
    prepare = plan.prepare
    assert plan.request.transport == "wss" and prepare["transport"] == "wss"
    assert prepare["ws_path"] == "/ws" and prepare["ws_origin"] == "https://app.example"
    assert prepare["ws_headers"] == "X-Token: abc"
    assert "tls_ca" in prepare and "tls_min" in prepare  # wss: the TLS options too


def test_a_ws_run_sends_no_tls_fields_and_a_server_run_no_handshake(tmp_path):
    options = RunOptions(directory=tmp_path, websocket=WsOptions())
    client = parse_sipp_args(["-sf", str(REGISTER), "-t", "t1", "-p", "5072", "127.0.0.1:8080"])
    prepare = SippRun(Path("sipp"), client, ("127.0.0.1", 8080), tmp_path, options, "ws").plan().prepare
    assert prepare["transport"] == "ws" and "ws_path" in prepare and "tls_ca" not in prepare
    server = parse_sipp_args(["-sf", str(REPO / "scenarios" / "uas-answer.xml"), "-t", "t1", "-p", "5072"])
    prepare = SippRun(Path("sipp"), server, None, tmp_path, options, "ws").plan().prepare
    assert prepare["transport"] == "ws" and "ws_path" not in prepare


def test_ws_options_checked():
    assert make_ws_options(False, None, None, ()) is None
    assert make_ws_options(True, None, None, ()) == WsOptions()
    given = make_ws_options(True, "/ws", "https://a.example", ("X-A: 1", "X-B: two words"))
    assert given == WsOptions("/ws", "https://a.example", (("X-A", "1"), ("X-B", "two words")))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ((False, "/ws", None, ()), "--ws-path is a WebSocket option: add --ws"),
        ((False, None, "https://a", ()), "--ws-origin is a WebSocket option: add --ws"),
        ((False, None, None, ("X-A: 1",)), "--ws-header is a WebSocket option: add --ws"),
        ((True, "ws", None, ()), "--ws-path 'ws': a WebSocket path starts with /"),
        ((True, None, None, ("Host: x",)), "--ws-header 'Host: x': the handshake writes Host itself"),
        ((True, None, None, ("Origin: x",)), "--ws-header 'Origin: x': .*use --ws-origin"),
        ((True, None, None, ("no colon",)), "--ws-header 'no colon': a WebSocket header is 'Name: value'"),
        ((True, None, None, ("X-A: 1\nX-B: 2",)), "one header per --ws-header"),
        (
            (True, None, None, tuple(f"X-{n}: 1" for n in range(17))),
            r"--ws-header: 17 WebSocket headers \(at most 16\)",
        ),
    ],
)
def test_ws_option_mistakes_are_one_line(flags, message):
    with pytest.raises(FdkeeperError, match=message) as error:
        make_ws_options(*flags)
    assert "\n" not in str(error.value)


@pytest.mark.skipif(SIPP is None, reason="needs sipp (its -v reads the option table)")
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ws", "-t", "u1"], "fdkeeper: --ws runs over TCP or TLS, not -t u1"),
        (["--ws-origin", "https://a", "-t", "t1"], "fdkeeper: --ws-origin is a WebSocket option"),
        (["--ws", "--ws-path", "x", "-t", "t1"], "fdkeeper: --ws-path 'x': a WebSocket path starts with /"),
        (
            ["--ws", "--mode", "udp", "-t", "t1"],
            "fdkeeper: --mode udp cannot keep WebSocket connections.*--mode preload",
        ),
    ],
)
def test_sipp_command_refuses_before_sipp_starts(tmp_path, args, message):
    result = CliRunner().invoke(
        main, ["sipp", "--dir", str(tmp_path / "state"), *args, "-sf", str(REGISTER), "-m", "1", "127.0.0.1:9"]
    )
    assert result.exit_code == 2, result.output
    assert re.fullmatch(f"{message}.*\n", result.output), result.output
    assert result.output.count("\n") == 1


def test_exec_ws_transport_and_help():
    from fdkeeper.agent import ExecOptions

    assert ExecOptions(transport="tls", websocket=WsOptions()).keeper_transport == "wss"
    assert ExecOptions(websocket=WsOptions()).needs().websocket
    assert ExecOptions(transport="tls").keeper_transport == "tls"
    helped = CliRunner().invoke(main, ["sipp", "--help"])
    assert "fdkeeper sipp --ws -t l1 -sf reg.xml 127.0.0.1:8443" in helped.output
    assert "--ws-header" in CliRunner().invoke(main, ["exec", "--help"]).output


@pytest.mark.skipif(SIPP is None, reason="needs sipp (its -v reads the option table)")
def test_fdkeeper_sipp_takes_ws_after_the_sipp_path(monkeypatch, capsys, tmp_path):
    from fdkeeper.cli import sipp_main

    args = [str(SIPP), "--dir", str(tmp_path / "state"), "--ws", "-sf", str(REGISTER), "-t", "u1", "127.0.0.1:9"]
    monkeypatch.setattr("sys.argv", ["fdkeeper-sipp", *args])
    with pytest.raises(SystemExit) as exit_:
        sipp_main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("fdkeeper: --ws runs over TCP or TLS, not -t u1")
