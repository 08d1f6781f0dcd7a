"""TCP sockets to the SuT: open, connect errors named, bytes queued.

Ground shared by the keeper (which connects from events, keeper/opening.py) and the converter
(which connects blocking, convert/links.py), so that neither imports the other for them.
"""

from __future__ import annotations

import errno
import fcntl
import socket
import termios

from fdkeeper.address import Address, family_of, format_address
from fdkeeper.errors import FdkeeperError, out_of_descriptors

# Linux's IP_BIND_ADDRESS_NO_PORT (not in Python's socket module before 3.12).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def queued_bytes(sock: socket.socket) -> int:
    """Bytes waiting in ``sock``'s receive queue (FIONREAD), read without consuming them."""
    return _queue_length(sock, termios.FIONREAD)


def unsent_bytes(sock: socket.socket) -> int:
    """Bytes in ``sock``'s send queue the peer has not acknowledged yet (SIOCOUTQ)."""
    return _queue_length(sock, termios.TIOCOUTQ)  # SIOCOUTQ has TIOCOUTQ's number


def _queue_length(sock: socket.socket, request: int) -> int:
    buffer = bytearray(4)
    fcntl.ioctl(sock.fileno(), request, buffer)
    return int.from_bytes(buffer, "little", signed=True)


def open_tcp(remote: Address, local: Address | None, timeout: float) -> socket.socket:
    """Connect to the SuT, bound to ``local`` when given; raise FdkeeperError on failure (blocks:
    the converter's; the keeper connects from events, keeper/opening.py).

    The socket is left in blocking mode, like a freshly accepted one: sipp sets the file
    status flags it wants, and the keeper itself only ever uses MSG_DONTWAIT calls.
    """
    try:
        sock = new_tcp_socket(remote, local)
    except OSError as error:
        if not out_of_descriptors(error):
            raise
        raise FdkeeperError(
            f"fdkeeper: cannot open a socket for {format_address(remote)}/tcp: {error.strerror}; "
            "raise RLIMIT_NOFILE (ulimit -n) or hold fewer connections",
            "limit",
        ) from None
    try:
        sock.settimeout(timeout)
        sock.connect(remote)
        sock.settimeout(None)
        return sock
    except OSError as error:
        sock.close()
        raise connect_error(remote, local, timeout, error) from None


def new_tcp_socket(remote: Address, local: Address | None) -> socket.socket:
    """A TCP socket for ``remote``, bound to ``local`` when given; FdkeeperError if it cannot bind.

    OSError if the socket itself cannot be made (out of descriptors, say): the caller names that
    limit in its own words (the keeper's is keeper/connection.py: new_descriptors)."""
    sock = socket.socket(family_of(remote[0]), socket.SOCK_STREAM)
    try:
        # sipp binds its own sockets to the same port with SO_REUSEADDR (-p with -t t1).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if local is not None:
            if local[1] == 0:
                # The port chosen at connect(), by the whole 4-tuple: bind(ip, 0) searches the
                # ports bound to ip, O(connections) per bind (at 19,000 kept connections most of
                # the keeper's time, issue 20); connect() never picks a port someone bound.
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind(local)
    except OSError as error:
        sock.close()
        raise connect_error(remote, local, 0, error) from None
    return sock


def connect_error(
    remote: Address, local: Address | None, timeout: float, error: OSError, reached: bool = False
) -> FdkeeperError:
    """The one line for a connect (or bind) to the SuT that failed with ``error``: what, and what to check.
    ``reached``: this SuT accepted earlier connections of ours (it was up, so a refusal is news)."""
    target = f"{format_address(remote)}/tcp"
    if reached and error.errno == errno.ECONNREFUSED:
        return refused_after_reached(target)
    if isinstance(error, TimeoutError) or error.errno == errno.ETIMEDOUT:
        return FdkeeperError(
            f"fdkeeper: the SuT at {target} did not answer within {timeout:g} s; "
            "check the address and that it listens on TCP (or raise --connect-timeout)",
            "timeout",
        )
    if error.errno == errno.ECONNREFUSED:
        return FdkeeperError(
            f"fdkeeper: the SuT at {target} refused the connection; is it running and listening on TCP there?",
            "refused",
        )
    if error.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL) and local is not None:
        return FdkeeperError(
            f"fdkeeper: cannot bind the connection to {target} to local address {format_address(local)}: "
            f"{error.strerror}; check -i / -p",
            "refused",
        )
    return FdkeeperError(f"fdkeeper: cannot connect to the SuT at {target}: {error.strerror or error}", "refused")


def refused_after_reached(target: str) -> FdkeeperError:
    """A SuT that accepted our earlier connections refuses a new one: it stopped listening, or a
    limit in front of it rejects (a SuT at its own connection limit accepts and closes instead)."""
    return FdkeeperError(
        f"fdkeeper: the SuT at {target} refused the connection after accepting earlier ones: it stopped listening "
        "there (restarted or ended?) or a connection limit in front of it rejects new ones (a firewall's "
        "connlimit); check that it still runs, then run again with --reconnect",
        "refused",
    )


# How fdkeeper names a SuT at its connection limit, wherever it sees one (a new connection
# closed at once; kept connections ended mid-run).
SUT_AT_ITS_LIMIT = (
    "has most likely reached its connection limit (Kamailio: tcp_max_connections, tls_max_connections, "
    "open_files_limit); raise it, then run again with --reconnect"
)


def closed_at_once_error(target: str, otherwise: str = "") -> FdkeeperError:
    """A SuT that accepted our earlier connections closes a new one before a byte of it (or during
    its TLS handshake): how a SuT at its connection limit answers (Kamailio's handle_new_connect
    accepts and closes past tcp_max_connections, its tls module past tls_max_connections)."""
    return FdkeeperError(
        f"fdkeeper: the SuT at {target} closed the new connection at once, having accepted earlier ones: it "
        + SUT_AT_ITS_LIMIT
        + (f"; {otherwise}" if otherwise else ""),
        "refused",
    )
