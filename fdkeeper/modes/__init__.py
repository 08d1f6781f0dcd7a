"""Handoff modes and the choice among them (``--mode``).

``choose_mode`` first drops the modes that cannot do the run at all (their declared
capabilities against the run's needs), then asks the rest whether they can run here:
``--mode auto`` never picks a mode that cannot do the run, and ``--mode X`` for such a run
is one line naming the modes that can.

Modes serve any program: they import nothing of sipp/. What a run needs of sipp's arguments
is read above them (sipp/request.py) and handed over in the ``HandoffRequest``; the pipeline
that chooses a mode and runs its handoff is fdkeeper/handoff.py.
"""

from __future__ import annotations

from pathlib import Path

from fdkeeper.errors import FdkeeperError
from fdkeeper.modes.base import (
    WEBSOCKET_OVER,
    Capabilities,
    ConverterArguments,
    Handoff,
    HandoffRequest,
    Mode,
    ModeOptions,
    PtraceOptions,
    RunNeeds,
    UdpOptions,
)
from fdkeeper.modes.preload import PreloadMode
from fdkeeper.modes.ptrace import PtraceMode
from fdkeeper.modes.udp import UdpMode

# In the order --mode auto tries them.
MODES: dict[str, Mode] = {mode.name: mode for mode in (PreloadMode(), PtraceMode(), UdpMode())}
MODE_NAMES = ("auto", *MODES)


def choose_mode(name: str, program: Path, needs: RunNeeds) -> Mode:
    """The named mode if it can do the run here, or for 'auto' the first that can; else one clear error."""
    if name != "auto":
        return _checked(MODES[name], program, needs)
    able = [mode for mode in MODES.values() if mode.cannot_do(needs) is None]
    reasons = [f"{mode.name}: cannot {mode.cannot_do(needs)}" for mode in MODES.values() if mode not in able]
    for mode in able:
        reason = mode.unsupported_reason(program)
        if reason is None:
            return mode
        reasons.append(f"{mode.name}: {reason}")
    raise FdkeeperError(f"fdkeeper: no handoff mode can run {program} here ({'; '.join(reasons)})")


def _checked(mode: Mode, program: Path, needs: RunNeeds) -> Mode:
    missing = mode.cannot_do(needs)
    if missing is not None:
        others = [other.hint() for other in MODES.values() if other is not mode and other.cannot_do(needs) is None]
        instead = f"; use {' or '.join(others)}" if others else "; no mode can (check the run's options)"
        raise FdkeeperError(f"fdkeeper: --mode {mode.name} cannot {missing}{instead}")
    reason = mode.unsupported_reason(program)
    if reason is not None:
        raise FdkeeperError(f"fdkeeper: --mode {mode.name} cannot run {program} here: {reason}")
    return mode


__all__ = [
    "MODES",
    "MODE_NAMES",
    "WEBSOCKET_OVER",
    "Capabilities",
    "ConverterArguments",
    "Handoff",
    "HandoffRequest",
    "Mode",
    "ModeOptions",
    "PtraceOptions",
    "RunNeeds",
    "UdpOptions",
    "choose_mode",
]
