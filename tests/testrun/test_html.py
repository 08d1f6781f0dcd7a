"""`fdkeeper run --html`: sipp's message traces and the keeper's leases read into a ladder,
the page escaped and bounded against hostile input, and one real run (sipp, the embedded
Kamailio) whose page a real headless browser (Debian's chromium) loads and shows."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

from fdkeeper.testrun import ladder as report
from fdkeeper.testrun.html import render_report
from fdkeeper.testrun.ladder import Lease, lease_of, parse_leases, parse_trace, read_limited
from fdkeeper.testrun.results import FAILED, PASSED, SKIPPED, StepResult, TestResult
from tests.support.paths import REPO

SEPARATOR = "-----------------------------------------------"


def block(when: str, head: str, message: str) -> str:
    """One block of a sipp -trace_msg file, as sipp 3.6 writes it."""
    return f"{SEPARATOR} 2026-12-07 {when}\n{head}\n\n{message}\n\n"


REGISTER = "REGISTER sip:fdkeeper.test SIP/2.0\r\nCSeq: 1 REGISTER\r\nContent-Length: 0\r\n"
OK_REGISTER = "SIP/2.0 200 OK\r\nCSeq: 1 REGISTER\r\nContent-Length: 0\r\n"
INVITE = "INVITE sip:alice@127.0.0.1 SIP/2.0\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n"

REGISTER_TRACE = block("20:54:50.413904", "TCP message sent (353 bytes):", REGISTER) + block(
    "20:54:50.416318", "TCP message received [399] bytes :", OK_REGISTER
)
ANSWER_TRACE = block("20:54:52.100000", "TCP message received [953] bytes :", INVITE)
CALL_TRACE = block("20:54:52.050000", "UDP message sent (900 bytes):", INVITE)
KEEPER_LOG = """\
2026-12-07 20:54:50,300 fdkeeper[10] keeper 10 serving /tmp/x/control.sock
2026-12-07 20:54:50,410 fdkeeper[10] opened 127.0.0.1:43860->127.0.0.1:5060/tcp
2026-12-07 20:54:50,411 fdkeeper[10] leased 127.0.0.1:43860->127.0.0.1:5060/tcp to pid 20
2026-12-07 20:54:50,600 fdkeeper[10] lease of pid 20 ended
2026-12-07 20:54:51,900 fdkeeper[10] leased 127.0.0.1:43860->127.0.0.1:5060/tcp to pid 21
2026-12-07 20:54:53,000 fdkeeper[10] lease of pid 21 ended
"""


def make_result(tmp_path: Path, traces: dict[str, str], name: str = "t", status: str = PASSED) -> TestResult:
    """A TestResult whose steps' message traces (and the keeper's log) are files in tmp_path."""
    (tmp_path / "keeper.log").write_text(KEEPER_LOG)
    steps = []
    for number, (step, trace) in enumerate(traces.items()):
        path = tmp_path / f"step{number}.messages.log"  # a step's name may hold what no file name can
        path.write_text(trace)
        steps.append(StepResult(step, PASSED, exit=0, files={"messages": path}))
    return TestResult(name, tmp_path / "t.yaml", status, tmp_path, steps=steps)


# --------------------------------------------------------------------------
# reading sipp's trace and the keeper's log
# --------------------------------------------------------------------------


def test_trace_blocks_become_messages_with_their_direction_size_and_label() -> None:
    sent, received = parse_trace(REGISTER_TRACE.encode(), "register")
    assert (sent.direction, sent.transport, sent.size, sent.label) == ("sent", "TCP", 353, "REGISTER")
    assert (received.direction, received.size, received.label) == ("received", 399, "200 OK (REGISTER)")
    assert sent.when is not None and sent.when.microsecond == 413904
    assert "CSeq: 1 REGISTER" in sent.text and "\r" not in sent.text


def test_a_truncated_trace_keeps_what_was_written() -> None:
    whole = REGISTER_TRACE + block("20:54:51.000000", "TCP message sent (353 bytes):", REGISTER)
    cut_in_body = whole[: whole.rindex("CSeq")]
    assert [m.label for m in parse_trace(cut_in_body.encode(), "s")] == ["REGISTER", "200 OK (REGISTER)", "REGISTER"]
    cut_in_head = whole[: whole.rindex("TCP message sent") + 7]
    assert [m.label for m in parse_trace(cut_in_head.encode(), "s")] == ["REGISTER", "200 OK (REGISTER)"]
    assert parse_trace(SEPARATOR[:20].encode(), "s") == []
    assert parse_trace(b"garbage\n" + SEPARATOR.encode() + b" not a date\nnor a head\n", "s") == []


def test_a_forged_block_inside_a_message_stays_in_that_message() -> None:
    forged = block("20:54:50.9", "TCP message received [5] bytes :", "BYE x SIP/2.0")
    body = OK_REGISTER + "\r\n" + forged
    trace = block("20:54:50.5", f"TCP message received [{len(body.encode())}] bytes :", body)
    (message,) = parse_trace((trace + REGISTER_TRACE).encode()[: len(trace)], "s")
    assert message.label == "200 OK (REGISTER)" and "BYE x SIP/2.0" in message.text
    assert [m.label for m in parse_trace((trace + REGISTER_TRACE).encode(), "s")] == [
        "200 OK (REGISTER)",
        "REGISTER",
        "200 OK (REGISTER)",
    ]
    # a size sipp counted otherwise: the message ends at the next separator
    wrong = block("20:54:50.5", "TCP message received [9999] bytes :", OK_REGISTER) + REGISTER_TRACE
    assert [m.label for m in parse_trace(wrong.encode(), "s")] == ["200 OK (REGISTER)", "REGISTER", "200 OK (REGISTER)"]


def test_leases_are_read_with_their_end_and_matched_to_the_step_they_cover() -> None:
    first, second = parse_leases(KEEPER_LOG + "2026-12-07 junk line\n")
    assert (first.pid, first.connections) == (20, "127.0.0.1:43860->127.0.0.1:5060/tcp")
    assert first.end is not None and second.end is not None and first.end < second.start
    assert lease_of(parse_trace(REGISTER_TRACE.encode(), "register"), [first, second]) is first
    assert lease_of(parse_trace(ANSWER_TRACE.encode(), "answer"), [first, second]) is second
    assert lease_of(parse_trace(CALL_TRACE.encode(), "call"), [first, second]) is None  # UDP: nothing kept
    # two leases that cover the same messages: the page says it cannot tell, not a guess
    twin = Lease(22, "127.0.0.1:1->127.0.0.1:5060/tcp", second.start, second.end)
    assert lease_of(parse_trace(ANSWER_TRACE.encode(), "answer"), [second, twin]) is None


def test_each_arrow_names_its_step_and_connection(tmp_path: Path) -> None:
    result = make_result(tmp_path, {"register": REGISTER_TRACE, "answer": ANSWER_TRACE, "call": CALL_TRACE})
    ladder = report.ladder_of(result)
    assert ladder.steps == ["register", "answer", "call"]
    assert [(m.step, m.label) for m in ladder.messages] == [
        ("register", "REGISTER"),
        ("register", "200 OK (REGISTER)"),
        ("call", "INVITE"),
        ("answer", "INVITE"),
    ]
    kept = "kept 127.0.0.1:43860->127.0.0.1:5060/tcp"
    assert [m.connection for m in ladder.messages] == [kept, kept, "udp, not kept", kept]
    # the keeper's events between the arrows: the connection held between the two runs
    rows = [row.text if isinstance(row, report.KeeperNote) else f"{row.step} {row.label}" for row in ladder.rows]
    assert rows == [
        "keeper: opened 127.0.0.1:43860->127.0.0.1:5060/tcp",
        "keeper leases 127.0.0.1:43860->127.0.0.1:5060/tcp to register",
        "register REGISTER",
        "register 200 OK (REGISTER)",
        "register ended: the keeper holds its connection(s)",
        "keeper leases 127.0.0.1:43860->127.0.0.1:5060/tcp to answer",
        "call INVITE",
        "answer INVITE",
        "answer ended: the keeper holds its connection(s)",
    ]


# --------------------------------------------------------------------------
# hostile input: escaped, control characters removed, bounded
# --------------------------------------------------------------------------


def test_markup_from_the_sut_and_control_characters_in_names_are_escaped(tmp_path: Path) -> None:
    hostile = "SIP/2.0 200 <script>alert(1)</script>\r\nX-Evil: <img src=x onerror=alert(2)>\x00\x1b[31m\r\n"
    result = make_result(
        tmp_path, {"reg\x00<b>ister\x1b": block("20:54:50.5", "TCP message received [9] bytes :", hostile)}
    )
    result.name = "na\x00me\x1b[2J<script>alert(3)</script>"
    result.steps[0].status, result.steps[0].reasons = FAILED, ["exit 1 <i>bad</i>\x07"]
    page = render_report([result])
    assert page.count("<script") == 1  # the page's own
    assert "<img" not in page and "<b>" not in page and "<i>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=x onerror=alert(2)&gt;" in page
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f]", page)
    assert "name[2J&lt;script&gt;alert(3)" in page and "reg&lt;b&gt;ister" in page


def test_a_failed_step_is_red_with_its_cause_and_a_stopped_one_says_so(tmp_path: Path) -> None:
    result = make_result(tmp_path, {"register": REGISTER_TRACE, "answer": ANSWER_TRACE}, status=FAILED)
    failed, stopped = result.steps
    failed.status, failed.exit, failed.reasons = FAILED, 2, ["exit status 2, expected 0"]
    failed.err = tmp_path / "register.err"
    failed.err.write_text("fdkeeper: the SuT at 127.0.0.1:5060/tcp refused the connection <ECONNREFUSED>\n")
    stopped.status, stopped.exit = SKIPPED, -15
    page = render_report([result])
    row = re.search(r'<tr class="failed"><td>register</td><td>failed</td>.*?</tr>', page, re.DOTALL)
    assert row, page
    assert "refused the connection &lt;ECONNREFUSED&gt;\nexit status 2, expected 0" in row.group()
    assert '<tr class="skipped"><td>answer</td><td>stopped</td>' in page
    assert '<text class="lanetitle failed"' in page and 'class="arrow failed"' in page


def test_huge_bodies_and_many_messages_are_cut_with_a_marker(tmp_path: Path) -> None:
    huge = "MESSAGE sip:x SIP/2.0\r\n" + "A" * (report.MAX_BODY * 10)
    small = block("20:54:50.6", "TCP message sent (9 bytes):", "OPTIONS sip:x SIP/2.0\r\n")
    many = block("20:54:50.5", "TCP message sent (9 bytes):", huge) + small * (report.MAX_MESSAGES + 6)
    page = render_report([make_result(tmp_path, {"flood": many})])
    assert "7 more message(s) not shown" in page
    assert f"{len(huge) - 1 - report.MAX_BODY} more characters not shown" in page  # less its CR
    assert len(page) < report.MAX_MESSAGES * (report.MAX_BODY + 2000)


def test_a_trace_longer_than_the_limit_is_read_in_part(tmp_path: Path) -> None:
    path = tmp_path / "long.log"
    path.write_bytes(b"x" * 100 + b"\xff\xfe")
    assert read_limited(path, 50) == (b"x" * 50, True)
    assert read_limited(path, 200)[1] is False
    assert read_limited(tmp_path / "absent.log") == (b"", False)


# --------------------------------------------------------------------------
# a real run, its page loaded in headless chromium
# --------------------------------------------------------------------------


class ShownLadder(HTMLParser):
    """The ladder as the browser shows it: its lane titles, and its rows in order, an arrow as
    {"step", "label", "conn"} and a keeper event as {"note"}."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, str]] = []
        self.lanes: list[str] = []
        self._field: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {key: value or "" for key, value in attrs}
        classes = attributes.get("class", "").split()
        if tag == "g" and "msg" in classes:
            self.rows.append({"step": attributes.get("data-step", ""), "label": "", "conn": ""})
        elif tag == "g" and "keeper" in classes:
            self.rows.append({"note": ""})
        elif tag == "text" and classes and classes[0] in ("label", "conn", "lanetitle", "note"):
            self._field = classes[0]

    def handle_data(self, data: str) -> None:
        if self._field == "lanetitle":
            self.lanes.append(data)
        elif self._field and self.rows:
            self.rows[-1][self._field] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "text":
            self._field = None

    def position(self, **wanted: str) -> int:
        """The first row that holds every ``wanted`` field (a prefix of its text)."""
        for number, row in enumerate(self.rows):
            if all(row.get(key, "\0").startswith(value) for key, value in wanted.items()):
                return number
        raise AssertionError(f"the page shows no row {wanted}: {self.rows}")


def browser_dom(page: Path) -> str:
    """The page's DOM after its script ran, as Debian's chromium renders it."""
    chromium = shutil.which("chromium")
    assert chromium, "chromium is missing: the HTML report is checked in a real browser (apt-get install chromium)"
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_page_of_a_real_run_shows_the_call_reaching_the_second_run(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    example = REPO / "docs" / "examples" / "register-answer-tcp.yaml"
    run = subprocess.run(
        [sys.executable, "-m", "fdkeeper", "run", str(example), "--html", str(page), "--logs", str(tmp_path / "logs")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    dom = browser_dom(page)
    assert 'data-script="ran"' in dom  # the page's script ran under its own Content-Security-Policy
    shown = ShownLadder()
    shown.feed(dom)
    assert shown.lanes == ["register", "answer", "call", "SuT"]
    register = shown.rows[shown.position(step="register", label="REGISTER")]["conn"]
    kept = re.search(r"kept (127\.0\.0\.1:\d+->127\.0\.0\.1:\d+/tcp)", register)
    assert kept, f"the REGISTER arrow names no kept connection: {register!r}"
    connection = kept.group(1)
    # register over the kept connection, the keeper holding it once register ended, the
    # answer run leasing it, and the call (plain UDP) reaching answer over it
    order = [
        shown.position(note=f"keeper leases {connection} to register"),
        shown.position(step="register", label="REGISTER"),
        shown.position(step="register", label="200 OK (REGISTER)", conn=f"register received · kept {connection}"),
        shown.position(note="register ended: the keeper holds its connection(s)"),
        shown.position(note=f"keeper leases {connection} to answer"),
        shown.position(step="call", label="INVITE", conn="call sent · udp, not kept"),
        shown.position(step="answer", label="INVITE", conn=f"answer received · kept {connection}"),
        shown.position(step="answer", label="200 OK (INVITE)", conn=f"answer sent · kept {connection}"),
    ]
    assert order == sorted(order), shown.rows
    assert not any(row.get("step") == "register" and row["label"] == "INVITE" for row in shown.rows)
    assert "sipp statistics of answer" in dom
