"""Digest authentication end to end: the embedded SuT with `auth: true` challenges REGISTER
(401) and the caller's INVITE (407); the shipped scenarios answer both. A user registers
over TCP or TLS through fdkeeper in one sipp run and answers a call in the next; a wrong
password is one failing step whose cause names the 403 (real sipp, real Kamailio).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fdkeeper import testbed
from tests.support.paths import REPO

EXAMPLES = REPO / "docs" / "examples"
PASSWORDS = {"alice": "alice-secret", "caller": "caller-secret"}


def run(test_file: Path, logs: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fdkeeper", "run", str(test_file), "--logs", str(logs)],
        capture_output=True,
        text=True,
        timeout=90,
    )


def log_folder(logs: Path, name: str) -> Path:
    return next(logs.glob(f"*/{name}"))


def auth_test_file(tmp_path: Path, transport: str, users: Path) -> Path:
    """register / answer / call against the embedded SuT with auth, over `transport`."""
    tls = transport == "tls"
    remote = "${sut_tls}" if tls else "${sut}"
    sipp_transport = "l1" if tls else "t1"
    options = '    options: [--tls-ca, "${tls_ca}", --tls-sni, "${tls_sni}"]\n' if tls else ""
    path = tmp_path / f"auth-{transport}.yaml"
    path.write_text(
        f"name: auth-{transport}\n"
        f"sut: {{embedded: {{auth: true, users: {EXAMPLES / 'users-auth.csv'}}}}}\n"
        f"transport: {transport}\n"
        "steps:\n"
        "  - name: register\n"
        f"{options}"
        f"    sipp: -sf ${{scenarios}}/uac-register.xml -inf {users} -t {sipp_transport} -i 127.0.0.1 -m 1 {remote}\n"
        "    timeout: 20\n"
        "    expect: {successful: 1, failed: 0}\n"
        "  - name: answer\n"
        "    after: register\n"
        f"    sipp: -sf ${{scenarios}}/uas-answer.xml -t {sipp_transport} -i 127.0.0.1 -p ${{free_port:a}} -m 1 {remote}\n"
        "    timeout: 20\n"
        "    expect: {successful: 1}\n"
        "  - name: call\n"
        "    ready: answer\n"
        "    sipp: -sf ${scenarios}/uac-call.xml -s alice -key domain ${domain} -au caller -ap caller-secret"
        " -t u1 -i 127.0.0.1 -m 1 ${sut}\n"
        "    timeout: 20\n"
        "    expect: {successful: 1, failed: 0}\n"
    )
    return path


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_register_with_auth_then_answer_in_a_second_run(tmp_path, transport):
    result = run(auth_test_file(tmp_path, transport, EXAMPLES / "users-auth.csv"), tmp_path / "logs")
    assert result.returncode == 0, result.stdout + result.stderr
    folder = log_folder(tmp_path / "logs", f"auth-{transport}")
    sut_log = (folder / "kamailio.log").read_text()
    assert "auth: REGISTER from alice accepted" in sut_log
    assert "auth: INVITE from caller accepted" in sut_log
    # Each side was challenged first, and answered the challenge.
    assert "SIP/2.0 401" in (folder / "register.messages.log").read_text()
    assert "SIP/2.0 407" in (folder / "call.messages.log").read_text()


def test_the_shipped_auth_example_passes(tmp_path):
    result = run(EXAMPLES / "register-answer-auth.yaml", tmp_path / "logs")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_wrong_password_is_a_clear_failing_step(tmp_path):
    wrong = testbed.write_users_csv(tmp_path / "wrong.csv", ["alice"], passwords={"alice": "not-her-password"})
    result = run(auth_test_file(tmp_path, "tcp", wrong), tmp_path / "logs")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "register" in output and "403" in output, output
    folder = log_folder(tmp_path / "logs", "auth-tcp")
    assert "auth: REGISTER from alice refused" in (folder / "kamailio.log").read_text()
    assert "SIP/2.0 403 Forbidden: wrong password or unknown user" in (folder / "register.errors.log").read_text()


def test_the_demo_with_auth(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fdkeeper", "demo", "--auth", "--keep-files"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0 and "demo PASSED" in result.stdout, result.stdout + result.stderr
    kept = Path(result.stdout.split("files kept in ")[1].split()[0])
    try:
        sut_log = (kept / "kamailio" / "kamailio.log").read_text()
    finally:
        shutil.rmtree(kept, ignore_errors=True)
    assert "auth: REGISTER from alice accepted" in sut_log and "auth: INVITE from caller accepted" in sut_log
