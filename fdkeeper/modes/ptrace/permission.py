"""Whether this process may trace its own child here, and if not, which check said no.

Kept apart from the mode because it is read on every start-up: no heavy imports, and the
probe (a fork) runs only when something here could refuse.
"""

from __future__ import annotations

import errno
import os

CAP_SYS_PTRACE = 19


def read_quietly(path: str) -> str | None:
    """A small /proc or /sys file's text, None if it cannot be read."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def status_field(name: str, pid: int | str = "self") -> str | None:
    """One field of /proc/PID/status (``Tgid``, ``Seccomp``, ``CapEff``...), None if absent."""
    status = read_quietly(f"/proc/{pid}/status") or ""
    return next((line.split()[1] for line in status.splitlines() if line.startswith(f"{name}:")), None)


def has_capability(bit: int) -> bool:
    return bool(int(status_field("CapEff") or "0", 16) >> bit & 1)


def yama_scope() -> str:
    return read_quietly("/proc/sys/kernel/yama/ptrace_scope") or "0"


def refusal_cause() -> str:
    """Why the kernel said no to PTRACE_SEIZE of our own child: name the likely check."""
    scope = yama_scope()
    if scope in ("2", "3"):
        return f"Yama ptrace_scope is {scope}" + ("" if scope == "3" else " and CAP_SYS_PTRACE is missing")
    if (status_field("Seccomp") or "0") != "0":
        return "a seccomp filter on fdkeeper forbids ptrace (a container's default profile does; allow ptrace or use --mode preload)"
    if not has_capability(CAP_SYS_PTRACE):
        return "CAP_SYS_PTRACE is missing and a security module refused ptrace"
    return "a security module (AppArmor/SELinux/Yama) refused ptrace"


def ptrace_in_doubt() -> bool:
    """Whether anything here could refuse tracing our own child: a seccomp filter on us, a
    Yama scope above 1, or a missing CAP_SYS_PTRACE (then an LSM may object). Only then is
    the probe (a fork, a few ms) worth its cost; a refusal at start is reported just as well."""
    seccomp = status_field("Seccomp") or "0"
    return seccomp != "0" or yama_scope() not in ("0", "1") or not has_capability(CAP_SYS_PTRACE)


def probe_ptrace() -> str | None:
    """Try PTRACE_SEIZE on a throw-away child: the one check that answers for every policy."""
    from fdkeeper.modes.ptrace import raw as pt

    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_w)
        os.read(ready_r, 1)
        os._exit(0)
    os.close(ready_r)
    try:
        pt.ptrace(pt.PTRACE_SEIZE, pid, 0, 0)
        reason = None
    except pt.PtraceError as error:
        reason = f"ptrace refused ({os.strerror(error.errno or errno.EPERM)}): {refusal_cause()}"
    os.close(ready_w)
    os.waitpid(pid, 0)
    return reason
