"""Where SIP headers point: the host, port and transport of a URI, and a Via's sent-by and parameters.

Hosts come back as lowered bytes (they are compared with other header bytes on the per-message
path); HOST:PORT itself is parsed by fdkeeper.address like every other address in fdkeeper.
URIs are memoized: Route entries and Request-URIs repeat call after call.
"""

from __future__ import annotations

import re

from fdkeeper.address import Address, is_ip, split_host_port
from fdkeeper.sip.message import Malformed

SIP_PORT = 5060
SIPS_PORT = 5061
HostPort = tuple[bytes, int]
UriTarget = tuple[bytes, int, bytes]  # (host lowered, port, transport lowered)

_URI_CACHE: dict[bytes, UriTarget | None] = {}
_URI_CACHE_LIMIT = 4096  # entries; emptied when full
_URI_CACHE_TEXT = 256  # longer texts are parsed every time (bounds the cache's memory)


def uri_hostport(text: bytes) -> UriTarget | None:
    """(host lowered, port, transport lowered) of a SIP URI or name-addr; None if not one.
    Memoized: Route entries (ours and the SuT's Record-Route) and Request-URIs repeat call
    after call, and parsing one is several microseconds of Python."""
    try:
        return _URI_CACHE[text]
    except KeyError:  # free in the usual case, a hit: no second lookup, no sentinel
        pass
    result = _parse_uri(text)
    if len(text) <= _URI_CACHE_TEXT:
        if len(_URI_CACHE) >= _URI_CACHE_LIMIT:
            _URI_CACHE.clear()
        _URI_CACHE[text] = result
    return result


def _parse_uri(text: bytes) -> UriTarget | None:
    text = text.strip()
    if b"<" in text:
        text = text[text.index(b"<") + 1 :]
        text = text.split(b">", 1)[0]
    lower = text.lower()
    if lower.startswith(b"sip:"):
        rest, default_port = lower[4:], SIP_PORT
    elif lower.startswith(b"sips:"):
        rest, default_port = lower[5:], SIPS_PORT
    else:
        rest, default_port = lower, SIP_PORT  # a bare host:port (X-Outbound-Proxy allows it)
    hostpart, _, params = rest.partition(b";")
    hostpart = hostpart.split(b"?", 1)[0]
    if b"@" in hostpart:
        hostpart = hostpart.rsplit(b"@", 1)[1]
    try:
        # latin-1 maps every byte to one character and back: the host's bytes survive as they are.
        host, port = split_host_port(hostpart.decode("latin-1"), default_port)
    except ValueError:
        return None
    transport = b""
    for param in params.split(b";"):
        key, _, value = param.partition(b"=")
        if key.strip() == b"transport":
            transport = value.strip()
    if default_port == SIPS_PORT and not transport:
        transport = b"tls"
    return host.encode("latin-1"), port, transport


def uri_ip_address(text: bytes) -> Address | None:
    """The address of a SIP URI whose host is an IP address (where a request can go as it
    is); None for a name or no URI."""
    target = uri_hostport(text)
    if target is None:
        return None
    host = target[0].decode("latin-1")
    return (host, target[1]) if is_ip(host) else None


# --------------------------------------------------------------------------
# Via
# --------------------------------------------------------------------------


_VIA = re.compile(
    rb"SIP[ \t]*/[ \t]*2\.0[ \t]*/[ \t]*[A-Za-z]+[ \t]+(\[[0-9A-Fa-f:.]+\]|[^\[\]:;, \t\r\n]+)"
    rb"(?:[ \t]*:[ \t]*([0-9]{1,5}))?[ \t]*(.*)",
    re.IGNORECASE | re.DOTALL,
)
_PARAM_CACHE: dict[bytes, re.Pattern[bytes]] = {}


def via_parts(value: bytes) -> tuple[bytes, bytes, int, bytes]:
    """(protocol, sent-by host lowered, port, params) of one Via element; raises Malformed.
    A regex of its own, not split_host_port: this runs for every message, on bytes."""
    match = _VIA.match(value)
    if match is None or (match.group(3) and not match.group(3).startswith(b";")):
        raise Malformed("bad Via")
    port = match.group(2)
    if port is None:
        port = SIPS_PORT if value[:16].upper().rstrip().endswith(b"TLS") or b"/TLS " in value[:16].upper() else SIP_PORT
    else:
        port = int(port)
        if not 0 < port < 65536:
            raise Malformed("bad Via")
    return b"", match.group(1).lower(), port, match.group(3)


def via_param(params: bytes, name: bytes) -> bytes | None:
    """A Via parameter's value (b"" for a bare one like rport); None if absent."""
    pattern = _PARAM_CACHE.get(name)
    if pattern is None:
        pattern = _PARAM_CACHE[name] = re.compile(
            rb";[ \t]*" + name + rb"[ \t]*(?:=[ \t]*([^;, \t\r\n]*))?(?=[;, \t\r\n]|$)", re.IGNORECASE
        )
    match = pattern.search(params)
    if match is None:
        return None
    return match.group(1) or b""


def via_reply_address(element: bytes) -> Address:
    """Where a response goes by this Via element (RFC 3261 §18.2.2): received and rport
    when present, else the sent-by. UnicodeDecodeError for a host that is not text."""
    _, host, port, params = via_parts(element)
    received = via_param(params, b"received")
    rport = via_param(params, b"rport")
    if received:
        host = received
    if rport and rport.isdigit():
        port = int(rport)
    return host.decode().strip("[]"), port
