"""Starting each step of a test when its ordering allows, and collecting the verdicts.

A step starts once every step it names in
- `after:` has finished and passed,
- `started:` has its process started,
- `ready:` is ready to receive (fdkeeper.readiness: its sipp holds the keeper's lease
  and listens),
and then `wait:` more seconds have passed. A step whose ordering can no longer be met
(the step it waits for was skipped or ended before it was ready) is skipped, with the
reason. A step that outlives its `timeout:` is killed and fails. The first failed step
fails the test: the steps still running are stopped and the others skipped.
Single-threaded: one loop polls the running processes every ``POLL`` seconds.
"""

from __future__ import annotations

import time

from fdkeeper import readiness
from fdkeeper.testrun.console import Console
from fdkeeper.testrun.model import Step, TestSpec
from fdkeeper.testrun.results import FAILED, PASSED, SKIPPED, StepResult
from fdkeeper.testrun.steps import StepContext, StepRun

POLL = 0.05


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
                self._watch_running()
                self._start_what_can_start()
                self.console.running(self.running)
                time.sleep(POLL)
        finally:
            for run in self.running.values():  # only on an interruption: stop what still runs
                run.stop()
        return [self.finished[step.name] for step in self.spec.steps]

    def _watch_running(self) -> None:
        for name, run in list(self.running.items()):
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
            blocked, impossible = self._ordering(step)
            if impossible:
                self.pending.remove(step)
                self._finish(StepResult(step.name, SKIPPED, [impossible]))
                continue
            if blocked:
                continue
            start_at = self.start_at.setdefault(step.name, now + step.wait)
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
        reason = f"stopped: step '{failed}' failed"
        for name, run in list(self.running.items()):
            del self.running[name]
            run.stop()
            stopped = run.result()
            stopped.status, stopped.reasons = SKIPPED, [reason]
            self.finished[name] = stopped
            self.console.step_finished(self.spec.name, stopped)
        for step in self.pending:
            self.finished[step.name] = StepResult(step.name, SKIPPED, [reason])
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
