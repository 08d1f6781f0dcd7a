"""`fdkeeper-sipp --help` (and -h, --version, no argument) says what fdkeeper-sipp is, rather
than looking for a sipp binary called '--help'."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fdkeeper import __version__, cli


def run_sipp_main(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    monkeypatch.setattr("sys.argv", ["fdkeeper-sipp", *args])
    with pytest.raises(SystemExit) as exit_:
        cli.sipp_main()
    return int(exit_.value.code or 0)


@pytest.mark.parametrize("option", ["--help", "-h"])
def test_help_is_its_own_usage(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], option: str
) -> None:
    assert run_sipp_main(monkeypatch, option) == 0
    out = capsys.readouterr().out
    assert out.startswith("Usage: fdkeeper-sipp SIPP_PATH") and "fdkeeper sipp --sipp SIPP_PATH" in out
    assert "not found" not in out


def test_version(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_sipp_main(monkeypatch, "--version") == 0
    assert capsys.readouterr().out == f"fdkeeper-sipp (fdkeeper) {__version__}\n"


def test_no_argument_is_usage_on_stderr_and_status_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_sipp_main(monkeypatch) == 2
    assert capsys.readouterr().err.startswith("Usage: fdkeeper-sipp")


def test_a_missing_sipp_path_is_still_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_sipp_main(monkeypatch, "/nonexistent/sipp", "-v") != 0
    assert "/nonexistent/sipp" in capsys.readouterr().err


def test_the_commands_start_without_the_test_tooling() -> None:
    """`fdkeeper sipp`, `status` and the others import neither the test runner nor the testbed
    (and so not cryptography): `fdkeeper run` is imported only when named (cli/group.py)."""
    probe = (
        "import sys, fdkeeper.cli\n"
        "heavy = sorted(m for m in sys.modules if m.startswith(('fdkeeper.testrun', 'fdkeeper.testbed', 'cryptography')))\n"
        "print(heavy)\n"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    assert loaded.stdout.strip() == "[]", loaded.stdout
