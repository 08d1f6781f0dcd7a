"""Handoff modes: declared capabilities, and every kind of run under every --mode.

The matrix runs {sipp -t t1, sipp -t tn, exec of a static agent} x {auto, preload, ptrace,
udp} through the `fdkeeper` command against one real Kamailio: each cell either registers
(exit 0) or is refused in one line with exit status 2, never with a traceback.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import fdkeeper.modes as modes
from fdkeeper import testbed
from fdkeeper.cli import main
from fdkeeper.errors import FdkeeperError
from fdkeeper.modes import Capabilities, Handoff, HandoffRequest, Mode, ModeOptions, RunNeeds, choose_mode
from fdkeeper.modes.udp import stop_converters
from tests.support.paths import TESTS

USER = "alice"
AGENT_SOURCE = TESTS / "ptrace" / "sipagent.c"

# ------------------------------------------------------------------ capability filtering (no processes)

TN_CLIENT = RunNeeds(role="client", per_call_option="-t tn")
T1_CLIENT = RunNeeds(role="client")
AGENT = RunNeeds(role="client", sipp=False)


class FakeMode(Mode):
    """A mode that can run anywhere unless told otherwise: only its capabilities decide."""

    def __init__(self, name: str, capabilities: Capabilities, reason: str | None = None) -> None:
        self.name, self.capabilities, self.reason, self.suits = name, capabilities, reason, f"{name} things"

    def unsupported_reason(self, program: Path) -> str | None:
        return self.reason

    def prepare(self, request: HandoffRequest, options: ModeOptions | None = None) -> Handoff:
        raise AssertionError("not called")


@pytest.fixture
def fake_modes(monkeypatch):
    def install(*fakes: FakeMode) -> None:
        monkeypatch.setattr(modes, "MODES", {fake.name: fake for fake in fakes})

    return install


def test_real_modes_declare_what_they_cannot_do():
    preload, ptrace, udp = (modes.MODES[name] for name in ("preload", "ptrace", "udp"))
    assert preload.cannot_do(TN_CLIENT) is None and preload.cannot_do(AGENT) is None
    assert ptrace.cannot_do(TN_CLIENT) is None  # attached under a connect()-only seccomp filter
    assert ptrace.cannot_do(RunNeeds(role="server", per_call_option="-t tn")) is None
    assert "per-call" in udp.cannot_do(TN_CLIENT) and "other than sipp" in udp.cannot_do(AGENT)
    assert "pidfd" in preload.cannot_do(RunNeeds(role="client", transfer="pidfd"))
    assert ptrace.cannot_do(RunNeeds(role="client", transfer="pidfd")) is None
    assert not udp.capabilities.uses_keeper and preload.capabilities.uses_keeper


def test_auto_never_picks_a_mode_that_cannot_do_the_run(fake_modes):
    fake_modes(
        FakeMode("one", Capabilities(any_agent=False, per_call_roles=frozenset())),
        FakeMode("two", Capabilities(per_call_roles=frozenset({"client"}))),
    )
    assert choose_mode("auto", Path("/bin/true"), T1_CLIENT).name == "one"
    assert choose_mode("auto", Path("/bin/true"), TN_CLIENT).name == "two"
    assert choose_mode("auto", Path("/bin/true"), AGENT).name == "two"


def test_capabilities_are_checked_before_the_mode_is_asked(fake_modes):
    fake_modes(
        FakeMode("able", Capabilities(per_call_roles=frozenset({"client"})), reason="not here"),
        FakeMode("unable", Capabilities(), reason="must not be asked"),
    )
    with pytest.raises(FdkeeperError) as refused:
        choose_mode("auto", Path("/bin/true"), TN_CLIENT)
    text = str(refused.value)
    assert "able: not here" in text and "unable: cannot hand over per-call sockets" in text
    assert "must not be asked" not in text


def test_a_named_mode_that_cannot_do_the_run_names_the_modes_that_can(fake_modes):
    fake_modes(
        FakeMode("single", Capabilities()),
        FakeMode("percall", Capabilities(per_call_roles=frozenset({"client"}))),
        FakeMode("also", Capabilities(per_call_roles=frozenset({"client"})), reason="not here"),
    )
    with pytest.raises(FdkeeperError) as refused:
        choose_mode("single", Path("/bin/true"), TN_CLIENT)
    assert str(refused.value) == (
        "fdkeeper: --mode single cannot hand over per-call sockets (-t tn) in the client role; "
        "use --mode percall (percall things) or --mode also (also things)"
    )
    with pytest.raises(FdkeeperError, match="--mode also cannot run /bin/true here: not here"):
        choose_mode("also", Path("/bin/true"), TN_CLIENT)


@pytest.mark.parametrize(
    "argv, says",
    [
        (["exec", "--mode", "udp", "--", "true"], "--mode udp cannot run a program other than sipp"),
        (
            ["sipp", "--mode", "udp", "-t", "tn", "-sn", "uac", "127.0.0.1:5060"],
            "--mode udp cannot hand over per-call sockets (-t tn) in the client role; use --mode preload",
        ),
        (["sipp", "--mode", "preload", "--transfer", "pidfd", "-t", "t1", "127.0.0.1:5060"], "by pidfd"),
        (["exec", "--mode", "nosuch", "--", "true"], "Invalid value for '--mode'"),
        (["exec", "--sut", "localhost", "--", "true"], "--sut localhost: expected IP:PORT"),
        (["sipp", "-t", "t1", "-p", "none", "127.0.0.1"], "-p 'none' is not a port number"),
    ],
)
def test_the_command_refuses_in_one_line(argv, says, tmp_path):
    result = CliRunner().invoke(main, argv, env={"FDKEEPER_DIR": str(tmp_path / "state")})
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fdkeeper: ") and says in lines[0], result.output


# ------------------------------------------------------------------ the matrix against Kamailio

RUNS = ("sipp -t t1", "sipp -t tn", "exec")
MODE_NAMES = ("auto", "preload", "ptrace", "udp")
# What cannot be done by design (Debian's sipp is dynamic, the agent static); the rest runs.
REFUSED = {("sipp -t tn", "udp"), ("exec", "preload"), ("exec", "udp")}
PTRACE_HERE = modes.MODES["ptrace"].unsupported_reason(Path(sys.executable).resolve()) is None


@pytest.fixture(scope="module")
def sut(tmp_path_factory):
    kamailio = testbed.Kamailio(tmp_path_factory.mktemp("modes") / "kamailio")
    kamailio.start()
    yield kamailio
    kamailio.stop()


@pytest.fixture(scope="module")
def static_agent(tmp_path_factory) -> str:
    binary = tmp_path_factory.mktemp("agent") / "sipagent"
    subprocess.run(["gcc", "-static", "-O2", "-pthread", "-o", str(binary), str(AGENT_SOURCE)], check=True)
    return str(binary)


def command_for(run: str, mode: str, sut, agent: str, sipp: str, directory: Path, tmp_path: Path) -> list[str]:
    fdkeeper = [sys.executable, "-m", "fdkeeper"]
    if run == "exec":
        return [
            *fdkeeper,
            "exec",
            "--dir",
            str(directory),
            "--mode",
            mode,
            "--sut",
            sut.address,
            "--",
            agent,
            "register",
            sut.host,
            str(sut.port),
            USER,
            sut.domain,
        ]
    users = testbed.write_users_csv(tmp_path / "users.csv", [USER], sut.domain)
    return [
        *fdkeeper,
        "sipp",
        "--dir",
        str(directory),
        "--sipp",
        sipp,
        "--mode",
        mode,
        "-sf",
        str(testbed.SCENARIOS_DIR / "uac-register.xml"),
        "-inf",
        str(users),
        "-t",
        run.split()[-1],
        "-i",
        "127.0.0.1",
        "-m",
        "1",
        "-max_socket",
        "100",
        "-nostdin",
        "-timeout",
        "15s",
        "-timeout_error",
        sut.address,
    ]


@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("run", RUNS)
def test_every_run_under_every_mode_runs_or_is_refused_in_one_line(
    run, mode, sut, static_agent, sipp_path, keeper_dir, tmp_path
):
    command = command_for(run, mode, sut, static_agent, sipp_path, keeper_dir, tmp_path)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    finally:
        if keeper_dir.exists():
            stop_converters(keeper_dir)
    ptrace_involved = mode == "ptrace" or (run == "exec" and mode == "auto")
    if (run, mode) in REFUSED or (ptrace_involved and not PTRACE_HERE):
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("fdkeeper: "), done.stderr
    else:
        assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
