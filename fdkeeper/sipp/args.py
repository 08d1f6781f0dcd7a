"""Reading a sipp command line the way sipp 3.6.1 reads it, without changing it.

fdkeeper needs four facts from sipp's arguments: the transport (-t), the remote host
(the one positional argument), the local address sipp binds (-i, -p), and whether the
scenario starts by sending (client mode) or by receiving (server mode). The arity table
below follows sipp's own option table (src/sipp.cpp, options_table).
"""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import tempfile
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

from fdkeeper.errors import FdkeeperError
from fdkeeper.protocol import Address

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
        host, port = split_host_port(self.remote_host)
        return resolve(host, port)

    def local_bind(self) -> Address | None:
        """The local address sipp 3.6.1 binds its -t t1 client connection to.

        -i IP gives the address, -p PORT the port (src/socket.cpp: set_bind_port(user_port));
        with neither, sipp binds the wildcard address and an ephemeral port, i.e. nothing.
        """
        if self.local_ip is None and self.local_port is None:
            return None
        ip = resolve(self.local_ip, 0)[0] if self.local_ip else "0.0.0.0"
        return ip, self.local_port or 0


def parse_sipp_args(args: list[str]) -> SippInvocation:
    invocation = SippInvocation(args=list(args))
    index = 0
    while index < len(args):
        word = args[index]
        if not word.startswith("-") or word == "-":
            invocation.remote_host = word  # sipp: the last positional wins
            index += 1
            continue
        name = word[1:]
        arity = 0 if name in FLAG_OPTIONS else 2 if name in PAIR_OPTIONS else 1
        values = args[index + 1 : index + 1 + arity]
        if len(values) < arity:
            raise FdkeeperError(f"fdkeeper: sipp option {word} needs a value; see 'sipp -h'")
        invocation.options.setdefault(name, []).extend(values)
        _apply_option(invocation, name, values)
        if name == "t":
            invocation.transport_index = index
        elif name in ("sf", "sn"):
            invocation.scenario_index = index
        index += 1 + arity
    return invocation


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
    host, _ = split_host_port(invocation.remote_host)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None


def tls_arguments(invocation: SippInvocation, sipp: Path, directory: Path) -> tuple[list[str], Path]:
    """sipp arguments for a TLS run with a sipp that only speaks TCP to the keeper.

    -t l1 becomes -t t1 (ln: tn), and the scenario is copied with [transport] written out as TLS,
    so every Via and transport= parameter the scenario builds from [transport] says TLS,
    as a TLS-enabled sipp would have sent. Returns the arguments and the copy (to delete).
    """
    args = list(invocation.args)
    args[invocation.transport_index + 1] = "t" + invocation.transport_option[1]  # l1 -> t1, ln -> tn
    if invocation.scenario_file is not None:
        text = invocation.scenario_file.read_text(encoding="iso-8859-1")
        stem = invocation.scenario_file.stem
    else:
        text = _builtin_scenario(sipp, invocation.scenario_name or "uac")
        stem = invocation.scenario_name or "uac"
    copy = Path(tempfile.mkstemp(prefix=f"{stem}.", suffix=".tls.xml", dir=directory)[1])
    copy.write_text(text.replace("[transport]", "TLS"), encoding="iso-8859-1")
    if invocation.scenario_index is None:
        args[:0] = ["-sf", str(copy)]
    else:
        args[invocation.scenario_index : invocation.scenario_index + 2] = ["-sf", str(copy)]
    return args, copy


def _builtin_scenario(sipp: Path, name: str) -> str:
    dumped = subprocess.run([str(sipp), "-sd", name], capture_output=True, text=True, encoding="iso-8859-1")
    if "<scenario" not in dumped.stdout:  # sipp -sd exits 99 even when it dumped one
        raise FdkeeperError(f"fdkeeper: sipp has no embedded scenario {name!r}; check -sn")
    return dumped.stdout[dumped.stdout.index("<?xml") if "<?xml" in dumped.stdout else 0 :]


def _port(text: str, option: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise FdkeeperError(f"fdkeeper: {option} {text!r} is not a port number")
    return int(text)


def split_host_port(text: str) -> tuple[str, int]:
    """sipp's remote_host[:remote_port], with [IPv6]:port."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    return host, _port(port_text, "remote port") if port_text else DEFAULT_SIP_PORT


def resolve(host: str, port: int) -> Address:
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise FdkeeperError(f"fdkeeper: cannot resolve {host!r}: {error.strerror}; check the address") from None
    address = info[0][4]
    return address[0], address[1]


def scenario_role(path: Path) -> str:
    """client if the scenario's first message element is a <send>, server if a <recv>."""
    try:
        root = ElementTree.parse(path).getroot()
    except FileNotFoundError:
        raise FdkeeperError(f"fdkeeper: scenario file {path} not found; check -sf") from None
    except ElementTree.ParseError as error:
        raise FdkeeperError(f"fdkeeper: scenario file {path} is not valid XML ({error}); check -sf") from None
    for element in root:
        if element.tag == "send":
            return "client"
        if element.tag == "recv":
            return "server"
    raise FdkeeperError(f"fdkeeper: scenario file {path} has no <send> or <recv>; check -sf")
