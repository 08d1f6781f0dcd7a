"""fdkeeper.readiness: a server run is ready when it holds the keeper's lease and listens;
and saying "ready" through a file or a descriptor."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from fdkeeper import readiness, testbed
from fdkeeper.client import KeeperClient
from fdkeeper.demo import start_through_fdkeeper
from fdkeeper.errors import FdkeeperError


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
        with pytest.raises(TimeoutError, match="not ready to receive within 0.3 s"):
            readiness.wait_ready(process.pid, tmp_path / "keeper", timeout=0.3)
    finally:
        process.kill()
        process.wait()


def test_an_answer_run_is_ready_once_it_holds_the_lease_and_listens(sipp_path, kamailio, keeper_dir, tmp_path):
    users = testbed.write_users_csv(tmp_path / "users.csv", ["alice"], kamailio.domain)
    logs = tmp_path / "logs"
    register = start_through_fdkeeper(sipp_path, "uac-register.xml", kamailio.address, directory=keeper_dir, log_dir=logs,
                                      name="register", transport="t1", calls=1, timeout=15, extra=["-inf", str(users)]).wait(30)
    assert register.ok, register.summary()
    answer = start_through_fdkeeper(sipp_path, "uas-answer.xml", kamailio.address, directory=keeper_dir, log_dir=logs,
                                    name="answer", transport="t1", calls=1, timeout=30, local_port=testbed.free_port())
    readiness.wait_ready(answer.pid, keeper_dir, timeout=15)  # answer.pid is `fdkeeper sipp`; sipp is its child

    [connection] = KeeperClient(keeper_dir).status()["connections"]
    sipp = psutil.Process(connection["holder_pid"])
    assert sipp.ppid() == answer.pid and "sipp" in sipp.name()
    assert any(s.status == psutil.CONN_LISTEN for s in sipp.net_connections(kind="tcp"))
    call = testbed.place_calls(kamailio, "alice", 1, sipp=sipp_path, timeout=15, log_dir=logs)
    answered = answer.wait(30)
    assert call.ok, call.summary()
    assert answered.ok, answered.summary()
