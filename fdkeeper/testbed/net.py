"""The loopback test network: free ports, the SIP domain, and the one wait helper.

`wait_until` is what tests, benches and the testbed itself use to wait for a state
(a registration, a connection closed, a keeper lease) instead of sleeping a fixed time.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from fdkeeper.address import family_of

T = TypeVar("T")

# The SIP domain of the embedded SuT (sip:user@fdkeeper.test).
DEFAULT_DOMAIN = "fdkeeper.test"


def free_port(host: str = "127.0.0.1") -> int:
    """Return a port that is free for both TCP and UDP on `host`.

    Kamailio listens on the same port number for both, so checking one
    protocol only is not enough. There is a race between this check and the
    real bind; callers retry by starting again with a new port if it matters.
    """
    family = family_of(host)
    for _ in range(50):
        with socket.socket(family, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port: int = tcp.getsockname()[1]
            try:
                with socket.socket(family, socket.SOCK_DGRAM) as udp:
                    udp.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no port free for both TCP and UDP on {host}")


def wait_until(
    predicate: Callable[[], T | None], timeout: float = 5.0, interval: float = 0.05, what: str = "condition"
) -> T:
    """Poll `predicate` until it returns something truthy; return that value.

    Raises TimeoutError naming `what` once `timeout` seconds have passed.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def tail(path: Path, lines: int = 40) -> str:
    """The last `lines` lines of a log file (for error messages)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])
