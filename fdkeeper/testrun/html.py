"""`fdkeeper run --html FILE`: one self-contained page with a picture of each test.

Per test: its steps (status, exit, calls, time; a failed step in red with its cause), sipp's
statistics per step, and a ladder diagram of the SIP messages of all its steps in time order.
Each arrow goes between the step that sent or received the message and the SuT, labelled with
the message (REGISTER, 200 OK (REGISTER)...), the step and the connection it travelled on;
between the arrows, the keeper's events (a connection opened, leased to a step, held again
when the step ended, closed by the SuT), so a call that reaches a later run is seen to come
over the connection an earlier run opened.

Where the pieces come from, in the test's log folder:
- the messages: each sipp step's `-trace_msg` file (steps.trace_options), blocks of
  "----- <date> <time>" then "TCP message sent (N bytes):" or "... received [N] bytes :" and the
  message; sipp writes no addresses there, and its time stamps are its event loop's clock,
  so two steps' messages less than a millisecond or so apart may be drawn in either order;
- the connection: the test keeper's log (keeper.log), whose "leased <local>-><remote>/tcp to pid
  P" and "lease of pid P ended" lines say which kept connection was held when; a step's TCP/TLS
  messages are matched to the lease whose time covers them (the keeper logs the lease before
  sipp can send and its end after sipp exited). UDP messages are drawn as "udp, not kept"
  (under `--mode udp`, the converter's TCP connection behind sipp's UDP is not drawn).

Everything from the SuT, sipp or the test file is HTML-escaped and stripped of control
characters; the page is bounded (MAX_MESSAGES a test, MAX_BODY characters a message, each
trace read up to MAX_TRACE_BYTES) and says what it left out. No network, no other file: the
CSS and the one script are inline, and the page's Content-Security-Policy allows only that
script (by its hash), so even markup that slipped through could not run or load anything.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from fdkeeper.testbed import read_sipp_stats
from fdkeeper.testrun.results import FAILED, PASSED, SKIPPED, StepResult, TestResult

MAX_MESSAGES = 300  # arrows a test's ladder shows; the rest are counted
MAX_NOTES = 100  # keeper events a test's ladder shows
MAX_BODY = 4000  # characters of one message shown
MAX_TRACE_BYTES = 4 * 1024 * 1024  # read of one -trace_msg file
MAX_LABEL = 60  # characters of an arrow's first-line label
SLACK = 0.01  # seconds: the keeper logs milliseconds, sipp microseconds

KEPT_TRANSPORTS = ("TCP", "TLS")
# The statistics shown per step (cumulative columns of sipp's -trace_stat), then any other
# nonzero Failed...(C) column.
STATS = (
    ("TotalCallCreated", "calls created"),
    ("IncomingCall(C)", "incoming"),
    ("OutgoingCall(C)", "outgoing"),
    ("SuccessfulCall(C)", "successful"),
    ("FailedCall(C)", "failed"),
    ("Retransmissions(C)", "retransmissions"),
    ("DeadCallMsgs(C)", "dead call messages"),
    ("ElapsedTime(C)", "elapsed"),
)

# C0 and C1 controls, DEL, the Unicode line separators; bodies keep tab and newline.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
_LINE_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# sipp writes each message as "-----... 2026-12-07 20:54:50.413904", then "TCP message sent
# (353 bytes):" or "TCP message received [399] bytes :", an empty line, the message's bytes;
# a note of its own (an unexpected message) after a bare "-----..." line.
_BLOCK_START = re.compile(rb"^-{5,}[ \t]*(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?)?[ \t]*\r?$", re.MULTILINE)
_BLOCK_HEAD = re.compile(r"^[ \t]*(\w+) message (sent|received) (?:\((\d+) bytes\)|\[(\d+)\] bytes)[ \t]*:?[ \t]*$")
_CSEQ = re.compile(r"^CSeq:[ \t]*\d+[ \t]+(\S+)", re.MULTILINE | re.IGNORECASE)
_KEEPER_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ (.*)$", re.MULTILINE)
_LEASED = re.compile(r"^leased (.+) to pid (\d+)$")
_LEASE_ENDED = re.compile(r"^lease of pid (\d+) ended$")


# --- text made safe ------------------------------------------------------------------------


def clean(text: str, keep_lines: bool = False) -> str:
    """``text`` without control characters (a NUL or ESC from anywhere); newlines and tabs
    stay only in ``keep_lines`` text (a message body)."""
    return (_CONTROLS if keep_lines else _LINE_CONTROLS).sub("", text)


def esc(text: object, keep_lines: bool = False) -> str:
    """Text for HTML (element content and quoted attribute values alike)."""
    return html.escape(clean(str(text), keep_lines), quote=True)


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


# --- the page -----------------------------------------------------------------------------------

LANE = 300  # pixels between lanes
ROW = 46  # pixels a message takes
TOP = 40  # lane titles
LEFT = 110  # the time column

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:2em}
.passed h2,.xfailed h2,.xpassed h2,li.passed a{color:#1a7f37}.failed h2,.error h2,li.failed a,li.error a{color:#c62828}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}
tr.failed td{color:#c62828;background:#fdecea}.cause{white-space:pre-wrap}
svg text{font:12px monospace}svg .msg{cursor:pointer}svg .msg:hover line{stroke-width:3}
.lane{stroke:#888;stroke-dasharray:4 3}.lanetitle{font-weight:bold}.lanetitle.failed{fill:#c62828}
.keeper .note{fill:#6a4c93;font-style:italic}.conn{fill:#555}
svg .note,svg .label,svg .conn{paint-order:stroke;stroke:#fff;stroke-width:4px}
.arrow{stroke:#1f4e9c;stroke-width:1.5}.arrow.failed{stroke:#c62828}
pre{background:#f6f8fa;padding:.5em;white-space:pre-wrap;word-break:break-all}
.note{color:#8a6d00}details.open-by-click{outline:2px solid #1f4e9c}
"""

SCRIPT = """
document.querySelectorAll("svg .msg").forEach(function (arrow) {
  arrow.addEventListener("click", function () {
    var body = document.getElementById(arrow.getAttribute("data-body"));
    if (body) { body.open = true; body.classList.add("open-by-click"); body.scrollIntoView(); }
  });
});
document.body.setAttribute("data-script", "ran");  // the policy's hash matched: the clicks work
"""


def render_report(results: Iterable[TestResult], title: str = "fdkeeper run") -> str:
    """The whole page for a run's results."""
    results = list(results)
    script_hash = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
    policy = f"default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{script_hash}'"
    summary = ", ".join(f"{count} {status}" for status, count in Counter(r.status for r in results).items())
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{policy}">',
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>",
            f"<h1>{esc(title)}</h1><p>{esc(summary or 'no test ran')}</p>",
            render_contents(results),
            *(render_test(result, number) for number, result in enumerate(results)),
            f"<script>{SCRIPT}</script></body></html>",
        ]
    )


def render_contents(results: list[TestResult]) -> str:
    """A line per test, its status first, linking to its section."""
    items = "".join(
        f'<li class="{esc(result.status)}"><a href="#test-{number}">{esc(result.status.upper())} '
        f"{esc(result.name)}</a></li>"
        for number, result in enumerate(results)
    )
    return f"<ul>{items}</ul>"


def render_test(result: TestResult, number: int) -> str:
    ladder = ladder_of(result)
    parts = [
        f'<section class="test {esc(result.status)}" id="test-{number}">',
        f"<h2>{esc(result.name)}: {esc(result.status.upper())} ({result.duration:.1f} s)</h2>",
        f"<p>{esc(result.path)}; logs in {esc(result.log_dir)}</p>",
    ]
    if result.status != PASSED and result.message():
        parts.append(f'<p class="cause">{esc(result.message(), keep_lines=True)}</p>')
    parts.append(render_steps(result.steps))
    parts.append(render_ladder(ladder, result, number))
    parts.append(render_bodies(ladder.rows, number))
    parts.append("</section>")
    return "\n".join(parts)


def cause_text(step: StepResult) -> str:
    """Why a step did not pass: its cause read from its logs (StepResult.cause), then the
    reasons its verdict gave."""
    lines = [step.cause] if step.cause else []
    return "\n".join(lines + [reason for reason in step.reasons if reason not in lines])


def status_text(step: StepResult) -> str:
    return "stopped" if step.stopped else step.status


def render_steps(steps: list[StepResult]) -> str:
    rows = ["<table><tr><th>step</th><th>status</th><th>exit</th><th>calls</th><th>time</th><th>cause</th></tr>"]
    for step in steps:
        exit_text = "" if step.exit is None else str(step.exit)
        time_text = "" if step.status == SKIPPED else f"{step.duration:.1f} s"
        rows.append(
            f'<tr class="{esc(step.status)}"><td>{esc(step.name)}</td><td>{esc(status_text(step))}</td>'
            f"<td>{esc(exit_text)}</td><td>{esc(step.counts())}</td><td>{time_text}</td>"
            f'<td class="cause">{esc(cause_text(step), keep_lines=True)}</td></tr>'
        )
    rows.append("</table>")
    rows += [render_stats(step) for step in steps if step.files.get("stat")]
    return "\n".join(rows)


def step_stats(stat_file: Path) -> list[tuple[str, str]]:
    """(label, value) of sipp's final statistics: the usual columns, then nonzero failures."""
    stats = read_sipp_stats(stat_file)
    shown = [(label, stats[column]) for column, label in STATS if column in stats]
    named = {column for column, _ in STATS}
    failures = [
        (column, value)
        for column, value in stats.items()
        if column.startswith("Failed") and column.endswith("(C)") and column not in named and value not in ("", "0")
    ]
    return shown + failures


def render_stats(step: StepResult) -> str:
    stats = step_stats(step.files["stat"])
    if not stats:
        return f"<p>{esc(step.name)}: no statistics from sipp</p>"
    cells = "".join(f"<tr><th>{esc(label)}</th><td>{esc(value)}</td></tr>" for label, value in stats)
    return f"<details><summary>sipp statistics of {esc(step.name)}</summary><table>{cells}</table></details>"


def render_ladder(ladder: Ladder, result: TestResult, number: int) -> str:
    parts = [f'<p class="arrow-count">{len(ladder.messages)} message(s)</p>']
    parts += [f'<p class="note">{esc(note)}</p>' for note in ladder.notes]
    if ladder.left_out:
        parts.append(f'<p class="note">{ladder.left_out} more message(s) not shown (at most {MAX_MESSAGES} a test)</p>')
    if not ladder.messages:
        return "\n".join([*parts, "<p>No SIP messages traced.</p>"])
    failed = {step.name for step in result.steps if step.status == FAILED}
    lanes = [*ladder.steps, "SuT"]
    x = {name: LEFT + LANE // 2 + n * LANE for n, name in enumerate(lanes)}
    width, height = LEFT + LANE * len(lanes), TOP + ROW * (len(ladder.rows) + 1)
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    for name in lanes:
        title_class = "lanetitle failed" if name in failed else "lanetitle"
        svg.append(f'<line class="lane" x1="{x[name]}" y1="{TOP - 10}" x2="{x[name]}" y2="{height}"/>')
        svg.append(f'<text class="{title_class}" x="{x[name]}" y="{TOP - 16}" text-anchor="middle">{esc(name)}</text>')
    for row, item in enumerate(ladder.rows):
        y = TOP + ROW * (row + 1)
        if isinstance(item, KeeperNote):
            svg.append(render_note(item, y, width))
        else:
            svg.append(render_arrow(item, y, x, f"m-{number}-{row}", item.step in failed))
    svg.append("</svg>")
    return "\n".join([*parts, "".join(svg)])


def render_arrow(message: Message, y: int, x: dict[str, int], body_id: str, failed: bool) -> str:
    """One arrow between the step's lane and the SuT's, its label above, its step and
    connection below, its time at the left."""
    start, end = (x[message.step], x["SuT"]) if message.direction == "sent" else (x["SuT"], x[message.step])
    tip = -8 if end > start else 8
    middle = (start + end) // 2
    kind = " failed" if failed else ""
    when = message.when.strftime("%H:%M:%S.%f")[:-3] if message.when else "?"
    return (
        f'<g class="msg" data-body="{body_id}" data-step="{esc(message.step)}">'
        f"<title>{esc(message.step)} {esc(message.direction)} {esc(message.label)}</title>"
        f'<text x="4" y="{y}">{esc(when)}</text>'
        f'<line class="arrow{kind}" x1="{start}" y1="{y}" x2="{end}" y2="{y}"/>'
        f'<polyline class="arrow{kind}" fill="none" points="{end + tip},{y - 5} {end},{y} {end + tip},{y + 5}"/>'
        f'<text class="label" x="{middle}" y="{y - 6}" text-anchor="middle">{esc(message.label)}</text>'
        f'<text class="conn" x="{middle}" y="{y + 14}" text-anchor="middle">'
        f"{esc(message.step)} {esc(message.direction)} · {esc(message.connection)}</text></g>"
    )


def render_note(note: KeeperNote, y: int, width: int) -> str:
    when = note.when.strftime("%H:%M:%S.%f")[:-3]
    return (
        f'<g class="keeper"><text x="4" y="{y}">{esc(when)}</text>'
        f'<text class="note" x="{(LEFT + width) // 2}" y="{y}" text-anchor="middle">{esc(note.text)}</text></g>'
    )


def render_bodies(rows: list[Message | KeeperNote], number: int) -> str:
    parts = []
    for row, message in enumerate(rows):
        if not isinstance(message, Message):
            continue
        cut = f"\n[... {message.cut} more characters not shown]" if message.cut else ""
        parts.append(
            f'<details id="m-{number}-{row}"><summary>{esc(message.step)} {esc(message.direction)} '
            f"{esc(message.label)} ({message.size} bytes, {esc(message.connection)})</summary>"
            f"<pre>{esc(message.text, keep_lines=True)}{esc(cut, keep_lines=True)}</pre></details>"
        )
    return "\n".join(parts)


def write_report(path: Path, results: Iterable[TestResult]) -> None:
    """Write the page to ``path`` (replacing it)."""
    path.write_text(render_report(results), encoding="utf-8")
