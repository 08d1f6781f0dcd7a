"""The keeper's control clients: accepted without ever failing the keeper, answered without
ever blocking it, dropped when they idle.

Three ways a local process could stall or end a single-threaded keeper, and what stops each:
- running it out of descriptors (EMFILE at accept): a reserve descriptor is closed to accept
  the client, told so in one line, and reopened (the trick libuv and HAProxy use);
- connecting and never reading the reply: replies go out with non-blocking sends; what the
  socket does not take waits in a bounded queue flushed on EPOLLOUT, and a client whose queue
  overflows or does not drain within the idle time is dropped. A reply of any size (STATUS
  of 10,000 connections) is a stream, made packet by packet as the socket drains: it holds
  a packet or so in memory, never counts against the queue's bound, and a client that reads it
  is never dropped; only one that stops reading (no progress for IDLE_SECONDS) is;
- connecting and sending nothing: a client silent for IDLE_SECONDS (and not waiting for a
  connection with PREPARE wait=) is dropped; at MAX_CLIENTS the longest idle one makes room,
  or the newcomer is refused in one line.

A defect in the keeper's code while serving a client (an exception the handlers did not
expect) is caught by the Reactor, which hands it to ``ControlClients.fault``: that client gets
``ERR internal`` once and is dropped, and every other client and connection goes on.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import select
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator

from fdkeeper.errors import FdkeeperError, out_of_descriptors
from fdkeeper.loop import Reactor
from fdkeeper.protocol import MAX_MESSAGE, JsonObject, format_error, format_failure, send_packet
from fdkeeper.statedir import peer_credentials, trusted_uid

log = logging.getLogger("fdkeeper.keeper")

MAX_CLIENTS = 512
IDLE_SECONDS = 10.0
# At MAX_CLIENTS a client idle this long is dropped to make room for a new one.
EVICTABLE_AFTER = 1.0
MAX_QUEUED_PACKETS = 1024  # a LEASE of 256,000 connections; a STATUS of 3 MB
MAX_QUEUED_BYTES = 4 * 1024 * 1024
# After an accept failed even with the reserve released, pause accepting this long.
ACCEPT_PAUSE = 0.1
INTERNAL_ERROR_TEXT = "fdkeeper: internal error; see the keeper log"


def limit_error(what: str, error: OSError) -> FdkeeperError:
    """The one line a client gets when the keeper cannot make a descriptor for it."""
    return FdkeeperError(
        f"fdkeeper: the keeper could not {what}: {error.strerror} "
        f"({descriptors_held(error)}); raise its RLIMIT_NOFILE or end runs that hold many",
        "limit",
    )


def descriptors_held(error: OSError) -> str:
    """How many descriptors the keeper holds, for the EMFILE line, even with none left to count them.

    Listing /proc/self/fd takes a descriptor itself. Without one, EMFILE says it all: the
    kernel gives the lowest free number, so every number below the soft limit is in use."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    try:
        held = len(os.listdir("/proc/self/fd")) - 1  # not the listing's own descriptor
    except OSError:
        if error.errno == errno.EMFILE:
            return f"it holds all {limit} descriptors its RLIMIT_NOFILE allows"
        return f"its RLIMIT_NOFILE is {limit} descriptors"
    return f"it holds {held} descriptors, its RLIMIT_NOFILE is {limit}"


# A packet of a stream that carries descriptors, made when it is sent: the descriptors are then
# the connections' own, never copies queued (19,000 copies beside the 19,000 originals would not
# fit under the keeper's open-file limit); None when one of them has closed since.
DescriptorPacket = Callable[[], "tuple[bytes, list[int]] | None"]


class ReplyStream:
    """A reply made as the client reads it: the next packet is produced only once the socket
    took the one before (so a reply's size costs the keeper a packet or a batch of memory)."""

    def __init__(self, packets: Iterator[bytes | DescriptorPacket]) -> None:
        self._packets = packets
        self._next: bytes | DescriptorPacket | None = None

    def peek(self) -> bytes | DescriptorPacket | None:
        """The packet to send next; None once the reply is complete."""
        if self._next is None:
            self._next = next(self._packets, None)
        return self._next

    def sent(self) -> None:
        self._next = None


class ControlClient:
    """One accepted control connection and the replies it has not read yet."""

    def __init__(self, sock: socket.socket, pid: int, uid: int, reactor: Reactor) -> None:
        self.sock = sock
        self.pid = pid
        self.uid = uid
        self.trusted = trusted_uid(uid)  # its credentials are its connect()'s: asked once, not per request
        self.reactor = reactor
        self.last_progress = time.monotonic()
        self.waiting = False  # a PREPARE wait= is parked: silence is expected
        self._queue: deque[tuple[bytes, list[int]] | ReplyStream] = deque()
        self._queued_bytes = 0
        self.overflowed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send one packet now if the socket takes it, else queue it (descriptors duplicated,
        since the keeper may close its own before the client reads). Never blocks, never raises
        for a slow client: one that overflows its queue is marked and dropped by its owner."""
        if self.sock.fileno() < 0 or self.overflowed:
            return
        if not self._queue:
            try:
                send_packet(self.sock, message, fds)
                return
            except BlockingIOError:
                pass
            except OSError:
                return  # gone: EPOLLHUP/read of 0 drops it
        if len(self._queue) >= MAX_QUEUED_PACKETS or self._queued_bytes + len(message) > MAX_QUEUED_BYTES:
            self.overflowed = True
            return
        try:
            copies = [os.dup(fd) for fd in fds]
        except OSError as error:
            raise limit_error("queue the descriptors of a reply", error) from None
        self._queue.append((message, copies))
        self._queued_bytes += len(message)
        self.reactor.rewatch(self.fileno(), select.EPOLLIN | select.EPOLLOUT)

    def send_stream(self, packets: Iterator[bytes | DescriptorPacket]) -> None:
        """Send a reply of any size, produced packet by packet while the client reads it.

        Bounded by progress, not by size: the client is dropped only if it stops reading
        (idle_for, IDLE_SECONDS), however many packets the reply has."""
        if self.sock.fileno() < 0 or self.overflowed:
            return
        self._queue.append(ReplyStream(packets))
        if len(self._queue) == 1:
            self.flush()
        if self._queue:
            self.reactor.rewatch(self.fileno(), select.EPOLLIN | select.EPOLLOUT)

    def flush(self) -> None:
        """EPOLLOUT: send what the socket takes now."""
        fds: list[int]
        while self._queue:
            head = self._queue[0]
            if isinstance(head, ReplyStream):
                packet = head.peek()
                if packet is None:  # that reply is complete
                    self._queue.popleft()
                    continue
                made = (packet, []) if isinstance(packet, bytes) else packet()
                if made is None:  # a descriptor the reply promised has closed: it cannot be completed
                    self.overflowed = True
                    return
                message, fds = made
            else:
                message, fds = head
            try:
                send_packet(self.sock, message, fds)
            except BlockingIOError:
                return
            except OSError:
                self.overflowed = True  # cannot be delivered: drop the client
                return
            if isinstance(head, ReplyStream):
                head.sent()
            else:
                self._queue.popleft()
                self._queued_bytes -= len(message)
                _close_all(fds)
            self.last_progress = time.monotonic()
        self.reactor.rewatch(self.fileno(), select.EPOLLIN)

    def idle_for(self, now: float) -> float:
        return 0.0 if self.waiting and not self._queue else now - self.last_progress

    def discard_queued(self) -> None:
        """Forget every reply not sent yet (a stream that faulted cannot go on)."""
        for entry in self._queue:
            if not isinstance(entry, ReplyStream):
                _close_all(entry[1])
        self._queue.clear()
        self._queued_bytes = 0

    def close(self) -> None:
        self.discard_queued()
        self.sock.close()


class ControlClients:
    """Accepts on the control socket and keeps the set of clients bounded."""

    def __init__(
        self,
        reactor: Reactor,
        listener: socket.socket,
        serve: Callable[[ControlClient, int], None],
        forget: Callable[[ControlClient], None],
    ) -> None:
        self.reactor = reactor
        self.listener = listener
        self.serve = serve  # called with (client, epoll mask) when a client is readable or hung up
        self.forget = forget  # called before a client is closed (waiters referencing it)
        self.clients: dict[int, ControlClient] = {}
        self.refused = 0
        self.dropped_idle = 0
        self._reserve: int | None = _open_reserve()
        self._watch_listener()

    def _watch_listener(self) -> None:
        # A fault while accepting must not end accepting for good: pause, then take clients again.
        self.reactor.watch(
            self.listener.fileno(), select.EPOLLIN, self._accept, on_fault=lambda _error: self._pause_accepting()
        )

    def _accept(self, _mask: int) -> None:
        # One client a wake-up: level-triggered epoll wakes the loop again while more wait, and
        # a lease a call costs no accept that fails with EAGAIN (a syscall and an exception).
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        except OSError as error:
            if not out_of_descriptors(error):
                log.warning("accept on the control socket failed: %s", error.strerror)
                return
            self._refuse_out_of_descriptors(error)
            return
        self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        try:
            pid, uid = peer_credentials(sock)[:2]
        except OSError:
            sock.close()
            return
        if len(self.clients) >= MAX_CLIENTS and not self._evict_longest_idle():
            self.refused += 1
            log.warning("%d control clients, all busy: refused pid %d", len(self.clients), pid)
            _tell_and_close(
                sock,
                format_error(
                    "limit",
                    f"fdkeeper: the keeper has {len(self.clients)} control clients, none idle; try again shortly",
                ),
            )
            return
        client = ControlClient(sock, pid, uid, self.reactor)
        self.clients[client.fileno()] = client
        self.reactor.watch(
            client.fileno(),
            select.EPOLLIN,
            lambda mask: self._ready(client, mask),
            on_fault=self.on_fault_of(client),
        )

    def on_fault_of(self, client: ControlClient) -> Callable[[Exception], None]:
        """The Reactor's on_fault for work done for ``client``: its handler, or a resumed request."""
        return lambda _error: self.fault(client)

    def fault(self, client: ControlClient) -> None:
        """An internal error serving ``client`` (logged by the Reactor): one ERR line, then drop it.

        Dropped rather than served on: what it asked may be half done, and this reply is then
        the last line it reads, so it gets exactly one answer to the request that failed.
        """
        log.warning("internal error serving control client pid %d: answered ERR internal and dropped it", client.pid)
        client.discard_queued()  # ahead of the line, not behind a reply that will never end
        client.send(format_error("internal", INTERNAL_ERROR_TEXT))
        self.drop(client)

    def _ready(self, client: ControlClient, mask: int) -> None:
        if mask & select.EPOLLOUT:
            client.flush()
        if mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            self.serve(client, mask)
        if client.overflowed and client.fileno() >= 0:
            log.warning("control client pid %d does not read its replies: dropped", client.pid)
            self.drop(client)

    def _refuse_out_of_descriptors(self, error: OSError) -> None:
        """EMFILE: free the reserve, take the client, tell it why, close it, take the reserve back."""
        log.warning("out of descriptors accepting a control client (%s); refusing it", error.strerror)
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
        try:
            sock, _ = self.listener.accept()
        except OSError:
            self._pause_accepting()  # nothing to take, or not even one descriptor: try again soon
        else:
            self.refused += 1
            _tell_and_close(sock, format_failure(limit_error("accept a control client", error)))
        self._reserve = _open_reserve()

    def _pause_accepting(self) -> None:
        """Level-triggered epoll would call us again at once: stop watching for a moment."""
        fd = self.listener.fileno()
        self.reactor.unwatch(fd)
        self.reactor.call_later(ACCEPT_PAUSE, lambda: self._resume_accepting(fd))

    def _resume_accepting(self, fd: int) -> None:
        if self.listener.fileno() == fd and not self.reactor.watching(fd):
            self._watch_listener()

    def _evict_longest_idle(self) -> bool:
        now = time.monotonic()
        candidate = max(self.clients.values(), key=lambda c: c.idle_for(now), default=None)
        if candidate is None or candidate.idle_for(now) < EVICTABLE_AFTER:
            return False
        self.dropped_idle += 1
        self.drop(candidate)
        return True

    def drop_idle(self) -> None:
        """Called every tick: drop clients that sent nothing, or read nothing, for IDLE_SECONDS."""
        now = time.monotonic()
        idle = [c for c in self.clients.values() if c.idle_for(now) >= IDLE_SECONDS]
        for client in idle:
            self.dropped_idle += 1
            self.drop(client)
        if idle:
            log.info("dropped %d control client(s) idle for %g s", len(idle), IDLE_SECONDS)

    def drop(self, client: ControlClient) -> None:
        fd = client.fileno()
        if fd < 0:
            return
        self.reactor.unwatch(fd)
        self.clients.pop(fd, None)
        self.forget(client)
        client.close()

    def close(self) -> None:
        for client in list(self.clients.values()):
            self.drop(client)
        self.reactor.unwatch(self.listener.fileno())
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None

    def as_dict(self) -> JsonObject:
        return {
            "clients": len(self.clients),
            "max": MAX_CLIENTS,
            "refused": self.refused,
            "dropped_idle": self.dropped_idle,
        }


def _open_reserve() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # taken again after the next close


def _tell_and_close(sock: socket.socket, message: bytes) -> None:
    """Send a refusal and close. A request already queued is read first: closing on unread
    data would make the client's next read ECONNRESET instead of this reply."""
    try:
        sock.send(message, socket.MSG_DONTWAIT)
        while sock.recv(MAX_MESSAGE + 1, socket.MSG_DONTWAIT):
            pass
    except OSError:
        pass
    sock.close()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
