"""The `fdkeeper` command: a thin click layer over the library.

Each command turns its options into the library's option objects and calls one library
function. Errors are one line on stderr and exit status 2, whatever raised them (a bad
option, an impossible mode, an FdkeeperError): ``Commands.main`` sees to it for every
command registered on ``main``, so a new command only has to raise FdkeeperError.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypedDict, TypeVar

import click

from fdkeeper import __version__
from fdkeeper.address import Address
from fdkeeper.client import KeeperClient
from fdkeeper.errors import FdkeeperError
from fdkeeper.modes import MODE_NAMES, MODES
from fdkeeper.protocol import select_connections
from fdkeeper.readiness import ReadySignal, announcing_readiness
from fdkeeper.report import format_converter, format_status
from fdkeeper.sipp.runner import RunOptions, run_sipp
from fdkeeper.statedir import LOG_NAME, resolve_directory
from fdkeeper.testrun.command import run_command
from fdkeeper.textsafe import escape_controls
from fdkeeper.tls import TlsOptions

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing's own from Python 3.11

DIR_HELP = "State directory of the keeper, refused if another user owns or can write to it (default: $FDKEEPER_DIR, else $XDG_RUNTIME_DIR/fdkeeper or /run/user/UID/fdkeeper when ours, else /run/fdkeeper for root, else /tmp/fdkeeper-UID)."
MODE_HELP = (
    "How the connection gets into the program. auto: the first that can do this run here, in this order: "
    + "; ".join(f"{mode.name}: {mode.summary}" for mode in MODES.values())
    + ". A mode that cannot do the run says so and names the one to use."
)
PASS_THROUGH: dict[str, Any] = {
    "ignore_unknown_options": True,
    "allow_interspersed_args": False,
    "help_option_names": ["--help"],
}


class Commands(click.Group):
    """The command group, with every error as one line and exit status 2, never a traceback."""

    def main(self, *args: Any, **kwargs: Any) -> NoReturn:
        kwargs["standalone_mode"] = False  # click raises; we say it in one line
        try:
            code = super().main(*args, **kwargs)
        except FdkeeperError as error:
            click.echo(str(error), err=True)
            sys.exit(error.exit_status)
        except click.ClickException as error:
            if "\n" in error.format_message().strip():  # the help itself, for a bare `fdkeeper` (click 8.2+)
                error.show()
                sys.exit(error.exit_code)
            context = error.ctx if isinstance(error, click.UsageError) else None
            where = f" (see '{context.command_path} --help')" if context else ""
            click.echo(f"fdkeeper: {' '.join(error.format_message().split())}{where}", err=True)
            sys.exit(error.exit_code)
        except click.Abort:
            click.echo("fdkeeper: aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


Command = TypeVar("Command", bound=Callable[..., Any])  # a command function, before or after click's decorators


class TlsFlags(TypedDict):
    """The values of tls_options, as click passes them to a command."""

    tls_ca: str | None
    tls_insecure: bool
    tls_cert: str | None
    tls_key: str | None
    tls_sni: str | None
    tls_min_version: str | None
    tls_keylog: str | None


def dir_option(command: Command) -> Command:
    return click.option("--dir", "directory", metavar="DIR", envvar="FDKEEPER_DIR", help=DIR_HELP)(command)


def _apply(command: Command, options: list[Callable[[Command], Command]]) -> Command:
    for option in reversed(options):
        command = option(command)
    return command


def tls_options(command: Command) -> Command:
    """The TLS options shared by `fdkeeper sipp`, `exec`, `keeper` and `convert`."""
    return _apply(
        command,
        [
            click.option(
                "--tls-ca",
                metavar="FILE",
                type=click.Path(dir_okay=False),
                help="-t l1: verify the SuT's certificate against these CAs (PEM; default: the system's trust store).",
            ),
            click.option(
                "--tls-insecure", is_flag=True, help="-t l1: do not verify the SuT's certificate (says so on stderr)."
            ),
            click.option(
                "--tls-cert",
                metavar="FILE",
                type=click.Path(dir_okay=False),
                help="-t l1: client certificate (PEM) for SuTs that require one.",
            ),
            click.option(
                "--tls-key",
                metavar="FILE",
                type=click.Path(dir_okay=False),
                help="-t l1: the client certificate's private key (default: in --tls-cert).",
            ),
            click.option(
                "--tls-sni",
                metavar="NAME",
                help="-t l1: server name to send and verify (default: the remote host if it is a name).",
            ),
            click.option(
                "--tls-min-version",
                type=click.Choice(["1.2", "1.3"]),
                help="-t l1: lowest TLS version to accept (default 1.2).",
            ),
            click.option(
                "--tls-keylog",
                metavar="FILE",
                type=click.Path(dir_okay=False),
                help="-t l1: append the TLS secrets of the connections to the SuT to FILE (SSLKEYLOGFILE format, created 0600, never through a link) so Wireshark decrypts them; sipp's -trace_msg shows the plain SIP.",
            ),
        ],
    )


def make_tls_options(
    tls_ca: str | None,
    tls_insecure: bool,
    tls_cert: str | None,
    tls_key: str | None,
    tls_sni: str | None,
    tls_min_version: str | None,
    tls_keylog: str | None,
) -> TlsOptions:
    keylog = os.path.abspath(tls_keylog) if tls_keylog else None  # the keeper's working directory is not ours
    # Links resolved here, with the user's own view: the keeper follows none (statedir.open_named_file).
    ca, cert, key = (os.path.realpath(path) if path else None for path in (tls_ca, tls_cert, tls_key))
    return TlsOptions(
        ca=ca, insecure=tls_insecure, cert=cert, key=key, sni=tls_sni, min_version=tls_min_version, keylog=keylog
    )


def ready_options(command: Command) -> Command:
    """Readiness of a server run, for scripts (fdkeeper/readiness.py)."""
    return _apply(
        command,
        [
            click.option(
                "--ready-file",
                type=click.Path(dir_okay=False, path_type=Path),
                metavar="PATH",
                help="Write PATH (atomically; an old one is removed first) once this server run is ready to receive: the kept connections handed over and sipp's listening socket up.",
            ),
            click.option(
                "--ready-fd",
                type=click.IntRange(3),
                metavar="N",
                help="Write one line to descriptor N and close it once ready (e.g. 3>ready.pipe, a named pipe); closed without a line if the run never gets ready.",
            ),
            click.option(
                "--ready-timeout",
                type=click.FloatRange(0.1, 3600),
                default=30.0,
                show_default=True,
                metavar="SECONDS",
                help="Give up waiting for readiness after this long (one line on stderr; sipp runs on).",
            ),
        ],
    )


def handoff_options(command: Command) -> Command:
    """How a run gets its connection: shared by `fdkeeper sipp` and `fdkeeper exec`."""
    return _apply(
        command,
        [
            click.option("--mode", type=click.Choice(MODE_NAMES), default="auto", show_default=True, help=MODE_HELP),
            click.option(
                "--transfer",
                type=click.Choice(["scm", "pidfd"]),
                envvar="FDKEEPER_TRANSFER",
                help="--mode ptrace: the descriptor reaches the program by SCM_RIGHTS (default) or by pidfd_getfd. Asking for one rules out the modes that cannot.",
            ),
            click.option(
                "--reconnect",
                is_flag=True,
                help="Replace a connection the SuT closed by a fresh one (registrations must then be redone).",
            ),
            click.option("--debug", is_flag=True, help="Say on stderr what is handed over, and when."),
        ],
    )


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fdkeeper")
def main() -> None:
    """Keep sipp's TCP connections to the System under Test open across sipp runs.

    \b
    Register in one run, answer calls in the next, over the same connection:
      fdkeeper sipp -sf scenarios/uac-register.xml -inf users.csv -t t1 -i 127.0.0.1 -m 1 SUT:5060
      fdkeeper sipp -sf scenarios/uas-answer.xml -t t1 -i 127.0.0.1 -p 5070 -m 5
      fdkeeper status
      fdkeeper stop

    A keeper process starts on first use and holds the connections; each sipp run is
    handed them by a handoff mode (--mode: preload, ptrace or udp; auto picks one that
    can do the run). Any other SIP agent: 'fdkeeper exec'. Try 'fdkeeper demo' for a
    complete run against a local Kamailio.
    """


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
    help="When this run starts the keeper (or converter): send RFC 5626 CRLF pings on idle connections this often.",
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

    \b
      fdkeeper sipp -sf uac-register.xml -inf users.csv -t t1 -m 1 127.0.0.1:5060
      fdkeeper sipp --mode ptrace -sf uas-answer.xml -t t1 -p 5070 -m 5
      fdkeeper sipp --tls-ca ca.pem -sf uac-register.xml -t l1 -m 1 sut.example:5061

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
    help="How the keeper speaks to the SuT; the agent always speaks plain TCP to its end.",
)
@click.option(
    "--role",
    type=click.Choice(["client", "server"]),
    default="client",
    show_default=True,
    help="client: hand over in connect(); server: hand the kept connections over as accepted ones on the first TCP listening socket.",
)
@handoff_options
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
    command: tuple[str, ...],
    **tls: Unpack[TlsFlags],
) -> None:
    """Run COMMAND (any SIP agent: baresip, pjsua, a test's own client) over the kept connection.

    \b
      fdkeeper exec --sut 127.0.0.1:5060 -- ./my-sip-client --register alice
      fdkeeper exec --sut 127.0.0.1:5060 --role server --mode ptrace -- ./static-agent

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
    )
    sys.exit(run_exec(list(command), options))


@main.command("keeper")
@dir_option
@click.option(
    "--keepalive",
    type=click.FloatRange(1, 86400),
    metavar="SECONDS",
    help="Send RFC 5626 CRLF pings on idle connections this often (off by default).",
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
    help="Take the kept TCP connections over from the running keeper, which then exits (TLS ones cannot move: listed as lost). Refused while runs hold leases.",
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
@click.option("--transport", type=click.Choice(["tcp", "tls"]), help="Only connections of this transport.")
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
    from fdkeeper.modes.udp import converter_statuses

    converters = [] if count or as_json else converter_statuses(path)  # --mode udp's, if any
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


@main.command("demo")
@click.option(
    "--sipp", "sipp_path", metavar="PATH", envvar="FDKEEPER_SIPP", help="sipp binary (default: sipp on PATH)."
)
@click.option(
    "--keep-files", is_flag=True, help="Keep the demo's work directory (configs, logs) and print where it is."
)
@click.option(
    "--auth", is_flag=True, help="The SuT wants digest credentials: REGISTER is challenged (401), the call too (407)."
)
def demo_command(sipp_path: str | None, keep_files: bool, auth: bool) -> None:
    """Register over TCP in one sipp run, answer a call in a second run, against a local Kamailio.

    Starts Kamailio on a free loopback port with its own configuration (the embedded
    default SuT), its own keeper, and prints every step and the result.
    """
    from fdkeeper.demo import run_demo

    started = time.monotonic()
    ok = run_demo(sipp=sipp_path, keep_files=keep_files, say=click.echo, auth=auth)
    click.echo(f"demo {'PASSED' if ok else 'FAILED'} in {time.monotonic() - started:.1f} s")
    sys.exit(0 if ok else 1)


@main.command("sut")
@click.option("--port", type=click.IntRange(1, 65535), metavar="PORT", help="UDP and TCP port (default: a free one).")
@click.option("--tls-port", type=click.IntRange(1, 65535), metavar="PORT", help="TLS port (default: a free one).")
@click.option(
    "--pki",
    "pki_dir",
    type=click.Path(path_type=Path, file_okay=False),
    metavar="DIR",
    help="Write the test PKI (ca.crt for --tls-ca) here (default: a temporary folder, removed at the end).",
)
def sut_command(port: int | None, tls_port: int | None, pki_dir: Path | None) -> None:
    """Run the embedded SuT (a local Kamailio, TCP and TLS) in the foreground, to try fdkeeper against.

    Prints its addresses, domain, test CA and commands to paste; Ctrl-C (or SIGTERM) stops it.
    """
    from fdkeeper.sutcommand import serve

    stopped_by = serve(port, tls_port, pki_dir, say=click.echo)
    click.echo(f"fdkeeper sut: stopped ({stopped_by.name})")


@main.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="The checks as JSON, for scripts.")
def doctor_command(as_json: bool) -> None:
    """Say what this machine lacks for fdkeeper, and the one command that installs each.

    Exit status 0 when all the basic path needs (sipp, the shim, Kamailio for the embedded
    SuT, the open-file limit) is here, 1 otherwise.
    """
    from fdkeeper.doctor import doctor

    sys.exit(doctor(as_json, say=click.echo))


main.add_command(run_command)  # `fdkeeper run TEST...`: its exit status (0/1/2) is its own


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
by the keeper. fdkeeper's own options: `fdkeeper sipp --help`.

  fdkeeper-sipp /usr/bin/sipp -sf scenarios/uac-register.xml -t t1 -m 1 127.0.0.1:5060"""
