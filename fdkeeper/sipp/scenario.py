"""Reading sipp scenarios: whether one starts by sending or receiving, the embedded ones
(`sipp -sd NAME`), and the copy a run over the keeper's relay (TLS, WS, WSS) uses.

Copies are named STEM.pidPID.RANDOM.TRANSPORT.xml (tls, ws or wss) in the state directory, PID
being the `fdkeeper sipp` process that deletes it when sipp ends. A run killed before that
leaves its copy: the next such run sweeps the copies whose process is gone, `fdkeeper stop`
removes all.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from fdkeeper.errors import FdkeeperError
from fdkeeper.pidcheck import process_exists

if TYPE_CHECKING:
    from fdkeeper.sipp.args import SippInvocation


def scenario_role(path: str | Path) -> str:
    """client if the scenario's first message element is a <send>, server if a <recv>."""
    import xml.etree.ElementTree as ElementTree  # on use: `fdkeeper exec` never reads a scenario

    try:
        root = ElementTree.parse(path).getroot()
    except FileNotFoundError:
        raise FdkeeperError(f"fdkeeper: scenario file {path} not found; check -sf") from None
    except OSError as error:  # a directory, no permission...
        raise FdkeeperError(f"fdkeeper: cannot read scenario file {path}: {error.strerror}; check -sf") from None
    except ElementTree.ParseError as error:
        raise FdkeeperError(f"fdkeeper: scenario file {path} is not valid XML ({error}); check -sf") from None
    for element in root:
        if element.tag == "send":
            return "client"
        if element.tag == "recv":
            return "server"
    raise FdkeeperError(f"fdkeeper: scenario file {path} has no <send> or <recv>; check -sf")


def builtin_scenario(sipp: Path, name: str) -> str:
    """The XML of sipp's embedded scenario NAME (-sn NAME), as `sipp -sd NAME` prints it."""
    dumped = subprocess.run([str(sipp), "-sd", name], capture_output=True, text=True, encoding="iso-8859-1")
    if "<scenario" not in dumped.stdout:  # sipp -sd exits 99 even when it dumped one
        raise FdkeeperError(f"fdkeeper: sipp has no embedded scenario {name!r}; check -sn")
    return dumped.stdout[dumped.stdout.index("<?xml") if "<?xml" in dumped.stdout else 0 :]


# What the scenario copy writes for [transport], by the keeper's transport to the SuT: in a Via
# and anywhere else, and in a URI's transport= parameter, which RFC 7118 (5.2) makes ws over WS
# and WSS alike (a TLS-enabled sipp writes TLS there).
WRITTEN_TRANSPORT = {"tls": "TLS", "ws": "WS", "wss": "WSS"}
URI_TRANSPORT = {"tls": "TLS", "ws": "ws", "wss": "ws"}
_URI_PARAMETER = re.compile(r"(transport=)\[transport\]", re.IGNORECASE)
_COPY_PID = re.compile(r"\.pid(\d+)\.[^.]*\.(?:tls|ws|wss)\.xml$")


def remove_tls_copies(directory: Path, only_dead: bool = False) -> int:
    """Remove the scenario copies of TLS, WS and WSS runs in ``directory`` (``only_dead``: those
    whose run's process is gone); how many went. Only regular files named as ours are touched,
    never through a link."""
    removed = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    for name in names:
        found = _COPY_PID.search(name)
        if found is None or (only_dead and process_exists(int(found.group(1)))):
            continue
        try:
            os.unlink(directory / name)  # unlink never follows a link: at worst it removes the link
            removed += 1
        except OSError:
            pass
    return removed


def tls_arguments(
    invocation: SippInvocation, sipp: Path, directory: Path, transport: str = "tls"
) -> tuple[list[str], list[Path]]:
    """sipp arguments for a run whose keeper speaks ``transport`` (tls, ws or wss) to the SuT,
    with a sipp that only speaks TCP to the keeper.

    -t l1 becomes -t t1 (ln: tn), and the scenario (and a mixed-mode -rxsf one) is copied with
    [transport] written out as TLS, WS or WSS (ws in a URI's transport= parameter), so every Via
    and URI the scenario builds from [transport] says it, as a TLS-enabled or WebSocket-capable
    client would have sent. Returns the arguments and the copies (to delete).
    """
    args = list(invocation.args)
    if invocation.transport_index is not None:
        args[invocation.transport_index + 1] = "t" + invocation.transport_option[1]  # l1 -> t1, ln -> tn
    remove_tls_copies(directory, only_dead=True)
    copies = []
    if invocation.rx_scenario_index is not None:  # before -sf is inserted in front: indexes hold
        rx_file = Path(args[invocation.rx_scenario_index + 1])
        copies.append(_copy(_scenario_text(rx_file, "-rxsf"), rx_file.stem, directory, transport))
        args[invocation.rx_scenario_index : invocation.rx_scenario_index + 2] = ["-rxsf", str(copies[-1])]
    if invocation.scenario_file is not None:
        text, stem = _scenario_text(invocation.scenario_file, "-sf"), invocation.scenario_file.stem
    else:
        text = builtin_scenario(sipp, invocation.scenario_name or "uac")
        stem = invocation.scenario_name or "uac"
    copies.append(_copy(text, stem, directory, transport))
    if invocation.scenario_index is None:
        args[:0] = ["-sf", str(copies[-1])]
    else:
        args[invocation.scenario_index : invocation.scenario_index + 2] = ["-sf", str(copies[-1])]
    return args, copies


def _scenario_text(path: Path, option: str) -> str:
    try:
        return path.read_text(encoding="iso-8859-1")
    except OSError as error:
        raise FdkeeperError(f"fdkeeper: cannot read scenario file {path}: {error.strerror}; check {option}") from None


def _copy(text: str, stem: str, directory: Path, transport: str) -> Path:
    copy_fd, copy_name = tempfile.mkstemp(
        prefix=f"{stem}.pid{os.getpid()}.", suffix=f".{transport}.xml", dir=directory
    )  # O_EXCL|O_NOFOLLOW, 0600
    text = _URI_PARAMETER.sub(lambda found: found.group(1) + URI_TRANSPORT[transport], text)
    with open(copy_fd, "w", encoding="iso-8859-1") as out:  # through that descriptor: the name is never reopened
        out.write(text.replace("[transport]", WRITTEN_TRANSPORT[transport]))
    return Path(copy_name)
