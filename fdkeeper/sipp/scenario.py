"""Reading sipp scenarios: whether one starts by sending or receiving, the embedded ones
(`sipp -sd NAME`), and the copy a TLS run uses.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from fdkeeper.errors import FdkeeperError

if TYPE_CHECKING:
    from fdkeeper.sipp.args import SippInvocation


def scenario_role(path: str | Path) -> str:
    """client if the scenario's first message element is a <send>, server if a <recv>."""
    import xml.etree.ElementTree as ElementTree  # on use: `fdkeeper exec` never reads a scenario

    try:
        root = ElementTree.parse(path).getroot()
    except FileNotFoundError:
        raise FdkeeperError(f"fdkeeper: scenario file {path} not found; check -sf") from None
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


def tls_arguments(invocation: SippInvocation, sipp: Path, directory: Path) -> tuple[list[str], Path]:
    """sipp arguments for a TLS run with a sipp that only speaks TCP to the keeper.

    -t l1 becomes -t t1 (ln: tn), and the scenario is copied with [transport] written out as TLS,
    so every Via and transport= parameter the scenario builds from [transport] says TLS,
    as a TLS-enabled sipp would have sent. Returns the arguments and the copy (to delete).
    """
    args = list(invocation.args)
    if invocation.transport_index is not None:
        args[invocation.transport_index + 1] = "t" + invocation.transport_option[1]  # l1 -> t1, ln -> tn
    if invocation.scenario_file is not None:
        text = invocation.scenario_file.read_text(encoding="iso-8859-1")
        stem = invocation.scenario_file.stem
    else:
        text = builtin_scenario(sipp, invocation.scenario_name or "uac")
        stem = invocation.scenario_name or "uac"
    copy_fd, copy_name = tempfile.mkstemp(prefix=f"{stem}.", suffix=".tls.xml", dir=directory)  # O_EXCL|O_NOFOLLOW, 0600
    copy = Path(copy_name)
    with open(copy_fd, "w", encoding="iso-8859-1") as out:  # through that descriptor: the name is never reopened
        out.write(text.replace("[transport]", "TLS"))
    if invocation.scenario_index is None:
        args[:0] = ["-sf", str(copy)]
    else:
        args[invocation.scenario_index : invocation.scenario_index + 2] = ["-sf", str(copy)]
    return args, copy
