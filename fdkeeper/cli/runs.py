"""The commands that run a program with the kept connection handed over: `fdkeeper sipp`,
`fdkeeper exec`, and `fdkeeper-sipp` (the first as one word, for pysipp's prefix)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click

from fdkeeper import __version__
from fdkeeper.cli.group import PASS_THROUGH, main
from fdkeeper.cli.options import (
    TlsFlags,
    dir_option,
    handoff_options,
    make_tls_options,
    make_ws_options,
    ready_options,
    tls_options,
    ws_options,
)
from fdkeeper.readiness import ReadySignal, announcing_readiness
from fdkeeper.sipp.runner import RunOptions, run_sipp
from fdkeeper.statedir import resolve_directory

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing's own from Python 3.11


@main.command("sipp", context_settings=PASS_THROUGH)
@click.option(
    "--sipp", "sipp_path", metavar="PATH", envvar="FDKEEPER_SIPP", help="sipp binary (default: sipp on PATH)."
)
@dir_option
@handoff_options
@click.option(
    "--wait",
    type=click.FloatRange(0, 86400),
    default=0,
    metavar="SECONDS",
    help="Wait this long for a connection another run holds, instead of failing.",
)
@click.option(
    "--keepalive",
    type=click.FloatRange(1, 86400),
    metavar="SECONDS",
    help="When this run starts the keeper (or converter): send RFC 5626 CRLF pings (WebSocket pings over --ws) on idle connections this often.",
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(0.1, 600),
    metavar="SECONDS",
    help="When this run starts the keeper (or converter): how long a connect to the SuT may take (default 5).",
)
@click.option(
    "--answer-options",
    is_flag=True,
    help="When this run starts the keeper: it answers the SuT's OPTIONS pings while no run holds the connection.",
)
@ready_options
@ws_options
@tls_options
@click.argument("sipp_args", nargs=-1, type=click.UNPROCESSED)
def sipp_command(
    sipp_path: str | None,
    directory: str | None,
    mode: str,
    transfer: str | None,
    reconnect: bool,
    debug: bool,
    wait: float,
    keepalive: float | None,
    connect_timeout: float | None,
    answer_options: bool,
    ready_file: Path | None,
    ready_fd: int | None,
    ready_timeout: float,
    ws: bool,
    ws_path: str | None,
    ws_origin: str | None,
    ws_headers: tuple[str, ...],
    sipp_args: tuple[str, ...],
    **tls: Unpack[TlsFlags],
) -> None:
    """Run sipp with SIPP_ARGS unchanged, over a kept connection.

    fdkeeper's own options come first, sipp's arguments after them. With -t t1 a client
    scenario (one that starts with <send>) uses the kept connection to the remote host,
    opening it on first use; a server scenario (starting with <recv>) is handed the kept
    connections (those to the remote host, if one is given) as if it had accepted them.
    With -t tn each user gets a kept connection of its own (preload, or ptrace for a static sipp). The
    exit status is sipp's. UDP runs pass straight through.

    With -t l1 the keeper speaks TLS to the SuT and sipp (any build, Debian's included)
    speaks plain SIP to the keeper; the scenario's [transport] says TLS, so the SuT sees
    what a TLS-enabled sipp would send, on one TLS session for the whole test.

    With --ws the keeper speaks SIP over WebSocket (RFC 7118) to a WebRTC gateway: WSS with
    -t l1, WS with -t t1, one WebSocket connection per user with -t tn/ln. sipp still speaks
    plain SIP to the keeper; the scenario's [transport] says WS or WSS (ws in a URI's
    transport=, as RFC 7118 has it), so the SuT sees Via: SIP/2.0/WSS and transport=ws,
    and reaches the user over the connection it registered on, kept across runs like any other.

    \b
      fdkeeper sipp -sf uac-register.xml -inf users.csv -t t1 -m 1 127.0.0.1:5060
      fdkeeper sipp --mode ptrace -sf uas-answer.xml -t t1 -p 5070 -m 5
      fdkeeper sipp --tls-ca ca.pem -sf uac-register.xml -t l1 -m 1 sut.example:5061
      fdkeeper sipp --ws -t l1 -sf reg.xml 127.0.0.1:8443
      fdkeeper sipp --ws --ws-path /ws --ws-origin https://app.example -t t1 -sf reg.xml 127.0.0.1:8080

    A script that places calls once a server run is ready waits for --ready-file, not
    for a sleep (docs/ci/README.md):

    \b
      fdkeeper sipp --ready-file answer.ready -sf uas-answer.xml -t t1 -p 5070 -m 5 &
      for i in $(seq 300); do [ -e answer.ready ] && break; sleep 0.1; done
    """
    options = RunOptions(
        sipp=sipp_path,
        directory=directory,
        mode=mode,
        wait=wait,
        reconnect=reconnect,
        keepalive=keepalive,
        connect_timeout=connect_timeout,
        debug=debug,
        transfer=transfer,
        tls=make_tls_options(**tls),
        answer_options=answer_options,
        websocket=make_ws_options(ws, ws_path, ws_origin, ws_headers),
    )
    ready = ReadySignal(ready_file, ready_fd, ready_timeout) if ready_file or ready_fd is not None else None
    with announcing_readiness(ready, resolve_directory(directory)):
        status = run_sipp(list(sipp_args), options)
    sys.exit(status)


@main.command("exec", context_settings=PASS_THROUGH)
@dir_option
@click.option(
    "--sut",
    metavar="IP:PORT",
    help="The SuT's address: the agent's connect() to it gets the kept connection (client); only connections to it are handed over (server).",
)
@click.option(
    "--transport",
    type=click.Choice(["tcp", "tls"]),
    default="tcp",
    show_default=True,
    help="How the keeper speaks to the SuT (with --ws: WebSocket over it); the agent always speaks plain TCP to its end.",
)
@click.option(
    "--role",
    type=click.Choice(["client", "server"]),
    default="client",
    show_default=True,
    help="client: hand over in connect(); server: hand the kept connections over as accepted ones on the first TCP listening socket.",
)
@handoff_options
@ws_options
@tls_options
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_command(
    directory: str | None,
    sut: str | None,
    transport: str,
    role: str,
    mode: str,
    transfer: str | None,
    reconnect: bool,
    debug: bool,
    ws: bool,
    ws_path: str | None,
    ws_origin: str | None,
    ws_headers: tuple[str, ...],
    command: tuple[str, ...],
    **tls: Unpack[TlsFlags],
) -> None:
    """Run COMMAND (any SIP agent: baresip, pjsua, a test's own client) over the kept connection.

    \b
      fdkeeper exec --sut 127.0.0.1:5060 -- ./my-sip-client --register alice
      fdkeeper exec --sut 127.0.0.1:5060 --role server --mode ptrace -- ./static-agent
      fdkeeper exec --sut 127.0.0.1:8443 --transport tls --ws --ws-path /ws -- ./my-sip-client

    The exit status is COMMAND's. A statically linked agent needs --mode ptrace (--mode
    auto picks it); --mode udp rewrites sipp's own arguments, so it runs sipp only.
    """
    from fdkeeper.agent import ExecOptions, run_exec

    options = ExecOptions(
        sut=sut,
        transport=transport,
        role=role,
        mode=mode,
        transfer=transfer,
        directory=directory,
        reconnect=reconnect,
        debug=debug,
        tls=make_tls_options(**tls),
        websocket=make_ws_options(ws, ws_path, ws_origin, ws_headers),
    )
    sys.exit(run_exec(list(command), options))


def sipp_main() -> NoReturn:
    """`fdkeeper-sipp SIPP_PATH SIPP_ARGS...`: `fdkeeper sipp --sipp SIPP_PATH SIPP_ARGS...` as
    one word, for launchers that put a one-word prefix before sipp's path (pysipp's `prefix`)."""
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help", "--version"):  # not a sipp path: say what this is
        if args[:1] == ["--version"]:
            click.echo(f"fdkeeper-sipp (fdkeeper) {__version__}")
        else:
            click.echo(SIPP_MAIN_USAGE, err=not args)
        sys.exit(0 if args else 2)
    main.main(args=["sipp", "--sipp", *args], prog_name="fdkeeper")


SIPP_MAIN_USAGE = """Usage: fdkeeper-sipp SIPP_PATH [SIPP_ARGS...]

`fdkeeper sipp --sipp SIPP_PATH SIPP_ARGS...` as one word, for launchers that put a one-word
prefix before sipp's path (pysipp's `prefix`): sipp runs with its TCP/TLS connections kept
by the keeper. fdkeeper's own options go right after SIPP_PATH, before sipp's: see
`fdkeeper sipp --help`.

  fdkeeper-sipp /usr/bin/sipp -sf scenarios/uac-register.xml -t t1 -m 1 127.0.0.1:5060
  fdkeeper-sipp /usr/bin/sipp --ws -t l1 -sf reg.xml -m 1 127.0.0.1:8443"""
