"""Hand-made SIP for probing the testbed: an OPTIONS request, sent over UDP or read back
from a stream."""

from __future__ import annotations

import re
import socket
import uuid
from collections.abc import Sequence

from fdkeeper.address import family_of, format_address
from fdkeeper.sip.framing import SipFramer
from fdkeeper.testbed.net import DEFAULT_DOMAIN


def options_request(ruri: str, via: str, *, headers: Sequence[str] = (), from_domain: str = DEFAULT_DOMAIN) -> bytes:
    """An OPTIONS request as bytes (for UDP, TCP or TLS; Content-Length 0).

    `via` is the Via value without branch, e.g. "SIP/2.0/TLS 127.0.0.1:5061".
    """
    branch = "z9hG4bK" + uuid.uuid4().hex[:16]
    to_uri = re.sub(r"^(sips?:)[^@]*@", r"\1", ruri)
    extra = "".join(f"{line}\r\n" for line in headers)
    return (
        f"OPTIONS {ruri} SIP/2.0\r\n"
        f"Via: {via};branch={branch};rport\r\n"
        f"Max-Forwards: 70\r\n"
        f"From: <sip:probe@{from_domain}>;tag={uuid.uuid4().hex[:8]}\r\n"
        f"To: <{to_uri}>\r\n"
        f"Call-ID: {uuid.uuid4().hex}@fdkeeper-probe\r\n"
        f"CSeq: 1 OPTIONS\r\n"
        f"{extra}"
        f"Content-Length: 0\r\n\r\n"
    ).encode()


def read_sip_message(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Read one SIP message (headers + Content-Length body) from a stream
    socket (TCP or an ssl.SSLSocket); keep-alive CRLFs before it are skipped
    and anything after it is dropped. Raises ConnectionError on EOF before a
    whole message."""
    sock.settimeout(timeout)
    framer = SipFramer()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"EOF after {framer.pending} bytes of a SIP message")
        messages = framer.feed(chunk)
        if messages:
            return messages[0]


def udp_options(
    host: str, port: int, user: str | None = None, headers: Sequence[str] = (), wait: float = 1.0
) -> bytes | None:
    """Send one OPTIONS over UDP to host:port, R-URI = that address (with `user`
    if given); return the response, None on timeout or error."""
    target = format_address((host, port))
    ruri = f"sip:{user}@{target}" if user else f"sip:{target}"
    with socket.socket(family_of(host), socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        sock.settimeout(wait)
        via = f"SIP/2.0/UDP {format_address((host, sock.getsockname()[1]))}"
        try:
            sock.sendto(options_request(ruri, via, headers=headers), (host, port))
            data, _ = sock.recvfrom(65535)
        except OSError:  # timeout, or ICMP refused while not yet bound
            return None
    return data
