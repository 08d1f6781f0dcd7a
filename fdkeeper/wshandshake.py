"""The WebSocket opening handshake as a SIP client makes it (RFC 6455 §4.1, RFC 7118 §4): the HTTP
Upgrade request with ``Sec-WebSocket-Protocol: sip``, the check of the server's answer, and the
options a run gives it (path, Origin, extra headers) with their validators.

Pure logic; fdkeeper/websocket.py re-exports every name here, and callers import them from there.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from dataclasses import dataclass

from fdkeeper.errors import FdkeeperError
from fdkeeper.textsafe import escape_controls

MAX_HANDSHAKE_ANSWER = 16 * 1024  # bytes of the server's answer before its blank line
MAX_FIELD = 1024  # a path or an Origin
MAX_HEADERS = 16  # extra request headers
MAX_HEADER_TEXT = 4096
MAX_SERVER_HEADERS = 8  # kept for `fdkeeper status`
MAX_SHOWN = 200  # characters of a server's header value or status line kept or shown
_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_ANSWER_END = re.compile(rb"\r?\n\r?\n")
# Request headers the handshake writes itself (Origin has its own option).
_OWN_REQUEST_HEADERS = {
    "host": "",
    "upgrade": "",
    "connection": "",
    "sec-websocket-key": "",
    "sec-websocket-version": "",
    "sec-websocket-protocol": "",
    "sec-websocket-extensions": "",
    "origin": "; use --ws-origin",
}
# Answer headers the handshake checks; the others are the server's, shown by `fdkeeper status`.
_OWN_ANSWER_HEADERS = {
    "upgrade",
    "connection",
    "sec-websocket-accept",
    "sec-websocket-protocol",
    "sec-websocket-extensions",
}
_NOT_SIP = "(it does not speak SIP over WebSocket); check the SuT's WebSocket port"


def check_path(value: str) -> str:
    """A request path: starts with "/", printable ASCII without spaces, at most 1024 characters."""
    if not value.startswith("/"):
        raise ValueError("a WebSocket path starts with /")
    return _check_field(value, "a WebSocket path", "!", "printable ASCII without spaces")


def check_origin(value: str) -> str:
    """An Origin: printable ASCII (no CR or LF), at most 1024 characters."""
    if not value:
        raise ValueError("an empty Origin")
    return _check_field(value, "an Origin", " ", "printable ASCII")


def _check_field(value: str, what: str, lowest: str, allowed: str) -> str:
    if len(value) > MAX_FIELD:
        raise ValueError(f"{what} of {len(value)} characters (at most {MAX_FIELD})")
    if not all(lowest <= char <= "~" for char in value):
        raise ValueError(f"{what} is {allowed}")
    return value


def parse_header_lines(text: str) -> tuple[tuple[str, str], ...]:
    """Extra handshake headers, one "Name: value" a line; those the handshake owns are refused."""
    if len(text.encode("utf-8")) > MAX_HEADER_TEXT:
        raise ValueError(f"WebSocket headers of more than {MAX_HEADER_TEXT} bytes")
    headers = tuple(_parse_header_line(line) for line in text.split("\n") if line.strip())
    if len(headers) > MAX_HEADERS:
        raise ValueError(f"{len(headers)} WebSocket headers (at most {MAX_HEADERS})")
    return headers


def _parse_header_line(line: str) -> tuple[str, str]:
    name, colon, value = line.partition(":")
    name, value = name.strip(), value.strip()
    if not colon or not _TOKEN.match(name):
        raise ValueError(f"a WebSocket header is 'Name: value', not '{escape_controls(line[:MAX_SHOWN])}'")
    if any((char < " " and char != "\t") or char == "\x7f" for char in value):
        raise ValueError(f"the WebSocket header {name}'s value holds a control character")
    if name.lower() in _OWN_REQUEST_HEADERS:
        raise ValueError(f"the handshake writes {name} itself{_OWN_REQUEST_HEADERS[name.lower()]}")
    return name, value


@dataclass(frozen=True)
class WsOptions:
    """What a run asks of the handshake: the request path, an Origin, extra headers."""

    path: str = "/"
    origin: str | None = None
    headers: tuple[tuple[str, str], ...] = ()

    def as_fields(self) -> dict[str, object]:
        """The control protocol's fields (None where the default holds)."""
        return {
            "ws_path": None if self.path == "/" else self.path,
            "ws_origin": self.origin,
            "ws_headers": "\n".join(f"{name}: {value}" for name, value in self.headers) or None,
        }

    @classmethod
    def from_fields(cls, path: str | None, origin: str | None, headers: str | None) -> WsOptions:
        return cls(
            path=check_path(path) if path else "/",
            origin=check_origin(origin) if origin else None,
            headers=parse_header_lines(headers) if headers else (),
        )


def new_key() -> str:
    """A fresh Sec-WebSocket-Key: 16 random bytes in base64."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


def accept_for(key: str) -> str:
    """The Sec-WebSocket-Accept a server owes ``key``."""
    return base64.b64encode(hashlib.sha1((key + _GUID).encode("ascii")).digest()).decode("ascii")


def handshake_request(host: str, options: WsOptions, key: str) -> bytes:
    """The HTTP Upgrade request for SIP over WebSocket."""
    lines = [
        f"GET {options.path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Protocol: sip",
    ]
    if options.origin:
        lines.append(f"Origin: {options.origin}")
    lines.extend(f"{name}: {value}" for name, value in options.headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


@dataclass(frozen=True)
class WsHandshake:
    """What the server answered, for ``fdkeeper status`` (peer text already escaped and cut)."""

    path: str
    protocol: str
    status: str
    server_headers: tuple[tuple[str, str], ...]


class WsHandshakeError(FdkeeperError):
    """The server refused the upgrade or answered it wrongly (one line, code "refused")."""

    def __init__(self, where: str, defect: str) -> None:
        super().__init__(f"the WebSocket server at {where} {defect}", "refused")


def read_handshake_answer(data: bytes, key: str, options: WsOptions, where: str) -> tuple[WsHandshake, bytes] | None:
    """The checked handshake and the bytes after the answer's blank line (early frames), or None
    while the blank line has not come. Raises WsHandshakeError for a wrong or oversized answer."""
    found = _ANSWER_END.search(data, 0, MAX_HANDSHAKE_ANSWER + 4)
    if found is None or found.start() > MAX_HANDSHAKE_ANSWER:
        if len(data) > MAX_HANDSHAKE_ANSWER:
            raise WsHandshakeError(where, f"sent more than {MAX_HANDSHAKE_ANSWER} bytes without ending its answer")
        return None
    status, in_order = _parse_answer(data[: found.start()].decode("latin-1"), where)
    headers = _by_name(in_order)
    _check_answer(status, headers, key, where)
    shown = tuple((_shown(name), _shown(value)) for name, value in in_order if name.lower() not in _OWN_ANSWER_HEADERS)
    handshake = WsHandshake(
        path=options.path,
        protocol=_shown(headers["sec-websocket-protocol"].strip()),
        status=_shown(status),
        server_headers=shown[:MAX_SERVER_HEADERS],
    )
    return handshake, data[found.end() :]


def _shown(text: str) -> str:
    return escape_controls(text[:MAX_SHOWN])


def _parse_answer(head: str, where: str) -> tuple[str, list[tuple[str, str]]]:
    """The status line and the headers in order (folded lines unfolded); refuses what is not HTTP or not 101."""
    lines = head.replace("\r\n", "\n").split("\n")
    status = lines[0].strip()
    parts = status.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not (len(parts[1]) == 3 and parts[1].isdigit()):
        raise WsHandshakeError(where, f"answered with something other than HTTP: '{_shown(status)}'; check the port")
    if parts[1] != "101":
        raise WsHandshakeError(
            where,
            f"refused the upgrade: {_shown(status)}; check that it is a WebSocket port, --ws-path and --ws-origin",
        )
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and headers:  # obsolete line folding (RFC 7230 §3.2.4): one value
            name, value = headers.pop()
            headers.append((name, f"{value} {line.strip()}"))
            continue
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.match(name):
            raise WsHandshakeError(where, f"sent a malformed header line in its answer: '{_shown(line)}'")
        headers.append((name, value.strip()))
    return status, headers


def _by_name(headers: list[tuple[str, str]]) -> dict[str, str]:
    """Values by lower-cased name; a repeated header's values joined with ", " (RFC 7230 §3.2.2)."""
    values: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        values[key] = f"{values[key]}, {value}" if key in values else value
    return values


def _check_answer(status: str, headers: dict[str, str], key: str, where: str) -> None:
    if "websocket" not in _tokens(headers.get("upgrade", "")):
        raise WsHandshakeError(where, f"answered {_shown(status)} without Upgrade: websocket")
    if "upgrade" not in _tokens(headers.get("connection", "")):
        raise WsHandshakeError(where, f"answered {_shown(status)} without Connection: Upgrade")
    if headers.get("sec-websocket-accept", "").strip() != accept_for(key):
        raise WsHandshakeError(where, "sent a wrong Sec-WebSocket-Accept")
    protocol = headers.get("sec-websocket-protocol")
    if protocol is None:
        raise WsHandshakeError(where, f"answered without Sec-WebSocket-Protocol: sip {_NOT_SIP}")
    if protocol.strip().lower() != "sip":
        raise WsHandshakeError(where, f"answered with Sec-WebSocket-Protocol: {_shown(protocol)}, not sip {_NOT_SIP}")
    if "sec-websocket-extensions" in headers:
        extensions = _shown(headers["sec-websocket-extensions"])
        raise WsHandshakeError(where, f"answered with Sec-WebSocket-Extensions: {extensions}, which it was not offered")


def _tokens(value: str) -> set[str]:
    return {token.strip().lower() for token in value.split(",")}
