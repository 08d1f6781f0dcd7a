"""One test from start to end: its log folder, its SuT, its own keeper, its steps.

The keeper's state directory is a fresh short temporary directory per test (its control
socket path must fit in 108 bytes), stopped with `fdkeeper stop --dir` after the test
whatever happened; its log is copied into the test's log folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fdkeeper.statedir import LOG_NAME
from fdkeeper.testbed import SCENARIOS_DIR, free_port
from fdkeeper.testrun import logs, variables
from fdkeeper.testrun.console import Console
from fdkeeper.testrun.model import TestSpec
from fdkeeper.testrun.results import ERROR, FAILED, PASSED, XFAILED, XPASSED, StepResult, TestResult
from fdkeeper.testrun.scheduler import Scheduler
from fdkeeper.testrun.steps import StepContext
from fdkeeper.testrun.sut import sut_variables


def run_test(spec: TestSpec, run_dir: Path, sipp: str, console: Console) -> TestResult:
    """Run one test; never raises for what goes wrong in it (that is its result)."""
    log_dir = logs.folder_for_test(run_dir, spec.name)
    console.test_started(spec.name, os.fspath(spec.path))
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="fdkr-"))
    result = TestResult(spec.name, spec.path, ERROR, log_dir, xfail=spec.xfail)
    try:
        result.steps = _run_steps(spec, log_dir, workdir, sipp, console)
        result.status = PASSED if all(s.status == PASSED for s in result.steps) else FAILED
    except Exception as error:  # the SuT or a variable; the report says it, the next test runs
        result.error = f"could not run: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
    finally:
        stop_keeper(workdir / "keeper", log_dir / "keeper.log")
        shutil.rmtree(workdir, ignore_errors=True)
    if spec.xfail and result.status in (FAILED, ERROR):
        result.status = XFAILED
    elif spec.xfail:
        result.status = XPASSED
    result.duration = time.monotonic() - started
    console.test_finished(result)
    return result


def _run_steps(spec: TestSpec, log_dir: Path, workdir: Path, sipp: str, console: Console) -> list[StepResult]:
    ports: dict[str, int] = {}

    def port_for(label: str) -> int:
        return ports.setdefault(label, free_port())

    with sut_variables(spec.sut, spec.transport, workdir, log_dir) as sut_values:
        values = {
            "here": os.fspath(spec.path.resolve().parent),
            "scenarios": os.fspath(SCENARIOS_DIR),
            "logs": os.fspath(log_dir.resolve()),
            "keeper_dir": os.fspath(workdir / "keeper"),
            "sipp": sipp,
            "test": spec.name,
            **sut_values,
        }
        variables.resolve_declared(spec.vars, values, port_for)
        context = StepContext(
            here=spec.path.resolve().parent,
            logs=log_dir.resolve(),
            keeper_dir=workdir / "keeper",
            sipp=sipp,
            values=values,
            free_port=port_for,
        )
        return Scheduler(spec, context, console).run()


def stop_keeper(keeper_dir: Path, kept_log: Path) -> None:
    """`fdkeeper stop --dir` (also ends converters), then keep the keeper's log at ``kept_log``."""
    if keeper_dir.exists():
        subprocess.run(
            [sys.executable, "-m", "fdkeeper", "stop", "--dir", os.fspath(keeper_dir)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            start_new_session=True,  # a second Ctrl-C at the terminal during cleanup must not cut it short
        )
        try:
            shutil.copyfile(keeper_dir / LOG_NAME, kept_log)
        except OSError:
            pass
