"""The `sut:` of a test file: which System under Test a test runs against, read and checked.

    sut: embedded                         # fdkeeper's Kamailio, started for the test
    sut: 127.0.0.1:5060                   # a SuT of yours that is already running
    sut: {embedded: {auth: true, users: users-auth.csv}}   # ... that wants digest auth
    sut: {kamailio: my-sut.cfg}           # Kamailio with your configuration
    sut: {command: ./my-sut --port ${sut_port}, ready: "tcp:${sut_port}"}   # any server
    sut: {address: 127.0.0.1:5060, domain: example.org}

A started SuT (kamailio, command) may use ``${sut_port}`` (a free port fdkeeper picks),
``${sut_dir}`` (its own work folder) and ``${here}`` (the test file's folder) in its
configuration, command, ``ready`` and ``address``; ``timeout`` (seconds, default 30)
bounds the wait for it to be ready. Paths are relative to the test file. fdkeeper.testrun.model reads
the field into these; fdkeeper.testrun.sut starts and stops what they describe.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

DEFAULT_READY_TIMEOUT = 30.0
# What a started SuT's configuration, command, `ready` and `address` may name.
STARTED_SUT_VARIABLES = ("here", "sut_port", "sut_dir")


@dataclass(frozen=True)
class EmbeddedSut:
    """fdkeeper's own Kamailio (fdkeeper.testbed.Kamailio); with `auth`, a registrar that
    challenges REGISTER (401) and INVITE (407), knowing the users of `users`."""

    auth: bool = False
    users: Path | None = None  # a sipp CSV: user;domain;password per line

    def __str__(self) -> str:
        return f"embedded (auth, users from {self.users})" if self.auth else "embedded"


@dataclass(frozen=True)
class AddressSut:
    """A SuT of the user's, already running at `address`."""

    address: str
    domain: str | None = None

    def __str__(self) -> str:
        return self.address


@dataclass(frozen=True)
class Readiness:
    """When a started SuT is ready: it accepts TCP at `target` (HOST:PORT or PORT), or a
    line of its output matches the regular expression `target`."""

    kind: str  # "tcp" or "log"
    target: str  # may hold ${sut_port} and the like


@dataclass(frozen=True)
class StartedSut:
    """A SuT the runner starts for the test and stops after it: `kamailio` (Kamailio with
    the test's own configuration file; ready once every TCP/TLS listener of it accepts)
    or `command` (any command, ready as `ready` says)."""

    kind: str  # "kamailio" or "command"
    here: Path  # the test file's folder: the command runs there
    config: Path | None = None  # kamailio
    command: tuple[str, ...] = ()  # command
    ready: Readiness | None = None  # command
    address: str | None = None  # what ${sut} is; default: from the listeners / `ready`
    domain: str | None = None
    timeout: float = DEFAULT_READY_TIMEOUT

    def __str__(self) -> str:
        return f"kamailio {self.config}" if self.kind == "kamailio" else f"command {shlex.join(self.command)}"


SutSpec = EmbeddedSut | AddressSut | StartedSut
