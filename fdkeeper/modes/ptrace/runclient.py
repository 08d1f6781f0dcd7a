"""The traced run's client of the keeper: one control connection for all of its leases.

A per-call run leases once per call, with the program held at its send. A new control
connection each time (KeeperClient's way) cost a connect here and an accept, a peer check
and a new client in the keeper: about 0.7 ms of the program's wait on a busy machine. As the
shim keeps one connection per process, RunClient keeps one per traced run; a connection the
keeper closed (idle, restarted) or with anything waiting to be read (a reply left by a request
that timed out) is replaced before the next request, so every request starts clean.
"""

from __future__ import annotations

import os
import select
import socket
from pathlib import Path

from fdkeeper.client import KeeperClient


class RunClient(KeeperClient):
    """KeeperClient whose requests share one kept control connection."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self._kept: socket.socket | None = None

    def _connect(self, timeout: float) -> socket.socket:
        """A copy of the kept connection (the caller closes the copy; the connection stays)."""
        kept = self._kept
        if kept is None or not _nothing_to_read(kept):
            self.close()
            kept = self._kept = super()._connect(timeout)
        copy = socket.socket(fileno=os.dup(kept.fileno()))
        copy.settimeout(timeout)
        return copy

    def close(self) -> None:
        if self._kept is not None:
            self._kept.close()
            self._kept = None


def _nothing_to_read(sock: socket.socket) -> bool:
    """Still connected, nothing waiting: neither a stray reply nor the keeper's close."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return not poller.poll(0)
