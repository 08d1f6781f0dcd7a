"""One step of a test as a process: its command line, its log files, its verdict.

A `sipp` step runs `fdkeeper sipp --dir <the test's keeper dir>` with sipp's trace options
added (each only when the step does not give it itself), so its statistics, screen,
errors and messages land in the test's log folder next to `<step>.out` and `<step>.err`.
A `command` step runs its command as it is. Both run in the test file's directory, in
a session and process group of their own: stopping a step (a timeout, a failed step, a
cancelled run) signals that whole group, so `fdkeeper sipp`, its sipp and anything a
command started end together, and a Ctrl-C meant for the runner never reaches them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from fdkeeper.testbed import fdkeeper_command, read_sipp_stats
from fdkeeper.testrun import logs, variables
from fdkeeper.testrun.model import Step
from fdkeeper.testrun.results import FAILED, PASSED, StepResult, read_text

STOP_GRACE = 5.0  # seconds between SIGTERM (sipp still writes its statistics) and SIGKILL
REAP_TIMEOUT = 5.0  # seconds to wait for a SIGKILLed process to be reaped
POLL = 0.05


@dataclass
class StepContext:
    """What every step of one test shares."""

    here: Path  # the test file's directory: the steps' working directory
    logs: Path  # the test's log folder
    keeper_dir: Path
    sipp: str
    values: dict[str, str]
    free_port: Callable[[str], int]
    substitute: bool = True  # False: arguments are taken literally (the pytest plugin)

    def expand(self, tokens: list[str]) -> list[str]:
        if not self.substitute:
            return list(tokens)
        return [variables.substitute(token, self.values, self.free_port) for token in tokens]


class StepRun:
    """A started step."""

    def __init__(self, step: Step, context: StepContext) -> None:
        self.step = step
        self.out = context.logs / f"{step.name}.out"
        self.err = context.logs / f"{step.name}.err"
        self.files: dict[str, Path] = {}
        self.command = self._command(context)
        self.timed_out = False
        self.started_at = time.monotonic()
        with logs.create_log_file(self.out) as out, logs.create_log_file(self.err) as err:  # through no link
            self.process = subprocess.Popen(
                self.command,
                cwd=context.here,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=_environment(context),
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def _command(self, context: StepContext) -> list[str]:
        args = context.expand(self.step.args)
        if self.step.kind == "command":
            return args
        trace, files = trace_options(args, context.logs, self.step.name)
        self.files = {kind: context.here / path for kind, path in files.items()}  # sipp runs in `here`
        return fdkeeper_command([context.sipp, *trace, *args], context.keeper_dir, *context.expand(self.step.options))

    def elapsed(self) -> float:
        return time.monotonic() - self.started_at

    def progress(self) -> str:
        """How far the step is: its time and, for sipp, the calls counted so far."""
        text = f"{self.elapsed():.0f} s"
        if self.step.kind == "sipp":
            successful, failed = sipp_counts(self.files.get("stat"), None)
            if successful is not None:
                text += f", {successful} ok, {failed} failed"
        return text

    def poll(self) -> int | None:
        return self.process.poll()

    def check_timeout(self) -> bool:
        """Kill the step when its time is up; True when it was."""
        if self.process.poll() is None and self.elapsed() > self.step.timeout:
            self.timed_out = True
            self.stop()
        return self.timed_out

    def stop(self, grace: float = STOP_GRACE) -> None:
        """End the step's whole process group (see stop_groups)."""
        stop_groups([self], grace)

    def signal_group(self, signum: int) -> None:
        """Send ``signum`` to every process of the step's group (gone already: nothing to do)."""
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass

    def group_alive(self) -> bool:
        """Whether any process of the step's group still runs (its leader reaped first)."""
        self.process.poll()
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # a member we may not signal: look at the members
            pass
        return group_has_live_member(self.process.pid)

    def result(self) -> StepResult:
        """The verdict of a finished step against what it expects."""
        status = self.process.wait()
        result = StepResult(
            self.step.name,
            PASSED,
            exit=status,
            duration=self.elapsed(),
            out=self.out,
            err=self.err,
            command=self.command,
            files=dict(self.files),
        )
        if self.step.kind == "sipp":
            result.successful, result.failed = sipp_counts(self.files.get("stat"), self.files.get("screen"))
        result.reasons = self._failures(result)
        result.status = FAILED if result.reasons else PASSED
        return result

    def _failures(self, result: StepResult) -> list[str]:
        expect = self.step.expect
        if self.timed_out:
            return [f"timed out after {self.step.timeout:g} s (killed)"]
        reasons = []
        if result.exit != expect.exit:
            reasons.append(f"exit status {_status_text(result.exit)}, expected {expect.exit}")
        wanted = {"successful": expect.successful, "failed": expect.failed}
        got = {"successful": result.successful, "failed": result.failed}
        checked = {label: count for label, count in wanted.items() if count is not None}
        if checked and result.successful is None:
            reasons.append("no call statistics from sipp (neither its -trace_stat file nor its screen)")
            return reasons
        reasons += [
            f"{got[label]} {label} calls, expected {count}" for label, count in checked.items() if got[label] != count
        ]
        return reasons


def group_has_live_member(pgid: int) -> bool:
    """Whether a process of group ``pgid`` runs. Zombies do not count: where pid 1 does not
    reap (some containers), the members a stop killed stay as zombies, and stay in the group."""
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except ProcessLookupError:  # ended meanwhile
            continue
    return False


def stop_groups(runs: Sequence[StepRun], grace: float) -> None:
    """End the process groups of ``runs`` together: SIGTERM to each group (sipp writes its
    final statistics), then, ``grace`` seconds later at most, SIGKILL to whatever is left of
    each (a child its leader left behind too); every leader reaped. Bounded: at most
    ``grace`` plus the reaping, however many runs."""
    for run in runs:
        run.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(run.group_alive() for run in runs) and time.monotonic() < deadline:
        time.sleep(POLL)
    for run in runs:
        run.signal_group(signal.SIGKILL)
        try:
            run.process.wait(REAP_TIMEOUT)
        except subprocess.TimeoutExpired:  # not met: SIGKILL cannot be refused
            pass


def _status_text(status: int | None) -> str:
    if status is not None and status < 0:
        return f"{status} (killed by {signal.Signals(-status).name})"
    return str(status)


def _environment(context: StepContext) -> dict[str, str]:
    """The runner's environment, with this test's keeper and fdkeeper's own bin dir first
    on PATH (a command step's `fdkeeper` is the one running the test)."""
    bin_dir = os.path.dirname(sys.executable)
    return {
        **os.environ,
        "FDKEEPER_DIR": os.fspath(context.keeper_dir),
        "FDKEEPER_SIPP": context.sipp,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", os.defpath),
    }


# sipp's trace options: (kind, switch, file option, file suffix). Each is added unless given.
_TRACES = (
    ("stat", "-trace_stat", "-stf", "stat.csv"),
    ("screen", "-trace_screen", "-screen_file", "screen.log"),
    ("errors", "-trace_err", "-error_file", "errors.log"),
    ("messages", "-trace_msg", "-message_file", "messages.log"),
)


def trace_options(args: list[str], logs: Path, name: str) -> tuple[list[str], dict[str, Path]]:
    """The options that make a sipp run terminal-less and write its traces to ``logs``, and
    where each trace will be by kind (stat, screen, errors, messages; the step's own file
    when it names one)."""
    added = [] if "-nostdin" in args else ["-nostdin"]
    files: dict[str, Path] = {}
    for kind, switch, file_option, suffix in _TRACES:
        if file_option in args:
            position = args.index(file_option) + 1
            if position < len(args):
                files[kind] = Path(args[position])
            continue
        files[kind] = logs / f"{name}.{suffix}"
        added += [switch, file_option, os.fspath(files[kind])]
    if "-fd" not in args:
        added += ["-fd", "1"]  # statistics every second, so a killed run still left some
    return added, files


def sipp_counts(stat_file: Path | None, screen_file: Path | None) -> tuple[int | None, int | None]:
    """(successful, failed) calls from sipp's -trace_stat file, else its final screen."""
    stats = read_sipp_stats(stat_file) if stat_file else {}
    if stats:
        try:
            return int(stats.get("SuccessfulCall(C)") or 0), int(stats.get("FailedCall(C)") or 0)
        except ValueError:
            pass
    return screen_counts(read_text(screen_file))


_SCREEN_LINE = re.compile(r"^\s*(Successful|Failed) call\s*\|.*\|\s*(\d+)\s*$", re.MULTILINE)


def screen_counts(text: str) -> tuple[int | None, int | None]:
    """(successful, failed) from sipp's screen (the last, cumulative column of its last report)."""
    found: dict[str, int] = {}
    for match in _SCREEN_LINE.finditer(text):
        found[match.group(1)] = int(match.group(2))
    if not found:
        return None, None
    return found.get("Successful", 0), found.get("Failed", 0)
