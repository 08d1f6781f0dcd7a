"""Text from peers made safe to print: one log record is one line, one status row is one row.

An AoR comes from the SIP a run sends (the shim reads the From header; the control protocol
percent-decodes it), so it may hold a CR, LF or other control character that would forge a
log line or split a `status` row. Everything printed from such fields goes through here.
"""

from __future__ import annotations

import logging
import re

# C0 controls, DEL, C1 controls, and the Unicode line and paragraph separators.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """``text`` with every control character written as a visible escape (\\n, \\x1b, \\u2028)."""
    return _CONTROLS.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char)
    if named:
        return named
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


class OneLineFormatter(logging.Formatter):
    """Log records whose message cannot forge another line (tracebacks keep their lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


def configure_logging(level: str, name: str) -> None:
    """Log to stderr as ``time NAME[pid] message``, one record a line."""
    logging.basicConfig(level=level.upper())
    for handler in logging.getLogger().handlers:
        handler.setFormatter(OneLineFormatter(f"%(asctime)s {name}[%(process)d] %(message)s"))
