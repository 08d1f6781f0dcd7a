"""`fdkeeper sut`: the embedded SuT in the foreground, and the README's "Using it" commands
run as written from the repository root against it (ports swapped for free ones, so the test
runs beside others). SIGTERM stops it cleanly: status 0, Kamailio gone, its port free again."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fdkeeper import testbed
from tests.support.paths import REPO


def readme_using_it() -> tuple[str, str]:
    """The README's "Using it" shell blocks: the SuT's command (run in another terminal) and the
    commands pasted after it. Read from the README itself, so what it shows is what runs here."""
    section = (REPO / "README.md").read_text().split("\n## Using it", 1)[1].split("\n## ", 1)[0]
    sut_block, commands = re.findall(r"```sh\n(.*?)```", section, re.S)[:2]
    return sut_block.strip(), commands


# Ports 5060, 5061 and 5070 in them are replaced by free ones here.
README_SUT, README_USING_IT = readme_using_it()
STARTED = "Ctrl-C stops it."


@dataclass
class RunningSut:
    process: subprocess.Popen[str]
    banner: str
    ports: dict[int, int]  # the README's port -> the one used here

    def localised(self, text: str) -> str:
        return re.sub(r"\b(5060|5061|5070)\b", lambda m: str(self.ports[int(m.group(1))]), text)


def other_free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(testbed.free_port())
    return sorted(ports)


@pytest.fixture
def sut(tmp_path: Path) -> Iterator[RunningSut]:
    ports = dict(zip((5060, 5061, 5070), other_free_ports(3), strict=True))
    command = README_SUT.replace("5060", str(ports[5060])).replace("5061", str(ports[5061])).split()[1:]
    process = subprocess.Popen(
        [sys.executable, "-m", "fdkeeper", *command, "--pki", str(tmp_path / "pki")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        if STARTED in line:
            break
    else:
        pytest.fail(f"fdkeeper sut did not start:\n{''.join(lines)}", pytrace=False)
    try:
        yield RunningSut(process, "".join(lines), ports)
    finally:
        stop(process)


def stop(process: subprocess.Popen[str]) -> None:
    """SIGTERM first: fdkeeper sut stops its Kamailio (in a session of its own, which a SIGKILL
    of this group would leave running); SIGKILL only if it does not end in time."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_sut_prints_where_it_listens_and_pasteable_commands(sut: RunningSut, tmp_path: Path) -> None:
    port, tls_port = sut.ports[5060], sut.ports[5061]
    assert f"UDP and TCP  127.0.0.1:{port}" in sut.banner and f"TLS          127.0.0.1:{tls_port}" in sut.banner
    assert "domain fdkeeper.test" in sut.banner and (tmp_path / "pki" / "ca.crt").exists()
    assert f"--tls-ca {tmp_path / 'pki' / 'ca.crt'} --tls-sni sut.test" in sut.banner
    assert "-inf scenarios/users.csv" in sut.banner  # from the repository root: its own paths


def run_from_the_root(script: str, keeper_dir: Path) -> subprocess.CompletedProcess[str]:
    """Shell lines as a user pastes them at the repository root, this checkout's fdkeeper on PATH."""
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    result = subprocess.run(
        ["bash", "-c", f"set -e\n{script}"],
        cwd=REPO,
        env={**os.environ, "FDKEEPER_DIR": str(keeper_dir), "PATH": path},
        stdin=subprocess.PIPE,  # open and silent, like a terminal nobody types in: sipp polls it
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    return result


def test_the_printed_tls_and_websocket_commands_register(sut: RunningSut, tmp_path: Path) -> None:
    """The banner's register commands over TLS, WS and WSS, as printed (one kept connection each)."""
    commands = [
        line.strip() for line in sut.banner.splitlines() if "uac-register.xml" in line and " -t t1 " not in line
    ]
    commands += [line.strip() for line in sut.banner.splitlines() if "--ws " in line and " -t t1 " in line]
    assert len(commands) == 3, sut.banner  # TLS, WSS, WS
    run_from_the_root("\n".join([*commands, "fdkeeper stop"]), tmp_path / "keeper")


def test_the_readmes_using_it_runs_as_written_and_sigterm_stops_the_sut(sut: RunningSut, tmp_path: Path) -> None:
    result = run_from_the_root(sut.localised(README_USING_IT), tmp_path / "keeper")
    # set -e: the caller's sipp exited 0, so the call was answered (by the answer run: nobody else could)
    assert "idle" in result.stdout  # fdkeeper status: the kept connection, free again
    assert "keeper for" in result.stdout and "stopped" in result.stdout

    sut.process.send_signal(signal.SIGTERM)
    assert sut.process.wait(30) == 0
    assert sut.process.stdout is not None and "fdkeeper sut: stopped (SIGTERM)" in sut.process.stdout.read()
    deadline = time.monotonic() + 10
    while True:  # Kamailio gone: its port can be bound again
        try:
            with socket.create_server(("127.0.0.1", sut.ports[5060])):
                break
        except OSError:
            assert time.monotonic() < deadline, "Kamailio still holds its port after fdkeeper sut stopped"
            time.sleep(0.2)
