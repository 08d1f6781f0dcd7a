"""Whether kept connections are still alive: the SuT's FIN/RST, RFC 5626 keep-alive pings and pongs.

Between runs the keeper never reads SIP bytes from a plain TCP connection: it watches only
for the SuT's FIN or RST, and while a keep-alive ping is out, for the pong at the head of the
queue. TLS connections are pumped by their TlsLink, which also takes pongs out of the stream.

A lease that finds a ping out waits for its pong (at most PONG_SETTLE) on a reactor timer,
never blocking the loop (``settle_pong``).
"""

from __future__ import annotations

import logging
import select
import time
from typing import Callable, Iterable

from fdkeeper.keeper import tlspump
from fdkeeper.keeper.connection import IDLE, KeptConnection
from fdkeeper.keeper.opening import Pending
from fdkeeper.keeper.pings import TcpOptionsAnswerer
from fdkeeper.loop import Reactor, Timer

log = logging.getLogger("fdkeeper.keeper")

PONG_TIMEOUT = 10.0  # RFC 5626 §4.4.1: a flow with no pong within 10 s has failed
PONG_SETTLE = 2.0  # how long a lease waits for an outstanding pong before handing over
# After the SuT ended a TLS link cleanly and the last run's lease ended: how long what that run
# wrote still has to reach the SuT before the link closes.
FLUSH_GRACE = 2.0
DELIVERY_CHECK = 0.25  # how often a connection the SuT ended is checked for its last requests read
_PEER_GONE = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR


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
        """Start watching a freshly opened connection."""
        link = connection.link
        if link:
            link.answer_options = self.answer_options
            link.is_held = lambda c=connection: c.holder_pid is not None
            link.watched_tls, link.watched_pair = link.wants_tls(), link.wants_pair()
            self.reactor.watch(link.tls.fileno(), link.watched_tls, lambda mask, c=connection: self._on_tls_event(c, mask),
                               on_fault=self.fault_ends(connection))
            self.reactor.watch(
                link.keeper_end.fileno(), link.watched_pair, lambda mask, c=connection: self._on_pair_event(c, mask),
                on_fault=self.fault_ends(connection),
            )
        else:
            # Only the SuT's FIN/RST is watched, and EPOLLIN only to take pongs and (--answer-options)
            # OPTIONS off the head of the queue: queued requests wait for the next run.
            self.reactor.watch(
                connection.fileno(), self.idle_events, lambda mask, c=connection: self._on_connection_event(c, mask),
                on_fault=self.fault_ends(connection),
            )

    def fault_ends(self, connection: KeptConnection) -> Callable[[Exception], None]:
        """What the Reactor calls when a handler of ``connection`` raised (it logged the traceback):
        that connection is closed with the internal error named, everything else goes on."""

        def end(error: Exception) -> None:
            if connection.sock is not None:
                self.close_connection(connection, f"internal error in the keeper ({type(error).__name__}); see its log")

        return end

    def close_connection(self, connection: KeptConnection, reason: str) -> None:
        log.info("%s: %s", connection.label(), reason)
        if connection.link:
            self.reactor.unwatch(connection.link.tls.fileno())
            self.reactor.unwatch(connection.link.keeper_end.fileno())
        else:
            self.reactor.unwatch(connection.fileno())
        connection.mark_closed(reason)
        self._gave_up.pop(connection.id, None)
        self._stop_settling(connection)  # a lease waiting for its pong learns it closed

    # ---------------------------------------------------------------- events

    def _on_connection_event(self, connection: KeptConnection, mask: int) -> None:
        if connection.sock is None:
            return
        if mask & _PEER_GONE:
            if connection.holds_whole_message():
                # Requests wait in the queue: the next run reads them, then the FIN or the RST
                # (SO_ERROR is not read here: that would turn the run's ECONNRESET into EOF).
                # Leased too: the run holding it may die before it reads them (a killed sipp),
                # and the keeper's descriptor is what keeps them for the run after it.
                self.reactor.unwatch(connection.fileno())
                gone = "the SuT reset it" if mask & select.EPOLLERR else "the SuT closed it: FIN"
                self._close_when_delivered(connection, gone)
            else:
                self.close_connection(connection, connection.peer_gone_reason())
        elif mask & select.EPOLLIN and connection.ping_sent_at is not None:
            self._collect_pong(connection)
        elif mask & select.EPOLLIN and self.options is not None:
            self.options.on_readable(connection)

    def _on_tls_event(self, connection: KeptConnection, mask: int) -> None:
        connection.link.on_tls_event(mask)
        self.after_link_event(connection)

    def _on_pair_event(self, connection: KeptConnection, mask: int) -> None:
        connection.link.on_pair_event(mask)
        self.after_link_event(connection)

    def after_link_event(self, connection: KeptConnection) -> None:
        """Close a TLS connection whose link failed, else watch what its link wants now."""
        link = connection.link
        if link.closed_reason:
            self._link_ended(connection)
            return
        if link.ssl_with_pump:
            self._await_pump_finishing(connection)
        if link.sut_ended and not connection.ending:
            self._close_when_delivered(connection, link.sut_ended)
        # epoll_ctl only when the wanted events changed: two system calls saved per message.
        tls_events, pair_events = link.wants_tls(), link.wants_pair()
        if tls_events != link.watched_tls:
            self.reactor.rewatch(link.tls.fileno(), tls_events)
            link.watched_tls = tls_events
        if pair_events != link.watched_pair:
            self.reactor.rewatch(link.keeper_end.fileno(), pair_events)
            link.watched_pair = pair_events

    def _await_pump_finishing(self, connection: KeptConnection) -> None:
        self._finishing[connection.id] = connection
        if self._pump_wakeup < 0:
            self._pump_wakeup = tlspump.wakeup_fd()
            self.reactor.watch(self._pump_wakeup, select.EPOLLIN, lambda _mask: self._on_pump_wakeup(),
                               on_fault=self._pump_wakeup_fault)

    def _on_pump_wakeup(self) -> None:
        """The pump finished a write it had pending at release: give those links' SSL back to Python."""
        tlspump.clear_wakeup(self._pump_wakeup)
        for connection in list(self._finishing.values()):
            link = connection.link
            if connection.sock is None or not link.ssl_with_pump:
                del self._finishing[connection.id]
            elif link.take_ssl_back():
                del self._finishing[connection.id]
                self.after_link_event(connection)

    def _pump_wakeup_fault(self, error: Exception) -> None:
        """Taking a link back faulted: the links waiting for it close, named, and the wake-up is
        cleared (else, level-triggered, it would fault again at once)."""
        tlspump.clear_wakeup(self._pump_wakeup)
        for connection in list(self._finishing.values()):
            self.fault_ends(connection)(error)
        self._finishing.clear()

    # ---------------------------------------------------------------- the SuT's side ended

    def _link_ended(self, connection: KeptConnection) -> None:
        """The SuT's TLS side ended: hand what it sent whole to the pair, then end the pair."""
        link = connection.link
        if connection.sock is None or link.keeper_end.fileno() < 0:  # closed, or handled already
            return
        if link.tls.fileno() >= 0:
            self.reactor.unwatch(link.tls.fileno())
            link.close_tls()
        if link.to_sipp:  # more than the pair takes now: go on on EPOLLOUT
            if link.watched_pair != select.EPOLLOUT:
                self.reactor.rewatch(link.keeper_end.fileno(), select.EPOLLOUT)
                link.watched_pair = select.EPOLLOUT
            return
        self.reactor.unwatch(link.keeper_end.fileno())
        link.end_towards_sipp()
        if not connection.ending:  # else the check it started goes on
            self._close_when_delivered(connection, link.closed_reason)

    def _close_when_delivered(self, connection: KeptConnection, reason: str) -> None:
        """Mark it closed once no complete message the SuT sent is left for a run to read."""
        if connection.sock is None:
            return
        queued = connection.queued_bytes()
        if not queued and not self._still_sending(connection):
            self.close_connection(connection, reason)
            return
        if not connection.ending:
            log.info("%s: %s; %d bytes it sent before are kept for the next run", connection.label(), reason, queued)
        connection.ending = reason
        self.reactor.call_later(DELIVERY_CHECK, lambda: self._close_when_delivered(connection, reason),
                                on_fault=self.fault_ends(connection))

    @staticmethod
    def _still_sending(connection: KeptConnection) -> bool:
        """A TLS link the SuT ended cleanly carries what a run writes while a run holds it, and
        for FLUSH_GRACE after, while that run's last messages go out (a half-closed TCP socket
        is the run's own: it needs no such wait)."""
        link = connection.link
        if link is None or not link.still_sending():
            return False
        if connection.holder_pid is not None:
            return True
        return bool(link.to_sut or link.ssl_with_pump) and time.monotonic() - connection.last_activity < FLUSH_GRACE

    # ---------------------------------------------------------------- keep-alive

    def keep_alive(self, connections: Iterable[KeptConnection]) -> None:
        """Ping idle connections quiet for ``keepalive`` s; close those whose pong is overdue."""
        now = time.monotonic()
        for connection in list(connections):
            if connection.state != IDLE or connection.ending:
                continue
            if connection.link:
                self._keep_link_alive(connection, now)
                continue
            if connection.ping_sent_at is not None:
                if now - connection.ping_sent_at > PONG_TIMEOUT:
                    self.close_connection(connection, f"no keep-alive pong within {PONG_TIMEOUT:g} s")
            elif now - connection.last_activity >= self.keepalive and connection.send_ping():
                # Watch for the pong now; queued data was checked to be empty before the ping.
                self.reactor.rewatch(connection.fileno(), select.EPOLLRDHUP | select.EPOLLIN)

    def _keep_link_alive(self, connection: KeptConnection, now: float) -> None:
        """TLS: pongs are taken out of the stream by the framer, so only timing is left here."""
        link = connection.link
        if link.ping_sent_at is not None:
            if now - link.ping_sent_at > PONG_TIMEOUT:
                self.close_connection(connection, f"no keep-alive pong within {PONG_TIMEOUT:g} s")
        elif now - max(link.last_activity, connection.last_activity) >= self.keepalive and link.idle():
            link.send_ping()
            self.after_link_event(connection)

    def _collect_pong(self, connection: KeptConnection) -> None:
        connection.take_pong()
        # Pong taken, or a request overtook it: either way stop reading readiness, the
        # queue belongs to the next run from here.
        connection.last_activity = time.monotonic()
        if connection.ping_sent_at is not None and connection.queued_bytes():
            log.warning("%s: a request arrived before the keep-alive pong", connection.label())
            connection.ping_sent_at = None
        if connection.ping_sent_at is None:
            self.reactor.rewatch(connection.fileno(), self.idle_events)
            self._stop_settling(connection)

    def settle_pong(self, connection: KeptConnection) -> None:
        """Before a lease, let an outstanding pong arrive so it never reaches sipp, without
        blocking the loop: raises Pending, and the lease is asked again when the pong arrives,
        the connection closes, or PONG_SETTLE passes (then the lease goes ahead)."""
        if self._gave_up.get(connection.id) == connection.ping_sent_at:
            return
        waiting = self._settling.get(connection.id)
        if waiting is None:
            pending = Pending(f"the keep-alive pong of {connection.label()}")
            timer = self.reactor.call_later(PONG_SETTLE, lambda: self._stop_settling(connection, gave_up=True))
            waiting = self._settling[connection.id] = (pending, timer)
        raise waiting[0]

    def _stop_settling(self, connection: KeptConnection, gave_up: bool = False) -> None:
        waiting = self._settling.pop(connection.id, None)
        if waiting is None:
            return
        pending, timer = waiting
        timer.cancel()
        if gave_up:
            log.warning("%s: no keep-alive pong within %g s; leasing it anyway", connection.label(), PONG_SETTLE)
            self._gave_up[connection.id] = connection.ping_sent_at
        pending.settle()
