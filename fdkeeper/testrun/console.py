"""What `fdkeeper run` prints: a line when a step starts, becomes ready and ends, and a
summary at the end. On a terminal, one more line shows the running steps and their time,
rewritten in place; in a CI log (not a terminal) only the event lines appear.

Under a failed step, its reasons and then its cause (StepResult.cause: fdkeeper's own line,
sipp's last errors and the message it did not expect), so the log folder is needed only for
more. A step the runner stopped says "stopped". Names and causes are printed with their
control characters escaped: a test name or a peer's message cannot rewrite the terminal.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from fdkeeper.testrun.results import FAILED, PASSED, SKIPPED, XPASSED, StepResult, TestResult
from fdkeeper.testrun.steps import StepRun
from fdkeeper.textsafe import escape_controls

_MARKS = {PASSED: "ok", FAILED: "FAIL", SKIPPED: "skip"}
STOPPED_MARK = "stopped"
REFRESH = 0.5


class Console:
    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self._live_shown = False
        self._last_refresh = 0.0

    def say(self, line: str) -> None:
        self._clear_live()
        print(line, file=self.stream, flush=True)

    def test_started(self, name: str, path: str) -> None:
        self.say(f"{escape_controls(name)} ({escape_controls(path)})")

    def step_started(self, test: str, step: str, pid: int) -> None:
        self.say(f"  {step}: started (pid {pid})")

    def step_ready(self, test: str, step: str) -> None:
        self.say(f"  {step}: ready to receive")

    def step_finished(self, test: str, result: StepResult) -> None:
        details = [f"exit {result.exit}"] if result.exit is not None and not result.stopped else []
        if result.counts():
            details.append(result.counts())
        if result.status != SKIPPED or result.stopped:
            details.append(f"{result.duration:.1f} s")
        mark = STOPPED_MARK if result.stopped else _MARKS[result.status]
        line = f"  {escape_controls(result.name)}: {mark}" + (f" ({', '.join(details)})" if details else "")
        lines = [line, *(f"    {escape_controls(reason)}" for reason in result.reasons)]
        for number, text in enumerate(result.cause.splitlines()):  # escaped already
            lines.append(f"    {'cause:' if number == 0 else '':6} {text}")
        self.say("\n".join(lines))

    def running(self, runs: dict[str, StepRun]) -> None:
        """On a terminal: one line of the running steps, how long each has run and, for
        sipp, its calls so far (sipp writes its statistics every second)."""
        now = time.monotonic()
        if not self.live or not runs or now - self._last_refresh < REFRESH:
            return
        self._last_refresh = now
        text = "  running: " + "; ".join(f"{name} {run.progress()}" for name, run in runs.items())
        self.stream.write("\r\033[K" + text)
        self.stream.flush()
        self._live_shown = True

    def _clear_live(self) -> None:
        if self._live_shown:
            self.stream.write("\r\033[K")
            self._live_shown = False

    def test_finished(self, result: TestResult) -> None:
        self.say(
            f"  => {escape_controls(result.name)}: {result.status.upper()}"
            f" ({result.duration:.1f} s; logs {escape_controls(str(result.log_dir))})"
        )

    def summary(self, results: list[TestResult]) -> None:
        self.say("")
        for result in results:
            why = f": {escape_controls(result.message())}" if result.status not in (PASSED, XPASSED) else ""
            self.say(f"{result.status.upper():8} {escape_controls(result.name)}{why}")
        counts: dict[str, int] = {}
        for result in results:
            counts[result.status] = counts.get(result.status, 0) + 1
        self.say(", ".join(f"{count} {status}" for status, count in counts.items()) or "no test ran")
