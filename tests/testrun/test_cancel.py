"""Safe to cancel: SIGTERM, SIGHUP or SIGINT to `fdkeeper run` stops every step's process
group, the test's keeper and its embedded Kamailio, removes its temporary directory,
writes the JUnit (what did not finish marked as such) and exits 128 + the signal; the same
for the pytest plugin's fixtures when pytest is interrupted, and for
docs/ci/register-answer.sh on any exit. Also the scheduler's own bounds: a step that cannot
start followed by one after it, and a wait no number makes endless.

Real processes throughout: `fdkeeper run` in a subprocess against the embedded Kamailio with
real sipp, an inner pytest, the shell script; the process trees are read with psutil.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from fdkeeper import testbed
from fdkeeper.pytest_plugin import _InterruptGuard
from fdkeeper.testrun.command import run_command
from fdkeeper.testrun.scheduler import MAX_WAIT, bounded_wait
from tests.support.paths import REPO
from tests.support.shell_pattern import REGISTER_ANSWER_SCRIPT, register_answer_env

STARTED_WITHIN = 60.0  # seconds for the run to reach the waiting steps (Kamailio and sipp start)
CLEANED_WITHIN = 10.0  # seconds to clean up and exit: GitHub sends SIGKILL 10 s after its SIGINT


def write(tmp_path: Path, text: str, name: str = "t.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------
# the scheduler's own bounds
# --------------------------------------------------------------------------


def test_a_step_that_cannot_start_skips_the_step_after_it(tmp_path):
    test = write(
        tmp_path,
        """
steps:
  - {name: broken, command: /nonexistent/program}
  - {name: next, after: broken, command: "touch ran"}
  - {name: other, command: "true", wait: 0.5}
""",
    )
    result = CliRunner().invoke(run_command, [str(test), "--logs", str(tmp_path / "logs")])
    assert result.exit_code == 1, result.output
    assert "could not start" in result.output and "list.remove" not in result.output
    assert "next: skip" in result.output and not (tmp_path / "ran").exists()


@pytest.mark.parametrize(
    ("wait", "kept"), [(1e10, MAX_WAIT), (math.inf, MAX_WAIT), (math.nan, 0.0), (-3.0, 0.0), (0.5, 0.5)]
)
def test_no_wait_is_endless(wait, kept):
    assert bounded_wait(wait) == kept


# --------------------------------------------------------------------------
# fdkeeper run, cancelled
# --------------------------------------------------------------------------

WAITING_TEST = """
name: cancel-me
sut: embedded
transport: tcp
steps:
  - name: register
    sipp: -sf ${{scenarios}}/uac-register.xml -inf {users} -t t1 -i 127.0.0.1 -m 1 ${{sut}}
    expect: {{successful: 1, failed: 0}}
  - name: answer
    after: register
    sipp: -sf ${{scenarios}}/uas-answer.xml -t t1 -i 127.0.0.1 -p ${{free_port:answer}} -m 1 ${{sut}}
  - name: waiter                                   # a group of two: the whole group must end
    ready: answer
    command: "sh -c 'sleep 600 & sleep 600'"
  - name: later
    after: waiter
    command: "true"
"""


@pytest.fixture
def short_tmpdir() -> Iterator[Path]:
    """TMPDIR for the run: short (the keeper's socket path must fit in 108 bytes) and its own,
    so its fdkr-* directory is found, and seen gone."""
    directory = Path(tempfile.mkdtemp(prefix="k4c-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def wait_for(path: Path, process: subprocess.Popen[str], timeout: float, text: str = "") -> None:
    """Until ``path`` exists and holds ``text``; fails if the process ends first or ``timeout``
    seconds pass (the process is then stopped as a CI would, SIGTERM, so it cleans up)."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text()):
        if process.poll() is not None or time.monotonic() > deadline:
            process.terminate()
            ended(process, CLEANED_WITHIN)
            raise AssertionError(f"{path} without {text!r} after {timeout:g} s")
        time.sleep(0.1)


def ended(process: subprocess.Popen[str], timeout: float) -> int:
    """The process's exit status, once it ended (killed after ``timeout`` seconds: a failure)."""
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"pid {process.pid} did not end within {timeout:g} s of the signal") from None


def keeper_processes(directory: Path) -> list[psutil.Process]:
    """The keepers serving state directories under ``directory`` (started detached: not in the
    run's process tree)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(str(directory) in part for part in process.info["cmdline"] or []):
            found.append(process)
    return found


def left_running(processes: list[psutil.Process], timeout: float = 3.0) -> list[str]:
    """Those of ``processes`` still running after ``timeout`` seconds at most. A zombie has
    ended (where pid 1 does not reap, as in some containers, the killed ones stay zombies)."""
    deadline = time.monotonic() + timeout
    while True:
        running = []
        for process in processes:
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    running.append(f"{process.pid} {process.name()}")
            except psutil.NoSuchProcess:
                continue
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.1)


# Each signal alone; then a second one (a CI's SIGTERM after its SIGINT, a second Ctrl-C) while
# the run cleans up after the first: ignored, the first one's cleanup and status stand.
@pytest.mark.parametrize(
    "signals",
    [(signal.SIGTERM,), (signal.SIGHUP,), (signal.SIGINT,), (signal.SIGINT, signal.SIGTERM)],
    ids=lambda signals: "-then-".join(signal.Signals(signum).name for signum in signals),
)
def test_a_cancelled_run_leaves_nothing_behind_and_reports_what_ran(tmp_path, short_tmpdir, signals):
    signum, *repeats = signals
    users = REPO / "docs" / "examples" / "users-alice.csv"
    test = tmp_path / "cancel-me.yaml"
    test.write_text(WAITING_TEST.format(users=users))
    junit, out, err = tmp_path / "report.xml", tmp_path / "run.out", tmp_path / "run.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        run = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fdkeeper",
                "run",
                str(test),
                "--logs",
                str(tmp_path / "logs"),
                "--junit",
                str(junit),
            ],
            stdout=stdout,
            stderr=stderr,
            text=True,
            env={**os.environ, "TMPDIR": str(short_tmpdir)},
        )
    wait_for(out, run, STARTED_WITHIN, "waiter: started")
    [workdir] = list(short_tmpdir.glob("fdkr-*"))
    tree = psutil.Process(run.pid).children(recursive=True)  # steps, sipp, Kamailio's processes
    keepers = keeper_processes(workdir)
    assert any("kamailio" in process.name() for process in tree), [process.name() for process in tree]
    assert any(process.name() == "sipp" for process in tree) and keepers, out.read_text()

    run.send_signal(signum)
    for repeat in repeats:
        time.sleep(0.1)
        run.send_signal(repeat)
    status = ended(run, CLEANED_WITHIN)
    assert status == 128 + signum, f"{out.read_text()}\n{err.read_text()}"
    assert f"cancelled by {signal.Signals(signum).name}" in err.read_text()
    assert left_running([*tree, *keepers]) == []
    assert not list(short_tmpdir.iterdir()), "the run's temporary directory is left"

    report = ET.parse(junit).getroot()
    cases = report.findall(".//testcase")
    assert cases and signal.Signals(signum).name in ET.tostring(report, encoding="unicode")
    for case in cases:  # nothing that was cut short reads as passed (per step: 'register' did pass)
        if case.get("name") != "register":
            assert any(case.find(kind) is not None for kind in ("error", "skipped", "failure")), ET.tostring(case)


# --------------------------------------------------------------------------
# the pytest plugin's fixtures, pytest interrupted
# --------------------------------------------------------------------------

INNER_TEST = """
import json, os, time
from fdkeeper.testbed import free_port

def test_answers_until_interrupted(sipp, kamailio_sut, fdkeeper_keeper, tmp_path):
    users = kamailio_sut.users_csv(tmp_path / "users.csv", ["alice"])
    address = kamailio_sut.address
    assert sipp.run("-sf", "uac-register.xml", "-inf", users, "-t", "t1", "-i", "127.0.0.1", "-m", "1", address).ok
    answer = sipp.start("-sf", "uas-answer.xml", "-t", "t1", "-i", "127.0.0.1", "-p", free_port(), "-m", "1", address)
    answer.wait_ready()
    with open(os.environ["K4_MARK"], "w") as mark:
        json.dump({"keeper": str(fdkeeper_keeper.directory)}, mark)
    time.sleep(600)
"""


INNER_PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "fdkeeper.pytest_plugin"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda signum: signal.Signals(signum).name)
def test_an_interrupted_pytest_stops_the_fixtures_sipp_keeper_and_kamailio(tmp_path, short_tmpdir, signum):
    (tmp_path / "test_inner.py").write_text(INNER_TEST)
    mark, out = tmp_path / "mark.json", tmp_path / "inner.out"
    with open(out, "w") as output:
        inner = subprocess.Popen(
            [*INNER_PYTEST, "--basetemp", str(tmp_path / "inner"), "test_inner.py"],
            cwd=tmp_path,
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
            env={
                **os.environ,
                "TMPDIR": str(short_tmpdir),
                "K4_MARK": str(mark),
                "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
            },
        )
    wait_for(mark, inner, STARTED_WITHIN)
    keeper_dir = Path(json.loads(mark.read_text())["keeper"])
    tree = psutil.Process(inner.pid).children(recursive=True)  # fdkeeper sipp, sipp, Kamailio's processes
    keepers = keeper_processes(keeper_dir)
    assert any("kamailio" in process.name() for process in tree) and keepers

    inner.send_signal(signum)
    assert ended(inner, CLEANED_WITHIN) == pytest.ExitCode.INTERRUPTED, out.read_text()
    assert left_running([*tree, *keepers]) == []
    assert not list(short_tmpdir.iterdir()), "a fixture's temporary directory is left"


# --------------------------------------------------------------------------
# docs/ci/register-answer.sh: a later command fails
# --------------------------------------------------------------------------


def listening_on(port: int) -> list[int | None]:
    return [
        conn.pid
        for conn in psutil.net_connections(kind="tcp")
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN
    ]


def test_the_shell_pattern_stops_its_answer_run_when_a_later_command_fails(sipp_path, kamailio, keeper_dir, tmp_path):
    users = testbed.write_users_csv(tmp_path / "users.csv", ["alice"], kamailio.domain)
    port = testbed.free_port()
    # the call fails: `set -e` ends the script while the answer run listens
    env = register_answer_env(sipp_path, kamailio, keeper_dir, users, caller="false", answer_port=port)
    done = subprocess.run(
        ["sh", str(REGISTER_ANSWER_SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 1, f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    assert (tmp_path / "answer.ready").exists(), done.stderr  # it was listening when `false` failed
    assert listening_on(port) == []


def test_a_signal_during_the_fixtures_cleanup_waits_until_it_is_done():
    guard = _InterruptGuard()
    before = signal.getsignal(signal.SIGTERM)
    guard.hold()
    cleaned: list[str] = []

    def cleanup() -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # a CI cancel in the middle of the cleanup
        time.sleep(0.1)
        cleaned.append("done")

    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        guard.clean_up(cleanup)
    assert cleaned == ["done"] and signal.getsignal(signal.SIGTERM) == before
