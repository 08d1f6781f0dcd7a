"""The SuT's OPTIONS pings between runs (``--answer-options``).

Many SBCs send OPTIONS to registered contacts every 30-60 s and drop the registration when
nobody answers. While no run holds a connection nobody would; and queued, the pings would
reach the next run as requests its scenario does not expect. With --answer-options the keeper
answers them itself (200 OK built from the request, RFC 3261 §11.2) while no run holds the
connection, counts them, and never queues them for a run. Off by default: a scenario that
wants to see the SuT's OPTIONS keeps seeing them.
"""

from __future__ import annotations

import logging
import select
import socket
import time

from fdkeeper.keeper.connection import IDLE, KeptConnection
from fdkeeper.loop import Reactor
from fdkeeper.sip.framing import FramingError, SipFramer
from fdkeeper.sip.options import options_reply
from fdkeeper.tcp import unsent_bytes

log = logging.getLogger("fdkeeper.keeper")

MAX_PEEK = 65536  # one SIP message at most (sipp's own limit)


def answer_queued_options(sock: socket.socket) -> tuple[int, bool]:
    """Answer the OPTIONS requests at the head of a plain TCP connection's receive queue.

    Only whole OPTIONS requests are taken off the queue, and only while the reply fits in the
    empty send queue at once (a partial reply would corrupt the stream); anything else stays
    for the next run. Returns (how many were answered, whether the queue still starts with
    something that is not for the keeper: the caller stops watching it then).
    """
    answered = 0
    while True:
        try:
            head = sock.recv(MAX_PEEK, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return answered, False
        except OSError:
            return answered, True
        if not head or head.startswith(b"\r\n"):  # gone, or a pong: not an OPTIONS to answer
            return answered, bool(head)
        try:
            messages = SipFramer().feed(head)
        except FramingError:
            return answered, True
        reply = options_reply(messages[0]) if messages else None
        if reply is None or unsent_bytes(sock):
            return answered, True
        sock.recv(len(messages[0]), socket.MSG_DONTWAIT)
        try:
            sock.send(reply, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except OSError:
            return answered, True
        answered += 1


class TcpOptionsAnswerer:
    """--answer-options on plain TCP connections, whose queue the keeper otherwise never reads.

    An idle connection is watched for EPOLLIN; whole OPTIONS at the head of its queue are
    answered. Anything else at the head (a request, half a message) or a run holding the
    connection "parks" it: EPOLLIN is dropped, since the queue is the next run's, and a timer
    re-arms it once it is idle again and its queue changed.
    """

    REARM_EVERY = 0.5

    def __init__(self, reactor: Reactor) -> None:
        self.reactor = reactor
        self._parked: dict[int, tuple[KeptConnection, int]] = {}  # id -> (connection, queue when parked)
        reactor.call_every(self.REARM_EVERY, self._rearm)

    def on_readable(self, connection: KeptConnection) -> None:
        if connection.state != IDLE or connection.ending:
            self._park(connection, -1)  # a run holds it: the queue is the run's
            return
        answered, park = answer_queued_options(connection.live_socket())
        if answered:
            connection.options_answered += answered
            connection.last_activity = time.monotonic()
            log.info("%s: answered %d OPTIONS from the SuT (--answer-options)", connection.label(), answered)
        if park:
            self._park(connection, connection.queued_bytes())

    def _park(self, connection: KeptConnection, queued: int) -> None:
        self.reactor.rewatch(connection.fileno(), select.EPOLLRDHUP)
        self._parked[connection.id] = (connection, queued)

    def _rearm(self) -> None:
        for key, (connection, queued) in list(self._parked.items()):
            # Taken out before it is looked at: a fault on one connection (the loop's guard logs
            # it) costs that connection's re-arming once, not the whole sweep every time.
            del self._parked[key]
            if connection.sock is None:
                continue
            idle = connection.state == IDLE and not connection.ending and connection.ping_sent_at is None
            if idle and connection.queued_bytes() != queued:
                self.reactor.rewatch(connection.fileno(), select.EPOLLRDHUP | select.EPOLLIN)
            else:
                self._parked[key] = (connection, queued)
