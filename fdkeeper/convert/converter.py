"""`fdkeeper convert`: a stateless UDP <-> TCP/TLS SIP converter with a kept stream connection.

sipp speaks UDP to the converter's --listen address; the converter holds one TCP or TLS
connection per destination (the SuT, and whatever an `X-Outbound-Proxy` header names) for as
long as it runs, whatever the sipp runs do. A connection the SuT closes is reported and stays
closed until an explicit reconnect (control request RECONNECT), like the keeper's --reconnect:
registrations made over it are gone with it.

Routing (RFC 3261 §16.11, stateless proxy):
- requests from sipp go over the stream: to `X-Outbound-Proxy` (removed) when present, else to
  the connection a remaining Route names, else to --sut. Own Route entries are removed (loose
  routing); dialog-creating requests (INVITE, SUBSCRIBE, REFER without a To tag) get two
  Record-Route entries, the one facing the next hop on top (transport=tcp/tls towards the SuT,
  transport=udp towards sipp); our Via goes on top, its branch derived from the incoming one so
  a CANCEL or a non-2xx ACK matches its INVITE at the SuT.
- requests from the SuT go to sipp over UDP: in-dialog ones (a To tag) to their Request-URI
  when it is an IP address, initial ones to --sipp-address (changed at run time by the control
  request SIPP); our Via on top.
- responses pop our Via and follow the next one (received/rport honoured).
- --hide-topology: no Via and no Record-Route of ours on either side. A transaction map keyed
  by the top Via branch (bounded, entries expire after 64*T1) says where each response goes,
  and a dialog map (Call-ID, bounded, expiring) keeps in-dialog requests of a dialog that went
  to an X-Outbound-Proxy destination on that destination.

Stream framing is fdkeeper.sipframe.SipFramer: CRLFCRLF pings from the SuT are answered with a
CRLF pong, pongs are consumed, neither reaches sipp. Messages over 1300 bytes cannot move to a
stream towards sipp (it listens on UDP only): up to 65,507 bytes they are sent anyway and
counted (`udp_oversize_sent`); larger requests are answered 513, larger responses dropped.
Malformed SIP is counted by kind, logged once per kind, dropped, and never fatal.

Status: the control socket's STATUS (JSON), a stats line on SIGUSR1, and --stats-file
(JSON, rewritten every second). Run it with `fdkeeper convert ...` or
`fdkeeper convert ...`.
"""

from __future__ import annotations

import collections
import hashlib
import ipaddress
import json
import logging
import operator
import os
import re
import select
import signal
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Callable

from fdkeeper.keeper.connection import open_tcp
from fdkeeper.errors import FdkeeperError
from fdkeeper.sip.framing import PING, PONG, FramingError, SipFramer
from fdkeeper.tls import TlsOptions, handshake

log = logging.getLogger("fdkeeper.converter")

UDP_SOFT_LIMIT = 1300  # RFC 3261 §18.1.1: MTU 1500 - 200
UDP_MAX = 65507  # the largest UDP payload over IPv4
READ_CHUNK = 256 * 1024
UDP_BATCH = 512  # datagrams read per wake-up before the streams are flushed
SOCKET_BUFFER = 4 * 1024 * 1024
TRANSACTION_TTL = 32.0  # 64 * T1: the longest a non-INVITE transaction lives (Timer F)
DIALOG_TTL = 3600.0
MAP_LIMIT = 200_000
DIALOG_CREATING = frozenset({b"INVITE", b"SUBSCRIBE", b"REFER"})
OWN_BRANCH = b"z9hG4bKfdk"
_TAG = re.compile(rb";[ \t]*tag[ \t]*=", re.IGNORECASE)
_HEADER_NAME = re.compile(rb"[!-9;-~]+")
_METHODS = frozenset({b"INVITE", b"ACK", b"BYE", b"CANCEL", b"OPTIONS", b"REGISTER", b"SUBSCRIBE", b"NOTIFY",
                      b"REFER", b"MESSAGE", b"INFO", b"PRACK", b"UPDATE", b"PUBLISH"})

Address = tuple[str, int]


class Malformed(ValueError):
    """A message that cannot be handled; ``kind`` names the counter."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


# --------------------------------------------------------------------------
# SIP text: finding headers by position in the head
# --------------------------------------------------------------------------


def header_pattern(*names: bytes) -> re.Pattern:
    """A header line with one of these names, any case: "\\nname :" . Case-insensitive
    matching of the message itself spares a lowered copy of every head."""
    return re.compile(rb"\n(?:" + b"|".join(re.escape(n) for n in names) + rb")[ \t]*:[ \t]*", re.IGNORECASE)


def find_header(data: bytes, limit: int, pattern: re.Pattern, start: int = 0) -> tuple[int, int, int] | None:
    """The first header line (at or after ``start``) that ``pattern`` (header_pattern) finds:
    (line start, value start, line end). ``limit`` is where the head ends: just past the CRLF
    of its last header; line end is that line's CRLF (folded lines included)."""
    match = pattern.search(data, start, limit)
    if match is None:
        return None
    value = match.end()
    end = data.find(b"\r\n", value)
    while data[end + 2] in b" \t":  # a folded line goes on (the head is followed by CRLF)
        end = data.find(b"\r\n", end + 2)
    return match.start() + 1, value, end


VIA = header_pattern(b"via", b"v")
ROUTE = header_pattern(b"route")
TO = header_pattern(b"to", b"t")
CALL_ID = header_pattern(b"call-id", b"i")
CONTENT_LENGTH = header_pattern(b"content-length", b"l")
MAX_FORWARDS = header_pattern(b"max-forwards")
OUTBOUND = header_pattern(b"x-outbound-proxy")


# The text of one comma-separated element: runs of anything but , < " and whole <...> or "..."
# (commas inside do not count). It stops at a comma, or at an unclosed < or " .
_ELEMENT = re.compile(rb'(?:[^,<"]+|<[^>]*>|"[^"]*")*')


def end_of_element(data: bytes, at: int, end: int) -> int:
    """Where the first comma-separated element of the header value data[at:end] ends
    (absolute); an unclosed < or " runs to the end of the value."""
    stop = _ELEMENT.match(data, at, end).end()
    if stop < end and data[stop] != 0x2C:  # not a comma: an unclosed < or "
        return end
    return stop


_URI_CACHE: dict[bytes, tuple[bytes, int, bytes] | None] = {}
_URI_CACHE_LIMIT = 4096  # entries; emptied when full
_URI_CACHE_TEXT = 256  # longer texts are parsed every time (bounds the cache's memory)


def uri_hostport(text: bytes) -> tuple[bytes, int, bytes] | None:
    """(host lowered, port, transport lowered) of a SIP URI or name-addr; None if not one.
    Memoized: Route entries (ours and the SuT's Record-Route) and Request-URIs repeat call
    after call, and parsing one is several microseconds of Python."""
    result = _URI_CACHE.get(text, _URI_CACHE)
    if result is _URI_CACHE:
        result = _uri_hostport(text)
        if len(text) <= _URI_CACHE_TEXT:
            if len(_URI_CACHE) >= _URI_CACHE_LIMIT:
                _URI_CACHE.clear()
            _URI_CACHE[text] = result
    return result


def _uri_hostport(text: bytes) -> tuple[bytes, int, bytes] | None:
    text = text.strip()
    if b"<" in text:
        text = text[text.index(b"<") + 1:]
        text = text.split(b">", 1)[0]
    lower = text.lower()
    if lower.startswith(b"sip:"):
        rest, default_port = lower[4:], 5060
    elif lower.startswith(b"sips:"):
        rest, default_port = lower[5:], 5061
    else:
        rest, default_port = lower, 5060  # a bare host:port (X-Outbound-Proxy allows it)
    hostpart, _, params = rest.partition(b";")
    hostpart = hostpart.split(b"?", 1)[0]
    if b"@" in hostpart:
        hostpart = hostpart.rsplit(b"@", 1)[1]
    host, port = split_hostport(hostpart, default_port)
    if not host:
        return None
    transport = b""
    for param in params.split(b";"):
        key, _, value = param.partition(b"=")
        if key.strip() == b"transport":
            transport = value.strip()
    if default_port == 5061 and not transport:
        transport = b"tls"
    return host, port, transport


def split_hostport(text: bytes, default_port: int = 5060) -> tuple[bytes, int]:
    text = text.strip()
    if text.startswith(b"["):
        host, _, rest = text[1:].partition(b"]")
        port_text = rest[1:] if rest.startswith(b":") else b""
    elif text.count(b":") == 1:
        host, port_text = text.split(b":")
    else:
        host, port_text = text, b""
    if port_text:
        if not port_text.isdigit() or not 0 <= int(port_text) < 65536:
            return b"", 0
        return host, int(port_text)
    return host, default_port


_VIA = re.compile(rb"SIP[ \t]*/[ \t]*2\.0[ \t]*/[ \t]*[A-Za-z]+[ \t]+(\[[0-9A-Fa-f:.]+\]|[^\[\]:;, \t\r\n]+)"
                  rb"(?:[ \t]*:[ \t]*([0-9]{1,5}))?[ \t]*(.*)", re.IGNORECASE | re.DOTALL)
_PARAM_CACHE: dict[bytes, re.Pattern] = {}


def via_parts(value: bytes) -> tuple[bytes, bytes, int, bytes]:
    """(protocol, sent-by host lowered, port, params) of one Via element; raises Malformed."""
    match = _VIA.match(value)
    if match is None or (match.group(3) and not match.group(3).startswith(b";")):
        raise Malformed("bad Via")
    port = match.group(2)
    if port is None:
        port = 5061 if value[:16].upper().rstrip().endswith(b"TLS") or b"/TLS " in value[:16].upper() else 5060
    else:
        port = int(port)
        if not 0 < port < 65536:
            raise Malformed("bad Via")
    return b"", match.group(1).lower(), port, match.group(3)


def via_param(params: bytes, name: bytes) -> bytes | None:
    """A Via parameter's value (b"" for a bare one like rport); None if absent."""
    pattern = _PARAM_CACHE.get(name)
    if pattern is None:
        pattern = _PARAM_CACHE[name] = re.compile(rb";[ \t]*" + name + rb"[ \t]*(?:=[ \t]*([^;, \t\r\n]*))?(?=[;, \t\r\n]|$)", re.IGNORECASE)
    match = pattern.search(params)
    if match is None:
        return None
    return match.group(1) or b""


def is_ip(host: bytes) -> bool:
    try:
        ipaddress.ip_address(host.decode("ascii").strip("[]"))
    except (ValueError, UnicodeDecodeError):
        return False
    return True


def hostport_bytes(address: Address) -> bytes:
    host, port = address
    return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode()


# --------------------------------------------------------------------------
# a parsed message (just enough of it)
# --------------------------------------------------------------------------


class Message:
    """One SIP message: start line, head (searched up to ``limit``), body length."""

    __slots__ = ("data", "head_end", "limit", "is_request", "method", "start_end", "body_length", "has_length")

    def __init__(self, data: bytes, datagram: bool) -> None:
        head_end = data.find(b"\r\n\r\n")
        if head_end < 0:
            raise Malformed("no end of headers")
        start_end = data.find(b"\r\n")
        start = data[:start_end]
        if start.startswith(b"SIP/2.0 "):
            code = start[8:11]
            if len(code) != 3 or not code.isdigit() or start[11:12] not in (b" ", b""):
                raise Malformed("bad status line")
            self.is_request, self.method = False, b""
        else:
            space = start.find(b" ")
            if not start.endswith(b" SIP/2.0") or start.count(b" ") != 2 or space <= 0:
                raise Malformed("bad request line")
            method = start[:space]
            if method not in _METHODS and not _HEADER_NAME.fullmatch(method):
                raise Malformed("bad request line")
            self.is_request, self.method = True, method
        limit = head_end + 2
        span = find_header(data, limit, CONTENT_LENGTH)
        body = len(data) - head_end - 4
        if span is None:
            if not datagram and body:
                raise Malformed("no Content-Length")  # the framer never gives us this
            self.has_length, length = False, body
        else:
            text = data[span[1]:span[2]].strip()
            if not text.isdigit():
                raise Malformed("bad Content-Length")
            self.has_length, length = True, int(text)
            if length > body:
                raise Malformed("truncated body")
            if length < body:  # RFC 3261 §18.3: bytes past Content-Length are discarded
                data = data[:head_end + 4 + length]
        self.data, self.head_end, self.limit, self.start_end, self.body_length = data, head_end, limit, start_end, length

    def header(self, pattern: re.Pattern, start: int = 0) -> tuple[int, int, int] | None:
        return find_header(self.data, self.limit, pattern, start)

    def value(self, span: tuple[int, int, int]) -> bytes:
        return self.data[span[1]:span[2]]

    def top_via(self) -> tuple[tuple[int, int, int], int]:
        """The top Via header's span and where its first element ends (absolute)."""
        span = self.header(VIA)
        if span is None:
            raise Malformed("no Via")
        return span, end_of_element(self.data, span[1], span[2])

    def has_to_tag(self) -> bool:
        span = self.header(TO)
        if span is None:
            raise Malformed("no To")
        return bool(_TAG.search(self.data, span[1], span[2]))

    def call_id(self) -> bytes:
        span = self.header(CALL_ID)
        return self.data[span[1]:span[2]].strip() if span else b""


class _Answered(Exception):
    """The converter answered the request itself (483): nothing to forward."""


_START = operator.itemgetter(0)


class Edits(list):
    """Replacements on a message's bytes, applied in one join: append((start, end, text)).
    A plain list underneath: adding an edit is a C call, not a Python one."""

    __slots__ = ()

    def apply(self, data: bytes) -> bytes:
        if not self:
            return data
        if len(self) == 1:  # the usual case for a response: our Via out
            start, end, text = self[0]
            return b"".join((data[:start], text, data[end:]))
        self.sort(key=_START)  # stable: insertions at one place keep their order
        parts, at = [], 0
        for start, end, text in self:
            parts.append(data[at:start])
            parts.append(text)
            at = max(at, end)
        parts.append(data[at:])
        return b"".join(parts)


def remove_element(message: Message, span: tuple[int, int, int], element_end: int, edits: Edits) -> None:
    """Remove the first element of a header: the whole line if it is the only one."""
    data = message.data
    if element_end >= span[2]:
        edits.append((span[0], span[2] + 2, b""))
    else:
        rest = element_end + 1
        while data[rest:rest + 1] in (b" ", b"\t", b"\r", b"\n"):
            rest += 1
        edits.append((span[1], rest, b""))


def next_via(message: Message, span: tuple[int, int, int], element_end: int) -> bytes:
    """The Via element after the top one: later in the same line, or the next Via line."""
    data = message.data
    if element_end < span[2]:
        at = element_end + 1
        while data[at:at + 1] in (b" ", b"\t", b"\r", b"\n"):
            at += 1
        return data[at:end_of_element(data, at, span[2])]
    following = message.header(VIA, span[2])
    if following is None:
        raise Malformed("response with no Via after ours")
    return data[following[1]:end_of_element(data, following[1], following[2])]


def make_reply(message: Message, code: int, reason: str) -> bytes:
    """A stateless reply to a request: its Via, From, To (with a tag), Call-ID and CSeq."""
    keep = []
    head = message.data[message.start_end + 2:message.head_end + 2]
    lines = head.split(b"\r\n")
    for line in lines:
        name = line.split(b":", 1)[0].strip().lower()
        if name in (b"via", b"v", b"from", b"f", b"call-id", b"i", b"cseq"):
            keep.append(line)
        elif name in (b"to", b"t"):
            keep.append(line if _TAG.search(line) else line + b";tag=fdk" + hashlib.md5(message.data).hexdigest()[:10].encode())
    return b"SIP/2.0 %d %s\r\n%s\r\nServer: fdkeeper-converter\r\nContent-Length: 0\r\n\r\n" % (
        code, reason.encode(), b"\r\n".join(keep))


# --------------------------------------------------------------------------
# bounded, expiring maps (--hide-topology, X-Outbound-Proxy dialogs)
# --------------------------------------------------------------------------


class ExpiringMap:
    """key -> value with a time to live and a size bound; oldest entries go first."""

    def __init__(self, ttl: float, limit: int = MAP_LIMIT) -> None:
        self.ttl, self.limit = ttl, limit
        self.entries: dict = {}
        self.evicted = 0

    def put(self, key, value, now: float) -> None:
        entries = self.entries
        if key in entries:
            del entries[key]  # move to the young end
        elif len(entries) >= self.limit:
            del entries[next(iter(entries))]
            self.evicted += 1
        entries[key] = (now + self.ttl, value)

    def get(self, key):
        found = self.entries.get(key)
        return found[1] if found else None

    def expire(self, now: float) -> None:
        entries = self.entries
        while entries:
            key = next(iter(entries))
            if entries[key][0] > now:
                return
            del entries[key]

    def __len__(self) -> int:
        return len(self.entries)


# --------------------------------------------------------------------------
# stream connections
# --------------------------------------------------------------------------


class Link:
    """One TCP or TLS connection to a destination, with its framer and output buffer."""

    def __init__(self, key: tuple[str, int, str], sock, local: Address, listen: bytes, early: bytes = b"") -> None:
        self.key = key
        self.host, self.port, self.transport = key
        self.sock = sock
        self.fd = sock.fileno()
        self.local = local
        self.local_hp = hostport_bytes(local)
        self.remote_hp = hostport_bytes((self.host, self.port))
        upper = self.transport.upper().encode()
        lower = self.transport.encode()
        self.via = b"Via: SIP/2.0/" + upper + b" " + self.local_hp + b";branch=" + OWN_BRANCH
        self.via_value = self.via[5:]
        self.local_host = local[0].lower().encode()
        self.via_udp = b"Via: SIP/2.0/UDP " + listen + b";branch=" + OWN_BRANCH
        self.rr_to_stream = b"Record-Route: <sip:%s;transport=%s;lr>, <sip:%s;transport=udp;lr>\r\n" % (self.local_hp, lower, listen)
        self.rr_to_udp = b"Record-Route: <sip:%s;transport=udp;lr>, <sip:%s;transport=%s;lr>\r\n" % (listen, self.local_hp, lower)
        self.framer = SipFramer()
        self.out = bytearray()
        self.want_out = False  # EPOLLOUT registered
        self.closed_reason = ""
        self.closed_at: float | None = None
        self.opened_at = time.time()
        self.last_activity = time.monotonic()
        self.ping_sent_at: float | None = None
        self.messages_out = self.messages_in = self.pings_answered = 0
        self.early = early
        self.is_tls = isinstance(sock, ssl.SSLSocket)

    @property
    def closed(self) -> bool:
        return bool(self.closed_reason)

    def label(self) -> str:
        return f"{self.local_hp.decode()}->{self.remote_hp.decode()}/{self.transport}"

    def as_dict(self) -> dict:
        return {
            "remote": self.remote_hp.decode(), "transport": self.transport, "local": self.local_hp.decode(),
            "state": "closed" if self.closed else "open", "closed_reason": self.closed_reason,
            "age": round(time.time() - self.opened_at, 3), "messages_out": self.messages_out,
            "messages_in": self.messages_in, "keepalives_in": self.framer.keepalives,
            "pings_answered": self.pings_answered, "queued_bytes": len(self.out),
        }


def open_link(key: tuple[str, int, str], listen: bytes, tls_options: TlsOptions | None, timeout: float) -> Link:
    """Connect (and for TLS hand-shake) to a destination; FdkeeperError with one line if not."""
    host, port, transport = key
    sock = open_tcp((host, port), None, timeout)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    local = sock.getsockname()[:2]
    early = b""
    if transport == "tls":
        options = tls_options or TlsOptions()
        if options.sni is None and not is_ip(host.encode()):
            options = TlsOptions(**{**options.__dict__, "sni": host})
        sock, early = handshake(sock, (host, port), options, timeout)
    else:
        sock.setblocking(False)
    return Link(key, sock, local, listen, early)


# --------------------------------------------------------------------------
# the converter: message processing (no I/O of its own: testable)
# --------------------------------------------------------------------------


class Converter:
    """Routes messages between sipp (UDP) and the stream links. I/O goes through
    ``send_udp(data, address)`` and ``Link.out``; ``connect(key)`` opens a link."""

    def __init__(self, listen: Address, default_key: tuple[str, int, str], sipp_address: Address | None,
                 hide_topology: bool, send_udp: Callable[[bytes, Address], None],
                 connect: Callable[[tuple[str, int, str]], Link]) -> None:
        self.listen = listen
        self.listen_hp = hostport_bytes(listen)
        self.default_key = default_key
        self.sipp_address = sipp_address
        self.hide = hide_topology
        self.send_udp = send_udp
        self.connect = connect
        self.links: dict[tuple[str, int, str], Link] = {}
        self.by_hostport: dict[tuple[bytes, int], Link] = {}
        self.own: set[tuple[bytes, int]] = {self._own_key(listen)}
        self.dirty: set[Link] = set()
        self.transactions = ExpiringMap(TRANSACTION_TTL)
        self.dialogs = ExpiringMap(DIALOG_TTL)
        self.counters: collections.Counter[str] = collections.Counter()
        self.malformed: collections.Counter[str] = collections.Counter()
        self.warned: set[str] = set()
        self.now = time.monotonic()

    @staticmethod
    def _own_key(address: Address) -> tuple[bytes, int]:
        return address[0].lower().encode(), address[1]

    def add_link(self, link: Link) -> Link:
        old = self.links.get(link.key)
        if old is not None:
            self.own.discard(self._own_key(old.local))
        self.links[link.key] = link
        self.by_hostport[(link.host.lower().encode(), link.port)] = link
        self.own.add(self._own_key(link.local))
        return link

    def link_for(self, key: tuple[str, int, str]) -> Link | None:
        link = self.links.get(key)
        if link is None:
            try:
                link = self.add_link(self.connect(key))
            except FdkeeperError as error:
                self.warn_once(f"connect {key}", f"{error}")
                self.counters["connect_failures"] += 1
                return None
        return link

    # -- bookkeeping

    def drop(self, kind: str, data: bytes = b"") -> None:
        self.malformed[kind] += 1
        self.warn_once(kind, f"dropped malformed SIP ({kind}), first seen: {data[:120]!r}")

    def warn_once(self, kind: str, text: str) -> None:
        if kind not in self.warned:
            self.warned.add(kind)
            log.warning("%s (logged once; counted in the status)", text)

    # -- from sipp (UDP)

    def from_sipp(self, data: bytes, source: Address) -> None:
        self.counters["udp_in"] += 1
        if not data.strip(b"\r\n\x00 "):
            self.counters["udp_keepalives"] += 1
            return
        try:
            message = Message(data, datagram=True)
            if message.is_request:
                self._request_from_sipp(message, source)
            else:
                self._response_from_sipp(message)
        except Malformed as error:
            self.drop(error.kind, data)
        except UnicodeDecodeError:  # a host or address that is not text: malformed, never fatal
            self.drop("bad encoding", data)
        except _Answered:
            pass

    def _request_from_sipp(self, message: Message, source: Address) -> None:
        data, edits = message.data, Edits()
        self._max_forwards(message, edits, reply_udp=source)
        key = None
        outbound = message.header(OUTBOUND)
        if outbound is not None:
            target = uri_hostport(message.value(outbound))
            if target is None or target[2] not in (b"", b"tcp", b"tls"):
                raise Malformed("bad X-Outbound-Proxy")
            key = (target[0].decode().strip("[]"), target[1], (target[2] or self.default_key[2].encode()).decode())
            edits.append((outbound[0], outbound[2] + 2, b""))
        remaining = self._loose_route(message, edits)
        creating = message.method in DIALOG_CREATING
        # The To tag matters only to dialog-creating methods and to the dialog map.
        in_dialog = message.has_to_tag() if creating or self.dialogs.entries else True
        if key is None and remaining is not None:
            link = self.by_hostport.get((remaining[0], remaining[1]))
            key = link.key if link is not None else None
        if key is None and in_dialog and self.dialogs.entries:
            key = self.dialogs.get(message.call_id())
        if key is None:
            key = self.default_key
        link = self.links.get(key) or self.link_for(key)
        if link is None or link.closed:
            self.counters["requests_refused"] += 1
            if message.method != b"ACK":
                self.send_udp(make_reply(message, 503, "Converter Connection Closed"), source)
            return
        if key != self.default_key and not in_dialog and creating:
            self.dialogs.put(message.call_id(), key, self.now)
        via_span, via_end = message.top_via()
        protocol, host, port, params = via_parts(data[via_span[1]:via_end])
        branch = via_param(params, b"branch")
        if self.hide:
            if branch:
                self.transactions.put(branch, source, self.now)
        else:
            if host.decode(errors="replace") != source[0] and via_param(params, b"received") is None:
                edits.append((via_end, via_end, b";received=" + source[0].encode()))
            top = link.via + self._branch(branch, data, via_span)
            if creating and not in_dialog:
                top = link.rr_to_stream + top
            edits.append((message.start_end + 2, message.start_end + 2, top + b"\r\n"))
        if not message.has_length:
            edits.append((message.head_end + 2, message.head_end + 2, b"Content-Length: %d\r\n" % message.body_length))
        link.out += edits.apply(data)
        link.messages_out += 1
        self.dirty.add(link)
        self.counters["requests_to_stream"] += 1

    def _branch(self, branch: bytes | None, data: bytes, via_span) -> bytes:
        if branch and branch.startswith(b"z9hG4bK"):
            return branch[7:]
        return hashlib.md5(data[via_span[1]:via_span[2]]).hexdigest().encode()

    def _max_forwards(self, message: Message, edits: Edits, reply_udp: Address | None = None, reply_link: Link | None = None) -> None:
        span = message.header(MAX_FORWARDS)
        if span is None:
            edits.append((message.start_end + 2, message.start_end + 2, b"Max-Forwards: 70\r\n"))
            return
        text = message.value(span).strip()
        if not text.isdigit():
            raise Malformed("bad Max-Forwards")
        hops = int(text)
        if hops == 0:
            self.counters["too_many_hops"] += 1
            if message.method != b"ACK":
                reply = make_reply(message, 483, "Too Many Hops")
                if reply_udp is not None:
                    self.send_udp(reply, reply_udp)
                elif reply_link is not None:
                    self._queue(reply_link, reply)
            raise _Answered()
        edits.append((span[1], span[2], b"%d" % (hops - 1)))

    def _loose_route(self, message: Message, edits: Edits) -> tuple[bytes, int, bytes] | None:
        """Remove our own entries from the top of the route set; return the next hop left."""
        data, start = message.data, 0
        while True:
            span = message.header(ROUTE, start)
            if span is None:
                return None
            at = span[1]
            while at < span[2]:
                end = end_of_element(data, at, span[2])
                target = uri_hostport(data[at:end])
                if target is None:
                    raise Malformed("bad Route")
                if (target[0], target[1]) not in self.own:
                    if at != span[1]:
                        edits.append((span[1], at, b""))
                    return target
                at = end + 1
                while data[at:at + 1] in (b" ", b"\t", b"\r", b"\n"):
                    at += 1
            edits.append((span[0], span[2] + 2, b""))  # every entry of this line was ours
            start = span[2]

    def _response_from_sipp(self, message: Message) -> None:
        data, edits = message.data, Edits()
        via_span, via_end = message.top_via()
        protocol, host, port, params = via_parts(data[via_span[1]:via_end])
        if self.hide:
            link = self.transactions.get(via_param(params, b"branch") or b"")
            if not isinstance(link, Link):
                link = self.by_hostport.get((host, port)) or self.links.get(self.default_key)
        else:
            if (host, port) not in self.own:
                raise Malformed("response not via us")
            remove_element(message, via_span, via_end, edits)
            nxt = via_parts(next_via(message, via_span, via_end))
            link = self.by_hostport.get((nxt[1], nxt[2])) or self.links.get(self.default_key)
        if link is None or link.closed:
            self.counters["responses_dropped_closed"] += 1
            return
        if not message.has_length:
            edits.append((message.head_end + 2, message.head_end + 2, b"Content-Length: %d\r\n" % message.body_length))
        link.out += edits.apply(data)
        link.messages_out += 1
        self.dirty.add(link)
        self.counters["responses_to_stream"] += 1

    # -- from the SuT (stream)

    def from_stream(self, link: Link, data: bytes) -> None:
        link.last_activity = self.now
        before = link.framer.keepalives
        try:
            messages = link.framer.feed(data)
        except FramingError as error:
            dropped = link.framer.discard()
            self.drop("unframeable stream data", dropped)
            log.debug("framing: %s", error)
            messages = []
        keepalives = link.framer.keepalives - before
        if keepalives:
            link.ping_sent_at = None
            pings = keepalives // 2  # a CRLFCRLF ping; a lone CRLF is the pong to ours
            if pings:
                link.pings_answered += pings
                self._queue(link, PONG * pings)
        for raw in messages:
            link.messages_in += 1
            self.counters["stream_in"] += 1
            try:
                message = Message(raw, datagram=False)
                if message.is_request:
                    self._request_from_stream(link, message)
                else:
                    self._response_from_stream(link, message)
            except Malformed as error:
                self.drop(error.kind, raw)
            except UnicodeDecodeError:  # a host or address that is not text: malformed, never fatal
                self.drop("bad encoding", raw)
            except _Answered:
                pass

    def _queue(self, link: Link, data: bytes) -> None:
        link.out += data
        self.dirty.add(link)

    def _request_from_stream(self, link: Link, message: Message) -> None:
        data, edits = message.data, Edits()
        self._max_forwards(message, edits, reply_link=link)
        self._loose_route(message, edits)
        in_dialog = message.has_to_tag()
        destination = None
        if in_dialog:
            target = uri_hostport(data[:message.start_end].split(b" ")[1])
            if target is not None and is_ip(target[0]):
                destination = (target[0].decode().strip("[]"), target[1])
        if destination is None:
            destination = self.sipp_address
        if destination is None:
            target = uri_hostport(data[:message.start_end].split(b" ")[1])
            if target is None or not is_ip(target[0]):
                raise Malformed("no destination for a request from the SuT")
            destination = (target[0].decode().strip("[]"), target[1])
        via_span, via_end = message.top_via()
        protocol, host, port, params = via_parts(data[via_span[1]:via_end])
        branch = via_param(params, b"branch")
        if self.hide:
            if branch:
                self.transactions.put(branch, link, self.now)
        else:
            top = link.via_udp + self._branch(branch, data, via_span)
            if message.method in DIALOG_CREATING and not in_dialog:
                top = link.rr_to_udp + top
            edits.append((message.start_end + 2, message.start_end + 2, top + b"\r\n"))
        out = edits.apply(data)
        if not self._fits_udp(out, message, link):
            return
        self.send_udp(out, destination)
        self.counters["requests_to_udp"] += 1

    def _response_from_stream(self, link: Link, message: Message) -> None:
        data, edits = message.data, Edits()
        via_span, via_end = message.top_via()
        if not self.hide and data.startswith(link.via_value, via_span[1]):
            host, port = link.local_host, link.local[1]  # our own Via, as we wrote it
        else:
            _, host, port, params = via_parts(data[via_span[1]:via_end])
        destination = None
        if self.hide:
            destination = self.transactions.get(via_param(params, b"branch") or b"")
            if not isinstance(destination, tuple):
                destination = (host.decode().strip("[]"), port)  # sipp's own Via (not the SuT's rport)
        else:
            if (host, port) not in self.own:
                raise Malformed("response not via us")
            remove_element(message, via_span, via_end, edits)
            _, host, port, params = via_parts(next_via(message, via_span, via_end))
            received = via_param(params, b"received")
            rport = via_param(params, b"rport")
            if received:
                host = received
            if rport and rport.isdigit():
                port = int(rport)
            destination = (host.decode().strip("[]"), port)
        out = edits.apply(data)
        if not self._fits_udp(out, message, None):
            return
        self.send_udp(out, destination)
        self.counters["responses_to_udp"] += 1

    def _fits_udp(self, out: bytes, message: Message, link: Link | None) -> bool:
        size = len(out)
        if size <= UDP_SOFT_LIMIT:
            return True
        if size <= UDP_MAX:
            # RFC 3261 §18.1.1 would switch a request to TCP; sipp listens on UDP only.
            self.counters["udp_oversize_sent"] += 1
            self.warn_once("oversize", f"sent a {size}-byte message to sipp over UDP (over the {UDP_SOFT_LIMIT}-byte "
                           "limit of RFC 3261 §18.1.1; sipp listens on UDP only); counted as udp_oversize_sent")
            return True
        self.counters["udp_too_large"] += 1
        if message.is_request and link is not None and message.method != b"ACK":
            self._queue(link, make_reply(message, 513, "Message Too Large"))
        return False

    def expire(self) -> None:
        self.transactions.expire(self.now)
        self.dialogs.expire(self.now)

    def stats(self) -> dict:
        return {
            "listen": self.listen_hp.decode(), "sipp_address": "%s:%d" % self.sipp_address if self.sipp_address else None,
            "hide_topology": self.hide, "counters": dict(self.counters), "malformed": dict(self.malformed),
            "transactions": len(self.transactions), "dialogs": len(self.dialogs),
            "evicted": self.transactions.evicted + self.dialogs.evicted,
            "links": [link.as_dict() for link in self.links.values()],
        }


# --------------------------------------------------------------------------
# the process: sockets, event loop, control socket, signals
# --------------------------------------------------------------------------


class ConverterServer:
    def __init__(self, listen: Address, sut: Address, transport: str, sipp_address: Address | None, *,
                 hide_topology: bool = False, tls: TlsOptions | None = None, connect_timeout: float = 5.0,
                 keepalive: float | None = None, control: Path | None = None, stats_file: Path | None = None) -> None:
        self.tls = tls
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.stats_file = stats_file
        self.control_path = control
        self.epoll = select.epoll()
        self.links_by_fd: dict[int, Link] = {}
        self.running = True
        family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
        self.udp = socket.socket(family, socket.SOCK_DGRAM)
        for option, force in ((socket.SO_RCVBUF, 33), (socket.SO_SNDBUF, 32)):  # SO_RCVBUFFORCE / SO_SNDBUFFORCE
            try:
                self.udp.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
            except OSError:
                self.udp.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        try:
            self.udp.bind(listen)
        except OSError as error:
            self.udp.close()
            raise FdkeeperError(f"fdkeeper: cannot listen on udp:{listen[0]}:{listen[1]}: {error.strerror}; pick another --listen") from None
        self.udp.setblocking(False)
        listen = self.udp.getsockname()[:2]
        self.converter = Converter(listen, (sut[0], sut[1], transport), sipp_address, hide_topology,
                                   self._send_udp, self._connect)
        self.converter.link_for(self.converter.default_key)
        default = self.converter.links.get(self.converter.default_key)
        if default is None:
            raise FdkeeperError(self.converter_error or f"fdkeeper: cannot connect to the SuT at {sut[0]}:{sut[1]}/{transport}")
        self.epoll.register(self.udp.fileno(), select.EPOLLIN)
        self.control = None
        if control is not None:
            control.unlink(missing_ok=True)
            self.control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.control.bind(os.fspath(control))
            self.control.listen(8)
            self.control.setblocking(False)
            self.epoll.register(self.control.fileno(), select.EPOLLIN)

    converter_error = ""

    # -- I/O for the converter

    def _send_udp(self, data: bytes, address: Address) -> None:
        try:
            self.udp.sendto(data, address)
        except OSError as error:
            self.converter.counters["udp_send_errors"] += 1
            self.converter.warn_once(f"udp send {error.errno}", f"UDP send to {address[0]}:{address[1]} failed: {error.strerror}")

    def _connect(self, key: tuple[str, int, str]) -> Link:
        try:
            link = open_link(key, self.converter.listen_hp if hasattr(self, "converter") else b"", self.tls, self.connect_timeout)
        except FdkeeperError as error:
            self.converter_error = str(error)
            raise
        self.links_by_fd[link.fd] = link
        self.epoll.register(link.fd, select.EPOLLIN | select.EPOLLRDHUP)
        log.info("connected to %s", link.label())
        if link.early:
            self.converter.from_stream(link, link.early)
        return link

    # -- the loop

    def serve_forever(self) -> None:
        converter = self.converter
        udp_fd = self.udp.fileno()
        control_fd = self.control.fileno() if self.control else -1
        recvfrom = self.udp.recvfrom
        from_sipp = converter.from_sipp
        next_tick = time.monotonic() + 1.0
        while self.running:
            try:
                events = self.epoll.poll(max(0.0, next_tick - time.monotonic()))
            except InterruptedError:
                continue
            converter.now = now = time.monotonic()
            for fd, mask in events:
                if fd == udp_fd:
                    for _ in range(UDP_BATCH):
                        try:
                            data, source = recvfrom(65535)
                        except BlockingIOError:
                            break
                        except OSError:
                            continue  # an ICMP error queued on the socket
                        from_sipp(data, source)
                elif fd == control_fd:
                    self._control()
                else:
                    link = self.links_by_fd.get(fd)
                    if link is not None:
                        if mask & select.EPOLLOUT:
                            self._flush(link)
                        if mask & (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR):
                            self._read(link)
            if converter.dirty:
                dirty = list(converter.dirty)
                converter.dirty.clear()
                for link in dirty:
                    self._flush(link)
            if now >= next_tick:
                next_tick = now + 1.0
                self._tick(now)
        self.close()

    def _read(self, link: Link) -> None:
        converter = self.converter
        while not link.closed:
            try:
                data = link.sock.recv(READ_CHUNK)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except (ssl.SSLError, OSError) as error:
                self._closed(link, f"the connection failed: {error}")
                return
            if not data:
                self._closed(link, "the SuT closed it" + (": TLS close_notify or FIN" if link.is_tls else ": FIN"))
                return
            converter.from_stream(link, data)
            if not link.is_tls and len(data) < READ_CHUNK:
                return

    def _flush(self, link: Link) -> None:
        while link.out and not link.closed:
            try:
                sent = link.sock.send(link.out if not link.is_tls else link.out[:READ_CHUNK])
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                break
            except (ssl.SSLError, OSError) as error:
                self._closed(link, f"the connection failed: {error}")
                return
            del link.out[:sent]
        if not link.closed and link.want_out != bool(link.out):
            link.want_out = bool(link.out)
            self.epoll.modify(link.fd, select.EPOLLIN | select.EPOLLRDHUP | (select.EPOLLOUT if link.out else 0))

    def _closed(self, link: Link, reason: str) -> None:
        link.closed_reason = reason
        link.closed_at = time.time()
        self.converter.counters["connections_closed"] += 1
        log.warning("connection %s closed: %s; requests to it are refused (503) until a reconnect", link.label(), reason)
        self.links_by_fd.pop(link.fd, None)
        try:
            self.epoll.unregister(link.fd)
        except (OSError, ValueError):
            pass
        try:
            link.sock.close()
        except OSError:
            pass
        link.out.clear()

    def reconnect(self) -> list[str]:
        """Open fresh connections in place of the closed ones (the control request RECONNECT)."""
        done = []
        for key, link in list(self.converter.links.items()):
            if link.closed:
                try:
                    self.converter.add_link(self._connect(key))
                    done.append(f"{key[0]}:{key[1]}/{key[2]}")
                except FdkeeperError as error:
                    raise FdkeeperError(f"{error}") from None
        return done

    def _tick(self, now: float) -> None:
        self.converter.expire()
        if self.keepalive:
            for link in self.converter.links.values():
                if not link.closed and link.ping_sent_at is None and now - link.last_activity >= self.keepalive and not link.out:
                    link.out += PING
                    link.ping_sent_at = now
                    self._flush(link)
        if self.stats_file is not None:
            self.write_stats()

    # -- status

    def stats(self) -> dict:
        return {"pid": os.getpid(), **self.converter.stats()}

    def stats_line(self) -> str:
        s = self.converter.stats()
        counters = " ".join(f"{k}={v}" for k, v in sorted(s["counters"].items()))
        malformed = sum(s["malformed"].values())
        links = ", ".join(f"{l['local']}->{l['remote']}/{l['transport']} {l['state']}" for l in s["links"])
        return f"fdkeeper convert: {counters} malformed={malformed} transactions={s['transactions']} dialogs={s['dialogs']} links: {links}"

    def write_stats(self) -> None:
        if self.stats_file is None:
            return
        temporary = self.stats_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.stats()))
        temporary.replace(self.stats_file)

    def _control(self) -> None:
        try:
            connection, _ = self.control.accept()
        except BlockingIOError:
            return
        with connection:
            connection.settimeout(2.0)
            try:
                request = connection.recv(4096).decode(errors="replace").strip()
                reply = self._answer(request)
                connection.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                return

    def _answer(self, request: str) -> dict:
        word, _, argument = request.partition(" ")
        try:
            if word == "STATUS":
                return {"ok": True, **self.stats()}
            if word == "SIPP":
                host, port = split_hostport(argument.encode())
                if not host or not is_ip(host):
                    return {"ok": False, "error": f"fdkeeper: bad sipp address {argument!r}; give IP:PORT"}
                self.converter.sipp_address = (host.decode().strip("[]"), port)
                return {"ok": True}
            if word == "RECONNECT":
                return {"ok": True, "reconnected": self.reconnect()}
            if word == "STOP":
                self.running = False
                return {"ok": True}
        except FdkeeperError as error:
            return {"ok": False, "error": str(error)}
        return {"ok": False, "error": f"fdkeeper: unknown control request {word!r}"}

    def install_signal_handlers(self) -> None:
        def stop(_signum, _frame):
            self.running = False

        def report(_signum, _frame):
            print(self.stats_line(), file=sys.stderr, flush=True)
            self.write_stats()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGUSR1, report)

    def close(self) -> None:
        self.write_stats()
        for link in self.converter.links.values():
            if not link.closed:
                try:
                    link.sock.close()
                except OSError:
                    pass
        self.udp.close()
        if self.control is not None:
            self.control.close()
            if self.control_path is not None:
                self.control_path.unlink(missing_ok=True)
        self.epoll.close()


# --------------------------------------------------------------------------
# talking to a running converter
# --------------------------------------------------------------------------


def control_request(path: Path, request: str, timeout: float = 5.0) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        sock.sendall(request.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


# --------------------------------------------------------------------------
# running one (`fdkeeper convert`, cli.py, parses the options)
# --------------------------------------------------------------------------


def parse_hostport(text: str) -> Address:
    """HOST:PORT or [IPv6]:PORT, for --listen, --sut and --sipp-address."""
    host, port = split_hostport(text.encode(), 0)
    if not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host.decode().strip("[]"), port


def serve(
    listen: Address,
    sut: Address,
    transport: str,
    sipp_address: Address | None,
    *,
    hide_topology: bool = False,
    tls: TlsOptions | None = None,
    connect_timeout: float = 5.0,
    keepalive: float | None = None,
    control: Path | None = None,
    stats_file: Path | None = None,
    log_level: str = "info",
) -> int:
    """Run a converter in the foreground until STOP or SIGTERM; the exit status."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s fdkeeper-convert[%(process)d] %(message)s")
    try:
        server = ConverterServer(listen, sut, transport, sipp_address, hide_topology=hide_topology,
                                 tls=tls or TlsOptions(), connect_timeout=connect_timeout, keepalive=keepalive,
                                 control=control, stats_file=stats_file)
    except FdkeeperError as error:
        print(str(error), file=sys.stderr, flush=True)
        return error.exit_status
    server.install_signal_handlers()
    default = server.converter.links[server.converter.default_key]
    log.info("listening on udp:%s, SuT over %s; sipp address %s%s", server.converter.listen_hp.decode(), default.label(),
             sipp_address and "%s:%d" % sipp_address, ", topology hidden" if hide_topology else "")
    server.write_stats()
    server.serve_forever()
    return 0
