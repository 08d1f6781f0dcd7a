"""What a keeper leaves in its state directory: the lock that makes it the only one, and the
record (keeper.state) that lets the next run say it died.

The record (pid, start, last sign of life, connection count) is rewritten as the keeper runs and
removed by a clean stop; one left with nobody holding the lock is a dead keeper's
(statedir.dead_keeper_notice).
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path
from typing import IO

from fdkeeper.errors import FdkeeperError
from fdkeeper.statedir import (
    LOCK_NAME,
    describe_dead_keeper,
    open_private_file,
    remove_keeper_record,
    take_keeper_record,
    write_keeper_record,
)

log = logging.getLogger("fdkeeper.keeper")

# The record is rewritten this often: its "last known alive" after a SIGKILL.
RECORD_SECONDS = 5.0


def take_lock(directory: Path, patience: float) -> IO[str]:
    """One keeper per directory: a second one finds the lock taken and says by whom.

    ``patience``: how long to wait for a keeper that is exiting (or a client testing the lock).
    """
    lock = open_private_file(directory, LOCK_NAME, "a+")  # never through a planted link
    deadline = time.monotonic() + patience
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.02)
                continue
            lock.seek(0)
            owner = lock.read().strip() or "unknown"
            lock.close()
            raise FdkeeperError(
                f"fdkeeper: a keeper already runs for {directory} (pid {owner}); "
                f"use it, or end it with 'fdkeeper stop --dir {directory}'"
            ) from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


class KeeperRecord:
    """keeper.state of the running keeper: who it is and how many connections die with it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started_at = time.time()
        self._count = -1
        self._written_at = 0.0

    def say_if_the_last_keeper_died(self) -> None:
        """Called with the lock held: a record left here is a dead keeper's; say so in our log."""
        record = take_keeper_record(self.directory)
        if record is not None:
            log.warning("%s", describe_dead_keeper(self.directory, record).removeprefix("fdkeeper: "))

    def update(self, connections: int) -> None:
        """Rewrite it when the number of connections changed or RECORD_SECONDS passed."""
        if connections == self._count and time.monotonic() - self._written_at < RECORD_SECONDS:
            return
        self._count = connections
        self._written_at = time.monotonic()
        record = {"pid": os.getpid(), "started": self.started_at, "alive": time.time(), "connections": connections}
        try:
            write_keeper_record(self.directory, record)
        except (OSError, FdkeeperError) as error:  # out of descriptors or disk: the next tick tries again
            log.warning("cannot write the keeper record: %s", error)

    def remove(self) -> None:
        remove_keeper_record(self.directory)
