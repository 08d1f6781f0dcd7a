"""One connection to the SuT the keeper terminates (TLS, WebSocket), and the socketpair runs are leased instead.

A TLS session cannot move between processes (its keys and sequence numbers live in the
memory of the process that made it), and sipp speaks no WebSocket, so the keeper holds the
connection and hands each sipp run one end of a unix stream socketpair carrying plain SIP
instead. ``TlsLink`` (named when TLS was the only one) pumps between that pair and the SuT's
connection and forwards only whole SIP messages (fdkeeper/sip/framing.py) in both directions:
the SuT never receives half a message from a run that died mid-write, a new run never starts
reading in the middle of one, and keep-alives never reach sipp. What lies under it is its
``wire`` (keeper/wire.py: a TLS session, or plain TCP for WebSocket over TCP) and how SIP is
framed on that wire its ``codec`` (keeper/codec.py: SIP on the stream, or one WebSocket
message per SIP message); everything else here is the same for all of them.

While a run holds the link, a C pump (tlspump.py) moves the messages instead, with the same
framing and bounds, and hands the link back with its exact state when the run ends or the
SuT's side ends (keeper/pumphandover.py); between runs (pings, --answer-options, queued
requests) Python relays.

The SSL object changes hands only at a clean point, with no write in progress on it: OpenSSL
wants a write that returned WANT_WRITE retried with at least the bytes it took, and only the
side that made it knows how many (a hand-over in the middle of one closed links to slow SuTs
with "bad length"). So Python attaches the pump only while no write of its own is pending
(``write_pending``), and when the pump still has one at release it keeps the SSL object until
that write is done (``ssl_with_pump``): meanwhile Python relays the pair side as usual and
queues what runs write behind the pump's rest, and the keeper's loop takes the SSL object back
when the pump says so (health.py, on the pump's eventfd). A run that leases meanwhile waits
for nothing. Python alone (no pump) owns the link for its whole life. Chosen over a pump that
owns every link from handshake to close: Python must own whole lives anyway where there is no
pump, and one hand-over rule keeps a single implementation of the between-runs logic (ended
runs' bytes, realignment, pings, --answer-options) instead of one in Python and one in C.

Half-close behaves as over TCP: after the SuT's FIN or close_notify (``sut_ended``; a reset or
a bad record is a failure, read by the run as ECONNRESET) the pair is shut for writing only,
so the run reads what came before, then end of file, and what it writes still goes out until
a write fails or its lease ends (transports.py ``still_sending``). The FIN is peeked at the
socket, never read through OpenSSL (wire.py). The SuT's WebSocket Close ends it the same way
for the run, but nothing more is sent after the Close reply (RFC 6455 5.5.1): what the run
writes then is dropped. Data the codec cannot read ends the link as a failure does, after the
whole messages before it (over WebSocket a Close 1002 or 1009 goes first); when the keeper
closes a link it says goodbye as the protocol wants (a Close frame, 1001 when the keeper
stops, then close_notify over TLS, then the FIN).

The socketpair exists only while something needs it (issue 20: an idle TLS user costs the keeper
one descriptor, not three): a run's lease makes it (``sipp_end``, the connection's ``sock``, makes
it when the lease hands it: ``handed_fileno``), and once the lease has ended and nothing is left
in it the link drops it (``drop_pair_if_idle``): the whole messages the SuT sent that no run read
are taken back out of sipp's end into ``to_sipp``, ahead of what came after them, and wait there
for the next lease; between runs the link relays without it (pings, --answer-options, queued
requests). While a run holds the link the keeper keeps its own copy of sipp's end: it is what
tells how far the run read (``_forget_consumed``: the unread rest of a message a run began is
dropped at its end), what keeps the messages a run did not read when it exits or closes (the
kernel frees an AF_UNIX receive queue with its last descriptor), what a repeat lease of the same
user hands again, and what a reset is signalled through (``end_towards_sipp``). The SuT's end
(FIN, reset, close_notify, a WebSocket Close) makes the pair if there is none: what it sent before
waits in it for a run, and the run reads the end after it. The event loop learns of a new or
dropped pair through ``pair_watch`` (its RelayedTransport, keeper/transports.py, set by the pool
for every link it keeps, opened or handed over by a predecessor keeper).
"""

from __future__ import annotations

import logging
import resource
import select
import socket
import time
from collections.abc import Callable
from typing import Protocol

from fdkeeper.keeper.codec import Codec, SipStream, Unframeable
from fdkeeper.keeper.connection import new_descriptors
from fdkeeper.keeper.pumphandover import PumpHandover
from fdkeeper.keeper.tlspump import PumpedLink
from fdkeeper.keeper.wire import Wire, WireEnded, WireFailed, reset_underneath, socket_error
from fdkeeper.sip.framing import FramingError, SipFramer
from fdkeeper.sip.options import options_reply
from fdkeeper.tcp import queued_bytes
from fdkeeper.tls import READ_CHUNK

log = logging.getLogger("fdkeeper.tls")

# Back-pressure: the most bytes a link buffers in each direction before it stops reading the
# side that outruns the other. Each direction also holds at most one partial SIP message in its
# framer (MAX_MESSAGE), so a link's memory stays under 2 x (BUFFER_LIMIT + MAX_MESSAGE + one TLS
# record) whatever the SuT or the run does; the rest waits in the kernel's socket buffers and
# then in the writer, whose writes block (or get EAGAIN).
BUFFER_LIMIT = 256 * 1024
# A pair made only for status to see what waits for the next run is not made within this many
# descriptors of the open-file limit: they are the runs' (a lease's pair) and the keeper's own.
STATUS_PAIR_RESERVE = 1024


def _never_held() -> bool:
    return False


class PairWatch(Protocol):
    """How the keeper's event loop follows a link's socketpair as it is made and dropped."""

    def made(self) -> None:
        """A new pair: watch its ``keeper_end`` (the one new descriptor; the SuT's socket stays watched as it is)."""

    def dropping(self, fd: int) -> None:
        """The pair's ``keeper_end`` (``fd``) is about to close: stop watching it."""


def _closed_socket() -> socket.socket:
    """A socket object with no descriptor: ``keeper_end`` while a link has no pair (fileno() is -1)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.close()
    return sock


_NO_PAIR = _closed_socket()


_EMPTY: list[socket.socket] = []  # both ends, made at first need: the peer open, reads say "nothing yet"


def _empty_fileno() -> int:
    """One keeper-wide socket nothing is ever written to: what ``sipp_end`` answers a question
    about its queue (FIONREAD) with while its link has no pair and no run holds it (nothing waits
    there for a run: what the SuT sent between runs is in ``to_sipp``)."""
    if not _EMPTY:
        _EMPTY.extend(
            new_descriptors(
                "open the keeper's empty socket", lambda: socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            )
        )
    return _EMPTY[0].fileno()


class SippEnd(socket.socket):
    """A relayed connection's ``sock``: the name of the end of its link's socketpair runs are
    handed, whichever pair that is now. ``fileno()`` is that end's descriptor, made when a run
    holds the link and it has no pair (a lease is sending it); while no run holds it and there
    is no pair, a keeper-wide empty socket's (its queue: nothing for a run). It has no descriptor
    of its own: only fileno() and close() are meant for it (the kernel calls of a plain TCP
    connection's socket are never made on a relayed one)."""

    __slots__ = ("_link",)

    def __init__(self, link: TlsLink) -> None:  # no socket.socket.__init__: no descriptor of its own
        self._link = link
        self._io_refs = 0
        self._closed = True

    def fileno(self) -> int:
        return self._link.handed_fileno()

    def close(self) -> None:
        self._link.close_sipp_copy()

    def __repr__(self) -> str:  # socket's would ask fileno(), which may make the pair
        return f"<SippEnd of {object.__repr__(self._link)}>"


class TlsLink(PumpHandover):
    """One connection to the SuT (its ``wire`` and ``codec``) and the socketpair whose ``sipp_end`` runs are leased.

    The keeper's event loop calls ``on_sut_event``/``on_pair_event`` and asks ``wants_sut()``
    and ``wants_pair()`` which events to watch. Towards sipp, the lengths of the messages
    written into the pair are remembered until read, so that when a run ends the unread
    remainder of a message it had started can be dropped and the next run starts on a message
    boundary.
    """

    # Slots, not a __dict__: about 1.2 kB less per idle link (PumpHandover holds its part).
    __slots__ = (
        "_sipp_copy", "answer_options", "codec", "ended_runs", "eof_towards_sipp", "from_sipp", "is_held",
        "keeper_end", "moved", "options_answered", "pair_watch", "reset", "sipp_end", "sut_ended", "to_sipp",
        "to_sut", "unread_lengths", "watched_pair", "watched_sut", "wire",
    )  # fmt: skip

    def __init__(self, wire: Wire, early: bytes = b"", codec: Codec | None = None) -> None:
        self.wire = wire
        self.codec = codec or SipStream()
        self.pump: PumpedLink | None = None  # made at the first lease; None: Python relays
        self._pump_tried = False
        self.write_pending = False
        self.ssl_with_pump = False
        self.sipp_end = SippEnd(self)  # the connection's sock: whichever pair is the link's now
        self._sipp_copy: socket.socket | None = None  # the keeper's copy of the pair's sipp end
        self.keeper_end = _NO_PAIR
        # Told when the pair is made or dropped (the loop watches keeper_end); None: the pair is kept
        # for the link's life.
        self.pair_watch: PairWatch | None = None
        self.from_sipp = SipFramer()
        self.to_sut = bytearray()
        self.to_sipp = bytearray()
        # Lists, not deques: an empty deque costs 600 bytes, an empty list 56, and both stay short
        # (the messages in the pair sipp has not read; the ended runs whose bytes are not read).
        self.unread_lengths: list[int] = []
        # Bytes ended runs left in the pair that are not read yet, one entry per ended run (each
        # counted from the previous run's end): they are read as fast as the SuT reads, and at
        # each run's end in the stream that run's unfinished message is dropped.
        self.ended_runs: list[int] = []
        self.relay = "python"
        self.closed_reason = ""  # the link is over: nothing more goes either way
        # The SuT ended its side cleanly (FIN, close_notify, a WebSocket Close): as a half-closed
        # TCP socket, the run reads what came before, then end of file, and what it writes still
        # goes out (but after a WebSocket Close: still_sending).
        self.sut_ended = ""
        self.eof_towards_sipp = False
        self.reset = False  # the SuT's side failed (RST, bad record) rather than closed
        self.said_goodbye = False  # the codec's last word (a WebSocket Close) is in to_sut
        self.moved = False  # handed to a successor keeper (--replace): this one does nothing more with it
        self.answer_options = False  # --answer-options: set by the keeper's ConnectionHealth
        self.is_held: Callable[[], bool] = _never_held  # whether a run holds the link now (transports.py)
        self.options_answered = 0
        self.messages_to_sut = 0
        self.messages_to_sipp = 0
        self.dropped_bytes = 0
        self.pings = 0
        self.ping_sent_at: float | None = None
        self.last_activity = time.monotonic()
        self.watched_sut = self.watched_pair = 0  # what the keeper's epoll watches now
        self._make_pair()  # the first one: the event loop watches it with the SuT's connection
        if early:
            self._take_from_sut(early)
        wire.shed_buffers()  # the handshake's reads leave OpenSSL's read buffer behind

    # -- the event loop's view

    def wants_sut(self) -> int:
        if self.pumped:  # once, when the SuT's side ends (the pump raises it for a TLS-only end)
            return select.EPOLLRDHUP | select.EPOLLONESHOT
        if self.ssl_with_pump:  # nothing until the pump lets go (it says so on its eventfd)
            return select.EPOLLONESHOT
        if self.sut_ended:  # sending only (an error or hang-up is reported whatever is asked)
            return select.EPOLLOUT if self.to_sut else 0
        events = 0
        if len(self.to_sipp) < BUFFER_LIMIT:  # back-pressure: stop reading while sipp lags
            events |= select.EPOLLIN | select.EPOLLRDHUP  # RDHUP only with IN: it would fire on and on
        if self.to_sut:
            events |= select.EPOLLOUT
        return events

    def wants_pair(self) -> int:
        if self.keeper_end.fileno() < 0:
            return self.watched_pair  # nothing to watch: the loop is asked for no change
        if self.pumped:
            return select.EPOLLONESHOT  # the pump reads and writes it
        # Back-pressure towards the run: while the SuT does not read, neither do we.
        events = select.EPOLLIN if len(self.to_sut) < BUFFER_LIMIT else 0
        return events | (select.EPOLLOUT if self.to_sipp else 0)

    def on_sut_event(self, mask: int) -> None:
        if self.ssl_with_pump or self.moved:
            return
        if self.pumped:  # the SuT's side ended while pumped: Python takes it from here
            self._take_back()
            if self.closed_reason or self.ssl_with_pump:
                return
        elif self._pump_if_held():
            return  # the pump's epoll reports this readiness too (level-triggered)
        if mask & select.EPOLLOUT or self.sut_ended:
            self._flush_to_sut()
        if self.sut_ended:
            if mask & (select.EPOLLHUP | select.EPOLLERR) and not self.closed_reason:
                error = socket_error(self.wire.sock)
                self._fail(f"the SuT's {self.wire.kind} connection failed after it ended: {error}")
        elif mask & (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR):
            self._read_sut()

    def on_pair_event(self, mask: int) -> None:
        if self.moved or self.pumped or self._pump_if_held():
            return  # the pump owns the pair (and sees this readiness itself)
        if self.keeper_end.fileno() < 0:
            return  # dropped while this event waited
        if mask & select.EPOLLOUT:
            self._flush_to_sipp()
        if mask & select.EPOLLIN:
            self._read_pair()
        self.drop_pair_if_idle()

    # -- SuT -> sipp

    def _read_sut(self) -> None:
        while not self.closed_reason and not self.sut_ended and not self.ssl_with_pump:
            try:
                data = self.wire.read()
            except WireEnded as end:
                self._ended(str(end))
                return
            except WireFailed as failure:
                self._fail(str(failure))
                return
            if data is None:
                return
            self.last_activity = time.monotonic()
            self.ping_sent_at = None  # anything from the SuT (a pong among it) shows the flow alive
            self._take_from_sut(data)
            if len(self.to_sipp) >= BUFFER_LIMIT:
                return

    def _take_from_sut(self, data: bytes) -> None:
        """What the SuT sent: its whole messages towards sipp, the protocol's own answers back to it."""
        try:
            messages = self.codec.feed(data)
        except Unframeable as error:
            self._queue_to_sipp(error.messages)  # whole messages before the bad part still count
            self.closed_reason = str(error)
            self.to_sut += error.farewell  # sent as the link closes (close_wire)
            self.said_goodbye = bool(error.farewell)
            self._pair_for_the_end()
            return
        replies = self.codec.take_replies(BUFFER_LIMIT - len(self.to_sut))  # pongs, the Close reply: at once
        if replies:
            self.to_sut += replies
            self._flush_to_sut()
        if self.answer_options and not self.is_held():
            messages = self._answer_options(messages)
        self._queue_to_sipp(messages)
        if self.codec.closed:
            self._closed_by_sut()

    def _ended(self, reason: str) -> None:
        """An end of stream; OpenSSL (and the pump) report an RST underneath as one too."""
        if reset_underneath(self.wire.sock):
            self._fail("the SuT reset it: ECONNRESET")
        else:
            self._ended_cleanly(reason)

    def _ended_cleanly(self, reason: str) -> None:
        self.sut_ended = reason
        self._pair_for_the_end()
        self.end_towards_sipp_when_delivered()

    def _closed_by_sut(self) -> None:
        """The SuT's WebSocket Close (its reply is queued): a clean end, and nothing more goes to it."""
        self._ended_cleanly(f"the SuT closed the WebSocket: {self.codec.closed}")

    def _answer_options(self, messages: list[bytes]) -> list[bytes]:
        """--answer-options while no run holds the link: reply to the SuT's OPTIONS pings."""
        kept = []
        for message in messages:
            reply = options_reply(message)
            if reply is None:
                kept.append(message)
            else:
                self.to_sut += self.codec.encode(reply)
                self.options_answered += 1
        if len(kept) < len(messages):
            self._flush_to_sut()
        return kept

    def _fail(self, reason: str) -> None:
        """A reset or a bad record: the run is to read ECONNRESET, not a clean end."""
        self.closed_reason = reason
        self.reset = True
        self._pair_for_the_end()

    def _pair_for_the_end(self) -> None:
        """The SuT's side is over: what it sent before waits in the pair for a run, which reads
        the end after it (and the keeper's loop ends the connection through the pair: transports.py)."""
        if self.keeper_end is _NO_PAIR and not self.moved and self.pair_watch is not None:
            self._make_pair()

    def _queue_to_sipp(self, messages: list[bytes]) -> None:
        if not messages:
            return
        self._forget_consumed()
        for message in messages:
            self.to_sipp += message
            self.unread_lengths.append(len(message))
        self.messages_to_sipp += len(messages)
        self._flush_to_sipp()

    def _flush_to_sipp(self) -> None:
        if self.keeper_end.fileno() < 0:
            return  # between runs: to_sipp keeps it for the next lease's pair
        if self.to_sipp:
            try:
                sent = self.keeper_end.send(self.to_sipp, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            del self.to_sipp[:sent]
        self.end_towards_sipp_when_delivered()

    def end_towards_sipp_when_delivered(self) -> None:
        """After the SuT's clean end: once its last message is in the pair, the run reads end of
        file there, and the pair stays open for what the run writes (shut for writing only)."""
        if self.sut_ended and not self.to_sipp and not self.eof_towards_sipp and self.keeper_end.fileno() >= 0:
            self.keeper_end.shutdown(socket.SHUT_WR)
            self.eof_towards_sipp = True

    # -- sipp -> SuT

    def _read_pair(self) -> None:
        room = BUFFER_LIMIT - len(self.to_sut)
        if room <= 0 or self.keeper_end.fileno() < 0:
            return
        try:
            data = self.keeper_end.recv(min(room, READ_CHUNK, self.ended_runs[0] if self.ended_runs else READ_CHUNK))
        except BlockingIOError:
            return
        if data:
            self.last_activity = time.monotonic()
            self._read_pair_data(data)
            if self.ended_runs:
                self.ended_runs[0] -= len(data)
                if not self.ended_runs[0]:
                    self.ended_runs.pop(0)
                    self._drop_unfinished_message()

    def _flush_to_sut(self) -> None:
        if not self.closed_reason:
            failure = self._write_to_sut()
            if failure:
                self._fail(failure)

    def _write_to_sut(self) -> str:
        """Send what is queued for the SuT as far as the wire takes it; the failure, if one."""
        # A retry after WANT_* is never shorter than the write it retries: to_sut only grows
        # at its end until a write completes, and each write takes as much of it as it can.
        while self.to_sut and not self.ssl_with_pump:
            try:
                sent = self.wire.write(self.to_sut[:READ_CHUNK])
            except WireFailed as failure:
                self.write_pending = False
                return str(failure)
            self.write_pending = sent is None
            if sent is None:
                return ""
            del self.to_sut[:sent]
        return ""

    # -- between runs

    def end_of_lease(self) -> None:
        """The run is gone: forward what it finished, drop what it did not, realign sipp's side."""
        self._take_back()
        if self.keeper_end.fileno() >= 0:  # closed once the SuT's side ended: nothing to forward
            # Read no more than back-pressure allows (a SuT that does not read would otherwise
            # make every ended run's full pair buffer the keeper's for good); the rest is read
            # as the SuT reads, still before anything of the next run.
            this_run = queued_bytes(self.keeper_end) - sum(self.ended_runs)
            if this_run > 0:
                self.ended_runs.append(this_run)
            elif not self.ended_runs:  # else the framer holds an earlier run's bytes, not this one's
                self._drop_unfinished_message()
            left = -1
            while self.ended_runs and sum(self.ended_runs) != left:
                left = sum(self.ended_runs)
                self._read_pair()
        else:
            self._drop_unfinished_message()
        self._realign_sipp_side()
        self.drop_pair_if_idle()

    def _drop_unfinished_message(self) -> None:
        partial = self.from_sipp.discard()
        if partial:
            self.dropped_bytes += len(partial)
            log.warning("dropped %d bytes of a SIP message the ended run did not finish writing", len(partial))

    def _read_pair_data(self, data: bytes) -> None:
        try:
            messages = self.from_sipp.feed(data)
        except FramingError as error:
            dropped = len(self.from_sipp.discard())
            self.dropped_bytes += dropped
            log.warning("dropped %d bytes from sipp that are not SIP: %s", dropped, error)
            messages = error.messages  # the whole ones before the bad part still go out
        if self.codec.closed:  # nothing goes after the Close reply (RFC 6455 5.5.1)
            self.dropped_bytes += sum(map(len, messages))
            return
        for message in messages:
            self.to_sut += self.codec.encode(message)
        self.messages_to_sut += len(messages)
        self._flush_to_sut()

    def _forget_consumed(self) -> int:
        """Forget messages sipp has read whole; return how far it read into the next one."""
        in_pair = sum(self.unread_lengths) - len(self.to_sipp)
        consumed = in_pair - (queued_bytes(self._sipp_copy) if self._sipp_copy is not None else 0)
        while self.unread_lengths and self.unread_lengths[0] <= consumed:
            consumed -= self.unread_lengths.pop(0)
        return consumed

    def _realign_sipp_side(self) -> None:
        """Drop the unread rest of a message the ended run had started to read."""
        if self._sipp_copy is None:
            return  # no pair, or the connection closed before its lease ended (the SuT's Close, say)
        consumed = self._forget_consumed()
        if consumed > 0 and self.unread_lengths:
            rest = self.unread_lengths.pop(0) - consumed
            self._sipp_copy.recv(rest, socket.MSG_DONTWAIT)
            self.dropped_bytes += rest
            log.warning("dropped the unread %d bytes of a message the ended run had started to read", rest)

    def send_ping(self) -> None:
        if self.moved:
            return
        self.to_sut += self.codec.ping()
        self.ping_sent_at = time.monotonic()
        self._flush_to_sut()

    def idle(self) -> bool:
        return not self.to_sut and not self.to_sipp and not self.from_sipp.pending and not self.ssl_with_pump

    def holds_nothing(self) -> bool:
        """Whether everything of the link is in the SuT's socket: nothing buffered either way, no
        partial message, no message waiting in the pair for a run, no pump, not ended."""
        return (
            self.idle()
            and not self.pumped
            and not self.codec.pending
            and not self.ended_runs
            and not self.write_pending
            and not self.closed_reason
            and not self.sut_ended
            and not (self._sipp_copy is not None and queued_bytes(self._sipp_copy))
            and not (self.keeper_end.fileno() >= 0 and queued_bytes(self.keeper_end))
        )

    def still_sending(self) -> bool:
        """Whether the SuT ended cleanly and the session still takes what runs write."""
        return bool(self.sut_ended) and not self.closed_reason and not self.codec.closed

    # -- the SuT's side ended: what it sent still reaches a run

    def close_wire(self, going_away: bool = False) -> None:
        """Say goodbye to the SuT as its protocol wants (a WebSocket Close, 1001 if ``going_away``:
        the keeper stops; TLS close_notify; the FIN), best effort and never blocking, and close."""
        if self.wire.sock.fileno() < 0:
            return
        interrupted = self.ssl_with_pump  # the pump's write was cut short: the stream is not whole
        self._free_pump()  # before the SSL object goes
        if not self.reset and not interrupted and not self.moved:
            if not self.said_goodbye:
                self.to_sut += self.codec.goodbye(going_away)
                self.said_goodbye = True
            self._write_to_sut()  # whatever it cannot take now is dropped with the link
        self.wire.close(self.reset)

    def end_towards_sipp(self) -> None:
        """Everything complete is in the pair now: end it after those messages, as the SuT ended.

        A FIN or close_notify reads as end of file after the last message. A reset reads as
        ECONNRESET: Linux reports it to an AF_UNIX stream peer whose other end is closed with
        unread data in its receive queue, after the data already queued towards that peer.
        """
        if self.reset and self._sipp_copy is not None:
            try:
                self._sipp_copy.send(b"\0", socket.MSG_DONTWAIT)  # unread at close: the peer reads ECONNRESET
            except BlockingIOError:
                pass  # full: unread data is there already
        elif not self.reset:
            self._discard_from_sipp()  # unread data at close would read as a reset
        self.keeper_end.close()

    def _discard_from_sipp(self) -> None:
        while True:
            try:
                data = self.keeper_end.recv(READ_CHUNK, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            if not data:
                return
            self.dropped_bytes += len(data)

    def close(self, going_away: bool = False) -> None:
        self.close_wire(going_away)
        try:
            self.keeper_end.close()
        except OSError:
            pass
        self.close_sipp_copy()

    # -- the socketpair: made for a run, dropped when idle

    def handed_fileno(self) -> int:
        """``sipp_end.fileno()``: the descriptor of the pair's sipp end, the pair made now if it has
        none and a run holds the link (a lease is handing it) or what the SuT sent waits for the
        next run (the connection's queue is asked: `fdkeeper status`; made only while descriptors
        are plentiful); else a keeper-wide empty socket's (nothing waits for a run), or -1 once
        the link is closed."""
        if self._sipp_copy is None and not self.moved and self.wire.sock.fileno() >= 0:
            if self.is_held():
                self._make_pair()
            elif self.to_sipp:
                self._make_pair(spare=True)
        if self._sipp_copy is not None:
            return self._sipp_copy.fileno()
        return -1 if self.wire.sock.fileno() < 0 or self.moved else _empty_fileno()

    def pair_descriptors(self) -> int:
        """The keeper's descriptors for the pair (its two ends, while they are open; pool.py counts them)."""
        return (self.keeper_end.fileno() >= 0) + (self._sipp_copy is not None)

    def close_sipp_copy(self) -> None:
        if self._sipp_copy is not None:
            self._sipp_copy.close()
            self._sipp_copy = None

    def _make_pair(self, spare: bool = False) -> None:
        """A new socketpair, what waits in ``to_sipp`` first in it. ``spare``: not needed by a run
        (status asks): none is made past the last STATUS_PAIR_RESERVE descriptors."""
        pair = new_descriptors(
            "open the socketpair a TLS or WebSocket connection is leased through",
            lambda: socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM),
        )
        if spare and pair[1].fileno() > resource.getrlimit(resource.RLIMIT_NOFILE)[0] - STATUS_PAIR_RESERVE:
            for end in pair:
                end.close()
            return
        self._sipp_copy, self.keeper_end = pair
        self.keeper_end.setblocking(False)
        self.eof_towards_sipp = False
        self._flush_to_sipp()  # what the SuT sent between runs: first in the new pair
        if self.pair_watch is not None:  # last: watching it may end the link already (the SuT's end)
            self.pair_watch.made()

    def drop_pair_if_idle(self) -> None:
        """Close the pair once no run holds the link and nothing of an ended run is in it: the
        whole messages no run read go back to the head of ``to_sipp`` (a lease's pair is made
        anew), so an idle link holds the SuT's connection only."""
        if (
            self.pair_watch is None
            or self.keeper_end.fileno() < 0
            or self._sipp_copy is None
            or self.is_held()
            or self.pumped
            or self.ended_runs
            or self.from_sipp.pending
            or self.closed_reason
            or self.sut_ended
            or self.moved
            or queued_bytes(self.keeper_end)
        ):
            return
        self.to_sipp[:0] = self._take_back_unread()
        self.pair_watch.dropping(self.keeper_end.fileno())
        self.keeper_end.close()
        self.keeper_end = _NO_PAIR
        self.close_sipp_copy()

    def _take_back_unread(self) -> bytes:
        """What waits unread in sipp's end, taken out: whole messages (the ended run's begun one was
        dropped at its end), and all of it (no run holds the link: nobody else reads there)."""
        assert self._sipp_copy is not None
        taken = bytearray()
        while True:
            try:
                data = self._sipp_copy.recv(READ_CHUNK, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return bytes(taken)
            if not data:
                return bytes(taken)
            taken += data
