"""Whether kept connections are still alive: the SuT's FIN/RST, RFC 5626 keep-alive pings and pongs.

Between runs the keeper never reads SIP bytes from a plain TCP connection: it watches only
for the SuT's FIN or RST, and while a keep-alive ping is out, for the pong at the head of the
queue. TLS connections are pumped by their TlsLink, which also takes pongs out of the stream.

``settle_pong`` is the one blocking wait here (at most PONG_SETTLE); it stays in this module
so that it can become a reactor timer later without touching the rest of the keeper.
"""

from __future__ import annotations

import logging
import select
import time
from typing import Iterable

from fdkeeper.keeper.connection import IDLE, KeptConnection
from fdkeeper.loop import Reactor

log = logging.getLogger("fdkeeper.keeper")

PONG_TIMEOUT = 10.0  # RFC 5626 §4.4.1: a flow with no pong within 10 s has failed
PONG_SETTLE = 2.0  # how long a lease waits for an outstanding pong before handing over
_PEER_GONE = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR


class ConnectionHealth:
    def __init__(self, reactor: Reactor, keepalive: float | None) -> None:
        self.reactor = reactor
        self.keepalive = keepalive

    def watch(self, connection: KeptConnection) -> None:
        """Start watching a freshly opened connection."""
        link = connection.link
        if link:
            link.watched_tls, link.watched_pair = link.wants_tls(), link.wants_pair()
            self.reactor.watch(link.tls.fileno(), link.watched_tls, lambda mask, c=connection: self._on_tls_event(c, mask))
            self.reactor.watch(
                link.keeper_end.fileno(), link.watched_pair, lambda mask, c=connection: self._on_pair_event(c, mask)
            )
        else:
            # Only the SuT's FIN/RST is watched, never EPOLLIN: queued requests wait for the next run.
            self.reactor.watch(
                connection.fileno(), select.EPOLLRDHUP, lambda mask, c=connection: self._on_connection_event(c, mask)
            )

    def close_connection(self, connection: KeptConnection, reason: str) -> None:
        log.info("%s: %s", connection.label(), reason)
        if connection.link:
            self.reactor.unwatch(connection.link.tls.fileno())
            self.reactor.unwatch(connection.link.keeper_end.fileno())
        else:
            self.reactor.unwatch(connection.fileno())
        connection.mark_closed(reason)

    # ---------------------------------------------------------------- events

    def _on_connection_event(self, connection: KeptConnection, mask: int) -> None:
        if connection.sock is None:
            return
        if mask & _PEER_GONE:
            self.close_connection(connection, connection.peer_gone_reason())
        elif mask & select.EPOLLIN and connection.ping_sent_at is not None:
            self._collect_pong(connection)

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
            self.close_connection(connection, link.closed_reason)
            return
        # epoll_ctl only when the wanted events changed: two system calls saved per message.
        tls_events, pair_events = link.wants_tls(), link.wants_pair()
        if tls_events != link.watched_tls:
            self.reactor.rewatch(link.tls.fileno(), tls_events)
            link.watched_tls = tls_events
        if pair_events != link.watched_pair:
            self.reactor.rewatch(link.keeper_end.fileno(), pair_events)
            link.watched_pair = pair_events

    # ---------------------------------------------------------------- keep-alive

    def keep_alive(self, connections: Iterable[KeptConnection]) -> None:
        """Ping idle connections quiet for ``keepalive`` s; close those whose pong is overdue."""
        now = time.monotonic()
        for connection in list(connections):
            if connection.state != IDLE:
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
            self.reactor.rewatch(connection.fileno(), select.EPOLLRDHUP)

    def settle_pong(self, connection: KeptConnection) -> None:
        """Before a lease, wait briefly for an outstanding pong so it never reaches sipp (blocks)."""
        poller = select.poll()
        poller.register(connection.fileno(), select.POLLIN | select.POLLRDHUP)
        deadline = time.monotonic() + PONG_SETTLE
        while connection.ping_sent_at is not None and time.monotonic() < deadline:
            events = poller.poll(max(0.0, deadline - time.monotonic()) * 1000)
            if not events:
                break
            mask = events[0][1]
            if mask & (select.POLLRDHUP | select.POLLHUP | select.POLLERR):
                self.close_connection(connection, connection.peer_gone_reason())
                return
            self._collect_pong(connection)
