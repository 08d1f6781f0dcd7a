"""`fdkeeper run` with a SuT of the test's own: a Kamailio configuration, or any command
with a readiness condition (real Kamailio, real sipp).

The runner starts it, waits (bounded) until it is ready, runs the steps against it and
stops its whole process group; a SuT that exits or never becomes ready is one line saying
so, within its timeout, and leaves no process behind.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from fdkeeper.testbed.process import find_program
from tests.support.paths import REPO

EXAMPLES = REPO / "docs" / "examples"

# The register / answer / call story of the examples, against whatever ${sut} is.
STORY = """
vars:
  users: {users}
steps:
  - name: register
    sipp: -sf ${{scenarios}}/uac-register.xml -inf ${{users}} -t t1 -i 127.0.0.1 -m 1 ${{sut}}
    timeout: 20
    expect: {{successful: 1, failed: 0}}
  - name: answer
    after: register
    sipp: -sf ${{scenarios}}/uas-answer.xml -t t1 -i 127.0.0.1 -p ${{free_port:answer}} -m 1 ${{sut}}
    timeout: 20
    expect: {{successful: 1}}
  - name: call
    ready: answer
    sipp: -sf ${{scenarios}}/uac-call.xml -s alice -key domain ${{domain}} -t u1 -i 127.0.0.1 -m 1 ${{sut}}
    timeout: 20
    expect: {{successful: 1, failed: 0}}
"""


def run(test_file: Path, logs: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fdkeeper", "run", str(test_file), "--logs", str(logs)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def processes_with(marker: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(marker in part for part in process.info["cmdline"] or ()):
            found.append(process)
    return found


def test_a_test_with_its_own_kamailio_config(tmp_path):
    """The shipped example: Kamailio with own-kamailio.cfg on a free port (${sut_port})."""
    result = run(EXAMPLES / "own-kamailio.yaml", tmp_path / "logs")
    assert result.returncode == 0, result.stdout + result.stderr
    log = next((tmp_path / "logs").glob("*/own-kamailio/kamailio.log")).read_text()
    assert "Listening on" in log  # the SuT's own output, in the test's log folder


def test_a_command_sut_ready_by_tcp(tmp_path):
    """Any command: here Kamailio itself, with its listeners on the command line
    (-l), ready once its TCP port accepts."""
    config = (EXAMPLES / "own-kamailio.cfg").read_text()
    (tmp_path / "no-listen.cfg").write_text(re.sub(r"(?m)^listen=.*\n", "", config))
    test_file = tmp_path / "command-sut.yaml"
    kamailio = find_program("kamailio", "kamailio")
    test_file.write_text(
        "sut:\n"
        f"  command: {kamailio} -f no-listen.cfg -DD -E -l udp:127.0.0.1:${{sut_port}} "
        "-l tcp:127.0.0.1:${sut_port} -w ${sut_dir} -Y ${sut_dir}\n"
        "  ready: tcp:${sut_port}\n" + STORY.format(users=EXAMPLES / "users-alice.csv")
    )
    result = run(test_file, tmp_path / "logs")
    assert result.returncode == 0, result.stdout + result.stderr
    assert next((tmp_path / "logs").glob("*/command-sut/sut.log")).stat().st_size > 0


def run_with_sut(tmp_path: Path, name: str, sut: str) -> tuple[int, str]:
    """`fdkeeper run` of a test named `name` with the `sut:` block `sut` and one step that
    does nothing: (exit status, console output)."""
    test_file = tmp_path / f"{name}.yaml"
    test_file.write_text(f"sut:\n{sut}steps:\n  - name: one\n    command: 'true'\n")
    result = run(test_file, tmp_path / "logs")
    return result.returncode, result.stdout + result.stderr


def test_a_sut_that_never_becomes_ready_fails_within_its_timeout(tmp_path):
    marker = f"fdkeeper-test-{uuid.uuid4().hex}"
    started = time.monotonic()
    status, output = run_with_sut(
        tmp_path,
        "never-ready",
        f"  command: [python3, -c, 'import time; time.sleep(60)', '{marker}']\n  ready: tcp:${{sut_port}}\n"
        "  timeout: 1\n",
    )
    assert status != 0 and time.monotonic() - started < 10
    assert re.search(r"was not ready within 1 s \(sut: timeout\): nothing accepted TCP on 127\.0\.0\.1:\d+", output), (
        output
    )
    assert not processes_with(marker), "the SuT's process outlived the test"


def test_a_sut_that_exits_says_why(tmp_path):
    status, output = run_with_sut(
        tmp_path, "exits", "  command: [sh, -c, 'echo bad setting on line 3 >&2; exit 3']\n  ready: tcp:${sut_port}\n"
    )
    assert status != 0
    assert "exited with status 3 before it was ready: bad setting on line 3" in output, output


def test_a_sut_whose_port_was_taken_is_started_again_on_new_ports(tmp_path):
    status, output = run_with_sut(
        tmp_path,
        "port-taken",
        "  command: [sh, -c, 'echo port ${sut_port}: Address already in use; exit 1']\n  ready: tcp:${sut_port}\n",
    )
    assert status != 0 and "Address already in use (on 3 tries with new free ports" in output, output
    ports = re.findall(r"port (\d+):", next((tmp_path / "logs").glob("*/port-taken/sut.log")).read_text())
    assert len(set(ports)) == 3


def test_a_sut_ready_by_a_line_of_its_output(tmp_path):
    marker = f"fdkeeper-test-{uuid.uuid4().hex}"
    test_file = tmp_path / "log-ready.yaml"
    test_file.write_text(
        "sut:\n"
        f"  command: [sh, -c, 'sleep 0.3; echo server up; exec sleep 60', '{marker}']\n"
        "  ready: 'log: ^server up$'\n"
        "  address: 127.0.0.1:${sut_port}\n"
        "steps:\n  - name: one\n    command: [grep, -q, 'server up', '${logs}/sut.log']\n"
    )
    result = run(test_file, tmp_path / "logs")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not processes_with(marker)


@pytest.mark.parametrize("name", ["own-kamailio.yaml", "register-answer-auth.yaml"])
def test_the_new_examples_are_listed_in_the_examples_readme(name):
    assert f"`{name}`" in (EXAMPLES / "README.md").read_text()
