"""sipp's own descriptor limits on a -t tn/ln run, said before it starts (fdkeeper/sipp/limits.py):
-max_socket (sipp's default 50,000) against the open-file limit, the run's open calls and users,
calls past -max_socket sharing sockets, a server run handed more connections than fit. Small
limits, set in a subprocess where a limit of this process would matter (issue 20)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fdkeeper.errors import FdkeeperError
from fdkeeper.modes import HandoffRequest
from fdkeeper.sipp.args import parse_sipp_args
from fdkeeper.sipp.limits import SIPP_OWN_FILES, check_handed_connections, check_sipp_sockets, sut_limit_notice

REMOTE = "127.0.0.1:5060"


def invocation(*options: str):
    return parse_sipp_args(["-sn", "uac", *options, REMOTE])


def test_sipps_default_max_socket_above_the_limit_is_said_before_sipp_stops_on_it():
    with pytest.raises(FdkeeperError) as refused:
        check_sipp_sockets(invocation("-t", "tn"), 1024, 4096)
    said = str(refused.value)
    assert refused.value.code == "limit"
    assert "-max_socket 50000 (sipp's default) is above its open-file limit 1024" in said, said
    assert f"pass -max_socket {1024 - SIPP_OWN_FILES} or less" in said and "hard limit 4096" in said, said


def test_a_max_socket_within_the_limit_passes_and_skip_rlimit_is_sipps_own_choice():
    assert check_sipp_sockets(invocation("-t", "tn", "-max_socket", "900", "-l", "900"), 1024, 4096) is None
    assert check_sipp_sockets(invocation("-t", "tn", "-skip_rlimit"), 1024, 4096) is None
    assert check_sipp_sockets(invocation("-t", "t1"), 64, 64) is None  # one socket: sipp checks 1


def test_open_calls_past_the_room_under_the_limit_are_refused(tmp_path: Path):
    with pytest.raises(FdkeeperError, match=r"sipp may hold 1000 call sockets at once \(-l 1000, -max_socket 1024\)"):
        check_sipp_sockets(invocation("-t", "tn", "-max_socket", "1024", "-l", "1000"), 1024, 1024)
    users = tmp_path / "users.csv"
    users.write_text("SEQUENTIAL\n" + "".join(f"u{n};example.test\n" for n in range(990)))
    with pytest.raises(FdkeeperError, match=r"990 users"):
        check_sipp_sockets(invocation("-t", "tn", "-max_socket", "1024", "-inf", str(users)), 1024, 1024)


def test_max_socket_below_the_open_calls_mixes_users_and_is_said():
    said = check_sipp_sockets(invocation("-t", "tn", "-max_socket", "100", "-l", "500"), 20000, 20000)
    assert said is not None and "-max_socket 100 is below -l 500" in said and "other users' kept connections" in said


def test_a_server_run_handed_more_connections_than_fit_is_refused():
    check_handed_connections(1000 - SIPP_OWN_FILES, 1000, 2000)
    with pytest.raises(FdkeeperError, match="handed 1000 kept connections, but sipp's open-file limit 1000"):
        check_handed_connections(1000, 1000, 2000)


@pytest.mark.skipif(shutil.which("sipp") is None, reason="needs sipp (sipp -v reads its option table)")
def test_fdkeeper_sipp_says_it_in_one_line_before_anything_starts(tmp_path: Path):
    """A hard limit of 1024 (soft raised to it, as the run does): sipp's default -max_socket would stop it."""
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 1024))\n"
        "from fdkeeper.cli import main\n"
        f"sys.argv = ['fdkeeper', 'sipp', '--dir', {str(tmp_path / 'state')!r}, '-sn', 'uac', '-t', 'tn', "
        f"'-m', '1', {REMOTE!r}]\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "above its open-file limit 1024" in lines[0], result.stderr
    assert not (tmp_path / "state" / "keeper.lock").exists()  # no keeper started for a run that cannot start


def test_connections_the_sut_closed_during_a_per_user_run_name_its_connection_limit():
    request = HandoffRequest(Path("sipp"), [], "client", Path("c"), ("127.0.0.1", 5060), per_call=True)
    said = sut_limit_notice(7, 2, request)
    assert said is not None and said.startswith("the SuT at 127.0.0.1:5060/tcp closed 5 kept connection(s)"), said
    assert "connection limit (Kamailio: tcp_max_connections" in said and "--reconnect" in said, said
    assert sut_limit_notice(2, 2, request) is None and sut_limit_notice(None, 2, request) is None
