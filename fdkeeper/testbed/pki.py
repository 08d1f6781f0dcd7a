"""Throw-away certificates for tests, the demo and the benches.

`make_test_pki(directory)` writes a small PKI as PEM files and returns their
paths as a `TestPki`:

- ``ca_cert``/``ca_key``: the test CA every "good" certificate chains to;
- ``server_cert``/``server_key``: the SuT's certificate, for DNS ``sut.test``
  and the IP addresses 127.0.0.1 and ::1 (so a client may verify either name);
- ``client_cert``/``client_key``: a user's certificate (CN
  ``alice.fdkeeper.test``, clientAuth) for mutual TLS;
- ``other_ca_cert``/``other_ca_key``: an unrelated CA (same subject layout,
  other key): for "client trusts the wrong CA" tests;
- ``other_ca_client_cert``/``other_ca_client_key``: a client certificate
  signed by that unrelated CA: for "server rejects a client of the wrong CA";
- ``expired_server_cert``/``expired_server_key``: signed by the test CA for
  the same names as the server certificate, valid only in the past;
- ``wrong_name_server_cert``/``wrong_name_server_key``: signed by the test CA
  for DNS ``other.test`` only (no IP SAN): for name-mismatch tests.

Keys are EC P-256 (fast to make: the whole set takes a few tens of ms) and
are written unencrypted with mode 0600. Nothing here is meant for anything
but loopback tests.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CLIENT_COMMON_NAME",
    "SERVER_DNS_NAME",
    "WRONG_DNS_NAME",
    "TestPki",
    "make_test_pki",
]

SERVER_DNS_NAME = "sut.test"
WRONG_DNS_NAME = "other.test"
CLIENT_COMMON_NAME = "alice.fdkeeper.test"
SERVER_IPS = ("127.0.0.1", "::1")

# Valid from a little in the past (clock skew between cert and check).
_BACKDATE = datetime.timedelta(minutes=5)
_LIFETIME = datetime.timedelta(days=3650)


class _Validity(TypedDict):
    not_before: datetime.datetime
    not_after: datetime.datetime


@dataclass(frozen=True)
class TestPki:
    """Paths of the PEM files written by make_test_pki()."""

    __test__ = False  # not a pytest test class, despite the name

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path
    other_ca_key: Path
    other_ca_client_cert: Path
    other_ca_client_key: Path
    expired_server_cert: Path
    expired_server_key: Path
    wrong_name_server_cert: Path
    wrong_name_server_key: Path
    server_name: str = SERVER_DNS_NAME
    client_name: str = CLIENT_COMMON_NAME


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fdkeeper tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca(common_name: str, now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    common_name: str,
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    server: bool,
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=False,
                crl_sign=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return path


def make_test_pki(directory: Path) -> TestPki:
    """Create `directory` (if needed) and write a fresh test PKI into it.

    Every call makes new keys; files of an earlier call are overwritten.
    """
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid: _Validity = {"not_before": now - _BACKDATE, "not_after": now + _LIFETIME}

    ca, ca_key = _ca("fdkeeper test CA", now)
    other_ca, other_ca_key = _ca("fdkeeper unrelated test CA", now)
    server, server_key = _leaf(
        SERVER_DNS_NAME, ca, ca_key, server=True, dns=(SERVER_DNS_NAME,), ips=SERVER_IPS, **valid
    )
    client, client_key = _leaf(CLIENT_COMMON_NAME, ca, ca_key, server=False, **valid)
    stranger, stranger_key = _leaf("mallory.fdkeeper.test", other_ca, other_ca_key, server=False, **valid)
    expired, expired_key = _leaf(
        SERVER_DNS_NAME,
        ca,
        ca_key,
        server=True,
        dns=(SERVER_DNS_NAME,),
        ips=SERVER_IPS,
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
    wrong, wrong_key = _leaf(WRONG_DNS_NAME, ca, ca_key, server=True, dns=(WRONG_DNS_NAME,), **valid)

    def pair(stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
        return (_write_cert(directory / f"{stem}.crt", cert), _write_key(directory / f"{stem}.key", key))

    ca_paths = pair("ca", ca, ca_key)
    other_ca_paths = pair("other-ca", other_ca, other_ca_key)
    server_paths = pair("server", server, server_key)
    client_paths = pair("client", client, client_key)
    stranger_paths = pair("other-ca-client", stranger, stranger_key)
    expired_paths = pair("expired-server", expired, expired_key)
    wrong_paths = pair("wrong-name-server", wrong, wrong_key)
    return TestPki(
        directory=directory,
        ca_cert=ca_paths[0],
        ca_key=ca_paths[1],
        server_cert=server_paths[0],
        server_key=server_paths[1],
        client_cert=client_paths[0],
        client_key=client_paths[1],
        other_ca_cert=other_ca_paths[0],
        other_ca_key=other_ca_paths[1],
        other_ca_client_cert=stranger_paths[0],
        other_ca_client_key=stranger_paths[1],
        expired_server_cert=expired_paths[0],
        expired_server_key=expired_paths[1],
        wrong_name_server_cert=wrong_paths[0],
        wrong_name_server_key=wrong_paths[1],
    )
