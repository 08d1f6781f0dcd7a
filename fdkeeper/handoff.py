"""One run with a kept connection handed over: the pipeline `fdkeeper sipp` and `fdkeeper exec` share.

Every run takes the same steps (``run_handed_over``): choose the mode (modes.choose_mode);
read what the run asks (its ``Plan``); for a mode that leases from the keeper, make sure a keeper
runs and ask it to PREPARE the run, so that errors are one line before the program starts; then
the mode prepares the handoff and the handoff runs itself. What differs between the commands is
each command's ``Run``: sipp's in sipp/runner.py, any program's in agent.py.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fdkeeper.client import KeeperClient, ensure_keeper
from fdkeeper.modes import Handoff, HandoffRequest, ModeOptions, RunNeeds, choose_mode
from fdkeeper.protocol import OVER_TLS, OVER_WEBSOCKET
from fdkeeper.tls import TlsOptions
from fdkeeper.websocket import WsOptions


@dataclass(frozen=True)
class KeeperSettings:
    """How a keeper this run starts is set up (a keeper already running keeps its own)."""

    keepalive: float | None = None
    connect_timeout: float | None = None
    answer_options: bool = False  # it answers the SuT's OPTIONS between runs


@dataclass(frozen=True)
class Plan:
    """What a run asks once its mode is chosen: the request, the mode's options, and what PREPARE
    tells the keeper (used only by modes that lease from it)."""

    request: HandoffRequest
    options: ModeOptions
    prepare: dict[str, object]


class Run(ABC):
    """One command's run: what it knows before the mode is chosen, and its part of each step."""

    def __init__(
        self,
        mode: str,
        program: Path,
        needs: RunNeeds,
        keeper: KeeperSettings | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.mode = mode  # --mode: a mode's name or auto
        self.program = program
        self.needs = needs
        self.keeper = keeper or KeeperSettings()
        self.extra_env = extra_env or {}  # for the program, over the mode's own

    @abstractmethod
    def plan(self) -> Plan:
        """The rest of the run, read once the mode is chosen (a bad option is then one line)."""

    @abstractmethod
    def prepared(self, fields: dict[str, str], request: HandoffRequest) -> None:
        """PREPARE's answer (a connection borrowed or replaced...): said to the user, if need be."""

    @contextmanager
    def for_keeper(self, request: HandoffRequest) -> Iterator[HandoffRequest]:
        """The request as a mode that leases from the keeper runs it, for the time of the run
        (sipp over TLS: its arguments and scenario copies for plain TCP to the keeper)."""
        yield request


def run_handed_over(run: Run) -> int:
    """Run the program with the kept connection handed over; return its exit status."""
    mode = choose_mode(run.mode, run.program, run.needs)
    plan = run.plan()
    if not mode.capabilities.uses_keeper:  # e.g. sipp on -t u1 through a kept converter
        return _run(mode.prepare(plan.request, plan.options), run.extra_env)
    keeper = ensure_keeper(
        plan.request.directory,
        keepalive=run.keeper.keepalive,
        connect_timeout=run.keeper.connect_timeout,
        answer_options=run.keeper.answer_options,
    )
    _warn_if_keeper_differs(keeper, run.keeper)
    reply = keeper.prepare(**plan.prepare)
    run.prepared(reply.fields, plan.request)
    with run.for_keeper(plan.request) as request:
        return _run(mode.prepare(request, plan.options), run.extra_env)


def opening_fields(role: str, transport: str, tls: TlsOptions | None, websocket: WsOptions | None) -> dict[str, object]:
    """PREPARE's fields for how the keeper opens a connection to the SuT: the TLS options (tls,
    wss) and the WebSocket handshake's (ws, wss; the keeper remembers them for later leases).
    Only a client run opens one: a server run sends none."""
    fields: dict[str, object] = {}
    if role != "client":
        return fields
    if tls is not None and transport in OVER_TLS:
        fields.update(tls.as_fields())
    if transport in OVER_WEBSOCKET:
        fields.update((websocket or WsOptions()).as_fields())
    return fields


def notice(text: str) -> None:
    """One line to the user on stderr, beside the program's own output."""
    print(f"fdkeeper: {text}", file=sys.stderr, flush=True)


def _run(handoff: Handoff, extra_env: dict[str, str]) -> int:
    handoff.env.update(extra_env)
    return handoff.run()


def _warn_if_keeper_differs(keeper: KeeperClient, settings: KeeperSettings) -> None:
    """--keepalive is the keeper's setting: say so when a running keeper has another one."""
    if settings.keepalive is None:
        return
    running = keeper.status()["keeper"]["keepalive"]
    if running != settings.keepalive:
        notice(
            f"the keeper for {keeper.directory} already runs with keepalive {running or 'off'}; "
            "--keepalive applies when a run starts the keeper ('fdkeeper stop' first to change it)"
        )
