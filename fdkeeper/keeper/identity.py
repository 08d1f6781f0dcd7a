"""A run's identity as the SuT sees it: which kept connection is whose.

Plain sipp processes never share a connection: with `-t t1`/`-t l1` the SuT tells them apart by
the local address and port sipp binds its connection to. So runs that bind the same address
share a kept connection across runs (register, then answer on the same -p, as over UDP), and
runs that bind different ones each get their own. What sipp binds depends on its release
(fdkeeper/sipp/binding.py): -p when given; without it sipp 3.6 binds an ephemeral port, a fresh
identity per process, for which fdkeeper keeps one shared connection for all such runs (None
here, whatever -i they give), while sipp 3.7 binds its main socket's port, the first free one of
5060-5119, known only once sipp has bound it. The identity is therefore always the address the
run's own bind() asked for, as the shim (or the ptrace tracer) reports it in LEASE; a connection
is opened before sipp starts only when that address is certain (PREPARE without open_at_lease),
so the SuT never sees a connection plain sipp would not have opened.
Per-user runs (-t tn/ln) are told apart by their user (the AoR), which the key holds already.
"""

from __future__ import annotations

import ipaddress
import socket

from fdkeeper.address import Address

# Source address the kernel picks towards each SuT, for -p given without -i (bind to any).
_route_sources: dict[Address, str] = {}


def identity_of(local: Address | None, remote: Address | None) -> Address | None:
    """The identity of a run that binds ``local``; None when sipp picks an ephemeral port (no -p,
    with or without -i: a new identity per process for plain sipp, the shared connection here).

    "-p 5063" and "-i 127.0.0.1 -p 5063" are the same identity when 127.0.0.1 is the address
    the SuT sees: a wildcard address stands for the source address of the route to the SuT.
    """
    if local is None or local[1] == 0:
        return None
    ip, port = local
    if _is_wildcard(ip) and remote is not None:
        ip = route_source(remote)
    return ip, port


def _is_wildcard(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_unspecified
    except ValueError:  # not numeric: a name is never the wildcard
        return False


def route_source(remote: Address) -> str:
    """The local address the kernel would send from to ``remote`` (a UDP connect sends nothing)."""
    source = _route_sources.get(remote)
    if source is None:
        family = socket.AF_INET6 if ":" in remote[0] else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect(remote)
                source = probe.getsockname()[0]
            except OSError:
                return "::" if family == socket.AF_INET6 else "0.0.0.0"
        _route_sources[remote] = source
    return source
