"""Starting each step of a test when its ordering allows, and collecting the verdicts.

A step starts once every step it names in
- `after:` has finished and passed,
- `started:` has its process started,
- `ready:` is ready to receive (fdkeeper.readiness: its sipp holds the keeper's lease
  and listens),
and then `wait:` more seconds have passed (at most ``MAX_WAIT``, whatever the file says).
A step whose ordering can no longer be met (the step it waits for was skipped or ended
before it was ready) is skipped, with the reason. A step that outlives its `timeout:` is
killed and fails. The first failed step fails the test: the steps still running are
stopped and the others skipped. A cancelled run (fdkeeper.testrun.interrupt) does the
same at the next poll, with the signal as the reason.
Single-threaded: one loop polls the running processes every ``POLL`` seconds.
"""

from __future__ import annotations

import time

from fdkeeper import readiness
from fdkeeper.testrun import interrupt
from fdkeeper.testrun.console import Console
from fdkeeper.testrun.model import MAX_SECONDS, Step, TestSpec
from fdkeeper.testrun.results import FAILED, PASSED, SKIPPED, StepResult
from fdkeeper.testrun.steps import STOP_GRACE, StepContext, StepRun, stop_groups

POLL = 0.05
MAX_WAIT = MAX_SECONDS  # the test file's checks refuse more; a Step built in code is held to it here


def bounded_wait(seconds: float) -> float:
    """A step's `wait:` as the scheduler keeps it: 0 for zero, negative or NaN, at most MAX_WAIT
    (so no number, 1e10 or inf, makes a test wait for ever)."""
    if not seconds > 0:
        return 0.0
    return min(seconds, MAX_WAIT)


class Scheduler:
    def __init__(self, spec: TestSpec, context: StepContext, console: Console) -> None:
        self.spec = spec
        self.context = context
        self.console = console
        self.pending: list[Step] = list(spec.steps)
        self.running: dict[str, StepRun] = {}
        self.finished: dict[str, StepResult] = {}
        self.ready: set[str] = set()
        self.start_at: dict[str, float] = {}  # when a step's ordering was met, plus its wait
        self.awaited_ready = {name for step in spec.steps for name in step.ready}

    def run(self) -> list[StepResult]:
        """Run every step; return their results in the file's order."""
        try:
            while self.pending or self.running:
                if interrupt.requested():
                    self._stop_everything(
                        interrupt.stopped_reason(), interrupt.not_run_reason(), interrupt.CANCEL_GRACE
                    )
                    break
                self._watch_running()
                self._start_what_can_start()
                self.console.running(self.running)
                time.sleep(POLL)
        finally:  # only on an exception: stop what still runs
            stop_groups(list(self.running.values()), interrupt.CANCEL_GRACE)
        return [self.finished[step.name] for step in self.spec.steps]

    def _watch_running(self) -> None:
        for name, run in list(self.running.items()):
            if name not in self.running:  # an earlier one failed, and the test stopped it
                continue
            if (
                name in self.awaited_ready
                and name not in self.ready
                and readiness.is_ready(run.pid, self.context.keeper_dir)
            ):
                self.ready.add(name)
                self.console.step_ready(self.spec.name, name)
            run.check_timeout()
            if run.poll() is not None:
                del self.running[name]
                self._finish(run.result())

    def _start_what_can_start(self) -> None:
        now = time.monotonic()
        for step in list(self.pending):
            if step not in self.pending:  # a step that could not start failed the test: the rest is skipped
                continue
            blocked, impossible = self._ordering(step)
            if impossible:
                self.pending.remove(step)
                self._finish(StepResult(step.name, SKIPPED, [impossible]))
                continue
            if blocked:
                continue
            start_at = self.start_at.setdefault(step.name, now + bounded_wait(step.wait))
            if now >= start_at:
                self.pending.remove(step)
                self._start(step)

    def _start(self, step: Step) -> None:
        try:
            run = StepRun(step, self.context)
        except (OSError, ValueError) as error:
            self._finish(StepResult(step.name, FAILED, [f"could not start: {error}"]))
            return
        self.running[step.name] = run
        self.console.step_started(self.spec.name, step.name, run.pid)

    def _finish(self, result: StepResult) -> None:
        self.finished[result.name] = result
        self.console.step_finished(self.spec.name, result)
        if result.status == FAILED:
            self._abort(result.name)

    def _abort(self, failed: str) -> None:
        """A failed step fails the test: stop what still runs (a server run would wait
        for calls until its timeout) and skip what has not started."""
        self._stop_everything(f"stopped: step '{failed}' failed", f"not run: step '{failed}' failed", STOP_GRACE)

    def _stop_everything(self, stopped_reason: str, not_run_reason: str, grace: float) -> None:
        """Stop the running steps' process groups together (each skipped with
        ``stopped_reason``, keeping its exit status and output) and skip every pending step."""
        runs, self.running = self.running, {}
        stop_groups(list(runs.values()), grace)
        for name, run in runs.items():
            stopped = run.result()
            stopped.status, stopped.reasons = SKIPPED, [stopped_reason]
            self.finished[name] = stopped
            self.console.step_finished(self.spec.name, stopped)
        for step in self.pending:
            self.finished[step.name] = StepResult(step.name, SKIPPED, [not_run_reason])
            self.console.step_finished(self.spec.name, self.finished[step.name])
        self.pending.clear()

    def _ordering(self, step: Step) -> tuple[bool, str | None]:
        """(still blocked, why it never can start); both false/None: it may start."""
        blocked = False
        for name in step.after:
            done = self.finished.get(name)
            if done is None:
                blocked = True
            elif done.status != PASSED:
                return True, f"'{name}' {done.status}, and this step runs after it"
        for name in step.started:
            if name in self.running or name in self.finished:
                if self.finished.get(name) and self.finished[name].status == SKIPPED:
                    return True, f"'{name}' was skipped, and this step waits for it to start"
            else:
                blocked = True
        for name in step.ready:
            if name in self.ready:
                continue
            if name in self.finished:
                return True, f"'{name}' ended before it was ready to receive, and this step waits for that"
            blocked = True
        return blocked, None
