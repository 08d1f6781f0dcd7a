"""`fdkeeper sipp`: run sipp with its own arguments, handing it the kept connection.

Everything that can be checked before sipp starts is checked here, so that a bad address,
a refused connection or a busy lease gives one clear line and exit status 2 instead of
sipp's own fatal error halfway through its start-up. The one exception is a connection whose
identity only sipp's bind tells (sipp 3.7 without -p, sipp/binding.py): opening it here would
show the SuT a connection plain sipp never opens, so it is opened at sipp's connect(), and a
refusal is the shim's one line there.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fdkeeper.address import Address, format_address
from fdkeeper.client import KeeperClient
from fdkeeper.errors import FdkeeperError
from fdkeeper.handoff import KeeperSettings, Plan, Run, notice, opening_fields, run_handed_over
from fdkeeper.modes import HandoffRequest, ModeOptions, PtraceOptions, UdpOptions
from fdkeeper.openfiles import raise_open_file_limit
from fdkeeper.process import spawn
from fdkeeper.protocol import OVER_TLS
from fdkeeper.sipp.args import SippInvocation, parse_sipp_args
from fdkeeper.sipp.limits import (
    check_handed_connections,
    check_sipp_sockets,
    sut_limit_notice,
)
from fdkeeper.sipp.request import keeper_transport, sipp_needs, sipp_request
from fdkeeper.sipp.scenario import WRITTEN_TRANSPORT, tls_arguments
from fdkeeper.sipp.tlsoptions import keeper_tls_options
from fdkeeper.sipp.versions import sipp_version
from fdkeeper.statedir import resolve_directory, socket_path
from fdkeeper.tls import TlsOptions
from fdkeeper.websocket import WsOptions


@dataclass
class RunOptions:
    sipp: str | None = None
    directory: str | os.PathLike[str] | None = None
    mode: str = "auto"
    wait: float = 0.0
    reconnect: bool = False
    keepalive: float | None = None
    connect_timeout: float | None = None
    debug: bool = False
    transfer: str | None = None  # --mode ptrace: scm (its default) or pidfd
    tls: TlsOptions = TlsOptions()
    answer_options: bool = False  # a keeper this run starts answers the SuT's OPTIONS between runs
    websocket: WsOptions | None = None  # --ws: SIP over WebSocket (ws over -t t1/tn, wss over -t l1/ln)


def find_sipp(option: str | None) -> Path:
    """--sipp, else $FDKEEPER_SIPP, else sipp on PATH."""
    wanted = option or os.environ.get("FDKEEPER_SIPP") or "sipp"
    found = shutil.which(wanted)
    if found is None:
        where = f"'{wanted}' on PATH" if os.sep not in wanted else wanted
        raise FdkeeperError(
            f"fdkeeper: sipp not found ({where}); install Debian's sip-tester package "
            "or pass --sipp PATH (or set FDKEEPER_SIPP)"
        )
    return Path(found)


def run_sipp(args: list[str], options: RunOptions) -> int:
    """Run one sipp; return its exit status (128+N if a signal N ended it)."""
    sipp = find_sipp(options.sipp)
    directory = resolve_directory(options.directory)
    invocation = read_arguments(sipp, args, directory)
    if invocation.info_only:
        return spawn([os.fspath(sipp), *args], {})
    transport = keeper_transport(invocation, options.websocket is not None)  # --ws over UDP: one line
    if transport == "udp":
        notice("UDP transport: there is no connection to keep; running sipp as it is")
        return spawn([os.fspath(sipp), *args], {})
    _refuse_unsupported_transport(invocation)
    remote = invocation.remote_address()
    if invocation.role == "client" and remote is None:
        raise FdkeeperError(
            f"fdkeeper: the client scenario {_scenario_label(invocation)} sends first, so it needs the SuT's "
            "address: add it as sipp's remote host argument, e.g. 127.0.0.1:5060"
        )
    run = SippRun(sipp, invocation, remote, directory, options, transport)
    if options.mode != "udp":  # through the converter sipp runs -t u1: no socket per call
        said = check_sipp_sockets(invocation, *run.open_files)
        if said:
            notice(said)
    return run_handed_over(run)


class SippRun(Run):
    """A sipp run's part of the pipeline (fdkeeper/handoff.py).

    The keeper holds the connections: PREPARE opens (or checks) them first, so errors are one
    line here. Only a connection sipp itself will ask for is opened: one of the identity it
    binds. When that is known only once sipp binds (sipp 3.7 without -p), PREPARE opens nothing
    and checks what it can (the keeper, the kept connection of the likely identity); the lease
    opens the connection from the address sipp bound, as plain sipp would connect.
    """

    def __init__(
        self,
        sipp: Path,
        invocation: SippInvocation,
        remote: Address | None,
        directory: Path,
        options: RunOptions,
        transport: str,
    ) -> None:
        super().__init__(
            mode=options.mode,
            program=sipp,
            needs=sipp_needs(invocation, options.transfer, transport),
            keeper=KeeperSettings(options.keepalive, options.connect_timeout, options.answer_options),
        )
        self.invocation, self.remote, self.directory, self.options = invocation, remote, directory, options
        self.transport = transport  # what the keeper speaks to the SuT (request.keeper_transport)
        # sipp's (soft, hard) open-file limits: the soft one raised to the hard one, inherited by sipp.
        self.open_files = raise_open_file_limit()

    def plan(self) -> Plan:
        invocation, options = self.invocation, self.options
        tls = keeper_tls_options(options.tls, invocation) if self.transport in OVER_TLS else None
        binding = invocation.binding(self.remote)
        request = sipp_request(
            self.program,
            invocation,
            socket_path(self.directory),
            self.remote,
            self.transport,
            reconnect=options.reconnect,
            debug=options.debug,
            binding=binding,
        )
        mode_options = ModeOptions(
            ptrace=PtraceOptions(transfer=options.transfer or "scm"),
            udp=UdpOptions(tls=tls, keepalive=options.keepalive, connect_timeout=options.connect_timeout),
        )
        prepare = dict(
            role=request.role,
            transport=request.transport,
            remote=request.remote,
            local=binding.local or "-",  # the run's identity (keeper/identity.py), or its likely one
            open_at_lease=None if binding.known or request.role != "client" else True,
            reconnect=options.reconnect,
            wait=options.wait or None,
            per_call=request.per_call or None,
            users=invocation.user_count() if request.per_call else None,
            **opening_fields(request.role, request.transport, tls, options.websocket),
        )
        return Plan(request, mode_options, prepare)

    def prepared(self, fields: dict[str, str], request: HandoffRequest) -> None:
        if request.role == "server" and fields.get("ids"):
            check_handed_connections(listed_count(fields, "ids"), *self.open_files)
        if fields.get("borrowed"):
            named = ", ".join(f"#{item.replace('@', ' from ', 1)}" for item in fields["borrowed"].split(","))
            more = listed_count(fields, "borrowed") - len(fields["borrowed"].split(","))
            named += f" and {more} more" if more > 0 else ""
            notice(
                f"no kept connection has this run's -i/-p; answering on the idle one(s) no run holds: {named} "
                "(give the register run the same -i/-p to make them this run's)"
            )
        if fields.get("replaced") and request.remote:  # only a client run opens a connection
            notice(
                f"the kept connection to {format_address(request.remote)}/{request.transport} was closed; "
                "opened a fresh one (--reconnect): registrations made over the old one must be redone"
            )
        if fields.get("reused") and request.transport in WRITTEN_TRANSPORT and request.remote:
            self._say_handshake_options_unused(fields["reused"], request.remote, request.transport)
        if fields.get("closed") and fields.get("ids"):
            count = listed_count(fields, "closed")
            notice(f"{count} kept connection(s) were closed by the SuT and are left out (fdkeeper status lists them)")

    def _say_handshake_options_unused(self, reused: str, remote: Address, transport: str) -> None:
        """--tls-sni and --tls-keylog act on a TLS handshake, --ws-path, --ws-origin and --ws-header
        on a WebSocket one; a reused connection had its own."""
        given = [f"{option} {value}" for option, value in self._handshake_options(transport) if value]
        if given:
            ids = ", ".join(f"#{item}" for item in reused.split(","))
            notice(
                f"{' and '.join(given)} not used: this run reuses the kept {WRITTEN_TRANSPORT[transport]} connection "
                f"{ids} to {format_address(remote)}, whose handshake an earlier run made with its own options "
                "(they apply to a new connection: 'fdkeeper stop' ends the kept ones)"
            )

    def _handshake_options(self, transport: str) -> list[tuple[str, object]]:
        """The options this run gave for its transport's handshakes (None or empty where not given)."""
        tls, websocket = self.options.tls, self.options.websocket
        options: list[tuple[str, object]] = []
        if transport in OVER_TLS:
            options += [("--tls-sni", tls.sni), ("--tls-keylog", tls.keylog)]
        if websocket is not None:
            headers = ", ".join(f"'{name}: {value}'" for name, value in websocket.headers)
            options += [("--ws-path", None if websocket.path == "/" else websocket.path)]
            options += [("--ws-origin", websocket.origin), ("--ws-header", headers)]
        return options

    @contextmanager
    def for_keeper(self, request: HandoffRequest) -> Iterator[HandoffRequest]:
        """The run, and after it a per-user run says when the SuT closed some of its connections."""
        closed_before = self._closed_by_the_sut(request)
        try:
            with self._scenario_copies(request) as for_run:
                yield for_run
        finally:
            if closed_before is not None:
                said = sut_limit_notice(self._closed_by_the_sut(request), closed_before, request)
                if said:
                    notice(said)

    def _closed_by_the_sut(self, request: HandoffRequest) -> int | None:
        """How many kept connections of a per-user run's SuT and transport are closed (None: not asked)."""
        if not (request.per_call and request.remote):
            return None
        try:
            status = KeeperClient(self.directory).status(
                state="closed", remote=request.remote, transport=request.transport, count=True
            )
        except (FdkeeperError, OSError):
            return None
        count = status.get("count")
        return count if isinstance(count, int) else None

    @contextmanager
    def _scenario_copies(self, request: HandoffRequest) -> Iterator[HandoffRequest]:
        """Over TLS, WS or WSS sipp speaks TCP to the keeper and the scenario says TLS, WS or
        WSS: copies of the scenarios for the run, removed after it."""
        if self.transport not in WRITTEN_TRANSPORT:
            yield request
            return
        args, scenario_copies = tls_arguments(self.invocation, request.program, request.directory, self.transport)
        try:
            yield dataclasses.replace(request, args=args)
        finally:
            for copy in scenario_copies:
                copy.unlink(missing_ok=True)


def listed_count(fields: dict[str, str], name: str) -> int:
    """How many ids a PREPARE reply's list ``name`` stands for: its ``name_count``, else its length
    (the keeper names at most 20 and counts the rest)."""
    if f"{name}_count" in fields:
        return int(fields[f"{name}_count"])
    return len(fields[name].split(",")) if fields.get(name) else 0


def read_arguments(sipp: Path, args: list[str], directory: Path) -> SippInvocation:
    """sipp's arguments read with the option table of this sipp's version (`sipp -v`, cached)."""
    version = sipp_version(sipp, directory)
    unknown = version.unknown_notice(sipp)
    if unknown:
        notice(unknown)
    return parse_sipp_args(args, version.table)


def _refuse_unsupported_transport(invocation: SippInvocation) -> None:
    option = invocation.transport_option
    if invocation.transport not in ("tcp", "tls"):
        raise FdkeeperError(
            f"fdkeeper: transport -t {option} is not kept by fdkeeper; use -t t1 or -t l1 (or -t u1 for UDP)"
        )


def _scenario_label(invocation: SippInvocation) -> str:
    return str(invocation.scenario_file) if invocation.scenario_file else f"-sn {invocation.scenario_name}"
