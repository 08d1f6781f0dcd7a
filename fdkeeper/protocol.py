"""The keeper's control protocol: one ASCII message per SOCK_SEQPACKET packet.

See docs/protocol.md for the full description. This module is pure logic (parsing,
formatting, validation) plus the socket calls that move packets and descriptors;
both the keeper and its Python clients use it, the C shim speaks the same format.
"""

from __future__ import annotations

import array
import fnmatch
import functools
import ipaddress
import math
import os
import re
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote, unquote

from fdkeeper.address import Address, format_address, parse_address
from fdkeeper.errors import FdkeeperError
from fdkeeper.websocket import check_origin, check_path, parse_header_lines

PROTOCOL_VERSION = 1
MAX_MESSAGE = 4096
# The kernel accepts up to 253 descriptors in one SCM_RIGHTS message; stay below it.
MAX_FDS_PER_PACKET = 250
# STATUS replies are cut into JSON packets of this size.
JSON_CHUNK = 3000
# One JSON object of a STATUS reply (the keeper's, a connection's, a converter's): its readers
# check each value where they use it, as for anything read back from JSON.
JsonObject = dict[str, object]
# The same as a client reads it back (json.loads): read by key, each field as docs/protocol.md
# describes it (a value's type is the keeper's promise there, not checked again on every read).
ReceivedJson = dict[str, Any]

ERROR_CODES = frozenset(
    {"busy", "closed", "refused", "timeout", "none", "denied", "toolarge", "badrequest", "limit", "internal"}
)


class ProtocolError(Exception):
    """A request the keeper refuses; ``code`` is one of ERROR_CODES."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


# ---------------------------------------------------------------- field validation
#
# Every value of every verb is checked here, when the request is parsed, and nowhere later:
# a handler (and ssl, os.open, the address code under it) only ever sees values of the kind
# it expects. First the checks every value gets (check_value: UTF-8 once percent-decoded, no
# control character, at most the field's length), then the field's own (a choice, a number in
# range, an address that parses, an absolute path, a DNS name). A value that fails gets one
# ``ERR badrequest`` naming the field, what it must be, and the value (shortened, escaped).

MAX_PATH = 1024  # a file path (tls_ca, tls_keylog, ...); the whole message is at most 4096
MAX_TEXT = 1024  # an AoR (a SIP URI; the shim sends up to 3000 bytes percent-encoded) or an AoR pattern
MAX_ADDRESS = 64  # "[v6 with scope]:port"
MAX_HOSTNAME = 253  # a DNS name (RFC 1035)
MAX_PID = 4_194_304  # PID_MAX_LIMIT on 64-bit Linux
MAX_COUNT = 10_000_000
MAX_SECONDS = 86400.0
MAX_HEADERS = 4000  # ws_headers: the extra handshake headers, all in one message of at most 4096


class Field:
    """One key of a verb: ``parse(value)`` returns the value checked and converted, or raises
    ValueError saying what the value must be."""

    def __init__(self, parse: Callable[[str], FieldValue], max_length: int, what: str, *, lines: bool = False) -> None:
        self.parse = parse
        self.max_length = max_length
        self.what = what  # what a value must be, for the error line
        self.lines = lines  # a value of several lines: LF between them is no control character here

    def __call__(self, value: str) -> FieldValue:
        return self.parse(value)


# Unicode's control characters (category Cc) are exactly these: one regex search per value,
# not a category lookup per character (a LEASE per call: the keeper's hot path).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_CONTROL_BUT_LF = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def check_value(value: str, max_length: int, *, lines: bool = False) -> None:
    """The checks every value gets, whatever its field: non-empty, bounded, no control characters
    (a field of ``lines`` takes LF between its lines, never CR: no header of its own)."""
    if not value:
        raise ValueError("is empty")
    if len(value) > max_length:
        raise ValueError(f"is {len(value)} characters, over {max_length}")
    found = (_CONTROL_BUT_LF if lines else _CONTROL).search(value)
    if found is not None:
        control = found.group()
        name = "NUL" if control == "\0" else f"U+{ord(control):04X}"
        raise ValueError(f"has a control character ({name})")


def _choice(*allowed: str) -> Field:
    def parse(value: str) -> str:
        if value not in allowed:
            raise ValueError("is not one of the choices")
        return value

    return Field(parse, max(map(len, allowed)), " or ".join(allowed))


def _whole_number(low: int, high: int) -> Field:
    def parse(value: str) -> int:
        # isdigit() alone takes other scripts' digits ("١٢"); int() would read them
        if not (value.isascii() and value.isdigit()):
            raise ValueError("is not a whole number")
        if not low <= int(value) <= high:
            raise ValueError("is out of range")
        return int(value)

    return Field(parse, len(str(high)), f"a whole number from {low} to {high}")


_DECIMAL = re.compile(r"[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?")


def _parse_seconds(value: str) -> float:
    # float() alone takes "nan", "inf", " 1", "1_0" and other scripts' digits
    if not _DECIMAL.fullmatch(value):
        raise ValueError("is not a decimal number")
    seconds = float(value)
    if not (math.isfinite(seconds) and 0 <= seconds <= MAX_SECONDS):
        raise ValueError("is out of range")
    return seconds


def _parse_address(value: str) -> Address:
    if not value.isascii() or any(c.isspace() for c in value):
        raise ValueError("is not a numeric address")
    return parse_address(value)


def _parse_optional_address(value: str) -> Address | None:
    return None if value == "-" else _parse_address(value)


def _parse_flag(value: str) -> bool:
    if value not in ("0", "1"):
        raise ValueError("is not a flag")
    return value == "1"


def _parse_text(value: str) -> str:
    return value  # check_value already refused empty, overlong and control characters


def _parse_path(value: str) -> str:
    # The keeper's working directory is not the client's: only an absolute path means the
    # file the client meant (fdkeeper sipp and the CLI send absolute ones).
    if not value.startswith("/"):
        raise ValueError("is not an absolute path")
    return value


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def _parse_server_name(value: str) -> str:
    """A TLS server name: a DNS name (ASCII, IDNs in their xn-- form) or an IP address."""
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    labels = value[:-1].split(".") if value.endswith(".") else value.split(".")
    if not value.isascii() or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise ValueError("is not a DNS name")
    return value


def _checked_by(check: Callable[[str], object]) -> Callable[[str], str]:
    """A text field checked by one of websocket.py's validators (the CLI checks with the same)."""

    def parse(value: str) -> str:
        check(value)
        return value

    return parse


ROLE = _choice("client", "server")
# ws and wss: SIP over WebSocket (RFC 7118), over TCP and over TLS; the keeper terminates both.
TRANSPORTS = ("tcp", "tls", "ws", "wss")
OVER_TLS = frozenset({"tls", "wss"})  # the transports that take TLS options (TLS_KEYS)
OVER_WEBSOCKET = frozenset({"ws", "wss"})  # the transports that take WebSocket options (WS_KEYS)
TLS_VERSIONS = ("1.2", "1.3")
TRANSPORT = _choice(*TRANSPORTS)
TLS_VERSION = _choice(*TLS_VERSIONS)
FLAG = Field(_parse_flag, 1, "0 or 1")
ADDRESS = Field(_parse_optional_address, MAX_ADDRESS, "IP:PORT or [IPv6]:PORT (numeric), or - for none")
PATH = Field(_parse_path, MAX_PATH, "an absolute file path")
AOR = Field(_parse_text, MAX_TEXT, "a SIP URI")
SECONDS = Field(_parse_seconds, 24, f"seconds, a decimal number from 0 to {MAX_SECONDS:g}")
SERVER_NAME = Field(_parse_server_name, MAX_HOSTNAME, "a DNS name (letters, digits, '-', '.') or an IP address")

# TLS options travel with the requests that may open a connection.
TLS_KEYS = {
    "tls_ca": PATH,
    "tls_insecure": FLAG,
    "tls_cert": PATH,
    "tls_key": PATH,
    "tls_sni": SERVER_NAME,
    "tls_min": TLS_VERSION,
    "tls_max": TLS_VERSION,
    "tls_crl": PATH,
    "tls_keylog": PATH,  # a TLS key log (fdkeeper/keylog.py)
}
# WebSocket options (fdkeeper/websocket.py WsOptions.as_fields) travel with them, for ws and wss.
WS_KEYS = {
    "ws_path": Field(_checked_by(check_path), MAX_PATH, "a path starting with / (printable ASCII, no space)"),
    "ws_origin": Field(_checked_by(check_origin), MAX_TEXT, "an Origin (printable ASCII)"),
    "ws_headers": Field(
        _checked_by(parse_header_lines),
        MAX_HEADERS,
        "'Name: value' lines joined by LF (at most 16, none the handshake's own)",
        lines=True,
    ),
}

_LEASE_KEYS = {
    "role": ROLE,
    "transport": TRANSPORT,
    "remote": ADDRESS,
    "local": ADDRESS,
    "reconnect": FLAG,
    "aor": AOR,
    "for_pid": _whole_number(1, MAX_PID),  # ptrace mode: the lease is the traced program's, asked for by its tracer
    "mode": _choice("preload", "ptrace"),  # how the descriptor reaches the program, for status
    "transfer": _choice("scm", "pidfd"),
    # The client reads an OK that carries a one-connection answer itself (ids=, peers=, locals=
    # and the descriptor): the shim's per-call LEASE, answered once a call.
    "inline": FLAG,
    # The client may keep a copy of a per-user connection it is granted and hand it again for
    # the same request without asking, while its lease lasts (the shim's lease cache): the OK
    # of such a lease then says keep=1.
    "cache": FLAG,
    **TLS_KEYS,
    **WS_KEYS,
}
# STATUS filters, applied by the keeper (fdkeeper status --state/--aor/--remote/--transport/--count).
STATES = ("idle", "leased", "closed")
_STATUS_KEYS = {
    "state": _choice(*STATES),
    "aor": Field(_parse_text, MAX_TEXT, "a shell-style pattern of AoRs"),
    "remote": Field(_parse_address, MAX_ADDRESS, "IP:PORT or [IPv6]:PORT (numeric)"),
    "transport": TRANSPORT,
    "count": FLAG,  # 1: only how many connections match
}
VERBS: dict[str, dict[str, Field]] = {
    "PING": {},
    "STATUS": _STATUS_KEYS,
    "STOP": {},
    "HANDOVER": {},  # keeper --replace: the successor asks for every kept connection
    "LEASE": _LEASE_KEYS,
    "PREPARE": {
        **_LEASE_KEYS,
        "wait": SECONDS,
        "per_call": FLAG,
        "users": _whole_number(0, MAX_COUNT),
        "open_at_lease": FLAG,
    },  # the identity is known only once sipp binds: open nothing yet
}
REQUIRED = {"LEASE": ("role", "transport"), "PREPARE": ("role", "transport")}


def parse_field(verb: str, key: str, raw: str) -> FieldValue:
    """One ``key=raw`` of ``verb``, percent-decoded and checked; ProtocolError naming the field."""
    if len(raw) <= MAX_CACHED_VALUE:
        return _parse_short_field(sys.intern(verb), sys.intern(key), raw)  # the cache holds one copy of each
    return _parse_field(verb, key, raw)


# A per-call run's LEASEs repeat the same role=, transport=, remote=, local= and, call after
# call, the same users' aor=: a short value is parsed once (the parsed values are immutable; a
# refused one, which raises, is not kept). Bounded: at most 4096 values of at most 256 characters.
MAX_CACHED_VALUE = 256


@functools.lru_cache(maxsize=4096)
def _parse_short_field(verb: str, key: str, raw: str) -> FieldValue:
    return _parse_field(verb, key, raw)


def _parse_field(verb: str, key: str, raw: str) -> FieldValue:
    spec = VERBS[verb][key]
    value = raw
    if "%" in raw:
        try:
            value = unquote(raw, errors="strict")
        except UnicodeDecodeError:
            raise _bad_field(verb, key, spec, raw, "is not UTF-8 once percent-decoded") from None
    try:
        check_value(value, spec.max_length, lines=spec.lines)
        return spec(value)
    except ValueError as error:
        raise _bad_field(verb, key, spec, raw, str(error)) from None


def _bad_field(verb: str, key: str, spec: Field, raw: str, problem: str) -> ProtocolError:
    shown = quote(raw[:64], safe="%/:[],.-_~@+*?") + ("..." if len(raw) > 64 else "")  # as sent, controls escaped
    return ProtocolError("badrequest", f"fdkeeper: {verb} {key}={shown} {problem}; {key}= must be {spec.what}")


# A field's value once parsed by its Field: text, a whole number, seconds, a flag, an address
# (None for "-"). Which one a key holds is fixed by VERBS; the accessors of Request check it.
FieldValue = str | int | float | bool | Address | None
T = TypeVar("T")


@dataclass
class Request:
    """One request as parsed: its verb and its fields, each already checked against VERBS."""

    verb: str
    fields: dict[str, FieldValue] = field(default_factory=dict)

    def get(self, key: str, default: FieldValue = None) -> FieldValue:
        return self.fields.get(key, default)

    def text(self, key: str) -> str | None:
        """A text field (a choice, a path, an AoR, a server name); None if absent."""
        return self._of(key, str, "text")

    def required_text(self, key: str) -> str:
        """A text field REQUIRED has made sure of (LEASE's and PREPARE's transport=, say)."""
        value = self.text(key)
        if value is None:
            raise ProtocolError("badrequest", f"fdkeeper: {self.verb} needs {key}=")
        return value

    def number(self, key: str) -> int | None:
        """A whole-number field; None if absent."""
        return self._of(key, int, "a whole number")

    def seconds(self, key: str) -> float | None:
        """A SECONDS field; None if absent."""
        return self._of(key, float, "seconds")

    def flag(self, key: str) -> bool:
        """A FLAG field; False if absent."""
        return self._of(key, bool, "a flag") or False

    def address(self, key: str) -> Address | None:
        """An address field; None if absent or "-"."""
        return self._of(key, tuple, "an address")

    def _of(self, key: str, kind: type[T], what: str) -> T | None:
        """``key``'s value, None if absent; TypeError if VERBS does not give it that kind."""
        value = self.fields.get(key)
        if value is None or type(value) is kind:  # the usual case, in one test (a dozen a LEASE)
            return value
        # A flag is an int to isinstance, and never a whole number.
        if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
            return value
        raise TypeError(f"request field {key}={value!r} is not {what}; see protocol.VERBS for its kind")


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
    fields: dict[str, FieldValue] = {}
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep or key not in schema or key in fields:
            raise ProtocolError("badrequest", f"fdkeeper: bad token {token[:64]!r} in {verb}")
        fields[key] = parse_field(verb, key, value)
    missing = [key for key in REQUIRED.get(verb, ()) if key not in fields]
    if missing:
        raise ProtocolError("badrequest", f"fdkeeper: {verb} needs {', '.join(missing)}=")
    return Request(verb, fields)


# What quote(safe="/:[],.-_~@+") leaves as it is: one match instead of quoting (ids, counts, addresses).
_UNQUOTED = re.compile(r"[A-Za-z0-9/:\[\],._~@+-]*")


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
        text = str(value)
        if not _UNQUOTED.fullmatch(text):
            text = quote(text, safe="/:[],.-_~@+")  # paths may hold spaces or %
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


_TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)  # a plain int: no enum operators per packet


def receive_packet(sock: socket.socket, max_fds: int = MAX_FDS_PER_PACKET) -> tuple[bytes, list[int]]:
    """Receive one packet and the descriptors it carries; b"" means the peer closed."""
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE + 1, max_fds)
    if flags & _TRUNCATED:
        for fd in fds:
            _close_quietly(fd)
        raise ProtocolError("toolarge", f"fdkeeper: control message over {MAX_MESSAGE} bytes or descriptors")
    return data, fds


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def select_connections(
    connections: list[ReceivedJson],
    *,
    aor: str | None = None,
    state: str | None = None,
    remote: str | None = None,
    transport: str | None = None,
) -> list[ReceivedJson]:
    """STATUS's filters: the connections matching every one given; ``aor`` is a shell-style pattern.

    The keeper applies them (it counts without sending 10,000 rows), and the CLI where a keeper
    sent all rows."""
    return [
        c
        for c in connections
        if (aor is None or fnmatch.fnmatchcase(c.get("aor") or "", aor))
        and (state is None or c["state"] == state)
        and (remote is None or c["remote"] == remote)
        and (transport is None or c["transport"] == transport)
    ]
