"""Answering the SuT's OPTIONS pings: the 200 OK built from the request (RFC 3261 §11.2).

SIP only; when and on which connection the keeper answers is keeper/pings.py (plain TCP) and
keeper/tlslink.py (TLS).
"""

from __future__ import annotations

from fdkeeper.sip.message import Malformed, Message, make_reply


def options_reply(message: bytes) -> bytes | None:
    """The 200 OK for ``message`` if it is an OPTIONS request, else None (a malformed one too:
    it is left for the run, whose scenario may expect it)."""
    if not message.startswith(b"OPTIONS "):
        return None
    try:
        request = Message(message, datagram=False)
    except Malformed:
        return None
    return make_reply(request, 200, "OK")
