"""`fdkeeper keeper --replace`: a new keeper takes the kept connections over from the running one.

As HAProxy hands its listeners to the new process on reload, the old keeper sends every idle
kept TCP connection, by SCM_RIGHTS, to its successor over the control socket (verb HANDOVER,
from the same uid only), then exits; the successor takes the lock and keeps them under the same
ids. Same sockets, same source ports: the SuT sees nothing, registrations over them stay valid.
A WebSocket over TCP (ws) moves too while its link holds nothing (transports.py ``movable``:
no byte buffered either way, no partial frame, no message waiting for a run), with its
handshake (``websockets=``, for status); the successor relays it over a new socketpair.

What cannot move: a TLS connection's state (tls, wss) lives in the old process's OpenSSL, and a
ws link that holds something would lose it, so each is named in the log as lost and closed
cleanly (a Close 1001 going away, close_notify). A replacement is refused while any run
holds a lease (its holder's pidfd and the lease would have to move too; the runs end soon).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable
from urllib.parse import quote, unquote

from fdkeeper.address import format_address, parse_address
from fdkeeper.client import KeeperClient
from fdkeeper.errors import FdkeeperError
from fdkeeper.keeper.connection import IDLE, LEASED, KeptConnection
from fdkeeper.keeper.pool import ConnectionPool
from fdkeeper.keeper.transports import transport_for
from fdkeeper.protocol import MAX_MESSAGE, format_message, send_packet
from fdkeeper.websocket import WsHandshake

log = logging.getLogger("fdkeeper.keeper")

# Handing over is a one-off while the keeper goes away: it may block this long per packet.
SEND_TIMEOUT = 10.0


# ---------------------------------------------------------------- the old keeper's side


def refuse_unless_handover_possible(connections: list[KeptConnection], uid: int) -> None:
    if uid != os.getuid():
        raise FdkeeperError(
            f"fdkeeper: only a keeper of uid {os.getuid()} may take over this one (not uid {uid})", "denied"
        )
    leased = [c for c in connections if c.state == LEASED]
    if leased:
        holders = sorted({str(c.holder_pid) for c in leased})
        raise FdkeeperError(
            f"fdkeeper: {len(leased)} kept connection(s) are leased (pid {', '.join(holders[:5])}); "
            "--replace hands over idle connections only: try again when those runs have ended",
            "busy",
        )


# Cuts connections into HANDED packets, each connection costing its share of MAX_MESSAGE plus the
# given extra (keeper/server.py: _fds_batches, shared with LEASE's FDS packets).
Batches = Callable[[list[KeptConnection], Callable[[KeptConnection], int]], list[list[KeptConnection]]]


def hand_over(sock: socket.socket, connections: list[KeptConnection], batches: Batches) -> list[KeptConnection]:
    """Send every idle connection that can move to the successor on ``sock``; return those left behind."""
    movable = [c for c in connections if c.state == IDLE and c.io.movable and _extra_cost(c) < _MAX_COST]
    lost = [c for c in connections if c.state == IDLE and c not in movable]
    sock.setblocking(True)
    sock.settimeout(SEND_TIMEOUT)
    send_packet(sock, format_message("OK", count=len(movable), lost_count=len(lost), lost=_labels_that_fit(lost)))
    for batch in batches(movable, _extra_cost):
        packet = format_message(
            "HANDED",
            ids=",".join(str(c.id) for c in batch),
            peers=",".join(format_address(c.remote) for c in batch),
            locals=",".join(format_address(c.local) for c in batch),
            aors=",".join(quote(c.aor or "-", safe="") for c in batch),
            opened=",".join(str(int(c.opened_at)) for c in batch),
            transports=",".join(c.transport for c in batch),
            websockets=",".join(_handshake_field(c) for c in batch),
        )
        send_packet(sock, packet, [c.io.handed_socket(c).fileno() for c in batch])
        for connection in batch:
            connection.io.let_go()
    log.info("handed %d kept connection(s) over to the successor", len(movable))
    for connection in lost:
        log.warning(
            "%s cannot be handed over (TLS state, or what its WebSocket link holds, stays in this process): closed",
            connection.label(),
        )
    return lost


def _labels_that_fit(lost: list[KeptConnection]) -> str | None:
    """The lost connections' names, as many as fit in the reply (the log has them all)."""
    labels: list[str] = []
    size = 0
    for connection in lost:
        label = quote(connection.label(), safe="")
        size += len(label) * 3 + 1  # quoted again by format_message
        if size > MAX_MESSAGE - 200:
            break
        labels.append(label)
    return ",".join(labels) or None


def _extra_cost(connection: KeptConnection) -> int:
    """aor and the handshake (each quoted twice), opened= and the transport."""
    return (len(quote(connection.aor or "-", safe="")) + len(_handshake_field(connection))) * 3 + 18


# A connection whose fields would not fit one HANDED packet (huge server headers) stays behind.
_MAX_COST = MAX_MESSAGE - 400


def _handshake_field(connection: KeptConnection) -> str:
    """A ws connection's handshake as the successor shows it in status (JSON, quoted), else "-"."""
    websocket = connection.io.stats(connection)["websocket"]
    if websocket is None:
        return "-"
    shown = [websocket["path"], websocket["protocol"], websocket["status"], websocket["server_headers"]]
    return quote(json.dumps(shown, separators=(",", ":")), safe="")


def _handshake_of(field: str) -> WsHandshake | None:
    if field == "-":
        return None
    path, protocol, status, headers = json.loads(unquote(field))
    return WsHandshake(str(path), str(protocol), str(status), tuple((str(n), str(v)) for n, v in headers))


# ---------------------------------------------------------------- the successor's side


def adopt(fields: dict[str, str], fds: list[int]) -> list[KeptConnection]:
    """One HANDED packet's connections, as KeptConnections of this process, with their old ids."""
    ids = [int(i) for i in fields["ids"].split(",")]
    peers, locals_ = fields["peers"].split(","), fields["locals"].split(",")
    aors, opened = fields["aors"].split(","), fields["opened"].split(",")
    # A keeper from before WebSocket sends neither: all tcp.
    transports = fields.get("transports", ",".join(["tcp"] * len(fds))).split(",")
    websockets = fields.get("websockets", ",".join(["-"] * len(fds))).split(",")
    adopted = []
    for index, fd in enumerate(fds):
        aor = unquote(aors[index])
        sock = socket.socket(fileno=fd)
        io = transport_for(sock, None, b"", websocket=_handshake_of(websockets[index]))
        adopted.append(
            KeptConnection(
                id=ids[index],
                sock=io.leased_socket(sock),
                transport=transports[index],
                remote=parse_address(peers[index]),
                local=parse_address(locals_[index]),
                opened_at=float(opened[index]),
                aor=None if aor == "-" else aor,
                io=io,
            )
        )
    return adopted


def adopt_into(pool: ConnectionPool, inherited: list[KeptConnection]) -> None:
    """Keep the connections a previous keeper handed over, under their ids, watched as any other."""
    for connection in inherited:
        pool.connections[connection.id] = connection
        pool.by_key[connection.key] = connection
        pool.watch_kept(connection)
    if inherited:
        # New connections are numbered after the inherited ones (the pool's numbering).
        pool._next_id = max(pool._next_id, max(pool.connections) + 1)


def take_over(client: KeeperClient) -> list[KeptConnection]:
    """Ask the running keeper for its connections (it exits once they are sent); log the lost ones.

    An empty list if no keeper runs: --replace then simply starts one.
    """
    try:
        reply, packets = client.handover()
    except (FileNotFoundError, ConnectionRefusedError):
        log.info("no keeper to take over from in %s: starting afresh", client.directory)
        return []
    taken = [connection for fields, fds in packets for connection in adopt(fields, fds)]
    lost = [unquote(label) for label in reply.fields.get("lost", "").split(",") if label]
    lost_count = int(reply.fields.get("lost_count", "0"))
    log.info("took over %d kept connection(s) from the previous keeper", len(taken))
    if lost_count:
        more = f" and {lost_count - len(lost)} more" if lost_count > len(lost) else ""
        log.warning(
            "lost %d TLS connection(s) (WebSocket ones included) that cannot move between processes (closed "
            "cleanly by the previous keeper; runs over them open new ones and must register again): %s%s",
            lost_count,
            ", ".join(lost),
            more,
        )
    return taken
