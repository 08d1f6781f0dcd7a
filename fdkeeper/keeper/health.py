"""Whether kept connections are still alive: the SuT's FIN/RST, RFC 5626 keep-alive pings and pongs.

What each transport watches and how it keeps a connection alive is its own (transports.py:
plain TCP watches only for the SuT's FIN or RST and the pong at the head of the queue; TLS and
WebSocket links relay, and take pongs out of the stream). Here: what is common to all of them (closing
a connection, keeping one the SuT ended until what it sent is read, keep-alive rounds, a lease
waiting for a pong) and the one wake-up of the TLS pump.

A lease that finds a ping out waits for its pong (at most PONG_SETTLE) on a reactor timer,
never blocking the loop (``settle_pong``).
"""

from __future__ import annotations

import logging
import select
import time
from collections.abc import Callable, Iterable

from fdkeeper.keeper import tlspump
from fdkeeper.keeper.connection import IDLE, KeptConnection
from fdkeeper.keeper.opening import Pending
from fdkeeper.keeper.pings import TcpOptionsAnswerer
from fdkeeper.loop import Reactor, Timer

log = logging.getLogger("fdkeeper.keeper")

PONG_TIMEOUT = 10.0  # RFC 5626 §4.4.1: a flow with no pong within 10 s has failed
PONG_SETTLE = 2.0  # how long a lease waits for an outstanding pong before handing over
DELIVERY_CHECK = 0.25  # how often a connection the SuT ended is checked for its last requests read


class ConnectionHealth:
    def __init__(self, reactor: Reactor, keepalive: float | None, answer_options: bool = False) -> None:
        self.reactor = reactor
        self.keepalive = keepalive
        self.answer_options = answer_options
        self.options = TcpOptionsAnswerer(reactor) if answer_options else None
        # Idle plain TCP: the SuT's FIN/RST, and with --answer-options its OPTIONS pings.
        self.idle_events = select.EPOLLRDHUP | (select.EPOLLIN if answer_options else 0)
        # Leases waiting for a pong (settle_pong), and the pings whose pong they stopped waiting for.
        self._settling: dict[int, tuple[Pending, Timer]] = {}
        self._gave_up: dict[int, float | None] = {}
        # TLS links whose SSL object the pump keeps until its last write is done (tlslink.py),
        # taken back when the pump's eventfd says one is.
        self._finishing: dict[int, KeptConnection] = {}
        self._pump_wakeup = -1

    def watch(self, connection: KeptConnection) -> None:
        """Start watching a freshly opened connection (as its transport says: transports.py)."""
        connection.io.watch(self, connection)

    def close_connection(self, connection: KeptConnection, reason: str, going_away: bool = False) -> None:
        """Close it for ``reason``; ``going_away``: because the keeper stops (pool.close)."""
        log.info("%s: %s", connection.label(), reason)
        connection.io.unwatch(self.reactor)
        connection.mark_closed(reason, going_away)
        self._gave_up.pop(connection.id, None)
        self.stop_settling(connection)  # a lease waiting for its pong learns it closed

    def fault_ends(self, connection: KeptConnection) -> Callable[[Exception], None]:
        """What the Reactor calls when a handler of ``connection`` raised (it logged the traceback):
        that connection is closed with the internal error named, everything else goes on."""

        def end(error: Exception) -> None:
            if connection.sock is not None:
                self.close_connection(connection, f"internal error in the keeper ({type(error).__name__}); see its log")

        return end

    def end_of_lease(self, connection: KeptConnection) -> None:
        connection.io.end_of_lease(self, connection)

    # ---------------------------------------------------------------- the pump's hand-backs (TLS)

    def await_pump_finishing(self, connection: KeptConnection) -> None:
        """A TLS link whose SSL object the pump keeps until its last write is done (tlslink.py):
        taken back when the pump's eventfd says that write is."""
        self._finishing[connection.id] = connection
        if self._pump_wakeup < 0:
            self._pump_wakeup = tlspump.wakeup_fd()
            self.reactor.watch(
                self._pump_wakeup,
                select.EPOLLIN,
                lambda _mask: self._on_pump_wakeup(),
                on_fault=self._pump_wakeup_fault,
            )

    def _on_pump_wakeup(self) -> None:
        tlspump.clear_wakeup(self._pump_wakeup)
        for connection in list(self._finishing.values()):
            if connection.sock is None or connection.io.take_ssl_back(self, connection):
                del self._finishing[connection.id]

    def _pump_wakeup_fault(self, error: Exception) -> None:
        """Taking a link back faulted: the links waiting for it close, named, and the wake-up is
        cleared (else, level-triggered, it would fault again at once)."""
        tlspump.clear_wakeup(self._pump_wakeup)
        for connection in list(self._finishing.values()):
            self.fault_ends(connection)(error)
        self._finishing.clear()

    # ---------------------------------------------------------------- the SuT's side ended

    def close_when_delivered(self, connection: KeptConnection, reason: str) -> None:
        """Mark it closed once no complete message the SuT sent is left for a run to read (and,
        over TLS, no run's answer is left to send: transports.py still_sending)."""
        if connection.sock is None:
            return
        queued = connection.queued_bytes()
        if not queued and not connection.io.still_sending(connection):
            self.close_connection(connection, reason)
            return
        if not connection.ending:
            log.info("%s: %s; %d bytes it sent before are kept for the next run", connection.label(), reason, queued)
        connection.ending = reason
        self.reactor.call_later(
            DELIVERY_CHECK, lambda: self.close_when_delivered(connection, reason), on_fault=self.fault_ends(connection)
        )

    # ---------------------------------------------------------------- keep-alive

    def keep_alive(self, connections: Iterable[KeptConnection]) -> None:
        """Ping idle connections quiet for ``keepalive`` s; close those whose pong is overdue."""
        interval = self.keepalive
        if interval is None:  # no keep-alive asked for
            return
        now = time.monotonic()
        for connection in list(connections):
            if connection.state == IDLE and not connection.ending:
                connection.io.keep_alive(self, connection, now, interval)

    def settle_pong(self, connection: KeptConnection) -> None:
        """Before a lease, let an outstanding pong arrive so it never reaches sipp, without
        blocking the loop: raises Pending, and the lease is asked again when the pong arrives,
        the connection closes, or PONG_SETTLE passes (then the lease goes ahead)."""
        if self._gave_up.get(connection.id) == connection.ping_sent_at:
            return
        waiting = self._settling.get(connection.id)
        if waiting is None:
            pending = Pending(f"the keep-alive pong of {connection.label()}")
            timer = self.reactor.call_later(
                PONG_SETTLE, lambda: self.stop_settling(connection, gave_up=True), on_fault=self.fault_ends(connection)
            )  # closing it answers the lease
            waiting = self._settling[connection.id] = (pending, timer)
        raise waiting[0]

    def stop_settling(self, connection: KeptConnection, gave_up: bool = False) -> None:
        waiting = self._settling.pop(connection.id, None)
        if waiting is None:
            return
        pending, timer = waiting
        timer.cancel()
        if gave_up:
            log.warning("%s: no keep-alive pong within %g s; leasing it anyway", connection.label(), PONG_SETTLE)
            self._gave_up[connection.id] = connection.ping_sent_at
        pending.settle()
