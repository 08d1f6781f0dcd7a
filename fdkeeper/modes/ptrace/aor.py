"""The From AoR of a SIP message: the key a per-call connection is leased by.

Python twin of helpers/shim/aor.c (shim_from_aor), so the ptrace mode and the shim lease the same
user's kept connection for the same message.
"""

from __future__ import annotations


def from_aor(message: bytes) -> str | None:
    """The URI of the From header (or f) of a SIP message, without parameters: its AoR.

    Python twin of helpers/shim/aor.c (shim_from_aor), so both modes lease by the same key.
    """
    head = message.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    for line in head.split(b"\n")[1:]:
        line = line.rstrip(b"\r")
        name, colon, value = line.partition(b":")
        if not colon or line[:1] in (b" ", b"\t") or name.strip().lower() not in (b"from", b"f"):
            continue
        uri = _from_uri(value)
        return uri.decode("latin-1") if uri else None
    return None


def _from_uri(value: bytes) -> bytes | None:
    quoted, at = False, 0
    while at < len(value):
        char = value[at : at + 1]
        if quoted and char == b"\\":
            at += 1
        elif char == b'"':
            quoted = not quoted
        elif not quoted and char == b"<":
            end = value.find(b">", at + 1)
            if end < 0:
                return None
            value = value[at + 1 : end]
            break
        at += 1
    else:
        value = value.split(b";", 1)[0]  # addr-spec form: header parameters follow ';'
    value = value.strip(b" \t")
    user_end = value.find(b"@")
    tail = value[max(user_end, 0) :]
    cut = min((i for i in (tail.find(b";"), tail.find(b"?")) if i >= 0), default=len(tail))
    uri = value[: max(user_end, 0) + cut].rstrip(b" \t")
    return uri or None
