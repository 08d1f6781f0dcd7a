"""Talking to a keeper from Python, and starting one when none answers."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from fdkeeper.errors import FdkeeperError
from fdkeeper.process import start_detached
from fdkeeper.protocol import ReceivedJson, Reply, format_message, parse_reply, receive_packet
from fdkeeper.statedir import (
    LOCK_NAME,
    LOG_NAME,
    NotPrivate,
    connect_control_socket,
    dead_keeper_notice,
    ensure_private_directory,
    keeper_runs,
    socket_path,
)

START_TIMEOUT = 10.0
PING_TIMEOUT = 2.0
STOP_TIMEOUT = 5.0
T = TypeVar("T")


class Leased:
    """Kept connections leased to this process, in the keeper's order."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.fds: list[int] = []
        self.peers: list[str] = []  # the SuT side of each (for TLS: the keeper's connection's peer)
        self.locals: list[str] = []

    def add(self, fields: dict[str, str], fds: list[int]) -> None:
        """One reply packet's share: its ids=, peers=, locals= and the descriptors it carried."""
        self.ids += [int(i) for i in fields["ids"].split(",")]
        self.fds += fds
        self.peers += fields.get("peers", "").split(",")
        self.locals += fields.get("locals", "").split(",")


class KeeperClient:
    """One request per control connection, as the shim does it."""

    def __init__(self, directory: Path, timeout: float = 10.0) -> None:
        self.directory = directory
        self.path = socket_path(directory)
        self.timeout = timeout

    def _connect(self, timeout: float) -> socket.socket:
        return connect_control_socket(self.path, timeout)

    def exchange(self, message: bytes, timeout: float | None = None) -> list[bytes]:
        """Send one request; return every reply packet up to the final one."""
        timeout = timeout or self.timeout
        try:
            return self._exchange(message, timeout)
        except TimeoutError:
            raise self.not_answering(timeout) from None

    def not_answering(self, timeout: float) -> FdkeeperError:
        """A keeper that holds its lock but did not answer in time: saturated, stopped, or stuck."""
        return FdkeeperError(
            f"fdkeeper: the keeper at {self.directory} (pid {self._keeper_pid()}) did not answer within {timeout:g} s "
            "(too many control clients? stopped with SIGSTOP?); try again, or see "
            f"{self.directory / LOG_NAME}",
            "timeout",
        )

    def _keeper_pid(self) -> str:
        try:
            return (self.directory / LOCK_NAME).read_text().strip() or "?"
        except OSError:
            return "?"

    def _exchange(self, message: bytes, timeout: float) -> list[bytes]:
        with self._connect(timeout) as sock:
            _send_request(sock, message)
            packets = []
            while True:
                data, fds = _receive_reply(sock)
                for fd in fds:
                    os.close(fd)
                if not data:
                    raise FdkeeperError(f"fdkeeper: the keeper at {self.path} closed the connection mid-reply")
                packets.append(data)
                if not data.startswith(b"JSON "):
                    return packets

    def request(self, message: bytes, timeout: float | None = None) -> Reply:
        reply = parse_reply(self.exchange(message, timeout)[-1])
        if not reply.ok:
            raise FdkeeperError(reply.text or f"fdkeeper: keeper error {reply.code}", reply.code)
        return reply

    def alive(self) -> Reply | None:
        try:
            return self.request(b"PING", timeout=PING_TIMEOUT)
        except NotPrivate:
            raise  # another user's directory or keeper: starting one of ours would not help
        except FdkeeperError as error:
            if error.code == "limit":
                raise  # it runs, and said why it cannot serve us: its line says it best
            return None
        except OSError:
            return None

    def status(self, **filters: object) -> ReceivedJson:
        """The keeper's status; ``filters`` (state=, aor=, remote=, transport=, count=True) are
        applied by the keeper, so a count of 10,000 connections is one short reply.

        A keeper too old for filters refuses them as unknown tokens: then every connection is
        returned and the caller filters (report.select_connections), as it did before. A bad
        filter value is the keeper's one-line error, as any other."""
        try:
            return self._status(format_message("STATUS", **filters))
        except FdkeeperError as error:
            if filters and error.code == "badrequest" and "bad token" in str(error):
                return self._status(b"STATUS")
            raise

    def _status(self, message: bytes) -> ReceivedJson:
        packets = self._require_running(lambda: self.exchange(message))
        reply = parse_reply(packets[-1])
        if packets[-1] != b"END":  # ERR limit at the client cap, say: the keeper's own line
            raise FdkeeperError(reply.text or f"fdkeeper: keeper error {reply.code}", reply.code or "internal")
        status: ReceivedJson = json.loads(b"".join(p[5:] for p in packets if p.startswith(b"JSON ")))
        return status

    def stop(self) -> bool:
        """Ask the keeper to close everything and exit; False if none was running.

        Raises FdkeeperError when one runs (holds the lock) but does not answer: saying "none
        was running" then would be a lie.
        """
        timeout = min(self.timeout, STOP_TIMEOUT)
        try:
            self.request(b"STOP", timeout=timeout)
        except (FileNotFoundError, ConnectionRefusedError):
            if keeper_runs(self.directory):
                raise self.not_answering(timeout) from None
            self.report_dead_keeper()
            return False
        deadline = time.monotonic() + 5.0
        while self.path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        return True

    def prepare(self, **fields: object) -> Reply:
        wait = fields.get("wait")
        seconds = float(wait) if isinstance(wait, (int, float, str)) and wait else 0.0
        message = format_message("PREPARE", **fields)
        return self._require_running(lambda: self.request(message, timeout=self.timeout + seconds))

    def lease(self, **fields: object) -> list[tuple[int, int]]:
        """Lease connections to this process, as the shim does; return (id, descriptor) pairs.

        The lease lasts until this process exits. Used by tests and by Python SIP agents.
        """
        leased = self.lease_connections(**fields)
        return list(zip(leased.ids, leased.fds, strict=False))

    def lease_connections(self, **fields: object) -> Leased:
        """One LEASE exchange: the connections' ids, descriptors (ours to close), peers, locals."""
        message = format_message("LEASE", **fields)
        with self._require_running(lambda: self._connect(self.timeout)) as sock:
            _send_request(sock, message)
            data, _ = _receive_reply(sock)
            reply = parse_reply(data)
            if not reply.ok:
                raise FdkeeperError(reply.text, reply.code)
            leased = Leased()
            while len(leased.fds) < int(reply.fields["count"]):
                data, fds = receive_packet(sock)  # up to MAX_FDS_PER_PACKET a packet
                leased.add(parse_reply(data).fields, fds)
            return leased

    def handover(self) -> tuple[Reply, list[tuple[dict[str, str], list[int]]]]:
        """HANDOVER (keeper --replace): the OK reply and each HANDED packet's fields and descriptors.
        FileNotFoundError/ConnectionRefusedError when no keeper listens."""
        with self._connect(self.timeout) as sock:
            _send_request(sock, b"HANDOVER")
            reply = parse_reply(_receive_reply(sock)[0])
            if not reply.ok:
                raise FdkeeperError(reply.text, reply.code)
            packets, received = [], 0
            while received < int(reply.fields["count"]):
                data, fds = _receive_reply(sock)
                if not data:
                    raise FdkeeperError(f"fdkeeper: the keeper at {self.path} closed the connection mid-handover")
                packets.append((parse_reply(data).fields, fds))
                received += len(fds)
            return reply, packets

    def _require_running(self, call: Callable[[], T]) -> T:
        """``call()``, with a keeper that is not running (or not answering) said in one line."""
        try:
            return call()
        except TimeoutError:
            raise self.not_answering(self.timeout) from None
        except (FileNotFoundError, ConnectionRefusedError):
            if keeper_runs(self.directory):
                raise self.not_answering(self.timeout) from None
            # Said, not taken: the run that starts the next keeper says it again (and takes it).
            died = self._dead_keeper(take=False)
            raise FdkeeperError(
                f"{died}; no keeper runs now"
                if died
                else f"fdkeeper: no keeper runs for {self.directory}"
                f"; start one with 'fdkeeper keeper --dir {self.directory}' or run a scenario through 'fdkeeper sipp'"
            ) from None

    def _dead_keeper(self, take: bool) -> str | None:
        try:
            return dead_keeper_notice(self.directory, take)
        except FileNotFoundError:
            return None  # no state directory, so no keeper ever ran there

    def report_dead_keeper(self) -> None:
        """Once, after a keeper was killed: so nobody takes a fresh start for the old one."""
        line = self._dead_keeper(take=True)
        if line:
            print(line, file=sys.stderr, flush=True)


def _send_request(sock: socket.socket, message: bytes) -> None:
    """Send a request; a keeper that already refused us (and closed) has left its reason to read."""
    try:
        sock.send(message)
    except (BrokenPipeError, ConnectionResetError):
        pass


def _receive_reply(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One reply packet. A keeper that refused us and closed before reading our request makes
    the kernel report ECONNRESET once, ahead of the refusal still queued: read past it."""
    try:
        return receive_packet(sock)
    except ConnectionResetError:
        return receive_packet(sock)


def ensure_keeper(
    directory: Path,
    *,
    keepalive: float | None = None,
    connect_timeout: float | None = None,
    answer_options: bool = False,
) -> KeeperClient:
    """Return a client of the keeper for ``directory``, starting a detached one if none answers."""
    ensure_private_directory(directory)  # before the socket is touched
    client = KeeperClient(directory)
    if client.alive():
        return client
    if keeper_runs(directory):  # there, but saturated or stuck: a second one could not start
        raise client.not_answering(PING_TIMEOUT)
    client.report_dead_keeper()
    command = [sys.executable, "-m", "fdkeeper", "keeper", "--dir", os.fspath(directory)]
    if keepalive:
        command += ["--keepalive", str(keepalive)]
    if connect_timeout:
        command += ["--connect-timeout", str(connect_timeout)]
    if answer_options:
        command.append("--answer-options")
    start_detached(command, directory / LOG_NAME, client.alive, "keeper", START_TIMEOUT)
    return client
