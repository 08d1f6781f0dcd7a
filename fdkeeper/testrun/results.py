"""What a run found: the verdict of each step (StepResult) and of each test (TestResult), and
the statuses they take. Plain data read by the console, the JUnit report and the pytest plugin;
it imports nothing of the runner, so everything that reports can import it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# A step's status: passed, failed, skipped (a step it needed failed, or could never start).
PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
# A test's status besides passed and failed: error (could not run: e.g. the SuT did not start),
# xfailed (failed, as its `xfail:` said it would), xpassed (passed despite `xfail:`).
ERROR, XFAILED, XPASSED = "error", "xfailed", "xpassed"


def read_text(path: Path | None) -> str:
    """A step's log file as text; "" when there is none or it cannot be read (a report still prints)."""
    try:
        return path.read_text(errors="replace") if path else ""
    except OSError:
        return ""


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

    def tail(self, lines: int = 20) -> str:
        """The last lines of the step's stdout and stderr, for reports."""
        parts = []
        for label, path in (("stdout", self.out), ("stderr", self.err)):
            text = read_text(path).rstrip()
            if text:
                parts.append(f"--- {label} ({path}) ---\n" + "\n".join(text.splitlines()[-lines:]))
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
        failing = [f"step '{s.name}': {'; '.join(s.reasons)}" for s in self.failed_steps()]
        failing = failing or [
            f"step '{s.name}' skipped: {'; '.join(s.reasons)}" for s in self.steps if s.status != PASSED
        ]
        text = "; ".join(failing)
        return f"expected failure ({self.xfail}): {text}" if self.status == XFAILED else text
