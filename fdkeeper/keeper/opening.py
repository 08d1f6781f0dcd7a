"""Opening connections to the SuT without ever blocking the keeper's loop.

A connect, a TLS handshake and the short wait after it (tls.past_our_finished), and for ws/wss
the WebSocket upgrade (fdkeeper/websocket.py: the request sent, the answer read and checked) are
steps of an ``Opening`` driven by the shared Reactor: a non-blocking connect finished on
EPOLLOUT, a handshake stepped on SSLWantRead/SSLWantWrite, each bounded by a timer. The control
request that needs the connection stays pending meanwhile (``Pending``), other clients are served, and
the request is answered when the open completes or fails. The same ``Pending`` lets a lease
wait for a keep-alive pong (health.py) without blocking either.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import ssl
from collections.abc import Callable
from typing import NoReturn, Protocol

from fdkeeper.address import Address, format_address
from fdkeeper.errors import FdkeeperError
from fdkeeper.keeper.connection import ConnectionKey, new_descriptors
from fdkeeper.keeper.control import ControlClient
from fdkeeper.loop import Reactor, Timer
from fdkeeper.sip.framing import PING
from fdkeeper.tcp import closed_at_once_error, connect_error, new_tcp_socket
from fdkeeper.tls import (
    ALERT_GRACE,
    CLIENT_CERT_HINT,
    READ_CHUNK,
    TlsOptions,
    closed_during_handshake,
    handshake_error,
    past_our_finished,
    wrap_client,
)
from fdkeeper.websocket import (
    MAX_HANDSHAKE_ANSWER,
    WsHandshake,
    WsHandshakeError,
    WsOptions,
    handshake_request,
    new_key,
    read_handshake_answer,
)

log = logging.getLogger("fdkeeper.keeper")

MAX_REACHED = 4096  # SuT addresses remembered as reached (Opener.reached)
Resume = Callable[[FdkeeperError | None], None]  # None: ready, ask again; else the failure
# Keeps the connected (TLS) socket, the bytes already read from it (for ws/wss: after the upgrade's
# answer) and the WebSocket handshake (None for tcp/tls); what it returns is not used.
Opened = Callable[[socket.socket, bytes, WsHandshake | None], object]


class Done(Protocol):
    """How an Opening ends: a socket (its early bytes, its WebSocket handshake) or an error, never both."""

    def __call__(
        self,
        sock: socket.socket | None,
        early: bytes,
        error: FdkeeperError | None,
        websocket: WsHandshake | None = None,
    ) -> None: ...


class Pending(FdkeeperError):
    """A request that cannot be answered yet; ``then(resume)`` asks to be told when it can.

    Code "pending": never "busy", which would make a PREPARE with wait= a waiter instead.
    """

    def __init__(self, what: str) -> None:
        super().__init__(f"fdkeeper: {what} is still in progress; try again", "pending")
        self.resumes: list[Resume] = []
        self.failure: FdkeeperError | None = None

    def then(self, resume: Resume) -> None:
        self.resumes.append(resume)

    def settle(self, error: FdkeeperError | None = None) -> None:
        self.failure = error
        resumes, self.resumes = self.resumes, []
        for resume in resumes:
            resume(error)


def resume_request(client: ControlClient, retry: Callable[[], None], fail: Callable[[FdkeeperError], None]) -> Resume:
    """What a pending control request does when it is ready: ask again, or report the failure.

    A client that went away meanwhile is skipped: its descriptor number may be another's now.
    """

    def resume(error: FdkeeperError | None) -> None:
        if client.fileno() < 0:
            return
        if error is None:
            retry()
        else:
            fail(error)

    return resume


class Opener:
    """The opens in progress, one per connection key: a second request for it joins the first."""

    def __init__(self, reactor: Reactor, timeout: float) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self.in_progress: dict[ConnectionKey, Pending] = {}
        # SuT addresses this keeper has connected to: a failure there later is news (a limit
        # reached, a SuT gone), said so. Bounded: past it, failures read as first ones.
        self.reached: set[Address] = set()

    def open(
        self,
        key: ConnectionKey,
        local: Address | None,
        options: TlsOptions | None,
        opened: Opened,
        websocket: WsOptions | None = None,
    ) -> NoReturn:
        """Start opening ``key``'s connection (or join its open); always raises Pending.
        ``options``: TLS (tls, wss); ``websocket``: the upgrade's options (ws, wss)."""
        pending = self.in_progress.get(key)
        if pending is None:
            remote = key[0]
            pending = Pending(f"opening the connection to {format_address(remote)}")
            self.in_progress[key] = pending

            def done(
                sock: socket.socket | None,
                early: bytes,
                error: FdkeeperError | None,
                websocket: WsHandshake | None = None,
            ) -> None:
                self.in_progress.pop(key, None)  # twice when keeping it faulted (Opening._on_fault)
                if sock is not None:  # done gives a socket or an error, never both
                    if len(self.reached) < MAX_REACHED:
                        self.reached.add(remote)
                    try:
                        opened(sock, early, websocket)
                    except FdkeeperError as failure:  # out of descriptors for its socketpair, say
                        sock.close()
                        error = failure
                pending.settle(error)

            Opening(self.reactor, remote, local, options, self.timeout, done, websocket, remote in self.reached).start()
            if pending.failure is not None:  # failed at once (a bad -i/-p): no need to wait
                raise pending.failure
        raise pending


class Opening:
    """One connect (and TLS handshake, and WebSocket upgrade) in progress; ``done(sock, early,
    error, websocket)`` ends it."""

    def __init__(
        self,
        reactor: Reactor,
        remote: Address,
        local: Address | None,
        options: TlsOptions | None,
        timeout: float,
        done: Done,
        websocket: WsOptions | None = None,
        reached: bool = False,
    ) -> None:
        self.reactor, self.remote, self.local, self.options = reactor, remote, local, options
        self.timeout = timeout
        self.done = done
        self.websocket = websocket
        self.sock: socket.socket | None = None
        self.step: Callable[[int], None] = self._connected
        self.timer: Timer | None = None
        self.received = b""
        self.upgrade = _Upgrade()  # the WebSocket upgrade's state (ws, wss)
        self.reached = reached  # the keeper connected to this SuT before (Opener.reached)

    def start(self) -> None:
        try:
            sock = new_descriptors(
                f"open a socket for {format_address(self.remote)}", lambda: new_tcp_socket(self.remote, self.local)
            )
        except FdkeeperError as error:
            self.done(None, b"", error)
            return
        self.sock = sock
        sock.setblocking(False)
        code = sock.connect_ex(self.remote)
        if code not in (0, errno.EINPROGRESS):
            self._fail(
                connect_error(self.remote, self.local, self.timeout, OSError(code, _strerror(code)), self.reached)
            )
            return
        self.reactor.watch(sock.fileno(), select.EPOLLOUT, lambda mask: self.step(mask), on_fault=self._on_fault)
        self._deadline(self.timeout, self._connect_timed_out)

    # ---------------------------------------------------------------- steps

    def _connected(self, _mask: int) -> None:
        sock = self._socket()
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._fail(
                connect_error(self.remote, self.local, self.timeout, OSError(code, _strerror(code)), self.reached)
            )
            return
        if self.options is None and self.websocket is not None:
            self._start_upgrade()
            return
        if self.options is None:
            sock.setblocking(True)  # as a fresh socket: sipp sets the flags it wants
            self._finish()
            return
        self.reactor.unwatch(sock.fileno())
        try:
            tls = wrap_client(sock, self.remote, self.options)
        except FdkeeperError as error:
            self.sock = None
            self._fail(error)
            return
        self.sock = tls
        self.reactor.watch(tls.fileno(), select.EPOLLOUT, lambda mask: self.step(mask), on_fault=self._on_fault)
        self.step = self._handshake
        self._deadline(self.timeout, self._handshake_timed_out)
        self._handshake(0)

    def _handshake(self, _mask: int) -> None:
        tls, options = self._tls()
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            self.reactor.rewatch(tls.fileno(), select.EPOLLIN)
            return
        except ssl.SSLWantWriteError:
            self.reactor.rewatch(tls.fileno(), select.EPOLLOUT)
            return
        except (ssl.SSLError, OSError) as error:
            if self.reached and closed_during_handshake(error):  # how a SuT at its connection limit answers
                # A run without the client certificate an earlier run had gets the same close.
                otherwise = "" if options.cert else f"if it wants a client certificate, {CLIENT_CERT_HINT}"
                self._fail(closed_at_once_error(f"{format_address(self.remote)}/{self._transport()}", otherwise))
            else:
                self._fail(handshake_error(self.remote, error, options, self._transport()))
            return
        if self.websocket is not None:
            # No SIP ping here: it would be the start of the HTTP request. A late alert (our
            # certificate refused) surfaces when the upgrade's answer is read instead.
            self._start_upgrade()
            return
        # A TLS 1.3 server rejects our certificate after its Finished: ping and wait briefly for
        # the pong (or an alert) so that the rejection surfaces now (see tls._catch_late_alert).
        try:
            tls.send(PING)
        except (ssl.SSLError, OSError) as error:
            self._fail(handshake_error(self.remote, error, options, self._transport()))
            return
        self.step = self._after_handshake
        self.reactor.rewatch(tls.fileno(), select.EPOLLIN)
        self._deadline(ALERT_GRACE, self._finish)

    def _after_handshake(self, _mask: int) -> None:
        tls, options = self._tls()
        while True:
            try:
                data = tls.recv(READ_CHUNK)
            except ssl.SSLWantReadError:
                return  # a session ticket, say: nothing for us yet
            except (ssl.SSLError, OSError) as error:
                self._fail(handshake_error(self.remote, error, options, self._transport()))
                return
            if not data:
                self._fail(
                    handshake_error(
                        self.remote, ConnectionResetError("the SuT closed it right after the handshake"), options
                    )
                )
                return
            self.received += data
            if past_our_finished(self.received):
                self._finish()
                return

    # ---------------------------------------------------------------- the WebSocket upgrade

    def _start_upgrade(self) -> None:
        """Send the HTTP Upgrade (RFC 6455 4.1), then read the answer: a timer of its own."""
        assert self.websocket is not None, "a WebSocket upgrade on a tcp/tls open"
        self.upgrade.key = new_key()
        self.upgrade.unsent = handshake_request(self._host_header(), self.websocket, self.upgrade.key)
        self.step = self._send_upgrade
        self._deadline(self.timeout, self._upgrade_timed_out)
        self._send_upgrade(0)

    def _host_header(self) -> str:
        """Host: the TLS server name when one is sent, else the address; with the port."""
        if self.options is not None and self.options.sni:
            return f"{self.options.sni}:{self.remote[1]}"
        return format_address(self.remote)

    def _send_upgrade(self, _mask: int) -> None:
        sock, upgrade = self._socket(), self.upgrade
        while upgrade.unsent:
            try:
                sent = sock.send(upgrade.unsent)
            except (BlockingIOError, ssl.SSLWantWriteError):
                self.reactor.rewatch(sock.fileno(), select.EPOLLOUT)
                return
            except ssl.SSLWantReadError:
                self.reactor.rewatch(sock.fileno(), select.EPOLLIN)
                return
            except (ssl.SSLError, OSError) as error:
                self._fail(self._upgrade_error(error))
                return
            upgrade.unsent = upgrade.unsent[sent:]
        self.step = self._read_answer
        self.reactor.rewatch(sock.fileno(), select.EPOLLIN)

    def _read_answer(self, _mask: int) -> None:
        """Read the server's answer until its blank line: at most MAX_HANDSHAKE_ANSWER bytes of
        it are held before read_handshake_answer refuses, plus one read's worth."""
        sock, upgrade = self._socket(), self.upgrade
        assert self.websocket is not None, "a WebSocket upgrade on a tcp/tls open"
        while True:
            try:
                data = sock.recv(MAX_HANDSHAKE_ANSWER)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return  # SSLWantWrite: a renegotiation, rare; the next readiness goes on
            except (ssl.SSLError, OSError) as error:
                self._fail(self._upgrade_error(error))
                return
            if not data:
                self._fail(self._upgrade_error(EOFError()))
                return
            upgrade.answer += data
            try:
                answered = read_handshake_answer(upgrade.answer, upgrade.key, self.websocket, self._where())
            except WsHandshakeError as error:
                self._fail(error)
                return
            if answered is not None:
                handshake, early = answered
                self.received = early + _pending_tls(sock)
                self._finish(handshake)
                return

    def _transport(self) -> str:
        """What the SuT is spoken to with, as errors name it: tls or wss (a TLS step), ws."""
        if self.websocket is None:
            return "tls"
        return "wss" if self.options is not None else "ws"

    def _where(self) -> str:
        return f"{format_address(self.remote)}/{self._transport()}"

    def _upgrade_error(self, error: Exception) -> FdkeeperError:
        """The upgrade failed on the wire: a TLS alert (over wss, our certificate refused after
        the handshake, say) is the TLS handshake's error; an end is the WebSocket server's."""
        if self.options is not None and isinstance(error, ssl.SSLError) and not _closed(error):
            return handshake_error(self.remote, error, self.options, self._transport())
        certificate = self.options is not None and not self.options.cert
        return FdkeeperError(
            f"fdkeeper: the SuT at {self._where()} closed the connection during the WebSocket handshake"
            f" ({_reason(error)}); check that it serves WebSocket there and --ws-path"
            + ("; if it wants a client certificate, pass --tls-cert and --tls-key" if certificate else ""),
            "refused",
        )

    def _upgrade_timed_out(self) -> None:
        self._fail(
            FdkeeperError(
                f"fdkeeper: the WebSocket handshake with the SuT at {self._where()} got no answer within "
                f"{self.timeout:g} s; check that it serves WebSocket there (or raise --connect-timeout)",
                "timeout",
            )
        )

    # ---------------------------------------------------------------- endings

    def _connect_timed_out(self) -> None:
        self._fail(connect_error(self.remote, self.local, self.timeout, TimeoutError()))

    def _handshake_timed_out(self) -> None:
        self._fail(handshake_error(self.remote, TimeoutError(), self._tls()[1], self._transport()))

    def _socket(self) -> socket.socket:
        """The socket being connected; only steps run, and they run only while there is one."""
        assert self.sock is not None, "an Opening step ran after its open ended"
        return self.sock

    def _tls(self) -> tuple[ssl.SSLSocket, TlsOptions]:
        """The TLS socket being hand-shaken and its options: the TLS steps' own."""
        sock = self._socket()
        assert isinstance(sock, ssl.SSLSocket) and self.options is not None, "a TLS step ran on a TCP open"
        return sock, self.options

    def _deadline(self, delay: float, callback: Callable[[], None]) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.reactor.call_later(delay, callback, on_fault=self._on_fault)

    def _stop_watching(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.sock is not None:
            self.reactor.unwatch(self.sock.fileno())

    def _finish(self, websocket: WsHandshake | None = None) -> None:
        self._stop_watching()
        sock, self.sock = self.sock, None  # the pool's from here: a fault keeping it does not close it
        self.done(sock, self.received, None, websocket)

    def _fail(self, error: FdkeeperError) -> None:
        self._stop_watching()
        if self.sock is not None:
            self.sock.close()
        log.info("%s", error)
        self.done(None, b"", error)

    def _on_fault(self, error: Exception) -> None:
        """A defect in a step or in keeping the opened connection (the Reactor logged it): this
        open fails with its reason named, its request is answered, the keeper goes on."""
        self._fail(
            FdkeeperError(
                f"fdkeeper: internal error opening the connection to {format_address(self.remote)} "
                f"({type(error).__name__}); see the keeper log",
                "internal",
            )
        )


class _Upgrade:
    """The WebSocket upgrade of an Opening: its key, what of the request is still to send, the
    answer read so far."""

    def __init__(self) -> None:
        self.key = ""
        self.unsent = b""
        self.answer = b""


def _pending_tls(sock: socket.socket) -> bytes:
    """What OpenSSL already decrypted past the answer: the socket is not readable for it, so the
    link, woken by readiness, would not read it before the SuT sends more."""
    if not isinstance(sock, ssl.SSLSocket):
        return b""
    data = b""
    while sock.pending():
        try:
            data += sock.recv(sock.pending())
        except (ssl.SSLError, OSError):
            break  # the link meets the same error on its first read
    return data


def _closed(error: ssl.SSLError) -> bool:
    """An SSLError that only says the SuT ended the connection (no alert to report)."""
    return (
        isinstance(error, (ssl.SSLEOFError, ssl.SSLZeroReturnError)) or error.reason == "UNEXPECTED_EOF_WHILE_READING"
    )


def _reason(error: Exception) -> str:
    """How the SuT ended it: a FIN (TLS: with or without close_notify), or the errno (ECONNRESET)."""
    if isinstance(error, ssl.SSLError) or not isinstance(error, OSError) or error.errno is None:
        return "FIN"  # SSLError's errno is OpenSSL's; only EOF-like ones come here
    return errno.errorcode.get(error.errno, str(error.errno))


def _strerror(code: int) -> str:
    return os.strerror(code)
