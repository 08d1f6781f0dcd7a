"""Reading kamcmd's text output: the registrar's contacts and Kamailio's connections."""

from __future__ import annotations

import re
from typing import Any, TypeAlias, TypeVar

from fdkeeper.address import format_address

# kamcmd's output parsed: text, structs of named members and arrays, nested.
KamNode: TypeAlias = "str | dict[str, KamNode] | list[KamNode]"
# What the testbed reports from it (a contact, a connection): a struct's own members, as kamcmd
# printed them (text or nested structs), with the testbed's keys added (ints, addresses,
# a parsed SIP target). Callers index it by kamcmd's names, so it stays a plain dict.
KamRow: TypeAlias = "dict[str, Any]"
_Node = TypeVar("_Node", bound=KamNode)


def parse_kamcmd(text: str) -> list[KamNode]:
    """Parse kamcmd's default text output into Python lists/dicts.

    kamcmd prints structs as `{` ... `}` with `key: value` lines, a named
    struct member as `key: {`, and arrays as a sequence of values at top
    level. A key repeated inside one struct (e.g. several `Contact:` members
    of an AoR) becomes a list, so repeated members are never lost.
    Good enough for ul.dump and core.tcp_list; a bare array value that
    itself contains ": " would be read as a key.
    """
    root: list[KamNode] = []
    stack: list[list[KamNode] | dict[str, KamNode]] = [root]
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line == "}":
            if len(stack) > 1:
                stack.pop()
            continue
        if line == "{":
            stack.append(_add(stack[-1], None, _struct()))
            continue
        key, sep, value = line.partition(":")
        if not sep:
            _add(stack[-1], None, line)
        elif value.strip() == "{":
            stack.append(_add(stack[-1], key.strip(), _struct()))
        else:
            _add(stack[-1], key.strip(), value.strip())
    return root


def _struct() -> dict[str, KamNode]:
    return {}


def _add(container: list[KamNode] | dict[str, KamNode], key: str | None, value: _Node) -> _Node:
    """Put `value` into the struct or array being read; return `value`."""
    if isinstance(container, list):
        container.append(value if key is None else {key: value})
    elif key is None:  # a bare value inside a struct: kamcmd prints none; kept under "" as before
        container[""] = value
    elif key in container:
        old = container[key]
        if isinstance(old, _MultiList):
            old.append(value)
        else:
            container[key] = _MultiList([old, value])
    else:
        container[key] = value
    return value


class _MultiList(list[KamNode]):
    """A list made from repeated struct keys (not a value kamcmd printed)."""


def as_list(value: KamNode | None) -> list[KamNode]:
    """A repeated member as a list, a single one as a list of one, none as []."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def dig(node: KamNode | None, *keys: str) -> KamNode | None:
    """node[key1][key2]..., or None where a level is missing."""
    for key in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


_SIP_HOSTPORT = re.compile(
    r"^(?:sips?:)?(?:[^@;>]*@)?(?P<host>\[[^\]]+\]|[^:;>]+)(?::(?P<port>\d+))?"
    r"(?P<params>[^>]*)"
)


def parse_sip_target(uri: str) -> dict[str, str | int | None]:
    """Split `sip:127.0.0.1:40312;transport=TCP` into host, port, transport.

    Used on the registrar's `received` (the connection's source address):
    that is where calls to the user go.
    """
    result: dict[str, str | int | None] = {"host": None, "port": None, "transport": None}
    if not uri or uri == "[not set]":
        return result
    match = _SIP_HOSTPORT.match(uri.strip().strip("<>"))
    if not match:
        return result
    result["host"] = match.group("host").strip("[]")
    if match.group("port"):
        result["port"] = int(match.group("port"))
    transport = re.search(r";transport=([A-Za-z]+)", match.group("params") or "")
    result["transport"] = transport.group(1).lower() if transport else "udp"
    return result


def structs(value: KamNode | None) -> list[dict[str, KamNode]]:
    """The structs among a member's values (see as_list)."""
    return [item for item in as_list(value) if isinstance(item, dict)]


def contact_dict(aor: KamNode | None, contact: dict[str, KamNode]) -> KamRow:
    """One registrar contact (a `Contact` struct of ul.dump / ul.lookup) as the
    testbed reports it: see Kamailio.location()."""
    received = contact.get("Received")
    received = None if received in (None, "[not set]") else received
    source = received or contact.get("Address", "")
    return {
        "aor": aor,
        "contact": contact.get("Address"),
        "received": received,
        "socket": contact.get("Socket"),
        "expires": contact.get("Expires"),
        "callid": contact.get("Call-ID"),
        "cseq": contact.get("CSeq"),
        "user_agent": contact.get("User-Agent"),
        "source": parse_sip_target(source if isinstance(source, str) else ""),
        "raw": dict(contact),
    }


def dump_contacts(tree: list[KamNode]) -> list[KamRow]:
    """Every contact of a parsed `ul.dump`."""
    return [
        contact_dict(info.get("AoR"), contact)
        for top in tree
        if isinstance(top, dict)
        for domain in as_list(dig(top, "Domains", "Domain"))
        for info in structs(dig(domain, "AoRs", "Info"))
        for contact in structs(dig(info, "Contacts", "Contact"))
    ]


def lookup_contacts(tree: list[KamNode]) -> list[KamRow]:
    """The contacts of a parsed `ul.lookup location AOR`."""
    return [
        contact_dict(top.get("AoR"), contact)
        for top in tree
        if isinstance(top, dict) and "AoR" in top
        for contact in structs(dig(top, "Contacts", "Contact"))
    ]


def tcp_connections(tree: list[KamNode]) -> list[KamRow]:
    """The connections of a parsed `core.tcp_list`, with ports as ints and
    remote/local as "ip:port" (Kamailio's src is the peer, dst its own side)."""
    result = []
    for item in tree:
        if not isinstance(item, dict) or "id" not in item:
            continue
        conn: KamRow = dict(item)
        for side in ("src", "dst"):
            ip, port = conn.get(f"{side}_ip"), conn.get(f"{side}_port")
            if ip is not None and port is not None:
                conn[f"{side}_port"] = int(port)
        conn["remote"] = format_address((conn.get("src_ip", "?"), conn.get("src_port", 0)))
        conn["local"] = format_address((conn.get("dst_ip", "?"), conn.get("dst_port", 0)))
        conn["remote_port"] = conn.get("src_port")
        conn["local_port"] = conn.get("dst_port")
        result.append(conn)
    return result
