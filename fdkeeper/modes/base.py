"""The contract every handoff mode keeps: what it can do, and how it starts a program.

A mode is one way of getting a kept connection into a program: the LD_PRELOAD shim inside
it, ptrace injection from outside it, or a UDP converter in front of it. Each mode declares
its ``Capabilities``; a run states its ``RunNeeds``; ``choose_mode`` (modes/__init__.py)
refuses a run a mode cannot do before asking whether the mode can run here at all
(``unsupported_reason``), as sshuttle's methods check their features before they start.
``prepare`` turns a ``HandoffRequest`` into a ``Handoff`` that runs itself.

Modes know no program's options: what a run needs of sipp's arguments is decided in sipp/
and handed here as plain data (``HandoffRequest.args``, ``ConverterArguments``), so every
mode that can serves any program (`fdkeeper exec`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from fdkeeper.address import Address
from fdkeeper.process import spawn
from fdkeeper.protocol import OVER_TLS, OVER_WEBSOCKET
from fdkeeper.tls import TlsOptions

TRANSFERS = ("scm", "pidfd")
# --ws: SIP over WebSocket over the transport the run names (sipp's -t, exec's --transport).
WEBSOCKET_OVER = {"tcp": "ws", "tls": "wss"}


@dataclass(frozen=True)
class RunNeeds:
    """What one run asks of a mode, read from the sipp command line or the exec options."""

    role: str  # client (connect() gets the kept connection) or server (accept() does)
    per_call_option: str | None = None  # "-t tn" / "-t ln": one kept connection per call
    transport: str = "tcp"  # what the SuT is spoken to with (HandoffRequest.transport)
    sipp: bool = True  # False: any program (`fdkeeper exec`), whose arguments mean nothing to us
    transfer: str | None = None  # asked for explicitly (--transfer); None: the mode's own way

    @property
    def tls(self) -> bool:
        return self.transport in OVER_TLS

    @property
    def websocket(self) -> bool:
        """ws/wss: the keeper speaks WebSocket and leases a socketpair end, as for tls."""
        return self.transport in OVER_WEBSOCKET


@dataclass(frozen=True)
class Capabilities:
    """What a mode can do; ``missing`` names the first need it cannot meet."""

    roles: frozenset[str] = frozenset({"client", "server"})
    per_call_roles: frozenset[str] = frozenset()  # roles in which -t tn/ln per-call sockets work
    tls: bool = True
    websocket: bool = True  # False: the mode's own connection cannot speak WebSocket (the converter)
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
        if needs.websocket and not self.websocket:
            return "keep WebSocket connections (--ws)"
        if not needs.sipp and not self.any_agent:
            return "run a program other than sipp (it rewrites sipp's own arguments)"
        if needs.transfer and needs.transfer not in self.transfers:
            if not self.transfers:
                return f"hand over descriptors (--transfer {needs.transfer}): it hands over none"
            return f"hand over descriptors by {needs.transfer} (--transfer {needs.transfer})"
        return None


@dataclass(frozen=True)
class ConverterArguments:
    """A program's arguments for a run through a converter (--mode udp), from the caller that
    knows the program's options (sipp: sipp/request.py), as plain data: the mode fills in only
    what it learns itself, the converter's address and, where the caller left it open, the port
    the program sends from."""

    args: tuple[str, ...]  # the transport already UDP; placeholders at the indexes below
    converter_index: int | None  # becomes the converter's IP:PORT; None: nothing names it (a server run)
    local_ip: str  # where the program sends from: the address attached at the converter
    local_port: int = 0  # 0: the mode picks a free port and writes it at port_index
    port_index: int | None = None

    def __post_init__(self) -> None:
        if (self.local_port == 0) != (self.port_index is not None):
            raise ValueError("ConverterArguments: a port_index goes with local_port 0 (the mode picks it), only then")

    def filled(self, converter: str, local_port: int) -> list[str]:
        """The program's arguments towards the converter at ``converter``, sending from ``local_port``."""
        args = list(self.args)
        if self.converter_index is not None:
            args[self.converter_index] = converter
        if self.port_index is not None:
            args[self.port_index] = str(local_port)
        return args


@dataclass(frozen=True)
class HandoffRequest:
    """The facts about one run that every mode needs."""

    program: Path
    args: list[str]  # the program's arguments as it is to run (a TLS sipp run rewrites some)
    role: str
    control_socket: Path  # the keeper's; its directory is the state directory
    remote: Address | None  # the SuT address the program connects to (numeric)
    transport: str = "tcp"  # what the SuT is spoken to with: tcp, tls, ws or wss (protocol.TRANSPORTS)
    per_call: bool = False  # -t tn/ln client: one kept connection per user, leased at first send
    reconnect: bool = False
    debug: bool = False
    local: Address | None = None  # what sipp binds (-i/-p): the run's identity (keeper/identity.py)
    local_known: bool = True  # False: ``local`` is only the likely one (sipp 3.7 without -p, sipp/binding.py)
    converter: ConverterArguments | None = None  # --mode udp's arguments; None: nobody can rewrite them

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
    """A prepared run: the command line and environment that start the program with the handoff
    in place. ``run`` starts it and sees it through; a mode that does more around the program
    (ptrace: the tracer; udp: the converter's attachment) returns a Handoff of its own that does."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def run(self) -> int:
        """Start the program, wait for it, return its exit status (128+N if signal N ended it)."""
        return spawn(self.argv, self.env)


class Mode(ABC):
    """One way of getting a kept connection into a program: what it can do, whether it can run
    here, and the handoff it prepares for a run."""

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
        """The handoff that starts the program with the connection handed over: ``.run()`` it."""

    def hint(self) -> str:
        """'--mode NAME (for whom)', for a message that sends the user here."""
        return f"--mode {self.name}" + (f" ({self.suits})" if self.suits else "")
