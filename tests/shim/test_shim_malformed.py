"""Malformed keeper replies never crash a preloaded program (issue 10, Shim).

A fake keeper answers every LEASE with one scripted reply: truncated, garbage, oversized, with
too few or too many descriptors, descriptors that are not sockets. The preloaded test program
(tests/shim/shimprog.c) must end normally every time: the shim refuses the reply (connect
or listen fails with an errno and one line on stderr), never a signal. Run under
AddressSanitizer + UBSan by tests/shim/test_shim_sanitized.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.support.fake_keeper import ControlServer
from tests.support.shim import WRAPPER, parse, shim_env

Packet = tuple[bytes, int]  # the bytes, and how many descriptors go with them (pipe ends)

CASES: dict[str, list[Packet]] = {
    "closed without a reply": [],
    "empty packet": [(b"", 0)],
    "OK without count": [(b"OK", 0)],
    "count not a number": [(b"OK count=abc", 0)],
    "negative count": [(b"OK count=-5", 0)],
    "huge count": [(b"OK count=99999999999999999999", 0)],
    "count then nothing": [(b"OK count=1", 0)],
    "FDS with no descriptor": [(b"OK count=1", 0), (b"FDS ids=1", 0)],
    "FDS with too many descriptors": [(b"OK count=1", 0), (b"FDS ids=1", 3)],
    "FDS with too few descriptors": [(b"OK count=2", 0), (b"FDS ids=1,2", 1)],
    "FDS ids not numbers": [(b"OK count=1", 0), (b"FDS ids=x,,", 1)],
    "FDS with garbage addresses": [(b"OK count=1", 0), (b"FDS ids=1 peers=[::1 locals=:::::", 1)],
    "FDS before OK": [(b"FDS ids=1", 1)],
    "ERR alone": [(b"ERR", 0)],
    "ERR with an unknown code": [(b"ERR nonsense", 0)],
    "oversized ERR": [(b"ERR busy " + b"x" * 60_000, 0)],
    "oversized OK": [(b"OK count=1 " + b"k=v " * 16_000, 0)],
    "binary garbage": [(bytes(range(256)) * 16, 0)],
    "NULs in the reply": [(b"OK\0count=1\0", 1)],
    "descriptors without a packet text": [(b"\n", 2)],
}


class ScriptedKeeper(ControlServer):
    """Answers each connection on a SOCK_SEQPACKET socket with ``script``, then closes it."""

    def __init__(self, path: Path, script: list[Packet]) -> None:
        self.script, self.requests = script, 0
        super().__init__(path)

    def _one(self, conn: socket.socket) -> None:
        conn.recv(8192)
        self.requests += 1
        for data, count in self.script:
            self._send(conn, data, count)

    @staticmethod
    def _send(conn: socket.socket, data: bytes, count: int) -> None:
        ends = [end for _ in range((count + 1) // 2) for end in os.pipe()][:count]
        try:
            socket.send_fds(conn, [data], ends) if ends else conn.send(data)
        finally:
            for end in ends:
                os.close(end)


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_keeper_reply_never_crashes_the_program(build, tmp_path, sut, name):
    keeper = ScriptedKeeper(tmp_path / "control.sock", CASES[name])
    try:
        client = subprocess.run(
            [*WRAPPER, build["prog"], "connect", "127.0.0.1", str(sut.port)],
            capture_output=True,
            text=True,
            timeout=20,
            env=shim_env(build, keeper.path, remote=sut.addr),
        )
        server = subprocess.run(
            [*WRAPPER, build["prog"], "server", "0"],
            capture_output=True,
            text=True,
            timeout=20,
            env=shim_env(build, keeper.path, role="server"),
        )
    finally:
        keeper.close()
    for result in (client, server):
        assert result.returncode >= 0, f"killed by {signal.Signals(-result.returncode).name}: {result.stderr[-2000:]}"
        assert "Sanitizer" not in result.stderr and "runtime error" not in result.stderr, result.stderr[-3000:]
        # 0, or 2 from the program's own die() on a refused listen(): a normal exit either way.
        assert result.returncode in (0, 2), result.stdout + result.stderr[-2000:]
    assert "rc" in parse(client.stdout), client.stdout + client.stderr
    assert keeper.requests >= 1
