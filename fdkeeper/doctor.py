"""`fdkeeper doctor`: what this machine lacks for fdkeeper, and the one command that installs it.

Each check looks at one thing fdkeeper uses (sipp and its version, the shim and the TLS pump
built at install, a C compiler, Kamailio and its TLS and WebSocket modules for the embedded SuT,
ptrace permission, the open-file limit) and says what it found or, when it is missing, the
command that fixes it. A check is *needed* when the basic path (`fdkeeper demo`, `fdkeeper run`
against the embedded SuT with Debian's sipp) fails without it; the others are said, not required.

Kamailio is looked for where the embedded SuT looks (fdkeeper.testbed.process's program and
module directories), so the doctor and a run never disagree; nothing is started.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from fdkeeper.errors import FdkeeperError

# Below this hard open-file limit the keeper (which raises its soft limit to the hard one)
# holds too few connections for a test with a few hundred users; stock Linux gives 4096 or more.
OPEN_FILES_NEEDED = 1024
OPEN_FILES_COMFORTABLE = 4096
KAMAILIO_MODULES = {"tls.so": "kamailio-tls-modules", "websocket.so": "kamailio-websocket-modules"}


@dataclass(frozen=True)
class Check:
    """One thing fdkeeper uses: found or not, what was seen, and the command that installs it."""

    name: str
    ok: bool
    found: str  # what was found, or why it is missing
    needed: bool  # the basic path fails without it
    fix: str | None = None  # the one command that installs it (None when ok, or nothing installs it)


def apt_install(*packages: str) -> str:
    """The apt command that installs packages, with sudo when this is not root."""
    sudo = "" if os.geteuid() == 0 else "sudo "
    return f"{sudo}apt-get install -y {' '.join(packages)}"


# --------------------------------------------------------------------------
# the checks
# --------------------------------------------------------------------------


def check_sipp() -> tuple[Check, Path | None]:
    """sipp ($FDKEEPER_SIPP or PATH, as every run finds it) and the version it says it is."""
    from fdkeeper.sipp.runner import find_sipp
    from fdkeeper.sipp.tables import NEWEST
    from fdkeeper.sipp.versions import ask_sipp

    try:
        sipp = find_sipp(None)
    except FdkeeperError as error:
        return Check("sipp", False, str(error).removeprefix("fdkeeper: "), True, apt_install("sip-tester")), None
    version = ask_sipp(sipp)
    notice = version.unknown_notice(sipp)
    said = version.text or "no version from 'sipp -v'"
    found = f"{sipp}: {said}" + (f" (not a version fdkeeper knows: read as sipp {NEWEST.label})" if notice else "")
    return Check("sipp", True, found, True), sipp


def check_linkage(sipp: Path) -> tuple[Check, bool]:
    """Whether LD_PRELOAD reaches this sipp (the preload mode); a static one needs ptrace."""
    from fdkeeper.modes.preload import is_dynamic_elf

    try:
        dynamic = is_dynamic_elf(sipp)
    except OSError as error:
        return Check("sipp linkage", False, f"cannot read {sipp}: {error.strerror}", True), False
    if dynamic:
        return Check(
            "sipp linkage", True, "dynamically linked: the preload mode (the shim) hands it over", False
        ), False
    return Check("sipp linkage", True, "statically linked: only the ptrace mode (or udp) can hand it over", False), True


def reinstall_command() -> str:
    """The pip command that rebuilds fdkeeper from where it was installed from (its direct_url.json)."""
    source = "PATH-OR-URL-OF-FDKEEPER"
    try:
        recorded = json.loads(metadata.distribution("fdkeeper").read_text("direct_url.json") or "{}")
        url = str(recorded.get("url", ""))
        vcs = recorded.get("vcs_info", {})
        if url.startswith("file://"):
            source = url.removeprefix("file://")
        elif url and isinstance(vcs, dict) and vcs.get("vcs") == "git":
            source = f"git+{url}" + (f"@{vcs['commit_id']}" if vcs.get("commit_id") else "")
        elif url:
            source = url
    except (metadata.PackageNotFoundError, ValueError, AttributeError):
        pass
    return f"{sys.executable} -m pip install --force-reinstall --no-deps {source}"


def check_library(name: str, module: str, needed: bool, purpose: str) -> Check:
    """A C library compiled at install (the extension module `module`), found where pip put it."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec and spec.origin and Path(spec.origin).exists():
        return Check(name, True, spec.origin, needed)
    missing = f"not built ({purpose}); a C compiler was missing when fdkeeper was installed"
    return Check(name, False, missing, needed, f"{apt_install('gcc', 'libc6-dev')} && {reinstall_command()}")


def check_compiler(shim_built: bool) -> Check:
    """A C compiler: needed only to build fdkeeper from source (an sdist, a git URL, a checkout)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    needed = not shim_built
    if compiler is None:
        why = "no cc or gcc on PATH" + ("" if needed else " (the shim is built: needed only to reinstall from source)")
        return Check("C compiler", False, why, needed, apt_install("gcc", "libc6-dev"))
    return Check("C compiler", True, compiler, needed)


def check_kamailio() -> tuple[Check, str | None]:
    """Kamailio for the embedded SuT, and its module directory: where the embedded SuT looks."""
    from fdkeeper.testbed.process import find_program, module_path

    try:
        program = find_program("kamailio", "kamailio")
        modules = module_path()
    except RuntimeError as error:
        return Check("kamailio", False, f"{error} (the embedded SuT)", True, apt_install("kamailio")), None
    return Check("kamailio", True, program, True), modules


def check_kamailio_module(modules: str | None, name: str, purpose: str) -> Check:
    """One Kamailio module file (tls.so, websocket.so) in the module directory."""
    package = KAMAILIO_MODULES[name]
    label = f"kamailio {name}"
    if modules is None:
        return Check(label, False, "no Kamailio", False, apt_install("kamailio", package))
    path = Path(modules) / name
    if path.is_file():
        return Check(label, True, str(path), False)
    return Check(label, False, f"{path} missing ({purpose})", False, apt_install(package))


def check_ptrace(static_sipp: bool) -> Check:
    """Whether this user may trace its own child (the ptrace mode; needed for a static sipp)."""
    from fdkeeper.modes.ptrace.permission import probe_ptrace, status_field, yama_scope

    refused = probe_ptrace()
    if refused is None:
        return Check("ptrace", True, "permitted (the ptrace mode can run)", static_sipp)
    fix = None
    if yama_scope() in ("2", "3"):
        fix = "sudo sysctl kernel.yama.ptrace_scope=1"
    elif (status_field("Seccomp") or "0") != "0":
        fix = "run the container with --cap-add SYS_PTRACE --security-opt seccomp=unconfined"
    return Check("ptrace", False, f"{refused} (needed only for a static sipp)", static_sipp, fix)


def check_open_files() -> Check:
    """The open-file limit: every kept connection is a descriptor of the keeper."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    shown = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    found = f"soft {soft}, hard {shown}: the keeper raises its soft limit to the hard one"
    if hard == resource.RLIM_INFINITY or hard >= OPEN_FILES_COMFORTABLE:
        return Check("open-file limit", True, found, True)
    fix = "raise the hard limit: 'nofile' in /etc/security/limits.conf, LimitNOFILE= for a service, or docker --ulimit nofile=65536"
    if hard >= OPEN_FILES_NEEDED:
        return Check("open-file limit", True, f"{found} (enough for a few hundred users)", True)
    return Check("open-file limit", False, f"{found}: too few for the keeper", True, fix)


# --------------------------------------------------------------------------
# all of them, and what is said
# --------------------------------------------------------------------------


def run_checks() -> list[Check]:
    """Every check, in the order a user installs things."""
    sipp, sipp_path = check_sipp()
    linkage, static_sipp = check_linkage(sipp_path) if sipp_path else (None, False)
    shim = check_library("shim", "fdkeeper._shim", not static_sipp, "the preload mode's LD_PRELOAD library")
    pump = check_library("TLS pump", "fdkeeper._tlspump", False, "TLS relayed in C; without it, in Python")
    kamailio, modules = check_kamailio()
    checks = [
        sipp,
        *([linkage] if linkage else []),  # said only of a sipp that was found
        shim,
        pump,
        check_compiler(shim.ok),
        kamailio,
        check_kamailio_module(modules, "tls.so", "TLS towards the embedded SuT"),
        check_kamailio_module(modules, "websocket.so", "WebSocket towards the embedded SuT"),
        check_ptrace(static_sipp),
        check_open_files(),
    ]
    return checks


def healthy(checks: list[Check]) -> bool:
    """True when every check the basic path needs passed."""
    return all(check.ok for check in checks if check.needed)


def format_checks(checks: list[Check]) -> str:
    """One line per check, and under a missing one the command that installs it."""
    width = max(len(check.name) for check in checks)
    lines = []
    for check in checks:
        state = "ok" if check.ok else ("MISSING" if check.needed else "missing")
        lines.append(f"{state:<8} {check.name:<{width}}  {check.found}")
        if not check.ok and check.fix:
            lines.append(f"{'':<8} {'':<{width}}  fix: {check.fix}")
    verdict = "all the basic path needs is here" if healthy(checks) else "the basic path lacks what says MISSING"
    lines.append(f"fdkeeper doctor: {verdict}")
    return "\n".join(lines)


def doctor(as_json: bool, say: Callable[[str], None]) -> int:
    """Run every check, say them (as text or JSON); the exit status: 0 healthy, 1 not."""
    checks = run_checks()
    if as_json:
        say(json.dumps({"ok": healthy(checks), "checks": [asdict(check) for check in checks]}, indent=2))
    else:
        say(format_checks(checks))
    return 0 if healthy(checks) else 1
