"""`fdkeeper status` (and --count, which scripts call in loops) starts without the modules only
other commands need: the test runner, the testbed and cryptography, sipp's argument parser, the
modes, TLS and psutil (cli/group.py's LAZY_COMMANDS, cli/options.py's imports where used)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fdkeeper.cli import main
from fdkeeper.cli.group import LAZY_COMMANDS

HEAVY = (
    "fdkeeper.testrun",
    "fdkeeper.testbed",
    "cryptography",
    "fdkeeper.cli.runs",
    "fdkeeper.sipp",
    "fdkeeper.modes",
    "fdkeeper.tls",
    "psutil",
    "ssl",
)


def modules_after_status(directory: Path, *options: str) -> list[str]:
    """The heavy modules loaded by a fresh interpreter that ran `fdkeeper status OPTIONS` (no
    keeper runs there: the command goes as far as asking it)."""
    probe = (
        "import json, sys\n"
        "from fdkeeper.cli import main\n"
        "try:\n"
        f"    main.main(args=['status', '--dir', {str(directory)!r}, *{list(options)!r}])\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({HEAVY!r}))))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("options", [("--count",), ("--json",)])
def test_status_imports_only_what_it_needs(tmp_path: Path, options: tuple[str, ...]) -> None:
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    assert modules_after_status(directory, *options) == []


def test_every_lazy_command_is_found_and_listed() -> None:
    """A lazy command's module defines it under the name the table gives (a renamed function
    would otherwise surface only when a user names the command)."""
    for name in LAZY_COMMANDS:
        command = main.get_command(None, name)  # type: ignore[arg-type]  # click's context is unused here
        assert command is not None and command.name == name
    assert set(LAZY_COMMANDS) <= set(main.list_commands(None))  # type: ignore[arg-type]
