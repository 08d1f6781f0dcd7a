"""The placeholder's address in what a per-call fd sends, for the ptrace mode.

Python twin of helpers/shim/rewrite.c (the shim's), so both modes show the SuT the same thing: sipp
-t tn writes [local_ip]:[local_port] (Via sent-by, Contact) from the socket it bound before
connect(), the placeholder, not the user's kept connection that the call then leaves on. Where
"IP:PORT" of the placeholder stands whole in the header part of a message (up to its first
blank line), it is replaced by the kept connection's, same length only, so Content-Length and
every offset sipp keeps into its message stay right. The tracer writes the replacement into
sipp's own buffer at the send's stop, before the kernel takes any of it: a tail sipp sends
again later is its copy of already rewritten bytes.
"""

from __future__ import annotations

import functools
import ipaddress
import string

from fdkeeper.address import Address, format_address

MAX_HEADERS = 64 * 1024  # bytes of a message looked at (sipp's largest message)
# What may not stand right before the address (it would be part of a longer token) or right
# after it (a longer port): as the shim's rewrite.c.
TOKEN_BYTES = frozenset((string.ascii_letters + string.digits + ".:_-").encode())
DIGIT_BYTES = frozenset(string.digits.encode())


class Rewrite:
    """One fd's pair: the placeholder's "IP:PORT" and the kept connection's, same length."""

    __slots__ = ("new", "old")

    def __init__(self, old: bytes, new: bytes) -> None:
        if len(old) != len(new) or not old:
            raise ValueError("the two addresses differ in length")
        self.old, self.new = old, new

    def offsets(self, message: bytes) -> list[int]:
        """Where the placeholder's address stands whole in the header part of ``message``.

        bytes.find, not a regular expression: a pattern per call (each placeholder's port is
        another) cost the tracer about 0.4 ms to compile, with sipp held at its send."""
        blank = message.find(b"\r\n\r\n", 0, MAX_HEADERS)
        end = blank + 4 if blank >= 0 else min(len(message), MAX_HEADERS)
        old, found = self.old, []
        at = message.find(old, 0, end)
        while at >= 0:
            after = at + len(old)
            if (at == 0 or message[at - 1] not in TOKEN_BYTES) and (after >= end or message[after] not in DIGIT_BYTES):
                found.append(at)
                at = message.find(old, after, end)
            else:
                at = message.find(old, at + 1, end)
        return found

    def apply(self, message: bytes) -> bytes:
        """``message`` as the SuT is to get it."""
        out = bytearray(message)
        for at in self.offsets(message):
            out[at : at + len(self.new)] = self.new
        return bytes(out)


def rewrite_for(placeholder: Address, kept: Address) -> Rewrite | None:
    """The pair for a per-call fd whose program socket was bound to ``placeholder`` and whose
    kept connection's local address is ``kept``; None when there is nothing to rewrite (no port
    of its own, the same address) or the lengths differ (one warning is the caller's)."""
    ip, port = placeholder[:2]
    if not port:
        return None
    if _is_wildcard(ip):  # sipp writes [local_ip], the address the connection is made from
        ip = kept[0]
    old, new = format_address((ip, port)).encode(), format_address(kept[:2]).encode()
    if old == new:
        return None
    try:
        return Rewrite(old, new)
    except ValueError:
        return None


@functools.lru_cache(maxsize=64)  # the placeholder's IP: the same at every call
def _is_wildcard(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_unspecified
    except ValueError:
        return False
