"""Options several commands share: the state directory, the TLS options towards the SuT, SIP over
WebSocket (--ws and its handshake), the readiness of a server run, and the handoff (--mode,
--transfer, --reconnect, --debug)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

import click

from fdkeeper.errors import FdkeeperError

# The modes, TLS and WebSocket modules are imported where used: `fdkeeper status` and `stop`
# share dir_option but need none of them (about 25 ms of every start; test_cli_imports.py).
if TYPE_CHECKING:
    from fdkeeper.tls import TlsOptions
    from fdkeeper.websocket import WsOptions

DIR_HELP = "State directory of the keeper, refused if another user owns or can write to it (default: $FDKEEPER_DIR, else $XDG_RUNTIME_DIR/fdkeeper or /run/user/UID/fdkeeper when ours, else /run/fdkeeper for root, else /tmp/fdkeeper-UID)."


def mode_help() -> str:
    from fdkeeper.modes import MODES

    return (
        "How the connection gets into the program. auto: the first that can do this run here, in this order: "
        + "; ".join(f"{mode.name}: {mode.summary}" for mode in MODES.values())
        + ". A mode that cannot do the run says so and names the one to use."
    )


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
    from fdkeeper.tls import TlsOptions

    keylog = os.path.abspath(tls_keylog) if tls_keylog else None  # the keeper's working directory is not ours
    # Links resolved here, with the user's own view: the keeper follows none (statedir.open_named_file).
    ca, cert, key = (os.path.realpath(path) if path else None for path in (tls_ca, tls_cert, tls_key))
    return TlsOptions(
        ca=ca, insecure=tls_insecure, cert=cert, key=key, sni=tls_sni, min_version=tls_min_version, keylog=keylog
    )


def ws_options(command: Command) -> Command:
    """SIP over WebSocket (RFC 7118), shared by `fdkeeper sipp` and `exec`: --ws and the handshake's
    path, Origin and extra headers; make_ws_options checks them."""
    return _apply(
        command,
        [
            click.option(
                "--ws",
                is_flag=True,
                help="Speak SIP over WebSocket to the SuT: WS over -t t1/tn, WSS over -t l1/ln (exec: --transport "
                "tcp/tls). The keeper makes the HTTP Upgrade (Sec-WebSocket-Protocol: sip) and frames each "
                "message; the program speaks plain SIP to it, and sipp's scenario says WS/WSS in [transport].",
            ),
            click.option(
                "--ws-path",
                metavar="PATH",
                help="--ws: the path of the Upgrade request (default /), e.g. /ws.",
            ),
            click.option(
                "--ws-origin",
                metavar="ORIGIN",
                help="--ws: the Origin header to send, for a server that checks it, e.g. https://app.example.",
            ),
            click.option(
                "--ws-header",
                "ws_headers",
                metavar="'NAME: VALUE'",
                multiple=True,
                help="--ws: one more header of the Upgrade request (repeatable, at most 16), e.g. "
                "'Authorization: Bearer TOKEN'.",
            ),
        ],
    )


def make_ws_options(
    ws: bool, ws_path: str | None, ws_origin: str | None, ws_headers: tuple[str, ...]
) -> WsOptions | None:
    """The handshake's options, checked (one line naming the option and what is wrong); None
    without --ws, where giving any of them is a mistake."""
    from fdkeeper.websocket import WsOptions, check_origin, check_path, parse_header_lines

    if not ws:
        given = [
            name
            for name, value in (("--ws-path", ws_path), ("--ws-origin", ws_origin), ("--ws-header", ws_headers))
            if value
        ]
        if given:
            raise FdkeeperError(
                f"fdkeeper: {given[0]} is a WebSocket option: add --ws (SIP over WebSocket) or leave it out"
            )
        return None
    for header in ws_headers:  # one by one, so the line names the bad one
        if "\n" in header or "\r" in header:
            raise FdkeeperError(f"fdkeeper: --ws-header {header[:200]!r}: one header per --ws-header")
        _checked("--ws-header", header, parse_header_lines)
    return WsOptions(
        path=_checked("--ws-path", ws_path, check_path) if ws_path is not None else "/",
        origin=_checked("--ws-origin", ws_origin, check_origin) if ws_origin is not None else None,
        headers=_checked(
            "--ws-header", "\n".join(ws_headers), parse_header_lines, quoted=False
        ),  # their count and size
    )


Checked = TypeVar("Checked")


def _checked(option: str, value: str, check: Callable[[str], Checked], quoted: bool = True) -> Checked:
    """check(value), its ValueError one line that names the option (and the value, ``quoted``)."""
    try:
        return check(value)
    except ValueError as error:
        shown = f" {value[:200]!r}" if quoted else ""
        raise FdkeeperError(f"fdkeeper: {option}{shown}: {error}") from None


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
    from fdkeeper.modes import MODE_NAMES

    return _apply(
        command,
        [
            click.option("--mode", type=click.Choice(MODE_NAMES), default="auto", show_default=True, help=mode_help()),
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
