"""The stateful test's scripted SuT (fdkeeper/testbed/scripted_sut.py) as a WebSocket server: ws
over its TCP connections, wss over its TLS ones.

It answers the keeper's Upgrade, reads what the keeper sends as a server must (each frame masked,
no reserved bits) and as this project promises (each SIP message one final frame, nothing after
the keeper's Close), answers the keeper's keep-alive pings, and otherwise sends exactly the bytes
the test gives it (``send_raw``): the test builds whole or fragmented messages, pings, a Close or
a protocol error with fdkeeper/testbed/wsframes.py. What the keeper sent is in each connection's
``WsSide``; the SIP messages also in ``received``, as for the base SuT, and a broken rule in
``garbage``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fdkeeper.testbed.scripted_sut import ScriptedSut, SutConnection
from fdkeeper.testbed.wsframes import handshake_answer, read_frame, server_frame
from fdkeeper.websocket import MAX_HANDSHAKE_ANSWER, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT


@dataclass
class WsSide:
    """One connection's WebSocket state, as the SuT sees it."""

    request: bytearray = field(default_factory=bytearray)  # the Upgrade, until its blank line
    upgraded: bool = False
    buffer: bytearray = field(default_factory=bytearray)  # a frame not whole yet
    pongs: list[bytes] = field(default_factory=list)  # the keeper's answers to the SuT's pings
    keeper_pings: int = 0  # the keeper's keep-alive pings (each answered)
    mid_frame: bool = False  # the test left a frame unfinished: no pong may go out before its rest
    held_pongs: bytearray = field(default_factory=bytearray)  # pongs waiting for that
    close_code: int | None = None  # the keeper's Close (1005: no code)


class WsScriptedSut(ScriptedSut):
    """ScriptedSut speaking the server's side of RFC 6455 / RFC 7118 on each connection."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.sides: dict[int, WsSide] = {}
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def side(self, connection: SutConnection) -> WsSide:
        return self.sides.setdefault(id(connection), WsSide())

    def send(self, connection: SutConnection, message: bytes) -> None:
        self.send_raw(connection, server_frame(OP_TEXT, message))

    def send_raw(self, connection: SutConnection, data: bytes, mid_frame: bool = False) -> None:
        """Send ``data``; ``mid_frame``: it ends inside a frame (the SuT's own pongs wait for the rest)."""

        def action() -> None:
            side = self.side(connection)
            self._write(connection, data)
            side.mid_frame = mid_frame
            if not mid_frame and side.held_pongs:
                self._write(connection, bytes(side.held_pongs))
                side.held_pongs.clear()

        self.call(action)

    def end_with(self, connection: SutConnection, data: bytes, how: str) -> None:
        """Send ``data`` (a Close, a protocol error), then nothing more; go on reading."""

        def action() -> None:
            self._write(connection, data)
            self._flush(connection, wait=True)
            connection.sut_ended = how

        self.call(action)

    # -- the SuT's thread

    def _frame(self, connection: SutConnection, data: bytes) -> None:
        side = self.side(connection)
        if not side.upgraded:
            side.request += data
            head, blank, rest = bytes(side.request).partition(b"\r\n\r\n")
            if not blank:
                if len(side.request) > MAX_HANDSHAKE_ANSWER:
                    self._broken(connection, "an Upgrade request without its blank line")
                return
            side.upgraded = True
            self._write(connection, handshake_answer(head + blank))
            data = rest
        side.buffer += data
        while connection.reading and (found := read_frame(side.buffer)) is not None:
            frame, end = found
            del side.buffer[:end]
            if side.close_code is not None:
                self._broken(connection, f"a frame (opcode {frame.opcode}) after the keeper's Close")
            elif not frame.masked or frame.rsv:
                self._broken(connection, f"a frame from the keeper {'with reserved bits' if frame.rsv else 'unmasked'}")
            elif frame.opcode in (OP_TEXT, OP_BINARY) and frame.fin:
                connection.received.append(frame.payload)
            elif frame.opcode == OP_PING:
                side.keeper_pings += 1
                pong = server_frame(OP_PONG, frame.payload)
                if side.mid_frame:
                    side.held_pongs += pong
                else:
                    self._write(connection, pong)
            elif frame.opcode == OP_PONG:
                side.pongs.append(frame.payload)
            elif frame.opcode == OP_CLOSE:
                side.close_code = int.from_bytes(frame.payload[:2], "big") if len(frame.payload) >= 2 else 1005
            else:
                self._broken(
                    connection, f"a frame of opcode {frame.opcode} (fin {frame.fin}): not one frame per message"
                )

    def _broken(self, connection: SutConnection, what: str) -> None:
        connection.garbage = f"the keeper broke the WebSocket rules: {what}"
        connection.reading = False
