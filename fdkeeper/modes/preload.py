"""Handoff by LD_PRELOAD: the shim built from helpers/ runs inside sipp.

The shim asks the keeper for the connection in sipp's connect() (client mode) or offers the
kept connections as accepted ones on sipp's listening socket (server mode); see helpers/.
"""

from __future__ import annotations

import importlib.util
import os
import struct
from pathlib import Path

from fdkeeper.address import format_address
from fdkeeper.errors import FdkeeperError
from fdkeeper.modes.base import Capabilities, Handoff, HandoffRequest, Mode, ModeOptions

PT_INTERP = 3
NOT_BUILT = "the preload shim is not built; reinstall fdkeeper with 'pip install .' (it needs gcc)"


def shim_path() -> Path | None:
    """Where `pip install .` put the compiled shim (the extension module fdkeeper._shim)."""
    spec = importlib.util.find_spec("fdkeeper._shim")
    return Path(spec.origin) if spec and spec.origin else None


def is_dynamic_elf(path: Path) -> bool:
    """True if the ELF file has a program interpreter, i.e. the dynamic loader runs it.

    A static binary has none, and LD_PRELOAD never reaches it.
    """
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF":
            return False
        is_64 = header[4] == 2
        order = "<" if header[5] == 1 else ">"
        if is_64:
            (phoff,) = struct.unpack_from(order + "Q", header, 0x20)
            phentsize, phnum = struct.unpack_from(order + "HH", header, 0x36)
        else:
            (phoff,) = struct.unpack_from(order + "I", header, 0x1C)
            phentsize, phnum = struct.unpack_from(order + "HH", header, 0x2A)
        for index in range(phnum):
            f.seek(phoff + index * phentsize)
            (p_type,) = struct.unpack(order + "I", f.read(4))
            if p_type == PT_INTERP:
                return True
    return False


class PreloadMode(Mode):
    name = "preload"
    summary = "LD_PRELOAD shim inside sipp (dynamically linked sipp)"
    suits = "dynamically linked programs"
    capabilities = Capabilities(per_call_roles=frozenset({"client", "server"}))

    def unsupported_reason(self, sipp: Path) -> str | None:
        shim = shim_path()
        if shim is None or not shim.exists():
            return NOT_BUILT
        try:
            dynamic = is_dynamic_elf(sipp)
        except OSError as error:
            return f"cannot read {sipp}: {error.strerror}"
        if not dynamic:
            return f"{sipp} is statically linked (or not an ELF program), so LD_PRELOAD cannot reach it"
        mode = sipp.stat().st_mode
        if mode & 0o6000 and os.getuid() != 0:
            return f"{sipp} is setuid/setgid; the loader ignores LD_PRELOAD for it"
        return None

    def prepare(self, request: HandoffRequest, options: ModeOptions = ModeOptions()) -> Handoff:
        shim = shim_path()
        if shim is None:  # chosen by name without unsupported_reason (a library caller)
            raise FdkeeperError(f"fdkeeper: --mode preload: {NOT_BUILT}")
        preload = os.fspath(shim)
        inherited = os.environ.get("LD_PRELOAD")
        env = {
            "LD_PRELOAD": f"{preload} {inherited}" if inherited else preload,
            "FDKEEPER_SOCKET": os.fspath(request.control_socket),
            "FDKEEPER_ROLE": request.role,
            "FDKEEPER_REMOTE": format_address(request.remote) if request.remote else "",
            "FDKEEPER_TRANSPORT": request.transport,
        }
        if request.local:  # a server run's identity; a client's is what sipp binds (helpers/shim/client.c)
            env["FDKEEPER_LOCAL"] = format_address(request.local)
            if not request.local_known:  # only the likely port: the listener's own is the identity
                env["FDKEEPER_LOCAL_FROM_LISTENER"] = "1"
        if request.reconnect:
            env["FDKEEPER_RECONNECT"] = "1"
        if request.per_call:
            env["FDKEEPER_PER_CALL"] = "1"
        if request.debug:
            env["FDKEEPER_DEBUG"] = "1"
        return Handoff(argv=[os.fspath(request.program), *request.args], env=env)
