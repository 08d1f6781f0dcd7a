"""Cancelling `fdkeeper run`: SIGTERM (a CI timeout or cancel), SIGHUP (a closed terminal)
and SIGINT (Ctrl-C) become one request to stop, which the runner answers by cleaning up.

While `cancellable()` is active, the first of these signals is recorded and nothing is
raised: an exception could land between starting a process and recording it, and leave
that process behind. The scheduler checks the request at each poll and stops the running
steps' process groups (SIGTERM, SIGKILL after ``CANCEL_GRACE``); the test then stops its
keeper and SuT and removes its temporary directory as it does after any test; the tests not
started yet are reported as not run. Later signals are ignored, so a second Ctrl-C cannot
cut the cleanup short; every step of it is bounded. The run exits with 128 + the first
signal's number, as a shell reports a process that signal ended.

The request is process-wide state, as signals are.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from fdkeeper.process import FORWARDED_SIGNALS
from fdkeeper.testrun.model import TestSpec
from fdkeeper.testrun.results import ERROR, SKIPPED, StepResult, TestResult

CANCEL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL to the running steps of a cancelled run


@dataclass
class _Request:
    signum: int | None = None


_request = _Request()


def _record(signum: int, _frame: FrameType | None) -> None:
    if _request.signum is None:  # the first one counts; repeats are ignored
        _request.signum = signum


@contextlib.contextmanager
def cancellable() -> Iterator[None]:
    """While inside: SIGTERM, SIGHUP and SIGINT request a stop (see the module's text)."""
    _request.signum = None
    previous = {signum: signal.signal(signum, _record) for signum in FORWARDED_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def requested() -> bool:
    return _request.signum is not None


def signal_name() -> str:
    return signal.Signals(_request.signum).name if _request.signum is not None else ""


def exit_status() -> int:
    """128 + the signal's number: 143 for SIGTERM, 129 for SIGHUP, 130 for SIGINT."""
    return 128 + (_request.signum or 0)


def stopped_reason() -> str:
    return f"stopped: fdkeeper run got {signal_name()}"


def not_run_reason() -> str:
    return f"not run: fdkeeper run got {signal_name()}"


def not_run_test(spec: TestSpec, run_dir: Path) -> TestResult:
    """A test the cancelled run did not start: every step not run."""
    reason = not_run_reason()
    steps = [StepResult(step.name, SKIPPED, [reason]) for step in spec.steps]
    return TestResult(spec.name, spec.path, SKIPPED, run_dir, steps=steps, error=reason, xfail=spec.xfail)


def mark_interrupted(result: TestResult) -> None:
    """A test the cancel cut short is an error (not a failure of the SuT): its finished steps
    keep their verdicts, the stopped and the not started ones say so. A test that ended
    before the signal keeps its verdict."""
    reasons = {stopped_reason(), not_run_reason()}
    cut = [step.name for step in result.steps if step.status == SKIPPED and reasons.intersection(step.reasons)]
    if cut:
        result.status = ERROR
        result.error = f"interrupted: fdkeeper run got {signal_name()} (steps not finished: {', '.join(cut)})"
