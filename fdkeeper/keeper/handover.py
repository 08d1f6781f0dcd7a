"""`fdkeeper keeper --replace`: a new keeper takes the kept connections over from the running one.

As HAProxy hands its listeners to the new process on reload, the old keeper sends every idle
kept TCP connection, by SCM_RIGHTS, to its successor over the control socket (verb HANDOVER,
from the same uid only), then exits; the successor takes the lock and keeps them under the same
ids. Same sockets, same source ports: the SuT sees nothing, registrations over them stay valid.

What cannot move: a TLS connection's state lives in the old process's OpenSSL, and a WebSocket
connection's in its link (the socketpair runs are leased, with what they have not read yet, the
decoder's partial frame, the handshake), so each is named in the log as lost and closed cleanly
(a Close 1001 going away, close_notify). A replacement is refused while any run
holds a lease (its holder's pidfd and the lease would have to move too; the runs end soon).
"""

from __future__ import annotations

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
from fdkeeper.protocol import MAX_MESSAGE, format_message, send_packet

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
    """Send every idle TCP connection to the successor on ``sock``; return the TLS and WebSocket ones left behind."""
    movable = [c for c in connections if c.state == IDLE and c.io.movable]
    lost = [c for c in connections if c.state == IDLE and not c.io.movable]
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
        )
        send_packet(sock, packet, [c.fileno() for c in batch])
    log.info("handed %d kept connection(s) over to the successor", len(movable))
    for connection in lost:
        log.warning(
            "%s cannot be handed over (TLS or WebSocket state stays in this process): closed", connection.label()
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
    return len(quote(connection.aor or "-", safe="")) * 3 + 12  # aor (quoted twice) and opened=


# ---------------------------------------------------------------- the successor's side


def adopt(fields: dict[str, str], fds: list[int]) -> list[KeptConnection]:
    """One HANDED packet's connections, as KeptConnections of this process, with their old ids."""
    ids = [int(i) for i in fields["ids"].split(",")]
    peers, locals_ = fields["peers"].split(","), fields["locals"].split(",")
    aors, opened = fields["aors"].split(","), fields["opened"].split(",")
    adopted = []
    for index, fd in enumerate(fds):
        aor = unquote(aors[index])
        adopted.append(
            KeptConnection(
                id=ids[index],
                sock=socket.socket(fileno=fd),
                transport="tcp",
                remote=parse_address(peers[index]),
                local=parse_address(locals_[index]),
                opened_at=float(opened[index]),
                aor=None if aor == "-" else aor,
            )
        )
    return adopted


def adopt_into(pool: ConnectionPool, inherited: list[KeptConnection]) -> None:
    """Keep the connections a previous keeper handed over, under their ids, watched as any other."""
    for connection in inherited:
        pool.connections[connection.id] = connection
        pool.by_key[connection.key] = connection
        pool.health.watch(connection)
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
