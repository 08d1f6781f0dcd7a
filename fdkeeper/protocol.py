"""The keeper's control protocol: one ASCII message per SOCK_SEQPACKET packet.

See docs/protocol.md for the full description. This module is pure logic (parsing,
formatting, validation) plus the socket calls that move packets and descriptors;
both the keeper and its Python clients use it, the C shim speaks the same format.
"""

from __future__ import annotations

import array
import os
import socket
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

from fdkeeper.address import Address, format_address, parse_address  # noqa: F401 - callers import them from here too
from fdkeeper.errors import FdkeeperError

PROTOCOL_VERSION = 1
MAX_MESSAGE = 4096
# The kernel accepts up to 253 descriptors in one SCM_RIGHTS message; stay below it.
MAX_FDS_PER_PACKET = 250
# STATUS replies are cut into JSON packets of this size.
JSON_CHUNK = 3000

ERROR_CODES = frozenset(
    {"busy", "closed", "refused", "timeout", "none", "denied", "toolarge", "badrequest", "limit", "internal"}
)


class ProtocolError(Exception):
    """A request the keeper refuses; ``code`` is one of ERROR_CODES."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


# What each verb accepts: key -> validator returning the parsed value.
def _role(value: str) -> str:
    if value not in ("client", "server"):
        raise ValueError("role must be client or server")
    return value


TRANSPORTS = ("tcp", "tls")
TLS_VERSIONS = ("1.2", "1.3")


def _transport(value: str) -> str:
    if value not in TRANSPORTS:
        raise ValueError("transport must be tcp or tls")
    return value


def _text(value: str) -> str:
    if not value:
        raise ValueError("empty value")
    return value


def _count(value: str) -> int:
    if not value.isdigit() or int(value) > 10_000_000:
        raise ValueError("must be a whole number")
    return int(value)


def _tls_version(value: str) -> str:
    if value not in TLS_VERSIONS:
        raise ValueError("TLS version must be 1.2 or 1.3")
    return value


def _optional_address(value: str) -> Address | None:
    return None if value == "-" else parse_address(value)


def _flag(value: str) -> bool:
    if value not in ("0", "1"):
        raise ValueError("flag must be 0 or 1")
    return value == "1"


def _seconds(value: str) -> float:
    seconds = float(value)
    if not 0 <= seconds <= 86400:
        raise ValueError("seconds must be between 0 and 86400")
    return seconds


# TLS options travel with the requests that may open a connection.
TLS_KEYS = {
    "tls_ca": _text,
    "tls_insecure": _flag,
    "tls_cert": _text,
    "tls_key": _text,
    "tls_sni": _text,
    "tls_min": _tls_version,
    "tls_max": _tls_version,
    "tls_crl": _text,
    "tls_keylog": _text,  # absolute path of a TLS key log (fdkeeper/keylog.py)
}


def _lease_mode(value: str) -> str:
    if value not in ("preload", "ptrace"):
        raise ValueError("mode must be preload or ptrace")
    return value


def _transfer(value: str) -> str:
    if value not in ("scm", "pidfd"):
        raise ValueError("transfer must be scm or pidfd")
    return value


_LEASE_KEYS = {
    "role": _role,
    "transport": _transport,
    "remote": _optional_address,
    "local": _optional_address,
    "reconnect": _flag,
    "aor": _text,
    "for_pid": _count,  # ptrace mode: the lease is the traced program's, asked for by its tracer
    "mode": _lease_mode,  # how the descriptor reaches the program, for status
    "transfer": _transfer,
    **TLS_KEYS,
}
VERBS: dict[str, dict] = {
    "PING": {},
    "STATUS": {},
    "STOP": {},
    "HANDOVER": {},  # keeper --replace: the successor asks for every kept connection
    "LEASE": _LEASE_KEYS,
    "PREPARE": {**_LEASE_KEYS, "wait": _seconds, "per_call": _flag, "users": _count},
}
REQUIRED = {"LEASE": ("role", "transport"), "PREPARE": ("role", "transport")}


@dataclass
class Request:
    verb: str
    fields: dict = field(default_factory=dict)

    def get(self, key: str, default=None):
        return self.fields.get(key, default)


def parse_request(data: bytes) -> Request:
    """Parse and validate one request packet; raise ProtocolError on anything off."""
    if len(data) > MAX_MESSAGE:
        raise ProtocolError("toolarge", f"fdkeeper: control message of {len(data)} bytes is over {MAX_MESSAGE}")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("badrequest", "fdkeeper: control message is not ASCII") from None
    if "\0" in text or "\n" in text:
        raise ProtocolError("badrequest", "fdkeeper: control message has a NUL or newline")
    words = text.split(" ")
    verb, tokens = words[0], words[1:]
    schema = VERBS.get(verb)
    if schema is None:
        raise ProtocolError("badrequest", f"fdkeeper: unknown control verb {verb[:32]!r}")
    fields = {}
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep or key not in schema or key in fields:
            raise ProtocolError("badrequest", f"fdkeeper: bad token {token[:64]!r} in {verb}")
        try:
            fields[key] = schema[key](unquote(value, errors="strict"))
        except (ValueError, UnicodeDecodeError) as error:
            raise ProtocolError("badrequest", f"fdkeeper: bad {key}= in {verb}: {error}") from None
    missing = [key for key in REQUIRED.get(verb, ()) if key not in fields]
    if missing:
        raise ProtocolError("badrequest", f"fdkeeper: {verb} needs {', '.join(missing)}=")
    return Request(verb, fields)


def format_message(verb: str, **fields: object) -> bytes:
    """Build ``VERB key=value ...``; None values are left out, bools become 0/1."""
    tokens = [verb]
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = int(value)
        elif isinstance(value, tuple):
            value = format_address(value)
        text = quote(str(value), safe="/:[],.-_~@+")  # paths may hold spaces or %
        if not text:
            raise ValueError(f"field {key} has no value")
        tokens.append(f"{key}={text}")
    message = " ".join(tokens).encode("ascii")
    if len(message) > MAX_MESSAGE:
        raise ValueError("control message too large")
    return message


def format_error(code: str, text: str) -> bytes:
    assert code in ERROR_CODES, code
    line = " ".join(text.split())  # one line, whatever the text was
    return f"ERR {code} {line}".encode("ascii", "replace")[:MAX_MESSAGE]


def format_failure(error: FdkeeperError, suffix: str = "") -> bytes:
    """The ERR reply for a failure; a code the protocol does not know goes out as internal."""
    code = error.code if error.code in ERROR_CODES else "internal"
    return format_error(code, str(error) + suffix)


@dataclass
class Reply:
    ok: bool
    fields: dict[str, str]
    code: str = ""
    text: str = ""


def parse_reply(data: bytes) -> Reply:
    text = data.decode("ascii", "replace")
    verb, _, rest = text.partition(" ")
    if verb == "ERR":
        code, _, message = rest.partition(" ")
        return Reply(False, {}, code, message)
    fields = {key: unquote(value) for key, _, value in (t.partition("=") for t in rest.split(" ") if t)}
    return Reply(verb == "OK", fields, text=rest)


def send_packet(sock: socket.socket, message: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
    if fds:
        sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.send(message)


def receive_packet(sock: socket.socket, max_fds: int = MAX_FDS_PER_PACKET) -> tuple[bytes, list[int]]:
    """Receive one packet and the descriptors it carries; b"" means the peer closed."""
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE + 1, max_fds)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            _close_quietly(fd)
        raise ProtocolError("toolarge", f"fdkeeper: control message over {MAX_MESSAGE} bytes or descriptors")
    return data, fds


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
