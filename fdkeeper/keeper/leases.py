"""Who holds which kept connection, and who waits for one.

A lease lasts as long as its process: the keeper watches each holder with a pidfd, so a
SIGKILLed sipp frees its connections at once. A PREPARE with wait= whose connection is busy
becomes a waiter, answered when a lease ends or its time is up.
"""

from __future__ import annotations

import logging
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fdkeeper.errors import FdkeeperError
from fdkeeper.keeper.connection import CLOSED, KeptConnection, fds_message
from fdkeeper.keeper.control import ControlClient
from fdkeeper.keeper.health import ConnectionHealth
from fdkeeper.loop import Reactor
from fdkeeper.protocol import Request, format_failure

log = logging.getLogger("fdkeeper.keeper")


@dataclass
class Holder:
    """A process that holds leases; its pidfd becomes readable when it exits."""

    pid: int
    pidfd: int
    connection_ids: set[int] = field(default_factory=set)


@dataclass
class Repeat:
    """A client LEASE answered in full once, for answering the same request again without
    parsing it or asking the pool (a per-call run leases its users' connections once a call)."""

    connection: KeptConnection
    # The OK packet; with the request's inline=1 it carries the FDS part too ("OK count=1 ids=..."
    # with the descriptor: one packet, one wake-up of the client), else fds_packet follows it.
    ok: bytes
    fds_packet: bytes | None  # the FDS packet the full path sent: the connection's id and addresses
    mode: str
    transfer: str


# The repeats kept: a few per connection at most (a hostile client varying its requests only
# empties the table, which the next full answers fill again).
REPEATS_PER_CONNECTION = 2
LEASE_OK_ONE = b"OK count=1"
LEASE_OK_ONE_KEEP = b"OK count=1 keep=1"
LOGGED_PER_HOLDER = 20  # per-user grants a holder gets logged at info level (Leases.log_grant)


class Leases:
    def __init__(
        self,
        reactor: Reactor,
        connections: dict[int, KeptConnection],
        health: ConnectionHealth,
        on_release: Callable[[], None],
    ) -> None:
        self.reactor = reactor
        self.connections = connections
        self.health = health
        self.on_release = on_release  # a lease ended: connections may have become free
        self.holders: dict[int, Holder] = {}
        self.repeats: dict[bytes, Repeat] = {}  # request packet -> what answered it (answer_repeat)
        self.last_granted: KeptConnection | None = None  # by the request being answered

    @staticmethod
    def ok_line(cache: bool) -> bytes:
        """The OK of a one-connection per-user client lease; keep=1 when it asked cache=1: its
        process may keep a copy and hand it again (the shim's lease cache). That costs the keeper
        nothing: the copy lives no longer than the lease, for which the keeper holds the
        connection (and a relayed one's socketpair: tlslink.py) anyway."""
        return LEASE_OK_ONE_KEEP if cache else LEASE_OK_ONE

    def answer_repeat(self, client: ControlClient, data: bytes) -> bool:
        """Answer ``data`` as before, if it is a client LEASE answered in full already, its
        connection still open, no ping out, and held by ``client`` or idle with ``client``'s
        process holding leases already: exactly what the full path would do (grant, OK, FDS),
        without parsing or the pool. False: not such a request, the full path answers it."""
        self.last_granted = None
        repeat = self.repeats.get(data)
        if repeat is None:
            return False
        connection, pid = repeat.connection, client.pid
        holder = connection.holder_pid
        if (
            connection.sock is None
            or connection.ping_sent_at is not None
            or self.connections.get(connection.id) is not connection
            or (holder != pid and (holder is not None or pid not in self.holders))
        ):
            del self.repeats[data]
            return False
        new = self.grant(connection, pid)  # no pong to settle, no pidfd to open: cannot raise
        connection.lease_mode, connection.lease_transfer = repeat.mode, repeat.transfer
        try:
            if repeat.fds_packet is None:  # inline
                client.send(repeat.ok, (connection.fileno(),))
            else:
                client.send(repeat.ok)
                client.send(repeat.fds_packet, (connection.fileno(),))
        except FdkeeperError as error:  # no descriptor left to queue it: told as the full path tells it
            client.send(format_failure(error))
        self.log_grant(connection, pid, new)
        return True

    def log_grant(self, connection: KeptConnection, pid: int, new: bool) -> None:
        """The log line of a per-user grant: at info level when it changes hands, for the first
        LOGGED_PER_HOLDER of a holder (a per-call run leases one a user, thousands a run: a line
        each would cost more than the lease); the rest at debug level, and the end of the lease
        says how many there were."""
        held = len(self.holders[pid].connection_ids) if new and pid in self.holders else 0
        level = logging.INFO if 0 < held <= LOGGED_PER_HOLDER else logging.DEBUG
        if held == LOGGED_PER_HOLDER + 1:
            log.info("pid %d holds over %d connections: the next are logged at debug level", pid, LOGGED_PER_HOLDER)
        if log.isEnabledFor(level):
            log.log(level, "leased %s to pid %d", connection.label(), pid)

    def remember_repeat(self, data: bytes, request: Request) -> None:
        """After the full path answered ``request`` (packet ``data``): a client LEASE that granted
        one per-user connection is kept for answer_repeat."""
        connection, self.last_granted = self.last_granted, None
        if (
            connection is None
            or connection.aor is None
            or connection.sock is None
            or request.verb != "LEASE"
            or request.text("role") != "client"
            or request.number("for_pid") is not None
        ):
            return
        if len(self.repeats) >= REPEATS_PER_CONNECTION * len(self.connections):
            self.repeats.clear()
        fds_packet = fds_message([connection])
        mode, transfer = request.text("mode") or "preload", request.text("transfer") or "scm"
        ok = self.ok_line(request.flag("cache"))
        if request.flag("inline"):
            self.repeats[data] = Repeat(connection, ok + fds_packet.removeprefix(b"FDS"), None, mode, transfer)
        else:
            self.repeats[data] = Repeat(connection, ok, fds_packet, mode, transfer)

    def grant(self, connection: KeptConnection, pid: int) -> bool:
        """Lease ``connection`` to ``pid``; whether that is new (False: ``pid`` holds it already,
        as a per-call run's second call to the same user does)."""
        if connection.ping_sent_at is not None:
            self.health.settle_pong(connection)
            if connection.state == CLOSED:
                raise connection.closed_error()
        if connection.holder_pid == pid:
            self.last_granted = connection
            return False
        holder = self.holders.get(pid) or self._new_holder(pid)
        holder.connection_ids.add(connection.id)
        connection.holder_pid = pid
        connection.leases += 1
        self.last_granted = connection
        return True

    def refuse_if_held_by_other(self, connection: KeptConnection, pid: int | None) -> None:
        """Raise busy if another live process holds ``connection``; a dead holder is released."""
        holder = connection.holder_pid
        if holder is None or holder == pid:
            return
        if not self._holder_alive(holder):
            self.release(holder)
            return
        raise FdkeeperError(
            f"fdkeeper: kept connection {connection.label()} is leased by pid {holder} ({_process_name(holder)}); "
            "wait for that run to end, or pass --wait SECONDS",
            "busy",
        )

    def release(self, pid: int) -> None:
        """The holder exited: its connections become idle, for the next run."""
        holder = self.holders.pop(pid, None)
        if holder is None:
            return
        self._close_pidfd(holder)
        now = time.monotonic()
        for connection_id in holder.connection_ids:
            connection = self.connections.get(connection_id)
            if connection is not None and connection.holder_pid == pid:
                connection.holder_pid = None
                connection.last_activity = now
                self.health.end_of_lease(connection)
        if len(holder.connection_ids) > LOGGED_PER_HOLDER:
            log.info("pid %d held %d connections", pid, len(holder.connection_ids))
        log.info("lease of pid %d ended", pid)
        self.on_release()

    def close(self) -> None:
        """Forget every lease (the keeper stops; the holders keep their descriptors)."""
        for holder in self.holders.values():
            os.close(holder.pidfd)
        self.holders.clear()

    def _new_holder(self, pid: int) -> Holder:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise FdkeeperError(f"fdkeeper: process {pid} ended before its lease was granted", "internal") from None
        holder = Holder(pid, pidfd)
        self.holders[pid] = holder
        self.reactor.watch(pidfd, select.EPOLLIN, lambda _mask: self.release(pid), on_fault=self._fault_ends(holder))
        return holder

    def _close_pidfd(self, holder: Holder) -> None:
        if holder.pidfd >= 0:
            self.reactor.unwatch(holder.pidfd)
            os.close(holder.pidfd)
            holder.pidfd = -1

    def _fault_ends(self, holder: Holder) -> Callable[[Exception], None]:
        """Ending ``holder``'s lease raised (the Reactor logged it): the connections it held close,
        named, as their state past the fault is not to be trusted (unless another run holds one
        already); its pidfd is closed; waiters are asked again."""

        def end(error: Exception) -> None:
            if self.holders.get(holder.pid) is holder:
                del self.holders[holder.pid]
            self._close_pidfd(holder)
            for connection_id in holder.connection_ids:
                connection = self.connections.get(connection_id)
                if (
                    connection is not None
                    and connection.sock is not None
                    and connection.holder_pid in (holder.pid, None)
                ):
                    self.health.fault_ends(connection)(error)
            self.on_release()

        return end

    def _holder_alive(self, pid: int) -> bool:
        holder = self.holders.get(pid)
        if holder is None:
            return False
        poller = select.poll()  # not select(): descriptors past 1024 are normal in a keeper
        poller.register(holder.pidfd, select.POLLIN)
        return not poller.poll(0)


@dataclass
class Waiter:
    """A PREPARE with wait= whose connection is busy: answered when it frees or times out."""

    client: ControlClient
    request: Request
    deadline: float

    def answer(self, reply: bytes) -> None:
        """Send the reply (never blocking); the client is an ordinary idle one again."""
        self.client.waiting = False
        self.client.send(reply)


class Waiters:
    """PREPAREs waiting for busy connections. ``answer`` is the keeper's PREPARE: it returns
    the OK reply, or raises FdkeeperError (busy while the connection is still held).

    Each waiter is answered in a reactor call of its own, owned by its client: a defect met
    answering one (the loop logs and counts it) costs that client one ``ERR internal``
    (``on_fault_of``: ControlClients.on_fault_of), never the waiters after it in the same sweep.
    """

    def __init__(
        self,
        answer: Callable[[Request], bytes],
        reactor: Reactor,
        on_fault_of: Callable[[ControlClient], Callable[[Exception], None]],
    ) -> None:
        self.answer = answer
        self.reactor = reactor
        self.on_fault_of = on_fault_of
        self.waiting: list[Waiter] = []

    def add(self, client: ControlClient, request: Request) -> None:
        """``request`` waits up to its wait= seconds for the connections it asked for."""
        wait = request.get("wait")
        assert isinstance(wait, float), "only a request with wait= waits"
        self.waiting.append(Waiter(client, request, time.monotonic() + wait))

    def forget_client(self, client: ControlClient) -> None:
        self.waiting = [w for w in self.waiting if w.client is not client]

    def retry(self) -> None:
        """Answer every waiter whose connection is no longer busy."""
        waiting, self.waiting = self.waiting, []
        for waiter in waiting:
            self._in_own_call(waiter, self._retry_one)

    def expire(self) -> None:
        """Tell waiters whose wait= is up why their connection is still not theirs."""
        now = time.monotonic()
        expired = [w for w in self.waiting if w.deadline <= now]
        self.waiting = [w for w in self.waiting if w.deadline > now]
        for waiter in expired:
            self._in_own_call(waiter, self._expire_one)

    def _in_own_call(self, waiter: Waiter, step: Callable[[Waiter], None]) -> None:
        self.reactor.call_later(0, lambda: step(waiter), on_fault=self.on_fault_of(waiter.client))

    def _retry_one(self, waiter: Waiter) -> None:
        try:
            reply = self.answer(waiter.request)
        except FdkeeperError as error:
            if error.code == "busy":
                self.waiting.append(waiter)
            else:
                waiter.answer(format_failure(error))
            return
        waiter.answer(reply)

    def _expire_one(self, waiter: Waiter) -> None:
        try:
            reply = self.answer(waiter.request)
        except FdkeeperError as error:
            waited = f" (waited {waiter.request.get('wait'):g} s)" if error.code == "busy" else ""
            reply = format_failure(error, waited)
        waiter.answer(reply)  # free at its deadline after all: it gets the connection


def lease_holder(requester: int, for_pid: int | None) -> int:
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


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "unknown"
