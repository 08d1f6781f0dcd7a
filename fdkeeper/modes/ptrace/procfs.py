"""What the traced program's /proc entries and raw socket addresses tell the ptrace session."""

from __future__ import annotations

import fcntl
import functools
import ipaddress
import os
import socket
import struct

from fdkeeper.address import Address, parse_address
from fdkeeper.modes.ptrace.permission import read_quietly


def epoll_fds(tgid: int) -> list[int]:
    """The process's epoll descriptors."""
    found = []
    for name in os.listdir(f"/proc/{tgid}/fd"):
        try:
            if os.readlink(f"/proc/{tgid}/fd/{name}") == "anon_inode:[eventpoll]":
                found.append(int(name))
        except OSError:
            continue
    return found


def epoll_registrations(tgid: int, fd: int, ino: int, epfds: list[int] | None = None) -> list[tuple[int, int, int]]:
    """(epfd, events, data) of every epoll registration of ``fd`` in the process.

    Read from /proc/PID/fdinfo of its epoll descriptors (``epfds``, else all of them) rather
    than from traced epoll_ctl() calls: nothing to track, and registrations made before we
    looked count too.
    """
    found = []
    for name in epoll_fds(tgid) if epfds is None else epfds:
        for line in (read_quietly(f"/proc/{tgid}/fdinfo/{name}") or "").splitlines():
            words = line.split()
            if words[:1] != ["tfd:"]:
                continue
            fields = dict(zip(words[::2], words[1::2], strict=False))
            extra = dict(w.split(":", 1) for w in words if ":" in w and not w.endswith(":"))
            if int(fields["tfd:"]) == fd and int(extra.get("ino", "0"), 16) == ino:
                found.append((int(name), int(fields["events:"], 16), int(fields["data:"], 16)))
    return found


def parse_sockaddr(raw: bytes) -> Address | None:
    """A struct sockaddr_in/in6 read from the program, as a normalised address."""
    if len(raw) >= 8 and struct.unpack_from("<H", raw)[0] == socket.AF_INET:
        return normal((socket.inet_ntop(socket.AF_INET, raw[4:8]), struct.unpack_from(">H", raw, 2)[0]))
    if len(raw) >= 24 and struct.unpack_from("<H", raw)[0] == socket.AF_INET6:
        return normal((socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack_from(">H", raw, 2)[0]))
    return None


@functools.lru_cache(maxsize=256)  # the SuT's address, at every connect() of a per-call run
def normal(address: Address) -> Address:
    """One spelling per address (::1 and 0:0::1 compare equal)."""
    try:
        return (str(ipaddress.ip_address(address[0])), int(address[1]))
    except ValueError:
        return (address[0], int(address[1]))


def peer_sockaddr(sock: socket.socket, peer: str) -> bytes:
    """accept()'s address for a kept connection: the TCP peer, or the keeper's peers= for TLS."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            host, port = sock.getpeername()[:2]
        except OSError:
            return b""
    elif peer and peer != "-":
        host, port = parse_address(peer)
    else:
        return b""
    if ":" in host:
        return (
            struct.pack("<H", socket.AF_INET6)
            + struct.pack(">HI", port, 0)
            + socket.inet_pton(socket.AF_INET6, host)
            + b"\0" * 4
        )
    return struct.pack("<H", socket.AF_INET) + struct.pack(">H", port) + socket.inet_aton(host) + b"\0" * 8


def match_nonblocking(kept: socket.socket, program: socket.socket) -> None:
    """File status flags live on the open file description: give the kept one the program's O_NONBLOCK."""
    want = fcntl.fcntl(program.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
    have = fcntl.fcntl(kept.fileno(), fcntl.F_GETFL)
    if have & os.O_NONBLOCK != want:
        fcntl.fcntl(kept.fileno(), fcntl.F_SETFL, (have & ~os.O_NONBLOCK) | want)


def setsockopt_quietly(sock: socket.socket, level: int, name: int, value: bytes) -> None:
    try:
        sock.setsockopt(level, name, value)
    except OSError:
        pass
