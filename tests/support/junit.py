"""The JUnit report's rules, checked: validated with xmllint against docs/ci/junit.xsd (the
format CI systems read, written down) when xmllint is here, and checked by structure always,
so every test that writes a report holds it to the same schema."""

from __future__ import annotations

import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from tests.support.paths import REPO

JUNIT_XSD = REPO / "docs" / "ci" / "junit.xsd"
OUTCOMES = ("failure", "error", "skipped")
_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}$")  # Ant: xs:dateTime, no time zone
_DECIMAL = re.compile(r"^\d+(\.\d+)?$")


def xmllint_schema(path: Path, xsd: Path = JUNIT_XSD) -> subprocess.CompletedProcess[str]:
    """xmllint's verdict on ``path`` against ``xsd`` (the caller skips when xmllint is missing)."""
    return subprocess.run(
        ["xmllint", "--noout", "--schema", str(xsd), str(path)], capture_output=True, text=True, timeout=30
    )


def check_junit_schema(path: Path) -> None:
    """Fail unless the file meets both junit-10.xsd (Jenkins) and Ant's JUnit.xsd: validated
    for real against docs/ci/junit.xsd when xmllint is here, and checked by structure."""
    if shutil.which("xmllint"):
        checked = xmllint_schema(path)
        assert checked.returncode == 0, checked.stderr
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    for name in ("tests", "failures", "errors"):
        assert root.get(name, "0").isdigit()
    suites = list(root)
    assert suites and all(s.tag == "testsuite" for s in suites)
    for suite in suites:
        _check_suite(suite)


def _check_suite(suite: ET.Element) -> None:
    for required in ("name", "timestamp", "hostname", "tests", "failures", "errors", "time", "id", "package"):
        assert suite.get(required), f"testsuite lacks {required}"
    assert _DATETIME.match(suite.get("timestamp", "")) and _DECIMAL.match(suite.get("time", ""))
    assert all(suite.get(n, "").isdigit() for n in ("tests", "failures", "errors", "skipped", "id"))
    tags = [child.tag for child in suite]
    assert tags[0] == "properties" and tags[-2:] == ["system-out", "system-err"]
    cases = [child for child in suite if child.tag == "testcase"]
    assert tags[1:-2] == ["testcase"] * len(cases)
    assert int(suite.get("tests", "")) == len(cases)
    properties = suite.find("properties")
    assert properties is not None
    assert all(p.tag == "property" and p.get("name") is not None for p in properties)
    outcomes = [outcome_tags(case) for case in cases]
    for tag, count in (("failure", "failures"), ("error", "errors"), ("skipped", "skipped")):
        assert int(suite.get(count, "")) == sum(o == [tag] for o in outcomes), count
    for case, outcome in zip(cases, outcomes, strict=True):
        assert case.get("name") and case.get("classname") and _DECIMAL.match(case.get("time", ""))
        assert outcome in ([], ["failure"], ["error"], ["skipped"]), outcome  # Ant: one at most
        tags = [child.tag for child in case]
        assert tags == outcome + [t for t in ("system-out", "system-err") if t in tags], tags  # outcome first
        for child in case:
            assert len(child) == 0
            if child.tag in OUTCOMES:
                assert child.get("type") and child.get("message") is not None


def outcome_tags(case: ET.Element) -> list[str]:
    """The outcome elements of a testcase (failure, error or skipped), without its output."""
    return [child.tag for child in case if child.tag in OUTCOMES]


def cases_by_class(path: Path) -> dict[str, dict[str, ET.Element]]:
    """The report's testcases: {classname (the test): {name (the step): testcase}}."""
    cases: dict[str, dict[str, ET.Element]] = {}
    for case in ET.parse(path).iter("testcase"):
        cases.setdefault(case.get("classname", ""), {})[case.get("name", "")] = case
    return cases
