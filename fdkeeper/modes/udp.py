"""Handoff by conversion: sipp runs on UDP through a converter fdkeeper starts and keeps.

For sipp builds the shim cannot reach (static, setuid) or when nothing may be preloaded:
the run's own arguments, written for -t t1 or -t l1, are rewritten to -t u1 towards the
converter's UDP address, and the converter (fdkeeper/convert/) holds the TCP or TLS
connection to the SuT across runs. One converter per state directory and SuT address and
transport, detached like the keeper; later runs reuse it. Each run attaches its own sipp
address (-i:-p) before sipp starts and detaches it when sipp ends: the converter takes
datagrams only from attached runs (--attached-only: no other local user reaches the SuT
through our session), sends the SuT's initial requests to the run attached last, and keeps
those arriving while none is attached for the next one. The mode keeps its connection itself
(no keeper) and needs the program's arguments rewritten towards the converter, which only the
caller that knows them can do (``HandoffRequest.converter``, for sipp from sipp/request.py),
so it runs sipp only: see its capabilities.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fdkeeper.address import Address, family_of, format_address, split_host_port
from fdkeeper.errors import FdkeeperError
from fdkeeper.modes.base import (
    Capabilities,
    ConverterArguments,
    Handoff,
    HandoffRequest,
    Mode,
    ModeOptions,
    UdpOptions,
)
from fdkeeper.process import start_detached
from fdkeeper.statedir import MAX_SOCKET_PATH, check_private_directory, check_socket_path, ensure_private_directory

START_TIMEOUT = 15.0

# A converter's JSON reply (STATUS, ATTACH...) or an object in one (a link), as convert/control.py writes it.
JsonObject = dict[str, Any]


def converter_files(
    directory: Path, sut: tuple[str, int], transport: str, identity: Address | None = None
) -> tuple[Path, Path, Path]:
    """(control socket, log, stats file) of the converter for this SuT, transport and identity
    (keeper/identity.py; None: the shared converter of runs without -p)."""
    name = "convert-" + re.sub(r"[^A-Za-z0-9.]+", "_", f"{sut[0]}-{sut[1]}-{transport}")
    if identity is not None:
        name += "-from-" + re.sub(r"[^A-Za-z0-9.]+", "_", f"{identity[0]}-{identity[1]}")
    if len(os.fsencode(directory / f"{name}.sock")) > MAX_SOCKET_PATH:  # a deep directory: a short name, as stable
        name = "convert-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    check_socket_path(directory / f"{name}.sock")  # deeper still: one line, not OSError's "path too long"
    return directory / f"{name}.sock", directory / f"{name}.log", directory / f"{name}.json"


def running_converters(directory: Path) -> list[Path]:
    try:
        check_private_directory(directory)  # before any socket in it is touched
    except FileNotFoundError:
        return []
    return sorted(directory.glob("convert-*.sock"))


def converter_statuses(directory: Path) -> list[JsonObject]:
    """The STATUS of every converter of this state directory that answers."""
    return [status for status in map(_status, running_converters(directory)) if status is not None]


def ensure_converter(
    directory: Path, sut: Address, transport: str, options: UdpOptions = UdpOptions(), local: Address | None = None
) -> JsonObject:
    """The status of the converter for this SuT and the identity of ``local`` (what plain sipp
    would bind, keeper/identity.py), starting a detached one if none answers. Its connection
    comes from ``local``, as plain sipp's would; runs without an identity share one."""
    identity = identity_of(local, sut)
    control, log_path, stats = converter_files(directory, sut, transport, identity)
    ensure_private_directory(directory)  # before the socket is touched
    status = _status(control)
    if status is not None:
        return status
    command = [
        sys.executable,
        "-m",
        "fdkeeper",
        "convert",
        "--listen",
        "127.0.0.1:0",
        "--sut",
        format_address(sut),
        "--transport",
        transport,
        "--control",
        os.fspath(control),
        "--stats-file",
        os.fspath(stats),
        "--attached-only",
    ]
    if identity is not None and local is not None:
        command += ["--local", format_address(local)]
    return start_detached(
        command + _converter_options(options), log_path, lambda: _status(control), "converter", START_TIMEOUT
    )


def _converter_options(options: UdpOptions) -> list[str]:
    """`fdkeeper convert` options for the converter's own settings."""
    command = []
    if options.keepalive:
        command += ["--keepalive", str(options.keepalive)]
    if options.connect_timeout:
        command += ["--connect-timeout", str(options.connect_timeout)]
    if options.hide_topology:
        command.append("--hide-topology")
    tls = options.tls
    if tls is not None:
        for option, value in (
            ("--tls-ca", tls.ca),
            ("--tls-cert", tls.cert),
            ("--tls-key", tls.key),
            ("--tls-sni", tls.sni),
            ("--tls-min-version", tls.min_version),
        ):
            if value:
                command += [option, str(value)]
        if tls.insecure:
            command.append("--tls-insecure")
    return command


def stop_converters(directory: Path) -> int:
    """Stop every converter of a state directory; return how many were running."""
    stopped = 0
    for control in running_converters(directory):
        try:
            _control(control, "STOP", timeout=5.0)
            stopped += 1
        except OSError:
            control.unlink(missing_ok=True)
    return stopped


def _control(path: Path, request: str, timeout: float = 5.0) -> JsonObject:
    """One exchange with a converter. The converter package is imported on use: every run
    imports this module (the mode table), whatever its mode, and only udp runs need it."""
    from fdkeeper.convert import control_request

    return control_request(path, request, timeout)


def _status(control: Path) -> JsonObject | None:
    try:
        reply = _control(control, "STATUS", timeout=2.0)
    except (OSError, ValueError):
        return None
    return reply if reply.get("ok") else None


def identity_of(local: Address | None, sut: Address) -> Address | None:
    """keeper/identity.py's, imported on use: importing the keeper package costs every run 45 ms."""
    from fdkeeper.keeper.identity import identity_of as keeper_identity_of

    return keeper_identity_of(local, sut)


def _free_udp_port(host: str) -> int:
    with socket.socket(family_of(host), socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(kw_only=True)
class UdpHandoff(Handoff):
    """A udp run: the program, then its address detached from the converter it was attached to
    (requests arriving from then on wait for the next run)."""

    control: Path
    sipp_address: Address

    def run(self) -> int:
        try:
            return super().run()
        finally:
            try:
                _control(self.control, f"DETACH {format_address(self.sipp_address)}")
            except (OSError, ValueError):
                pass  # the converter is gone: nothing stays attached


class UdpMode(Mode):
    name = "udp"
    summary = "sipp on -t u1 through a UDP<->TCP/TLS converter fdkeeper starts and keeps (any sipp build)"
    suits = "any sipp build"
    # One converter connection for all users; sipp's arguments are rewritten, so sipp only; the
    # converter speaks TCP or TLS to the SuT, not WebSocket.
    capabilities = Capabilities(websocket=False, any_agent=False, transfers=(), uses_keeper=False)

    def unsupported_reason(self, sipp: Path) -> str | None:
        return None  # UDP needs nothing of sipp's build

    def prepare(self, request: HandoffRequest, options: ModeOptions = ModeOptions()) -> Handoff:
        arguments = self._arguments(request)
        remote = request.remote or self._only_converter_sut(request.directory, request.transport)
        control, status = self._converter(request, remote, options.udp)
        if status["links"][0]["state"] == "closed":
            self._reconnect(control, status["links"][0], remote, request)
        sipp_ip = arguments.local_ip
        sipp_port = arguments.local_port or _free_udp_port(sipp_ip)
        # Attached before sipp starts, so the converter takes its first datagram; the pid lets
        # the converter drop the attachment when this process dies without detaching.
        reply = _control(control, f"ATTACH {format_address((sipp_ip, sipp_port))} {os.getpid()}")
        if not reply.get("ok") and "unknown control request" in reply.get("error", ""):
            raise FdkeeperError(
                f"fdkeeper: the converter running for {format_address(remote)} (pid {status['pid']}) is "
                "from an older fdkeeper that cannot attach runs; run 'fdkeeper stop' to replace it"
            )
        if not reply.get("ok"):
            raise FdkeeperError(reply.get("error") or "fdkeeper: the converter refused the sipp address")
        args = arguments.filled(status["listen"], sipp_port)
        return UdpHandoff(
            argv=[os.fspath(request.program), *args], env={}, control=control, sipp_address=(sipp_ip, sipp_port)
        )

    @staticmethod
    def _arguments(request: HandoffRequest) -> ConverterArguments:
        """The caller's rewrite of the program's arguments towards a converter (capabilities refuse
        a run without one before this, unless a library caller forgot it)."""
        if request.converter is None:
            raise FdkeeperError(
                f"fdkeeper: --mode udp needs {request.program}'s arguments rewritten for UDP "
                "(HandoffRequest.converter; for sipp, fdkeeper.sipp.request.sipp_request builds it)"
            )
        return request.converter

    @staticmethod
    def _reconnect(control: Path, link: JsonObject, remote: Address, request: HandoffRequest) -> None:
        """The converter's connection was closed: a fresh one with --reconnect, else one clear line."""
        if not request.reconnect:
            raise FdkeeperError(
                f"fdkeeper: the converter's connection {link['local']}->{link['remote']}/{link['transport']} "
                f"was closed ({link['closed_reason']}); run the client scenario again with --reconnect "
                "for a fresh one (registrations must be redone)"
            )
        reply = _control(control, "RECONNECT")
        if not reply.get("ok"):
            raise FdkeeperError(reply.get("error") or "fdkeeper: the converter could not reconnect")
        print(
            f"fdkeeper: the converter's connection to {format_address(remote)}/{request.transport} was closed; "
            "opened a fresh one (--reconnect): registrations made over the old one must be redone",
            file=sys.stderr,
            flush=True,
        )

    @classmethod
    def _converter(cls, request: HandoffRequest, remote: Address, options: UdpOptions) -> tuple[Path, JsonObject]:
        """The converter of this run's identity (what plain sipp would bind: its connection comes
        from there), started if need be. A server run, which never connects, only uses one that
        runs: its own, else one running for its SuT, as the keeper hands such a run the
        connections no run holds."""
        # Only a certain identity: a guessed port (sipp 3.7 without -p) taken before the converter
        # binds it would stop the run, where sipp would have moved on to the next one.
        local = request.local if request.local_known else None
        own = converter_files(request.directory, remote, request.transport, identity_of(local, remote))[0]
        if request.role == "server":
            found = cls._running_for(request.directory, remote, request.transport, own)
            if found is None:  # as through the keeper: a server scenario opens no connection
                raise FdkeeperError(
                    f"fdkeeper: no converter runs for {format_address(remote)}/{request.transport} in "
                    f"{request.directory}; run a client scenario first with --mode udp (fdkeeper status lists them)",
                    "none",
                )
            return found
        return own, ensure_converter(request.directory, remote, request.transport, options, local)

    @staticmethod
    def _running_for(directory: Path, remote: Address, transport: str, own: Path) -> tuple[Path, JsonObject] | None:
        """A running converter for a server run: its own, the shared one, else the only one there is."""
        for control in dict.fromkeys((own, converter_files(directory, remote, transport)[0])):
            status = _status(control)
            if status is not None:
                return control, status
        others: list[tuple[Path, JsonObject]] = []
        for control in running_converters(directory):
            status = _status(control)
            link = status["links"][0] if status else None
            if status and link and link["transport"] == transport and split_host_port(link["remote"]) == remote:
                others.append((control, status))
        if len(others) != 1:
            return None
        print(
            f"fdkeeper: no converter has this run's -i/-p; answering through the one connected from "
            f"{others[0][1]['links'][0]['local']} (give the register run the same -i/-p to make it this run's)",
            file=sys.stderr,
            flush=True,
        )
        return others[0]

    @staticmethod
    def _only_converter_sut(directory: Path, transport: str) -> Address:
        """A server run without a remote host: the one SuT converters of this directory talk to."""
        candidates = set()
        for control in running_converters(directory):
            status = _status(control)
            if status and status["links"][0]["transport"] == transport:
                candidates.add(split_host_port(status["links"][0]["remote"]))
        if len(candidates) != 1:
            raise FdkeeperError(
                "fdkeeper: --mode udp needs the SuT's address as sipp's remote host argument "
                f"({len(candidates)} converters run for {directory}), e.g. 127.0.0.1:5060"
            )
        return candidates.pop()
