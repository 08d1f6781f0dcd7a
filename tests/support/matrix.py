"""The end-to-end matrices' cells (tests/e2e/test_matrix.py: TCP and TLS; test_e2e_ws.py: WS and
WSS): the sipps people run, one sipp over one transport through one keeper with the users of the
cell, and the story every cell tells through `fdkeeper sipp` with `--mode auto`:

a register run; a call arriving in the gap between runs (it waits in the kept connection); the
answer run; a call arriving during it. Calls come from the SuT side (a plain UDP sipp through
Kamailio, which reaches a user only over the connection the user registered on), one call per
user per run for -t tn/ln (sipp 3.7.7 in -t tn server mode was seen to hang when one user was
called twice in a run). The answer run's scenario counts what it answered.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fdkeeper import testbed
from fdkeeper.client import KeeperClient
from fdkeeper.demo import start_through_fdkeeper
from fdkeeper.modes import MODES
from fdkeeper.testbed import wait_until
from fdkeeper.testbed.sipp import start_calls

DEBIAN_SIPP = Path("/usr/bin/sipp")
# name: (binary, the mode --mode auto must pick for it)
SIPPS = {
    "3.6.1-debian": (DEBIAN_SIPP, "preload"),
    "3.7.7-tls": (testbed.sipp_build("sipp-tls"), "preload"),
    "3.7.7-static": (testbed.sipp_build("sipp-static"), "ptrace"),
}
# sipp -t tn/ln refuses to start while its -max_socket (50000) exceeds the open-file limit.
PER_CALL_OPTIONS = ["-max_socket", "100"]


def cannot_run(name: str) -> str | None:
    """Why this machine cannot run the cells of sipp `name`, or None."""
    binary, mode = SIPPS[name]
    if not binary.is_file():
        return f"no sipp at {binary}"
    return MODES[mode].unsupported_reason(binary)


@dataclass
class Cell:
    """One sipp over one transport through one keeper, with the users of this cell."""

    sipp: Path
    mode: str  # the mode --mode auto must pick for it
    transport: str  # sipp's -t
    kept_transport: str  # what the keeper holds: tcp, tls, ws or wss
    users: list[str]
    remote: str
    options: tuple[str, ...]  # fdkeeper sipp's own
    keeper_dir: Path
    log_dir: Path
    port: int  # the callee's -p, register and answer run alike: one identity

    @classmethod
    def of_sipp(cls, name: str, transport: str, kept_transport: str, users: int, **where: Any) -> Cell:
        """The cell of sipp `name` (see SIPPS) over sipp's -t `transport`, with `users` users named
        after the cell; `where`: remote, options, keeper_dir, log_dir. Skipped where it cannot run."""
        reason = cannot_run(name)
        if reason:
            pytest.skip(reason)
        binary, mode = SIPPS[name]
        names = [f"{name}-{transport}-{kept_transport}-u{index}" for index in range(1, users + 1)]
        return cls(binary, mode, transport, kept_transport, names, port=testbed.free_port(), **where)

    @property
    def per_call(self) -> bool:
        return self.transport in ("tn", "ln")

    def start(self, name: str, scenario: str, calls: int, timeout: int, extra: Any = ()) -> testbed.SippProcess:
        extra = [*extra, *(PER_CALL_OPTIONS if self.per_call else ())]
        return start_through_fdkeeper(
            str(self.sipp),
            scenario,
            self.remote,
            directory=self.keeper_dir,
            log_dir=self.log_dir,
            name=name,
            options=self.options,
            transport=self.transport,
            local_port=self.port,
            calls=calls,
            rate=100,
            timeout=timeout,
            extra=extra,
        )

    def connections(self) -> list[dict[str, Any]]:
        connections: list[dict[str, Any]] = KeeperClient(self.keeper_dir).status()["connections"]
        return connections

    def connection_of(self, user: str) -> dict[str, Any]:
        """The kept connection a call to `user` arrives on (-t t1/l1: the only one)."""
        connections = self.connections()
        if not self.per_call:
            [connection] = connections
            return connection
        [connection] = [c for c in connections if (c["aor"] or "").startswith(f"sip:{user}@")]
        return connection


def calls_from_the_sut(sut: testbed.Kamailio, cell: Cell, users: list[str], name: str) -> testbed.SippProcess:
    return start_calls(
        sut, users, log_dir=cell.log_dir, name=name, sipp=str(DEBIAN_SIPP), local_port=testbed.free_port(), timeout=15
    )


def answered(process: testbed.SippProcess, count: int, timeout: float = 30) -> testbed.SippResult:
    result = process.wait(timeout)
    assert result.ok and result.successful == count, result.summary()
    return result


def tell_the_story(cell: Cell, sut: testbed.Kamailio, tmp_path: Path) -> list[dict[str, Any]]:
    """Register, a call in the gap, the answer run, a call during it; the kept connections after it,
    checked to be the ones registered (none lost, none added) in the mode and transport expected."""
    users_csv = testbed.write_users_csv(tmp_path / "users.csv", cell.users, sut.domain)
    answered(
        cell.start("register", "uac-register.xml", calls=len(cell.users), timeout=10, extra=["-inf", str(users_csv)]),
        len(cell.users),
    )
    assert len(cell.connections()) == len(cell.users)

    # The gap: no run holds the connection; the INVITE waits in it for the answer run.
    gap = calls_from_the_sut(sut, cell, cell.users[:1], "call-in-gap")
    wait_until(
        lambda: cell.connection_of(cell.users[0])["queued_bytes"] > 0,
        timeout=10,
        what="the INVITE in the gap to reach the kept connection",
    )

    # One call per user per run: -t tn/ln calls the other users during the run, -t t1/l1 the one user again.
    during_users = cell.users[1:] if cell.per_call else cell.users
    answer = cell.start("answer", "uas-answer.xml", calls=1 + len(during_users), timeout=20)
    wait_until(
        lambda: all(c["state"] == "leased" for c in cell.connections()),
        timeout=10,
        what="the answer run to hold the kept connections",
    )
    during = calls_from_the_sut(sut, cell, during_users, "calls-during")

    answered(gap, 1)
    answered(during, len(during_users))
    answered(answer, 1 + len(during_users))  # its scenario answered the call in the gap too
    connections = cell.connections()
    assert {c["mode"] for c in connections} == {cell.mode}  # what --mode auto picked
    # The keeper does the TLS (and the WebSocket), also for the sipp that could do its own TLS.
    assert {c["transport"] for c in connections} == {cell.kept_transport}
    assert len(connections) == len(cell.users)  # none lost, none added
    return connections
