"""Talking to a keeper from Python, and starting one when none answers."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from fdkeeper.errors import FdkeeperError
from fdkeeper.process import start_detached
from fdkeeper.protocol import Reply, format_message, parse_reply, receive_packet
from fdkeeper.statedir import LOG_NAME, NotPrivate, connect_control_socket, ensure_private_directory, socket_path

START_TIMEOUT = 10.0


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
        with self._connect(timeout or self.timeout) as sock:
            sock.send(message)
            packets = []
            while True:
                data, fds = receive_packet(sock)
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
            return self.request(b"PING", timeout=2.0)
        except NotPrivate:
            raise  # another user's directory or keeper: starting one of ours would not help
        except (OSError, FdkeeperError):
            return None

    def status(self) -> dict:
        packets = self._require_running(lambda: self.exchange(b"STATUS"))
        return json.loads(b"".join(p[5:] for p in packets if p.startswith(b"JSON ")))

    def stop(self) -> bool:
        """Ask the keeper to close everything and exit; False if none was running."""
        try:
            self.request(b"STOP", timeout=5.0)
        except OSError:
            return False
        deadline = time.monotonic() + 5.0
        while self.path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        return True

    def prepare(self, **fields: object) -> Reply:
        wait = float(fields.get("wait") or 0)
        message = format_message("PREPARE", **fields)
        return self._require_running(lambda: self.request(message, timeout=self.timeout + wait))

    def lease(self, **fields: object) -> list[tuple[int, int]]:
        """Lease connections to this process, as the shim does; return (id, descriptor) pairs.

        The lease lasts until this process exits. Used by tests and by Python SIP agents.
        """
        leased = self.lease_connections(**fields)
        return list(zip(leased.ids, leased.fds))

    def lease_connections(self, **fields: object) -> Leased:
        """One LEASE exchange: the connections' ids, descriptors (ours to close), peers, locals."""
        message = format_message("LEASE", **fields)
        with self._require_running(lambda: self._connect(self.timeout)) as sock:
            sock.send(message)
            data, _ = receive_packet(sock)
            reply = parse_reply(data)
            if not reply.ok:
                raise FdkeeperError(reply.text, reply.code)
            leased = Leased()
            while len(leased.fds) < int(reply.fields["count"]):
                data, fds = receive_packet(sock)  # up to MAX_FDS_PER_PACKET a packet
                leased.add(parse_reply(data).fields, fds)
            return leased

    def _require_running(self, call):
        try:
            return call()
        except (FileNotFoundError, ConnectionRefusedError):
            raise FdkeeperError(
                f"fdkeeper: no keeper runs for {self.directory}; start one with "
                f"'fdkeeper keeper --dir {self.directory}' or run a scenario through 'fdkeeper sipp'"
            ) from None


def ensure_keeper(
    directory: Path,
    *,
    keepalive: float | None = None,
    connect_timeout: float | None = None,
) -> KeeperClient:
    """Return a client of the keeper for ``directory``, starting a detached one if none answers."""
    ensure_private_directory(directory)  # before the socket is touched
    client = KeeperClient(directory)
    if client.alive():
        return client
    command = [sys.executable, "-m", "fdkeeper", "keeper", "--dir", os.fspath(directory)]
    if keepalive:
        command += ["--keepalive", str(keepalive)]
    if connect_timeout:
        command += ["--connect-timeout", str(connect_timeout)]
    start_detached(command, directory / LOG_NAME, client.alive, "keeper", START_TIMEOUT)
    return client
