"""What a sipp run hands the modes, read from its arguments: its RunNeeds, its HandoffRequest,
and sipp's arguments for a run through the converter (--mode udp).

Modes know no program's options (modes/base.py). Every rewrite of sipp's arguments is made in
sipp/: here the one towards the converter, in scenario.py the one for a TLS run over the keeper
(tls_arguments). Both read the invocation as the sipp being run reads it (args.py, with its
release's option table) and hand the modes the result as plain data.
"""

from __future__ import annotations

from pathlib import Path

from fdkeeper.address import Address
from fdkeeper.modes import ConverterArguments, HandoffRequest, RunNeeds
from fdkeeper.sipp.args import SippInvocation
from fdkeeper.sipp.binding import Binding

UDP_TRANSPORT = "u1"
UDP_LOCAL_IP = "127.0.0.1"  # where sipp sends from without -i: the converter listens on loopback


def sipp_needs(invocation: SippInvocation, transfer: str | None = None) -> RunNeeds:
    """What a sipp run asks of a handoff mode."""
    return RunNeeds(
        role=invocation.role,
        per_call_option=f"-t {invocation.transport_option}" if invocation.per_call_sockets else None,
        tls=invocation.transport == "tls",
        sipp=True,
        transfer=transfer,
    )


def sipp_request(
    sipp: Path,
    invocation: SippInvocation,
    control_socket: Path,
    remote: Address | None,
    transport: str = "tcp",
    *,
    reconnect: bool = False,
    debug: bool = False,
    binding: Binding | None = None,
) -> HandoffRequest:
    """The request for sipp run with its arguments as given (less the -tls_* the keeper uses):
    `fdkeeper sipp` (runner.py), library users, tests and benches. ``binding``: where the run
    binds (SippInvocation.binding), the identity the keeper keeps its connection under."""
    return HandoffRequest(
        program=sipp,
        args=list(invocation.args),
        role=invocation.role,
        control_socket=control_socket,
        remote=remote,
        transport=transport,
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
