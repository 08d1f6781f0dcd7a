"""Running sipp without a terminal, for tests, benches and the demo.

`start_sipp`/`run_sipp` run one sipp with every output in files and return a
`SippProcess`/`SippResult`; `place_calls` is a third-party caller over UDP through the
SuT; `write_users_csv` writes a -inf file. The sipp binary is found by
fdkeeper.sipp.runner.find_sipp (--sipp, else $FDKEEPER_SIPP, else PATH).
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fdkeeper.errors import FdkeeperError
from fdkeeper.testbed.net import DEFAULT_DOMAIN

if TYPE_CHECKING:
    from fdkeeper.testbed.kamailio import Kamailio


def _scenarios_dir() -> Path:
    """scenarios/ of a source checkout, or fdkeeper/scenarios when installed
    (pyproject maps the repo's scenarios/ onto the fdkeeper.scenarios package)."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "scenarios", package.parent / "scenarios"):
        if (candidate / "uac-call.xml").is_file():
            return candidate
    return package.parent / "scenarios"


# The sipp scenarios shipped with the project.
SCENARIOS_DIR = _scenarios_dir()


def find_sipp(sipp: str | None = None) -> str:
    """fdkeeper.sipp.runner.find_sipp as a str, raising RuntimeError (what tests and
    benches catch) when there is no sipp."""
    # Imported here: the runner brings in the keeper client and the modes, which the
    # rest of the testbed does not need.
    from fdkeeper.sipp import runner

    try:
        return os.fspath(runner.find_sipp(sipp))
    except FdkeeperError as error:
        raise RuntimeError(str(error)) from error


def fdkeeper_command(sipp_cmd: list[str], directory: Path, *options: str) -> list[str]:
    """Turn a sipp command line (sipp binary first) into the same run through `fdkeeper sipp`."""
    return [
        sys.executable,
        "-m",
        "fdkeeper",
        "sipp",
        "--dir",
        os.fspath(directory),
        "--sipp",
        sipp_cmd[0],
        *options,
        *sipp_cmd[1:],
    ]


@dataclass
class SippResult:
    """What a finished sipp run left behind (counts from its -trace_stat file)."""

    returncode: int | None  # sipp's exit status (negative: killed by signal)
    successful: int  # SuccessfulCall(C)
    failed: int  # FailedCall(C)
    log_dir: Path
    name: str
    command: list[str] = field(default_factory=list)
    stats: dict[str, str] = field(default_factory=dict)  # last -trace_stat row

    def count(self, column: str) -> int:
        """A cumulative counter, e.g. count("IncomingCall(C)")."""
        try:
            return int(self.stats.get(column, "0") or 0)
        except ValueError:
            return 0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.failed == 0 and self.successful > 0

    def file(self, kind: str) -> Path:
        """kind: stat, errors, screen, messages, stdout, stderr."""
        suffix = {"stat": "stat.csv"}.get(kind, f"{kind}.log")
        return self.log_dir / f"{self.name}.{suffix}"

    def text(self, kind: str) -> str:
        try:
            return self.file(kind).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def summary(self, lines: int = 30) -> str:
        """A block for assertion messages: status, counts, and log tails."""
        parts = [
            f"sipp {self.name}: exit {self.returncode}, successful {self.successful}, "
            f"failed {self.failed}; logs in {self.log_dir}",
            "command: " + " ".join(self.command),
        ]
        for kind in ("stderr", "errors", "screen"):
            text = self.text(kind).strip()
            if text:
                tail = "\n".join(text.splitlines()[-lines:])
                parts.append(f"--- {kind} ---\n{tail}")
        return "\n".join(parts)


# place_calls() returns the same record; the API calls it CallResult.
CallResult = SippResult


# sipp exit codes (include/defines.h): 0 all calls OK, 1 some failed,
# 97 internal command / timeout without success, 99 no call processed,
# 255 (-1) fatal error, 254 (-2) cannot bind.
SIPP_EXIT_OK = 0
SIPP_EXIT_FAILED = 1


def sipp_command(
    sipp: str,
    scenario: str | Path,
    remote: str,
    *,
    log_dir: Path,
    name: str,
    transport: str = "u1",
    local_ip: str = "127.0.0.1",
    local_port: int | None = None,
    calls: int | None = 1,
    rate: float | None = None,
    timeout: float | None = None,
    trace_messages: bool = True,
    extra: Sequence[str] = (),
) -> list[str]:
    """Build a sipp command line that runs without a terminal.

    Terminal-less: sipp 3.6.1 draws no curses screen when stdout is not a
    tty (ScreenPrinter's headless mode), so we only need `-nostdin` (it would
    otherwise poll stdin for keyboard commands) and files for everything:
    -trace_stat/-stf (counts, dumped every -fd second and at exit),
    -trace_screen/-screen_file (final report), -trace_err/-error_file and
    -trace_msg/-message_file. No -bg: it forks and the parent exits, which
    would lose the exit status.
    `-i local_ip` also skips sipp's UDP-connect probe for its own address.
    trace_messages=False drops -trace_msg (large runs: it logs every message).
    """
    scenario = Path(scenario)
    if not scenario.is_absolute() and not scenario.exists():
        scenario = SCENARIOS_DIR / scenario
    cmd = [
        sipp,
        "-sf",
        str(scenario),
        "-t",
        transport,
        "-i",
        local_ip,
        "-nostdin",
        "-trace_stat",
        "-stf",
        str(log_dir / f"{name}.stat.csv"),
        "-fd",
        "1",
        "-trace_screen",
        "-screen_file",
        str(log_dir / f"{name}.screen.log"),
        "-trace_err",
        "-error_file",
        str(log_dir / f"{name}.errors.log"),
    ]
    if trace_messages:
        cmd += ["-trace_msg", "-message_file", str(log_dir / f"{name}.messages.log")]
    if local_port is not None:
        cmd += ["-p", str(local_port)]
    if calls is not None:
        cmd += ["-m", str(calls)]
    if rate is not None:
        cmd += ["-r", f"{rate:g}"]
    if timeout is not None:
        # -timeout_error: a run cut short by the global timeout is a failure.
        cmd += ["-timeout", f"{max(1, int(timeout))}s", "-timeout_error"]
    cmd += list(extra)
    cmd.append(remote)
    return cmd


class SippProcess:
    """A sipp run in the background (e.g. a UAS waiting for calls)."""

    def __init__(self, cmd: list[str], log_dir: Path, name: str, env: dict[str, str] | None = None) -> None:
        self.cmd = cmd
        self.log_dir = log_dir
        self.name = name
        self._stdout = open(log_dir / f"{name}.stdout.log", "wb")  # noqa: SIM115 - closed in wait()
        self._stderr = open(log_dir / f"{name}.stderr.log", "wb")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._stdout,
            stderr=self._stderr,
            cwd=log_dir,
            env=env,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float | None = None) -> SippResult:
        """Wait for exit; on timeout, SIGTERM it (sipp then still writes its
        final stats) and return with what it reported."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return self.terminate()
        return self._result()

    def terminate(self, grace: float = 5.0) -> SippResult:
        """SIGTERM (sipp exits through its normal path, dumping stats), then
        SIGKILL if it does not go."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self._result()

    def _result(self) -> SippResult:
        for handle in (self._stdout, self._stderr):
            handle.close()
        stats = read_sipp_stats(self.log_dir / f"{self.name}.stat.csv")
        result = SippResult(self.proc.returncode, 0, 0, self.log_dir, self.name, self.cmd, stats)
        result.successful = result.count("SuccessfulCall(C)")
        result.failed = result.count("FailedCall(C)")
        return result


def start_sipp(
    sipp: str,
    scenario: str | Path,
    remote: str,
    *,
    log_dir: Path,
    name: str | None = None,
    env: dict[str, str] | None = None,
    **options: Any,
) -> SippProcess:
    """Start sipp in the background with terminal-less flags (see sipp_command; options are its)."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    name = name or f"{Path(scenario).stem}-{uuid.uuid4().hex[:6]}"
    cmd = sipp_command(find_sipp(sipp), scenario, remote, log_dir=log_dir, name=name, **options)
    return SippProcess(cmd, log_dir, name, env)


def run_sipp(
    sipp: str,
    scenario: str | Path,
    remote: str,
    *,
    log_dir: Path,
    name: str | None = None,
    wait: float = 30.0,
    env: dict[str, str] | None = None,
    **options: Any,
) -> SippResult:
    """Run sipp to completion (at most `wait` seconds) and return its result."""
    return start_sipp(sipp, scenario, remote, log_dir=log_dir, name=name, env=env, **options).wait(wait)


def read_sipp_stats(stat_file: Path) -> dict[str, str]:
    """The last row of a -trace_stat file as {column: value}; {} if sipp never
    wrote one (e.g. it died on a fatal error before its first dump).

    sipp writes the header and a row at start, one every -fd second and a
    final one on exit (also on SIGTERM), so the last row holds the totals.
    """
    try:
        with open(stat_file, newline="") as handle:
            rows = [row for row in csv.reader(handle, delimiter=";") if row]
    except FileNotFoundError:
        return {}
    if len(rows) < 2:
        return {}
    return dict(zip(rows[0], rows[-1], strict=False))


def write_users_csv(
    path: Path, users: Iterable[str], domain: str = DEFAULT_DOMAIN, passwords: Mapping[str, str] | None = None
) -> Path:
    """A SEQUENTIAL -inf file: user;domain per line ([field0];[field1]), and with
    `passwords` user;domain;password ([field2], what the register scenarios answer a
    401 challenge with)."""
    lines = ["SEQUENTIAL"] + [
        f"{user};{domain};{passwords[user]}" if passwords else f"{user};{domain}" for user in users
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def read_users_passwords(path: Path) -> dict[str, str]:
    """{user: password} of a users CSV (user;domain;password lines, as write_users_csv
    writes them). Raises ValueError naming the file and line of a user without one."""
    users: dict[str, str] = {}
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"cannot read the users file {path}: {error.strerror}") from None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#") or line.split(",")[0] in _CSV_ORDERS:
            continue
        fields = line.split(";")
        if len(fields) < 3 or not fields[2]:
            raise ValueError(f"{path} line {number}: expected user;domain;password, got {line!r}")
        users[fields[0]] = fields[2]
    if not users:
        raise ValueError(f"{path}: no user;domain;password lines")
    return users


# The first line of a sipp -inf file says how its lines are taken.
_CSV_ORDERS = ("SEQUENTIAL", "RANDOM", "USER")


# The From user of the caller scenarios (uac-call.xml, uac-call-users.xml).
CALLER = "caller"


def caller_credentials(sut: Kamailio) -> list[str]:
    """sipp's -au/-ap for the caller scenarios when the SuT wants credentials (its
    `auth_users` has the caller), else nothing."""
    if sut.auth_users is None or CALLER not in sut.auth_users:
        return []
    return ["-au", CALLER, "-ap", sut.auth_users[CALLER]]


def place_calls(
    sut: Kamailio,
    user: str,
    count: int = 1,
    *,
    sipp: str = "sipp",
    rate: float | None = None,
    timeout: float = 30,
    log_dir: Path | None = None,
    call_id: str | None = None,
) -> CallResult:
    """Call sip:USER@domain `count` times through the SuT, as a third party.

    Runs a plain sipp over UDP (no fdkeeper on this side) with
    scenarios/uac-call.xml and waits for it. The result's `ok` is True when
    every call was answered and hung up cleanly. A SuT with auth gets the
    caller's credentials (caller_credentials).
    `call_id` is passed as sipp's -cid_str (see uac-register-then-answer.xml:
    a client-mode callee only accepts a Call-ID it already knows).
    """
    log_dir = Path(log_dir) if log_dir else sut.workdir / "calls"
    extra = ["-s", user, "-key", "domain", sut.domain, *caller_credentials(sut)]
    if call_id is not None:
        extra += ["-cid_str", call_id]
    return run_sipp(
        sipp,
        "uac-call.xml",
        sut.address,
        log_dir=log_dir,
        name=f"call-{user}-{uuid.uuid4().hex[:6]}",
        wait=timeout + 10,
        transport="u1",
        local_ip=sut.host,
        calls=count,
        rate=rate,
        timeout=timeout,
        trace_messages=count <= 50,
        extra=extra,
    )


def start_calls(
    sut: Kamailio,
    users: Sequence[str],
    *,
    log_dir: Path,
    name: str,
    sipp: str = "sipp",
    local_port: int | None = None,
    rate: float = 50,
    timeout: float = 30,
) -> SippProcess:
    """Call each of `users` once through the SuT, as a third party, in the background: a plain
    sipp over UDP (scenarios/uac-call-users.xml, one call per user, in order). `local_port`
    is its -p (sipps side by side race for sipp's default 5060 without one)."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    users_csv = write_users_csv(log_dir / f"{name}.users.csv", users, sut.domain)
    return start_sipp(
        sipp,
        "uac-call-users.xml",
        sut.address,
        log_dir=log_dir,
        name=name,
        transport="u1",
        local_ip=sut.host,
        local_port=local_port,
        calls=len(users),
        rate=rate,
        timeout=timeout,
        extra=["-inf", str(users_csv), *caller_credentials(sut)],
    )


def sipp_build(name: str) -> Path:
    """One of the sipp 3.7.7 builds kept beside the project for tests and benches
    (``sipp-tls``: dynamic with TLS; ``sipp-static``): $FDKEEPER_SIPP_BUILDS/NAME, else
    shared/sipp-3.7.7/NAME beside the checkout, else /work/shared/sipp-3.7.7/NAME.
    The path may not exist: callers skip what needs it."""
    checkout = Path(__file__).resolve().parents[2]
    candidates = [Path(os.environ["FDKEEPER_SIPP_BUILDS"]) / name] if os.environ.get("FDKEEPER_SIPP_BUILDS") else []
    candidates += [checkout.parent / "shared" / "sipp-3.7.7" / name, Path("/work/shared/sipp-3.7.7") / name]
    return next((path for path in candidates if path.is_file()), candidates[-1])
