"""A run that reuses a kept TLS connection says, in one line, that its --tls-sni and
--tls-keylog were not used (the handshake was an earlier run's), instead of ignoring them
without a word. Real sipp through `fdkeeper sipp -t l1`, real Kamailio with TLS."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fdkeeper import testbed

NOTICE = "not used: this run reuses the kept TLS connection"


def register(sipp_path: str, kamailio: testbed.Kamailio, keeper_dir: Path, users: Path, *options: str) -> str:
    """One register run through fdkeeper over TLS; its stderr (the run must pass)."""
    command = [
        *[sys.executable, "-m", "fdkeeper", "sipp", "--sipp", sipp_path, "--dir", str(keeper_dir), *options],
        *["-sf", str(testbed.SCENARIOS_DIR / "uac-register.xml"), "-inf", str(users)],
        *["-t", "l1", "-i", "127.0.0.1", "-m", "1", "-nostdin", "-timeout", "15s", str(kamailio.tls_address)],
    ]
    result = subprocess.run(
        command, cwd=keeper_dir.parent, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    return result.stderr


def test_tls_sni_and_keylog_on_a_reused_connection_are_said_to_be_unused(
    sipp_path: str, kamailio_tls: testbed.Kamailio, keeper_dir: Path, tmp_path: Path, test_pki: testbed.TestPki
) -> None:
    users = testbed.write_users_csv(tmp_path / "users.csv", ["alice"], testbed.DEFAULT_DOMAIN)
    trust = ("--tls-ca", str(test_pki.ca_cert))
    keylog = tmp_path / "keys.log"

    first = register(sipp_path, kamailio_tls, keeper_dir, users, *trust, "--tls-sni", "sut.test")
    assert NOTICE not in first  # it opened the connection: its options were used

    plain = register(sipp_path, kamailio_tls, keeper_dir, users, *trust)
    assert NOTICE not in plain  # nothing asked for that a reused connection cannot give

    again = register(
        sipp_path, kamailio_tls, keeper_dir, users, *trust, "--tls-sni", "sut.test", "--tls-keylog", str(keylog)
    )
    [line] = [line for line in again.splitlines() if NOTICE in line]
    assert (
        line.startswith("fdkeeper: --tls-sni sut.test and --tls-keylog ")
        and f"#1 to {kamailio_tls.tls_address}" in line
    )
    assert not keylog.exists() or keylog.stat().st_size == 0  # indeed: no handshake, no secrets
