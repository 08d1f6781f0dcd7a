"""Running the program a mode prepared, in the foreground, as `sipp` itself would run."""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Callable

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def spawn(argv: list[str], extra_env: dict[str, str]) -> int:
    """Run the program in the foreground, passing SIGINT/SIGTERM/SIGHUP on; return its status."""
    process = subprocess.Popen(argv, env={**os.environ, **extra_env})
    forward: Callable[[int, object], None] = lambda signum, _frame: _send_signal(process, signum)
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


def _send_signal(process: subprocess.Popen, signum: int) -> None:
    try:
        process.send_signal(signum)
    except ProcessLookupError:
        pass
