"""A tiny blocking SIP-over-WebSocket client for tests, built on fdkeeper.websocket: the HTTP
Upgrade, one SIP message per masked frame out, whole messages back (pings answered as the
decoder asks). Over TLS (WSS) with an ssl.SSLContext. Enough to talk to the embedded SuT
without sipp or a keeper; a test of the keeper itself uses the keeper, not this."""

from __future__ import annotations

import re
import socket
import ssl
import time
import uuid

from fdkeeper import websocket
from fdkeeper.address import format_address

RECEIVE_CHUNK = 65536


class WsClient:
    """One WebSocket connection to host:port that speaks SIP (subprotocol sip)."""

    def __init__(self, sock: socket.socket, handshake: websocket.WsHandshake, early: bytes) -> None:
        self.sock = sock
        self.handshake = handshake
        self.decoder = websocket.WsDecoder()
        self.messages: list[bytes] = []
        self._take(early)

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        *,
        path: str = "/",
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        timeout: float = 5.0,
    ) -> WsClient:
        """Connect, make the Upgrade; WsHandshakeError when the server refuses it."""
        sock = socket.create_connection((host, port), timeout=timeout)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=server_hostname or host)
        where = format_address((host, port))
        options = websocket.WsOptions(path=path)
        key = websocket.new_key()
        sock.sendall(websocket.handshake_request(where, options, key))
        data = b""
        while True:
            chunk = sock.recv(RECEIVE_CHUNK)
            if not chunk:
                sock.close()
                raise ConnectionError(f"{where} closed the connection during the handshake: {data[:200]!r}")
            data += chunk
            answer = websocket.read_handshake_answer(data, key, options, where)
            if answer is not None:
                return cls(sock, *answer)

    @property
    def local_port(self) -> int:
        return int(self.sock.getsockname()[1])

    def send(self, message: bytes | str) -> None:
        """One SIP message as one WebSocket message."""
        self.sock.sendall(websocket.encode_message(message.encode() if isinstance(message, str) else message))

    def receive(self, timeout: float = 5.0) -> bytes:
        """The next whole SIP message from the server; TimeoutError when none comes in time."""
        deadline = time.monotonic() + timeout
        while not self.messages:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no SIP message over the WebSocket within {timeout} s")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(RECEIVE_CHUNK)
            except TimeoutError:
                continue
            if not chunk:
                raise ConnectionError(f"the server closed the WebSocket ({self.decoder.closed or 'no Close frame'})")
            self._take(chunk)
        return self.messages.pop(0)

    def _take(self, data: bytes) -> None:
        self.messages += self.decoder.feed(data)
        if self.decoder.replies:  # pongs, the answer to a Close
            self.sock.sendall(bytes(self.decoder.replies))
            self.decoder.replies.clear()

    def close(self) -> None:
        try:
            self.sock.sendall(websocket.close_frame(1000))
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> WsClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def register_request(user: str, domain: str, client: WsClient, *, transport: str = "WS", expires: int = 300) -> bytes:
    """A REGISTER as a WebRTC client sends it: Via WS/WSS, its Contact an `.invalid` host
    (it can be reached over this connection only)."""
    tag = uuid.uuid4().hex[:8]
    return (
        f"REGISTER sip:{domain} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} {tag}.invalid;branch=z9hG4bK{uuid.uuid4().hex[:16]};rport\r\n"
        f"Max-Forwards: 70\r\n"
        f"From: <sip:{user}@{domain}>;tag={tag}\r\n"
        f"To: <sip:{user}@{domain}>\r\n"
        f"Call-ID: {uuid.uuid4().hex}@{tag}.invalid\r\n"
        f"CSeq: 1 REGISTER\r\n"
        f"Contact: <sip:{user}@{tag}.invalid;transport={transport.lower()}>\r\n"
        f"Expires: {expires}\r\n"
        f"Content-Length: 0\r\n\r\n"
    ).encode()


_ECHOED = re.compile(rb"^(?:Via|v|From|f|To|t|Call-ID|i|CSeq):[^\r\n]*\r\n", re.IGNORECASE | re.MULTILINE)


def reply_to(request: bytes, status: str = "200 OK") -> bytes:
    """A reply to `request` (its Vias, From, To with a tag, Call-ID and CSeq; no body)."""
    headers = _ECHOED.findall(request.split(b"\r\n\r\n", 1)[0] + b"\r\n")
    tagged = [
        line.rstrip(b"\r\n") + b";tag=" + uuid.uuid4().hex[:8].encode() + b"\r\n"
        if re.match(rb"^(?:To|t):", line, re.IGNORECASE) and b";tag=" not in line
        else line
        for line in headers
    ]
    return b"SIP/2.0 " + status.encode() + b"\r\n" + b"".join(tagged) + b"Content-Length: 0\r\n\r\n"


def status_of(message: bytes) -> str:
    """The start line of a SIP message, e.g. "SIP/2.0 200 OK" or "OPTIONS sip:... SIP/2.0"."""
    return message.split(b"\r\n", 1)[0].decode(errors="replace")
