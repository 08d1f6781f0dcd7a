"""The socket under a keeper-terminated link to the SuT: a TLS session or a plain TCP socket.

A link (keeper/tlslink.py) reads and writes the SuT through its wire and never asks which it
is. ``read`` returns bytes, or None when there is nothing now, and raises ``WireEnded`` for a
clean end (a FIN; over TLS also close_notify) or ``WireFailed`` for a failure the run is to
read as ECONNRESET (a reset, a bad TLS record). ``write`` returns the bytes it took, or None
when the socket is full; over TLS that write must be retried with at least the same bytes
(OpenSSL's rule, which tlslink.py keeps). ``close`` ends the keeper's side as a peer of that
kind does: TLS sends close_notify first, then both send the FIN.

TCP (WebSocket over TCP, ``ws``) needs nothing of TLS; TLS (``tls``, ``wss``) peeks the FIN at
the socket instead of reading it through OpenSSL (``_next_in_socket``).
"""

from __future__ import annotations

import _socket
import errno
import socket
import ssl
from typing import Protocol

from fdkeeper.keeper.tlspump import free_buffers
from fdkeeper.tls import READ_CHUNK


class WireEnded(Exception):
    """The SuT ended its side cleanly (FIN or close_notify); str: how, for the log and status."""


class WireFailed(Exception):
    """The SuT's side failed (a reset, a bad TLS record); str: the reason."""


class Wire(Protocol):
    kind: str  # "TLS" or "TCP", in the reasons given

    @property
    def sock(self) -> socket.socket:
        """The socket the keeper's epoll and the pump watch."""

    def read(self) -> bytes | None:
        """Bytes the SuT sent, or None when nothing is there now; raises WireEnded, WireFailed."""

    def write(self, data: bytes | bytearray) -> int | None:
        """The bytes of ``data`` taken, or None when the socket is full; raises WireFailed."""

    def close(self, reset: bool) -> None:
        """End the keeper's side (close_notify over TLS, unless ``reset``; then the FIN) and close."""

    def shed_buffers(self) -> None:
        """Nothing is read or written now: free what the wire holds for that (OpenSSL's buffers)."""


class TlsWire:
    """A TLS session the keeper made (opening.py), non-blocking."""

    __slots__ = ("sock", "tls")
    kind = "TLS"

    def __init__(self, tls: ssl.SSLSocket) -> None:
        self.sock = self.tls = tls

    def read(self) -> bytes | None:
        tls = self.tls
        if not tls.pending():  # OpenSSL would read the socket: see what is there first
            ahead = _next_in_socket(tls)
            if ahead == _NOTHING:
                return None
            if ahead == _FIN:
                raise WireEnded("the SuT closed it: FIN without TLS close_notify")
        try:
            data = tls.recv(READ_CHUNK)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            self.shed_buffers()  # OpenSSL keeps its read buffer after a read that found nothing
            return None
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            raise WireEnded("the SuT closed it: FIN without TLS close_notify") from None
        except ssl.SSLError as error:
            if error.reason == "UNEXPECTED_EOF_WHILE_READING":  # Debian's 3.11 says it so
                raise WireEnded("the SuT closed it: FIN without TLS close_notify") from None
            raise WireFailed(f"the SuT's TLS connection failed: {error.reason or error}") from None
        except OSError as error:
            raise WireFailed(f"the SuT's TLS connection failed: {error.strerror or error}") from None
        if not data:
            raise WireEnded("the SuT closed it: TLS close_notify")
        return data

    def write(self, data: bytes | bytearray) -> int | None:
        try:
            return self.tls.send(data)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
            return None
        except (ssl.SSLError, OSError) as error:
            raise WireFailed(f"the SuT's TLS connection failed: {getattr(error, 'reason', None) or error}") from None

    def close(self, reset: bool) -> None:
        if not reset:
            self._send_close_notify()
        try:
            self.tls.close()
        except OSError:
            pass

    def shed_buffers(self) -> None:
        free_buffers(self.tls)

    def _send_close_notify(self) -> None:
        """Best effort and never blocking: the socket is non-blocking, the SuT's answer is not awaited."""
        if self.tls.fileno() < 0 or self.tls.gettimeout() != 0.0:
            return
        try:
            self.tls.unwrap()
        except (ssl.SSLError, OSError, ValueError):
            pass  # sent, and the SuT's close_notify not there yet (SSLWantReadError); or it could not go


class TcpWire:
    """A plain TCP socket the keeper opened (opening.py), non-blocking."""

    __slots__ = ("sock",)
    kind = "TCP"

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)

    def read(self) -> bytes | None:
        try:
            data = self.sock.recv(READ_CHUNK)
        except BlockingIOError:
            return None
        except OSError as error:
            if error.errno == errno.ECONNRESET:
                raise WireFailed("the SuT reset it: ECONNRESET") from None
            raise WireFailed(f"the SuT's TCP connection failed: {error.strerror or error}") from None
        if not data:
            raise WireEnded("the SuT closed it: FIN")
        return data

    def write(self, data: bytes | bytearray) -> int | None:
        try:
            return self.sock.send(data, socket.MSG_NOSIGNAL)
        except BlockingIOError:
            return None
        except OSError as error:
            raise WireFailed(f"the SuT's TCP connection failed: {error.strerror or error}") from None

    def close(self, reset: bool) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def shed_buffers(self) -> None:
        pass  # the kernel's socket buffers are all there is


def socket_error(sock: socket.socket) -> str:
    """The pending error of ``sock`` by name (it clears it), or "hang-up"."""
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    return errno.errorcode.get(error, str(error)) if error else "hang-up"


_NOTHING, _FIN, _SOMETHING = range(3)


def _next_in_socket(tls: ssl.SSLSocket) -> int:
    """What the TLS socket holds next: nothing yet, the SuT's FIN, or bytes (or an error).

    A FIN is never read through OpenSSL: it takes the end of a stream without close_notify
    for a truncation attack and refuses to write after it, where a half-closed TCP socket
    still sends (the run's answers to what the SuT sent before are to go out). Peeking here
    replaces the read that would have ended in SSLWantReadError.
    """
    try:
        return _SOMETHING if _socket.socket.recv(tls, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT) else _FIN
    except BlockingIOError:
        return _NOTHING
    except OSError:  # a reset: OpenSSL reads it as it comes
        return _SOMETHING


_TCP_CLOSE = 7  # tcpi_state after an RST; a FIN received leaves CLOSE_WAIT


def reset_underneath(sock: socket.socket) -> bool:
    """Whether the TCP connection under an ended stream was reset rather than closed.

    OpenSSL (and the pump) report both as an EOF, and its read may have consumed the socket
    error: an RST while established leaves ECONNRESET (or, consumed, no error and the TCP state
    CLOSE); an RST after the SuT's FIN leaves EPIPE, a FIN alone CLOSE_WAIT: both a close.
    """
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        return error == errno.ECONNRESET
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] == _TCP_CLOSE
