"""The keeper: one long-lived process per state directory that holds kept connections.

It serves the control protocol (fdkeeper/protocol.py) on a unix socket, opens connections to
the SuT when a run first needs one (pool.py), and leases each connection to one process at a
time (leases.py) while watching that the idle ones stay alive (health.py). A lease ends when
its process exits, however it exits: the keeper watches the holder with a pidfd, so a
SIGKILLed sipp frees its connection at once. Single-threaded: one Reactor (fdkeeper/loop.py),
no thread per connection.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from fdkeeper import __version__
from fdkeeper.address import format_address
from fdkeeper.client import KeeperClient
from fdkeeper.errors import FdkeeperError, out_of_descriptors
from fdkeeper.keeper import diagnostics
from fdkeeper.keeper.connection import KeptConnection, fds_message
from fdkeeper.keeper.control import ControlClient, ControlClients, limit_error
from fdkeeper.keeper.handover import adopt_into, hand_over, refuse_unless_handover_possible, take_over
from fdkeeper.keeper.health import ConnectionHealth
from fdkeeper.keeper.leases import Leases, Waiters, lease_holder
from fdkeeper.keeper.opening import Pending, resume_request
from fdkeeper.keeper.pool import ConnectionPool
from fdkeeper.keeper.record import KeeperRecord, take_lock
from fdkeeper.loop import Reactor
from fdkeeper.openfiles import raise_open_file_limit
from fdkeeper.protocol import (
    JSON_CHUNK,
    MAX_FDS_PER_PACKET,
    MAX_MESSAGE,
    VERBS,
    JsonObject,
    ProtocolError,
    Request,
    format_error,
    format_failure,
    format_message,
    parse_request,
    receive_packet,
    select_connections,
)
from fdkeeper.statedir import ensure_private_directory, socket_path
from fdkeeper.tls import TlsOptions

log = logging.getLogger("fdkeeper.keeper")

TICK_SECONDS = 0.5
# A second keeper started while the first one is exiting waits this long for the lock.
LOCK_RETRY_SECONDS = 0.5
# keeper --replace: how long the handover and the old keeper's exit may take.
HANDOVER_TIMEOUT = 30.0

VerbHandler = Callable[[ControlClient, int, Request], None]


class Keeper:
    def __init__(
        self,
        directory: Path,
        *,
        keepalive: float | None = None,
        connect_timeout: float = 5.0,
        tls_defaults: TlsOptions | None = None,
        replace: bool = False,
        answer_options: bool = False,
    ) -> None:
        self.directory = ensure_private_directory(directory)
        # --replace: the running keeper sends its connections, then exits and frees the lock.
        inherited = take_over(KeeperClient(self.directory, timeout=HANDOVER_TIMEOUT)) if replace else []
        self._lock_file = take_lock(self.directory, HANDOVER_TIMEOUT if replace else LOCK_RETRY_SECONDS)
        self.record = KeeperRecord(self.directory)
        self.record.say_if_the_last_keeper_died()
        self.keepalive = keepalive
        self.tls_defaults = tls_defaults or TlsOptions()
        self.started_at = self.record.started_at
        self.reactor = Reactor()
        self.connections: dict[int, KeptConnection] = {}
        self.health = ConnectionHealth(self.reactor, keepalive, answer_options)
        self.waiters = Waiters(
            self._answer_prepare, self.reactor, on_fault_of=lambda client: self.clients.on_fault_of(client)
        )
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
            "HANDOVER": self._handover,
        }
        assert self._verbs.keys() == VERBS.keys(), "every verb the protocol accepts needs a handler"
        self._listener = self._listen()
        self.clients = ControlClients(self.reactor, self._listener, self._serve_client, self.waiters.forget_client)
        raise_open_file_limit()
        adopt_into(self.pool, inherited)
        self.record.update(len(self.connections))

    # ---------------------------------------------------------------- start and stop

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
        return listener

    def serve_forever(self) -> None:
        self.reactor.call_every(TICK_SECONDS, self._tick)
        diagnostics.install(self, self.reactor.call_every)  # FDKEEPER_DEBUG_SIZES: off unless set
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
        self.clients.close()
        self.record.remove()  # a clean stop: the next run has nothing to report
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
        self.clients.drop_idle()
        self.record.update(len(self.connections))

    # ---------------------------------------------------------------- control clients

    def _serve_client(self, client: ControlClient, mask: int) -> None:
        """Answer one request; a bad one gets an ERR reply and never stops the keeper."""
        pid, uid = client.pid, client.uid
        try:
            data, fds = receive_packet(client.sock, max_fds=1)
            for fd in fds:  # requests carry no descriptors: refuse any quietly
                os.close(fd)
            if not data:
                self.clients.drop(client)
                return
            if mask & select.EPOLLHUP:
                # Its client gave up waiting (the keeper was stopped or flooded): a STOP or a
                # LEASE nobody waits for any more is not carried out late.
                log.info("pid %d gave up before its %s was read; not carried out", pid, data[:16])
                self.clients.drop(client)
                return
            client.last_progress = time.monotonic()
            if not client.trusted:
                # Read the request first so the peer gets this answer rather than a reset.
                log.warning("refused control client pid %d of uid %d", pid, uid)
                client.send(format_error("denied", f"fdkeeper: uid {uid} may not use this keeper"))
                self.clients.drop(client)
                return
            if self.leases.answer_repeat(client, data):  # a per-call run's LEASE again (I20c)
                return
            request = parse_request(data)
        except BlockingIOError:
            return  # woken for a hang-up with a packet still to come, or spuriously
        except ProtocolError as error:
            client.send(format_error(error.code, error.text))
            return
        except OSError as error:
            log.debug("control client pid %d went away: %s", pid, error)  # per abusive client: not for the log file
            self.clients.drop(client)
            return
        self._dispatch(client, request, data)

    def _dispatch(self, client: ControlClient, request: Request, data: bytes) -> None:
        """Answer ``request`` (packet ``data``); a per-user client LEASE answered is remembered
        for answer_repeat, whether answered at once or once its connection opened."""
        pid = client.pid
        self.leases.last_granted = None
        try:
            self._verbs[request.verb](client, pid, request)
            self.leases.remember_repeat(data, request)
        except Pending as pending:  # an open or a pong in progress: answered once it settles
            self._answer_later(client, request, data, pending)
        except FdkeeperError as error:
            client.send(format_failure(error))
        except ProtocolError as error:  # a handler found the request incomplete for its role
            client.send(format_error(error.code, error.text))
        except OSError as error:
            if out_of_descriptors(error):  # a pidfd, a socket, a dup for this client: refuse, stay up
                log.warning("out of descriptors serving pid %d: %s", pid, error.strerror)
                client.send(format_failure(limit_error("serve this request", error)))
                return
            log.debug("control client pid %d went away: %s", pid, error)  # per abusive client: not for the log file
            self.clients.drop(client)
        # Anything else is a defect: it leaves to the Reactor, which logs and counts it and calls
        # this client's on_fault (ControlClients.fault: one ERR internal line, then the client
        # is dropped). Every path into _dispatch runs as a loop callback the client owns.

    def _answer_later(self, client: ControlClient, request: Request, data: bytes, pending: Pending) -> None:
        """Ask the request again when ``pending`` settles; the client waits, and is not idle."""
        client.waiting = True

        def retry() -> None:
            client.waiting = False
            # Run as this client's own callback, not inside the open or pong that settled: a
            # fault in it is then this client's (one ERR internal, the client dropped), never
            # the opening connection's.
            self.reactor.call_later(
                0, lambda: self._resume(client, request, data), on_fault=self.clients.on_fault_of(client)
            )

        def fail(error: FdkeeperError) -> None:
            client.waiting = False
            client.send(format_failure(error))

        pending.then(resume_request(client, retry, fail))

    def _resume(self, client: ControlClient, request: Request, data: bytes) -> None:
        if client.fileno() >= 0:  # not dropped since: its descriptor number is still its own
            self._dispatch(client, request, data)

    # ---------------------------------------------------------------- verbs

    def _ping(self, client: ControlClient, _pid: int, _request: Request) -> None:
        client.send(format_message("OK", pid=os.getpid(), version=__version__))

    def _stop(self, client: ControlClient, pid: int, _request: Request) -> None:
        log.info("stop requested by pid %d", pid)
        client.send(b"OK")
        self.reactor.stop()

    def _send_status(self, client: ControlClient, _pid: int, request: Request) -> None:
        """STATUS [filters] [count=1]: a stream made as the client reads it (any size), or the count."""
        connections = list(self.connections.values())  # the dict may change while the reply drains
        wanted = status_filters(request)
        keeper = json.dumps({"keeper": self._keeper_status()})[:-1]  # '{"keeper": {...}' still open
        if request.flag("count"):
            count = len(select_connections(_filter_rows(connections), **wanted)) if wanted else len(connections)
            client.send_stream(_json_packets([keeper, f', "count": {count}}}']))
            return
        matching = (json.dumps(c) for batch in _as_dicts(connections) for c in select_connections(batch, **wanted))
        client.send_stream(_json_packets(itertools.chain([keeper, ', "connections": ['], _joined(matching), ["]}"])))

    def status(self) -> JsonObject:
        return {"keeper": self._keeper_status(), "connections": [c.as_dict() for c in self.connections.values()]}

    def _keeper_status(self) -> JsonObject:
        return {
            "pid": os.getpid(),
            "version": __version__,
            "directory": str(self.directory),
            "uptime": round(time.time() - self.started_at, 3),
            "keepalive": self.keepalive,
            "answer_options": self.health.answer_options,
            "tls_defaults": {k: v for k, v in self.tls_defaults.as_fields().items() if v is not None},
            "control": self.clients.as_dict(),
            "internal_errors": self.reactor.internal_errors,  # defects caught by the loop (fdkeeper/loop.py)
        }

    def _lease(self, client: ControlClient, pid: int, request: Request) -> None:
        pid = lease_holder(pid, request.number("for_pid"))
        connections = self.pool.select(request, pid)
        mode, transfer = request.text("mode") or "preload", request.text("transfer") or "scm"
        new = 0
        for connection in connections:
            new += self.leases.grant(connection, pid)
            connection.lease_mode, connection.lease_transfer = mode, transfer
        one_user = len(connections) == 1 and bool(connections[0].aor)  # a per-user lease
        if one_user and request.text("role") == "client":
            client.send(self.leases.ok_line(request.flag("cache")))
        else:
            client.send(format_message("OK", count=len(connections)))
        # Made as the client reads them: 19,000 descriptors are not copied to be queued.
        client.send_stream(functools.partial(_fds_packet, batch) for batch in _fds_batches(connections))
        if one_user:  # a per-call run's: at most a few lines a run
            self.leases.log_grant(connections[0], pid, bool(new))
            return
        # A shared connection its holder had already is no news: the log says when it changes hands.
        level = logging.DEBUG if connections and not new and all(c.aor for c in connections) else logging.INFO
        if not log.isEnabledFor(level):
            return
        if len(connections) <= 3:
            log.log(level, "leased %s to pid %d", ", ".join(c.label() for c in connections), pid)
        else:
            log.log(level, "leased %d connections to pid %d", len(connections), pid)

    def _handover(self, client: ControlClient, pid: int, _request: Request) -> None:
        """A successor (keeper --replace) takes every idle TCP connection; this keeper then exits."""
        refuse_unless_handover_possible(list(self.connections.values()), client.uid)
        log.info("handing over to pid %d", pid)
        hand_over(client.sock, [c for c in self.connections.values() if c.sock is not None], _fds_batches)
        self.reactor.stop()  # close() closes our copies: the successor's keep the connections open

    def _prepare(self, client: ControlClient, pid: int, request: Request) -> None:
        try:
            connections = self.pool.select(request, pid)
        except FdkeeperError as error:
            if error.code == "busy" and request.seconds("wait"):
                self.waiters.add(client, request)
                client.waiting = True
                return
            raise
        client.send(self._prepared_reply(request, connections))

    def _answer_prepare(self, request: Request) -> bytes:
        """A waiting PREPARE, tried again: its reply, or FdkeeperError (busy if still held)."""
        return self._prepared_reply(request, self.pool.select(request, None))

    def _prepared_reply(self, request: Request, connections: list[KeptConnection]) -> bytes:
        """OK with the ids of what the run is handed and what it is told of; each list names at most
        LISTED ids and its count= field says how many there are (a server run handed 19,000 would not
        fit in one message)."""
        # Only a server run is handed "all of them" and so told which were left out (and a
        # scan per client PREPARE would make opening 10,000 users quadratic).
        closed_matching = self.pool.closed_matching(request) if request.text("role") == "server" else []
        # A connection no run has used yet that replaced a closed one: the runner says so.
        replaced = [str(c.replaces) for c in connections if c.replaces and not c.leases]
        # A server run handed connections of another identity (keeper/identity.py): the runner says so.
        borrowed = [f"{c.id}@{format_address(c.local)}" for c in self.pool.borrowed(request, connections)]
        # A client run given a connection an earlier run leased: its TLS handshake (server name,
        # key log) was made for that run, which the runner says when this run asked for others.
        reused = [str(c.id) for c in connections if c.leases] if request.text("role") == "client" else []
        return format_message(
            "OK",
            **_listed("ids", [str(c.id) for c in connections]),
            **_listed("closed", [str(c.id) for c in closed_matching]),
            **_listed("replaced", replaced),
            **_listed("borrowed", borrowed),
            **_listed("reused", reused),
        )


LISTED = 20  # ids a PREPARE reply's list names; its count says how many there are


def _listed(name: str, items: list[str]) -> dict[str, str | int | None]:
    """``name``=the first LISTED items, and past that ``name_count``= how many there are."""
    return {name: ",".join(items[:LISTED]) or None, f"{name}_count": len(items) if len(items) > LISTED else None}


STATUS_BATCH = 256  # connections serialised per step of a status stream


def status_filters(request: Request) -> dict[str, str]:
    """STATUS's filters as protocol.select_connections takes them (the CLI's --state, --aor ...)."""
    remote = request.address("remote")
    wanted: dict[str, str | None] = {
        "aor": request.text("aor"),
        "state": request.text("state"),
        "remote": format_address(remote) if remote else None,
        "transport": request.text("transport"),
    }
    return {key: value for key, value in wanted.items() if value is not None}


def _as_dicts(connections: list[KeptConnection]) -> Iterator[list[JsonObject]]:
    for start in range(0, len(connections), STATUS_BATCH):
        yield [c.as_dict() for c in connections[start : start + STATUS_BATCH]]


def _filter_rows(connections: list[KeptConnection]) -> list[JsonObject]:
    """Only what STATUS's filters read of each connection: a count of 19,000 in milliseconds
    (as_dict asks the kernel for every connection's queue)."""
    return [
        {"aor": c.aor, "state": c.state, "remote": format_address(c.remote), "transport": c.transport}
        for c in connections
    ]


def _fds_packet(batch: list[KeptConnection]) -> tuple[bytes, list[int]] | None:
    """A lease's FDS packet for ``batch``, made as it is sent; None if one of them has closed since."""
    if any(c.sock is None for c in batch):
        return None
    return fds_message(batch), [c.fileno() for c in batch]


def _joined(items: Iterable[str]) -> Iterator[str]:
    """``items`` with ", " between them, lazily (a JSON array's elements)."""
    for index, item in enumerate(items):
        yield item if index == 0 else ", " + item


def _json_packets(texts: Iterable[str]) -> Iterator[bytes]:
    """``JSON <text>`` packets of JSON_CHUNK characters from ``texts``, then ``END``; lazily.
    json.dumps writes ASCII, so characters are bytes."""
    pending = ""
    for text in texts:
        pending += text
        while len(pending) >= JSON_CHUNK:
            yield b"JSON " + pending[:JSON_CHUNK].encode()
            pending = pending[JSON_CHUNK:]
    if pending:
        yield b"JSON " + pending.encode()
    yield b"END"


def _fds_batches(
    connections: list[KeptConnection], extra_cost: Callable[[KeptConnection], int] = lambda _c: 0
) -> list[list[KeptConnection]]:
    """Cut a lease's descriptors into FDS packets that fit both MAX_FDS_PER_PACKET and MAX_MESSAGE."""
    batches: list[list[KeptConnection]] = []
    size = 0
    for connection in connections:
        # id, peer and local address with their separators; the verb and keys take the rest.
        cost = (
            len(str(connection.id)) + len(format_address(connection.remote)) + len(format_address(connection.local)) + 3
        )
        cost += extra_cost(connection)
        if not batches or len(batches[-1]) >= MAX_FDS_PER_PACKET or size + cost > MAX_MESSAGE - 64:
            batches.append([])
            size = 0
        batches[-1].append(connection)
        size += cost
    return batches
