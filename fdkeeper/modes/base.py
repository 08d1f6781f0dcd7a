"""The interface every handoff mode implements.

A mode is one way of getting a kept connection into a sipp process: the LD_PRELOAD shim
today; ptrace injection and a UDP converter later. Each mode can say why it cannot run here
(``unsupported_reason``), so ``--mode auto`` can pick one and explain what it tried.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from fdkeeper.process import spawn
from fdkeeper.sipp.args import SippInvocation
from fdkeeper.tls import TlsOptions


@dataclass
class Handoff:
    """What the runner needs to start sipp under a mode: the command line and environment."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class HandoffRequest:
    """The facts a mode needs about one run."""

    sipp: Path
    invocation: SippInvocation
    control_socket: Path
    remote: tuple[str, int] | None
    transport: str = "tcp"
    args: list[str] | None = None  # sipp's arguments as run (a TLS run rewrites some); default: as given
    reconnect: bool = False
    per_call: bool = False  # -t tn/ln client: one kept connection per user, leased at first send
    transfer: str = "scm"  # ptrace mode: how the descriptor reaches the program (scm or pidfd)
    debug: bool = False
    # --mode udp: the converter it starts (TLS towards the SuT, pings, connect bound)
    tls: TlsOptions | None = None
    keepalive: float | None = None
    connect_timeout: float | None = None


class Mode(ABC):
    name: str = ""
    summary: str = ""

    @abstractmethod
    def unsupported_reason(self, sipp: Path) -> str | None:
        """None if this mode can hand connections to ``sipp`` here, else one line saying why not."""

    @abstractmethod
    def prepare(self, request: HandoffRequest) -> Handoff:
        """The command and environment that start sipp with the handoff in place."""

    def run(self, handoff: Handoff) -> int:
        """Start the prepared program, see it through, return its exit status.

        Modes that hand connections over from outside the program (ptrace) override this.
        """
        return spawn(handoff.argv, handoff.env)
