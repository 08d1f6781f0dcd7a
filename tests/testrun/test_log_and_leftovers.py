"""Issue 10's small ones: an AoR cannot forge a log line or split a status row, `status --remote`
with a typo is one line and exit 2, and TLS scenario copies of killed runs do not pile up.

The keeper is the real one over its control socket; the AoR arrives as the shim sends it
(percent-encoded in the LEASE, so a CR or LF in the user's From header reaches the keeper).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fdkeeper import testbed
from fdkeeper.errors import FdkeeperError
from fdkeeper.sipp.args import parse_sipp_args
from fdkeeper.sipp.scenario import tls_arguments
from fdkeeper.textsafe import escape_controls

FORGED = "sip:a\nFAKE 9 tcp 1.2.3.4:5 sip:root@x idle\r2026-01-01 00:00:00,000 fdkeeper[1] forged\u2028x@example.test"
FORGED_WITHOUT_CONTROLS = (
    "sip:a\u2028FAKE 9 tcp 1.2.3.4:5 sip:root@x idle\u20292026-01-01 00:00:00,000 fdkeeper[1] forged@example.test"
)
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} fdkeeper\[\d+\] ")


def fdkeeper(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fdkeeper", *args], capture_output=True, text=True, timeout=30)


def lease_as(client, remote, aor: str) -> None:
    """Lease (and end the lease of) the connection of ``aor`` in a child, as a run would."""
    pid = os.fork()
    if pid == 0:
        try:
            client.lease(role="client", transport="tcp", remote=remote, local="-", aor=aor)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def test_an_aor_with_line_breaks_forges_no_log_line_and_splits_no_status_row(keeper, peer):
    remote = peer.getsockname()[:2]
    # Control characters (CR, LF, NUL ...) are refused when the request is parsed (issue 16)
    with pytest.raises(FdkeeperError, match="aor=") as refused:
        keeper.lease(role="client", transport="tcp", remote=remote, local="-", aor=FORGED)
    assert refused.value.code == "badrequest"
    # Line breaks that are not control characters (U+2028) are kept, and escaped where shown
    lease_as(keeper, remote, FORGED_WITHOUT_CONTROLS)
    testbed.wait_until(lambda: keeper.status()["connections"], 5, what="the connection")
    log = (keeper.directory / "keeper.log").read_text()
    assert all(LOG_LINE.match(line) for line in log.splitlines() if line), log
    assert escape_controls(FORGED_WITHOUT_CONTROLS) in log and "\\u2028" in escape_controls(FORGED_WITHOUT_CONTROLS)
    status = fdkeeper("status", "--dir", str(keeper.directory))
    lines = status.stdout.splitlines()
    assert status.returncode == 0 and len(lines) == 3, status.stdout  # keeper line, header, one row
    assert escape_controls(FORGED_WITHOUT_CONTROLS) in lines[2]


def test_escape_controls_keeps_text_and_shows_every_control():
    assert escape_controls("sip:alice@example.test") == "sip:alice@example.test"
    assert escape_controls("a\r\n\t\x00\x1b\x7f\x85\u2028b") == "a\\r\\n\\t\\x00\\x1b\\x7f\\x85\\u2028b"


@pytest.mark.parametrize("garbage", ["garbage", "127.0.0.1", "host.example:5060", "127.0.0.1:99999", ""])
def test_status_remote_garbage_is_one_line_exit_2(keeper, peer, garbage):
    lease_as(keeper, peer.getsockname()[:2], "sip:alice@example.test")
    result = fdkeeper("status", "--dir", str(keeper.directory), "--remote", garbage)
    assert result.returncode == 2 and result.stdout == "", result
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("fdkeeper: status --remote: ")


def test_status_remote_matches_however_the_address_is_written(keeper, peer):
    host, port = peer.getsockname()[:2]
    lease_as(keeper, (host, port), "sip:alice@example.test")
    result = fdkeeper("status", "--dir", str(keeper.directory), "--remote", f" {host}:{port:05d}", "--count")
    assert result.returncode == 0 and result.stdout.strip() == "1", result


# --------------------------------------------------------------------------
# TLS scenario copies
# --------------------------------------------------------------------------

COPY_IN_A_KILLED_RUN = """
import os, signal, sys
from pathlib import Path
from fdkeeper.sipp.args import parse_sipp_args
from fdkeeper.sipp.scenario import tls_arguments
invocation = parse_sipp_args(["-sf", sys.argv[1], "-t", "l1", "127.0.0.1:5061"])
tls_arguments(invocation, Path("sipp"), Path(sys.argv[2]))
os.kill(os.getpid(), signal.SIGKILL)  # as a run killed before it could remove its copy
"""


def copies(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.glob("*.tls.xml"))


def test_tls_copies_of_killed_runs_are_swept_and_removed_by_stop(tmp_path):
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    scenario = testbed.SCENARIOS_DIR / "uac-register.xml"
    killed = subprocess.run([sys.executable, "-c", COPY_IN_A_KILLED_RUN, str(scenario), str(directory)])
    assert killed.returncode == -signal.SIGKILL
    [left] = copies(directory)
    assert re.fullmatch(r"uac-register\.pid\d+\.\w+\.tls\.xml", left)

    invocation = parse_sipp_args(["-sf", str(scenario), "-t", "l1", "127.0.0.1:5061"])
    _, [ours] = tls_arguments(invocation, Path("sipp"), directory)  # the next run sweeps the dead run's copy
    assert copies(directory) == [ours.name] and f".pid{os.getpid()}." in ours.name

    stopped = fdkeeper("stop", "--dir", str(directory))
    assert stopped.returncode == 0, stopped.stderr
    assert copies(directory) == []
