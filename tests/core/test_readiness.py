"""fdkeeper.readiness: a server run is ready when it holds the keeper's lease and listens;
and saying "ready" through a file or a descriptor."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from fdkeeper import readiness, testbed
from fdkeeper.client import KeeperClient
from fdkeeper.demo import start_through_fdkeeper
from fdkeeper.errors import FdkeeperError
from tests.support.shell_pattern import REGISTER_ANSWER_SCRIPT, register_answer_env


def test_announce_ready_writes_the_file_whole_and_the_descriptor(tmp_path):
    read_end, write_end = os.pipe()
    path = tmp_path / "answer.ready"
    readiness.announce_ready(ready_file=path, ready_fd=write_end)
    assert path.read_text() == f"ready {os.getpid()}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["answer.ready"]  # no temporary left
    assert os.read(read_end, 100) == b"ready\n" and os.read(read_end, 100) == b""  # written, then closed
    os.close(read_end)


def test_a_run_that_ends_first_is_never_ready(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    with pytest.raises(FdkeeperError, match="ended before it was ready"):
        readiness.wait_ready(process.pid, tmp_path / "keeper", timeout=10)
    process.wait()


def test_a_run_without_a_lease_times_out(tmp_path):
    process = subprocess.Popen(["tail", "-f", "/dev/null"])
    try:
        with pytest.raises(TimeoutError, match=r"not ready to receive within 0\.3 s"):
            readiness.wait_ready(process.pid, tmp_path / "keeper", timeout=0.3)
    finally:
        process.kill()
        process.wait()


def test_an_answer_run_is_ready_once_it_holds_the_lease_and_listens(sipp_path, kamailio, keeper_dir, tmp_path):
    users = testbed.write_users_csv(tmp_path / "users.csv", ["alice"], kamailio.domain)
    logs = tmp_path / "logs"
    register = start_through_fdkeeper(
        sipp_path,
        "uac-register.xml",
        kamailio.address,
        directory=keeper_dir,
        log_dir=logs,
        name="register",
        transport="t1",
        calls=1,
        timeout=15,
        extra=["-inf", str(users)],
    ).wait(30)
    assert register.ok, register.summary()
    answer = start_through_fdkeeper(
        sipp_path,
        "uas-answer.xml",
        kamailio.address,
        directory=keeper_dir,
        log_dir=logs,
        name="answer",
        transport="t1",
        calls=1,
        timeout=30,
        local_port=testbed.free_port(),
    )
    readiness.wait_ready(answer.pid, keeper_dir, timeout=15)  # answer.pid is `fdkeeper sipp`; sipp is its child

    [connection] = KeeperClient(keeper_dir).status()["connections"]
    sipp = psutil.Process(connection["holder_pid"])
    assert sipp.ppid() == answer.pid and "sipp" in sipp.name()
    assert any(s.status == psutil.CONN_LISTEN for s in sipp.net_connections(kind="tcp"))
    call = testbed.place_calls(kamailio, "alice", 1, sipp=sipp_path, timeout=15, log_dir=logs)
    answered = answer.wait(30)
    assert call.ok, call.summary()
    assert answered.ok, answered.summary()


SHELL_PATTERN = REGISTER_ANSWER_SCRIPT


def test_the_documented_shell_pattern_registers_waits_for_readiness_and_answers(
    sipp_path, kamailio, keeper_dir, tmp_path
):
    """docs/ci/register-answer.sh, as documented: no sleep, the answer run's --ready-file."""
    users = testbed.write_users_csv(tmp_path / "users.csv", ["alice"], kamailio.domain)
    caller = (
        f"{sipp_path} -sf {testbed.SCENARIOS_DIR}/uac-call.xml -s alice -key domain {kamailio.domain} "
        f"-t u1 -i 127.0.0.1 -m 1 -timeout 15 -timeout_error -nostdin {kamailio.address}"
    )
    env = register_answer_env(sipp_path, kamailio, keeper_dir, users, caller, testbed.free_port())
    done = subprocess.run(["sh", str(SHELL_PATTERN)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    assert (tmp_path / "answer.ready").read_text().startswith("ready ")
    assert not re.search(r"\bsleep\s+[1-9]", SHELL_PATTERN.read_text())  # a bounded poll, never a fixed wait


def run_with_ready_fd(sipp_path, keeper_dir, tmp_path, users, transport, address) -> tuple[bytes, str]:
    """`fdkeeper sipp --ready-fd N` registering alice: what came through N, and stderr."""
    read_end, write_end = os.pipe()
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "fdkeeper"),
            "sipp",
            "--sipp",
            sipp_path,
            "--dir",
            str(keeper_dir),
            "--ready-fd",
            str(write_end),
            "--ready-timeout",
            "5",
            "-sf",
            str(testbed.SCENARIOS_DIR / "uac-register.xml"),
            "-inf",
            str(users),
            "-t",
            transport,
            "-i",
            "127.0.0.1",
            "-m",
            "1",
            "-timeout",
            "10",
            "-timeout_error",
            "-nostdin",
            address,
        ],
        pass_fds=[write_end],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    os.close(write_end)
    said = os.read(read_end, 100)
    os.close(read_end)
    assert done.returncode == 0, done.stderr
    return said, done.stderr


def test_ready_fd_says_ready_in_one_line_or_closes_it_and_says_why(sipp_path, kamailio, keeper_dir, tmp_path):
    users = testbed.write_users_csv(tmp_path / "users.csv", ["alice"], kamailio.domain)
    said, stderr = run_with_ready_fd(sipp_path, keeper_dir, tmp_path, users, "t1", kamailio.address)
    assert said == b"ready\n", stderr  # it held the kept connection and listened
    # UDP passes straight through: no kept connection is ever handed over, so never ready.
    said, stderr = run_with_ready_fd(sipp_path, keeper_dir, tmp_path, users, "u1", kamailio.address)
    assert said == b""  # closed without a line: a reader is not left waiting
    assert [line for line in stderr.splitlines() if "not signalled" in line] == [
        "fdkeeper: sipp ended before it was ready to receive; --ready-fd not signalled"
    ]
