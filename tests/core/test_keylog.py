"""--tls-keylog: the keeper's TLS secrets in the SSLKEYLOGFILE format, for Wireshark.

A real TLS register run (Debian's sipp through `fdkeeper sipp -t l1`) against the embedded
Kamailio; the pytest plugin's fixtures (`sipp`, `kamailio_sut`) do the wiring.
"""

from __future__ import annotations

import os
import ssl
import stat
from pathlib import Path

import pytest

from fdkeeper.errors import FdkeeperError
from fdkeeper.keylog import set_keylog


def test_tls_register_run_writes_tls13_secrets_to_a_0600_file(sipp, kamailio_sut, tmp_path):
    keylog = tmp_path / "keys.log"
    users = kamailio_sut.users_csv(tmp_path / "users.csv", ["alice"])
    result = sipp.run(
        "-sf",
        "uac-register.xml",
        "-inf",
        users,
        "-t",
        "l1",
        "-i",
        "127.0.0.1",
        "-m",
        "1",
        kamailio_sut.tls_address,
        options=(*kamailio_sut.tls_options, "--tls-keylog", str(keylog)),
        timeout=30,
    )
    assert result.ok, result.tail()
    lines = keylog.read_text().splitlines()
    assert any(line.startswith("CLIENT_TRAFFIC_SECRET_0 ") for line in lines), lines
    assert all(len(line.split()) == 3 for line in lines if line and not line.startswith("#")), lines
    assert stat.S_IMODE(keylog.stat().st_mode) == 0o600


def test_a_keylog_link_is_one_line_from_fdkeeper_sipp_and_exit_2(sipp, kamailio_sut, tmp_path):
    link = tmp_path / "keys.log"
    link.symlink_to(tmp_path / "elsewhere")
    users = kamailio_sut.users_csv(tmp_path / "users.csv", ["alice"])
    result = sipp.run(
        "-sf",
        "uac-register.xml",
        "-inf",
        users,
        "-t",
        "l1",
        "-i",
        "127.0.0.1",
        "-m",
        "1",
        kamailio_sut.tls_address,
        options=(*kamailio_sut.tls_options, "--tls-keylog", str(link)),
        timeout=30,
    )
    said = [line for line in result.err.read_text().splitlines() if line.startswith("fdkeeper:")]
    assert result.exit == 2 and len(said) == 1 and "symbolic link" in said[0], result.tail()
    assert not (tmp_path / "elsewhere").exists()


def test_a_link_in_place_of_the_keylog_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    link = tmp_path / "keys.log"
    link.symlink_to(target)
    with pytest.raises(FdkeeperError, match="symbolic link"):
        set_keylog(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), str(link))
    assert not target.exists()


def test_an_existing_file_open_to_others_is_refused_and_left_as_it_was(tmp_path):
    # The keeper (often root) never changes the mode of a file it is named: a mistyped
    # --tls-keylog /etc/passwd must not make it 0600, nor get secrets appended to it.
    keylog = tmp_path / "keys.log"
    keylog.write_text("")
    keylog.chmod(0o644)
    with pytest.raises(FdkeeperError, match="open to other users"):
        set_keylog(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), str(keylog))
    assert stat.S_IMODE(keylog.stat().st_mode) == 0o644


@pytest.mark.parametrize(
    ("content", "refused"),
    [
        (b"", False),
        (b"CLIENT_RANDOM 00 11\n", False),
        (b"# SSL/TLS secrets log file\n", False),
        (b"-----BEGIN OPENSSH PRIVATE KEY-----\n", True),
        (b"root:x:0:0:root:/root:/bin/bash\n", True),
    ],
)
def test_an_existing_private_file_is_appended_to_only_if_it_is_a_keylog(tmp_path, content, refused):
    keylog = tmp_path / "keys.log"
    keylog.write_bytes(content)
    keylog.chmod(0o600)
    if refused:
        with pytest.raises(FdkeeperError, match="not a TLS key log"):
            set_keylog(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), str(keylog))
        assert keylog.read_bytes() == content
    else:
        set_keylog(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), str(keylog))
        assert keylog.read_bytes().startswith(content)  # appended to (Python adds its header line)


def test_a_keylog_with_a_second_name_is_refused(tmp_path):
    keylog = tmp_path / "keys.log"
    keylog.write_bytes(b"")
    keylog.chmod(0o600)
    os.link(keylog, tmp_path / "other-name")
    with pytest.raises(FdkeeperError, match="2 names"):
        set_keylog(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), str(keylog))


def test_a_relative_keylog_path_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FdkeeperError, match="absolute"):
        set_keylog(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), "keys.log")
    assert not Path("keys.log").exists()
