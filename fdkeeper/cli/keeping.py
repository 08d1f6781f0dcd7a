"""The commands about what is kept: `fdkeeper keeper` (in the foreground), `status`, `stop`,
and `convert` (the UDP <-> TCP/TLS converter in the foreground)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from fdkeeper.address import Address
from fdkeeper.cli.group import main
from fdkeeper.cli.options import (
    TlsFlags,
    dir_option,
    make_tls_options,
    tls_options,
)
from fdkeeper.client import KeeperClient
from fdkeeper.errors import FdkeeperError
from fdkeeper.protocol import TRANSPORTS, select_connections
from fdkeeper.report import format_converter, format_status
from fdkeeper.statedir import LOG_NAME, resolve_directory
from fdkeeper.textsafe import escape_controls

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing's own from Python 3.11


@main.command("keeper")
@dir_option
@click.option(
    "--keepalive",
    type=click.FloatRange(1, 86400),
    metavar="SECONDS",
    help="Send RFC 5626 CRLF pings (WebSocket pings on ws/wss connections) on idle connections this often (off by default).",
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(0.1, 600),
    default=5.0,
    show_default=True,
    metavar="SECONDS",
    help="How long a connect to the SuT may take.",
)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning"]), default="info", show_default=True)
@click.option(
    "--replace",
    is_flag=True,
    help="Take the kept TCP connections (and WS ones holding nothing) over from the running keeper, which then exits (TLS and WSS ones cannot move: listed as lost). Refused while runs hold leases.",
)
@click.option(
    "--answer-options",
    is_flag=True,
    help="While no run holds a connection, answer the SuT's OPTIONS pings with 200 OK (counted in status) instead of queueing them for the next run.",
)
@tls_options
def keeper_command(
    directory: str | None,
    keepalive: float | None,
    connect_timeout: float,
    log_level: str,
    replace: bool,
    answer_options: bool,
    **tls: Unpack[TlsFlags],
) -> None:
    """Run the keeper in the foreground (for service managers and CI).

    'fdkeeper sipp' starts one by itself when none answers; run it yourself to choose its
    options or to see its log. It stops on SIGTERM, Ctrl-C or 'fdkeeper stop', closing
    every kept connection.
    """
    from fdkeeper.keeper.server import Keeper
    from fdkeeper.textsafe import configure_logging

    configure_logging(log_level, "fdkeeper")  # one record a line, whatever an AoR holds
    keeper = Keeper(
        resolve_directory(directory),
        keepalive=keepalive,
        connect_timeout=connect_timeout,
        tls_defaults=make_tls_options(**tls),
        replace=replace,
        answer_options=answer_options,
    )
    keeper.install_signal_handlers()
    keeper.serve_forever()


def _hostport(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Address | None:
    """click callback: HOST:PORT into an address."""
    if value is None:
        return None
    from fdkeeper.address import split_host_port

    try:
        return split_host_port(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


@main.command("convert")
@click.option(
    "--listen",
    required=True,
    metavar="IP:PORT",
    callback=_hostport,
    help="UDP address sipp sends to (port 0: any free port).",
)
@click.option("--sut", required=True, metavar="HOST:PORT", callback=_hostport, help="The SuT's TCP or TLS address.")
@click.option("--transport", type=click.Choice(["tcp", "tls"]), default="tcp", show_default=True)
@click.option(
    "--sipp-address", metavar="IP:PORT", callback=_hostport, help="Where the SuT's initial requests go (sipp's -i:-p)."
)
@click.option(
    "--local",
    metavar="IP:PORT",
    callback=_hostport,
    help="Connect to the SuT from this address (what plain sipp would bind: its -i/-p).",
)
@click.option("--hide-topology", is_flag=True, help="No Via or Record-Route of the converter on either side.")
@click.option(
    "--attached-only",
    is_flag=True,
    help="Take datagrams only from sipp addresses attached over --control (ATTACH IP:PORT); others are dropped and counted.",
)
@click.option(
    "--keepalive",
    type=click.FloatRange(1, 86400),
    metavar="SECONDS",
    help="RFC 5626 CRLFCRLF pings on idle connections.",
)
@click.option("--connect-timeout", type=click.FloatRange(0.1, 600), default=5.0, show_default=True, metavar="SECONDS")
@click.option(
    "--control",
    type=click.Path(dir_okay=False),
    metavar="PATH",
    help="Unix socket for STATUS, SIPP IP:PORT, ATTACH IP:PORT [PID], DETACH IP:PORT, RECONNECT, STOP.",
)
@click.option(
    "--stats-file",
    type=click.Path(dir_okay=False),
    metavar="PATH",
    help="JSON counters, rewritten every second and on SIGUSR1.",
)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning"]), default="info", show_default=True)
@tls_options
def convert_command(
    listen: Address,
    sut: Address,
    transport: str,
    sipp_address: Address | None,
    local: Address | None,
    hide_topology: bool,
    attached_only: bool,
    keepalive: float | None,
    connect_timeout: float,
    control: str | None,
    stats_file: str | None,
    log_level: str,
    **tls: Unpack[TlsFlags],
) -> None:
    """Run a stateless UDP <-> TCP/TLS converter in the foreground.

    sipp talks UDP to --listen; the converter holds one TCP or TLS connection to the SuT
    (any number of sipp runs use it), record-routes so in-dialog requests come back through
    it, and sends the SuT's initial requests to --sipp-address. 'fdkeeper sipp --mode udp'
    starts and keeps one for you.

    \b
      fdkeeper convert --listen 127.0.0.1:5070 --sut 127.0.0.1:5060 --transport tcp --sipp-address 127.0.0.1:5080
    """

    from fdkeeper.convert import serve

    sys.exit(
        serve(
            listen,
            sut,
            transport,
            sipp_address,
            hide_topology=hide_topology,
            tls=make_tls_options(**tls),
            connect_timeout=connect_timeout,
            keepalive=keepalive,
            control=Path(control) if control else None,
            stats_file=Path(stats_file) if stats_file else None,
            log_level=log_level,
            attached_only=attached_only,
            local=local,
        )
    )


@main.command("status")
@dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the keeper's status as JSON, for scripts.")
@click.option("--aor", metavar="PATTERN", help="Only connections of these users, e.g. 'sip:user1*@example.com'.")
@click.option("--state", type=click.Choice(["idle", "leased", "closed"]), help="Only connections in this state.")
@click.option("--remote", metavar="IP:PORT", help="Only connections to this SuT address.")
@click.option(
    "--transport",
    type=click.Choice(TRANSPORTS),
    help="Only connections of this transport (ws, wss: SIP over WebSocket).",
)
@click.option("--count", is_flag=True, help="Print only how many connections match.")
def status_command(
    directory: str | None,
    as_json: bool,
    aor: str | None,
    state: str | None,
    remote: str | None,
    transport: str | None,
    count: bool,
) -> None:
    """List the kept connections: id, transport, addresses, user (AoR), state, holder, age.

    \b
    Filters combine; --count prints the number of matches, for scripts:
      fdkeeper status --state closed --count
      fdkeeper status --aor 'sip:user1*' --json
    """
    remote = _remote_filter(remote) if remote is not None else None  # before asking: a typo is not "no match"
    path = resolve_directory(directory)
    converters = [] if count or as_json else _converter_statuses(path)  # --mode udp's, if any
    filters = {"aor": aor, "state": state, "remote": remote, "transport": transport}
    try:
        # The keeper filters and counts: 10,000 connections need not cross the socket for a number.
        status = KeeperClient(path).status(**{k: v for k, v in filters.items() if v is not None}, count=count or None)
    except FdkeeperError:
        if not converters:
            raise
        click.echo("\n".join(map(format_converter, converters)))  # udp runs need no keeper
        return
    if "count" not in status:  # a keeper too old to filter sent them all: filter here
        status["connections"] = select_connections(status["connections"], **filters)
    if count:
        number = status["count"] if "count" in status else len(status["connections"])
        click.echo(json.dumps({"count": number}) if as_json else number)
    elif as_json:
        click.echo(json.dumps(status, indent=2))
    else:
        click.echo("\n".join([format_status(status), *_internal_errors(status), *map(format_converter, converters)]))


def _converter_statuses(path: Path) -> list[dict[str, Any]]:
    """The --mode udp converters' statuses; the modes imported only for the table (not for --count)."""
    from fdkeeper.modes.udp import converter_statuses

    return converter_statuses(path)


def _internal_errors(status: dict[str, Any]) -> list[str]:
    """A line when the keeper caught defects in its own code (each cost one client or connection)."""
    count = status["keeper"].get("internal_errors") or 0
    if not count:
        return []
    log = escape_controls(str(Path(status["keeper"]["directory"]) / LOG_NAME))
    return [
        f"keeper: {count} internal error{'s' if count != 1 else ''} caught, each ending only what it served; see {log}"
    ]


def _remote_filter(text: str) -> str:
    """status --remote: an IP:PORT as the status writes it; one line, exit 2, if it is none."""
    from fdkeeper.address import format_address, parse_address

    try:
        return format_address(parse_address(text))
    except ValueError as error:
        raise FdkeeperError(
            f"fdkeeper: status --remote: {error}; give the SuT's IP:PORT, e.g. 127.0.0.1:5060"
        ) from None


@main.command("stop")
@dir_option
def stop_command(directory: str | None) -> None:
    """Close every kept connection, end the keeper and remove its socket."""
    path = resolve_directory(directory)
    from fdkeeper.modes.udp import stop_converters

    if stop_converters(path):
        click.echo(f"fdkeeper: converters for {path} stopped")
    from fdkeeper.sipp.scenario import remove_tls_copies

    remove_tls_copies(path)  # those of runs killed before they could remove their own
    if KeeperClient(path).stop():
        click.echo(f"fdkeeper: keeper for {path} stopped")
    else:
        click.echo(f"fdkeeper: no keeper was running for {path}")
