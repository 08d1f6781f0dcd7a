"""The pytest plugin's fixtures say what they are under `pytest --fixtures`, and the plugin's
documented example (its module docstring) passes as written, twice side by side under
`pytest -n 2` (a free port for the answering run, not a fixed one)."""

from __future__ import annotations

import re

import pytest

from fdkeeper import pytest_plugin
from tests.support.plugin import plugin_options

pytest_plugins = ["pytester"]

FIXTURES = ("fdkeeper_keeper", "sipp", "kamailio_sut", "fdkeeper_sipp_path")


def documented_example() -> str:
    """The example in the plugin's docstring: its indented block, dedented."""
    doc = pytest_plugin.__doc__ or ""
    block = re.search(r"\n(    .*\n(?:    .*\n|\n)*)", doc)
    assert block, "the plugin's docstring has no example"
    return "\n".join(line[4:] for line in block.group(1).splitlines()) + "\n"


def test_every_fixture_has_a_docstring_pytest_shows(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess(*plugin_options(), "-p", "no:cacheprovider", "--fixtures")
    text = result.stdout.str()
    for name in FIXTURES:
        shown = re.search(rf"^{name}\b.*\n(.*)$", text, re.MULTILINE)
        assert shown, f"{name} not listed:\n{text}"
        assert "no docstring available" not in shown.group(1) and shown.group(1).strip(), shown.group(0)


def test_the_documented_example_passes_twice_side_by_side(pytester: pytest.Pytester) -> None:
    example = documented_example()
    assert '"-p", "5070"' not in example and "free_port()" in example
    pytester.makepyfile(
        test_one=example, test_two=example.replace("def test_register_then_answer", "def test_register_then_answer_2")
    )
    result = pytester.runpytest_subprocess(*plugin_options(), "-p", "no:cacheprovider", "-n", "2", timeout=300)
    result.assert_outcomes(passed=2)
