"""The hand-over of a keeper-terminated link (keeper/tlslink.py) to the C pump while a run holds it, and back.

While a run holds a link, the C pump (tlspump.py) moves its messages instead of Python, with
the same framing and bounds; between runs Python relays. The link changes hands only at a
clean point, with no write in progress on its wire (see tlslink.py and docs/architecture.md);
what the pump did meanwhile (buffers, partial messages, counters, how the SuT's side ended)
comes back here and the link goes on from it.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from fdkeeper.keeper.codec import Codec
from fdkeeper.keeper.tlspump import (
    END_CLOSE_NOTIFY,
    END_EOF,
    END_FAILED,
    END_UNFRAMEABLE,
    END_WS_CLOSE,
    Handback,
    LiveCounter,
    PumpedLink,
)
from fdkeeper.keeper.wire import Wire
from fdkeeper.sip.framing import SipFramer

log = logging.getLogger("fdkeeper.tls")


class PumpHandover:
    """The hand-over of a TlsLink to the C pump (tlspump.py) while a run holds it, and back.

    Python attaches the link at its first event while held and no SSL write of its own is
    pending, with its whole state (buffers, partial messages, unread lengths); it takes the link
    back when the run ends (``end_of_lease``) or the SuT's side ends (the one-shot EPOLLRDHUP
    the link watches meanwhile), and goes on from the state the pump left: at once for the pair
    side, once the pump's pending write is done for the SSL object (``take_ssl_back``).
    TlsLink's relay methods do the rest.
    """

    # Slots, not a __dict__ (about 1.2 kB less per idle link): the hand-over's own state, the
    # counters' stored values (LiveCounter) and the link's state it sets; TlsLink's hold the rest.
    __slots__ = (
        "_dropped_bytes", "_messages_to_sipp", "_messages_to_sut", "_pings", "_pump_tried",
        "closed_reason", "last_activity", "ping_sent_at", "pump", "relay", "said_goodbye", "ssl_with_pump",
        "write_pending",
    )  # fmt: skip

    # Counted by Python while it relays and by the pump while a run holds the link.
    messages_to_sut = LiveCounter()
    messages_to_sipp = LiveCounter()
    dropped_bytes = LiveCounter()
    pings = LiveCounter()  # WebSocket pings the pump answered (Python's own: the codec's pings_answered)

    pump: PumpedLink | None
    _pump_tried: bool
    write_pending: bool  # Python's last SSL write returned WANT_*: it alone may retry it
    ssl_with_pump: bool  # released with a write of the pump's pending: the SSL object is still its
    relay: str  # who relays while a run holds it, for status: "python", or "pump" once it took it

    # The link's state and relay, which the hand-over reads and calls back into: TlsLink's.
    wire: Wire
    sipp_end: socket.socket
    keeper_end: socket.socket
    codec: Codec  # decodes what the SuT sends (and encodes what goes to it)
    from_sipp: SipFramer
    to_sut: bytearray
    to_sipp: bytearray
    unread_lengths: list[int]
    ended_runs: list[int]
    closed_reason: str
    sut_ended: str
    reset: bool
    said_goodbye: bool
    is_held: Callable[[], bool]
    ping_sent_at: float | None
    last_activity: float

    if TYPE_CHECKING:  # TlsLink's relay methods (declared for the type checker only)

        def _fail(self, reason: str) -> None: ...
        def _ended(self, reason: str) -> None: ...
        def _ended_cleanly(self, reason: str) -> None: ...
        def _closed_by_sut(self) -> None: ...
        def _flush_to_sut(self) -> None: ...
        def _read_sut(self) -> None: ...
        def _queue_to_sipp(self, messages: list[bytes]) -> None: ...
        def _read_pair_data(self, data: bytes) -> None: ...

    @property
    def pumped(self) -> bool:
        return self.pump is not None and self.pump.attached

    def _pump_if_held(self) -> bool:
        """Hand the link to the pump while a run holds it; whether it did (else Python relays)."""
        if self.closed_reason or self.sut_ended or not self.is_held() or self.ended_runs:
            return False  # an ended run's bytes still come first: Python finishes them
        if self.write_pending or self.ssl_with_pump:
            return False  # only at a clean point: no SSL write in progress changes hands
        if self.keeper_end.fileno() < 0:
            return False  # no pair yet: the lease has not handed it (tlslink.py handed_fileno)
        if not self._pump_tried:
            self._pump_tried = True
            self.pump = PumpedLink.create(self.wire.sock, websocket=self.codec.websocket)
            self.relay = "pump" if self.pump else "python"
        if self.pump is None:
            return False
        partials = (self.codec.discard(), self.from_sipp.discard())
        fds = (self.wire.sock.fileno(), self.keeper_end.fileno(), self.sipp_end.fileno())
        if not self.pump.attach(fds, bytes(self.to_sut), bytes(self.to_sipp), partials, list(self.unread_lengths)):
            self._restore_partials(*partials)
            return False
        self.to_sut.clear()
        self.to_sipp.clear()
        self.unread_lengths.clear()
        return True

    def _take_back(self) -> None:
        """The pump stops; its buffers, counters and how the SuT ended come back here (the SSL
        object and the bytes for the SuT too, unless a write of the pump's is pending)."""
        if self.pump is None or not self.pump.attached:
            return
        back = self.pump.release()
        self.ssl_with_pump = back.finishing
        self.to_sut[:0] = back.to_sut
        self.to_sipp[:0] = back.to_sipp
        self.unread_lengths[:0] = back.unread_lengths
        self.messages_to_sut += back.messages_to_sut
        self.messages_to_sipp += back.messages_to_sipp
        self.dropped_bytes += back.dropped_bytes
        self.pings += back.pings
        self.codec.keepalives += back.keepalives
        if back.keepalives:
            self.ping_sent_at = None
        if back.last_activity is not None:
            self.last_activity = max(self.last_activity, back.last_activity)
        if back.unframeable_from_sipp:
            log.warning("dropped %d bytes from sipp that are not SIP", back.dropped_bytes)
        self._restore_partials(b"" if back.end_kind == END_UNFRAMEABLE else back.from_sut, back.from_sipp)
        self._apply_pump_end(back)
        if not self.ssl_with_pump:
            self.wire.shed_buffers()  # the pump's last read found nothing: its read buffer is still there

    def take_ssl_back(self) -> bool:
        """Once the pump's last write is done: the SSL object and the unsent bytes are Python's
        again, ahead of what runs wrote meanwhile. Whether the SSL object is Python's now (False:
        that write is not done yet)."""
        if not self.ssl_with_pump or self.pump is None:
            return True  # taken back already, or the link closed meanwhile (_free_pump)
        if not self.pump.finished():
            return False
        rest, failure = self.pump.take_rest()
        self.ssl_with_pump = False
        self.to_sut[:0] = rest
        if failure and not self.reset:
            self._fail(failure)
        self._flush_to_sut()
        self._read_sut()  # what the SuT sent meanwhile waited in the socket
        self.wire.shed_buffers()
        return True

    def _restore_partials(self, from_sut: bytes, from_sipp: bytes) -> None:
        self._queue_to_sipp(self.codec.feed(from_sut))  # partial messages: nothing comes out
        self._read_pair_data(from_sipp)

    def _apply_pump_end(self, back: Handback) -> None:
        if back.end_kind == END_EOF:
            self._ended(back.end_reason)
        elif back.end_kind == END_FAILED:
            self._fail(back.end_reason)
        elif back.end_kind == END_CLOSE_NOTIFY:
            self._ended_cleanly(back.end_reason)
        elif back.end_kind == END_UNFRAMEABLE:
            self.closed_reason = back.end_reason
            self.said_goodbye = True  # over WebSocket the pump's Close (1002, 1009) is sent or in to_sut
        elif back.end_kind == END_WS_CLOSE:  # its Close reply is sent or in to_sut too
            self.codec.take_close(back.end_reason)
            self._closed_by_sut()

    def _free_pump(self) -> None:
        if self.pump is not None:
            self._take_back()
            self.pump.free()  # a write it was finishing goes with it: the link closes
            self.pump = None
            self.ssl_with_pump = False
