"""Reading a sipp command line the way the sipp that runs reads it.

fdkeeper needs a few facts from sipp's arguments: the transport (-t), the remote host (the
one positional argument) and where the connection goes (-rsa, else the remote host), the
local address sipp binds (-i, -p), and whether the scenario starts by sending (client mode)
or by receiving (server mode; see scenario.py). How many words follow each option depends on
the sipp release: fdkeeper/sipp/tables.py has sipp's own option tables. sipp's TLS options
(-tls_cert, -tls_key, -tls_ca, -tls_crl, -tls_version) are fdkeeper's to use, since the keeper
does the TLS: they are taken out of the arguments sipp gets. HOST:PORT is read by
fdkeeper/address.py, as everywhere else.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fdkeeper.address import Address, is_ip, parse_port, resolve, split_host_port
from fdkeeper.errors import FdkeeperError
from fdkeeper.sipp.binding import Binding, sipp_binding
from fdkeeper.sipp.scenario import scenario_role
from fdkeeper.sipp.tables import BROKEN, BROKEN_SINCE, NEWEST, OptionTable, first_release_with

# Options after which sipp prints something and exits: nothing to keep.
INFO_OPTIONS = frozenset({"h", "help", "v", "sd"})
# sipp's TLS options: what each one sets of the keeper's TLS (fdkeeper.tls.TlsOptions).
SIPP_TLS_OPTIONS = {"tls_cert": "cert", "tls_key": "key", "tls_ca": "ca", "tls_crl": "crl", "tls_version": "version"}
# Mixed mode (sipp 3.7.5+): a second, server scenario beside the client one, in one process.
RX_SCENARIO_OPTIONS = frozenset({"rxsf", "rxrn"})

# sipp's embedded scenarios and whether each starts by sending (client) or receiving.
BUILTIN_ROLES = {
    "uac": "client",
    "regexp": "client",
    "branchc": "client",
    "3pcc-C-A": "client",
    "uac_pcap": "client",
    "uas": "server",
    "branchs": "server",
    "3pcc-C-B": "server",
    "3pcc-A": "server",
    "3pcc-B": "server",
    "ooc_default": "server",
}

TRANSPORTS = {
    "u1": "udp", "un": "udp", "ui": "udp",
    "t1": "tcp", "tn": "tcp",
    "l1": "tls", "ln": "tls",
    "s1": "sctp", "sn": "sctp",
    "c1": "udp",
}  # fmt: skip
DEFAULT_SIP_PORT = 5060


@dataclass
class SippInvocation:
    """What fdkeeper needs to know about one sipp command line."""

    args: list[str]  # what sipp gets: as given, less the options fdkeeper uses itself (-tls_*)
    given: list[str] = field(default_factory=list)
    table: OptionTable = NEWEST
    transport_option: str = "u1"
    remote_host: str | None = None
    sending_address: str | None = None  # -rsa HOST[:PORT]: where sipp sends instead of the remote host
    local_ip: str | None = None
    local_port: int | None = None
    scenario_file: Path | None = None
    scenario_name: str | None = "uac"
    info_only: bool = False
    options: dict[str, list[str]] = field(default_factory=dict)
    tls: dict[str, str] = field(default_factory=dict)  # sipp's -tls_* options, by SIPP_TLS_OPTIONS field
    # Where the last -t, -sf/-sn, -rxsf and -rsa and the remote host stand in args, as this sipp
    # reads them, so runs can swap them (scenario.tls_arguments, request.converter_arguments).
    transport_index: int | None = None
    remote_index: int | None = None
    scenario_index: int | None = None
    rx_scenario_index: int | None = None
    sending_index: int | None = None

    @property
    def transport(self) -> str:
        return TRANSPORTS.get(self.transport_option, "unknown")

    @property
    def per_call_sockets(self) -> bool:
        """-t tn / ln: one connection per call instead of one shared connection."""
        return self.transport_option.endswith("n")

    @property
    def per_call_client(self) -> bool:
        """A client scenario on -t tn/ln: the keeper keeps one connection per user, leased at first send."""
        return self.per_call_sockets and self.role == "client"

    @property
    def mixed_mode(self) -> bool:
        """-rxsf: a client scenario plus a server one for what arrives, on the client's connection."""
        return self.rx_scenario_index is not None

    @property
    def role(self) -> str:
        if self.scenario_file is not None:
            return scenario_role(self.scenario_file)
        return BUILTIN_ROLES.get(self.scenario_name or "uac", "client")

    def user_count(self) -> int | None:
        """How many users a per-call run may bring: the -inf file's lines, else -m."""
        files = self.options.get("inf")
        if files:
            try:
                lines = [line for line in Path(files[0]).read_text(errors="replace").splitlines() if line.strip()]
            except OSError:
                raise FdkeeperError(f"fdkeeper: cannot read -inf file {files[0]}; check the path") from None
            header = lines[:1] and lines[0].strip().upper() in ("SEQUENTIAL", "RANDOM", "USER", "SEQUENTIAL,PRINTF")
            return len(lines) - (1 if header else 0)
        calls = self.options.get("m")
        return int(calls[-1]) if calls and calls[-1].isdigit() else None

    def remote_address(self) -> Address | None:
        """Where sipp's connection goes, as numbers (the shim compares addresses, not names).

        That is -rsa when given (an outbound proxy or SBC), else the remote host. sipp resolves
        its remote host even with -rsa (the messages name it) and stops if it cannot, so a run
        whose remote host does not resolve is refused here as sipp would refuse it.
        """
        target = None
        if self.remote_host is not None:
            target = _resolve(*sipp_host_port(self.remote_host), "sipp's remote host")
        if self.sending_address is not None:
            target = _resolve(*sipp_host_port(self.sending_address, "-rsa"), "-rsa")
        return target

    def local_bind(self) -> Address | None:
        """-i and -p as given (port 0 without -p); None with neither. What sipp then binds
        depends on its release: see binding()."""
        if self.local_ip is None and self.local_port is None:
            return None
        ip = _resolve(self.local_ip, 0, "-i")[0] if self.local_ip else "0.0.0.0"
        return ip, self.local_port or 0

    def binding(self, remote: Address | None) -> Binding:
        """Where this run's sipp binds, as the SuT will see it (the run's identity): its client
        connection, or for a server run the -i/-p it listens on (fdkeeper/sipp/binding.py).
        Not always known before sipp binds: sipp 3.7 without -p takes the first free port.
        ``remote``: remote_address(), resolved once by the caller."""
        ip = _resolve(self.local_ip, 0, "-i")[0] if self.local_ip else None
        return sipp_binding(self.table.release, ip, self.local_port, remote)


def parse_sipp_args(args: list[str], table: OptionTable = NEWEST) -> SippInvocation:
    """Read args as the sipp of `table` reads them; one line (FdkeeperError) where sipp would stop."""
    invocation = SippInvocation(args=[], given=list(args), table=table)
    for name, words in _walk(args, table):
        if name is None:
            _set_remote_host(invocation, words[0])
            invocation.remote_index = len(invocation.args)
        elif name in SIPP_TLS_OPTIONS:
            invocation.tls[SIPP_TLS_OPTIONS[name]] = words[1]
            continue  # the keeper does the TLS: sipp never sees these
        else:
            invocation.options.setdefault(name, []).extend(words[1:])
            _apply_option(invocation, name, words[1:], index=len(invocation.args))
        invocation.args.extend(words)
    return invocation


def _walk(args: list[str], table: OptionTable) -> Iterator[tuple[str | None, list[str]]]:
    """(option name or None for a positional word, the words it takes up), with sipp's arities."""
    index = 0
    while index < len(args):
        word = args[index]
        if not word.startswith("-"):
            yield None, [word]
            index += 1
            continue
        name = word[2:] if word.startswith("--") else word[1:]  # sipp takes -opt and --opt alike
        arity = _arity(table, name, word)
        words = args[index : index + 1 + arity]
        if len(words) <= arity:
            raise FdkeeperError(f"fdkeeper: sipp option {word} needs a value; see 'sipp -h'")
        yield name, words
        index += 1 + arity


def _arity(table: OptionTable, name: str, word: str) -> int:
    arity = table.arity(name)
    broken = name in BROKEN and table.release >= BROKEN_SINCE
    if arity is not None and not broken:
        return arity
    if broken:
        raise FdkeeperError(f"fdkeeper: {word}: {BROKEN[name]}")
    first = first_release_with(name)
    since = (
        f" (sipp {first.label} and later have it: pass --sipp PATH to one)"
        if first and first.release > table.release
        else ""
    )
    raise FdkeeperError(f"fdkeeper: sipp {table.label} has no option {word}{since}; see 'sipp -h'")


def _set_remote_host(invocation: SippInvocation, word: str) -> None:
    if invocation.remote_host is not None:  # sipp: "remote_host given multiple times"
        raise FdkeeperError(
            f"fdkeeper: sipp takes one remote host, got {invocation.remote_host!r} and {word!r}; "
            "check for an option missing its dash or a value with a space"
        )
    invocation.remote_host = word


def _apply_option(invocation: SippInvocation, name: str, values: list[str], index: int) -> None:
    if name in INFO_OPTIONS:
        invocation.info_only = True
    elif name == "t":
        invocation.transport_option, invocation.transport_index = values[0], index
    elif name == "i":
        invocation.local_ip = values[0]
    elif name == "p":
        invocation.local_port = _port(values[0], "-p")
    elif name == "rsa":
        invocation.sending_address, invocation.sending_index = values[0], index
    elif name in ("sf", "sn"):
        path = Path(values[0]) if name == "sf" else None
        invocation.scenario_file, invocation.scenario_name = path, None if path else values[0]
        invocation.scenario_index = index
    elif name in RX_SCENARIO_OPTIONS:
        invocation.rx_scenario_index = index


def remote_is_name(invocation: SippInvocation) -> str | None:
    """The remote host if it is a DNS name (the TLS server name to send), None for an address."""
    if invocation.remote_host is None:
        return None
    host, _ = sipp_host_port(invocation.remote_host)
    return None if is_ip(host) else host


def _port(text: str, option: str) -> int:
    try:
        port = parse_port(text)
    except ValueError:
        port = 0
    if port == 0:
        raise FdkeeperError(f"fdkeeper: {option} {text!r} is not a port number (1-65535)")
    return port


def sipp_host_port(text: str, option: str = "remote host") -> tuple[str, int]:
    """sipp's HOST[:PORT] (``[IPv6]:port`` too); the port defaults to 5060, as in sipp."""
    try:
        return split_host_port(text, DEFAULT_SIP_PORT)
    except ValueError as error:
        what = "sipp's remote host argument" if option == "remote host" else option
        raise FdkeeperError(f"fdkeeper: {option} {error}; check {what}") from None


def _resolve(host: str, port: int, what: str) -> Address:
    """HOST as sipp resolves it (getaddrinfo, the first answer)."""
    try:
        return resolve(host, port)
    except (OSError, UnicodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise FdkeeperError(f"fdkeeper: cannot resolve {host!r} ({what}): {reason}; check the name") from None
