"""One traced run: the syscall loop that hands each stop to the run's role until it is done.

The loop takes the tracer's next syscall stop, remembers each call's entry for its exit,
gives the stop to the run's role and resumes the thread; when the role is done it detaches
every task and the program runs on untraced. Then it waits for the program and returns its
wait status. It knows the roles only through Role and the ROLES table: the client role at
the program's connect() to the SuT (client.py), the per-call client at each such connect()
and the first send after it (percall.py), the server role at its first listen() and the
accept()s after (server.py); each works through the run's services (services.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

from fdkeeper.errors import FdkeeperError
from fdkeeper.modes.base import HandoffRequest
from fdkeeper.modes.ptrace.services import Services
from fdkeeper.modes.ptrace.tracer import SyscallStop, TraceeGone, Tracer


class Role(Protocol):
    """What the loop asks of a role. Each handler leaves the thread in a syscall stop."""

    done: bool  # the handoff is over: the loop detaches and the program runs on untraced

    def on_entry(self, stop: SyscallStop) -> None:
        """A syscall's entry (or a seccomp stop, before the call runs)."""

    def on_exit(self, stop: SyscallStop, nr: int, args: tuple[int, ...]) -> None:
        """A syscall's exit; ``nr`` and ``args`` are its entry's (-1 and () when unseen)."""

    def on_exec(self, pid: int) -> None:
        """A new program in process ``pid``: what was placed in the old one is gone."""

    def close(self) -> None:
        """The run is over (the program detached or ended): say what is worth saying, let go."""


# Each role's module is imported only by the run that plays it: a traced run's start-up
# pays for one role, not three.
def _client(services: Services) -> Role:
    from fdkeeper.modes.ptrace.client import ClientRole

    return ClientRole(services)


def _per_call_client(services: Services) -> Role:
    from fdkeeper.modes.ptrace.percall import PerCallRole

    return PerCallRole(services)


def _server(services: Services) -> Role:
    from fdkeeper.modes.ptrace.server import ServerRole

    return ServerRole(services)


# (request.role, request.per_call) -> the role. The server role hands every kept connection
# over at the first listen(), per call or not; a per-call client is a handoff per user.
ROLES: dict[tuple[str, bool], Callable[[Services], Role]] = {
    ("client", False): _client,
    ("client", True): _per_call_client,
    ("server", False): _server,
    ("server", True): _server,
}


class Session:
    """The syscall loop of one traced run, over the role its request asks for."""

    def __init__(self, tracer: Tracer, request: HandoffRequest, transfer: str) -> None:
        make_role = ROLES.get((request.role, request.per_call))
        if make_role is None:
            raise FdkeeperError(f"fdkeeper: --mode ptrace has no {request.role!r} role; use client or server")
        self.tracer = tracer
        self.services = Services(tracer, request, transfer)
        self.role = make_role(self.services)
        self.entries: dict[int, tuple[int, tuple[int, ...]]] = {}  # tid -> syscall in progress
        tracer.on_exec = self._on_exec

    def _on_exec(self, pid: int) -> None:
        """A new program in process ``pid``: what we placed in the old one is gone (its
        descriptor numbers may name other files now)."""
        self.services.on_exec(pid)
        self.role.on_exec(pid)

    def run(self) -> int:
        """Follow the program until the role is done (then detach) or it ends; its wait status."""
        tracer, role = self.tracer, self.role
        held: int | None = None  # the task in a ptrace-stop now: detach_all must not wait for it
        try:
            while not role.done:
                stop = tracer.next_stop()
                if stop is None:
                    break
                held = stop.tid
                try:
                    # Handlers leave the thread in a syscall stop (an injection's too).
                    if stop.entry:
                        self.entries[stop.tid] = (stop.nr, stop.args)
                        role.on_entry(stop)
                    else:
                        nr, args = self.entries.pop(stop.tid, (-1, ()))
                        role.on_exit(stop, nr, args)
                except TraceeGone:
                    continue
                if role.done:
                    held = None
                    tracer.detach_all(current=stop.tid)
                    self.services.say("detached; the program runs untraced from here")
                    break
                tracer.resume(stop.tid)
                held = None
        finally:
            if tracer.tasks:  # a handler's error too: the held task is detached, not waited for
                tracer.detach_all(current=held)
            role.close()
            self.services.close()
        return self._status()

    def _status(self) -> int:
        tracer = self.tracer
        if tracer.root_status is not None:
            return tracer.root_status
        while True:
            try:
                return os.waitpid(tracer.root, 0)[1]
            except ChildProcessError:  # reaped already (cannot happen for our own child)
                return 0
