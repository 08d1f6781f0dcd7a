"""A fake SuT: a loopback socket server (TCP or TLS) that does only what the test tells it to,
and the byte-exact ways a test ends the SuT's side of a connection (FIN, close_notify, RST, a
bad record). SIP behaviour with the real sipp and Kamailio is in the e2e tests."""

from __future__ import annotations

import os
import socket
import ssl
import struct
import threading

from fdkeeper.testbed import wait_until
from fdkeeper.testbed.pki import TestPki


def sip(call_id: str, body: bytes = b"") -> bytes:
    """A minimal SIP MESSAGE with the given Call-ID and body, framed by its Content-Length."""
    return f"MESSAGE sip:a@b SIP/2.0\r\nCall-ID: {call_id}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


class FakeSut:
    """A loopback server that accepts connections and does only what the test tells it to.

    With ``pki`` it speaks TLS (server side); ``handshake=False`` accepts TCP and never
    speaks at all. Accepted connections are in ``accepted`` (TLS-wrapped when TLS is on).
    """

    def __init__(
        self, pki: TestPki | None = None, *, handshake: bool = True, pong: bool = False, strict_eof: bool = False
    ) -> None:
        self.pong = pong
        self.strict_eof = strict_eof  # TLS: an end without close_notify raises SSLEOFError, not b""
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self.context: ssl.SSLContext | None = None
        if pki is not None and handshake:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(pki.server_cert, pki.server_key)
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            if self.context is not None:
                try:
                    raw = self.context.wrap_socket(raw, server_side=True, suppress_ragged_eofs=not self.strict_eof)
                    # The keeper pings right after the handshake (tls.past_our_finished): pong.
                    raw.settimeout(5)
                    if raw.recv(4) == b"\r\n\r\n":
                        raw.sendall(b"\r\n")
                    raw.settimeout(None)
                except (ssl.SSLError, OSError):
                    raw.close()
                    continue
            self.accepted.append(raw)
            if self.pong:
                threading.Thread(target=self._answer_pings, args=(raw,), daemon=True).start()

    @staticmethod
    def _answer_pings(sock: socket.socket) -> None:
        """Answer each RFC 5626 ping with a pong, as Kamailio does."""
        while True:
            try:
                data = sock.recv(4096)
            except OSError:
                return
            if not data:
                return
            for _ in range(data.count(b"\r\n\r\n")):
                sock.sendall(b"\r\n")

    def connection(self) -> socket.socket:
        return wait_until(lambda: self.accepted[-1] if self.accepted else None, what="the keeper's connection")

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self._thread.join(5)
        for sock in self.accepted:
            try:
                sock.close()
            except OSError:
                pass


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets an RST instead of a FIN."""
    raw = sock if not isinstance(sock, ssl.SSLSocket) else socket.socket(fileno=os.dup(sock.fileno()))
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if raw is not sock:
        raw.close()
    sock.close()


def end_connection(peer: socket.socket, how: str) -> None:
    """End the SuT's side of ``peer`` the way ``how`` names: fin, close_notify, rst or bad record."""
    if how == "fin":
        if isinstance(peer, ssl.SSLSocket):  # no close_notify: the socket underneath ends
            socket.socket(fileno=os.dup(peer.fileno())).shutdown(socket.SHUT_RDWR)
        else:
            peer.shutdown(socket.SHUT_WR)
    elif how == "close_notify":
        send_close_notify(peer)  # type: ignore[arg-type]  # close_notify cases pass TLS connections only
    elif how == "rst":
        reset(peer)
    elif how == "bad record":  # an application-data record whose MAC cannot check out
        with socket.socket(fileno=os.dup(peer.fileno())) as raw:
            raw.sendall(bytes([0x17, 0x03, 0x03, 0x00, 0x20]) + b"x" * 0x20)


def send_close_notify(peer: ssl.SSLSocket) -> None:
    """End the SuT's sending side with close_notify and go on reading, as a SuT does that closes
    (Kamailio does not wait for the keeper's close_notify: the keeper sends one only when it is
    done sending too, as over a half-closed TCP connection)."""
    timeout = peer.gettimeout()
    peer.settimeout(0.3)
    try:
        peer.unwrap()  # sends close_notify, then waits for the keeper's, which does not come yet
    except (TimeoutError, ssl.SSLError):
        pass
    peer.settimeout(timeout)
