"""TLS towards the SuT, client side: the options, the context, the handshake and what status shows.

The keeper (fdkeeper/keeper/tlslink.py holds its sessions) and the converter share this
configuration, so ``--tls-*`` means the same in every mode.
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from dataclasses import dataclass

from fdkeeper.address import Address, format_address
from fdkeeper.errors import FdkeeperError
from fdkeeper.keylog import set_keylog
from fdkeeper.sip.framing import HEADER_END, PING

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
    max_version: str | None = None  # sipp's -tls_version pins one version: min and max
    crl: str | None = None  # PEM CRL checked for the SuT's certificate (sipp's -tls_crl)
    keylog: str | None = None  # append the TLS secrets here (SSLKEYLOGFILE format), for Wireshark

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
            max_version=fields.get("tls_max", base.max_version),
            crl=fields.get("tls_crl", base.crl),
            keylog=fields.get("tls_keylog", base.keylog),
        )

    def as_fields(self) -> dict:
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
    elif options.ca:
        _load(context.load_verify_locations, options.ca, "--tls-ca")
    else:
        context.load_default_certs()
    if options.crl and not options.insecure:
        _load(context.load_verify_locations, options.crl, "-tls_crl")
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    if options.cert:
        _load(lambda cert: context.load_cert_chain(cert, options.key), options.cert, "--tls-cert/--tls-key")
    if options.keylog:
        set_keylog(context, options.keylog)
    return context


def _load(loader, path: str, option: str) -> None:
    try:
        loader(path)
    except FileNotFoundError:
        raise FdkeeperError(f"fdkeeper: {option} file {path} not found", "badrequest") from None
    except (ssl.SSLError, OSError) as error:
        raise FdkeeperError(f"fdkeeper: cannot load {option} from {path}: {error}", "badrequest") from None


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
        return context.wrap_socket(sock, server_hostname=server_hostname, do_handshake_on_connect=False)
    except ValueError as error:
        sock.close()
        raise FdkeeperError(f"fdkeeper: bad TLS server name {server_hostname!r}: {error}", "badrequest") from None
    except FdkeeperError:
        sock.close()
        raise


def past_our_finished(received: bytes) -> bool:
    """After our post-handshake ping: the pong (or a whole message) shows the server accepted us."""
    return received.lstrip(b"\r\n") == b"" or HEADER_END in received


def handshake_error(remote: Address, error: Exception, options: TlsOptions) -> FdkeeperError:
    return FdkeeperError(_handshake_text(remote, error, options), "refused")


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


def _handshake_text(remote: Address, error: Exception, options: TlsOptions) -> str:
    target = f"{format_address(remote)}/tls"
    if isinstance(error, ssl.SSLCertVerificationError):
        reason = (error.verify_message or str(error)).rstrip(".")
        return (
            f"fdkeeper: TLS handshake with the SuT at {target} failed: certificate verification: {reason}; "
            "check --tls-ca and --tls-sni (or --tls-insecure to skip verification)"
            + (_SIPP_DOES_NOT_VERIFY if not options.ca else "")
        )
    if _closed_during_handshake(error) and not options.cert:
        # A TLS 1.3 server that wants a client certificate checks it after its own Finished and
        # may close without an alert we get to read (it depends on timing and the Python build).
        return (
            f"fdkeeper: TLS handshake with the SuT at {target} failed: the SuT closed the connection during the "
            "handshake; if it wants a client certificate, pass --tls-cert and --tls-key (or sipp's -tls_cert and -tls_key)"
        )
    if isinstance(error, ssl.SSLError):
        reason = error.reason or str(error)
        hint = (
            "; the SuT wants a client certificate: pass --tls-cert and --tls-key (or sipp's -tls_cert and -tls_key)"
            if "CERTIFICATE_REQUIRED" in str(reason).upper() or "HANDSHAKE_FAILURE" in str(reason).upper()
            else ""
        )
        return f"fdkeeper: TLS handshake with the SuT at {target} failed: {str(reason).lower().replace('_', ' ')}{hint}"
    if isinstance(error, TimeoutError):
        return f"fdkeeper: TLS handshake with the SuT at {target} did not finish in time; is it a TLS port?"
    return f"fdkeeper: TLS handshake with the SuT at {target} failed: {error}"


def _closed_during_handshake(error: Exception) -> bool:
    """EOF or reset from the SuT before the handshake (and our late-alert check) completed."""
    if isinstance(error, (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError)):
        return True
    return isinstance(error, ssl.SSLError) and error.reason == "UNEXPECTED_EOF_WHILE_READING"


# sipp's own TLS verifies nothing unless given -tls_ca: say why a run that worked there fails here.
_SIPP_DOES_NOT_VERIFY = (
    "; unlike sipp, which verifies the SuT's certificate only when given -tls_ca, fdkeeper always does: "
    "pass -tls_ca FILE (or --tls-ca FILE) with the CA that signed it"
)


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
