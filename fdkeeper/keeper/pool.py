"""The kept connections by identity: which ones a request means, and opening the missing ones.

A client run asks for its connection by (SuT, transport, user, identity: keeper/identity.py); a
server run takes the connections of its identity to its SuT over its transport (where it has
none, the idle ones no live run holds, and its runner says so); a per-user run only checks that
its users will fit.
Opening connects (and for TLS handshakes, for ws/wss upgrades to WebSocket) from the keeper's
event loop (keeper/opening.py): the request that needs a new connection stays pending until it
is kept.
"""

from __future__ import annotations

import logging
import resource
import socket
from typing import NamedTuple, NoReturn

from fdkeeper.address import Address, format_address
from fdkeeper.errors import FdkeeperError
from fdkeeper.keeper.connection import CLOSED, ConnectionKey, KeptConnection
from fdkeeper.keeper.health import ConnectionHealth
from fdkeeper.keeper.identity import identity_of
from fdkeeper.keeper.leases import Leases
from fdkeeper.keeper.opening import Opener
from fdkeeper.keeper.transports import RelayedTransport, transport_for
from fdkeeper.protocol import OVER_TLS, OVER_WEBSOCKET, WS_KEYS, ProtocolError, Request
from fdkeeper.textsafe import escape_controls
from fdkeeper.tls import TlsOptions
from fdkeeper.websocket import WsHandshake, WsOptions

log = logging.getLogger("fdkeeper.keeper")

# The keeper's own descriptors besides its connections: the loop, the control socket and its
# clients, the log, the pump's wake-up, a connection being opened.
RESERVED_DESCRIPTORS = 64


class DescriptorRoom(NamedTuple):
    """The keeper's open-file limits, what it holds (with its reserve) and the room left."""

    soft: int
    hard: int
    in_use: int
    free: int


class ConnectionPool:
    def __init__(
        self,
        connections: dict[int, KeptConnection],
        health: ConnectionHealth,
        leases: Leases,
        *,
        connect_timeout: float,
        tls_defaults: TlsOptions,
    ) -> None:
        self.connections = connections
        self.health = health
        self.leases = leases
        self.connect_timeout = connect_timeout
        self.tls_defaults = tls_defaults
        # The current connection for each (SuT, transport, AoR, identity): O(1) per lease with 10,000 users.
        self.by_key: dict[ConnectionKey, KeptConnection] = {}
        # TLS and WebSocket options a PREPARE gave for a SuT, for the connections leases open
        # later (per user, or once sipp binds): the shim's LEASE carries only transport=.
        self.tls_profiles: dict[Address, TlsOptions] = {}
        self.ws_profiles: dict[Address, WsOptions] = {}
        self._next_id = 1
        self.opener = Opener(health.reactor, connect_timeout)

    def select(self, request: Request, pid: int | None) -> list[KeptConnection]:
        """The connections ``request`` asks for, opened if need be; FdkeeperError if not to be had."""
        if request.flag("per_call"):
            self._remember_profiles(request)
            self._check_room(request)
            return []
        if request.text("role") == "client" and request.flag("open_at_lease"):
            return self._check_without_opening(request, pid)
        if request.text("role") == "client":
            return [self._client_connection(request, pid)]
        return self._server_connections(request, pid)

    def closed_matching(self, request: Request) -> list[KeptConnection]:
        remote = request.address("remote")
        return [
            c
            for c in self.connections.values()
            if c.state == CLOSED and c.transport == request.text("transport") and remote in (None, c.remote)
        ]

    def borrowed(self, request: Request, connections: list[KeptConnection]) -> list[KeptConnection]:
        """Those of ``connections`` a server run is handed although they are not of its identity."""
        if request.text("role") != "server":
            return []
        return [c for c in connections if not of_identity(c, request.address("local"))]

    def close(self, reason: str) -> None:
        """The keeper stops: every connection it holds ends (a WebSocket one with Close 1001, going away)."""
        for connection in self.connections.values():
            if connection.sock is not None:
                self.health.close_connection(connection, reason, going_away=True)

    # ---------------------------------------------------------------- choosing

    def _remember_profiles(self, request: Request) -> None:
        remote, transport = request.address("remote"), request.text("transport")
        if remote is None:
            return
        if transport in OVER_TLS:
            self.tls_profiles[remote] = TlsOptions.from_request(request, self.tls_defaults)
        if transport in OVER_WEBSOCKET:
            self.ws_profiles[remote] = self._ws_options(request, remote)

    def _ws_options(self, request: Request, remote: Address) -> WsOptions:
        """The request's WebSocket options; one with none (the shim's LEASE) takes those the last
        PREPARE for that SuT gave, else the defaults (path /)."""
        if not any(key in request.fields for key in WS_KEYS):
            return self.ws_profiles.get(remote, WsOptions())
        return WsOptions.from_fields(request.text("ws_path"), request.text("ws_origin"), request.text("ws_headers"))

    def _client_connection(self, request: Request, pid: int | None) -> KeptConnection:
        remote: Address | None = request.address("remote")
        if remote is None:
            raise ProtocolError("badrequest", "fdkeeper: a client lease needs remote=")
        identity = identity_of(request.address("local"), remote)
        connection = self.by_key.get((remote, request.required_text("transport"), request.text("aor"), identity))
        if connection is not None and connection.state == CLOSED:
            if not request.flag("reconnect"):
                raise connection.closed_error()
            log.info("replacing closed %s (--reconnect)", connection.label())
            # Kept until the new one is open: a refused connect (the SuT restarting) must leave
            # the closed one in place for the next try, not a half-forgotten key.
            return self._open(request, remote)  # _keep_opened records which connection it replaces
        if connection is not None:
            self.leases.refuse_if_held_by_other(connection, pid)
            return connection
        return self._open(request, remote)

    def _check_without_opening(self, request: Request, pid: int | None) -> list[KeptConnection]:
        """A PREPARE whose identity only sipp's own bind will tell (sipp 3.7 without -p): open
        nothing, or the SuT would see a connection plain sipp never opens. Its TLS options are
        kept for the lease that opens the connection; the kept connection of the identity the
        run will most likely bind (``local=``), if there is one, is checked as its lease would be."""
        self._remember_profiles(request)
        remote = request.address("remote")
        if remote is None:
            raise ProtocolError("badrequest", "fdkeeper: a client PREPARE needs remote=")
        identity = identity_of(request.address("local"), remote)
        connection = self.by_key.get((remote, request.required_text("transport"), request.text("aor"), identity))
        if connection is None:
            return []
        if connection.state == CLOSED:
            if request.flag("reconnect"):
                return []  # its lease replaces it
            raise connection.closed_error()
        self.leases.refuse_if_held_by_other(connection, pid)
        return [connection]

    def _server_connections(self, request: Request, pid: int | None) -> list[KeptConnection]:
        remote: Address | None = request.address("remote")
        transport = request.text("transport")
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
            raise matching[-1].closed_error()
        own = [c for c in alive if of_identity(c, request.address("local"))] or self._unheld(alive, pid)
        for connection in own or alive:  # none to be had: busy, naming a holder (--wait waits)
            self.leases.refuse_if_held_by_other(connection, pid)
        self._check_room_to_hand(own, transport or "")
        return own

    def _unheld(self, connections: list[KeptConnection], pid: int | None) -> list[KeptConnection]:
        """A server run with no connection of its own identity: the ones no live run holds
        (what every server run was handed before identities; existing scripts keep working)."""
        unheld = []
        for connection in connections:
            try:
                self.leases.refuse_if_held_by_other(connection, pid)
            except FdkeeperError:
                continue
            unheld.append(connection)
        return unheld

    def _room(self) -> DescriptorRoom:
        """How many more descriptors the keeper may open under its open-file limit."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        in_use = self._in_use() + RESERVED_DESCRIPTORS
        return DescriptorRoom(soft, hard, in_use, max(soft - in_use, 0))

    def _in_use(self) -> int:
        """The descriptors the keeper holds for its connections and leases, counted from what it
        holds (listing /proc/self/fd took 60 ms at 19,000, on the loop)."""
        live = (c for c in self.connections.values() if c.sock is not None)
        return sum(map(descriptors_held, live)) + len(self.leases.holders)

    def watch_kept(self, connection: KeptConnection) -> None:
        """Watch a connection the pool now keeps (opened here, or adopted from a previous keeper).
        A relayed one's socketpair is made per lease and dropped when idle: its transport follows
        the pair (made, dropping), and the pair the opening made goes at once (an idle link holds 1)."""
        self.health.watch(connection)
        io = connection.io
        if isinstance(io, RelayedTransport):
            io.link.pair_watch = io
            io.link.drop_pair_if_idle()

    def _check_room(self, request: Request) -> None:
        """A per-user run: say now, not at user 5,000, when the users would not fit. Every user of
        the run holds descriptors in the keeper until the run exits (a tls, ws or wss one its
        socketpair too), each one already kept the pair only (it holds its socket already)."""
        users = request.number("users") or 0
        transport = request.required_text("transport")
        leased = descriptors_per_connection(transport)
        kept = sum(1 for c in self.connections.values() if c.sock is not None and c.aor and c.transport == transport)
        new_users = max(users - kept, 0)
        need = new_users * leased + min(users, kept) * (leased - IDLE_DESCRIPTORS)
        room = self._room()
        if need > room.free:
            fits = room.free // leased
            split = (
                f"; a run over {transport} holds {leased} descriptors a user until it exits ({IDLE_DESCRIPTORS} once "
                f"idle): register at most {fits} users a run (CSV ranges)"
                if leased > IDLE_DESCRIPTORS
                else ""
            )
            raise FdkeeperError(
                f"fdkeeper: the keeper can hold {fits} more {transport} connections (open-file limit {room.soft}, "
                f"hard limit {room.hard}, about {room.in_use} in use) but this run may need {users}"
                f"{split}; or raise the limit (e.g. 'ulimit -n' or LimitNOFILE=) before the keeper starts, then "
                "'fdkeeper stop' and run again",
                "limit",
            )

    def _check_room_to_hand(self, connections: list[KeptConnection], transport: str) -> None:
        """A run about to be handed ``connections``: each needs what a held one holds, beyond what it
        holds now (a tls, ws or wss one without its socketpair: the pair, 2 descriptors in the
        keeper). Said before the run starts when they do not fit under the keeper's open-file limit."""
        need = sum(descriptors_per_connection(c.transport) - descriptors_held(c) for c in connections)
        if not need:
            return
        room = self._room()
        if need > room.free:
            raise FdkeeperError(
                f"fdkeeper: this run would be handed {len(connections)} kept {transport} connections; each is relayed "
                f"through a socketpair ({PAIR_DESCRIPTORS} descriptors in the keeper) while the run holds it: {need} "
                f"descriptors beside the {room.in_use} in use, but the keeper's open-file limit "
                f"{room.soft} (hard limit {room.hard}) leaves room for {room.free}, that is {room.free // PAIR_DESCRIPTORS} "
                "such connections; keep fewer users in this keeper (one keeper per CSV range of users), or raise "
                "the limit before the keeper starts",
                "limit",
            )

    # ---------------------------------------------------------------- opening

    def _open(self, request: Request, remote: Address) -> NoReturn:
        """Start connecting (and handshaking) to ``remote`` off the loop: raises Pending
        (keeper/opening.py), and the request is asked again once the connection is kept (or
        told why it failed)."""
        transport, local = request.required_text("transport"), request.address("local")
        options = None
        if transport in OVER_TLS:
            options = TlsOptions.from_request(request, self.tls_profiles.get(remote, self.tls_defaults))
        websocket = self._ws_options(request, remote) if transport in OVER_WEBSOCKET else None
        key = (remote, transport, request.text("aor"), local)

        def keep(sock: socket.socket, early: bytes, handshake: WsHandshake | None) -> KeptConnection:
            return self._keep_opened(request, remote, options, sock, early, handshake)

        self.opener.open(key, local, options, keep, websocket)

    def _keep_opened(
        self,
        request: Request,
        remote: Address,
        options: TlsOptions | None,
        sock: socket.socket,
        early: bytes,
        handshake: WsHandshake | None,
    ) -> KeptConnection:
        io = transport_for(sock, options, early, websocket=handshake)
        local_ip, local_port = sock.getsockname()[:2]
        connection = KeptConnection(
            id=self._next_id,
            sock=io.leased_socket(sock),
            transport=request.required_text("transport"),
            remote=remote,
            local=(local_ip, local_port),
            io=io,
            aor=request.text("aor"),
            identity=identity_of(request.address("local"), remote),
        )
        self._next_id += 1
        replaced = self.by_key.get(connection.key)
        if replaced is not None and replaced.state == CLOSED:  # --reconnect: the runner says so
            connection.replaces = replaced.id
            self.connections.pop(replaced.id, None)
        self.connections[connection.id] = connection
        self.by_key[connection.key] = connection
        self.watch_kept(connection)
        tls = io.stats(connection)["tls"]
        upgraded = escape_controls(f" (WebSocket {handshake.path}, {handshake.status})") if handshake else ""
        log.info("opened %s%s%s", connection.label(), f" ({tls['version']})" if tls else "", upgraded)
        return connection


def of_identity(connection: KeptConnection, local: Address | None) -> bool:
    """Whether ``connection`` is a server run's own, the run binding ``local``: the shared
    connection of its identity, and every per-user one (a server scenario answers whichever user
    is called; per-user runs are told apart by AoR). A server run may name no SuT: its wildcard
    address is read against each connection's SuT."""
    return connection.aor is not None or connection.identity == identity_of(local, connection.remote)


IDLE_DESCRIPTORS = 1  # a kept connection no run holds: the SuT's socket
PAIR_DESCRIPTORS = 2  # a tls, ws or wss one's socketpair, while a run holds it (keeper/tlslink.py)


def descriptors_per_connection(transport: str) -> int:
    """The keeper's descriptors for one connection while a run holds it: a tcp connection is its
    socket; tls, ws and wss are the SuT's socket and the socketpair whose other end the run is
    handed (the keeper keeps both ends while it holds it, and drops the pair once it is idle)."""
    return IDLE_DESCRIPTORS if transport == "tcp" else IDLE_DESCRIPTORS + PAIR_DESCRIPTORS


def descriptors_held(connection: KeptConnection) -> int:
    """What ``connection`` holds in the keeper now: its socket, and a relayed one's pair if it has one."""
    io = connection.io
    return IDLE_DESCRIPTORS + (io.link.pair_descriptors() if isinstance(io, RelayedTransport) else 0)
