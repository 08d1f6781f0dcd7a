"""Requests from the SuT to sipp over UDP: who may use the converter, what waits, what is resent.

- Attached runs: `fdkeeper sipp --mode udp` attaches each run's UDP address (sipp's -i:-p)
  before sipp starts and detaches it after (control requests ATTACH/DETACH); a converter
  started with --attached-only takes datagrams only from attached addresses, so no other
  local user can reach the SuT through our TCP/TLS session (dropped, counted). An attachment
  whose process is gone is dropped on the next tick.
- Nothing lost in a gap: a request with nowhere to go (no run attached) waits in a bounded
  queue (QUEUE_LIMIT messages, QUEUE_BYTES bytes, each at most 64*T1) and goes to the next run
  that attaches; the oldest is dropped past the bounds. Dropped and expired ones are counted.
- UDP may drop a datagram: a request sent to sipp is resent (RFC 3261 §17.1.1.2 timer A for
  INVITE, §17.1.2.2 timer E for the rest: from T1, doubling, non-INVITE capped at T2) until sipp
  sends any response with its Via branch, for at most 64*T1. ACK gets no response: never resent.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

from fdkeeper.address import Address, format_address
from fdkeeper.pidcheck import process_exists
from fdkeeper.protocol import JsonObject

T1, T2 = 0.5, 4.0
TIMEOUT = 64 * T1
QUEUE_LIMIT = 1000
QUEUE_BYTES = 8 * 1024 * 1024
PENDING_LIMIT = 20_000
WILDCARD_HOSTS = ("0.0.0.0", "::")


@dataclasses.dataclass
class Pending:
    """One request sent to sipp and not yet answered."""

    data: bytes
    destination: Address
    invite: bool
    interval: float
    next_at: float
    deadline: float


@dataclasses.dataclass
class Queued:
    data: bytes
    branch: bytes | None
    invite: bool
    expires_at: float


class UdpDelivery:
    """Attachments, the gap queue and retransmissions. I/O through ``send_udp``; counts in
    ``counters`` (the converter's)."""

    def __init__(self, send_udp: Callable[[bytes, Address], None], counters: collections.Counter[str]) -> None:
        self.send_udp = send_udp
        self.counters = counters
        self.attached: dict[Address, int | None] = {}  # address -> pid of the run's fdkeeper
        self.queue: collections.deque[Queued] = collections.deque()
        self.queued_bytes = 0
        self.pending: dict[bytes, Pending] = {}

    # -- attachments

    def is_attached(self, source: Address) -> bool:
        attached = self.attached
        if (source[0], source[1]) in attached:
            return True
        return any((host, source[1]) in attached for host in WILDCARD_HOSTS)

    def attach(self, address: Address, pid: int | None, now: float) -> int:
        """Attach a run's address; the queued requests go to it. Returns how many went."""
        self.attached[address] = pid
        sent = 0
        while self.queue:
            queued = self.queue.popleft()
            self.queued_bytes -= len(queued.data)
            if queued.expires_at <= now:
                self.counters["queue_expired"] += 1
                continue
            self.send_request(queued.data, queued.branch, queued.invite, address, now)
            sent += 1
        self.counters["queue_delivered"] += sent
        return sent

    def detach(self, address: Address) -> None:
        self.attached.pop(address, None)
        for branch in [b for b, p in self.pending.items() if p.destination == address]:
            del self.pending[branch]  # the run is over: nobody will answer

    def latest(self) -> Address | None:
        """The most recently attached address still attached."""
        return next(reversed(self.attached), None) if self.attached else None

    def dead_attachments(self) -> list[Address]:
        """Attached addresses whose run's process is gone (SIGKILLed before it could detach)."""
        return [address for address, pid in self.attached.items() if pid is not None and not process_exists(pid)]

    # -- requests towards sipp

    def send_request(
        self, data: bytes, branch: bytes | None, invite: bool, destination: Address | None, now: float
    ) -> None:
        """Send a request to sipp (tracked for retransmission), or queue it when ``destination`` is None."""
        if destination is None:
            self._enqueue(Queued(data, branch, invite, now + TIMEOUT))
            return
        self.send_udp(data, destination)
        if branch is None or data.startswith(b"ACK "):
            return
        if len(self.pending) >= PENDING_LIMIT and branch not in self.pending:
            self.counters["retransmit_untracked"] += 1
            return
        self.pending[branch] = Pending(data, destination, invite, T1, now + T1, now + TIMEOUT)

    def _enqueue(self, queued: Queued) -> None:
        self.queue.append(queued)
        self.queued_bytes += len(queued.data)
        self.counters["queued_requests"] += 1
        while len(self.queue) > QUEUE_LIMIT or self.queued_bytes > QUEUE_BYTES:
            self.queued_bytes -= len(self.queue.popleft().data)
            self.counters["queue_dropped"] += 1

    def answered(self, branch: bytes | None) -> None:
        """sipp sent a response with this Via branch: its request needs no more resending."""
        if branch is not None:
            self.pending.pop(branch, None)

    def tick(self, now: float) -> None:
        """Resend what is due, give up on what is too old, expire the queue."""
        if self.pending:
            for branch, pending in list(self.pending.items()):
                if pending.deadline <= now:
                    del self.pending[branch]
                    self.counters["retransmit_timeouts"] += 1
                elif pending.next_at <= now:
                    self.send_udp(pending.data, pending.destination)
                    self.counters["udp_retransmissions"] += 1
                    pending.interval = pending.interval * 2 if pending.invite else min(pending.interval * 2, T2)
                    pending.next_at = now + pending.interval
        while self.queue and self.queue[0].expires_at <= now:
            self.queued_bytes -= len(self.queue.popleft().data)
            self.counters["queue_expired"] += 1

    def as_dict(self) -> JsonObject:
        return {
            "attached": [format_address(address) for address in self.attached],
            "queued": len(self.queue),
            "queued_bytes": self.queued_bytes,
            "unanswered": len(self.pending),
        }
