"""The project's static checks (lint, format, types, import contracts, C warnings and cppcheck)
run with the suite, one test per check, so the README's test command and CI's .ci/run fail when
one does. Each test calls `.ci/check NAME`, the one place that says how a check is run, and fails
with what the check's tool printed."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECK = REPO / ".ci" / "check"
# The names .ci/check knows; a check added there is added here too.
CHECKS = ["ruff", "format", "types", "imports", "c"]
# mypy over the whole package, gcc and cppcheck: far below this on a slow machine.
TIMEOUT_S = 600
# The Python tools .ci/check runs from .venv/bin, by the distribution that installs each.
TOOL_DISTRIBUTIONS = ["ruff", "mypy", "import-linter"]


@pytest.mark.parametrize("name", CHECKS)
def test_check_passes(name: str) -> None:
    run = subprocess.run(
        ["bash", str(CHECK), name], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    if run.returncode != 0:
        pytest.fail(f"bash .ci/check {name} failed:\n{run.stdout}{run.stderr}", pytrace=False)


def test_every_check_has_a_test() -> None:
    """.ci/check's own list of checks (an unknown name makes it print them) is the one tested."""
    run = subprocess.run(["bash", str(CHECK), "--no-such-check"], capture_output=True, text=True, check=False)
    assert run.returncode == 2, run.stdout + run.stderr
    listed = run.stderr.rsplit("the checks:", 1)[-1].split()
    assert listed == CHECKS, f".ci/check knows {listed}; tests/habits/test_checks.py tests {CHECKS}"


def test_the_test_extra_installs_the_checks_tools() -> None:
    """.ci/install installs `.[test]` into a fresh .venv: that extra must name every tool."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    named = {re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower() for requirement in extras}
    missing = [tool for tool in TOOL_DISTRIBUTIONS if tool not in named]
    assert not missing, f"pyproject.toml's test extra lacks {missing}, which .ci/check runs"
