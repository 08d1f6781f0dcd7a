"""Transport addresses: the one place that parses and formats HOST:PORT.

Every command-line option, control-protocol field, status line and SIP header that carries
an address goes through these functions, so ``[IPv6]:PORT`` is handled the same everywhere.
"""

from __future__ import annotations

import ipaddress
import socket

Address = tuple[str, int]


def format_address(address: Address) -> str:
    """``IP:PORT``, with brackets around an IPv6 host (as sipp and SIP headers write it)."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``HOST[:PORT]`` or ``[IPv6][:PORT]`` into (host without brackets, port).

    A missing port takes ``default_port``; with none given the port is required.
    Raises ValueError naming what is wrong.
    """
    text = text.strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r} is not [IPv6]:PORT")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:  # a bare IPv6 address: no port can follow it
        host, port_text = text, ""
    else:
        host, port_text = text, ""
    if not host:
        raise ValueError(f"{text!r} has no host")
    if not port_text:
        if default_port is None:
            raise ValueError(f"{text!r} has no port (expected HOST:PORT)")
        return host, default_port
    return host, parse_port(port_text, text)


def parse_port(text: str, where: str | None = None) -> int:
    """A port number 0-65535; ValueError naming ``where`` (the whole text) if not."""
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ValueError(f"{text!r} is not a port number" + (f" in {where!r}" if where and where != text else ""))
    return int(text)


def parse_address(text: str) -> Address:
    """``IP:PORT`` or ``[IPv6]:PORT`` with a numeric IP (no names), normalised."""
    host, port = split_host_port(text)
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        raise ValueError(f"{text!r} is not IP:PORT (a numeric address is needed)") from None


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def resolve(host: str, port: int) -> Address:
    """The first stream address of ``host`` (as sipp resolves its remote host); OSError if none."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    sockaddr = info[0][4]
    ip, number = sockaddr[0], sockaddr[1]
    assert isinstance(ip, str) and isinstance(number, int)  # an IP address, not the raw form of another family
    return ip, number
