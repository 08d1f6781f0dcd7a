"""Handoff modes and the choice among them (``--mode``)."""

from __future__ import annotations

from pathlib import Path

from fdkeeper.errors import FdkeeperError
from fdkeeper.modes.base import Handoff, HandoffRequest, Mode
from fdkeeper.modes.preload import PreloadMode
from fdkeeper.modes.udp import UdpMode
from fdkeeper.modes.ptrace import PtraceMode

# In the order --mode auto tries them.
MODES: dict[str, Mode] = {mode.name: mode for mode in (PreloadMode(), PtraceMode(), UdpMode())}
MODE_NAMES = ("auto", *MODES)


def choose_mode(name: str, sipp: Path) -> Mode:
    """The named mode if it can run here, or for 'auto' the first that can; else one clear error."""
    candidates = list(MODES.values()) if name == "auto" else [MODES[name]]
    reasons = []
    for mode in candidates:
        reason = mode.unsupported_reason(sipp)
        if reason is None:
            return mode
        reasons.append(f"{mode.name}: {reason}")
    raise FdkeeperError(f"fdkeeper: no handoff mode can run {sipp} here ({'; '.join(reasons)})")


__all__ = ["MODES", "MODE_NAMES", "Handoff", "HandoffRequest", "Mode", "choose_mode"]
