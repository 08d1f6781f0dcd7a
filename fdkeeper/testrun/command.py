"""`fdkeeper run TEST...`: run test files, print a line per step and a summary, write JUnit.

Exit status: 0 when every test passed (an `xfail:` test that failed counts as expected),
1 when one failed, 2 for bad input: no test selected or no sipp (then nothing runs), or a
bad test file (one line, and an error entry of its own in the reports; the other files run).
143, 129 or 130 when SIGTERM, SIGHUP or SIGINT cancelled the run (fdkeeper.testrun.interrupt):
everything it started was stopped first.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from fdkeeper.errors import FdkeeperError
from fdkeeper.sipp.runner import find_sipp
from fdkeeper.testrun import interrupt, logs
from fdkeeper.testrun.console import Console
from fdkeeper.testrun.html import write_report
from fdkeeper.testrun.junit import write_junit
from fdkeeper.testrun.model import TestFileError, TestSpec, load_test
from fdkeeper.testrun.results import ERROR, TestResult
from fdkeeper.testrun.shard import Shard, shard_option
from fdkeeper.testrun.testcase import run_test

EXIT_PASSED, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def load_tests(paths: list[Path], selection: str | None) -> tuple[list[TestSpec], dict[Path, str]]:
    """Every test file, checked before any runs: the good ones (those -k selects), and the
    one line that says what is wrong with each bad one. TestFileError when none is selected."""
    specs, unloadable = [], {}
    for path in paths:
        try:
            specs.append(load_test(path))
        except TestFileError as error:
            unloadable[path] = str(error)
    if selection:
        specs = [spec for spec in specs if selection in spec.name or selection in str(spec.path)]
        if not specs:
            raise TestFileError("\n".join([*unloadable.values(), f"fdkeeper: no test matches -k {selection!r}"]))
    return specs, unloadable


def unloadable_result(path: Path, error: str, run_dir: Path) -> TestResult:
    """A test file that did not load, as a test that could not run (its own entry in the reports)."""
    return TestResult(path.stem, path, ERROR, run_dir, error=error)


def run_tests(
    specs: list[TestSpec],
    logs_base: Path,
    sipp: str,
    keep_logs: bool,
    junit: Path | None,
    console: Console,
    unloadable: dict[Path, str] | None = None,
    shard: Shard | None = None,
) -> list[TestResult]:
    run_dir = logs.new_run_dir(logs_base, keep_all=keep_logs)
    console.say(f"fdkeeper run: {len(specs)} test(s){f' (shard {shard})' if shard else ''}; logs in {run_dir}")
    started, clock = time.time(), time.monotonic()
    results = [unloadable_result(path, error, run_dir) for path, error in (unloadable or {}).items()]
    results += [run_unless_cancelled(spec, run_dir, sipp, console) for spec in specs]
    console.summary(results)
    if junit is not None:
        write_junit(junit, results, started, time.monotonic() - clock, shard=str(shard) if shard else None)
        console.say(f"JUnit report: {junit}")
    return results


def run_unless_cancelled(spec: TestSpec, run_dir: Path, sipp: str, console: Console) -> TestResult:
    """Run one test; once the run is cancelled, the test is reported as not run, and the one
    the cancel cut short as interrupted."""
    if interrupt.requested():
        return interrupt.not_run_test(spec, run_dir)
    result = run_test(spec, run_dir, sipp, console)
    if interrupt.requested():
        interrupt.mark_interrupted(result)
    return result


@click.command("run", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("tests", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--junit",
    type=click.Path(path_type=Path, dir_okay=False),
    metavar="FILE",
    help="Write a JUnit XML report: one test case per step, the test as its class.",
)
@click.option(
    "--html",
    "html_report",
    type=click.Path(path_type=Path, dir_okay=False),
    metavar="FILE",
    help="Write one self-contained HTML page: per test its steps, sipp's statistics and a ladder of its SIP messages.",
)
@click.option(
    "--logs",
    "logs_base",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("fdkeeper-logs"),
    show_default=True,
    metavar="DIR",
    help="Log folders: DIR/<timestamp>/<test>/, DIR/latest is the newest.",
)
@click.option(
    "--sipp", "sipp_path", metavar="PATH", envvar="FDKEEPER_SIPP", help="sipp binary (default: sipp on PATH)."
)
@click.option("--keep-logs", is_flag=True, help=f"Keep every earlier run's logs (default: the last {logs.KEEP_RUNS}).")
@click.option("-k", "--filter", "selection", metavar="TEXT", help="Only tests whose name or path contains TEXT.")
@click.option(
    "--shard",
    metavar="K/N",
    callback=shard_option,
    help="Run the Kth of N shares of the test files (by their sorted paths; the same on every machine).",
)
def run_command(
    tests: tuple[Path, ...],
    junit: Path | None,
    html_report: Path | None,
    logs_base: Path,
    sipp_path: str | None,
    keep_logs: bool,
    selection: str | None,
    shard: Shard | None,
) -> None:
    """Run test files (YAML): each test gets a keeper of its own (and, with `sut: embedded`,
    a local Kamailio), runs its steps in order and checks exit statuses and call counts.

    \b
      name: register-answer
      sut: embedded                   # or HOST:PORT of your SuT
      steps:
        - name: register
          sipp: -sf ${scenarios}/uac-register.xml -inf users.csv -t t1 -m 1 ${sut}
          expect: {successful: 1, failed: 0}
        - name: answer
          after: register             # once 'register' passed
          sipp: -sf ${scenarios}/uas-answer.xml -t t1 -p ${free_port:answer} -m 1 ${sut}
        - name: call
          ready: answer               # once 'answer' holds the connection and listens
          command: my-caller --to alice

    \b
      fdkeeper run docs/examples/*.yaml --junit report.xml

    A line per step while it runs, a summary at the end; each step's output and sipp's
    trace files in --logs DIR/<timestamp>/<test>/ (DIR/latest: the newest run). Exit
    status: 0 every test passed, 1 a test failed (the step is named), 2 a bad test file
    (one line naming the file, the step and the field; the other files run),
    143/129/130 cancelled by SIGTERM/SIGHUP/SIGINT (the steps, keepers and SuT it started
    are stopped, its temporary files removed, the JUnit written with the rest marked as
    not run). --shard K/N runs the Kth of N shares of the files, for a CI matrix. The
    format: docs/examples/README.md.
    """
    try:
        specs, unloadable = load_tests(shard.select(list(tests)) if shard else list(tests), selection)
        sipp = str(find_sipp(sipp_path))
    except FdkeeperError as error:
        click.echo(str(error), err=True)
        sys.exit(EXIT_BAD_INPUT)
    for line in unloadable.values():
        click.echo(line, err=True)
    with interrupt.cancellable():  # a signal now stops the run, which cleans up and reports
        results = run_tests(specs, logs_base, sipp, keep_logs, junit, Console(), unloadable, shard)
        if html_report is not None:
            write_report(html_report, results)
            click.echo(f"HTML report: {html_report}")
    if interrupt.requested():
        click.echo(f"fdkeeper run: cancelled by {interrupt.signal_name()}; what it started was stopped", err=True)
        sys.exit(interrupt.exit_status())
    if unloadable:
        sys.exit(EXIT_BAD_INPUT)
    sys.exit(EXIT_PASSED if all(result.ok for result in results) else EXIT_FAILED)


if __name__ == "__main__":
    run_command()
