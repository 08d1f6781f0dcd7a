"""The converter's stream side: one kept TCP or TLS connection per destination."""

from __future__ import annotations

import dataclasses
import socket
import ssl
import time

from fdkeeper.address import Address, format_address, is_ip
from fdkeeper.protocol import JsonObject
from fdkeeper.sip.framing import PONG, SipFramer
from fdkeeper.tcp import open_tcp
from fdkeeper.tls import TlsOptions, handshake

LinkKey = tuple[str, int, str]  # (host, port, transport) of a destination
SOCKET_BUFFER = 4 * 1024 * 1024
OWN_BRANCH = b"z9hG4bKfdk"  # our Via branches: the incoming branch's tail follows it


class Link:
    """One TCP or TLS connection to a destination, with its framer, output buffer and the
    header lines the converter writes for it (built once here, not per message)."""

    def __init__(self, key: LinkKey, sock: socket.socket, local: Address, listen: bytes, early: bytes = b"") -> None:
        self.key = key
        self.host, self.port, self.transport = key
        self.sock = sock
        self.fd = sock.fileno()
        self.local = local
        self.local_hp = format_address(local).encode()
        self.remote_hp = format_address((self.host, self.port)).encode()
        upper = self.transport.upper().encode()
        lower = self.transport.encode()
        self.via = b"Via: SIP/2.0/" + upper + b" " + self.local_hp + b";branch=" + OWN_BRANCH
        self.via_value = self.via[5:]
        self.local_host = local[0].lower().encode()
        self.via_udp = b"Via: SIP/2.0/UDP " + listen + b";branch=" + OWN_BRANCH
        self.rr_to_stream = b"Record-Route: <sip:%s;transport=%s;lr>, <sip:%s;transport=udp;lr>\r\n" % (
            self.local_hp,
            lower,
            listen,
        )
        self.rr_to_udp = b"Record-Route: <sip:%s;transport=udp;lr>, <sip:%s;transport=%s;lr>\r\n" % (
            listen,
            self.local_hp,
            lower,
        )
        self.framer = SipFramer()
        self.out = bytearray()
        self.want_out = False  # EPOLLOUT watched
        self.closed_reason = ""
        self.closed_at: float | None = None
        self.opened_at = time.time()
        self.last_activity = time.monotonic()
        self.ping_sent_at: float | None = None
        self.messages_out = self.messages_in = self.pings_answered = 0
        self.early = early
        self.is_tls = isinstance(sock, ssl.SSLSocket)

    def receive(self, data: bytes, now: float) -> list[bytes]:
        """The whole messages a read completes. Keep-alives in it end a wait for our pong, and
        each CRLFCRLF ping gets its CRLF pong queued in ``out``. FramingError if the stream
        cannot be cut (``framer.discard()`` then drops the rest)."""
        self.last_activity = now
        framer = self.framer
        before = framer.keepalives
        try:
            return framer.feed(data)
        finally:  # also on FramingError: the keep-alives before it count
            keepalives = framer.keepalives - before
            if keepalives:
                self.ping_sent_at = None
                pings = keepalives // 2  # a CRLFCRLF ping; a lone CRLF is the pong to ours
                if pings:
                    self.pings_answered += pings
                    self.out += PONG * pings

    @property
    def closed(self) -> bool:
        return bool(self.closed_reason)

    @property
    def state(self) -> str:
        return "closed" if self.closed else "open"

    def label(self) -> str:
        return f"{self.local_hp.decode()}->{self.remote_hp.decode()}/{self.transport}"

    def as_dict(self) -> JsonObject:
        return {
            "remote": self.remote_hp.decode(),
            "transport": self.transport,
            "local": self.local_hp.decode(),
            "state": self.state,
            "closed_reason": self.closed_reason,
            "age": round(time.time() - self.opened_at, 3),
            "messages_out": self.messages_out,
            "messages_in": self.messages_in,
            "keepalives_in": self.framer.keepalives,
            "pings_answered": self.pings_answered,
            "queued_bytes": len(self.out),
        }


def open_link(
    key: LinkKey, listen: bytes, tls_options: TlsOptions | None, timeout: float, local: Address | None = None
) -> Link:
    """Connect (and for TLS hand-shake) to a destination, from ``local`` when given (the address
    plain sipp would connect from: the run's identity); FdkeeperError with one line if not."""
    host, port, transport = key
    sock = open_tcp((host, port), local, timeout)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    local = sock.getsockname()[:2]
    early = b""
    if transport == "tls":
        options = tls_options or TlsOptions()
        if options.sni is None and not is_ip(host):
            options = dataclasses.replace(options, sni=host)
        sock, early = handshake(sock, (host, port), options, timeout)
    else:
        sock.setblocking(False)
    return Link(key, sock, local, listen, early)
