"""What a sipp run hands the modes, read from its arguments: the transport the keeper speaks
to the SuT (-t, and --ws for SIP over WebSocket), its RunNeeds, its HandoffRequest, and sipp's
arguments for a run through the converter (--mode udp).

Modes know no program's options (modes/base.py). Every rewrite of sipp's arguments is made in
sipp/: here the one towards the converter, in scenario.py the one for a TLS, WS or WSS run over
the keeper (tls_arguments). Both read the invocation as the sipp being run reads it (args.py, with its
release's option table) and hand the modes the result as plain data.
"""

from __future__ import annotations

from pathlib import Path

from fdkeeper.address import Address
from fdkeeper.errors import FdkeeperError
from fdkeeper.modes import WEBSOCKET_OVER, ConverterArguments, HandoffRequest, RunNeeds
from fdkeeper.sipp.args import SippInvocation
from fdkeeper.sipp.binding import Binding

UDP_TRANSPORT = "u1"
UDP_LOCAL_IP = "127.0.0.1"  # where sipp sends from without -i: the converter listens on loopback


def keeper_transport(invocation: SippInvocation, websocket: bool = False) -> str:
    """What the keeper speaks to the SuT: -t's transport (tcp, tls...), or with --ws
    (``websocket``) WebSocket over it: ws over -t t1/tn, wss over -t l1/ln; over anything else
    --ws is one line."""
    if not websocket:
        return invocation.transport
    if invocation.transport not in WEBSOCKET_OVER:
        given = (
            f"-t {invocation.transport_option}" if invocation.transport_index is not None else "sipp's default -t u1"
        )
        raise FdkeeperError(
            f"fdkeeper: --ws runs over TCP or TLS, not {given}: give sipp -t t1 or -t tn (WS), -t l1 or -t ln (WSS)"
        )
    return WEBSOCKET_OVER[invocation.transport]


def sipp_needs(invocation: SippInvocation, transfer: str | None = None, transport: str | None = None) -> RunNeeds:
    """What a sipp run asks of a handoff mode (``transport``: keeper_transport's, default -t's)."""
    return RunNeeds(
        role=invocation.role,
        per_call_option=f"-t {invocation.transport_option}" if invocation.per_call_sockets else None,
        transport=transport or invocation.transport,
        sipp=True,
        transfer=transfer,
    )


def sipp_request(
    sipp: Path,
    invocation: SippInvocation,
    control_socket: Path,
    remote: Address | None,
    transport: str | None = None,
    *,
    reconnect: bool = False,
    debug: bool = False,
    binding: Binding | None = None,
) -> HandoffRequest:
    """The request for sipp run with its arguments as given (less the -tls_* the keeper uses):
    `fdkeeper sipp` (runner.py), library users, tests and benches. ``binding``: where the run
    binds (SippInvocation.binding), the identity the keeper keeps its connection under.
    ``transport``: what the keeper speaks to the SuT (keeper_transport's: ws or wss with --ws),
    by default -t's."""
    return HandoffRequest(
        program=sipp,
        args=list(invocation.args),
        role=invocation.role,
        control_socket=control_socket,
        remote=remote,
        transport=transport or invocation.transport,
        per_call=invocation.per_call_client,
        reconnect=reconnect,
        debug=debug,
        local=binding.local if binding else None,
        local_known=binding.known if binding else True,
        converter=converter_arguments(invocation),
    )


def converter_arguments(invocation: SippInvocation) -> ConverterArguments:
    """sipp's arguments for -t u1 towards the converter: -t u1, the converter's address as the
    remote host (added for a client scenario that has none), and -i and -p where missing (-p:
    the free port the mode picks; -i: loopback, where the converter listens)."""
    args = list(invocation.args)
    remote = invocation.remote_index
    if invocation.transport_index is not None:
        args[invocation.transport_index + 1] = UDP_TRANSPORT
    else:
        args[:0] = ["-t", UDP_TRANSPORT]
        remote = None if remote is None else remote + 2
    if remote is None and invocation.role == "client":
        args.append("")  # the converter's address, filled in by the mode
        remote = len(args) - 1
    local_ip = invocation.local_ip or UDP_LOCAL_IP
    prefix = ["-p", ""] if invocation.local_port is None else []  # the port, filled in by the mode
    if invocation.local_ip is None:
        prefix += ["-i", local_ip]
    return ConverterArguments(
        args=(*prefix, *args),
        converter_index=None if remote is None else remote + len(prefix),
        local_ip=local_ip,
        local_port=invocation.local_port or 0,
        port_index=1 if invocation.local_port is None else None,
    )
