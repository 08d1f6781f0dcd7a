"""The pytest plugin's fixtures say what they are under `pytest --fixtures`, and the plugin's
documented example (its module docstring) is written to run side by side (a free port for the
answering run, not a fixed one). That it passes as written, twice side by side under `pytest -n 2`,
is proven in test_pytest_plugin.py's run of the fixtures' tests (one pytest for both)."""

from __future__ import annotations

import re

import pytest

from tests.support.plugin import documented_example, plugin_options

pytest_plugins = ["pytester"]

FIXTURES = ("fdkeeper_keeper", "sipp", "kamailio_sut", "fdkeeper_sipp_path")


def test_every_fixture_has_a_docstring_pytest_shows(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess(*plugin_options(), "-p", "no:cacheprovider", "--fixtures")
    text = result.stdout.str()
    for name in FIXTURES:
        shown = re.search(rf"^{name}\b.*\n(.*)$", text, re.MULTILINE)
        assert shown, f"{name} not listed:\n{text}"
        assert "no docstring available" not in shown.group(1) and shown.group(1).strip(), shown.group(0)


def test_the_documented_example_takes_a_free_port() -> None:
    example = documented_example()
    assert '"-p", "5070"' not in example and "free_port()" in example
