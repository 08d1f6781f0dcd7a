"""The SIP messages of one test's steps in time order, each with the kept connection it
travelled on, and the keeper's events between them: what `fdkeeper run --html` draws (html.py).

Where the pieces come from, in the test's log folder:
- the messages: each sipp step's `-trace_msg` file (steps.trace_options), blocks of
  "----- <date> <time>" then "TCP message sent (N bytes):" or "... received [N] bytes :" and the
  message; sipp writes no addresses there, and its time stamps are its event loop's clock,
  so two steps' messages less than a millisecond or so apart may be ordered either way;
- the connection: the test keeper's log (keeper.log), whose "leased <local>-><remote>/tcp to pid
  P" and "lease of pid P ended" lines say which kept connection was held when; a step's TCP/TLS
  messages are matched to the lease whose time covers them (the keeper logs the lease before
  sipp can send and its end after sipp exited). UDP messages are "udp, not kept" (under
  `--mode udp`, the converter's TCP connection behind sipp's UDP is not shown).

Bounded: MAX_MESSAGES a test, MAX_NOTES keeper events, MAX_BODY characters a message, each
trace read up to MAX_TRACE_BYTES; what is left out is counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from fdkeeper.testrun.results import TestResult

MAX_MESSAGES = 300  # arrows a test's ladder shows; the rest are counted
MAX_NOTES = 100  # keeper events a test's ladder shows
MAX_BODY = 4000  # characters of one message shown
MAX_TRACE_BYTES = 4 * 1024 * 1024  # read of one -trace_msg file
MAX_LABEL = 60  # characters of an arrow's first-line label
SLACK = 0.01  # seconds: the keeper logs milliseconds, sipp microseconds

KEPT_TRANSPORTS = ("TCP", "TLS")

# sipp writes each message as "-----... 2026-12-07 20:54:50.413904", then "TCP message sent
# (353 bytes):" or "TCP message received [399] bytes :", an empty line, the message's bytes;
# a note of its own (an unexpected message) after a bare "-----..." line.
_BLOCK_START = re.compile(rb"^-{5,}[ \t]*(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?)?[ \t]*\r?$", re.MULTILINE)
_BLOCK_HEAD = re.compile(r"^[ \t]*(\w+) message (sent|received) (?:\((\d+) bytes\)|\[(\d+)\] bytes)[ \t]*:?[ \t]*$")
_CSEQ = re.compile(r"^CSeq:[ \t]*\d+[ \t]+(\S+)", re.MULTILINE | re.IGNORECASE)
_KEEPER_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ (.*)$", re.MULTILINE)
_LEASED = re.compile(r"^leased (.+) to pid (\d+)$")
_LEASE_ENDED = re.compile(r"^lease of pid (\d+) ended$")


def shorten(text: str, limit: int) -> tuple[str, int]:
    """``text`` up to ``limit`` characters and how many were left out."""
    return (text, 0) if len(text) <= limit else (text[:limit], len(text) - limit)


# --- sipp's message trace ---------------------------------------------------------------------


@dataclass
class Message:
    step: str
    when: datetime | None
    direction: str  # sent or received: as sipp saw it
    transport: str  # TCP, UDP, TLS, ... as sipp's trace names it
    size: int
    text: str  # the message, cut at MAX_BODY
    cut: int = 0  # characters of the message left out
    connection: str = ""  # the kept connection it travelled on, when known

    @property
    def label(self) -> str:
        """What the arrow says: the request's method, or the response's status and method."""
        first = self.text.split("\n", 1)[0].strip()
        parts = first.split(" ", 2)
        if parts[0].upper().startswith("SIP/") and len(parts) > 1:
            cseq = _CSEQ.search(self.text)
            label = " ".join(parts[1:]) + (f" ({cseq.group(1)})" if cseq else "")
        else:
            label = parts[0] if parts and parts[0] else "(empty message)"
        return shorten(label, MAX_LABEL)[0]

    @property
    def kept(self) -> bool:
        return self.transport.upper() in KEPT_TRANSPORTS


def parse_time(text: str | None, pattern: str = "%Y-%m-%d %H:%M:%S.%f") -> datetime | None:
    if not text:
        return None
    try:
        return datetime.strptime(text, pattern)
    except ValueError:
        return None


def parse_trace(data: bytes, step: str) -> list[Message]:
    """The messages of one -trace_msg file. A message is as long as its head says, so a
    separator and head inside what the SuT sent stay part of that message rather than
    forge one of their own; a block that is not a message (or cut off before its head) is
    left out, a message cut off keeps what was written."""
    messages = []
    position = 0
    while start := _BLOCK_START.search(data, position):
        stamp = start.group(1)  # sipp's notes ("Unexpected UDP message received:") have none
        message, position = _read_block(data, start.end(), step, parse_time(stamp.decode() if stamp else None))
        if message is not None:
            messages.append(message)
    return messages


def _read_block(data: bytes, at: int, step: str, when: datetime | None) -> tuple[Message | None, int]:
    """The message whose head follows the separator ending at ``at``, and where to go on."""
    head_start = _skip_line_breaks(data, at)
    head_end = data.find(b"\n", head_start)
    head_end = len(data) if head_end < 0 else head_end
    head = _BLOCK_HEAD.match(data[head_start:head_end].decode("utf-8", "replace").rstrip("\r"))
    if head is None:
        return None, at
    body_start = head_end + 1
    if data[body_start : body_start + 2] == b"\r\n":
        body_start += 2
    elif data[body_start : body_start + 1] == b"\n":
        body_start += 1
    size = int(head.group(3) or head.group(4))
    body_end = _body_end(data, body_start, size)
    body = data[body_start:body_end].decode("utf-8", "replace").replace("\r\n", "\n").strip("\n")
    text, cut = shorten(body, MAX_BODY)
    return Message(step, when, head.group(2), head.group(1), size, text, cut), body_end


def _body_end(data: bytes, body_start: int, size: int) -> int:
    """Where a message of ``size`` bytes ends: there when a separator (or the end) follows,
    else (sipp counted otherwise) at the next separator."""
    declared = body_start + size
    after = _skip_line_breaks(data, declared)
    if declared <= len(data) and (after >= len(data) or _BLOCK_START.match(data, after)):
        return declared
    following = _BLOCK_START.search(data, body_start)
    return following.start() if following else len(data)


def _skip_line_breaks(data: bytes, at: int) -> int:
    while at < len(data) and data[at : at + 1] in (b"\r", b"\n"):
        at += 1
    return at


def read_limited(path: Path | None, limit: int | None = None) -> tuple[bytes, bool]:
    """A log file's bytes (up to ``limit``, MAX_TRACE_BYTES by default) and whether it went
    on; (b"", False) if absent."""
    limit = MAX_TRACE_BYTES if limit is None else limit
    if path is None:
        return b"", False
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError:
        return b"", False
    return data[:limit], len(data) > limit


# --- the keeper's leases ----------------------------------------------------------------------


@dataclass
class Lease:
    pid: int
    connections: str  # as the keeper logs them: "127.0.0.1:40000->127.0.0.1:5060/tcp, ..."
    start: datetime
    end: datetime | None = None  # None: not seen ending (the log was cut, or the keeper killed)

    def covers(self, when: datetime) -> bool:
        after_start = (when - self.start).total_seconds() >= -SLACK
        return after_start and (self.end is None or (self.end - when).total_seconds() >= -SLACK)


def keeper_events(text: str) -> list[tuple[datetime, str]]:
    """(time, event) of each line of a keeper log."""
    events = []
    for line in _KEEPER_LINE.finditer(text):
        when = parse_time(line.group(1), "%Y-%m-%d %H:%M:%S,%f")
        if when is not None:
            events.append((when, line.group(2).strip()))
    return events


def parse_leases(text: str) -> list[Lease]:
    """The leases a keeper log records, each with its end when logged."""
    leases: list[Lease] = []
    open_by_pid: dict[int, list[Lease]] = {}
    for when, event in keeper_events(text):
        if leased := _LEASED.match(event):
            lease = Lease(int(leased.group(2)), leased.group(1), when)
            leases.append(lease)
            open_by_pid.setdefault(lease.pid, []).append(lease)
        elif ended := _LEASE_ENDED.match(event):
            for lease in open_by_pid.pop(int(ended.group(1)), []):
                lease.end = when
    return leases


def lease_of(messages: list[Message], leases: list[Lease]) -> Lease | None:
    """The lease that covers the most of one step's kept (TCP/TLS) messages; None when none
    does or two tie (two steps holding connections at once, too close to tell)."""
    timed = [m.when for m in messages if m.kept and m.when is not None]
    scores = sorted(((sum(lease.covers(t) for t in timed), n) for n, lease in enumerate(leases)), reverse=True)
    if not scores or scores[0][0] == 0 or (len(scores) > 1 and scores[1][0] == scores[0][0]):
        return None
    return leases[scores[0][1]]


def connection_label(message: Message, lease: Lease | None) -> str:
    if not message.kept:
        return f"{message.transport.lower()}, not kept"
    if lease is None:
        return f"{message.transport.lower()}, connection unknown"
    return f"kept {lease.connections}"


@dataclass
class KeeperNote:
    """What the keeper did with the connections, between the arrows: opened one, leased it to
    a step, took it back when the step ended (and held it until the next), saw it closed."""

    when: datetime
    text: str


_CONNECTION_EVENT = re.compile(r"^\S+->\S+/\w+: ")


def keeper_notes(text: str, holders: dict[int, str]) -> list[KeeperNote]:
    """The keeper log's events about connections, naming each lease's step (``holders``:
    pid -> step) where known."""
    notes = []
    for when, event in keeper_events(text):
        if leased := _LEASED.match(event):
            holder = holders.get(int(leased.group(2)), f"pid {leased.group(2)}")
            notes.append(KeeperNote(when, f"keeper leases {leased.group(1)} to {holder}"))
        elif ended := _LEASE_ENDED.match(event):
            holder = holders.get(int(ended.group(1)), f"pid {ended.group(1)}")
            notes.append(KeeperNote(when, f"{holder} ended: the keeper holds its connection(s)"))
        elif event.startswith("opened ") or _CONNECTION_EVENT.match(event):
            notes.append(KeeperNote(when, f"keeper: {event}"))
    return notes


# --- one test's messages ----------------------------------------------------------------------


@dataclass
class Ladder:
    steps: list[str]  # the lanes, in the test file's order
    rows: list[Message | KeeperNote]  # in time order, at most MAX_MESSAGES and MAX_NOTES
    left_out: int  # messages beyond MAX_MESSAGES
    notes: list[str]  # what could not be read in full

    @property
    def messages(self) -> list[Message]:
        return [row for row in self.rows if isinstance(row, Message)]


def ladder_of(result: TestResult) -> Ladder:
    """Every step's messages and the keeper's events in time order, each message labelled
    with its connection."""
    keeper_log = read_limited(result.log_dir / "keeper.log")[0].decode("utf-8", "replace")
    leases = parse_leases(keeper_log)
    messages: list[Message] = []
    holders: dict[int, str] = {}
    notes = []
    for step in result.steps:
        text, longer = read_limited(step.files.get("messages"))
        if longer:
            notes.append(
                f"{step.name}: its message trace is longer than {MAX_TRACE_BYTES} bytes; the rest is not shown"
            )
        found = parse_trace(text, step.name)
        lease = lease_of(found, leases)
        if lease is not None:
            holders[lease.pid] = step.name
        for message in found:
            message.connection = connection_label(message, lease)
        messages += found
    order = {step.name: n for n, step in enumerate(result.steps)}
    messages.sort(key=lambda row: _row_order(row, order))
    shown = messages[:MAX_MESSAGES]
    last = shown[-1].when if len(messages) > len(shown) else None  # the keeper's events up to there
    events = [note for note in keeper_notes(keeper_log, holders) if last is None or note.when <= last]
    rows: list[Message | KeeperNote] = [*shown, *events[:MAX_NOTES]]
    rows.sort(key=lambda row: _row_order(row, order))
    lanes = [step.name for step in result.steps if any(m.step == step.name for m in messages)]
    return Ladder(lanes, rows, len(messages) - len(shown), notes)


def _row_order(row: Message | KeeperNote, steps: dict[str, int]) -> tuple[datetime, int]:
    """Time order; at the same time, the keeper's note first (it leases before sipp sends)."""
    if isinstance(row, KeeperNote):
        return row.when, -1
    return row.when or datetime.max, steps[row.step]
