"""What `fdkeeper run` prints: a line when a step starts, becomes ready and ends, and a
summary at the end. On a terminal, one more line shows the running steps and their time,
rewritten in place; in a CI log (not a terminal) only the event lines appear."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from fdkeeper.testrun.results import FAILED, PASSED, SKIPPED, XPASSED, StepResult, TestResult
from fdkeeper.testrun.steps import StepRun

_MARKS = {PASSED: "ok", FAILED: "FAIL", SKIPPED: "skip"}
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
        self.say(f"{name} ({path})")

    def step_started(self, test: str, step: str, pid: int) -> None:
        self.say(f"  {step}: started (pid {pid})")

    def step_ready(self, test: str, step: str) -> None:
        self.say(f"  {step}: ready to receive")

    def step_finished(self, test: str, result: StepResult) -> None:
        details = [f"exit {result.exit}"] if result.exit is not None else []
        if result.counts():
            details.append(result.counts())
        if result.status != SKIPPED:
            details.append(f"{result.duration:.1f} s")
        line = f"  {result.name}: {_MARKS[result.status]}" + (f" ({', '.join(details)})" if details else "")
        self.say(line + "".join(f"\n    {reason}" for reason in result.reasons))

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
        self.say(f"  => {result.name}: {result.status.upper()} ({result.duration:.1f} s; logs {result.log_dir})")

    def summary(self, results: list[TestResult]) -> None:
        self.say("")
        for result in results:
            why = f": {result.message()}" if result.status not in (PASSED, XPASSED) else ""
            self.say(f"{result.status.upper():8} {result.name}{why}")
        counts: dict[str, int] = {}
        for result in results:
            counts[result.status] = counts.get(result.status, 0) + 1
        self.say(", ".join(f"{count} {status}" for status, count in counts.items()) or "no test ran")
