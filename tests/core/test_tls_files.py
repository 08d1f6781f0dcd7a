"""Files a TLS request names (CA, CRL, certificate, key, key log) never block the keeper.

Another user can put a FIFO, a link or a device where root's `-tls_ca` or `--tls-keylog`
points. The keeper opens every such file without blocking and without following a link, and
takes only a regular file: anything else costs that request one ERR line naming the option,
and the keeper answers everyone else at once. The converter makes its TLS context with the
same code (fdkeeper.tls.client_context), so the unit tests below cover it too.
"""

from __future__ import annotations

import datetime
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from fdkeeper.cli import make_tls_options
from fdkeeper.client import KeeperClient, ensure_keeper
from fdkeeper.errors import FdkeeperError
from fdkeeper.sipp.args import parse_sipp_args
from fdkeeper.sipp.tlsoptions import keeper_tls_options
from fdkeeper.tls import MAX_TLS_FILE, TlsOptions, client_context, handshake

# The option each request field is spelled as in the one-line error (fdkeeper's, or sipp's).
OPTION = {
    "tls_ca": "--tls-ca",
    "tls_cert": "--tls-cert",
    "tls_key": "--tls-key",
    "tls_crl": "-tls_crl",
    "tls_keylog": "--tls-keylog",
}
KINDS = ("fifo", "symlink", "directory", "device")
SAYS = {
    "fifo": "is a FIFO",
    "symlink": "is a symbolic link",
    "directory": "is a directory",
    "device": "is a character device",
}
ANSWER_AT_ONCE = 1.0  # seconds for a PING (about 1 ms when idle); a blocked loop answers never


def make_crl(pki, path: Path, revoked: Path | None = None) -> Path:
    """A CRL signed by the test CA, revoking the certificate at ``revoked`` if given."""
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), None)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now - datetime.timedelta(minutes=5))
        .next_update(now + datetime.timedelta(days=1))
    )
    if revoked is not None:
        serial = x509.load_pem_x509_certificate(revoked.read_bytes()).serial_number
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(now - datetime.timedelta(minutes=1))
            .build()
        )
    path.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture(scope="module")
def crl(pki) -> Path:
    """An empty CRL of the test CA (a good -tls_crl)."""
    return make_crl(pki, pki.directory / "ca.crl")


def odd_file(kind: str, where: Path, good: Path) -> Path:
    """A path that is no regular file: what another user can plant in /tmp."""
    path = where / kind
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        path.symlink_to(good)  # to a good file: a link is refused for what it is
    elif kind == "directory":
        path.mkdir()
    else:
        return Path("/dev/zero")
    return path


def good_fields(pki, crl: Path, keylog: Path) -> dict[str, str]:
    return {
        "tls_ca": str(pki.ca_cert),
        "tls_cert": str(pki.client_cert),
        "tls_key": str(pki.client_key),
        "tls_crl": str(crl),
        "tls_keylog": str(keylog),
    }


@pytest.fixture
def keeper(tmp_path):
    """A real keeper; a client that gives up after 3 s (the stuck keeper of the defect never answers)."""
    directory = tmp_path / "state"
    client = ensure_keeper(directory)
    pid = int((directory / "keeper.lock").read_text())
    client.timeout = 3.0
    yield client
    try:
        client.stop()
    except FdkeeperError:
        os.kill(pid, signal.SIGKILL)  # stuck: ours, by pid


@pytest.fixture
def listener():
    """A SuT port that accepts TCP (in the kernel's backlog): the file errors come before any TLS."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[:2]


def answers_at_once(keeper: KeeperClient) -> float:
    started = time.monotonic()
    reply = keeper.request(b"PING", timeout=3)
    elapsed = time.monotonic() - started
    assert reply.ok and elapsed < ANSWER_AT_ONCE, elapsed
    return elapsed


@pytest.mark.parametrize("field", sorted(OPTION))
def test_an_odd_file_costs_one_err_line_and_the_keeper_answers_at_once(keeper, listener, pki, crl, tmp_path, field):
    for kind in KINDS:
        where = tmp_path / f"odd-{kind}"
        where.mkdir()
        good = good_fields(pki, crl, tmp_path / "keys.log")
        path = odd_file(kind, where, Path(good[field]) if field != "tls_keylog" else where / "target")
        fields = {**good, field: str(path)}
        with pytest.raises(FdkeeperError) as failure:
            keeper.prepare(role="client", transport="tls", remote=listener, local="-", **fields)
        text = str(failure.value)
        assert failure.value.code == "badrequest", text
        assert OPTION[field] in text and str(path) in text and SAYS[kind] in text, text
        assert "\n" not in text
        answers_at_once(keeper)
        assert keeper.status()["connections"] == []
        if kind == "symlink" and field == "tls_keylog":
            assert not (where / "target").exists()


def test_good_files_still_open_a_verified_mutual_tls_connection(keeper, pki, crl, tmp_path):
    """Every file read the safe way still means what it meant: CA, CRL, client certificate, key log."""
    keylog = tmp_path / "keys.log"
    with MutualTlsPeer(pki) as peer:
        keeper.prepare(
            role="client",
            transport="tls",
            remote=peer.address,
            local="-",
            tls_sni=pki.server_name,
            **good_fields(pki, crl, keylog),
        )
        [connection] = keeper.status()["connections"]
        assert "CN=sut.test" in connection["tls"]["peer_subject"] and connection["tls"]["verified"]
        assert peer.client_subject and "alice.fdkeeper.test" in peer.client_subject
    assert "CLIENT_" in keylog.read_text()


def test_a_crl_read_from_memory_still_revokes(keeper, pki, crl, tmp_path):
    revoking = make_crl(pki, tmp_path / "revoking.crl", revoked=pki.server_cert)
    with MutualTlsPeer(pki) as peer, pytest.raises(FdkeeperError, match="certificate revoked"):
        keeper.prepare(
            role="client",
            transport="tls",
            remote=peer.address,
            local="-",
            **{**good_fields(pki, crl, tmp_path / "keys.log"), "tls_crl": str(revoking)},
        )
    assert keeper.status()["connections"] == []


def test_a_nul_in_a_path_names_its_option_not_the_server_name(keeper, listener, pki, crl, tmp_path):
    for field in sorted(OPTION):
        fields = {**good_fields(pki, crl, tmp_path / "keys.log"), field: "/tmp/a\0b"}
        with pytest.raises(FdkeeperError) as failure:
            keeper.prepare(role="client", transport="tls", remote=listener, local="-", **fields)
        text = str(failure.value)
        # The control parser refuses it first (naming the field), else the TLS files would: both name it.
        assert re.search(field.replace("_", "[-_]"), text) and "server name" not in text, text
        answers_at_once(keeper)


# ---------------------------------------------------------------- the context itself (keeper and converter)


def context_options(pki, crl: Path, tmp_path: Path, field: str, path: str) -> TlsOptions:
    good = good_fields(pki, crl, tmp_path / "keys.log")
    fields = {**good, field: path}
    return TlsOptions(
        ca=fields["tls_ca"],
        cert=fields["tls_cert"],
        key=fields["tls_key"],
        crl=fields["tls_crl"],
        keylog=fields["tls_keylog"],
    )


def within(seconds: float, call: Callable[[], object], fifo: Path | None = None) -> BaseException | None:
    """Run ``call`` in a thread; fail if it has not returned in time (a FIFO is opened for
    writing then, which frees an open() blocked on it). Returns what it raised."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if fifo is not None:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail(f"still blocked after {seconds} s")
    return outcome[0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("field", sorted(OPTION))
def test_client_context_refuses_anything_but_a_regular_file(pki, crl, tmp_path, field, kind):
    path = odd_file(kind, tmp_path, Path(good_fields(pki, crl, tmp_path / "k.log")[field]))
    error = within(
        2,
        lambda: client_context(context_options(pki, crl, tmp_path, field, str(path))),
        path if kind == "fifo" else None,
    )
    assert isinstance(error, FdkeeperError), error
    text = str(error)
    assert re.match(rf"fdkeeper: {re.escape(OPTION[field])}\b", text) and SAYS[kind] in text, text
    assert "name a regular file" in text or "symbolic link" in text, text


def test_the_converter_handshake_is_refused_at_once_on_a_fifo(pki, tmp_path):
    fifo = tmp_path / "ca.pem"
    os.mkfifo(fifo)
    with socket.create_server(("127.0.0.1", 0)) as server:
        sock = socket.create_connection(server.getsockname()[:2])
        error = within(2, lambda: handshake(sock, server.getsockname()[:2], TlsOptions(ca=str(fifo)), 2), fifo)
    assert isinstance(error, FdkeeperError) and "--tls-ca" in str(error) and "is a FIFO" in str(error), error
    assert sock.fileno() < 0  # closed, as on every failure


def test_a_file_too_large_to_be_a_ca_bundle_is_refused(pki, crl, tmp_path):
    big = tmp_path / "big.pem"
    with open(big, "wb") as file:
        file.truncate(MAX_TLS_FILE + 1)
    with pytest.raises(FdkeeperError, match=r"^fdkeeper: --tls-ca \(-tls_ca\) \S+ is \d+ bytes"):
        client_context(context_options(pki, crl, tmp_path, "tls_ca", str(big)))


def test_a_missing_file_names_its_option(pki, crl, tmp_path):
    with pytest.raises(FdkeeperError, match=r"^fdkeeper: --tls-key \(-tls_key\) file \S+/missing\.key not found"):
        client_context(context_options(pki, crl, tmp_path, "tls_key", str(tmp_path / "missing.key")))


def test_a_ca_bundle_with_comments_and_text_still_loads(pki, crl, tmp_path):
    """What load_verify_locations took by path it takes now: PEM with non-ASCII comments (curl's cacert.pem)."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes("# Főtanúsítvány\n".encode() + pki.other_ca_cert.read_bytes() + pki.ca_cert.read_bytes())
    context = client_context(TlsOptions(ca=str(bundle)))
    assert len(context.get_ca_certs()) == 2


@pytest.mark.parametrize("field", ["tls_ca", "tls_cert", "tls_key", "tls_keylog"])
def test_a_nul_names_its_option(pki, crl, tmp_path, field):
    with pytest.raises(FdkeeperError, match=rf"^fdkeeper: {re.escape(OPTION[field])} "):
        client_context(context_options(pki, crl, tmp_path, field, "/tmp/a\0b"))


class MutualTlsPeer:
    """A TLS server on loopback that wants a client certificate and notes whose it got."""

    def __init__(self, pki) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(pki.server_cert, pki.server_key)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.load_verify_locations(pki.ca_cert)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self.client_subject = ""
        self.connection: ssl.SSLSocket | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        raw, _ = self.listener.accept()
        raw.settimeout(5)
        try:
            self.connection = self.context.wrap_socket(raw, server_side=True)
            subject = dict(part[0] for part in self.connection.getpeercert()["subject"])
            self.client_subject = subject.get("commonName", "")
            if self.connection.recv(65536) == b"\r\n\r\n":
                self.connection.sendall(b"\r\n")  # the pong to the keeper's post-handshake ping
        except (ssl.SSLError, OSError):
            pass

    def __enter__(self) -> MutualTlsPeer:
        return self

    def __exit__(self, *_exc) -> None:
        self.listener.close()
        self.thread.join(10)  # then only this thread touches the TLS object
        if self.connection is not None:
            self.connection.close()


def test_an_encrypted_key_is_refused_rather_than_asked_for(pki, crl, tmp_path):
    """OpenSSL would ask for the passphrase on the keeper's terminal, on its loop."""
    key = serialization.load_pem_private_key(pki.client_key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    error = within(2, lambda: client_context(context_options(pki, crl, tmp_path, "tls_key", str(encrypted))))
    assert isinstance(error, FdkeeperError) and "--tls-key" in str(error) and "encrypted" in str(error), error


# ---------------------------------------------------------------- fdkeeper sipp, before anything starts


def sipp_tls(*options: str):
    return parse_sipp_args(["-sn", "uac", "-t", "l1", *options, "sut.test:5061"])


def test_a_ca_link_the_user_names_is_resolved_by_the_run_and_sent_as_the_file(pki, tmp_path):
    """The keeper follows no link; the run (with the user's own rights) sends where the link points."""
    link = tmp_path / "ca-link.pem"
    link.symlink_to(pki.ca_cert)
    options = keeper_tls_options(TlsOptions(), sipp_tls("-tls_ca", str(link)))
    assert options.ca == str(pki.ca_cert.resolve())
    client_context(options)  # and the keeper takes it


@pytest.mark.parametrize("option, field", [("-tls_ca", "ca"), ("-tls_cert", "cert"), ("-tls_crl", "crl")])
def test_a_fifo_named_to_sipp_is_one_line_before_anything_starts(tmp_path, option, field):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(FdkeeperError, match=rf"^fdkeeper: {option} \S+/fifo is a FIFO; name a regular file$"):
        keeper_tls_options(TlsOptions(), sipp_tls(option, str(fifo)))


def test_a_fifo_as_key_log_is_one_line_before_anything_starts(tmp_path):
    fifo = tmp_path / "keys.log"
    os.mkfifo(fifo)
    with pytest.raises(FdkeeperError, match=r"^fdkeeper: --tls-keylog \S+ is a FIFO; name a regular file$"):
        keeper_tls_options(TlsOptions(keylog=str(fifo)), sipp_tls())


def test_tls_options_given_on_the_command_line_reach_the_keeper_as_files_not_links(pki, tmp_path, monkeypatch):
    """`fdkeeper keeper|exec|convert --tls-ca LINK` (relative, too): resolved in the user's process."""
    (tmp_path / "ca-link.pem").symlink_to(pki.ca_cert)
    monkeypatch.chdir(tmp_path)
    options = make_tls_options("ca-link.pem", False, None, None, None, None, "keys.log")
    assert (options.ca, options.keylog) == (str(pki.ca_cert.resolve()), str(tmp_path / "keys.log"))
    client_context(options)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as a second uid (setpriv)")
def test_another_users_fifo_in_a_sticky_directory_costs_root_one_line(keeper, listener, pki, crl):
    """The issue's attack: uid nobody makes a FIFO in a /tmp-like directory; root names it."""
    nobody = pwd.getpwnam("nobody")
    shared = Path(tempfile.mkdtemp(prefix="fdkeeper-sticky-", dir="/tmp"))
    try:
        shared.chmod(0o1777)
        fifo = shared / "keys.log"
        subprocess.run(
            [
                "setpriv",
                f"--reuid={nobody.pw_uid}",
                f"--regid={nobody.pw_gid}",
                "--clear-groups",
                sys.executable,
                "-c",
                f"import os; os.mkfifo({str(fifo)!r}, 0o666)",
            ],
            check=True,
            timeout=10,
        )
        for field in ("tls_keylog", "tls_ca"):
            fields = {**good_fields(pki, crl, shared / "unused.log"), field: str(fifo)}
            with pytest.raises(
                FdkeeperError, match=rf"^fdkeeper: {re.escape(OPTION[field])}\b.* is a FIFO; name a regular file$"
            ):
                keeper.prepare(role="client", transport="tls", remote=listener, local="-", **fields)
            answers_at_once(keeper)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
