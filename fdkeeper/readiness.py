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
import time
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


def wait_ready(pid: int, keeper_dir: Path, timeout: float) -> None:
    """Return once the run ``pid`` is ready to receive (see the module's doc).

    Raises FdkeeperError when the run ends first, TimeoutError after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not is_ready(pid, keeper_dir):
        if not psutil.pid_exists(pid) or _is_zombie(pid):
            raise FdkeeperError(f"fdkeeper: the run (pid {pid}) ended before it was ready to receive")
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"fdkeeper: the run (pid {pid}) was not ready to receive within {timeout:g} s "
                f"(no lease from the keeper in {keeper_dir} with a listening socket)"
            )
        time.sleep(POLL_INTERVAL)


def _is_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def announce_ready(ready_file: str | os.PathLike | None = None, ready_fd: int | None = None) -> None:
    """Say "ready": write the file atomically (a reader never sees it half-written) and/or
    write one line to the descriptor and close it (a reader's read returns at once)."""
    if ready_file is not None:
        path = Path(ready_file)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(f"ready {os.getpid()}\n")
        os.replace(temporary, path)
    if ready_fd is not None:
        try:
            os.write(ready_fd, b"ready\n")
        finally:
            os.close(ready_fd)
