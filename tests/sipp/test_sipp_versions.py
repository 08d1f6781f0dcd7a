"""Reading sipp's arguments with the table of the sipp that runs (sipp -v, cached per binary)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from fdkeeper import testbed
from fdkeeper.errors import FdkeeperError
from fdkeeper.sipp import versions
from fdkeeper.sipp.args import parse_sipp_args
from fdkeeper.sipp.tables import NEWEST, SIPP_3_6, SIPP_3_7_0, SIPP_3_7_3, SIPP_3_7_5, table_for
from fdkeeper.sipp.tlsoptions import keeper_tls_options
from fdkeeper.sipp.versions import SippVersion, parse_version, sipp_version
from fdkeeper.tls import TlsOptions

SIPP_377 = testbed.sipp_build("sipp-tls")
DEBIAN_SIPP = Path("/usr/bin/sipp")


def test_versions_as_sipp_v_prints_them():
    assert parse_version("\n SIPp v3.6.1-SCTP-PCAP-RTPSTREAM.\n\n This program").number == (3, 6, 1)
    assert parse_version(" SIPp v3.7.7-TLS-SHA256.\n") == SippVersion((3, 7, 7), "SIPp v3.7.7-TLS-SHA256")
    assert parse_version("something else").number is None


@pytest.mark.parametrize(
    "version, table",
    [
        ((3, 6, 1), SIPP_3_6),
        ((3, 7, 0), SIPP_3_7_0),
        ((3, 7, 4), SIPP_3_7_3),
        ((3, 7, 7), SIPP_3_7_5),
        ((3, 8, 0), None),
        ((3, 5, 0), None),
    ],
)
def test_each_release_has_its_table(version, table):
    assert table_for(version) == table


def test_a_37_flag_no_longer_swallows_the_remote_host():
    args = ["-sn", "uac", "-t", "t1", "-rfc3339", "127.0.0.1:5060"]
    assert parse_sipp_args(args, SippVersion((3, 7, 7), "").table).remote_host == "127.0.0.1:5060"
    with pytest.raises(FdkeeperError, match=r"sipp 3\.6\.1 has no option -rfc3339 \(sipp 3\.7\.5 and later have it"):
        parse_sipp_args(args, SippVersion((3, 6, 1), "").table)


def test_3_7_0_dropped_mp_and_3_7_3_brought_it_back():
    assert SIPP_3_6.arity("mp") == 1 and SIPP_3_7_0.arity("mp") is None and SIPP_3_7_3.arity("mp") == 1


def test_unknown_version_reads_with_the_newest_table_and_says_so():
    version = SippVersion((3, 9, 0), "SIPp v3.9.0")
    assert version.table is NEWEST
    assert "says it is SIPp v3.9.0, which fdkeeper does not know; reading its arguments as sipp 3.7.5's" in (
        version.unknown_notice(Path("/opt/sipp"))
    )
    assert SippVersion((3, 7, 7), "").unknown_notice(Path("sipp")) is None


@pytest.mark.skipif(not (SIPP_377.is_file() and DEBIAN_SIPP.is_file()), reason="needs both sipp builds")
def test_real_binaries_and_the_cache(tmp_path, monkeypatch):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    assert sipp_version(DEBIAN_SIPP, state).number == (3, 6, 1)
    assert sipp_version(SIPP_377, state).number == (3, 7, 7)

    def no_sipp(_sipp):
        raise AssertionError("asked sipp although the cache knew")

    monkeypatch.setattr(versions, "ask_sipp", no_sipp)
    started = time.perf_counter()
    assert sipp_version(SIPP_377, state).number == (3, 7, 7)
    assert time.perf_counter() - started < 0.05
    monkeypatch.undo()
    # A changed binary (here: another mtime) is asked again.
    copy = tmp_path / "sipp"
    shutil.copy(SIPP_377, copy)
    assert sipp_version(copy, state).number == (3, 7, 7)
    os.utime(copy, ns=(1, 1))
    asked = []
    monkeypatch.setattr(versions, "ask_sipp", lambda sipp: asked.append(sipp) or SippVersion((3, 7, 7), ""))
    sipp_version(copy, state)
    assert asked == [copy]


def test_no_state_directory_yet_means_asking_sipp(tmp_path, monkeypatch):
    monkeypatch.setattr(versions, "ask_sipp", lambda sipp: SippVersion((3, 6, 1), "SIPp v3.6.1"))
    assert sipp_version(Path("/bin/true"), tmp_path / "missing").number == (3, 6, 1)
    assert not (tmp_path / "missing").exists()


def tls_invocation(*options: str):
    return parse_sipp_args(["-sn", "uac", "-t", "l1", *options, "sut.test:5061"])


def test_sipps_tls_options_mean_the_same_for_the_keeper(tmp_path):
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key", "crl")}
    for path in files.values():
        path.write_text("x")
    options = keeper_tls_options(
        TlsOptions(),
        tls_invocation(
            "-tls_ca",
            str(files["ca"]),
            "-tls_cert",
            str(files["cert"]),
            "-tls_key",
            str(files["key"]),
            "-tls_crl",
            str(files["crl"]),
            "-tls_version",
            "1.2",
        ),
    )
    assert (options.ca, options.cert, options.key, options.crl) == tuple(
        str(files[n]) for n in ("ca", "cert", "key", "crl")
    )
    assert (options.min_version, options.max_version, options.sni) == ("1.2", "1.2", "sut.test")
    assert keeper_tls_options(TlsOptions(), tls_invocation("-tls_version", "1.3")).min_version == "1.3"
    assert keeper_tls_options(TlsOptions(), tls_invocation("-tls_version", "0")).max_version is None


@pytest.mark.parametrize(
    "ours, sipps, message",
    [
        (TlsOptions(ca="/a.pem"), ("-tls_ca", "/b.pem"), "--tls-ca /a.pem and sipp's -tls_ca /b.pem disagree"),
        (TlsOptions(), ("-tls_crl", "/missing.pem"), "-tls_crl file /missing.pem not found"),
        (TlsOptions(), ("-tls_version", "1.0"), "fdkeeper speaks TLS 1.2 and 1.3 only"),
        (TlsOptions(), ("-tls_version", "2"), "-tls_version 2: use 1.2 or 1.3"),
    ],
)
def test_tls_option_mistakes_are_one_line(ours, sipps, message):
    with pytest.raises(FdkeeperError, match=message.replace(".", r"\.")):
        keeper_tls_options(ours, tls_invocation(*sipps))
