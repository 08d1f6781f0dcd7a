"""Failures at a glance: under a failed step `fdkeeper run` prints why, read from the step's
own logs, and the JUnit failure carries the same cause. Real sipp through fdkeeper: the SuT
down (a closed port), a scenario that does not exist, and a call the embedded Kamailio
answers 404 (the callee never registered); and the cause read from sipp's error file's text."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fdkeeper.testbed import free_port
from fdkeeper.testrun.cause import MAX_WIDTH, step_cause
from tests.support.junit import cases_by_class, check_junit_schema
from tests.support.paths import REPO

USERS = REPO / "docs" / "examples" / "users-alice.csv"


def run_file(tmp_path: Path, text: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """`fdkeeper run` on one test file, as a CI job runs it (its own process, real sipp)."""
    test = tmp_path / "t.yaml"
    test.write_text(text)
    report = tmp_path / "report.xml"
    command = [sys.executable, "-m", "fdkeeper", "run", os.fspath(test), "--junit", os.fspath(report)]
    result = subprocess.run(
        [*command, "--logs", os.fspath(tmp_path / "logs")], capture_output=True, text=True, timeout=300
    )
    return result, report


def cause_lines(output: str, step: str) -> list[str]:
    """The cause printed under ``step``'s FAIL line: its first line and the ones it goes on with."""
    lines = output.splitlines()
    failed = next(number for number, line in enumerate(lines) if line.startswith(f"  {step}: FAIL"))
    below = lines[failed + 1 :]
    first = next(number for number, line in enumerate(below) if line.startswith("    cause: "))
    rest = [line[11:] for line in below[first + 1 :] if line.startswith(" " * 11)]
    return [below[first][11:], *rest]


def failure_message(report: Path, step: str) -> str:
    check_junit_schema(report)
    (steps,) = cases_by_class(report).values()
    failure = steps[step].find("failure")
    assert failure is not None, f"{step} has no <failure>"
    return failure.get("message", "")


def test_the_suts_refusal_is_the_cause_when_the_sut_is_down(tmp_path):
    port = free_port()  # nothing listens there
    result, report = run_file(
        tmp_path,
        f"""
sut: 127.0.0.1:{port}
steps:
  - name: register
    sipp: -sf ${{scenarios}}/uac-register.xml -inf {USERS} -t t1 -i 127.0.0.1 -m 1 ${{sut}}
    timeout: 30
    expect: {{successful: 1}}
""",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    refused = f"fdkeeper: the SuT at 127.0.0.1:{port}/tcp refused the connection"
    assert cause_lines(result.stdout, "register")[0].startswith(refused), result.stdout
    assert f"FAILED   t: step 'register': {refused}" in result.stdout
    assert failure_message(report, "register").startswith(refused)


@pytest.mark.parametrize(
    "transport, said",
    [
        # TCP: fdkeeper reads the scenario before sipp starts, and says so
        ("t1", "fdkeeper: scenario file {path} not found; check -sf"),
        # UDP: fdkeeper warns it keeps nothing and runs sipp as it is: sipp's error is the cause, not the warning
        ("u1", "Unable to load or parse '{path}' xml scenario file"),
    ],
)
def test_a_missing_scenario_is_the_cause_whoever_finds_it(tmp_path, transport, said):
    port = free_port()
    result, report = run_file(
        tmp_path,
        f"""
steps:
  - name: run
    sipp: -sf ${{here}}/missing.xml -t {transport} -i 127.0.0.1 -m 1 127.0.0.1:{port}
    timeout: 30
""",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    missing = said.format(path=tmp_path / "missing.xml")
    assert cause_lines(result.stdout, "run") == [missing], result.stdout
    assert failure_message(report, "run") == missing


def test_a_404_is_the_cause_and_the_server_run_it_cut_short_says_stopped(tmp_path):
    # The answer run listens on UDP: over TCP, with nothing kept, it would end at once with its
    # own "no kept connection" line, racing the call's 404 (and winning whenever it starts fast).
    result, report = run_file(
        tmp_path,
        """
sut: embedded
steps:
  - name: answer
    sipp: -sf ${scenarios}/uas-answer.xml -t u1 -i 127.0.0.1 -p ${free_port:answer} -m 1 ${sut}
    timeout: 60
  - name: call
    started: answer
    sipp: -sf ${scenarios}/uac-call.xml -s nobody -key domain ${domain} -t u1 -i 127.0.0.1 -m 1 ${sut}
    timeout: 30
    expect: {successful: 1}
""",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    (cause,) = cause_lines(result.stdout, "call")
    assert cause.startswith("Aborting call on unexpected message for Call-Id '"), result.stdout
    assert cause.endswith("received 'SIP/2.0 404 Not Found'"), result.stdout
    assert failure_message(report, "call") == cause
    assert any(line.startswith("  answer: stopped (") for line in result.stdout.splitlines()), result.stdout
    (steps,) = cases_by_class(report).values()
    assert steps["answer"].find("skipped").get("type") == "stopped"


# --------------------------------------------------------------------------
# the cause from the logs' text (sipp's error file as sipp 3.7 writes it)
# --------------------------------------------------------------------------

SIPP_ERRORS = (
    "The following events occurred:\n"
    "2026-12-07\t21:12:52.162840\t1796677972.162840: Aborting call on unexpected message for Call-Id"
    " '1-32588@127.0.0.1': while expecting '100' (index 1), received 'SIP/2.0 404 Not Found\r\n"
    "Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-32588-1-0;rport=5060\r\n"
    "Content-Length: 0\r\n\r\n'"
)
ABORTED_404 = (
    "Aborting call on unexpected message for Call-Id '1-32588@127.0.0.1': while expecting '100' (index 1),"
    " received 'SIP/2.0 404 Not Found'"
)


WARNING = "fdkeeper: UDP transport: there is no connection to keep; running sipp as it is\n"


def test_sipps_error_entry_is_one_line_ending_with_the_first_line_of_what_it_received():
    assert step_cause("", SIPP_ERRORS, 1) == ABORTED_404


def test_fdkeeper_is_the_cause_only_when_it_ended_the_step():
    sipp_fatal = "2026-12-07\t21:12:50.7\t1796677970.7: Unable to load x\n"
    assert step_cause(WARNING + sipp_fatal, "", 255) == "Unable to load x"
    refused = "fdkeeper: the SuT at 127.0.0.1:5/tcp refused the connection; is it running?"
    assert step_cause(WARNING + "Resolving remote host... Done.\n" + refused + "\n\n", SIPP_ERRORS, 2) == refused


def test_a_run_that_ended_well_but_counted_wrong_has_no_cause_beyond_its_reasons():
    assert step_cause(WARNING + "Resolving remote host '127.0.0.1'... Done.\n", "", 0) == ""
    assert step_cause(WARNING, "", 0) == ""  # a warning as the last word is not fdkeeper ending the step


def test_repeated_errors_are_said_once_and_the_last_few_kept():
    entry = "2026-12-07\t21:00:00.{n}\t1796677200.{n}: {text}\n"
    text = "".join(entry.format(n=n, text=f"error {n % 6}") for n in range(40))  # ... 4 5 0 1 2 3
    assert step_cause("", text, 1).splitlines() == [f"error {n}" for n in (0, 1, 2, 3)]
    text = "".join(entry.format(n=n, text="timeout" if n == 5 else "refused") for n in range(40))
    assert step_cause("", text, 1).splitlines() == ["timeout", "refused"]


def test_a_command_steps_cause_is_its_last_lines_escaped_and_cut_to_a_width():
    stderr = "starting\n\n\x1b[31mfailed\x1b[0m: " + "x" * 400 + "\n"
    (line,) = step_cause(stderr, "", 3).splitlines()[-1:]
    assert line.startswith("\\x1b[31mfailed\\x1b[0m: xxx") and len(line) == MAX_WIDTH and line.endswith("...")
    assert step_cause("", "", 3) == "" and step_cause(stderr, "", 0) == ""
