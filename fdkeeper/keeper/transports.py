"""How the keeper holds a kept connection, per transport: the one place where they differ.

Every KeptConnection has an ``io``: a ``TcpTransport`` (the kernel socket is what runs are
leased; between runs the keeper only watches it for the SuT's FIN or RST, keep-alive pongs and
--answer-options' OPTIONS) or a ``RelayedTransport`` (tls, ws, wss: the keeper terminates TLS
and WebSocket and runs are leased one end of a socketpair the link relays: keeper/tlslink.py,
over the wire and codec transport_for chooses). Health, leases, handover, status and
diagnostics ask the ``io`` (watch, unwatch, keep-alive, end of lease, movable, stats), never
which transport it is.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import time
from typing import TYPE_CHECKING, Protocol, TypedDict

from fdkeeper.keeper.codec import Codec, SipStream, WebSocketStream
from fdkeeper.keeper.health import PONG_TIMEOUT
from fdkeeper.keeper.sharing import SharedValues
from fdkeeper.keeper.tlslink import TlsLink
from fdkeeper.keeper.wire import TcpWire, TlsWire, Wire
from fdkeeper.tls import TlsInfo, TlsOptions, describe
from fdkeeper.websocket import WsHandshake

if TYPE_CHECKING:
    from fdkeeper.keeper.connection import KeptConnection
    from fdkeeper.keeper.health import ConnectionHealth
    from fdkeeper.loop import Reactor

log = logging.getLogger("fdkeeper.keeper")

_PEER_GONE = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
# After the SuT ended a TLS link cleanly and the last run's lease ended: how long what that run
# wrote still has to reach the SuT before the link closes.
FLUSH_GRACE = 2.0


class LinkStats(TypedDict):
    """What went through a relayed link, and who relays it while a run holds it (python, pump)."""

    relay: str
    messages_to_sut: int
    messages_to_sipp: int
    dropped_bytes: int


class TlsStats(TlsInfo, LinkStats):
    """A TLS link's part of `fdkeeper status`: the session (tls.describe) and what went through."""


class WsStats(LinkStats):
    """A WebSocket link's part of `fdkeeper status`: the handshake, pings answered, the SuT's
    Close ("" while open), and what went through (as under "tls" for wss)."""

    path: str
    protocol: str
    status: str
    server_headers: list[list[str]]
    pings_answered: int
    close: str


class TransportStats(TypedDict):
    """A transport's part of a connection in `fdkeeper status`."""

    options_answered: int
    pongs: int
    tls: TlsStats | None
    websocket: WsStats | None


class Transport(Protocol):
    @property
    def movable(self) -> bool:
        """Whether --replace can hand it to a new keeper now: all its state is the kernel's."""

    def handed_socket(self, connection: KeptConnection) -> socket.socket:
        """The socket a successor keeper takes (--replace, when ``movable``)."""

    def let_go(self) -> None:
        """Handed over: this keeper leaves the connection alone (closing its copy says nothing to the SuT)."""

    def leased_socket(self, opened: socket.socket) -> socket.socket:
        """The descriptor runs are leased, given the connection the keeper opened."""

    def watch(self, health: ConnectionHealth, connection: KeptConnection) -> None:
        """Start watching a freshly kept connection on the keeper's Reactor."""

    def unwatch(self, reactor: Reactor) -> None:
        """Stop watching every descriptor of it (before it is closed)."""

    def keep_alive(self, health: ConnectionHealth, connection: KeptConnection, now: float, interval: float) -> None:
        """An idle connection: ping it when quiet for ``interval`` s (--keepalive), close it when the pong is overdue."""

    def end_of_lease(self, health: ConnectionHealth, connection: KeptConnection) -> None:
        """The run holding it ended: what the keeper does with what that run left."""

    def still_sending(self, connection: KeptConnection) -> bool:
        """After the SuT ended it: whether it still carries what a run writes (keep it open)."""

    def stats(self, connection: KeptConnection) -> TransportStats:
        """Its part of `fdkeeper status`: keep-alive pongs, OPTIONS answered, TLS and WebSocket details."""

    def take_ssl_back(self, health: ConnectionHealth, connection: KeptConnection) -> bool:
        """The TLS pump's wake-up fired: whether this connection waits for the pump no more."""

    def buffered(self) -> tuple[int, int]:
        """Bytes the keeper holds towards the SuT and towards runs (diagnostics)."""

    def close(self, going_away: bool = False) -> None:
        """Close what it holds besides the leased socket (``going_away``: the keeper stops)."""


def transport_for(
    opened: socket.socket, tls: TlsOptions | None, early: bytes, websocket: WsHandshake | None = None
) -> Transport:
    """The transport of a connection the keeper just opened: tcp, tls (handshake done), ws or wss
    (the WebSocket handshake done too); ``early``: what the SuT sent after the handshakes."""
    if tls is None and websocket is None:
        return TcpTransport()
    wire: Wire
    if tls is not None:
        assert isinstance(opened, ssl.SSLSocket), "a TLS connection opened without its TLS socket"
        wire = TlsWire(opened)
    else:
        wire = TcpWire(opened)
    codec: Codec = WebSocketStream() if websocket is not None else SipStream()
    info = _shared(describe(opened, tls)) if isinstance(opened, ssl.SSLSocket) and tls is not None else None
    return RelayedTransport(TlsLink(wire, early, codec), info, websocket)


# The TLS sessions' descriptions (tls.describe): links to one SuT with one configuration share
# one (about 200 bytes each otherwise); read only, copied into `fdkeeper status`. Bounded: past
# it, new ones are simply not shared.
MAX_SHARED_INFO = 256
_SHARED_INFO: SharedValues[tuple[object, ...], TlsInfo] = SharedValues(MAX_SHARED_INFO)


def _shared(info: TlsInfo) -> TlsInfo:
    return _SHARED_INFO.one(tuple(info.values()), lambda: info)


class _Watched:
    """What a transport's event handlers on the Reactor need: its connection and the keeper's
    health. Kept here, and the transport itself the Reactor's Watcher of its socket (loop.py),
    rather than a closure, a bound method or a tuple per connection: an idle kept connection's
    Python objects are most of its memory (bench/keeper_scale.py)."""

    __slots__ = ("_connection", "_health")
    _health: ConnectionHealth
    _connection: KeptConnection

    def _watched_by(self, health: ConnectionHealth, connection: KeptConnection) -> None:
        self._health, self._connection = health, connection

    def on_fault(self, error: Exception) -> None:
        """A handler of this connection raised (the Reactor logged it): health ends the connection."""
        self._health.fault_ends(self._connection)(error)


class TcpTransport(_Watched):
    """Plain TCP: runs are leased the kernel socket itself. The keeper never reads SIP bytes
    from it; between runs it watches only for the SuT's FIN or RST, and EPOLLIN only to take
    pongs and (--answer-options) OPTIONS off the head of the queue."""

    __slots__ = ()
    movable = True

    def handed_socket(self, connection: KeptConnection) -> socket.socket:
        return connection.live_socket()

    def let_go(self) -> None:
        pass  # the keeper only watches it: its copy closes silently

    def leased_socket(self, opened: socket.socket) -> socket.socket:
        return opened

    def watch(self, health: ConnectionHealth, connection: KeptConnection) -> None:
        self._watched_by(health, connection)
        health.reactor.watch_by(connection.fileno(), health.idle_events, self)

    def unwatch(self, reactor: Reactor) -> None:
        # Its socket's descriptor while it is open (it is unwatched before it closes); none kept
        # here: 16 bytes an idle connection.
        sock = self._connection.sock if hasattr(self, "_connection") else None  # None: never watched
        if sock is not None and sock.fileno() >= 0:
            reactor.unwatch(sock.fileno())

    def on_event(self, mask: int) -> None:
        """Its socket's events (the Reactor's Watcher of it is the transport itself)."""
        health, connection = self._health, self._connection
        if connection.sock is None:
            return
        if mask & _PEER_GONE:
            if connection.holds_whole_message():
                # Requests wait in the queue: the next run reads them, then the FIN or the RST
                # (SO_ERROR is not read here: that would turn the run's ECONNRESET into EOF).
                # Leased too: the run holding it may die before it reads them (a killed sipp),
                # and the keeper's descriptor is what keeps them for the run after it.
                health.reactor.unwatch(connection.fileno())
                gone = "the SuT reset it" if mask & select.EPOLLERR else "the SuT closed it: FIN"
                health.close_when_delivered(connection, gone)
            else:
                health.close_connection(connection, connection.peer_gone_reason(bool(mask & select.EPOLLERR)))
        elif mask & select.EPOLLIN and connection.ping_sent_at is not None:
            self._collect_pong(health, connection)
        elif mask & select.EPOLLIN and health.options is not None:
            health.options.on_readable(connection)

    def keep_alive(self, health: ConnectionHealth, connection: KeptConnection, now: float, interval: float) -> None:
        if connection.ping_sent_at is not None:
            if now - connection.ping_sent_at > PONG_TIMEOUT:
                health.close_connection(connection, f"no keep-alive pong within {PONG_TIMEOUT:g} s")
        elif now - connection.last_activity >= interval and connection.send_ping():
            # Watch for the pong now; queued data was checked to be empty before the ping.
            health.reactor.rewatch(connection.fileno(), select.EPOLLRDHUP | select.EPOLLIN)

    def _collect_pong(self, health: ConnectionHealth, connection: KeptConnection) -> None:
        connection.take_pong()
        # Pong taken, or a request overtook it: either way stop reading readiness, the
        # queue belongs to the next run from here.
        connection.last_activity = time.monotonic()
        if connection.ping_sent_at is not None and connection.queued_bytes():
            log.warning("%s: a request arrived before the keep-alive pong", connection.label())
            connection.ping_sent_at = None
        if connection.ping_sent_at is None:
            health.reactor.rewatch(connection.fileno(), health.idle_events)
            health.stop_settling(connection)

    def end_of_lease(self, health: ConnectionHealth, connection: KeptConnection) -> None:
        pass  # the run read and wrote the kernel socket itself: nothing is the keeper's to finish

    def still_sending(self, connection: KeptConnection) -> bool:
        return False  # a half-closed TCP socket is the run's own: it needs no keeper to send

    def stats(self, connection: KeptConnection) -> TransportStats:
        return {
            "options_answered": connection.options_answered,
            "pongs": connection.pongs,
            "tls": None,
            "websocket": None,
        }

    def take_ssl_back(self, health: ConnectionHealth, connection: KeptConnection) -> bool:
        return True  # no TLS session, no pump: never waits for it

    def buffered(self) -> tuple[int, int]:
        return 0, 0

    def close(self, going_away: bool = False) -> None:
        pass


class RelayedTransport(_Watched):
    """TLS, WebSocket over TCP or TLS: the keeper holds the connection (a TLS session cannot move
    between processes, sipp speaks no WebSocket) and runs are leased one end of a socketpair its
    TlsLink relays, whole SIP messages only. ``info``: the TLS session (tls, wss); ``websocket``:
    the handshake (ws, wss)."""

    __slots__ = ("info", "link", "websocket")

    def __init__(self, link: TlsLink, info: TlsInfo | None = None, websocket: WsHandshake | None = None) -> None:
        self.link = link
        self.info = info
        self.websocket = websocket

    @property
    def movable(self) -> bool:
        """--replace moves kernel sockets only: a TLS session cannot follow (its state is this
        process's OpenSSL's), a WebSocket over TCP can while the link holds nothing (handover.py
        carries its handshake)."""
        return self.link.wire.kind == "TCP" and self.link.holds_nothing()

    def handed_socket(self, connection: KeptConnection) -> socket.socket:
        return self.link.wire.sock

    def let_go(self) -> None:
        self.link.moved = True

    def leased_socket(self, opened: socket.socket) -> socket.socket:
        return self.link.sipp_end

    def watch(self, health: ConnectionHealth, connection: KeptConnection) -> None:
        self._watched_by(health, connection)
        link = self.link
        link.answer_options = health.answer_options
        link.is_held = self  # __call__: no bound method per link
        link.watched_sut = link.wants_sut()
        health.reactor.watch_by(link.wire.sock.fileno(), link.watched_sut, self)
        if link.keeper_end.fileno() >= 0:  # the socketpair exists only while a run needs it (tlslink.py)
            self._watch_pair(health.reactor)
        if link.closed_reason or link.sut_ended:  # ended by what came with the handshake
            self.after_event(health, connection)

    def _watch_pair(self, reactor: Reactor) -> None:
        link = self.link
        link.watched_pair = link.wants_pair()
        reactor.watch_by(link.keeper_end.fileno(), link.watched_pair, _PairWatcher(self))

    # The link's PairWatch (tlslink.py), where it is given one: its socketpair made and dropped as
    # runs need it, followed on the loop with no object of its own per link.
    def made(self) -> None:
        """A new pair: watch its ``keeper_end``, the one new descriptor (the previous one was
        unwatched at ``dropping``). The SuT's socket stays watched as it is, its events changed
        only if what the link wants of it did (after_event): the new pair may have taken the
        ``to_sipp`` that held its reads back. One epoll_ctl where unwatching and watching both
        again took three. No one-shot re-arm is lost: the SuT's mask is one-shot only while the
        pump holds the link (it has its pair then) or finishes a write (taking the SSL object
        back changes the mask, which re-arms it)."""
        self._watch_pair(self._health.reactor)
        self.after_event(self._health, self._connection)  # an end the pair was made for (tlslink.py) goes on

    def dropping(self, fd: int) -> None:
        """The pair's ``keeper_end`` (``fd``) is about to close: stop watching it."""
        self._health.reactor.unwatch(fd)

    def __call__(self) -> bool:
        """Whether a run holds its connection now (the link's ``is_held``)."""
        return self._connection.holder_pid is not None

    def on_event(self, mask: int) -> None:
        """The SuT's socket's events (the Reactor's Watcher of it is the transport itself)."""
        self.link.on_sut_event(mask)
        self.after_event(self._health, self._connection)

    def on_pair_event(self, mask: int) -> None:
        """The keeper's end of the socketpair's events (through its _PairWatcher)."""
        self.link.on_pair_event(mask)
        self.after_event(self._health, self._connection)

    def unwatch(self, reactor: Reactor) -> None:
        for sock in (self.link.wire.sock, self.link.keeper_end):
            if sock.fileno() >= 0:
                reactor.unwatch(sock.fileno())

    def after_event(self, health: ConnectionHealth, connection: KeptConnection) -> None:
        """Close a link that failed, else watch what it wants now."""
        link = self.link
        if link.closed_reason:
            self._ended(health, connection)
            return
        if link.ssl_with_pump:
            health.await_pump_finishing(connection)
        if link.sut_ended and not connection.ending:
            health.close_when_delivered(connection, link.sut_ended)
            if connection.sock is None:  # nothing left to deliver either way: closed
                return
        # epoll_ctl only when the wanted events changed: two system calls saved per message.
        sut_events, pair_events = link.wants_sut(), link.wants_pair()
        if sut_events != link.watched_sut:
            health.reactor.rewatch(link.wire.sock.fileno(), sut_events)
            link.watched_sut = sut_events
        if pair_events != link.watched_pair:
            health.reactor.rewatch(link.keeper_end.fileno(), pair_events)
            link.watched_pair = pair_events

    def take_ssl_back(self, health: ConnectionHealth, connection: KeptConnection) -> bool:
        """The pump's eventfd fired: take the SSL object back if its last write is done; whether
        the link waits for the pump no more."""
        if not self.link.take_ssl_back():
            return False
        self.after_event(health, connection)
        return True

    def _ended(self, health: ConnectionHealth, connection: KeptConnection) -> None:
        """The link is over: hand what the SuT sent whole to the pair, then end the pair."""
        link = self.link
        if connection.sock is None or link.keeper_end.fileno() < 0:  # closed, or handled already
            return
        if link.wire.sock.fileno() >= 0:
            health.reactor.unwatch(link.wire.sock.fileno())
            link.close_wire()
        if link.to_sipp:  # more than the pair takes now: go on on EPOLLOUT
            if link.watched_pair != select.EPOLLOUT:
                health.reactor.rewatch(link.keeper_end.fileno(), select.EPOLLOUT)
                link.watched_pair = select.EPOLLOUT
            return
        health.reactor.unwatch(link.keeper_end.fileno())
        link.end_towards_sipp()
        if not connection.ending:  # else the check it started goes on
            health.close_when_delivered(connection, link.closed_reason)

    def keep_alive(self, health: ConnectionHealth, connection: KeptConnection, now: float, interval: float) -> None:
        """Pongs are taken out of the stream by the link's framer, so only timing is left here."""
        link = self.link
        if link.ping_sent_at is not None:
            if now - link.ping_sent_at > PONG_TIMEOUT:
                health.close_connection(connection, f"no keep-alive pong within {PONG_TIMEOUT:g} s")
        elif now - max(link.last_activity, connection.last_activity) >= interval and link.idle():
            link.send_ping()
            self.after_event(health, connection)

    def end_of_lease(self, health: ConnectionHealth, connection: KeptConnection) -> None:
        self.link.end_of_lease()
        self.after_event(health, connection)

    def still_sending(self, connection: KeptConnection) -> bool:
        """While a run holds it, and for FLUSH_GRACE after, while that run's last messages go out."""
        link = self.link
        if not link.still_sending():
            return False
        if connection.holder_pid is not None:
            return True
        return bool(link.to_sut or link.ssl_with_pump) and time.monotonic() - connection.last_activity < FLUSH_GRACE

    def stats(self, connection: KeptConnection) -> TransportStats:
        link = self.link
        relayed: LinkStats = {
            "relay": link.relay,
            "messages_to_sut": link.messages_to_sut,
            "messages_to_sipp": link.messages_to_sipp,
            "dropped_bytes": link.dropped_bytes,
        }
        handshake = self.websocket
        return {
            "options_answered": link.options_answered,
            "pongs": link.codec.keepalives,
            "tls": {**self.info, **relayed} if self.info is not None else None,
            "websocket": {
                "path": handshake.path,
                "protocol": handshake.protocol,
                "status": handshake.status,
                "server_headers": [[name, value] for name, value in handshake.server_headers],
                "pings_answered": link.codec.pings_answered + link.pings,
                "close": link.codec.closed,
                **relayed,
            }
            if handshake is not None
            else None,
        }

    def buffered(self) -> tuple[int, int]:
        return len(self.link.to_sut), len(self.link.to_sipp)

    def close(self, going_away: bool = False) -> None:
        self.link.close(going_away)


class _PairWatcher:
    """The Reactor's Watcher of a relayed link's socketpair end: its transport's pair events and
    faults (the transport itself watches the SuT's socket)."""

    __slots__ = ("_transport",)

    def __init__(self, transport: RelayedTransport) -> None:
        self._transport = transport

    def on_event(self, mask: int) -> None:
        self._transport.on_pair_event(mask)

    def on_fault(self, error: Exception) -> None:
        self._transport.on_fault(error)
