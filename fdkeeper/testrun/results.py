"""What a run found: the verdict of each step (StepResult) and of each test (TestResult), and
the statuses they take. Plain data read by the console, the JUnit report, the HTML report and
the pytest plugin; it imports nothing of the runner, so everything that reports can import it."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from fdkeeper.testrun.cause import step_cause

# A step's status: passed, failed, skipped (a step it needed failed, or could never start, or
# the runner stopped it while it ran: see StepResult.stopped).
PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
# A test's status besides passed and failed: error (could not run: e.g. the SuT did not start),
# xfailed (failed, as its `xfail:` said it would), xpassed (passed despite `xfail:`).
ERROR, XFAILED, XPASSED = "error", "xfailed", "xpassed"


TAIL_BYTES = 64 * 1024  # what reports read of a log's end: many lines, never a whole long run's log


def read_text(path: Path | None, last_bytes: int | None = None) -> str:
    """A step's log file as text (only its last ``last_bytes`` when given); "" when there is
    none or it cannot be read (a report still prints)."""
    if not path:
        return ""
    try:
        with open(path, "rb") as file:
            if last_bytes is not None and file.seek(0, 2) > last_bytes:
                file.seek(-last_bytes, 2)
            else:
                file.seek(0)
            return file.read().decode(errors="replace")
    except OSError:
        return ""


def last_lines(path: Path | None, lines: int) -> str:
    """The last ``lines`` lines of a log file, without trailing blank space ("" when none)."""
    return "\n".join(read_text(path, TAIL_BYTES).rstrip().splitlines()[-lines:])


@dataclass
class StepResult:
    name: str
    status: str  # passed, failed or skipped
    reasons: list[str] = field(default_factory=list)
    exit: int | None = None
    successful: int | None = None
    failed: int | None = None
    duration: float = 0.0
    out: Path | None = None
    err: Path | None = None
    command: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)  # sipp's traces: stat, screen, errors, messages

    @property
    def ok(self) -> bool:
        return self.status == PASSED

    @property
    def stopped(self) -> bool:
        """A step the runner ended while it ran (another step failed, or the run was cancelled):
        it started (it has an exit status) but was not let finish, so its verdict is not its own."""
        return self.status == SKIPPED and self.exit is not None

    @cached_property
    def cause(self) -> str:
        """Why a failed step failed, in one to a few lines read from its logs ("" when they
        say nothing more than the reasons, and for a step that did not fail). Read once, when
        first asked: the console asks as the step ends, the reports later get the same text."""
        if self.status != FAILED:
            return ""
        stderr, sipp_errors = read_text(self.err, TAIL_BYTES), read_text(self.files.get("errors"), TAIL_BYTES)
        return step_cause(stderr, sipp_errors, self.exit)

    def why(self) -> str:
        """One line: the cause's first line, else the reasons (what the verdict checked)."""
        return self.cause.split("\n", 1)[0] if self.cause else "; ".join(self.reasons)

    def tail(self, lines: int = 20) -> str:
        """The last lines of the step's stdout and stderr, for reports."""
        parts = []
        for label, path in (("stdout", self.out), ("stderr", self.err)):
            text = last_lines(path, lines)
            if text:
                parts.append(f"--- {label} ({path}) ---\n{text}")
        return "\n".join(parts) or "(no output)"

    def counts(self) -> str:
        if self.successful is None:
            return ""
        return f"{self.successful} successful, {self.failed} failed"


@dataclass
class TestResult:
    name: str
    path: Path
    status: str
    log_dir: Path
    steps: list[StepResult] = field(default_factory=list)
    duration: float = 0.0
    error: str | None = None  # why the test could not run
    xfail: str | None = None

    __test__ = False

    @property
    def ok(self) -> bool:
        return self.status in (PASSED, XFAILED, XPASSED)

    def failed_steps(self) -> list[StepResult]:
        return [step for step in self.steps if step.status == FAILED]

    def message(self) -> str:
        """One line: why the test did not pass."""
        if self.error:
            return self.error
        failing = [f"step '{s.name}': {s.why()}" for s in self.failed_steps()]
        failing = failing or [
            f"step '{s.name}' skipped: {'; '.join(s.reasons)}" for s in self.steps if s.status != PASSED
        ]
        text = "; ".join(failing)
        return f"expected failure ({self.xfail}): {text}" if self.status == XFAILED else text
