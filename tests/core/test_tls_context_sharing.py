"""One SSL context per distinct TLS options (fdkeeper.tls.client_context), shared by the
connections opened with them: an SSL_CTX costs 14 kB to 850 kB (the system's trust store) and
0.3 to 35 ms, and each TLS socket keeps its own alive (issue 20: an idle TLS connection's memory).
"""

from __future__ import annotations

from pathlib import Path

from fdkeeper import tls
from fdkeeper.testbed.pki import TestPki
from fdkeeper.tls import TlsOptions, client_context


def test_the_same_options_share_one_context(pki: TestPki):
    options = TlsOptions(ca=str(pki.ca_cert), sni=pki.server_name)
    assert client_context(options) is client_context(TlsOptions(ca=str(pki.ca_cert), sni=pki.server_name))
    assert client_context(options) is not client_context(TlsOptions(ca=str(pki.ca_cert), min_version="1.3"))


def test_a_file_that_changed_makes_a_new_context(pki: TestPki, tmp_path: Path):
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pki.ca_cert.read_bytes())
    options = TlsOptions(ca=str(ca))
    first = client_context(options)
    ca.write_bytes(pki.ca_cert.read_bytes() + b"\n# a bundle rewritten\n")
    assert client_context(options) is not first


def test_a_key_log_is_never_shared(tmp_path: Path):
    options = TlsOptions(insecure=True, keylog=str(tmp_path / "keys.log"))
    assert client_context(options) is not client_context(options)


def test_the_shared_contexts_are_bounded():
    for number in range(tls.MAX_SHARED_CONTEXTS + 5):
        client_context(TlsOptions(insecure=True, sni=f"sut{number}.test"))
    assert len(tls._SHARED_CONTEXTS) == tls.MAX_SHARED_CONTEXTS
    assert (TlsOptions(insecure=True, sni="sut0.test"), tls._TlsFiles().digest()) not in tls._SHARED_CONTEXTS
