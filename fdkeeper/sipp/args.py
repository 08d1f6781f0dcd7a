"""Reading a sipp command line the way sipp 3.6.1 reads it, without changing it.

fdkeeper needs four facts from sipp's arguments: the transport (-t), the remote host
(the one positional argument), the local address sipp binds (-i, -p), and whether the
scenario starts by sending (client mode) or by receiving (server mode; see scenario.py).
The tables below are data taken from sipp's own option table (src/sipp.cpp, options_table);
HOST:PORT is read by fdkeeper/address.py, as everywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from fdkeeper.address import Address, is_ip, parse_port, resolve, split_host_port
from fdkeeper.errors import FdkeeperError
from fdkeeper.sipp.scenario import scenario_role

# Options that take no value (SETFLAG, UNSETFLAG, HELP, VERSION in sipp's table).
FLAG_OPTIONS = frozenset(
    """bind_local bg nostdin skip_rlimit aa pause_msg_ign callid_slash_ign rtp_echo timeout_error
    trace_stat periodic_rtd trace_msg trace_shortmsg trace_counts trace_err trace_error_codes
    trace_timeout trace_calldebug trace_screen trace_rtt trace_logs nd no_rate_quit nr h help v""".split()
)
# Options that take two values.
PAIR_OPTIONS = frozenset({"key", "set", "infindex"})
# Options after which sipp prints something and exits: nothing to keep.
INFO_OPTIONS = frozenset({"h", "help", "v", "sd"})

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


def option_arity(name: str) -> int:
    """How many values sipp's option -NAME takes."""
    return 0 if name in FLAG_OPTIONS else 2 if name in PAIR_OPTIONS else 1


@dataclass
class SippInvocation:
    """What fdkeeper needs to know about one sipp command line."""

    args: list[str]
    transport_option: str = "u1"
    remote_host: str | None = None
    local_ip: str | None = None
    local_port: int | None = None
    scenario_file: Path | None = None
    scenario_name: str | None = "uac"
    info_only: bool = False
    options: dict[str, list[str]] = field(default_factory=dict)
    # Where the last -t and -sf/-sn stand in args, so a TLS run can swap them (tls_arguments).
    transport_index: int | None = None
    scenario_index: int | None = None

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
        """The SuT address as numbers (the shim compares addresses, not names)."""
        if self.remote_host is None:
            return None
        return _resolve(*sipp_host_port(self.remote_host))

    def local_bind(self) -> Address | None:
        """The local address sipp 3.6.1 binds its -t t1 client connection to.

        -i IP gives the address, -p PORT the port (src/socket.cpp: set_bind_port(user_port));
        with neither, sipp binds the wildcard address and an ephemeral port, i.e. nothing.
        """
        if self.local_ip is None and self.local_port is None:
            return None
        ip = _resolve(self.local_ip, 0)[0] if self.local_ip else "0.0.0.0"
        return ip, self.local_port or 0


def parse_sipp_args(args: list[str]) -> SippInvocation:
    invocation = SippInvocation(args=list(args))
    for index, name, values in _walk(args):
        if name is None:
            invocation.remote_host = values[0]  # sipp: the last positional wins
            continue
        invocation.options.setdefault(name, []).extend(values)
        _apply_option(invocation, name, values)
        if name == "t":
            invocation.transport_index = index
        elif name in ("sf", "sn"):
            invocation.scenario_index = index
    return invocation


def positional_indexes(args: list[str]) -> list[int]:
    """Where sipp's positional arguments (the remote host) stand."""
    return [index for index, name, _values in _walk(args) if name is None]


def _walk(args: list[str]) -> Iterator[tuple[int, str | None, list[str]]]:
    """(index, option name or None for a positional word, the values) of each word, with sipp's arity."""
    index = 0
    while index < len(args):
        word = args[index]
        if not word.startswith("-") or word == "-":
            yield index, None, [word]
            index += 1
            continue
        arity = option_arity(word[1:])
        values = args[index + 1 : index + 1 + arity]
        if len(values) < arity:
            raise FdkeeperError(f"fdkeeper: sipp option {word} needs a value; see 'sipp -h'")
        yield index, word[1:], values
        index += 1 + arity


def _apply_option(invocation: SippInvocation, name: str, values: list[str]) -> None:
    if name in INFO_OPTIONS:
        invocation.info_only = True
    elif name == "t":
        invocation.transport_option = values[0]
    elif name == "i":
        invocation.local_ip = values[0]
    elif name == "p":
        invocation.local_port = _port(values[0], "-p")
    elif name == "sf":
        invocation.scenario_file, invocation.scenario_name = Path(values[0]), None
    elif name == "sn":
        invocation.scenario_file, invocation.scenario_name = None, values[0]


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
        raise FdkeeperError(f"fdkeeper: {option} {text!r} is not a port number")
    return port


def sipp_host_port(text: str) -> tuple[str, int]:
    """sipp's remote_host[:remote_port] (``[IPv6]:port`` too); the port defaults to 5060."""
    try:
        return split_host_port(text, DEFAULT_SIP_PORT)
    except ValueError as error:
        raise FdkeeperError(f"fdkeeper: remote host {error}; check sipp's remote host argument") from None


def _resolve(host: str, port: int) -> Address:
    try:
        return resolve(host, port)
    except OSError as error:
        raise FdkeeperError(f"fdkeeper: cannot resolve {host!r}: {error.strerror}; check the address") from None
