"""The loopback test network: free ports (never one an earlier test server had), the SIP domain, and the one wait helper.

`wait_until` is what tests, benches and the testbed itself use to wait for a state
(a registration, a connection closed, a keeper lease) instead of sleeping a fixed time.
"""

from __future__ import annotations

import errno
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from fdkeeper.address import family_of

T = TypeVar("T")

# The SIP domain of the embedded SuT (sip:user@fdkeeper.test).
DEFAULT_DOMAIN = "fdkeeper.test"


# Every port this process's test SuTs were given. A module's keeper outlives the servers its
# tests start and lists a closed connection under its SuT's address; a later server on the
# same port would find that connection as its own. So no two servers of a run share a port.
_ports_given: set[tuple[str, int]] = set()


def bind_fresh_port(sock: socket.socket, host: str = "127.0.0.1") -> int:
    """Bind ``sock`` to a port of ``host`` that no earlier test SuT of this process had; return it.

    The port is drawn from the kernel's own range for ephemeral ports, as bind() to port 0
    would; one that is taken is skipped (a failed bind leaves the socket as it was)."""
    low, high = _ephemeral_range()
    for _ in range(200):
        port = random.randint(low, high)
        if (host, port) in _ports_given:
            continue
        try:
            sock.bind((host, port))
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise
            continue
        _ports_given.add((host, port))
        return port
    raise RuntimeError(f"no free port on {host} that an earlier test server of this run did not have")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


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
            if (host, port) in _ports_given:
                continue
            try:
                with socket.socket(family, socket.SOCK_DGRAM) as udp:
                    udp.bind((host, port))
            except OSError:
                continue
            _ports_given.add((host, port))
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
