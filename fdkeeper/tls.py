"""TLS towards the SuT, client side: the options, the context, the handshake and what status shows.

The keeper (fdkeeper/keeper/tlslink.py holds its sessions) and the converter share this
configuration, so ``--tls-*`` means the same in every mode. Both make their contexts on their
event loops, so every file an option names is opened without blocking or following a link and
read from memory (read_tls_file); OpenSSL never opens a path a user named.
"""

from __future__ import annotations

import hashlib
import os
import select
import socket
import ssl
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TypedDict

from fdkeeper.address import Address, format_address
from fdkeeper.errors import FdkeeperError
from fdkeeper.keylog import set_keylog
from fdkeeper.protocol import Request
from fdkeeper.sip.framing import HEADER_END, PING
from fdkeeper.statedir import open_named_file
from fdkeeper.textsafe import escape_controls

# TLS 1.3 servers reject a client certificate after the client's handshake has finished:
# the alert arrives on the first read. Wait this long for it before calling a handshake good.
ALERT_GRACE = 1.0
READ_CHUNK = 256 * 1024
# The option each file comes from, as its one-line error names it (fdkeeper's and sipp's spelling).
CA_OPTION = "--tls-ca (-tls_ca)"
CRL_OPTION = "-tls_crl"
CERT_OPTION = "--tls-cert (-tls_cert)"
CLIENT_CERT_HINT = "pass --tls-cert and --tls-key (or sipp's -tls_cert and -tls_key)"
KEY_OPTION = "--tls-key (-tls_key)"
# A whole trust store is a few hundred kB (Debian's: 0.2 MB); a file much larger is no TLS file.
MAX_TLS_FILE = 4 * 1024 * 1024


@dataclass(frozen=True)
class TlsOptions:
    ca: str | None = None
    insecure: bool = False
    cert: str | None = None
    key: str | None = None
    sni: str | None = None
    min_version: str | None = None
    max_version: str | None = None  # sipp's -tls_version pins one version: min and max
    crl: str | None = None  # PEM CRL checked for the SuT's certificate (sipp's -tls_crl)
    keylog: str | None = None  # append the TLS secrets here (SSLKEYLOGFILE format), for Wireshark

    @classmethod
    def from_request(cls, request: Request, defaults: TlsOptions | None = None) -> TlsOptions:
        """Options from a request's tls_* fields, each falling back to the keeper's defaults."""
        base = defaults or cls()

        def text(key: str, default: str | None) -> str | None:
            value = request.text(key)
            return default if value is None else value

        return cls(
            ca=text("tls_ca", base.ca),
            insecure=request.flag("tls_insecure") if "tls_insecure" in request.fields else base.insecure,
            cert=text("tls_cert", base.cert),
            key=text("tls_key", base.key),
            sni=text("tls_sni", base.sni),
            min_version=text("tls_min", base.min_version),
            max_version=text("tls_max", base.max_version),
            crl=text("tls_crl", base.crl),
            keylog=text("tls_keylog", base.keylog),
        )

    def as_fields(self) -> dict[str, object]:
        """The request fields (protocol.TLS_KEYS) that give these options; None: not given."""
        return {
            "tls_ca": self.ca,
            "tls_insecure": self.insecure or None,
            "tls_cert": self.cert,
            "tls_key": self.key,
            "tls_sni": self.sni,
            "tls_min": self.min_version,
            "tls_max": self.max_version,
            "tls_crl": self.crl,
            "tls_keylog": self.keylog,
        }


def client_context(options: TlsOptions) -> ssl.SSLContext:
    """The SSL context for ``options``, shared by every connection opened with the same options
    while the files they name hold the same bytes (each is read again, without blocking:
    read_tls_file). A context costs OpenSSL 14 kB and 0.3 ms to make, 19 kB and 0.8 ms with a CA
    file, 850 kB and 35 ms with the system's trust store, and every TLS socket keeps its own alive:
    one per connection was most of an idle TLS connection's memory. A key log is never shared (its
    file is opened per context)."""
    files = _TlsFiles.read(options)
    if options.keylog:
        return _new_context(options, files)
    key = (options, files.digest())
    context = _SHARED_CONTEXTS.pop(key, None) or _new_context(options, files)
    _SHARED_CONTEXTS[key] = context  # the most recently used last
    while len(_SHARED_CONTEXTS) > MAX_SHARED_CONTEXTS:
        del _SHARED_CONTEXTS[next(iter(_SHARED_CONTEXTS))]  # its connections keep it alive
    return context


# Contexts kept for reuse, by options and the digest of their files' bytes, least recently used
# first; distinct --tls-* combinations in one keeper are few (one per SuT and client identity).
MAX_SHARED_CONTEXTS = 32
_SHARED_CONTEXTS: dict[tuple[TlsOptions, bytes], ssl.SSLContext] = {}


@dataclass(frozen=True)
class _TlsFiles:
    """The bytes of the files ``options`` name that the context loads (none is read when unused)."""

    ca: bytes | None = None
    crl: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None

    @classmethod
    def read(cls, options: TlsOptions) -> _TlsFiles:
        verifying = not options.insecure
        return cls(
            ca=read_tls_file(options.ca, CA_OPTION) if verifying and options.ca else None,
            crl=read_tls_file(options.crl, CRL_OPTION) if verifying and options.crl else None,
            cert=read_tls_file(options.cert, CERT_OPTION) if options.cert else None,
            key=read_tls_file(options.key, KEY_OPTION) if options.cert and options.key else None,
        )

    def digest(self) -> bytes:
        hashed = hashlib.sha256()
        for data in (self.ca, self.crl, self.cert, self.key):
            hashed.update(b"-" if data is None else hashlib.sha256(data).digest())
        return hashed.digest()


def _new_context(options: TlsOptions, files: _TlsFiles) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # Some Python builds (Debian's 3.11) set OP_IGNORE_UNEXPECTED_EOF by default, which makes a
    # SuT that closes without close_notify look like a clean close: we want to tell them apart.
    context.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    context.minimum_version = ssl.TLSVersion.TLSv1_3 if options.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    if options.max_version == "1.2":
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    if options.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif options.ca and files.ca is not None:
        _load_verify_data(context, files.ca, options.ca, CA_OPTION)
    else:
        context.load_default_certs()
    if options.crl and files.crl is not None:
        _load_verify_data(context, files.crl, options.crl, CRL_OPTION)
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    if options.cert and files.cert is not None:
        _load_cert_chain(context, files.cert, files.key, options.cert, options.key)
    if options.keylog:
        set_keylog(context, options.keylog)
    return context


# ---------------------------------------------------------------- the files a request names
#
# A request names them, often as root and in /tmp, where another user may have put a FIFO, a
# device or a link: OpenSSL would open such a path itself, blocking the keeper's loop (a FIFO
# with no writer) or following the link. So fdkeeper opens each file (statedir.open_named_file:
# non-blocking, O_NOFOLLOW, a regular file only), reads it whole, bounded, and hands OpenSSL a
# memfd holding those bytes: what OpenSSL parses is exactly what was checked and read.


def read_tls_file(path: str, option: str) -> bytes:
    """The whole of a CA, CRL, certificate or key file named with ``option``: a regular file,
    at most MAX_TLS_FILE bytes; else one line naming the option and the path (badrequest)."""
    fd, info = open_named_file(path, os.O_RDONLY, option)
    try:
        data = _read_at_most(fd, MAX_TLS_FILE + 1) if info.st_size <= MAX_TLS_FILE else b""
    finally:
        os.close(fd)
    size = max(info.st_size, len(data))
    if size > MAX_TLS_FILE:
        raise FdkeeperError(
            f"fdkeeper: {option} {escape_controls(path)} is {size} bytes, more than a TLS file fdkeeper reads "
            f"({MAX_TLS_FILE // (1024 * 1024)} MiB at most); name the PEM file itself",
            "badrequest",
        )
    return data


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while total < limit:
        chunk = os.read(fd, limit - total)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


@contextmanager
def _in_memory(data: bytes, name: str) -> Iterator[str]:
    """A path by which OpenSSL (which loads certificates, keys and CRLs only by path) reads
    ``data``: a memfd of this process, gone when the block ends."""
    fd = os.memfd_create(f"fdkeeper-{name}", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _load_verify_data(context: ssl.SSLContext, data: bytes, path: str, option: str) -> None:
    """CAs (or a CRL) read from ``path``, as load_verify_locations(cafile=path) would take them:
    PEM certificates and CRLs, text around them ignored."""
    with _in_memory(data, "verify") as memory:
        try:
            context.load_verify_locations(memory)
        except (ssl.SSLError, OSError) as error:
            raise _cannot_load(option, path, error) from None


def _load_cert_chain(
    context: ssl.SSLContext, cert_data: bytes, key_data: bytes | None, cert: str, key: str | None
) -> None:
    """The client certificate (and its key, or the key in the same file), read from ``cert`` and ``key``."""
    option = f"{CERT_OPTION} and {KEY_OPTION}" if key else CERT_OPTION
    named = f"{cert} and {key}" if key else cert
    with ExitStack() as files:
        cert_memory = files.enter_context(_in_memory(cert_data, "cert"))
        key_memory = files.enter_context(_in_memory(key_data, "key")) if key_data is not None else None
        try:
            # A passphrase would be asked for on the keeper's terminal, on its loop: refuse instead.
            context.load_cert_chain(cert_memory, key_memory, password=_no_passphrase)
        except (ssl.SSLError, OSError, _Encrypted) as error:
            raise _cannot_load(option, named, error) from None


class _Encrypted(Exception):
    def __str__(self) -> str:
        return "the key is encrypted; give fdkeeper a key without a passphrase"


def _no_passphrase() -> bytes:
    raise _Encrypted()


def _cannot_load(option: str, path: str, error: Exception) -> FdkeeperError:
    reason = str(error)
    if isinstance(error, ssl.SSLError) and error.reason:
        reason = error.reason.lower().replace("_", " ")  # NO_CERTIFICATE_OR_CRL_FOUND: no certificate or crl found
    return FdkeeperError(f"fdkeeper: {option} {escape_controls(path)} cannot be loaded: {reason}", "badrequest")


def handshake(sock: socket.socket, remote: Address, options: TlsOptions, timeout: float) -> tuple[ssl.SSLSocket, bytes]:
    """TLS client handshake on a connected socket, blocking (the converter's; the keeper drives
    its own from events: keeper/opening.py); on failure close it and say why, in one line.

    Returns the TLS socket (non-blocking) and any bytes the SuT already sent.
    """
    tls = wrap_client(sock, remote, options)
    try:
        tls.settimeout(timeout)
        tls.do_handshake()
        early = _catch_late_alert(tls)
        tls.settimeout(None)
        tls.setblocking(False)
    except (ssl.SSLError, OSError) as error:
        tls.close()
        raise handshake_error(remote, error, options) from None
    return tls, early


def wrap_client(sock: socket.socket, remote: Address, options: TlsOptions) -> ssl.SSLSocket:
    """``sock`` wrapped for a client handshake not yet done; closes it and raises if impossible."""
    # Verify against the SNI name when one is given, else against the address itself.
    server_hostname = options.sni or (None if options.insecure else remote[0])
    try:
        context = client_context(options)
    except FdkeeperError:
        sock.close()
        raise
    try:
        return context.wrap_socket(sock, server_hostname=server_hostname, do_handshake_on_connect=False)
    except (ValueError, TypeError) as error:  # TypeError: a NUL in the name
        sock.close()
        raise FdkeeperError(
            f"fdkeeper: bad TLS server name (--tls-sni) {server_hostname!r}: {error}", "badrequest"
        ) from None


def past_our_finished(received: bytes) -> bool:
    """After our post-handshake ping: the pong (or a whole message) shows the server accepted us."""
    return received.lstrip(b"\r\n") == b"" or HEADER_END in received


def handshake_error(remote: Address, error: Exception, options: TlsOptions, transport: str = "tls") -> FdkeeperError:
    """The one line for a failed handshake with the SuT at ``remote`` over ``transport`` (tls, wss)."""
    return FdkeeperError(_handshake_text(remote, error, options, transport), "refused")


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
        if past_our_finished(received):
            break  # the pong (or a whole message): the server got past our Finished
    return received


def _handshake_text(remote: Address, error: Exception, options: TlsOptions, transport: str) -> str:
    target = f"{format_address(remote)}/{transport}"
    if isinstance(error, ssl.SSLCertVerificationError):
        reason = (error.verify_message or str(error)).rstrip(".")
        return (
            f"fdkeeper: TLS handshake with the SuT at {target} failed: certificate verification: {reason}; "
            "check --tls-ca and --tls-sni (or --tls-insecure to skip verification)"
            + (_SIPP_DOES_NOT_VERIFY if not options.ca else "")
        )
    if closed_during_handshake(error) and not options.cert:
        # A TLS 1.3 server that wants a client certificate checks it after its own Finished and
        # may close without an alert we get to read (it depends on timing and the Python build).
        return (
            f"fdkeeper: TLS handshake with the SuT at {target} failed: the SuT closed the connection during the "
            f"handshake; if it wants a client certificate, {CLIENT_CERT_HINT}"
        )
    if isinstance(error, ssl.SSLError):
        reason = error.reason or str(error)
        hint = (
            f"; the SuT wants a client certificate: {CLIENT_CERT_HINT}"
            if "CERTIFICATE_REQUIRED" in str(reason).upper() or "HANDSHAKE_FAILURE" in str(reason).upper()
            else ""
        )
        return f"fdkeeper: TLS handshake with the SuT at {target} failed: {str(reason).lower().replace('_', ' ')}{hint}"
    if isinstance(error, TimeoutError):
        return f"fdkeeper: TLS handshake with the SuT at {target} did not finish in time; is it a TLS port?"
    return f"fdkeeper: TLS handshake with the SuT at {target} failed: {error}"


def closed_during_handshake(error: Exception) -> bool:
    """EOF or reset from the SuT before the handshake (and our late-alert check) completed."""
    if isinstance(error, (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError)):
        return True
    return isinstance(error, ssl.SSLError) and error.reason == "UNEXPECTED_EOF_WHILE_READING"


# sipp's own TLS verifies nothing unless given -tls_ca: say why a run that worked there fails here.
_SIPP_DOES_NOT_VERIFY = (
    "; unlike sipp, which verifies the SuT's certificate only when given -tls_ca, fdkeeper always does: "
    "pass -tls_ca FILE (or --tls-ca FILE) with the CA that signed it"
)


class TlsInfo(TypedDict):
    """What `fdkeeper status` shows of a TLS session."""

    version: str | None
    cipher: str
    peer_subject: str
    sni: str | None
    verified: bool


def describe(tls: ssl.SSLSocket, options: TlsOptions) -> TlsInfo:
    """What `fdkeeper status` shows of a TLS connection."""
    version = tls.version()
    # Interned: the same few strings in every kept connection's status, held once.
    return {
        "version": sys.intern(version) if version else None,
        "cipher": sys.intern((tls.cipher() or ("",))[0]),
        "peer_subject": sys.intern(_peer_subject(tls)),
        "sni": sys.intern(options.sni) if options.sni else None,
        "verified": not options.insecure,
    }


def _peer_subject(tls: ssl.SSLSocket) -> str:
    der = tls.getpeercert(binary_form=True)
    if not der:
        return ""
    try:
        from cryptography import x509

        return x509.load_der_x509_certificate(der).subject.rfc4514_string()
    except Exception:
        return ""
