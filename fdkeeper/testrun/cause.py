"""Why a step failed, in one to a few lines, read from what its process left behind.

The verdict of a step says what was checked ("exit status 2, expected 0; no call statistics
from sipp"); the cause says why, from the step's own logs, first found first served:
- fdkeeper's own line: `fdkeeper sipp` ends on one line starting with "fdkeeper:", and exit
  status 2, when it cannot run sipp at all (the SuT refused the connection, no such scenario,
  a bad option); a "fdkeeper:" line of a run that went on is a warning, not the cause;
- sipp's last errors, from its -trace_err file (else the same entries sipp copies to its
  stderr): each entry's line without its time stamp, and for "Aborting call on unexpected
  message" the first line of the message it received (e.g. "SIP/2.0 404 Not Found"), where
  the entry goes on with the whole message;
- else, when the step's exit status says it went wrong, the last lines of its stderr (a
  command step's own message). A sipp run that ended well but counted the wrong calls
  has no cause beyond its reasons.
Every line has its control characters escaped (they come from a peer or a terminal) and is
cut to a readable width.
"""

from __future__ import annotations

import re

from fdkeeper.errors import FdkeeperError
from fdkeeper.textsafe import escape_controls

MAX_LINES = 4
MAX_WIDTH = 240
OWN_PREFIX = "fdkeeper:"
# sipp's time stamp opening each entry of its error file: "2026-12-07\t21:12:13.123456\t1796...: "
_SIPP_ENTRY = re.compile(r"^\d{4}-\d\d-\d\d\s+\d\d:\d\d:\d\d\.\d+\s+\d+\.\d+:\s?")
# sipp's wording for a message the scenario did not expect; the received message follows it.
_UNEXPECTED = re.compile(r"received '(?P<first>[^\r\n']*)")


def step_cause(stderr: str, sipp_errors: str, exit: int | None) -> str:
    """The cause of a failed step from its stderr, sipp's error file and its exit status
    ("" when they say nothing more than the verdict)."""
    lines = (
        own_line(stderr, exit)
        or sipp_error_lines(sipp_errors)
        or sipp_error_lines(stderr)
        or (last_lines(stderr) if exit else [])
    )
    return "\n".join(_short(escape_controls(line)) for line in lines[-MAX_LINES:])


def own_line(stderr: str, exit: int | None) -> list[str]:
    """fdkeeper's line when fdkeeper ended the step with it (its own exit status, its line
    the last word), so a warning of a run that went on is not taken for the cause."""
    lines = last_lines(stderr, 1)
    return lines if exit == FdkeeperError.exit_status and lines and lines[0].startswith(OWN_PREFIX) else []


def sipp_error_lines(text: str) -> list[str]:
    """sipp's last few distinct errors, the latest last (a thousand calls failing alike are one line)."""
    latest: list[str] = []
    for entry in reversed(_entries(text)):
        if entry not in latest:
            latest.append(entry)
        if len(latest) == MAX_LINES:
            break
    return latest[::-1]


def _entries(text: str) -> list[str]:
    """Each entry of sipp's error file as one line: its first line without the time stamp,
    plus what it received when that is the point of the entry."""
    entries: list[str] = []
    lines = text.replace("\r\n", "\n").split("\n")
    for number, line in enumerate(lines):
        stamp = _SIPP_ENTRY.match(line)
        if not stamp:
            continue
        entry = line[stamp.end() :].strip()
        unexpected = _UNEXPECTED.search(entry)
        if unexpected and not unexpected.group("first") and number + 1 < len(lines):
            entry = entry[: unexpected.start()] + f"received '{lines[number + 1].strip()}'"
        elif unexpected:
            entry = entry[: unexpected.end()] + "'"
        entries.append(entry)
    return entries


def last_lines(text: str, count: int = MAX_LINES) -> list[str]:
    """The last ``count`` lines of ``text`` that hold something."""
    return [line.strip() for line in text.splitlines() if line.strip()][-count:]


def _short(line: str) -> str:
    return line if len(line) <= MAX_WIDTH else line[: MAX_WIDTH - 3] + "..."
