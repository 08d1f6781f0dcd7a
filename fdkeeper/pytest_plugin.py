"""pytest plugin (entry point `pytest11`): a keeper, sipp runs through it, the embedded SuT.

Fixtures:
- ``fdkeeper_keeper``: a keeper state directory of the test's own (so `pytest -n` with
  pytest-xdist runs tests side by side), stopped with `fdkeeper stop --dir` after the
  test; when the test fails, the keeper's log is attached to its report.
- ``sipp``: runs sipp through `fdkeeper sipp --dir <that keeper>`:
  ``sipp.run(*args, timeout=60)`` waits and returns a result (``exit``, ``successful`` and
  ``failed`` calls from sipp's statistics, ``out``/``err``/``files`` log paths, ``ok``,
  ``tail()``); ``sipp.start(*args)`` returns a handle with ``pid``, ``wait_ready()``,
  ``wait()`` and ``stop()``. sipp's trace files land in the test's ``tmp_path/sipp``.
- ``kamailio_sut``: the embedded Kamailio (fdkeeper.testbed), listening on TCP (``address``),
  TLS (``tls_address``, with ``tls_options`` for `fdkeeper sipp`), WebSocket (``ws_address``)
  and secure WebSocket (``wss_address``); ``target(transport)`` says how `fdkeeper sipp`
  reaches it over "tcp", "tls", "ws" or "wss" (address, -t, options); ``call()`` places
  calls to a registered user through it.

    from fdkeeper.testbed import free_port

    def test_register_then_answer(sipp, kamailio_sut, tmp_path):
        users = kamailio_sut.users_csv(tmp_path / "users.csv", ["alice"])
        assert sipp.run("-sf", "uac-register.xml", "-inf", users, "-t", "t1", "-m", "1", kamailio_sut.address).ok
        answer = sipp.start("-sf", "uas-answer.xml", "-t", "t1", "-p", free_port(), "-m", "1", kamailio_sut.address)
        answer.wait_ready()
        assert kamailio_sut.call("alice").ok and answer.wait().successful == 1

(a free port for the answering run, not a fixed one: tests under `pytest -n` run side by side.)

Interrupted (Ctrl-C, or SIGTERM/SIGHUP, which the fixtures turn into the same
KeyboardInterrupt while they are alive), pytest tears the fixtures down: the sipp runs'
process groups, the keeper and Kamailio are stopped and their temporary directories
removed. A signal during that cleanup waits until it is done (see _InterruptGuard).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pluggy
import pytest

from fdkeeper import readiness, testbed
from fdkeeper.client import KeeperClient
from fdkeeper.errors import FdkeeperError
from fdkeeper.process import FORWARDED_SIGNALS
from fdkeeper.statedir import LOG_NAME
from fdkeeper.testbed.process import missing_websocket_module
from fdkeeper.testrun.interrupt import CANCEL_GRACE
from fdkeeper.testrun.model import DEFAULT_TIMEOUT, Step
from fdkeeper.testrun.results import StepResult
from fdkeeper.testrun.steps import StepContext, StepRun, stop_groups
from fdkeeper.testrun.sut import embedded_kamailio
from fdkeeper.testrun.testcase import stop_keeper
from fdkeeper.testrun.transport import ONE_CONNECTION, TRANSPORTS, WEBSOCKET_FLAG, has_tls, has_websocket

POLL = 0.05
READY_TIMEOUT = 15.0


class Keeper:
    """A keeper state directory of one test; the keeper starts with the first sipp run."""

    def __init__(self, directory: Path, kept_log: Path) -> None:
        self.directory = directory
        self.kept_log = kept_log  # where the log is copied when the test ends

    @property
    def log_path(self) -> Path:
        return self.directory / LOG_NAME

    def log_text(self) -> str:
        for path in (self.log_path, self.kept_log):
            try:
                return path.read_text(errors="replace")
            except OSError:
                continue
        return ""

    def status(self) -> dict[str, Any]:
        """The keeper's STATUS reply, as JSON decodes it."""
        return KeeperClient(self.directory).status()

    def connections(self) -> list[dict[str, Any]]:
        connections: list[dict[str, Any]] = self.status()["connections"]
        return connections

    def stop(self) -> None:
        stop_keeper(self.directory, self.kept_log)


class SippRun:
    """A sipp run started through the keeper."""

    def __init__(self, run: StepRun, keeper: Keeper) -> None:
        self._run = run
        self._keeper = keeper

    @property
    def pid(self) -> int:
        """The `fdkeeper sipp` process (sipp is its child)."""
        return self._run.pid

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until this server run holds the kept connections and listens (see fdkeeper.readiness)."""
        try:
            readiness.wait_ready(self.pid, self._keeper.directory, timeout)
        except (FdkeeperError, TimeoutError) as error:
            raise type(error)(f"{error}\n{StepResult('', '', out=self._run.out, err=self._run.err).tail()}") from None

    def wait(self, timeout: float | None = None) -> StepResult:
        """Until the run ends (killed after its timeout, or ``timeout`` seconds from now)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._run.poll() is None:
            if self._run.check_timeout():
                break
            if deadline is not None and time.monotonic() > deadline:
                self._run.timed_out = True
                self._run.stop()
                break
            time.sleep(POLL)
        return self._run.result()

    def stop(self) -> StepResult:
        self._run.stop()
        return self._run.result()


class Sipp:
    """The ``sipp`` fixture: runs through `fdkeeper sipp --dir <the test's keeper>`."""

    def __init__(self, keeper: Keeper, sipp_path: str, log_dir: Path) -> None:
        self.keeper = keeper
        self.sipp_path = sipp_path
        self.log_dir = log_dir
        self.runs: list[SippRun] = []

    def start(
        self, *args: object, name: str | None = None, options: tuple[str, ...] = (), timeout: float = DEFAULT_TIMEOUT
    ) -> SippRun:
        """Start sipp with ``args`` (a scenario name alone is one of fdkeeper's scenarios);
        ``options`` are fdkeeper sipp's own (e.g. --tls-ca)."""
        arguments = _with_shipped_scenarios([os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args])
        step = Step(
            name=name or f"sipp-{len(self.runs) + 1}",
            kind="sipp",
            args=arguments,
            options=list(options),
            timeout=timeout,
        )
        # sipp runs in the test's working directory: relative paths mean what they mean there.
        context = StepContext(
            here=Path.cwd(),
            logs=self.log_dir,
            keeper_dir=self.keeper.directory,
            sipp=self.sipp_path,
            values={},
            free_port=lambda _label: testbed.free_port(),
            substitute=False,
        )
        with _GUARD.deferring():  # started and recorded together, so the fixture stops it
            run = SippRun(StepRun(step, context), self.keeper)
            self.runs.append(run)
        return run

    def run(
        self, *args: object, timeout: float = DEFAULT_TIMEOUT, name: str | None = None, options: tuple[str, ...] = ()
    ) -> StepResult:
        return self.start(*args, name=name, options=options, timeout=timeout).wait()

    def stop_all(self) -> None:
        """End the process groups of the runs still going, together (SIGTERM, SIGKILL 2 s later)."""
        stop_groups([run._run for run in self.runs], CANCEL_GRACE)


def _with_shipped_scenarios(args: list[str]) -> list[str]:
    """-sf NAME.xml names a scenario shipped with fdkeeper when no such file is here."""
    for index, arg in enumerate(args[:-1]):
        if arg == "-sf" and not os.path.isabs(args[index + 1]) and not os.path.exists(args[index + 1]):
            shipped = testbed.SCENARIOS_DIR / args[index + 1]
            if shipped.exists():
                args[index + 1] = os.fspath(shipped)
    return args


@dataclass(frozen=True)
class SutTarget:
    """How `fdkeeper sipp` reaches the SuT over one transport: ``address`` (sipp's remote host),
    ``sipp_transport`` (its -t for one connection, t1 or l1; tn/ln give one per user) and
    ``options`` (fdkeeper sipp's own: --ws, --tls-ca, --tls-sni)."""

    address: str
    sipp_transport: str
    options: tuple[str, ...]


@dataclass
class EmbeddedSut:
    """The ``kamailio_sut`` fixture's value."""

    kamailio: testbed.Kamailio
    pki: testbed.TestPki
    sipp_path: str
    log_dir: Path

    @property
    def address(self) -> str:
        return self.kamailio.address

    @property
    def tls_address(self) -> str:
        return _listening(self.kamailio.tls_address, self.kamailio, "TLS")

    @property
    def ws_address(self) -> str:
        return _listening(self.kamailio.ws_address, self.kamailio, "WS")

    @property
    def wss_address(self) -> str:
        return _listening(self.kamailio.wss_address, self.kamailio, "WSS")

    def target(self, transport: str) -> SutTarget:
        """How `fdkeeper sipp` reaches this SuT over "tcp", "tls", "ws" (SIP over WebSocket) or
        "wss" (over secure WebSocket): ``sipp.run(..., "-t", t.sipp_transport, t.address,
        options=t.options)``."""
        if transport not in TRANSPORTS:
            raise ValueError(f"transport {transport!r}: one of {', '.join(TRANSPORTS)}")
        addresses = {"tcp": self.address, "tls": self.kamailio.tls_address}
        addresses.update(ws=self.kamailio.ws_address, wss=self.kamailio.wss_address)
        options: tuple[str, ...] = (WEBSOCKET_FLAG,) if has_websocket(transport) else ()
        options += self.tls_options if has_tls(transport) else ()
        address = _listening(addresses[transport], self.kamailio, transport.upper())
        return SutTarget(address, ONE_CONNECTION[transport], options)

    @property
    def domain(self) -> str:
        return self.kamailio.domain

    @property
    def tls_options(self) -> tuple[str, ...]:
        """`fdkeeper sipp` options that verify this SuT's TLS certificate."""
        return ("--tls-ca", os.fspath(self.pki.ca_cert), "--tls-sni", self.pki.server_name)

    def users_csv(self, path: Path, users: list[str]) -> Path:
        return testbed.write_users_csv(path, users, self.domain)

    def call(self, user: str, count: int = 1, timeout: float = 30) -> testbed.SippResult:
        """A third party calls sip:USER@domain through the SuT (plain sipp over UDP)."""
        return testbed.place_calls(
            self.kamailio, user, count, sipp=self.sipp_path, timeout=timeout, log_dir=self.log_dir
        )


def _listening(address: str | None, kamailio: testbed.Kamailio, kind: str) -> str:
    if address is None:  # the fixture's SuT has every listener this machine's Kamailio can give
        why = missing_websocket_module() if kind in ("WS", "WSS") else None
        raise RuntimeError(f"{kamailio} has no {kind} listener{f': {why}' if why else ''}")
    return address


_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class _InterruptGuard:
    """While a fixture of this plugin is alive: SIGTERM and SIGHUP interrupt pytest as Ctrl-C
    does (a KeyboardInterrupt, after which pytest tears the fixtures down; by default SIGTERM
    would end pytest on the spot and leave sipp, the keeper and Kamailio running), and the
    fixtures' cleanup is not cut short: once the first signal interrupted pytest the others
    are ignored, and a signal that arrives while the fixtures clean up after a test waits
    until the last of them is done (one that arrives while a sipp run is started waits until
    the run is recorded for its stop). Signal handlers belong to the main thread: elsewhere
    (a test running fixtures in a thread) nothing is changed."""

    def __init__(self) -> None:
        self.holders = 0
        self.previous: dict[int, _Handler] = {}
        self.cleaning = False  # a fixture cleans up: signals wait until the last one is done
        self.starting = False  # a run is started: signals wait until it is recorded
        self.deferred: int | None = None
        self.interrupted = False

    def hold(self) -> None:
        if self.holders == 0 and threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self._on_signal) for signum in FORWARDED_SIGNALS}
        self.holders += 1

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.interrupted:
            return
        if self.cleaning or self.starting:
            self.deferred = self.deferred or signum
            return
        self.interrupted = True
        raise KeyboardInterrupt(f"fdkeeper: {signal.Signals(signum).name}")

    @contextlib.contextmanager
    def deferring(self) -> Iterator[None]:
        """Around starting a process and recording it: a signal waits for the end of the block."""
        self.starting = True
        try:
            yield
        finally:
            self.starting = False
            if self.deferred is not None and not (self.cleaning or self.interrupted):
                signum, self.deferred, self.interrupted = self.deferred, None, True
                raise KeyboardInterrupt(f"fdkeeper: {signal.Signals(signum).name}")

    def clean_up(self, cleanup: Callable[[], None]) -> None:
        """Run one fixture's cleanup with signals held; the last one out restores the handlers
        and delivers a signal that waited (as the KeyboardInterrupt it would have been)."""
        self.cleaning = True
        try:
            cleanup()
        finally:
            self.holders -= 1
            if self.holders == 0:
                deferred = self._release()
                if deferred is not None:
                    raise KeyboardInterrupt(f"fdkeeper: {signal.Signals(deferred).name}")

    def _release(self) -> int | None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        deferred = None if self.interrupted else self.deferred
        self.previous, self.cleaning, self.deferred, self.interrupted = {}, False, None, False
        return deferred


_GUARD = _InterruptGuard()


@contextlib.contextmanager
def _cleaned_up_even_when_interrupted(cleanup: Callable[[], None], directory: Path | None = None) -> Iterator[None]:
    """Around a fixture's life: signals interrupt pytest (see _InterruptGuard), and at its end,
    whatever happened and uninterrupted, ``cleanup`` runs and then ``directory`` is removed."""
    _GUARD.hold()
    try:
        yield
    finally:
        _GUARD.clean_up(lambda: _then_remove(cleanup, directory))


def _then_remove(cleanup: Callable[[], None], directory: Path | None) -> None:
    try:
        cleanup()
    finally:
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def fdkeeper_sipp_path() -> str:
    """The sipp binary ($FDKEEPER_SIPP or PATH)."""
    try:
        return testbed.find_sipp()
    except RuntimeError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture
def fdkeeper_keeper(tmp_path: Path) -> Iterator[Keeper]:
    """A keeper of this test's own (a state directory of its own, so `pytest -n` runs tests side
    by side); it starts with the first sipp run and is stopped after the test. ``directory``,
    ``status()``, ``connections()`` (the kept connections), ``log_text()``; a failing test's
    report carries the keeper's log."""
    # A short directory of its own: the control socket's path must fit in 108 bytes,
    # which pytest's tmp_path does not promise.
    directory = Path(tempfile.mkdtemp(prefix="fdkp-"))
    keeper = Keeper(directory / "keeper", tmp_path / "keeper.log")
    with _cleaned_up_even_when_interrupted(keeper.stop, directory):
        yield keeper


@pytest.fixture
def sipp(fdkeeper_keeper: Keeper, fdkeeper_sipp_path: str, tmp_path: Path) -> Iterator[Sipp]:
    """sipp through `fdkeeper sipp --dir <fdkeeper_keeper>`: ``sipp.run(*args, options=(), timeout=60)``
    waits and returns the result (``ok``, ``exit``, ``successful``, ``failed``, ``out``/``err``/``files``,
    ``tail()``); ``sipp.start(...)`` returns a handle with ``wait_ready()``, ``wait()``, ``stop()``.
    A scenario name alone (``uac-register.xml``) is one of fdkeeper's; logs in ``tmp_path/sipp``;
    runs still going are stopped after the test."""
    log_dir = tmp_path / "sipp"
    log_dir.mkdir(exist_ok=True)
    factory = Sipp(fdkeeper_keeper, fdkeeper_sipp_path, log_dir)
    with _cleaned_up_even_when_interrupted(factory.stop_all):
        yield factory


@pytest.fixture
def kamailio_sut(fdkeeper_sipp_path: str, tmp_path: Path) -> Iterator[EmbeddedSut]:
    """The embedded Kamailio for this test, on free ports: ``address`` (TCP), ``tls_address`` with
    ``tls_options`` (fdkeeper sipp's options to trust its test certificate), ``ws_address`` and
    ``wss_address`` (SIP over WebSocket), ``target(transport)``, ``domain``,
    ``users_csv(path, users)`` for sipp's -inf, ``call(user, count)`` to call a registered user
    through it. Stopped after the test."""
    workdir = Path(tempfile.mkdtemp(prefix="fdks-"))  # Kamailio's ctl socket path must be short too
    started = contextlib.ExitStack()  # Kamailio, once started
    with _cleaned_up_even_when_interrupted(started.close, workdir):
        transport = "wss" if missing_websocket_module() is None else "tls"  # WebSocket where Kamailio can
        kamailio, pki = started.enter_context(embedded_kamailio(transport, workdir, tmp_path))
        if pki is None:  # not met: transports "tls" and "wss" make a PKI
            raise RuntimeError("the embedded TLS SuT came without its test PKI")
        yield EmbeddedSut(kamailio, pki, fdkeeper_sipp_path, tmp_path / "sipp")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pluggy.Result[pytest.TestReport], None]:
    """A failing test that used a keeper gets the keeper's log in its report."""
    outcome = yield
    report = outcome.get_result()
    keeper = getattr(item, "funcargs", {}).get("fdkeeper_keeper")
    if report.failed and isinstance(keeper, Keeper):
        report.sections.append(("fdkeeper keeper log", keeper.log_text() or f"(no log in {keeper.directory})"))
