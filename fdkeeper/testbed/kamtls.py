"""TLS on the Kamailio side of the testbed: `KamailioTls` writes an instance's tls.cfg,
and the instance's log tells which handshakes happened.

Not to be confused with fdkeeper.tls.TlsOptions, the keeper's and converter's client side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from fdkeeper.testbed import configs

if TYPE_CHECKING:
    from fdkeeper.testbed.pki import TestPki


@dataclass(frozen=True)
class KamailioTls:
    """TLS for a Kamailio instance (SuT or converter): its own tls.cfg.

    cert/key: this instance's certificate (PEM), presented as TLS server and,
    unless client_cert/client_key are given, as TLS client too.
    ca: the `ca_list` (PEM) that peers' certificates are verified against.
    require_client_cert: server side asks for a client certificate and
    refuses the handshake without a valid one (verify_certificate +
    require_certificate = yes; needs `ca`). verify_client_cert: verify a
    client certificate when one is sent, without requiring one (defaults to
    require_client_cert).
    verify_server_cert: client side ([client:default], the converter towards
    the SuT) verifies the server's chain against `ca`. Kamailio 5.6 checks
    the chain only, not the name.
    send_close_notify: tls modparam send_close_notify: a TLS connection that
    Kamailio closes gets a close_notify alert before the FIN (default off in
    Kamailio; on here so close_connections() closes cleanly).
    method: the `method` of both sections ("TLSv1.2+": 1.2 or 1.3).
    """

    cert: Path
    key: Path
    ca: Path | None = None
    require_client_cert: bool = False
    verify_client_cert: bool | None = None
    verify_server_cert: bool = False
    client_cert: Path | None = None
    client_key: Path | None = None
    send_close_notify: bool = True
    method: str = "TLSv1.2+"

    @classmethod
    def server(cls, pki: TestPki, *, require_client_cert: bool = False, **options: Any) -> KamailioTls:
        """The SuT's side of a fdkeeper.testbed.pki.TestPki."""
        return cls(
            cert=pki.server_cert, key=pki.server_key, ca=pki.ca_cert, require_client_cert=require_client_cert, **options
        )

    @classmethod
    def client(cls, pki: TestPki, *, verify_server_cert: bool = True, **options: Any) -> KamailioTls:
        """A client of the SuT (the converter) with the TestPki's client cert."""
        return cls(
            cert=pki.client_cert, key=pki.client_key, ca=pki.ca_cert, verify_server_cert=verify_server_cert, **options
        )

    def __post_init__(self) -> None:
        wants_ca = self.require_client_cert or self.verify_client_cert or self.verify_server_cert
        if wants_ca and self.ca is None:
            raise ValueError("KamailioTls: verifying peers needs ca=")

    def config_text(self) -> str:
        """The tls.cfg (Kamailio's own INI-like format)."""
        verify_client = self.require_client_cert if self.verify_client_cert is None else self.verify_client_cert
        return configs.render(
            "tls-profiles.cfg",
            method=self.method,
            verify_client_cert=_yes(verify_client),
            require_client_cert=_yes(self.require_client_cert),
            verify_server_cert=_yes(self.verify_server_cert),
            cert=_absolute(self.cert),
            key=_absolute(self.key),
            client_cert=_absolute(self.client_cert or self.cert),
            client_key=_absolute(self.client_key or self.key),
            ca_line=f"ca_list = {_absolute(self.ca)}" if self.ca else "",
        )

    def listen_config(self, cfg_host: str, tls_port: int, tls_cfg: Path, lifetime: int) -> str:
        """The global-section lines of a TLS listener that uses tls.cfg at `tls_cfg`."""
        return configs.render(
            "tls-listen.cfg",
            host=cfg_host,
            tls_port=tls_port,
            tls_cfg=tls_cfg,
            send_close_notify=int(self.send_close_notify),
            tcp_lifetime=lifetime,
        )


def _yes(flag: bool | None) -> str:
    return "yes" if flag else "no"


def _absolute(path: Path) -> Path:
    return Path(path).resolve()


_HANDSHAKE = re.compile(
    r"tls_(?P<dir>accept|connect): new connection (?:from|to) (?P<peer>\S+) using "
    r"(?P<version>\S+) (?P<cipher>\S+)"
)
_PEER_SUBJECT = re.compile(
    r"tls_(?:accept|connect): (?:client|server) "
    r"certificate subject:\s*(.*)$"
)
_TLS_ERROR = re.compile(r"tls_err_ret\(\): (.*)$", re.M)


class TlsHandshake(TypedDict):
    """One TLS handshake a Kamailio log reports: see parse_tls_handshakes."""

    direction: str
    peer: str
    peer_port: int
    version: str
    cipher: str
    client_cert: bool | None
    peer_subject: str | None


def parse_tls_handshakes(log_text: str) -> list[TlsHandshake]:
    """The TLS handshakes a Kamailio log (tls_log=2) reports, oldest first.

    One dict per handshake: direction ("in": a client connected to us, "out":
    we connected), peer ("ip:port"), peer_port, version (e.g. "TLSv1.3"),
    cipher, client_cert (for "in": True when the client presented a
    certificate, False when not) and peer_subject (the peer certificate's
    subject, e.g. "/O=fdkeeper tests/CN=alice.fdkeeper.test", or None).
    """
    result: list[TlsHandshake] = []
    for line in log_text.splitlines():
        match = _HANDSHAKE.search(line)
        if match:
            result.append(
                {
                    "direction": "in" if match.group("dir") == "accept" else "out",
                    "peer": match.group("peer"),
                    "peer_port": int(match.group("peer").rsplit(":", 1)[1]),
                    "version": match.group("version"),
                    "cipher": match.group("cipher"),
                    "client_cert": None,
                    "peer_subject": None,
                }
            )
        elif result:
            _note_peer_certificate(result[-1], line)
    return result


def _note_peer_certificate(handshake: TlsHandshake, line: str) -> None:
    """Fold a log line that follows a handshake line into its dict."""
    if "client did not present a certificate" in line:
        handshake["client_cert"] = False
    subject = _PEER_SUBJECT.search(line)
    if subject:
        handshake["peer_subject"] = subject.group(1).strip()
        if handshake["direction"] == "in":
            handshake["client_cert"] = True


def parse_tls_errors(log_text: str) -> list[str]:
    """OpenSSL errors of failed TLS handshakes/reads in a Kamailio log, e.g.
    "TLS accept:error:0A0000C7:SSL routines::peer did not return a
    certificate (sni: sut.test)"."""
    return [match.group(1).strip() for match in _TLS_ERROR.finditer(log_text)]
