"""The JUnit XML report of a run: one <testcase> per step, the test as its classname.

Written to the rules both common schemas share (docs/ci/junit.xsd), so Jenkins, GitLab,
GitHub reporters and Ant-style tools all read it: a <testsuites> root holding one <testsuite>
with name, timestamp (no time zone), hostname, id, package, tests, failures, errors, skipped
and time; its children in the order <properties>, <testcase>..., <system-out>, <system-err>;
each <testcase> with name, classname and time, at most one <failure>, <error> or <skipped>
(with message and type), then its own <system-out> and <system-err>.

- A step's testcase: name the step, classname the test (its file's folder, dotted, then the
  test's name: docs.examples.register-answer-tcp). A failed step's <failure> message is its
  cause (or its reasons when the logs say nothing more); its text the reasons, the cause,
  the command and the log folder. A skipped or stopped step is <skipped>. The last lines of
  the step's stdout and stderr are its <system-out> and <system-err>.
- A test that could not run (its SuT did not start, its file does not load) is one testcase
  of its own, named after the test, with an <error>; a test not run (the run was cancelled
  first) is its steps, each <skipped>.
- An `xfail:` test's failed steps are <skipped type="xfail">.
- A shard's report (`--shard K/N`) names it: the suite is "fdkeeper run (shard K/N)" and
  carries a property shard=K/N, so reports of a CI matrix merge without clashing.

Names, messages and output come from test files, peers and terminals: control characters
are written as visible escapes (\\x00, \\x1b), which XML 1.0 could not hold at all.
"""

from __future__ import annotations

import os
import re
import socket
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from fdkeeper.testrun.results import ERROR, FAILED, PASSED, SKIPPED, XFAILED, StepResult, TestResult, last_lines
from fdkeeper.textsafe import escape_controls

SUITE_NAME = "fdkeeper run"
TAIL_LINES = 20
# What is left that XML 1.0 cannot hold once controls are escaped (lone surrogates, U+FFFE/FFFF): dropped.
_NOT_XML = re.compile("[^\x09\x0a\x0d\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_BETWEEN_LINE_BREAKS_AND_TABS = re.compile("[^\n\t]+")


def xml_text(text: str) -> str:
    """``text`` as XML 1.0 can hold it: line breaks and tabs kept, other controls escaped."""
    escaped = _BETWEEN_LINE_BREAKS_AND_TABS.sub(lambda part: escape_controls(part.group()), text.replace("\r\n", "\n"))
    return _NOT_XML.sub("", escaped)


def xml_line(text: str) -> str:
    """One line (a name, a message) as XML 1.0 can hold it: every control escaped."""
    return _NOT_XML.sub("", escape_controls(text))


def junit_tree(results: list[TestResult], started: float, duration: float, shard: str | None = None) -> ET.ElementTree:
    cases = [case for result in results for case in _testcases(result)]
    outcomes = [child.tag for case in cases for child in case if child.tag in ("failure", "error", "skipped")]
    counts = {
        "tests": str(len(cases)),
        "failures": str(outcomes.count("failure")),
        "errors": str(outcomes.count("error")),
        "skipped": str(outcomes.count("skipped")),
        "time": _seconds(duration),
    }
    name = f"{SUITE_NAME} (shard {shard})" if shard else SUITE_NAME
    root = ET.Element("testsuites", {"name": name, **{k: v for k, v in counts.items() if k != "skipped"}})
    suite = ET.SubElement(
        root,
        "testsuite",
        {
            "name": name,
            "id": "0",
            "package": "fdkeeper",
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "hostname": socket.gethostname() or "localhost",
            **counts,
        },
    )
    properties = ET.SubElement(suite, "properties")
    if shard:
        ET.SubElement(properties, "property", {"name": "shard", "value": shard})
    suite.extend(cases)
    ET.SubElement(suite, "system-out").text = xml_text(
        "\n".join(f"{r.name}: {r.path} ({r.status}), logs in {r.log_dir}" for r in results)
    )
    ET.SubElement(suite, "system-err")
    ET.indent(root)
    return ET.ElementTree(root)


def _testcases(result: TestResult) -> list[ET.Element]:
    classname = _classname(result)
    cases = [_test_case(result, classname)] if result.status == ERROR or not result.steps else []
    return cases + [_step_case(result, step, classname) for step in result.steps]


def _test_case(result: TestResult, classname: str) -> ET.Element:
    """The test itself, when it could not run (or ran no step)."""
    case = _case(result.name, classname, result.duration)
    message = xml_line(result.message() or result.status)
    if result.status == XFAILED:
        ET.SubElement(case, "skipped", {"message": message, "type": "xfail"})
    elif result.status in (ERROR, FAILED):
        text = xml_text(f"{result.error or result.message()}\ntest file: {result.path}\nlogs: {result.log_dir}\n")
        ET.SubElement(case, "error", {"message": message, "type": "TestError"}).text = text
    elif result.status != PASSED:
        ET.SubElement(case, "skipped", {"message": message, "type": result.status})
    return case


def _step_case(result: TestResult, step: StepResult, classname: str) -> ET.Element:
    case = _case(step.name, classname, step.duration)
    if step.status == FAILED and result.status == XFAILED:
        message = xml_line(f"expected failure ({result.xfail}): {step.why()}")
        ET.SubElement(case, "skipped", {"message": message, "type": "xfail"})
    elif step.status == FAILED:
        failure = ET.SubElement(case, "failure", {"message": xml_line(step.why()), "type": "StepFailed"})
        failure.text = xml_text(_failure_text(step, result.log_dir))
    elif step.status == SKIPPED:
        kind = "stopped" if step.stopped else "skipped"
        ET.SubElement(case, "skipped", {"message": xml_line("; ".join(step.reasons) or kind), "type": kind})
    for tag, path in (("system-out", step.out), ("system-err", step.err)):
        text = last_lines(path, TAIL_LINES)
        if text:
            ET.SubElement(case, tag).text = xml_text(text + "\n")
    return case


def _case(name: str, classname: str, seconds: float) -> ET.Element:
    return ET.Element("testcase", {"name": xml_line(name), "classname": classname, "time": _seconds(seconds)})


def _failure_text(step: StepResult, log_dir: Path) -> str:
    lines = [*step.reasons]
    if step.cause:
        lines += ["cause:", *(f"  {line}" for line in step.cause.splitlines())]
    lines += [f"command: {' '.join(step.command)}" if step.command else "", f"logs: {log_dir}"]
    return "\n".join(line for line in lines if line) + "\n"


def _classname(result: TestResult) -> str:
    """The test as reporters group it: its file's folder, dotted, then its name
    (docs/examples/register-tcp.yaml named register-tcp -> docs.examples.register-tcp).
    The folder is left out for a file given by an absolute path (it would name the machine)."""
    folder = "" if result.path.is_absolute() else os.path.normpath(result.path.parent)
    package = folder.replace(os.sep, ".").strip(".")
    name = xml_line(result.name) or result.path.stem
    return f"{package}.{name}" if package else name


def _seconds(value: float) -> str:
    return f"{value:.3f}"


def write_junit(
    path: Path, results: list[TestResult], started: float, duration: float, shard: str | None = None
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    junit_tree(results, started, duration, shard).write(path, encoding="UTF-8", xml_declaration=True)
