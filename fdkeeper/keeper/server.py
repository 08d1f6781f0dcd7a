"""The keeper: one long-lived process per state directory that holds kept connections.

It serves the control protocol (protocol.py) on a unix socket, opens connections to the SuT
when a run first needs one (connections.py), and leases each connection to one process at a
time. A lease ends when its process exits, however it exits: the keeper watches the holder
with a pidfd, so a SIGKILLed sipp frees its connection at once. Single-threaded: one epoll
loop, no thread per connection.
"""

from __future__ import annotations

import fcntl
import heapq
import json
import logging
import os
import resource
import select
import signal
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fdkeeper import __version__
from fdkeeper.keeper.connection import CLOSED, IDLE, KeptConnection, open_tcp
from fdkeeper.errors import FdkeeperError
from fdkeeper.protocol import (
    JSON_CHUNK,
    MAX_FDS_PER_PACKET,
    MAX_MESSAGE,
    Address,
    ProtocolError,
    Request,
    format_address,
    format_error,
    format_message,
    parse_request,
    receive_packet,
    send_packet,
)
from fdkeeper.statedir import LOCK_NAME, ensure_private_directory, socket_path
from fdkeeper.tls import TlsLink, TlsOptions, handshake

log = logging.getLogger("fdkeeper.keeper")

TICK_SECONDS = 0.5
PONG_TIMEOUT = 10.0  # RFC 5626 §4.4.1: a flow with no pong within 10 s has failed
PONG_SETTLE = 2.0  # how long a lease waits for an outstanding pong before handing over
CLIENT_SEND_TIMEOUT = 2.0
MAX_CONTROL_CLIENTS = 512
_UCRED = struct.Struct("3i")


@dataclass
class Holder:
    """A process that holds leases; its pidfd becomes readable when it exits."""

    pid: int
    pidfd: int
    connection_ids: set[int] = field(default_factory=set)


@dataclass
class Waiter:
    """A PREPARE with wait= whose connection is busy: answered when it frees or times out."""

    client: socket.socket
    request: Request
    deadline: float


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
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.tls_defaults = tls_defaults or TlsOptions()
        self.connections: dict[int, KeptConnection] = {}
        # The current connection for each (SuT, transport, AoR): O(1) per lease with 10,000 users.
        self.by_key: dict[tuple, KeptConnection] = {}
        # TLS options a PREPARE gave for a SuT, for the per-user connections leases open later.
        self.tls_profiles: dict[Address, TlsOptions] = {}
        self.holders: dict[int, Holder] = {}
        self.waiters: list[Waiter] = []
        self.started_at = time.time()
        self.running = False
        self._next_id = 1
        self._handlers: dict[int, Callable[[int], None]] = {}
        self._clients: dict[int, socket.socket] = {}
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = 0
        self._lock_file = self._take_lock()
        self._epoll = select.epoll()
        self._listener = self._listen()
        raise_open_file_limit()

    # ---------------------------------------------------------------- start and stop

    def _take_lock(self):
        """One keeper per directory: a second one finds the lock taken and says by whom."""
        lock = open(self.directory / LOCK_NAME, "a+")
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
        self._watch(listener.fileno(), select.EPOLLIN, self._accept_clients)
        return listener

    def serve_forever(self) -> None:
        self.running = True
        self._schedule(TICK_SECONDS, self._tick)
        log.info("keeper %d serving %s", os.getpid(), socket_path(self.directory))
        try:
            while self.running:
                self._run_once()
        finally:
            self.close()

    def request_stop(self, *_: object) -> None:
        self.running = False

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        # The keeper runs detached from any terminal: a hangup is no reason to drop connections.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def close(self) -> None:
        """Close every kept connection, forget every lease, remove the control socket."""
        for connection in self.connections.values():
            if connection.sock is not None:
                self._close_connection(connection, "keeper stopped")
        for holder in self.holders.values():
            os.close(holder.pidfd)
        self.holders.clear()
        for client in list(self._clients.values()):
            client.close()
        self._clients.clear()
        path = socket_path(self.directory)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        self._listener.close()
        self._epoll.close()
        self._lock_file.close()
        log.info("keeper stopped")

    # ---------------------------------------------------------------- event loop

    def _watch(self, fd: int, events: int, handler: Callable[[int], None]) -> None:
        self._epoll.register(fd, events)
        self._handlers[fd] = handler

    def _rewatch(self, fd: int, events: int) -> None:
        self._epoll.modify(fd, events)

    def _unwatch(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def _schedule(self, delay: float, callback: Callable[[], None]) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (time.monotonic() + delay, self._timer_seq, callback))

    def _run_once(self) -> None:
        timeout = max(0.0, self._timers[0][0] - time.monotonic()) if self._timers else None
        try:
            events = self._epoll.poll(timeout)
        except InterruptedError:
            events = []
        for fd, mask in events:
            handler = self._handlers.get(fd)
            if handler is not None:
                handler(mask)
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, callback = heapq.heappop(self._timers)
            callback()

    def _tick(self) -> None:
        if self.keepalive:
            self._keep_alive()
        self._expire_waiters()
        self._schedule(TICK_SECONDS, self._tick)

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
            self._watch(client.fileno(), select.EPOLLIN, lambda mask, c=client, p=pid, u=uid: self._serve_client(c, p, u))

    def _drop_client(self, client: socket.socket) -> None:
        self._unwatch(client.fileno())
        self._clients.pop(client.fileno(), None)
        self.waiters = [w for w in self.waiters if w.client is not client]
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
                self._reply_quietly(client, format_error("denied", f"fdkeeper: uid {uid} may not use this keeper"))
                self._drop_client(client)
                return
            self._dispatch(client, pid, parse_request(data))
        except ProtocolError as error:
            self._reply_quietly(client, format_error(error.code, error.text))
        except FdkeeperError as error:
            self._reply_quietly(client, format_error(_error_code(error), str(error)))
        except OSError as error:
            log.info("control client pid %d went away: %s", pid, error)
            self._drop_client(client)
        except Exception:  # a bug must not take the kept connections down with it
            log.exception("internal error serving pid %d", pid)
            self._reply_quietly(client, format_error("internal", "fdkeeper: internal error; see the keeper log"))

    def _reply_quietly(self, client: socket.socket, message: bytes) -> None:
        try:
            client.send(message)
        except OSError:
            pass

    def _dispatch(self, client: socket.socket, pid: int, request: Request) -> None:
        if request.verb == "PING":
            client.send(format_message("OK", pid=os.getpid(), version=__version__))
        elif request.verb == "STATUS":
            self._send_status(client)
        elif request.verb == "STOP":
            log.info("stop requested by pid %d", pid)
            client.send(b"OK")
            self.running = False
        elif request.verb == "LEASE":
            self._lease(client, pid, request)
        elif request.verb == "PREPARE":
            self._prepare(client, pid, request)

    # ---------------------------------------------------------------- requests

    def _send_status(self, client: socket.socket) -> None:
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
        pid = _lease_holder(pid, request.get("for_pid"))
        connections = self._select(request, pid)
        for connection in connections:
            self._grant(connection, pid)
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
            connections = self._select(request, pid)
        except FdkeeperError as error:
            if error.code == "busy" and request.get("wait"):
                self.waiters.append(Waiter(client, request, time.monotonic() + request.get("wait")))
                return
            raise
        client.send(self._prepared_reply(request, connections))

    def _prepared_reply(self, request: Request, connections: list[KeptConnection]) -> bytes:
        ids = ",".join(str(c.id) for c in connections) or None
        # Only a server run is handed "all of them" and so told which were left out (and a
        # scan per client PREPARE would make opening 10,000 users quadratic).
        closed_matching = self._closed_matching(request) if request.get("role") == "server" else []
        closed = ",".join(str(c.id) for c in closed_matching) or None
        # A connection no run has used yet that replaced a closed one: the runner says so.
        replaced = ",".join(str(c.replaces) for c in connections if c.replaces and not c.leases) or None
        return format_message("OK", ids=ids, closed=closed, replaced=replaced)

    def _retry_waiters(self) -> None:
        waiting, self.waiters = self.waiters, []
        for waiter in waiting:
            try:
                connections = self._select(waiter.request, None)
            except FdkeeperError as error:
                if error.code == "busy":
                    self.waiters.append(waiter)
                else:
                    self._reply_quietly(waiter.client, format_error(_error_code(error), str(error)))
                continue
            self._reply_quietly(waiter.client, self._prepared_reply(waiter.request, connections))

    def _expire_waiters(self) -> None:
        now = time.monotonic()
        for waiter in [w for w in self.waiters if w.deadline <= now]:
            self.waiters.remove(waiter)
            try:
                self._select(waiter.request, None)
            except FdkeeperError as error:
                text = str(error)
                if error.code == "busy":
                    text += f" (waited {waiter.request.get('wait'):g} s)"
                self._reply_quietly(waiter.client, format_error(_error_code(error), text))

    # ---------------------------------------------------------------- choosing connections

    def _select(self, request: Request, pid: int | None) -> list[KeptConnection]:
        if request.get("per_call"):
            self._remember_tls_profile(request)
            self._check_room(request)
            return []
        if request.get("role") == "client":
            return [self._client_connection(request, pid)]
        return self._server_connections(request, pid)

    def _remember_tls_profile(self, request: Request) -> None:
        if request.get("transport") == "tls" and request.get("remote"):
            self.tls_profiles[request.get("remote")] = TlsOptions.from_fields(request.fields, self.tls_defaults)

    def _client_connection(self, request: Request, pid: int | None) -> KeptConnection:
        remote: Address | None = request.get("remote")
        if remote is None:
            raise ProtocolError("badrequest", "fdkeeper: a client lease needs remote=")
        connection = self.by_key.get((remote, request.get("transport"), request.get("aor")))
        if connection is not None and connection.state == CLOSED:
            if not request.get("reconnect"):
                raise FdkeeperError(_closed_text(connection), "closed")
            log.info("replacing closed %s (--reconnect)", connection.label())
            del self.connections[connection.id]
            fresh = self._open(request)
            fresh.replaces = connection.id
            return fresh
        if connection is not None:
            self._refuse_if_held_by_other(connection, pid)
            return connection
        return self._open(request)

    def _check_room(self, request: Request) -> None:
        """A per-user run: say now, not at user 5,000, when the users would not fit."""
        users = request.get("users") or 0
        per_connection = 3 if request.get("transport") == "tls" else 1  # TLS: socket + socketpair
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        in_use = len(os.listdir("/proc/self/fd"))
        room = (soft - in_use - 64) // per_connection
        new_users = users - sum(1 for c in self.connections.values() if c.aor and c.state != CLOSED)
        if new_users > room:
            raise FdkeeperError(
                f"fdkeeper: the keeper can hold {max(room, 0)} more {request.get('transport')} connections "
                f"(open-file limit {soft}, hard limit {hard}, {in_use} in use) but this run may need {new_users}; "
                "raise the limit (e.g. 'ulimit -n' or LimitNOFILE=) before the keeper starts, "
                "then 'fdkeeper stop' and run again",
                "limit",
            )

    def _server_connections(self, request: Request, pid: int | None) -> list[KeptConnection]:
        remote: Address | None = request.get("remote")
        transport = request.get("transport")
        matching = [c for c in self.connections.values() if c.transport == transport and remote in (None, c.remote)]
        target = f"{format_address(remote)}/{transport}" if remote else f"any SuT over {transport}"
        if not matching:
            raise FdkeeperError(
                f"fdkeeper: no kept connection to {target}; run a client scenario first "
                "(fdkeeper status lists what is kept)",
                "none",
            )
        alive = [c for c in matching if c.state != CLOSED]
        if not alive:
            raise FdkeeperError(_closed_text(matching[-1]), "closed")
        for connection in alive:
            self._refuse_if_held_by_other(connection, pid)
        return alive

    def _closed_matching(self, request: Request) -> list[KeptConnection]:
        remote = request.get("remote")
        return [
            c
            for c in self.connections.values()
            if c.state == CLOSED and c.transport == request.get("transport") and remote in (None, c.remote)
        ]

    def _refuse_if_held_by_other(self, connection: KeptConnection, pid: int | None) -> None:
        holder = connection.holder_pid
        if holder is None or holder == pid:
            return
        if not self._holder_alive(holder):
            self._release(holder)
            return
        raise FdkeeperError(
            f"fdkeeper: kept connection {connection.label()} is leased by pid {holder} ({_process_name(holder)}); "
            "wait for that run to end, or pass --wait SECONDS",
            "busy",
        )

    def _open(self, request: Request) -> KeptConnection:
        remote, transport = request.get("remote"), request.get("transport")
        sock = open_tcp(remote, request.get("local"), self.connect_timeout)
        link = None
        if transport == "tls":
            defaults = self.tls_profiles.get(remote, self.tls_defaults)
            options = TlsOptions.from_fields(request.fields, defaults)
            tls, early = handshake(sock, remote, options, self.connect_timeout)
            link = TlsLink(tls, options, early)
            sock = tls
        connection = KeptConnection(
            id=self._next_id,
            sock=link.sipp_end if link else sock,
            transport=transport,
            remote=remote,
            local=sock.getsockname()[:2],
            link=link,
            aor=request.get("aor"),
        )
        self._next_id += 1
        self.connections[connection.id] = connection
        self.by_key[connection.key] = connection
        if link:
            link.watched_tls, link.watched_pair = link.wants_tls(), link.wants_pair()
            self._watch(link.tls.fileno(), link.watched_tls, lambda mask, c=connection: self._on_tls_event(c, mask))
            self._watch(link.keeper_end.fileno(), link.watched_pair, lambda mask, c=connection: self._on_pair_event(c, mask))
        else:
            # Only the SuT's FIN/RST is watched, never EPOLLIN: queued requests wait for the next run.
            self._watch(connection.fileno(), select.EPOLLRDHUP, lambda mask, c=connection: self._on_connection_event(c, mask))
        log.info("opened %s%s", connection.label(), f" ({link.info['version']})" if link else "")
        return connection

    # ---------------------------------------------------------------- leases

    def _grant(self, connection: KeptConnection, pid: int) -> None:
        if connection.ping_sent_at is not None:
            self._settle_pong(connection)
            if connection.state == CLOSED:
                raise FdkeeperError(_closed_text(connection), "closed")
        if connection.holder_pid == pid:
            return
        holder = self.holders.get(pid) or self._new_holder(pid)
        holder.connection_ids.add(connection.id)
        connection.holder_pid = pid
        connection.leases += 1

    def _new_holder(self, pid: int) -> Holder:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise FdkeeperError(f"fdkeeper: process {pid} ended before its lease was granted", "internal") from None
        holder = Holder(pid, pidfd)
        self.holders[pid] = holder
        self._watch(pidfd, select.EPOLLIN, lambda mask, p=pid: self._release(p))
        return holder

    def _holder_alive(self, pid: int) -> bool:
        holder = self.holders.get(pid)
        if holder is None:
            return False
        poller = select.poll()  # not select(): descriptors past 1024 are normal in a keeper
        poller.register(holder.pidfd, select.POLLIN)
        return not poller.poll(0)

    def _release(self, pid: int) -> None:
        """The holder exited: its connections become idle, for the next run."""
        holder = self.holders.pop(pid, None)
        if holder is None:
            return
        self._unwatch(holder.pidfd)
        os.close(holder.pidfd)
        now = time.monotonic()
        for connection_id in holder.connection_ids:
            connection = self.connections.get(connection_id)
            if connection is not None and connection.holder_pid == pid:
                connection.holder_pid = None
                connection.last_activity = now
                if connection.link:
                    connection.link.end_of_lease()
                    self._after_link_event(connection)
        log.info("lease of pid %d ended", pid)
        self._retry_waiters()

    # ---------------------------------------------------------------- connection health

    def _on_connection_event(self, connection: KeptConnection, mask: int) -> None:
        if connection.sock is None:
            return
        if mask & (select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR):
            self._close_connection(connection, connection.peer_gone_reason())
        elif mask & select.EPOLLIN and connection.ping_sent_at is not None:
            self._collect_pong(connection)

    def _on_tls_event(self, connection: KeptConnection, mask: int) -> None:
        connection.link.on_tls_event(mask)
        self._after_link_event(connection)

    def _on_pair_event(self, connection: KeptConnection, mask: int) -> None:
        connection.link.on_pair_event(mask)
        self._after_link_event(connection)

    def _after_link_event(self, connection: KeptConnection) -> None:
        link = connection.link
        if link.closed_reason:
            self._close_connection(connection, link.closed_reason)
            return
        # epoll_ctl only when the wanted events changed: two system calls saved per message.
        tls_events, pair_events = link.wants_tls(), link.wants_pair()
        if tls_events != link.watched_tls:
            self._rewatch(link.tls.fileno(), tls_events)
            link.watched_tls = tls_events
        if pair_events != link.watched_pair:
            self._rewatch(link.keeper_end.fileno(), pair_events)
            link.watched_pair = pair_events

    def _close_connection(self, connection: KeptConnection, reason: str) -> None:
        log.info("%s: %s", connection.label(), reason)
        if connection.link:
            self._unwatch(connection.link.tls.fileno())
            self._unwatch(connection.link.keeper_end.fileno())
        else:
            self._unwatch(connection.fileno())
        connection.mark_closed(reason)

    def _keep_alive(self) -> None:
        now = time.monotonic()
        for connection in list(self.connections.values()):
            if connection.state != IDLE:
                continue
            if connection.link:
                self._keep_link_alive(connection, now)
                continue
            if connection.ping_sent_at is not None:
                if now - connection.ping_sent_at > PONG_TIMEOUT:
                    self._close_connection(connection, f"no keep-alive pong within {PONG_TIMEOUT:g} s")
            elif now - connection.last_activity >= self.keepalive and connection.send_ping():
                # Watch for the pong now; queued data was checked to be empty before the ping.
                self._rewatch(connection.fileno(), select.EPOLLRDHUP | select.EPOLLIN)

    def _keep_link_alive(self, connection: KeptConnection, now: float) -> None:
        """TLS: pongs are taken out of the stream by the framer, so only timing is left here."""
        link = connection.link
        if link.ping_sent_at is not None:
            if now - link.ping_sent_at > PONG_TIMEOUT:
                self._close_connection(connection, f"no keep-alive pong within {PONG_TIMEOUT:g} s")
        elif now - max(link.last_activity, connection.last_activity) >= self.keepalive and link.idle():
            link.send_ping()
            self._after_link_event(connection)

    def _collect_pong(self, connection: KeptConnection) -> None:
        connection.take_pong()
        # Pong taken, or a request overtook it: either way stop reading readiness, the
        # queue belongs to the next run from here.
        connection.last_activity = time.monotonic()
        if connection.ping_sent_at is not None and connection.queued_bytes():
            log.warning("%s: a request arrived before the keep-alive pong", connection.label())
            connection.ping_sent_at = None
        if connection.ping_sent_at is None:
            self._rewatch(connection.fileno(), select.EPOLLRDHUP)

    def _settle_pong(self, connection: KeptConnection) -> None:
        """Before a lease, wait briefly for an outstanding pong so it never reaches sipp."""
        poller = select.poll()
        poller.register(connection.fileno(), select.POLLIN | select.POLLRDHUP)
        deadline = time.monotonic() + PONG_SETTLE
        while connection.ping_sent_at is not None and time.monotonic() < deadline:
            events = poller.poll(max(0.0, deadline - time.monotonic()) * 1000)
            if not events:
                break
            mask = events[0][1]
            if mask & (select.POLLRDHUP | select.POLLHUP | select.POLLERR):
                self._close_connection(connection, connection.peer_gone_reason())
                return
            self._collect_pong(connection)


def _lease_holder(requester: int, for_pid: int | None) -> int:
    """Who a lease belongs to: the requester (SO_PEERCRED), or with for_pid=N the process N,
    but only when the requester is N's tracer (ptrace mode leases for the program it traces;
    being N's tracer already means the kernel let it take N's memory and descriptors)."""
    if for_pid is None or for_pid == requester:
        return requester
    try:
        status = Path(f"/proc/{for_pid}/status").read_text()
    except OSError:
        raise FdkeeperError(f"fdkeeper: process {for_pid} ended before its lease was granted", "internal") from None
    tracer = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("TracerPid:")), 0)
    if tracer != requester:
        raise FdkeeperError(
            f"fdkeeper: pid {requester} may not lease for pid {for_pid}: only the process tracing it may "
            "(for_pid= is for --mode ptrace)",
            "denied",
        )
    return for_pid


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


def _closed_text(connection: KeptConnection) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(connection.closed_at or time.time()))
    return (
        f"fdkeeper: kept connection {connection.label()} was closed at {when} ({connection.closed_reason}); "
        "run the client scenario again with --reconnect for a fresh connection (registrations must be redone)"
    )


def _error_code(error: FdkeeperError) -> str:
    from fdkeeper.protocol import ERROR_CODES

    return error.code if error.code in ERROR_CODES else "internal"


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "unknown"


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit: every kept connection is a descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard
