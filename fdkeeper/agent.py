"""`fdkeeper exec`: the kept-connection handoff for any SIP agent, not only sipp.

The agent's connect() to the SuT address (client role) is handed the kept connection, or,
in the server role, the kept connections are handed to it as accepted ones on its first
TCP listening socket: by the preload shim or by ptrace, as for `fdkeeper sipp`. The agent's
arguments mean nothing to fdkeeper, so modes that rewrite sipp's (udp) cannot run it. With --ws
the keeper speaks SIP over WebSocket to the SuT (over TCP, or TLS for wss) and the agent plain
SIP to its end, as over TLS; what the agent writes in its Via is its own.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from fdkeeper.address import Address, resolve, split_host_port
from fdkeeper.errors import FdkeeperError
from fdkeeper.handoff import Plan, Run, opening_fields, run_handed_over
from fdkeeper.modes import WEBSOCKET_OVER, HandoffRequest, ModeOptions, PtraceOptions, RunNeeds
from fdkeeper.statedir import resolve_directory, socket_path
from fdkeeper.tls import TlsOptions
from fdkeeper.websocket import WsOptions


@dataclass
class ExecOptions:
    sut: str | None = None  # IP:PORT, [IPv6]:PORT or HOST:PORT (resolved here); required for the client role
    transport: str = "tcp"  # tcp or tls; with ``websocket``, what the WebSocket runs over
    role: str = "client"
    mode: str = "auto"
    transfer: str | None = None  # --mode ptrace: scm (its default) or pidfd
    directory: str | os.PathLike[str] | None = None
    reconnect: bool = False
    debug: bool = False
    tls: TlsOptions | None = None  # client role over TLS: how the keeper verifies the SuT
    websocket: WsOptions | None = None  # --ws: SIP over WebSocket (ws over tcp, wss over tls)
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def keeper_transport(self) -> str:
        """What the keeper speaks to the SuT: tcp, tls, or with --ws ws or wss."""
        return WEBSOCKET_OVER[self.transport] if self.websocket is not None else self.transport

    def needs(self) -> RunNeeds:
        """What this run asks of a handoff mode: one connection, any program."""
        return RunNeeds(role=self.role, transport=self.keeper_transport, sipp=False, transfer=self.transfer)


def run_exec(command: list[str], options: ExecOptions) -> int:
    """Run COMMAND with the kept connection handed over; return its exit status."""
    program = _program(command)
    if options.role not in ("client", "server"):
        raise FdkeeperError(f"fdkeeper: --role {options.role}: use client or server")
    if options.transport not in ("tcp", "tls"):
        raise FdkeeperError(f"fdkeeper: --transport {options.transport}: use tcp or tls")
    return run_handed_over(ExecRun(command, program, options))


class ExecRun(Run):
    """Any program's part of the pipeline (fdkeeper/handoff.py): its arguments as given.

    PREPARE checks the keeper (and its TLS options) before the agent starts, so errors are one
    line here. The connection itself is opened at the agent's connect(), from the address the
    agent binds (its identity, keeper/identity.py): opened now, it would be one the agent never uses.
    """

    def __init__(self, command: list[str], program: Path, options: ExecOptions) -> None:
        super().__init__(mode=options.mode, program=program, needs=options.needs(), extra_env=options.extra_env)
        self.command, self.options = command, options

    def plan(self) -> Plan:
        options = self.options
        remote = _sut_address(options.sut)
        if options.role == "client" and remote is None:
            raise FdkeeperError("fdkeeper: a client agent needs --sut HOST:PORT (the SuT address its connect() uses)")
        directory = resolve_directory(options.directory)
        request = HandoffRequest(
            program=self.program,
            args=list(self.command[1:]),
            role=options.role,
            control_socket=socket_path(directory),
            remote=remote,
            transport=options.keeper_transport,
            reconnect=options.reconnect,
            debug=options.debug,
        )
        client = options.role == "client"
        prepare = dict(
            role=options.role,
            transport=request.transport,
            remote=remote,
            local="-" if client else None,
            open_at_lease=True if client else None,
            reconnect=options.reconnect or None,
            **opening_fields(options.role, request.transport, options.tls, options.websocket),
        )
        return Plan(request, ModeOptions(ptrace=PtraceOptions(transfer=options.transfer or "scm")), prepare)

    def prepared(self, fields: dict[str, str], request: HandoffRequest) -> None:
        """Nothing to say: PREPARE opened nothing for an agent, and it has no -i/-p to name."""


def _program(command: list[str]) -> Path:
    if not command:
        raise FdkeeperError("fdkeeper: exec needs a command: fdkeeper exec [OPTIONS] -- COMMAND ARGS...")
    found = shutil.which(command[0])
    if found is None:
        raise FdkeeperError(f"fdkeeper: {command[0]} not found (not on PATH, or not executable)")
    return Path(found).resolve()


def _sut_address(text: str | None) -> Address | None:
    """--sut HOST:PORT as numbers; a name resolves as the agent's own getaddrinfo would (first answer)."""
    if not text:
        return None
    try:
        host, port = split_host_port(text)
    except ValueError:
        raise FdkeeperError(f"fdkeeper: --sut {text}: expected IP:PORT, [IPv6]:PORT or HOST:PORT") from None
    try:
        return resolve(host, port)
    except (OSError, UnicodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise FdkeeperError(f"fdkeeper: --sut {text}: cannot resolve {host!r}: {reason}; check the name") from None
