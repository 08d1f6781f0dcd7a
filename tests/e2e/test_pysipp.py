"""pysipp (SIPp's Python launcher) with `fdkeeper sipp` as its command prefix.

pysipp renders each sipp command from a template that starts with `{prefix} {bin_path}`;
with the prefix `fdkeeper sipp --dir DIR --sipp` the sipp binary pysipp found becomes the
value of fdkeeper's --sipp and every run goes through the keeper.

pysipp 0.1.0 (the one on the package index) imports pluggy's long-gone `implprefix`
argument, so it needs pluggy < 1.0, which pytest itself cannot use: it is installed into a
directory of its own and drives sipp from a subprocess (the driver below).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fdkeeper import readiness, testbed

DRIVER = """
import sys, pysipp
prefix, host, port, users, logdir, answer_port, scenarios = sys.argv[1:8]
# (no logdir=: pysipp 0.1.0 cannot set it; sipp writes its files in the working directory)
common = dict(prefix=prefix, transport="t1", local_host="127.0.0.1", destaddr=(host, int(port)))
register = pysipp.client(scen_file=scenarios + "/uac-register.xml", info_file=users, call_count=1, **common)
register(timeout=30)
print("registered", flush=True)
answer = pysipp.server(scen_file=scenarios + "/uas-answer.xml", local_port=int(answer_port), call_count=1, **common)
finalize = answer(block=False, timeout=30)
sys.stdin.readline()  # the test placed its call
finalize(timeout=30)
print("answered", flush=True)
"""


# The package index may be unreachable (an offline CI runner): then skip, quickly.
INSTALL_TIMEOUT = 20


@pytest.fixture(scope="session")
def pysipp_dir(tmp_path_factory) -> Path:
    """pysipp 0.1.0 with the pluggy it works with, from the package index (skipped when the
    index cannot be reached within INSTALL_TIMEOUT seconds)."""
    target = tmp_path_factory.mktemp("pysipp")
    try:
        install = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--timeout",
                "5",
                "--retries",
                "1",
                "--target",
                str(target),
                "pysipp==0.1.0",
                "pluggy<1.0",
            ],
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"pysipp could not be installed from the package index within {INSTALL_TIMEOUT} s")
    if install.returncode != 0:
        pytest.skip(f"pysipp could not be installed from the package index: {install.stderr.strip().splitlines()[-1:]}")
    return target


@pytest.fixture
def fdkeeper_sipp_prefix(tmp_path, keeper_dir) -> str:
    """The one-word prefix `fdkeeper-sipp` (fdkeeper.cli:sipp_main, `fdkeeper sipp --sipp`),
    as the console script would install it; the keeper's directory comes from FDKEEPER_DIR."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "fdkeeper-sipp"
    script.write_text(f"#!{sys.executable}\nfrom fdkeeper.cli import sipp_main\nsipp_main()\n")
    script.chmod(0o755)
    return str(bin_dir)


def test_pysipp_registers_and_answers_through_fdkeeper(
    pysipp_dir, fdkeeper_sipp_prefix, sipp_path, kamailio, keeper_dir, tmp_path
):
    users = testbed.write_users_csv(tmp_path / "users.csv", ["alice"], kamailio.domain)
    logs = tmp_path / "logs"
    logs.mkdir()
    # pysipp 0.1.0 renders the prefix as ONE single-quoted word ('{prefix}'): a one-word
    # command, `fdkeeper-sipp`, which is `fdkeeper sipp --sipp` (pysipp's sipp path follows).
    prefix = "fdkeeper-sipp"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(pysipp_dir), os.environ.get("PYTHONPATH")])),
        "PATH": os.pathsep.join([fdkeeper_sipp_prefix, os.path.dirname(sipp_path), os.environ.get("PATH", "")]),
        "FDKEEPER_DIR": str(keeper_dir),
    }
    driver = subprocess.Popen(
        [
            sys.executable,
            "-c",
            DRIVER,
            prefix,
            kamailio.host,
            str(kamailio.port),
            str(users),
            str(logs),
            str(testbed.free_port()),
            str(testbed.SCENARIOS_DIR),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=logs,
    )
    try:
        assert driver.stdout.readline() == "registered\n", driver.stderr.read() if driver.poll() is not None else ""
        readiness.wait_ready(driver.pid, keeper_dir, timeout=15)  # pysipp's server run, through fdkeeper
        call = testbed.place_calls(kamailio, "alice", 1, sipp=sipp_path, timeout=15, log_dir=logs)
        out, err = driver.communicate("go\n", timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert call.ok, call.summary()
    assert driver.returncode == 0 and out.strip() == "answered", err
    assert len(kamailio.tcp_connections()) == 1  # the register run's connection, kept
