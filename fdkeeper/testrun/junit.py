"""The JUnit XML report of a run: one <testcase> per test file.

Written to the rules both common schemas share, so Jenkins, GitLab, GitHub reporters and
Ant-style tools all read it: a <testsuites> root holding one <testsuite> with name,
timestamp (no time zone), hostname, id, package, tests, failures, errors, skipped and time;
its children in the order <properties>, <testcase>..., <system-out>, <system-err>; each
<testcase> with name, classname and time and at most one <failure>, <error> or <skipped>
(with message and type). A failing test's <failure> names every failing step with its
reasons, and holds the last lines of each one's stdout and stderr.
"""

from __future__ import annotations

import os
import re
import socket
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from fdkeeper.testrun.results import ERROR, FAILED, XFAILED, TestResult

SUITE_NAME = "fdkeeper run"
TAIL_LINES = 20
# Characters XML 1.0 cannot hold (a sipp log may have terminal escapes): dropped.
_NOT_XML = re.compile("[^\x09\x0a\x0d\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_text(text: str) -> str:
    return _NOT_XML.sub("", text)


def junit_tree(results: list[TestResult], started: float, duration: float) -> ET.ElementTree:
    failures = sum(r.status == FAILED for r in results)
    errors = sum(r.status == ERROR for r in results)
    skipped = sum(r.status == XFAILED for r in results)
    counts = {
        "tests": len(results),
        "failures": failures,
        "errors": errors,
        "skipped": skipped,
        "time": _seconds(duration),
    }
    root = ET.Element("testsuites", {"name": SUITE_NAME, **{k: str(v) for k, v in counts.items() if k != "skipped"}})
    suite = ET.SubElement(
        root,
        "testsuite",
        {
            "name": SUITE_NAME,
            "id": "0",
            "package": "fdkeeper",
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "hostname": socket.gethostname() or "localhost",
            **{k: str(v) for k, v in counts.items()},
        },
    )
    ET.SubElement(suite, "properties")
    for result in results:
        suite.append(_testcase(result))
    ET.SubElement(suite, "system-out").text = "\n".join(f"{r.name}: logs in {r.log_dir}" for r in results)
    ET.SubElement(suite, "system-err")
    ET.indent(root)
    return ET.ElementTree(root)


def _testcase(result: TestResult) -> ET.Element:
    case = ET.Element(
        "testcase",
        {
            "name": xml_text(result.name),
            "classname": _classname(result.path),
            "time": _seconds(result.duration),
        },
    )
    if result.status == FAILED:
        failure = ET.SubElement(case, "failure", {"message": xml_text(result.message()), "type": "StepFailed"})
        failure.text = xml_text(_failing_steps_text(result))
    elif result.status == ERROR:
        message = xml_text(result.message())
        ET.SubElement(case, "error", {"message": message, "type": "TestError"}).text = message
    elif result.status == XFAILED:
        ET.SubElement(case, "skipped", {"message": xml_text(result.message()), "type": "xfail"})
    return case


def _failing_steps_text(result: TestResult) -> str:
    blocks = []
    for step in result.failed_steps():
        header = f"step '{step.name}': {'; '.join(step.reasons)}\ncommand: {' '.join(step.command)}"
        blocks.append(f"{header}\n{step.tail(TAIL_LINES)}")
    return "\n\n".join(blocks) + f"\n\nlogs: {result.log_dir}\n"


def _classname(path: Path) -> str:
    """docs/examples/register-tcp.yaml -> docs.examples.register-tcp (the dotted form
    reporters group by)."""
    relative = os.path.relpath(path.with_suffix("")) if not path.is_absolute() else path.with_suffix("").name
    return relative.replace(os.sep, ".").lstrip(".") or path.stem


def _seconds(value: float) -> str:
    return f"{value:.3f}"


def write_junit(path: Path, results: list[TestResult], started: float, duration: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    junit_tree(results, started, duration).write(path, encoding="UTF-8", xml_declaration=True)
