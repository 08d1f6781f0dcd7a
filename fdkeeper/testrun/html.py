"""`fdkeeper run --html FILE`: one self-contained page with a picture of each test.

Per test: its steps (status, exit, calls, time; a failed step in red with its cause), sipp's
statistics per step, and a ladder diagram of the SIP messages of all its steps in time order.
Each arrow goes between the step that sent or received the message and the SuT, labelled with
the message (REGISTER, 200 OK (REGISTER)...), the step and the connection it travelled on;
between the arrows, the keeper's events (a connection opened, leased to a step, held again
when the step ended, closed by the SuT), so a call that reaches a later run is seen to come
over the connection an earlier run opened.

The messages, their connections and the keeper's events come from ladder.py (each step's
-trace_msg file and the test keeper's log).

Everything from the SuT, sipp or the test file is HTML-escaped and stripped of control
characters; the page is bounded (ladder.py: MAX_MESSAGES a test, MAX_BODY characters a message, each
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
from pathlib import Path

from fdkeeper.testbed import read_sipp_stats
from fdkeeper.testrun.ladder import MAX_MESSAGES, KeeperNote, Ladder, Message, ladder_of
from fdkeeper.testrun.results import FAILED, PASSED, SKIPPED, StepResult, TestResult

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


# --- text made safe ------------------------------------------------------------------------


def clean(text: str, keep_lines: bool = False) -> str:
    """``text`` without control characters (a NUL or ESC from anywhere); newlines and tabs
    stay only in ``keep_lines`` text (a message body)."""
    return (_CONTROLS if keep_lines else _LINE_CONTROLS).sub("", text)


def esc(text: object, keep_lines: bool = False) -> str:
    """Text for HTML (element content and quoted attribute values alike)."""
    return html.escape(clean(str(text), keep_lines), quote=True)


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
