"""`fdkeeper run`'s JUnit, one testcase per step, and what the console shows of a failure,
with command steps (no SuT needed): the cause under the failed step and as its JUnit
failure message, a stopped step said so, and a test name holding NUL and ESC escaped on the
console and in a report that XML parsers and the schema accept."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from fdkeeper.testrun.command import run_command
from tests.support.junit import cases_by_class, check_junit_schema, outcome_tags, xmllint_schema

FAILING = """
name: {name}
steps:
  - {{name: server, command: "sleep 60"}}
  - {{name: client, started: server, command: "sh -c 'echo connecting; echo \\"error: no route to host\\" >&2; exit 3'"}}
  - {{name: after, after: client, command: "touch after-ran"}}
"""


def run(tmp_path: Path, name: str) -> tuple[int, str, Path]:
    test = tmp_path / "t.yaml"
    test.write_text(FAILING.format(name=name))
    report = tmp_path / "report.xml"
    result = CliRunner().invoke(run_command, [str(test), "--logs", str(tmp_path / "logs"), "--junit", str(report)])
    return result.exit_code, result.output, report


def test_the_console_shows_the_cause_under_the_failed_step_and_says_stopped(tmp_path):
    status, output, _ = run(tmp_path, "t")
    assert status == 1, output
    lines = output.splitlines()
    failed = next(number for number, line in enumerate(lines) if line.startswith("  client: FAIL (exit 3, "))
    assert lines[failed + 1 : failed + 3] == ["    exit status 3, expected 0", "    cause: error: no route to host"]
    assert any(line.startswith("  server: stopped (") for line in lines), output
    assert not any(line.startswith("  server: skip") for line in lines), output
    assert "FAILED   t: step 'client': error: no route to host" in output


def test_junit_has_a_testcase_per_step_with_the_cause_and_the_output(tmp_path):
    _, _, report = run(tmp_path, "t")
    check_junit_schema(report)
    steps = cases_by_class(report)["t"]
    assert list(steps) == ["server", "client", "after"]
    failure = steps["client"].find("failure")
    assert failure.get("message") == "error: no route to host"
    assert "cause:\n  error: no route to host" in failure.text and "exit status 3, expected 0" in failure.text
    assert steps["client"].find("system-out").text == "connecting\n"
    assert steps["client"].find("system-err").text == "error: no route to host\n"
    assert steps["server"].find("skipped").get("type") == "stopped"
    assert outcome_tags(steps["after"]) == ["skipped"] and not (tmp_path / "after-ran").exists()


def test_nul_and_esc_in_a_test_name_are_escaped_on_the_console_and_in_the_report(tmp_path):
    status, output, report = run(tmp_path, '"a\\0b\\ec"')  # YAML: NUL and ESC
    assert status == 1, output
    assert "\x00" not in output and "\x1b" not in output
    assert "a\\x00b\\x1bc (" in output and "FAILED   a\\x00b\\x1bc: step 'client'" in output
    raw = report.read_bytes()
    assert b"\x00" not in raw and b"\x1b" not in raw
    root = ET.parse(report).getroot()  # parses: python's own XML parser
    assert {case.get("classname") for case in root.iter("testcase")} == {"a\\x00b\\x1bc"}
    if shutil.which("xmllint"):
        assert xmllint_schema(report).returncode == 0
    check_junit_schema(report)


@pytest.mark.skipif(not shutil.which("xmllint"), reason="xmllint (libxml2-utils) is not installed")
def test_control_characters_in_a_steps_output_leave_the_report_well_formed(tmp_path):
    test = tmp_path / "t.yaml"
    test.write_text(
        'steps:\n  - {name: noisy, command: [printf, "\\\\033[2Jscreen\\\\000nul\\\\r\\\\n\\\\001end\\\\n"]}\n'
    )
    report = tmp_path / "report.xml"
    result = CliRunner().invoke(run_command, [str(test), "--logs", str(tmp_path / "logs"), "--junit", str(report)])
    assert result.exit_code == 0, result.output
    check_junit_schema(report)
    out = cases_by_class(report)["t"]["noisy"].find("system-out").text
    assert out == "\\x1b[2Jscreen\\x00nul\n\\x01end\n"
