"""Handoff by conversion: sipp runs on UDP through a converter fdkeeper starts and keeps.

For sipp builds the shim cannot reach (static, setuid) or when nothing may be preloaded:
the run's own arguments, written for -t t1 or -t l1, are rewritten to -t u1 towards the
converter's UDP address, and the converter (fdkeeper/converter.py) holds the TCP or TLS
connection to the SuT across runs. One converter per state directory and SuT address and
transport, detached like the keeper; later runs reuse it and tell it their own sipp address
(-i:-p), where it sends the SuT's initial requests.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from pathlib import Path

from fdkeeper.convert import control_request
from fdkeeper.errors import FdkeeperError
from fdkeeper.process import start_detached
from fdkeeper.modes.base import Handoff, HandoffRequest, Mode
from fdkeeper.sipp.args import FLAG_OPTIONS, PAIR_OPTIONS, SippInvocation
from fdkeeper.statedir import ensure_private_directory
from fdkeeper.tls import TlsOptions

START_TIMEOUT = 15.0


def converter_files(directory: Path, sut: tuple[str, int], transport: str) -> tuple[Path, Path, Path]:
    """(control socket, log, stats file) of the converter for this SuT and transport."""
    name = "convert-" + re.sub(r"[^A-Za-z0-9.]+", "_", f"{sut[0]}-{sut[1]}-{transport}")
    return directory / f"{name}.sock", directory / f"{name}.log", directory / f"{name}.json"


def running_converters(directory: Path) -> list[Path]:
    return sorted(directory.glob("convert-*.sock"))


def ensure_converter(directory: Path, sut: tuple[str, int], transport: str, *, tls: TlsOptions | None = None,
                     keepalive: float | None = None, connect_timeout: float | None = None,
                     hide_topology: bool = False) -> dict:
    """The status of the converter for this SuT, starting a detached one if none answers."""
    control, log_path, stats = converter_files(directory, sut, transport)
    status = _status(control)
    if status is not None:
        return status
    ensure_private_directory(directory)
    command = [sys.executable, "-m", "fdkeeper", "convert", "--listen", "127.0.0.1:0",
               "--sut", _format(sut), "--transport", transport, "--control", os.fspath(control),
               "--stats-file", os.fspath(stats)]
    if keepalive:
        command += ["--keepalive", str(keepalive)]
    if connect_timeout:
        command += ["--connect-timeout", str(connect_timeout)]
    if hide_topology:
        command.append("--hide-topology")
    if tls is not None:
        for option, value in (("--tls-ca", tls.ca), ("--tls-cert", tls.cert), ("--tls-key", tls.key),
                              ("--tls-sni", tls.sni), ("--tls-min-version", tls.min_version)):
            if value:
                command += [option, str(value)]
        if tls.insecure:
            command.append("--tls-insecure")
    return start_detached(command, log_path, lambda: _status(control), "converter", START_TIMEOUT)


def stop_converters(directory: Path) -> int:
    """Stop every converter of a state directory; return how many were running."""
    stopped = 0
    for control in running_converters(directory):
        try:
            control_request(control, "STOP", timeout=5.0)
            stopped += 1
        except OSError:
            control.unlink(missing_ok=True)
    return stopped


def _status(control: Path) -> dict | None:
    try:
        reply = control_request(control, "STATUS", timeout=2.0)
    except (OSError, ValueError):
        return None
    return reply if reply.get("ok") else None


def _format(address: tuple[str, int]) -> str:
    return f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"


def _free_udp_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def positional_indexes(args: list[str]) -> list[int]:
    """Where sipp's positional arguments (the remote host) stand, with sipp's option arity."""
    found, index = [], 0
    while index < len(args):
        word = args[index]
        if not word.startswith("-") or word == "-":
            found.append(index)
            index += 1
            continue
        name = word[1:]
        index += 1 + (0 if name in FLAG_OPTIONS else 2 if name in PAIR_OPTIONS else 1)
    return found


def udp_arguments(invocation: SippInvocation, listen: str, sipp_ip: str, sipp_port: int) -> list[str]:
    """sipp's arguments for -t u1 towards the converter: -t, the remote host, and -i/-p when missing."""
    args = list(invocation.args)
    if invocation.transport_index is not None:
        args[invocation.transport_index + 1] = "u1"
    else:
        args[:0] = ["-t", "u1"]
    positions = positional_indexes(args)
    if positions:
        args[positions[-1]] = listen
    elif invocation.role == "client":
        args.append(listen)
    if invocation.local_ip is None:
        args[:0] = ["-i", sipp_ip]
    if invocation.local_port is None:
        args[:0] = ["-p", str(sipp_port)]
    return args


class UdpMode(Mode):
    name = "udp"
    summary = "sipp on -t u1 through a UDP<->TCP/TLS converter fdkeeper starts and keeps (any sipp build)"

    def unsupported_reason(self, sipp: Path) -> str | None:
        return None  # UDP needs nothing of sipp's build

    def prepare(self, request: HandoffRequest) -> Handoff:
        invocation = request.invocation
        if invocation.per_call_sockets:
            raise FdkeeperError(
                f"fdkeeper: --mode udp keeps one connection for all users; use -t t1 or -t l1 instead of -t {invocation.transport_option}"
            )
        directory = request.control_socket.parent
        remote = request.remote or self._only_converter_sut(directory, request.transport)
        status = ensure_converter(
            directory, remote, request.transport, tls=getattr(request, "tls", None),
            keepalive=getattr(request, "keepalive", None), connect_timeout=getattr(request, "connect_timeout", None),
            hide_topology=bool(getattr(request, "hide_topology", False)),
        )
        control = converter_files(directory, remote, request.transport)[0]
        default = status["links"][0]
        if default["state"] == "closed":
            if not request.reconnect:
                raise FdkeeperError(
                    f"fdkeeper: the converter's connection {default['local']}->{default['remote']}/{default['transport']} "
                    f"was closed ({default['closed_reason']}); run the client scenario again with --reconnect "
                    "for a fresh one (registrations must be redone)"
                )
            reply = control_request(control, "RECONNECT")
            if not reply.get("ok"):
                raise FdkeeperError(reply.get("error") or "fdkeeper: the converter could not reconnect")
            print(f"fdkeeper: the converter's connection to {_format(remote)}/{request.transport} was closed; opened a "
                  "fresh one (--reconnect): registrations made over the old one must be redone", file=sys.stderr, flush=True)
        sipp_ip = invocation.local_ip or "127.0.0.1"
        sipp_port = invocation.local_port or _free_udp_port(sipp_ip)
        reply = control_request(control, f"SIPP {_format((sipp_ip, sipp_port))}")
        if not reply.get("ok"):
            raise FdkeeperError(reply.get("error") or "fdkeeper: the converter refused the sipp address")
        args = udp_arguments(invocation, status["listen"], sipp_ip, sipp_port)
        return Handoff(argv=[os.fspath(request.sipp), *args], env={})

    @staticmethod
    def _only_converter_sut(directory: Path, transport: str) -> tuple[str, int]:
        """A server run without a remote host: the one converter of this directory, if just one runs."""
        candidates = []
        for control in running_converters(directory):
            status = _status(control)
            if status and status["links"][0]["transport"] == transport:
                host, _, port = status["links"][0]["remote"].rpartition(":")
                candidates.append((host.strip("[]"), int(port)))
        if len(candidates) != 1:
            raise FdkeeperError(
                "fdkeeper: --mode udp needs the SuT's address as sipp's remote host argument "
                f"({len(candidates)} converters run for {directory}), e.g. 127.0.0.1:5060"
            )
        return candidates[0]
