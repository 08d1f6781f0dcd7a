"""The SuT of a test: an embedded Kamailio started for it, or the address it names.

The embedded one is fdkeeper.testbed's Kamailio on free loopback ports, with a TLS
listener and a throw-away PKI (fdkeeper.testbed.make_test_pki) for `transport: tls`.
Its work files live in a short temporary directory (unix socket paths are limited to
108 bytes); its log is copied into the test's log folder when it stops.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from fdkeeper import testbed
from fdkeeper.address import split_host_port


@contextlib.contextmanager
def sut_variables(sut: str | None, transport: str, workdir: Path, logs: Path) -> Iterator[dict[str, str]]:
    """Yield the SuT's variables (sut, sut_host, sut_port, domain; sut_tls, tls_ca, tls_sni
    with TLS), starting and finally stopping an embedded SuT."""
    if sut is None:
        yield {}
        return
    if sut != "embedded":
        host, port = split_host_port(sut)
        yield {"sut": sut, "sut_host": host, "sut_port": str(port), "domain": testbed.DEFAULT_DOMAIN}
        return
    with embedded_kamailio(transport, workdir, logs) as (kamailio, pki):
        values = {
            "sut": kamailio.address,
            "sut_host": kamailio.host,
            "sut_port": str(kamailio.port),
            "domain": kamailio.domain,
        }
        if pki is not None and kamailio.tls_address is not None:  # with a TestPki, the SuT listens for TLS
            values.update(sut_tls=kamailio.tls_address, tls_ca=str(pki.ca_cert), tls_sni=pki.server_name)
        yield values


@contextlib.contextmanager
def embedded_kamailio(
    transport: str, workdir: Path, logs: Path
) -> Iterator[tuple[testbed.Kamailio, testbed.TestPki | None]]:
    """A started Kamailio (TLS too with transport 'tls') and its PKI; stopped at the end."""
    pki = testbed.make_test_pki(workdir / "pki") if transport == "tls" else None
    tls = testbed.KamailioTls.server(pki) if pki is not None else None
    kamailio = testbed.Kamailio(workdir / "kamailio", tls=tls)
    try:
        kamailio.start()
        yield kamailio, pki
    finally:
        kamailio.stop()
        with contextlib.suppress(OSError):
            shutil.copyfile(kamailio.log_path, logs / "kamailio.log")
