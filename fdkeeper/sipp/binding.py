"""Where sipp binds its sockets, release by release: a run's identity as the SuT will see it.

Read from sipp's src/socket.cpp (open_connections, SIPpSocket::connect) and checked against
the binaries (tests/keeper/test_sut_connections.py):

- The main socket (a TCP listener over -t t1/tn/l1/ln) binds -p; without -p the first port of
  5060-5119 it can bind (SO_REUSEADDR, so only a listener or a socket without it holds a
  port), else one the system picks. A -p that is taken stops sipp ("Unable to bind main
  socket"). The address is -i, else the wildcard.
- sipp 3.6 binds its -t t1/l1 client connection to -p, else to an ephemeral port.
- sipp 3.7.0 and later (commit c4d9c9a, "Fix for local_port keyword using TCP or TLS") bind
  it to the main socket's address and port: -p, else the port the main socket found, which
  is 5060 only while no other process listens there.

So the identity of a 3.7 run without -p is known only once sipp has bound: fdkeeper then opens
nothing before the lease (the connection is opened at sipp's connect(), from the address the
shim or the tracer reports), and only says which identity the run will most likely get.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from fdkeeper.address import Address, family_of

SIPP_DEFAULT_PORTS = range(5060, 5120)  # DEFAULT_PORT .. DEFAULT_PORT + 59
# The first release whose client connection binds the main socket's port (not an ephemeral one).
CLIENT_ON_MAIN_PORT_SINCE = (3, 7, 0)


@dataclass(frozen=True)
class Binding:
    """What a run binds: ``local`` as the shim would report it (port 0: an ephemeral port), and
    whether that is certain before sipp starts (False: ``local`` is the likely one)."""

    local: Address | None
    known: bool = True


def sipp_binding(
    release: tuple[int, int, int], local_ip: str | None, local_port: int | None, remote: Address | None = None
) -> Binding:
    """Where sipp ``release`` binds, given -i and -p: its -t t1/l1 client connection, and for a
    server run the address it listens on, which is the same rule. Without -i the address is
    the wildcard of the SuT's family (sipp takes its family from the SuT's).

    Without -p, sipp 3.7 connects from, and listens on, its main socket's port, so a register
    run and an answer run both without -p are one identity; sipp 3.6 connects from an ephemeral
    port, and all its runs without -p (server runs too) share one connection, as they always have.
    """
    ip = local_ip or wildcard(remote)
    if local_port is not None:
        return Binding((ip, local_port))
    if release < CLIENT_ON_MAIN_PORT_SINCE:
        return Binding((ip, 0) if local_ip else None)  # an ephemeral port: the shared connection
    return Binding(likely_main_port(ip), known=False)


def wildcard(remote: Address | None) -> str:
    return "::" if remote and ":" in remote[0] else "0.0.0.0"


def likely_main_port(ip: str, ports: range = SIPP_DEFAULT_PORTS) -> Address:
    """The address sipp's main socket would bind now without -p: the first port of ``ports``
    a TCP socket with SO_REUSEADDR can bind on ``ip`` (as sipp tries them), else port 0.
    Only a guess: another process may take the port before sipp starts."""
    for port in ports:
        if _bindable(ip, port):
            return ip, port
    return ip, 0


def _bindable(ip: str, port: int) -> bool:
    with socket.socket(family_of(ip), socket.SOCK_STREAM) as probe:  # bound, never connected: the SuT sees nothing
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((ip, port))
        except OSError:
            return False
    return True
