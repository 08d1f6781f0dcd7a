"""Readiness of a server run: waiting for it instead of sleeping, and saying it.

A server sipp run through fdkeeper is ready to receive when both hold:
- the keeper has handed it the kept connections (its status shows leases held by the
  sipp process), so requests the SuT sends now reach this run;
- sipp's own listening socket is up (the process has a TCP socket in LISTEN), so sipp has
  finished its start-up and reads what it was handed.

The pid given may be sipp's or that of the `fdkeeper sipp` process that runs sipp as its
child: the run and its descendants are looked at together (the keeper a run may have
started is never a lease holder, so it does not count).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from fdkeeper.client import KeeperClient
from fdkeeper.errors import FdkeeperError

POLL_INTERVAL = 0.05


def run_pids(pid: int) -> set[int]:
    """``pid`` and its live descendants; empty once the process is gone."""
    try:
        process = psutil.Process(pid)
        return {pid, *(child.pid for child in process.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


def lease_holders(keeper_dir: Path) -> set[int]:
    """Pids that hold a kept connection now; empty while no keeper answers."""
    try:
        connections = KeeperClient(Path(keeper_dir), timeout=2.0).status()["connections"]
    except (OSError, FdkeeperError):
        return set()
    return {c["holder_pid"] for c in connections if c.get("holder_pid") and c.get("state") != "closed"}


def listening_pids(pids: set[int]) -> set[int]:
    """The pids among ``pids`` with a TCP socket in LISTEN."""
    found = set()
    for pid in pids:
        try:
            sockets = psutil.Process(pid).net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(s.status == psutil.CONN_LISTEN for s in sockets):
            found.add(pid)
    return found


def is_ready(pid: int, keeper_dir: Path) -> bool:
    """True when the run ``pid`` (or its sipp child) holds a lease and listens."""
    pids = run_pids(pid)
    holders = lease_holders(keeper_dir) & pids if pids else set()
    return bool(holders and listening_pids(holders))


def wait_ready(pid: int, keeper_dir: Path, timeout: float, ended: threading.Event | None = None) -> None:
    """Return once the run ``pid`` is ready to receive (see the module's doc).

    Raises FdkeeperError when the run ends first (or ``ended`` is set: the caller saw it
    end), TimeoutError after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    pause = ended or threading.Event()
    while not is_ready(pid, keeper_dir):
        if pause.is_set() or not psutil.pid_exists(pid) or _is_zombie(pid):
            raise FdkeeperError(f"fdkeeper: the run (pid {pid}) ended before it was ready to receive")
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"fdkeeper: the run (pid {pid}) was not ready to receive within {timeout:g} s "
                f"(no lease from the keeper in {keeper_dir} with a listening socket)"
            )
        pause.wait(POLL_INTERVAL)


def _is_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@dataclass(frozen=True)
class ReadySignal:
    """How `fdkeeper sipp --ready-file/--ready-fd` says that its run is ready to receive."""

    file: Path | None = None
    fd: int | None = None
    timeout: float = 30.0

    def check(self) -> None:
        """Before the run: a stale file from an earlier run must not say "ready" for this one,
        and the descriptor must be open."""
        if self.file is not None:
            self.file.unlink(missing_ok=True)
        if self.fd is not None:
            try:
                os.fstat(self.fd)
            except OSError:
                raise FdkeeperError(
                    f"fdkeeper: --ready-fd {self.fd} is not an open descriptor; open it in the shell, e.g. 3>answer.ready"
                ) from None


@contextmanager
def announcing_readiness(signal: ReadySignal | None, keeper_dir: Path) -> Iterator[None]:
    """While the body runs this process's sipp run (a child), announce once it is ready.

    The waiting is done in a thread because the body blocks until sipp ends. When readiness
    is never reached (the run ended first, or ``signal.timeout`` passed) one line says so
    and the descriptor is closed without a line, so a reader is not left waiting.
    """
    if signal is None:
        yield
        return
    signal.check()
    ended, failed = threading.Event(), threading.Event()
    waiter = threading.Thread(
        target=_announce_when_ready, args=(signal, keeper_dir, ended, failed), daemon=True, name="fdkeeper-readiness"
    )
    waiter.start()
    try:
        yield
    except BaseException:
        failed.set()  # the run's own error says enough
        raise
    finally:
        ended.set()
        waiter.join(timeout=5)


def _announce_when_ready(
    signal: ReadySignal, keeper_dir: Path, ended: threading.Event, failed: threading.Event
) -> None:
    try:
        wait_ready(os.getpid(), keeper_dir, signal.timeout, ended)
    except (FdkeeperError, TimeoutError) as error:
        if signal.fd is not None:
            os.close(signal.fd)
        if failed.is_set():
            return
        why = (
            "ended before it was ready to receive"
            if isinstance(error, FdkeeperError)
            else (
                f"was not ready to receive within {signal.timeout:g} s (no kept connection handed to it while it listens)"
            )
        )
        named = " and ".join(
            option for option, given in (("--ready-file", signal.file), ("--ready-fd", signal.fd)) if given is not None
        )
        print(f"fdkeeper: sipp {why}; {named} not signalled", file=sys.stderr, flush=True)
        return
    announce_ready(signal.file, signal.fd)


def announce_ready(ready_file: str | os.PathLike[str] | None = None, ready_fd: int | None = None) -> None:
    """Say "ready": write the file atomically (a reader never sees it half-written) and/or
    write one line to the descriptor and close it (a reader's read returns at once)."""
    if ready_file is not None:
        path = Path(ready_file)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w") as file:
            file.write(f"ready {os.getpid()}\n")
        os.replace(temporary, path)
    if ready_fd is not None:
        try:
            os.write(ready_fd, b"ready\n")
        finally:
            os.close(ready_fd)
