"""The pytest plugin (fdkeeper.pytest_plugin), used as a user would: test files run by
pytester in a pytest of their own, with the plugin's fixtures, real sipp and Kamailio."""

from __future__ import annotations

import importlib.util

import pytest

from tests.support.paths import REPO, TESTS
from tests.support.plugin import documented_example, plugin_options

pytest_plugins = ["pytester"]

REGISTER_ANSWER = """
import pytest
from fdkeeper.testbed import free_port

@pytest.mark.parametrize("transport", ["tcp", "tls", "ws", "wss"])
def test_register_then_answer(sipp, kamailio_sut, fdkeeper_keeper, tmp_path, transport):
    target = kamailio_sut.target(transport)  # address, -t, fdkeeper sipp's options (--ws, --tls-*)
    users = kamailio_sut.users_csv(tmp_path / "users.csv", ["alice"])
    register = sipp.run("-sf", "uac-register.xml", "-inf", users, "-t", target.sipp_transport, "-i", "127.0.0.1",
                        "-m", "1", target.address, options=target.options, timeout=30)
    assert register.ok and register.successful == 1, register.tail()
    [connection] = fdkeeper_keeper.connections()
    assert connection["state"] == "idle" and connection["transport"] == transport

    answer = sipp.start("-sf", "uas-answer.xml", "-t", target.sipp_transport, "-i", "127.0.0.1", "-p", str(free_port()),
                        "-m", "2", target.address, options=target.options, name="answer")
    answer.wait_ready()
    call = kamailio_sut.call("alice", 2)
    answered = answer.wait(30)
    assert call.ok and call.successful == 2, call.summary()
    assert answered.ok and (answered.successful, answered.failed) == (2, 0), answered.tail()
    assert answered.files["stat"].exists() and answered.out.exists()


def test_many_users_each_on_a_kept_connection(sipp, kamailio_sut, fdkeeper_keeper, tmp_path):
    count = "50"
    users = kamailio_sut.users_csv(tmp_path / "users.csv", [f"user{i:03d}" for i in range(1, 51)])
    register = sipp.run("-sf", "uac-register.xml", "-inf", users, "-t", "tn", "-i", "127.0.0.1", "-m", count, "-l", count,
                        "-r", "100", "-max_socket", "1000", kamailio_sut.address)
    assert register.ok and register.successful == 50, register.tail()
    assert len(fdkeeper_keeper.connections()) == 50
    answer = sipp.start("-sf", "uas-answer.xml", "-t", "tn", "-i", "127.0.0.1", "-p", str(free_port()), "-m", count,
                        "-max_socket", "1000", kamailio_sut.address)
    answer.wait_ready()
    calls = sipp.run("-sf", "uac-call-users.xml", "-inf", users, "-t", "u1", "-i", "127.0.0.1", "-m", count, "-r", "50",
                     kamailio_sut.address)  # UDP: through fdkeeper unchanged
    answered = answer.wait(60)
    assert calls.ok and calls.successful == 50, calls.tail()
    assert answered.ok and answered.successful == 50, answered.tail()
"""

FAILING = """
def test_fails_after_a_run(sipp, kamailio_sut, tmp_path):
    users = kamailio_sut.users_csv(tmp_path / "users.csv", ["alice"])
    assert sipp.run("-sf", "uac-register.xml", "-inf", users, "-t", "t1", "-i", "127.0.0.1", "-m", "1", kamailio_sut.address).ok
    assert False, "deliberately"

def test_passes_with_a_keeper(fdkeeper_keeper):
    assert fdkeeper_keeper.directory.name == "keeper"
"""


def side_by_side() -> list[str]:
    """-n 2 when pytest-xdist is installed (each worker its own keeper, state directory and
    Kamailio), else nothing: the same tests, one after another."""
    return ["-n", "2"] if importlib.util.find_spec("xdist") is not None else []


def test_register_answer_and_many_users_with_the_fixtures_side_by_side(pytester):
    """Every REGISTER_ANSWER test and the plugin's documented example (twice, as two users' files)
    pass through the fixtures, two at a time under xdist: one run proves both (a worker still runs
    several tests one after another on its session's fixtures, as a serial run does)."""
    example = documented_example()
    pytester.makepyfile(
        test_user=REGISTER_ANSWER,
        test_one=example,
        test_two=example.replace("def test_register_then_answer", "def test_register_then_answer_2"),
    )
    result = pytester.runpytest_subprocess(*plugin_options(), "-p", "no:cacheprovider", *side_by_side(), timeout=300)
    result.assert_outcomes(passed=7)


def test_a_failing_test_reports_the_keepers_log(pytester):
    pytester.makepyfile(test_user=FAILING)
    result = pytester.runpytest_subprocess(*plugin_options(), "-p", "no:cacheprovider", "-rA", timeout=300)
    result.assert_outcomes(passed=1, failed=1)
    output = result.stdout.str()
    section = output.split("fdkeeper keeper log", 1)
    assert len(section) == 2, output
    assert "leased" in section[1] or "PREPARE" in section[1] or "opened" in section[1], output
    assert output.count("fdkeeper keeper log") == 1  # the passing test has none


def test_the_suites_own_plugin_tests_pass_side_by_side_with_xdist():
    """The register/answer and many-user tests, written with the plugin's fixtures, under -n 2:
    every worker has its own keeper, state directory and Kamailio ports."""
    import subprocess
    import sys

    pytest.importorskip("xdist")
    e2e = TESTS / "e2e"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-n",
            "2",
            "-p",
            "no:cacheprovider",
            f"{e2e}/test_e2e_tcp.py::test_register_then_answer_over_the_kept_connection",
            f"{e2e}/test_e2e_many_users.py::test_fifty_tls_users_each_on_its_own_connection",
            f"{e2e}/test_e2e_many_users.py::test_a_third_dropped_by_the_sut",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "3 passed" in result.stdout
