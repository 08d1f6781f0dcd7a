"""The keeper: one long-lived process per state directory that holds kept connections.

It serves the control protocol (fdkeeper/protocol.py) on a unix socket, opens connections to
the SuT when a run first needs one (pool.py), and leases each connection to one process at a
time (leases.py) while watching that the idle ones stay alive (health.py). A lease ends when
its process exits, however it exits: the keeper watches the holder with a pidfd, so a
SIGKILLed sipp frees its connection at once. Single-threaded: one Reactor (fdkeeper/loop.py),
no thread per connection.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import resource
import select
import signal
import socket
import struct
import time
from pathlib import Path
from typing import IO, Callable

from fdkeeper import __version__
from fdkeeper.address import format_address
from fdkeeper.errors import FdkeeperError
from fdkeeper.keeper.connection import KeptConnection
from fdkeeper.keeper.health import ConnectionHealth
from fdkeeper.keeper.leases import Leases, Waiters, lease_holder
from fdkeeper.keeper.pool import ConnectionPool
from fdkeeper.loop import Reactor
from fdkeeper.protocol import (
    JSON_CHUNK,
    MAX_FDS_PER_PACKET,
    MAX_MESSAGE,
    VERBS,
    ProtocolError,
    Request,
    format_error,
    format_failure,
    format_message,
    parse_request,
    receive_packet,
    send_packet,
    send_quietly,
)
from fdkeeper.statedir import LOCK_NAME, ensure_private_directory, open_private_file, socket_path
from fdkeeper.tls import TlsOptions

log = logging.getLogger("fdkeeper.keeper")

TICK_SECONDS = 0.5
CLIENT_SEND_TIMEOUT = 2.0
MAX_CONTROL_CLIENTS = 512
_UCRED = struct.Struct("3i")

VerbHandler = Callable[[socket.socket, int, Request], None]


class Keeper:
    def __init__(
        self,
        directory: Path,
        *,
        keepalive: float | None = None,
        connect_timeout: float = 5.0,
        tls_defaults: TlsOptions | None = None,
    ) -> None:
        self.directory = ensure_private_directory(directory)
        self._lock_file = self._take_lock()
        self.keepalive = keepalive
        self.tls_defaults = tls_defaults or TlsOptions()
        self.started_at = time.time()
        self.reactor = Reactor()
        self.connections: dict[int, KeptConnection] = {}
        self.health = ConnectionHealth(self.reactor, keepalive)
        self.waiters = Waiters(self._answer_prepare)
        self.leases = Leases(self.reactor, self.connections, self.health, on_release=self.waiters.retry)
        self.pool = ConnectionPool(
            self.connections, self.health, self.leases, connect_timeout=connect_timeout, tls_defaults=self.tls_defaults
        )
        # One handler per control verb, as s6-fdholderd dispatches its commands.
        self._verbs: dict[str, VerbHandler] = {
            "PING": self._ping,
            "STATUS": self._send_status,
            "STOP": self._stop,
            "LEASE": self._lease,
            "PREPARE": self._prepare,
        }
        assert self._verbs.keys() == VERBS.keys(), "every verb the protocol accepts needs a handler"
        self._clients: dict[int, socket.socket] = {}
        self._listener = self._listen()
        raise_open_file_limit()

    # ---------------------------------------------------------------- start and stop

    def _take_lock(self) -> IO[str]:
        """One keeper per directory: a second one finds the lock taken and says by whom."""
        lock = open_private_file(self.directory, LOCK_NAME, "a+")  # never through a planted link
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip() or "unknown"
            lock.close()
            raise FdkeeperError(
                f"fdkeeper: a keeper already runs for {self.directory} (pid {owner}); "
                f"use it, or end it with 'fdkeeper stop --dir {self.directory}'"
            ) from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        return lock

    def _listen(self) -> socket.socket:
        path = socket_path(self.directory)
        # We hold the lock, so a socket file left here belongs to a dead keeper.
        if path.exists() or path.is_symlink():
            log.info("removing stale control socket %s", path)
            path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            listener.bind(os.fspath(path))
        finally:
            os.umask(old_umask)
        listener.listen(128)
        listener.setblocking(False)
        self.reactor.watch(listener.fileno(), select.EPOLLIN, self._accept_clients)
        return listener

    def serve_forever(self) -> None:
        self.reactor.call_every(TICK_SECONDS, self._tick)
        log.info("keeper %d serving %s", os.getpid(), socket_path(self.directory))
        try:
            self.reactor.run()
        finally:
            self.close()

    def request_stop(self, *_: object) -> None:
        self.reactor.stop()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        # The keeper runs detached from any terminal: a hangup is no reason to drop connections.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def close(self) -> None:
        """Close every kept connection, forget every lease, remove the control socket."""
        self.pool.close("keeper stopped")
        self.leases.close()
        for client in list(self._clients.values()):
            client.close()
        self._clients.clear()
        try:
            socket_path(self.directory).unlink()
        except FileNotFoundError:
            pass
        self._listener.close()
        self.reactor.close()
        self._lock_file.close()
        log.info("keeper stopped")

    def _tick(self) -> None:
        if self.keepalive:
            self.health.keep_alive(self.connections.values())
        self.waiters.expire()

    # ---------------------------------------------------------------- control clients

    def _accept_clients(self, _mask: int) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except BlockingIOError:
                return
            if len(self._clients) >= MAX_CONTROL_CLIENTS:
                client.close()
                log.warning("too many control clients; refused one")
                continue
            pid, uid, _gid = _UCRED.unpack(client.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            client.settimeout(CLIENT_SEND_TIMEOUT)
            self._clients[client.fileno()] = client
            self.reactor.watch(
                client.fileno(), select.EPOLLIN, lambda mask, c=client, p=pid, u=uid: self._serve_client(c, p, u)
            )

    def _drop_client(self, client: socket.socket) -> None:
        self.reactor.unwatch(client.fileno())
        self._clients.pop(client.fileno(), None)
        self.waiters.forget_client(client)
        client.close()

    def _serve_client(self, client: socket.socket, pid: int, uid: int) -> None:
        """Answer one request; a bad one gets an ERR reply and never stops the keeper."""
        try:
            data, fds = receive_packet(client, max_fds=1)
            for fd in fds:  # requests carry no descriptors: refuse any quietly
                os.close(fd)
            if not data:
                self._drop_client(client)
                return
            if uid not in (os.getuid(), 0):
                # Read the request first so the peer gets this answer rather than a reset.
                log.warning("refused control client pid %d of uid %d", pid, uid)
                send_quietly(client, format_error("denied", f"fdkeeper: uid {uid} may not use this keeper"))
                self._drop_client(client)
                return
            request = parse_request(data)
            self._verbs[request.verb](client, pid, request)
        except ProtocolError as error:
            send_quietly(client, format_error(error.code, error.text))
        except FdkeeperError as error:
            send_quietly(client, format_failure(error))
        except OSError as error:
            log.info("control client pid %d went away: %s", pid, error)
            self._drop_client(client)
        except Exception:  # a bug must not take the kept connections down with it
            log.exception("internal error serving pid %d", pid)
            send_quietly(client, format_error("internal", "fdkeeper: internal error; see the keeper log"))

    # ---------------------------------------------------------------- verbs

    def _ping(self, client: socket.socket, _pid: int, _request: Request) -> None:
        client.send(format_message("OK", pid=os.getpid(), version=__version__))

    def _stop(self, client: socket.socket, pid: int, _request: Request) -> None:
        log.info("stop requested by pid %d", pid)
        client.send(b"OK")
        self.reactor.stop()

    def _send_status(self, client: socket.socket, _pid: int, _request: Request) -> None:
        document = json.dumps(self.status())
        for start in range(0, len(document), JSON_CHUNK):
            client.send(b"JSON " + document[start : start + JSON_CHUNK].encode())
        client.send(b"END")

    def status(self) -> dict:
        return {
            "keeper": {
                "pid": os.getpid(),
                "version": __version__,
                "directory": str(self.directory),
                "uptime": round(time.time() - self.started_at, 3),
                "keepalive": self.keepalive,
                "tls_defaults": {k: v for k, v in self.tls_defaults.as_fields().items() if v is not None},
            },
            "connections": [c.as_dict() for c in self.connections.values()],
        }

    def _lease(self, client: socket.socket, pid: int, request: Request) -> None:
        pid = lease_holder(pid, request.get("for_pid"))
        connections = self.pool.select(request, pid)
        for connection in connections:
            self.leases.grant(connection, pid)
            connection.lease_mode = request.get("mode") or "preload"
            connection.lease_transfer = request.get("transfer") or "scm"
        client.send(format_message("OK", count=len(connections)))
        for batch in _fds_batches(connections):
            packet = format_message(
                "FDS",
                ids=",".join(str(c.id) for c in batch),
                peers=",".join(format_address(c.remote) for c in batch),
                locals=",".join(format_address(c.local) for c in batch),
            )
            send_packet(client, packet, [c.fileno() for c in batch])
        if len(connections) <= 3:
            log.info("leased %s to pid %d", ", ".join(c.label() for c in connections), pid)
        else:
            log.info("leased %d connections to pid %d", len(connections), pid)

    def _prepare(self, client: socket.socket, pid: int, request: Request) -> None:
        try:
            connections = self.pool.select(request, pid)
        except FdkeeperError as error:
            if error.code == "busy" and request.get("wait"):
                self.waiters.add(client, request)
                return
            raise
        client.send(self._prepared_reply(request, connections))

    def _answer_prepare(self, request: Request) -> bytes:
        """A waiting PREPARE, tried again: its reply, or FdkeeperError (busy if still held)."""
        return self._prepared_reply(request, self.pool.select(request, None))

    def _prepared_reply(self, request: Request, connections: list[KeptConnection]) -> bytes:
        ids = ",".join(str(c.id) for c in connections) or None
        # Only a server run is handed "all of them" and so told which were left out (and a
        # scan per client PREPARE would make opening 10,000 users quadratic).
        closed_matching = self.pool.closed_matching(request) if request.get("role") == "server" else []
        closed = ",".join(str(c.id) for c in closed_matching) or None
        # A connection no run has used yet that replaced a closed one: the runner says so.
        replaced = ",".join(str(c.replaces) for c in connections if c.replaces and not c.leases) or None
        return format_message("OK", ids=ids, closed=closed, replaced=replaced)


def _fds_batches(connections: list[KeptConnection]) -> list[list[KeptConnection]]:
    """Cut a lease's descriptors into FDS packets that fit both MAX_FDS_PER_PACKET and MAX_MESSAGE."""
    batches: list[list[KeptConnection]] = []
    size = 0
    for connection in connections:
        # id, peer and local address with their separators; the verb and keys take the rest.
        cost = len(str(connection.id)) + len(format_address(connection.remote)) + len(format_address(connection.local)) + 3
        if not batches or len(batches[-1]) >= MAX_FDS_PER_PACKET or size + cost > MAX_MESSAGE - 64:
            batches.append([])
            size = 0
        batches[-1].append(connection)
        size += cost
    return batches


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit: every kept connection is a descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard
