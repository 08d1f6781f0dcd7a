"""How a keeper-terminated link frames SIP towards the SuT: straight on the stream, or over WebSocket.

A link (keeper/tlslink.py) hands each whole SIP message from sipp to ``encode`` and feeds what
the SuT sends to ``feed``, which returns whole SIP messages; runs only ever see plain SIP.
``SipStream`` (tls): messages as they are, SipFramer in, RFC 5626 CRLFCRLF pings (the SuT's
CRLF pongs counted as keep-alives). ``WebSocketStream`` (ws, wss; RFC 7118 over RFC 6455):
each message one masked frame, WsDecoder in, with what the protocol answers by itself
(pongs for pings, the reply to the SuT's Close) in ``take_replies``, WebSocket pings for
--keepalive and a Close frame before the keeper closes it.

Both raise ``Unframeable`` for what cannot be read as SIP, with the whole messages before the
bad part (they are still delivered) and what to send the SuT before the link closes (over
WebSocket a Close with the error's code: 1002, or 1009 for a message too big).
"""

from __future__ import annotations

from typing import Protocol

from fdkeeper.sip.framing import PING, FramingError, SipFramer
from fdkeeper.websocket import OP_CLOSE, WsDecoder, WsProtocolError, close_frame, encode_message, ping_frame

GOING_AWAY, NORMAL_CLOSURE = 1001, 1000  # RFC 6455 7.4.1: the keeper stops / the keeper is done with it


class Unframeable(Exception):
    """What the SuT sent cannot be read as SIP: str the link's closing reason, ``messages`` the
    whole ones before the bad part."""

    def __init__(self, reason: str, messages: list[bytes], farewell: bytes = b"") -> None:
        super().__init__(reason)
        self.messages = messages
        self.farewell = farewell  # sent to the SuT before the link closes


class Codec(Protocol):
    websocket: bool  # the pump frames it as WebSocket (tlspump.py)
    keepalives: int  # pongs (and empty messages) the SuT sent, counted by the pump too

    @property
    def pings_answered(self) -> int:
        """The SuT's pings answered (WebSocket)."""

    def feed(self, data: bytes) -> list[bytes]:
        """The whole SIP messages ``data`` completes; raises Unframeable."""

    @property
    def pending(self) -> int:
        """Bytes held of a message not finished yet."""

    def discard(self) -> bytes:
        """Remove and return those bytes (the pump's hand-over state); feeding them back restores them."""

    def take_replies(self, room: int) -> bytes:
        """What the protocol answers by itself (pongs, the Close reply), to send the SuT now; at
        most about ``room`` bytes of it that may be left unsent (pongs beyond are dropped)."""

    @property
    def closed(self) -> str:
        """The SuT closed the protocol (a WebSocket Close; its code and reason), or ""."""

    def encode(self, message: bytes) -> bytes:
        """One whole SIP message from sipp, as the SuT is to receive it."""

    def ping(self) -> bytes:
        """A keep-alive ping (--keepalive)."""

    def goodbye(self, going_away: bool) -> bytes:
        """What the keeper sends before it closes the link (``going_away``: the keeper stops)."""

    def take_close(self, reason: str) -> None:
        """The SuT's Close the pump read and answered (``reason``: its ``closed`` text)."""


class _Decoded:
    """What both codecs read through their decoder: a SipFramer or its twin WsDecoder."""

    __slots__ = ("_decoder",)  # not a __dict__: one codec per kept TLS or WebSocket link
    _decoder: SipFramer | WsDecoder

    @property
    def keepalives(self) -> int:
        return self._decoder.keepalives

    @keepalives.setter
    def keepalives(self, value: int) -> None:
        self._decoder.keepalives = value

    @property
    def pending(self) -> int:
        return self._decoder.pending

    def discard(self) -> bytes:
        return self._decoder.discard()


class SipStream(_Decoded):
    """SIP straight on the stream (TLS): SipFramer in, messages as they are out, CRLFCRLF pings."""

    __slots__ = ()
    websocket = False
    closed = ""
    pings_answered = 0

    def __init__(self) -> None:
        self._decoder = SipFramer()

    def feed(self, data: bytes) -> list[bytes]:
        try:
            return self._decoder.feed(data)
        except FramingError as error:
            raise Unframeable(f"the SuT sent unframeable data: {error}", error.messages) from None

    def take_replies(self, room: int) -> bytes:
        return b""

    def encode(self, message: bytes) -> bytes:
        return message

    def ping(self) -> bytes:
        return PING

    def goodbye(self, going_away: bool) -> bytes:
        return b""  # TLS's close_notify is the wire's

    def take_close(self, reason: str) -> None:
        raise AssertionError(f"a WebSocket Close on a SIP stream: {reason}")


class WebSocketStream(_Decoded):
    """SIP over WebSocket (RFC 7118): one masked frame per message, WsDecoder in, WebSocket pings."""

    __slots__ = ()
    websocket = True
    _decoder: WsDecoder

    def __init__(self) -> None:
        self._decoder = WsDecoder()

    @property
    def pings_answered(self) -> int:
        return self._decoder.pings

    @property
    def closed(self) -> str:
        return self._decoder.closed

    def feed(self, data: bytes) -> list[bytes]:
        try:
            return self._decoder.feed(data)
        except WsProtocolError as error:
            raise Unframeable(str(error), error.messages, close_frame(error.code)) from None

    def take_replies(self, room: int) -> bytes:
        """The pongs and the Close reply; a SuT that pings faster than it reads gets no more than
        ``room`` bytes of pongs, else only the last one while there is room at all (RFC 6455 5.5.3
        lets an endpoint answer only the latest ping), and the Close reply whatever the room."""
        replies = bytes(self._decoder.replies)
        self._decoder.replies.clear()
        if len(replies) <= room:
            return replies
        last_pong, close = _last_frames(replies)
        return (last_pong if room > 0 else b"") + close

    def encode(self, message: bytes) -> bytes:
        return encode_message(message)

    def ping(self) -> bytes:
        return ping_frame()

    def goodbye(self, going_away: bool) -> bytes:
        if self.closed:
            return b""  # the SuT closed first: the decoder's reply was the keeper's Close
        return close_frame(GOING_AWAY if going_away else NORMAL_CLOSURE)

    def take_close(self, reason: str) -> None:
        self._decoder.closed = reason  # everything fed after it is ignored, as after its own


_MASKED_HEADER = 6  # a client's control frame: 2 bytes, then the 4-byte mask (payload under 126 bytes)


def _last_frames(replies: bytes) -> tuple[bytes, bytes]:
    """The last pong and the Close reply among ``replies`` (control frames the decoder encoded)."""
    at, last_pong, close = 0, b"", b""
    while at < len(replies):
        end = at + _MASKED_HEADER + (replies[at + 1] & 0x7F)
        if replies[at] & 0x0F == OP_CLOSE:
            close = replies[at:end]
        else:
            last_pong = replies[at:end]
        at = end
    return last_pong, close
