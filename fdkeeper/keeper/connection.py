"""Kept connections: the state the keeper tracks for each (opening one: keeper/opening.py over tcp.py).

The keeper never reads SIP bytes from a kept connection: requests the SuT sends while no
run holds it stay in the kernel's receive queue and are read, whole, by the next run. The
keeper only peeks (to find an RFC 5626 pong at the head of the queue) and watches for the
SuT's FIN or RST.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import InitVar, dataclass, field
from typing import TYPE_CHECKING, TypeVar

from fdkeeper.address import Address, format_address
from fdkeeper.errors import FdkeeperError, out_of_descriptors
from fdkeeper.keeper.control import limit_error
from fdkeeper.keeper.sharing import SharedValues
from fdkeeper.protocol import JsonObject, format_message
from fdkeeper.sip.framing import PING, PONG, FramingError, SipFramer
from fdkeeper.tcp import queued_bytes

if TYPE_CHECKING:
    from fdkeeper.keeper.transports import Transport

IDLE, LEASED, CLOSED = "idle", "leased", "closed"
_TCP_CLOSE = 7  # tcpi_state after an RST; a FIN received leaves CLOSE_WAIT
T = TypeVar("T")
MAX_PEEK = 256 * 1024  # how much of a queue is looked at for a whole message when the SuT ends it


def new_descriptors(what: str, make: Callable[[], T]) -> T:
    """``make()``: every descriptor a kept connection needs is made through here (the TCP socket,
    a TLS link's socketpair), so that running out of them is the protocol's one-line ERR limit
    wherever it happens, never an internal error."""
    try:
        return make()
    except OSError as error:
        if out_of_descriptors(error):
            raise limit_error(what, error) from None
        raise


# What a lease asks for: this SuT, this transport, this user (or the shared one), this identity.
ConnectionKey = tuple[Address, str, str | None, Address | None]


@dataclass(slots=True)
class _KeptFields:
    """What the keeper tracks of a kept connection (KeptConnection, below, is one).

    ``sock`` is the descriptor runs are leased: the TCP socket itself, or for TLS and WebSocket
    the sipp end of the socketpair its link relays to and from the SuT's connection. ``io`` is what differs
    per transport (keeper/transports.py). Slots, not a __dict__, and the SuT's address one tuple
    for all its connections: an idle connection's Python objects are most of what it costs.
    """

    id: int
    sock: socket.socket | None
    transport: str
    remote: Address
    local: InitVar[Address]  # kept as local_host and local_port (KeptConnection.local)
    opened_at: float = field(default_factory=time.time)
    holder_pid: int | None = None
    closed_at: float | None = None
    closed_reason: str = ""
    leases: int = 0
    last_activity: float = field(default_factory=time.monotonic)
    ping_sent_at: float | None = None
    pongs: int = 0
    replaces: int | None = None  # id of the closed connection this one replaced (--reconnect)
    io: Transport = field(default_factory=lambda: _plain_tcp())
    aor: str | None = None  # the user whose own connection this is (-t tn/ln); None: shared
    # The local address the SuT sees for -t t1/l1 runs given -i/-p (keeper/pool.py: identity_of);
    # None: runs that let sipp pick an ephemeral port share this one.
    identity: Address | None = None
    lease_mode: str | None = None  # how the last lease reached its program: preload or ptrace
    lease_transfer: str | None = None  # and how the descriptor travelled: scm or pidfd
    ending: str = ""  # the SuT ended it, but requests it sent before wait for a run to read them
    options_answered: int = 0  # --answer-options: the SuT's OPTIONS the keeper answered (TCP)
    # The keeper's own address of it, in parts: no tuple per connection (64 bytes).
    local_host: str = field(init=False)
    local_port: int = field(init=False)

    def __post_init__(self, local: Address) -> None:
        # The same few strings in every connection (the transport, the SuT's and the keeper's
        # address) held once, not once per connection: 100-odd bytes of an idle one.
        self.transport = sys.intern(self.transport)
        self.remote = shared_address(self.remote)
        self.local_host, self.local_port = sys.intern(local[0]), local[1]


class KeptConnection(_KeptFields):
    """A connection to the SuT the keeper holds: its fields (_KeptFields) and what is done with it."""

    __slots__ = ()

    @property
    def local(self) -> Address:
        """The keeper's own address of it (the SuT sees it as the peer's)."""
        return self.local_host, self.local_port

    @property
    def key(self) -> ConnectionKey:
        """The key the pool finds this connection by (ConnectionKey)."""
        return self.remote, self.transport, self.aor, self.identity

    @property
    def state(self) -> str:
        if self.sock is None:
            return CLOSED
        return LEASED if self.holder_pid is not None else IDLE

    def label(self) -> str:
        user = f" ({self.aor})" if self.aor else ""
        return f"{format_address(self.local)}->{format_address(self.remote)}/{self.transport}{user}"

    def fileno(self) -> int:
        return self.live_socket().fileno()

    def live_socket(self) -> socket.socket:
        """``sock`` of a connection not closed: asking a closed one's is a defect of the caller."""
        assert self.sock is not None, f"kept connection {self.id} is closed ({self.closed_reason})"
        return self.sock

    def queued_bytes(self) -> int:
        """Bytes the SuT sent that no run has read yet (they wait for the next run)."""
        return queued_bytes(self.live_socket())

    def holds_whole_message(self) -> bool:
        """Whether the receive queue holds at least one complete SIP message (peeked, not read)."""
        queued = self.queued_bytes()
        if not queued:
            return False
        try:
            head = self.live_socket().recv(min(queued, MAX_PEEK), socket.MSG_PEEK | socket.MSG_DONTWAIT)
            return bool(SipFramer().feed(head))
        except FramingError as error:
            return bool(error.messages)
        except BlockingIOError:
            return False

    def mark_closed(self, reason: str, going_away: bool = False) -> None:
        """Close it for ``reason`` (``going_away``: the keeper stops, which a WebSocket Close says)."""
        self.io.close(going_away)
        if self.sock is not None:
            self.sock.close()
        self.sock = None
        self.holder_pid = None
        self.ping_sent_at = None
        self.closed_at = time.time()
        self.closed_reason = reason

    def send_ping(self) -> bool:
        """Send an RFC 5626 ping if nothing is queued; False if it could not go now."""
        if self.queued_bytes():
            return False
        try:
            sent = self.live_socket().send(PING, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except OSError:
            return False
        if sent != len(PING):
            # A partial ping would corrupt the stream for the SuT: finish it or fail.
            return False
        self.ping_sent_at = time.monotonic()
        return True

    def take_pong(self) -> bool:
        """Consume a CRLF pong at the head of the receive queue, never anything else."""
        try:
            head = self.live_socket().recv(len(PING), socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        if head.startswith(PONG) and not head.startswith(PING):
            self.live_socket().recv(len(PONG), socket.MSG_DONTWAIT)
            self.ping_sent_at = None
            self.pongs += 1
            return True
        return False

    def closed_error(self) -> FdkeeperError:
        """What a run asking for this closed connection is told, and how to get a fresh one."""
        when = time.strftime("%H:%M:%S", time.localtime(self.closed_at or time.time()))
        return FdkeeperError(
            f"fdkeeper: kept connection {self.label()} was closed at {when} ({self.closed_reason}); "
            "run the client scenario again with --reconnect for a fresh connection (registrations must be redone)",
            "closed",
        )

    def peer_gone_reason(self, reported_error: bool) -> str:
        """Why the SuT's side ended, read without consuming anything a run holding the same
        socket is still to read: neither queued SIP bytes nor the pending error (SO_ERROR would
        clear it, and the run would read end of file where sipp alone reads ECONNRESET).
        ``reported_error``: epoll reported EPOLLERR; else the TCP state tells an RST (CLOSE)
        from a FIN (CLOSE_WAIT)."""
        if reported_error or self.live_socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] == _TCP_CLOSE:
            return "the SuT reset it: ECONNRESET"
        return "the SuT closed it: FIN"

    def as_dict(self) -> JsonObject:
        now = time.time()
        return {
            "id": self.id,
            "transport": self.transport,
            "local": format_address(self.local),
            "remote": format_address(self.remote),
            "state": self.state,
            "aor": self.aor,
            "identity": format_address(self.identity) if self.identity else None,
            "holder_pid": self.holder_pid,
            "age": round(now - self.opened_at, 3),
            "leases": self.leases,
            "mode": self.lease_mode,
            "transfer": self.lease_transfer,
            "queued_bytes": self.queued_bytes() if self.sock is not None else 0,
            "closed_reason": self.closed_reason,
            "ending": self.ending or None,
            **self.io.stats(self),  # options_answered, pongs, tls
        }


# The SuTs' addresses, each one tuple however many connections go to it (bounded: a keeper
# talks to few SuTs; past the bound, new ones are simply not shared).
MAX_SHARED_ADDRESSES = 1024
_SHARED_ADDRESSES: SharedValues[Address, Address] = SharedValues(MAX_SHARED_ADDRESSES)


def shared_address(address: Address) -> Address:
    """The one tuple kept for ``address`` (a SuT's), its host an interned string."""
    return _SHARED_ADDRESSES.one(address, lambda: _interned(address))


def _interned(address: Address) -> Address:
    """``address`` with its host the interned string (the same tuple if it already was)."""
    host = sys.intern(address[0])
    return address if host is address[0] else (host, address[1])


def _plain_tcp() -> Transport:
    from fdkeeper.keeper.transports import TcpTransport  # transports.py builds on this module

    return TcpTransport()


def fds_message(batch: Sequence[KeptConnection]) -> bytes:
    """The FDS packet's text for ``batch``: their ids, SuT addresses and local addresses, in the
    order of the descriptors it carries (a lease's packets, and the repeat lease's remembered one)."""
    return format_message(
        "FDS",
        ids=",".join(str(c.id) for c in batch),
        peers=",".join(format_address(c.remote) for c in batch),
        locals=",".join(format_address(c.local) for c in batch),
    )
