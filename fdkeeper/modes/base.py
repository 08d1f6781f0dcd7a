"""The contract every handoff mode keeps: what it can do, and how it starts a program.

A mode is one way of getting a kept connection into a program: the LD_PRELOAD shim inside
it, ptrace injection from outside it, or a UDP converter in front of it. Each mode declares
its ``Capabilities``; a run states its ``RunNeeds``; ``choose_mode`` (modes/__init__.py)
refuses a run a mode cannot do before asking whether the mode can run here at all
(``unsupported_reason``), as sshuttle's methods check their features before they start.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from fdkeeper.address import Address
from fdkeeper.process import spawn
from fdkeeper.tls import TlsOptions

TRANSFERS = ("scm", "pidfd")


@dataclass(frozen=True)
class RunNeeds:
    """What one run asks of a mode, read from the sipp command line or the exec options."""

    role: str  # client (connect() gets the kept connection) or server (accept() does)
    per_call_option: str | None = None  # "-t tn" / "-t ln": one kept connection per call
    tls: bool = False
    sipp: bool = True  # False: any program (`fdkeeper exec`), whose arguments mean nothing to us
    transfer: str | None = None  # asked for explicitly (--transfer); None: the mode's own way


@dataclass(frozen=True)
class Capabilities:
    """What a mode can do; ``missing`` names the first need it cannot meet."""

    roles: frozenset[str] = frozenset({"client", "server"})
    per_call_roles: frozenset[str] = frozenset()  # roles in which -t tn/ln per-call sockets work
    tls: bool = True
    any_agent: bool = True  # False: sipp only (the mode rewrites sipp's own arguments)
    transfers: tuple[str, ...] = ("scm",)  # how descriptors reach the program; () none at all
    uses_keeper: bool = True  # False: the mode keeps its connection itself (a converter)

    def missing(self, needs: RunNeeds) -> str | None:
        """None if every need is met, else what cannot be done, as 'cannot ...' completes it."""
        if needs.role not in self.roles:
            return f"run the {needs.role} role"
        if needs.per_call_option and needs.role not in self.per_call_roles:
            return f"hand over per-call sockets ({needs.per_call_option}) in the {needs.role} role"
        if needs.tls and not self.tls:
            return "keep TLS connections"
        if not needs.sipp and not self.any_agent:
            return "run a program other than sipp (it rewrites sipp's own arguments)"
        if needs.transfer and needs.transfer not in self.transfers:
            if not self.transfers:
                return f"hand over descriptors (--transfer {needs.transfer}): it hands over none"
            return f"hand over descriptors by {needs.transfer} (--transfer {needs.transfer})"
        return None


@dataclass(frozen=True)
class HandoffRequest:
    """The facts about one run that every mode needs."""

    program: Path
    args: list[str]  # the program's arguments as it is to run (a TLS sipp run rewrites some)
    role: str
    control_socket: Path  # the keeper's; its directory is the state directory
    remote: Address | None  # the SuT address the program connects to (numeric)
    transport: str = "tcp"  # what the SuT is spoken to with: tcp or tls
    per_call: bool = False  # -t tn/ln client: one kept connection per user, leased at first send
    reconnect: bool = False
    debug: bool = False
    local: Address | None = None  # what sipp binds (-i/-p): the run's identity (keeper/identity.py)
    local_known: bool = True  # False: ``local`` is only the likely one (sipp 3.7 without -p, sipp/binding.py)

    @property
    def directory(self) -> Path:
        return self.control_socket.parent


@dataclass(frozen=True)
class PtraceOptions:
    transfer: str = "scm"  # how the descriptor reaches the program: SCM_RIGHTS or pidfd_getfd


@dataclass(frozen=True)
class UdpOptions:
    """The converter --mode udp starts: TLS towards the SuT, pings, connect bound."""

    tls: TlsOptions | None = None
    keepalive: float | None = None
    connect_timeout: float | None = None
    hide_topology: bool = False


@dataclass(frozen=True)
class ModeOptions:
    """Each mode's own options, typed; a mode reads only its own."""

    ptrace: PtraceOptions = field(default_factory=PtraceOptions)
    udp: UdpOptions = field(default_factory=UdpOptions)


@dataclass
class Handoff:
    """What it takes to start the program under a mode: the command line and environment."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


class Mode(ABC):
    name: str = ""
    summary: str = ""
    suits: str = ""  # for whom, in a hint naming this mode: "dynamically linked programs"
    capabilities: Capabilities = Capabilities()

    def cannot_do(self, needs: RunNeeds) -> str | None:
        """None if this mode can do such a run (wherever it runs), else what it cannot do."""
        return self.capabilities.missing(needs)

    @abstractmethod
    def unsupported_reason(self, program: Path) -> str | None:
        """None if this mode can hand connections to ``program`` here, else one line saying why not."""

    @abstractmethod
    def prepare(self, request: HandoffRequest, options: ModeOptions = ModeOptions()) -> Handoff:
        """The command and environment that start the program with the handoff in place."""

    def run(self, handoff: Handoff) -> int:
        """Start the prepared program, see it through, return its exit status.

        Modes that hand connections over from outside the program (ptrace) override this.
        """
        return spawn(handoff.argv, handoff.env)

    def hint(self) -> str:
        """'--mode NAME (for whom)', for a message that sends the user here."""
        return f"--mode {self.name}" + (f" ({self.suits})" if self.suits else "")
