"""Running the program a mode prepared, in the foreground, as `sipp` itself would run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from fdkeeper.errors import FdkeeperError
from fdkeeper.statedir import open_private_file

T = TypeVar("T")

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def spawn(argv: list[str], extra_env: dict[str, str]) -> int:
    """Run the program in the foreground, passing SIGINT/SIGTERM/SIGHUP on; return its status."""
    process = subprocess.Popen(argv, env={**os.environ, **extra_env})

    def forward(signum: int, _frame: object) -> None:
        _send_signal(process, signum)

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
    try:
        while True:
            try:
                status = process.wait()
                break
            except InterruptedError:
                continue
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return status if status >= 0 else 128 - status


def _send_signal(process: subprocess.Popen[bytes], signum: int) -> None:
    try:
        process.send_signal(signum)
    except ProcessLookupError:
        pass


def start_detached(
    command: list[str], log_path: Path, ready: Callable[[], T | None], what: str, timeout: float = 10.0
) -> T:
    """Start a long-lived helper (keeper, converter) and wait until ``ready()`` answers.

    It gets its own session, so a Ctrl-C or a CI timeout's SIGKILL sent to a run's process
    group never reaches it; its stderr goes to ``log_path``, whose last line explains a
    failed start.
    """
    with open_private_file(log_path.parent, log_path.name, "ab") as log_file:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            start_new_session=True,
            close_fds=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = ready()
        if answer is not None:
            return answer
        if process.poll() is not None:
            raise FdkeeperError(f"fdkeeper: the {what} could not start: {last_line(log_path)}")
        time.sleep(0.02)
    process.kill()
    raise FdkeeperError(f"fdkeeper: the {what} did not answer within {timeout:g} s; see {log_path}")


def last_line(path: Path) -> str:
    """The last non-empty line of a log, for an error message."""
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return f"no log at {path}"
    return lines[-1].removeprefix("fdkeeper: ") if lines else f"nothing in {path}"
