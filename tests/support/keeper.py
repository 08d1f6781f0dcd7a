"""Helpers for tests that drive a real keeper process over its control socket, as a run (or an
operator) would: open and lease a connection, read a leased connection to its end, find the
keeper's process, and squeeze its open-file limit."""

from __future__ import annotations

import errno
import os
import socket

import psutil

from fdkeeper.client import KeeperClient
from fdkeeper.testbed.pki import TestPki
from tests.support.fake_sut import FakeSut


def remote_of(listener: socket.socket) -> tuple[str, int]:
    """The (host, port) a keeper is asked to connect to for a listener standing in for the SuT."""
    host, port = listener.getsockname()[:2]
    return str(host), int(port)


def tls_fields(pki: TestPki) -> dict[str, str]:
    return {"tls_ca": str(pki.ca_cert)}


def open_connection(keeper: KeeperClient, sut: FakeSut, transport: str, pki: TestPki) -> None:
    """Have the keeper open (and keep) a client connection to ``sut``; TLS trusts the test CA."""
    extra = tls_fields(pki) if transport == "tls" else {}
    keeper.prepare(role="client", transport=transport, remote=sut.address, local="-", **extra)


def lease(keeper: KeeperClient, sut: FakeSut, transport: str) -> socket.socket:
    """Lease the kept connection to ``sut`` to this process, as a run's shim does."""
    [(_, fd)] = keeper.lease(role="client", transport=transport, remote=sut.address, local="-")
    leased = socket.socket(fileno=fd)
    leased.settimeout(3)
    return leased


def read_to_the_end(leased: socket.socket) -> tuple[bytes, str]:
    """Everything the run reads, and how the stream ended: "eof" or the errno name."""
    data = b""
    while True:
        try:
            chunk = leased.recv(65536)
        except OSError as error:
            return data, errno.errorcode.get(error.errno, str(error)) if error.errno is not None else str(error)
        if not chunk:
            return data, "eof"
        data += chunk


def keeper_rss(keeper: KeeperClient) -> int:
    """The keeper process's resident memory in bytes."""
    return int(psutil.Process(keeper.status()["keeper"]["pid"]).memory_info().rss)


def keeper_process(client: KeeperClient) -> psutil.Process | None:
    """The keeper's process by its lock file, or None when it is gone."""
    try:
        return psutil.Process(int((client.directory / "keeper.lock").read_text()))
    except (OSError, ValueError, psutil.NoSuchProcess):
        return None


def limit_with_free_slots(process: psutil.Process, free: int) -> int:
    """The RLIMIT_NOFILE that leaves exactly ``free`` descriptor numbers to ``process`` (the
    limit caps numbers, not counts: holes below the highest open descriptor count as room)."""
    used = {int(name) for name in os.listdir(f"/proc/{process.pid}/fd")}
    limit = 0
    while limit - len([fd for fd in used if fd < limit]) < free:
        limit += 1
    return limit
