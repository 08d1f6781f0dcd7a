"""${name} substitution in test files.

Names come from three places: the runner's own (``BUILTIN``), the SuT's (``SUT_VARIABLES``,
set when the test names a SuT) and the test's ``vars:``. ``${free_port:LABEL}`` is a TCP
and UDP port free on loopback, the same one for the same LABEL within a test (a callee
registering and later answering on one port), so tests run side by side never collide.
``$$`` is a literal dollar sign.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

# Always set by the runner.
BUILTIN = {
    "here": "the test file's directory (steps run there)",
    "scenarios": "the sipp scenarios shipped with fdkeeper",
    "logs": "this test's log folder",
    "keeper_dir": "this test's keeper state directory",
    "sipp": "the sipp binary",
    "test": "the test's name",
}

# Set when the test has `sut:` (an embedded SuT or HOST:PORT).
SUT_VARIABLES = ("sut", "sut_host", "sut_port", "domain")
# Set by an embedded SuT with `transport: tls` or `wss`.
TLS_VARIABLES = ("sut_tls", "tls_ca", "tls_sni")
# Set by an embedded SuT with `transport: ws` or `wss` (WS), and `wss` (WSS): see testrun.transport.
WS_VARIABLES = ("sut_ws",)
WSS_VARIABLES = ("sut_wss",)

_REFERENCE = re.compile(r"\$(\$|\{([A-Za-z_][A-Za-z0-9_]*)(?::([A-Za-z0-9_.-]+))?\})")
FREE_PORT = "free_port"


class UnknownVariable(ValueError):
    """A ${name} that the test does not define."""


def references(text: str) -> list[str]:
    """The variable names ``text`` uses (free_port:LABEL counts as free_port)."""
    return [match.group(2) for match in _REFERENCE.finditer(text) if match.group(2)]


def check_known(text: str, known: Iterable[str]) -> None:
    """Raise UnknownVariable naming the first ${name} of ``text`` not in ``known``."""
    allowed = set(known) | {FREE_PORT}
    for name in references(text):
        if name not in allowed:
            raise UnknownVariable(f"unknown variable ${{{name}}} (known: {', '.join(sorted(allowed - {FREE_PORT}))})")
    for match in _REFERENCE.finditer(text):
        if match.group(2) == FREE_PORT and not match.group(3):
            raise UnknownVariable("${free_port} needs a label: ${free_port:NAME}")


def substitute(text: str, values: Mapping[str, str], free_port: Callable[[str], int]) -> str:
    """``text`` with every ${name} replaced; ${free_port:LABEL} asks ``free_port(LABEL)``."""

    def replace(match: re.Match[str]) -> str:
        if match.group(1) == "$":
            return "$"
        name, label = match.group(2), match.group(3)
        if name == FREE_PORT:
            return str(free_port(label))
        if name not in values:
            raise UnknownVariable(f"unknown variable ${{{name}}}")
        return values[name]

    return _REFERENCE.sub(replace, text)


def resolve_declared(
    declared: Mapping[str, str], values: dict[str, str], free_port: Callable[[str], int]
) -> dict[str, str]:
    """Add the test's ``vars:`` to ``values``, in order: a var may use earlier ones."""
    for name, text in declared.items():
        values[name] = substitute(text, values, free_port)
    return values
