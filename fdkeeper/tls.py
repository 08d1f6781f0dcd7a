"""TLS towards the SuT, terminated in the keeper.

A TLS session cannot move between processes (its keys and sequence numbers live in the
memory of the process that made it), so the keeper holds it and hands each sipp run one
end of a unix stream socketpair instead. ``TlsLink`` pumps between that pair and the TLS
connection and forwards only whole SIP messages (sipframe.py) in both directions: the SuT
never receives half a message from a run that died mid-write, a new run never starts
reading in the middle of one, and keep-alive CRLFs never reach sipp.
"""

from __future__ import annotations

import collections
import fcntl
import logging
import select
import socket
import ssl
import termios
import time
from dataclasses import dataclass

from fdkeeper.errors import FdkeeperError
from fdkeeper.protocol import Address, format_address
from fdkeeper.sip.framing import PING, FramingError, SipFramer

log = logging.getLogger("fdkeeper.tls")

# TLS 1.3 servers reject a client certificate after the client's handshake has finished:
# the alert arrives on the first read. Wait this long for it before calling a handshake good.
ALERT_GRACE = 1.0
READ_CHUNK = 256 * 1024


@dataclass(frozen=True)
class TlsOptions:
    ca: str | None = None
    insecure: bool = False
    cert: str | None = None
    key: str | None = None
    sni: str | None = None
    min_version: str | None = None

    @classmethod
    def from_fields(cls, fields: dict, defaults: TlsOptions | None = None) -> TlsOptions:
        """Options from a request's tls_* fields, each falling back to the keeper's defaults."""
        base = defaults or cls()
        return cls(
            ca=fields.get("tls_ca", base.ca),
            insecure=fields.get("tls_insecure", base.insecure),
            cert=fields.get("tls_cert", base.cert),
            key=fields.get("tls_key", base.key),
            sni=fields.get("tls_sni", base.sni),
            min_version=fields.get("tls_min", base.min_version),
        )

    def as_fields(self) -> dict:
        return {
            "tls_ca": self.ca,
            "tls_insecure": self.insecure or None,
            "tls_cert": self.cert,
            "tls_key": self.key,
            "tls_sni": self.sni,
            "tls_min": self.min_version,
        }


def client_context(options: TlsOptions) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3 if options.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    if options.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif options.ca:
        _load(context.load_verify_locations, options.ca, "--tls-ca")
    else:
        context.load_default_certs()
    if options.cert:
        _load(lambda cert: context.load_cert_chain(cert, options.key), options.cert, "--tls-cert/--tls-key")
    return context


def _load(loader, path: str, option: str) -> None:
    try:
        loader(path)
    except FileNotFoundError:
        raise FdkeeperError(f"fdkeeper: {option} file {path} not found", "badrequest") from None
    except (ssl.SSLError, OSError) as error:
        raise FdkeeperError(f"fdkeeper: cannot load {option} from {path}: {error}", "badrequest") from None


def handshake(sock: socket.socket, remote: Address, options: TlsOptions, timeout: float) -> tuple[ssl.SSLSocket, bytes]:
    """TLS client handshake on a connected socket; on failure close it and say why, in one line.

    Returns the TLS socket (non-blocking) and any bytes the SuT already sent.
    """
    context = client_context(options)
    # Verify against the SNI name when one is given, else against the address itself.
    server_hostname = options.sni or (None if options.insecure else remote[0])
    try:
        tls = context.wrap_socket(sock, server_hostname=server_hostname, do_handshake_on_connect=False)
    except ValueError as error:
        sock.close()
        raise FdkeeperError(f"fdkeeper: bad TLS server name {server_hostname!r}: {error}", "badrequest") from None
    try:
        tls.settimeout(timeout)
        tls.do_handshake()
        early = _catch_late_alert(tls)
        tls.settimeout(None)
        tls.setblocking(False)
    except (ssl.SSLError, OSError) as error:
        tls.close()
        raise FdkeeperError(_handshake_text(remote, error), "refused") from None
    return tls, early


def _catch_late_alert(tls: ssl.SSLSocket) -> bytes:
    """Make a TLS 1.3 rejection of our certificate surface now, not in the first run.

    The server processes our handshake Finished before anything after it, so an RFC 5626
    ping sent now is answered by a pong only if the server accepted us; a rejection arrives
    as an alert first. A SuT that does not answer pings costs ALERT_GRACE once per connection.
    Returns what the SuT sent besides the pong (to be framed for the first run).
    """
    received = b""
    deadline = time.monotonic() + ALERT_GRACE
    tls.setblocking(False)
    poller = select.poll()  # not select(): descriptors past 1024 are normal in a keeper
    poller.register(tls.fileno(), select.POLLIN)
    tls.send(PING)
    while (left := deadline - time.monotonic()) > 0:
        if not poller.poll(left * 1000):
            break
        try:
            data = tls.recv(READ_CHUNK)
        except ssl.SSLWantReadError:
            continue  # a session ticket, say: nothing for us yet
        if not data:
            raise ConnectionResetError("the SuT closed the connection right after the handshake")
        received += data
        if received.lstrip(b"\r\n") == b"" or b"\r\n\r\n" in received:
            break  # the pong (or a whole message): the server got past our Finished
    return received


def _handshake_text(remote: Address, error: Exception) -> str:
    target = f"{format_address(remote)}/tls"
    if isinstance(error, ssl.SSLCertVerificationError):
        reason = (error.verify_message or str(error)).rstrip(".")
        return (
            f"fdkeeper: TLS handshake with the SuT at {target} failed: certificate verification: {reason}; "
            "check --tls-ca and --tls-sni (or --tls-insecure to skip verification)"
        )
    if isinstance(error, ssl.SSLError):
        reason = error.reason or str(error)
        hint = (
            "; the SuT wants a client certificate: pass --tls-cert and --tls-key"
            if "CERTIFICATE_REQUIRED" in str(reason).upper() or "HANDSHAKE_FAILURE" in str(reason).upper()
            else ""
        )
        return f"fdkeeper: TLS handshake with the SuT at {target} failed: {str(reason).lower().replace('_', ' ')}{hint}"
    if isinstance(error, TimeoutError):
        return f"fdkeeper: TLS handshake with the SuT at {target} did not finish in time; is it a TLS port?"
    return f"fdkeeper: TLS handshake with the SuT at {target} failed: {error}"


def describe(tls: ssl.SSLSocket, options: TlsOptions) -> dict:
    """What `fdkeeper status` shows of a TLS connection."""
    return {
        "version": tls.version(),
        "cipher": (tls.cipher() or ("",))[0],
        "peer_subject": _peer_subject(tls),
        "sni": options.sni,
        "verified": not options.insecure,
    }


def _peer_subject(tls: ssl.SSLSocket) -> str:
    der = tls.getpeercert(binary_form=True)
    if not der:
        return ""
    try:
        from cryptography import x509

        return x509.load_der_x509_certificate(der).subject.rfc4514_string()
    except Exception:  # noqa: BLE001 - a display nicety, never a failure
        return ""


def queued_bytes(sock: socket.socket) -> int:
    buffer = bytearray(4)
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, buffer)
    return int.from_bytes(buffer, "little", signed=True)


class TlsLink:
    """One TLS connection to the SuT and the socketpair whose ``sipp_end`` runs are leased.

    The keeper's event loop calls ``on_tls_event``/``on_pair_event`` and asks ``wants()``
    which events to watch. Towards sipp, the lengths of the messages written into the pair
    are remembered until read, so that when a run ends the unread remainder of a message
    it had started can be dropped and the next run starts on a message boundary.
    """

    def __init__(self, tls: ssl.SSLSocket, options: TlsOptions, early: bytes = b"") -> None:
        self.tls = tls
        self.options = options
        self.sipp_end, self.keeper_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.keeper_end.setblocking(False)
        self.from_sut = SipFramer()
        self.from_sipp = SipFramer()
        self.to_sut = bytearray()
        self.to_sipp = bytearray()
        self.unread_lengths: collections.deque[int] = collections.deque()
        self.info = describe(tls, options)
        self.closed_reason = ""
        self.messages_to_sut = 0
        self.messages_to_sipp = 0
        self.dropped_bytes = 0
        self.ping_sent_at: float | None = None
        self.last_activity = time.monotonic()
        self.watched_tls = self.watched_pair = 0  # what the keeper's epoll watches now
        if early:
            self._queue_to_sipp(self.from_sut.feed(early))

    # -- the event loop's view

    def wants_tls(self) -> int:
        events = select.EPOLLRDHUP
        if len(self.to_sipp) < READ_CHUNK:  # back-pressure: stop reading while sipp lags
            events |= select.EPOLLIN
        if self.to_sut:
            events |= select.EPOLLOUT
        return events

    def wants_pair(self) -> int:
        return select.EPOLLIN | (select.EPOLLOUT if self.to_sipp else 0)

    def on_tls_event(self, mask: int) -> None:
        if mask & select.EPOLLOUT:
            self._flush_to_sut()
        if mask & (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR):
            self._read_tls()

    def on_pair_event(self, mask: int) -> None:
        if mask & select.EPOLLOUT:
            self._flush_to_sipp()
        if mask & select.EPOLLIN:
            self._read_pair()

    # -- SuT -> sipp

    def _read_tls(self) -> None:
        while not self.closed_reason:
            try:
                data = self.tls.recv(READ_CHUNK)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLWantWriteError:
                return
            except (ssl.SSLError, OSError) as error:
                self.closed_reason = f"the SuT's TLS connection failed: {error}"
                return
            if not data:
                self.closed_reason = "the SuT closed it: TLS close_notify or FIN"
                return
            self.last_activity = time.monotonic()
            try:
                messages = self.from_sut.feed(data)
            except FramingError as error:
                self.closed_reason = f"the SuT sent unframeable data: {error}"
                return
            if self.from_sut.keepalives:
                self.ping_sent_at = None  # a pong: the flow is alive
            self._queue_to_sipp(messages)
            if len(self.to_sipp) >= READ_CHUNK:
                return

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
        if not self.to_sipp:
            return
        try:
            sent = self.keeper_end.send(self.to_sipp, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        del self.to_sipp[:sent]

    # -- sipp -> SuT

    def _read_pair(self) -> None:
        try:
            data = self.keeper_end.recv(READ_CHUNK)
        except BlockingIOError:
            return
        if data:
            self.last_activity = time.monotonic()
            self._read_pair_data(data)

    def _flush_to_sut(self) -> None:
        while self.to_sut and not self.closed_reason:
            try:
                sent = self.tls.send(self.to_sut[:READ_CHUNK])
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                return
            except (ssl.SSLError, OSError) as error:
                self.closed_reason = f"the SuT's TLS connection failed: {error}"
                return
            del self.to_sut[:sent]

    # -- between runs

    def end_of_lease(self) -> None:
        """The run is gone: forward what it finished, drop what it did not, realign sipp's side."""
        while True:
            try:
                data = self.keeper_end.recv(READ_CHUNK)
            except BlockingIOError:
                break
            if not data:
                break
            self._read_pair_data(data)
        partial = self.from_sipp.discard()
        if partial:
            self.dropped_bytes += len(partial)
            log.warning("dropped %d bytes of a SIP message the ended run did not finish writing", len(partial))
        self._realign_sipp_side()

    def _read_pair_data(self, data: bytes) -> None:
        try:
            messages = self.from_sipp.feed(data)
        except FramingError as error:
            dropped = len(self.from_sipp.discard())
            self.dropped_bytes += dropped
            log.warning("dropped %d bytes from sipp that are not SIP: %s", dropped, error)
            return
        for message in messages:
            self.to_sut += message
        self.messages_to_sut += len(messages)
        self._flush_to_sut()

    def _forget_consumed(self) -> int:
        """Forget messages sipp has read whole; return how far it read into the next one."""
        in_pair = sum(self.unread_lengths) - len(self.to_sipp)
        consumed = in_pair - queued_bytes(self.sipp_end)
        while self.unread_lengths and self.unread_lengths[0] <= consumed:
            consumed -= self.unread_lengths.popleft()
        return consumed

    def _realign_sipp_side(self) -> None:
        """Drop the unread rest of a message the ended run had started to read."""
        consumed = self._forget_consumed()
        if consumed > 0 and self.unread_lengths:
            rest = self.unread_lengths.popleft() - consumed
            self.sipp_end.recv(rest, socket.MSG_DONTWAIT)
            self.dropped_bytes += rest
            log.warning("dropped the unread %d bytes of a message the ended run had started to read", rest)

    def send_ping(self) -> None:
        self.to_sut += PING
        self.ping_sent_at = time.monotonic()
        self._flush_to_sut()

    def idle(self) -> bool:
        return not self.to_sut and not self.to_sipp and not self.from_sipp.pending

    def close(self) -> None:
        for sock in (self.tls, self.keeper_end):
            try:
                sock.close()
            except OSError:
                pass
