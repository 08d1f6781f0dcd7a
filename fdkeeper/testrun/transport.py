"""A test's `transport:` (and the pytest plugin's): what the embedded SuT listens on, the
variables that name it, and the fdkeeper sipp options its sipp steps get.

- ``tcp`` (the default): UDP and TCP at ${sut};
- ``tls``: TLS too, at ${sut_tls}, with a throw-away test PKI (${tls_ca}, ${tls_sni});
- ``ws``: SIP over WebSocket too, at ${sut_ws}; its sipp steps with -t t1 or tn run
  `fdkeeper sipp --ws` (one WebSocket, or one per user);
- ``wss``: TLS and secure WebSocket too, at ${sut_tls} and ${sut_wss}, with the test PKI;
  its sipp steps with -t l1 or ln run `fdkeeper sipp --ws` (WSS).
A sipp step over UDP (the caller, -t u1) is left as it is.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from fdkeeper.testrun.variables import TLS_VARIABLES, WS_VARIABLES, WSS_VARIABLES

TRANSPORTS = ("tcp", "tls", "ws", "wss")
WEBSOCKET_FLAG = "--ws"

# Set by an embedded SuT, by transport, beyond ${sut}, ${sut_host}, ${sut_port}, ${domain}.
VARIABLES: dict[str, tuple[str, ...]] = {
    "tcp": (),
    "tls": TLS_VARIABLES,
    "ws": WS_VARIABLES,
    "wss": (*TLS_VARIABLES, *WS_VARIABLES, *WSS_VARIABLES),
}

# sipp's -t for one connection over each transport (tn/ln: one per user).
ONE_CONNECTION = {"tcp": "t1", "tls": "l1", "ws": "t1", "wss": "l1"}
# sipp's -t values a WebSocket test's sipp steps speak WebSocket with; the other kind's are refused.
_WEBSOCKET_SIPP = {"ws": ("t1", "tn"), "wss": ("l1", "ln")}
_KIND = {"ws": "WebSocket over TCP", "wss": "WebSocket over TLS"}


def has_tls(transport: str) -> bool:
    """Does the embedded SuT of this transport listen for TLS (and need a test PKI)?"""
    return transport in ("tls", "wss")


def has_websocket(transport: str) -> bool:
    return transport in _WEBSOCKET_SIPP


def sipp_transport(args: Sequence[str]) -> str | None:
    """sipp's -t value among `args` (the last one given), None without one."""
    value = None
    for flag, following in itertools.pairwise(args):
        if flag == "-t":
            value = following
    return value


def step_options(transport: str, args: Sequence[str], options: Sequence[str]) -> list[str]:
    """The fdkeeper sipp options of a sipp step in a test of `transport`: `--ws` added for
    a WebSocket test's stream steps. ValueError (one line) for -t of the other kind."""
    if not has_websocket(transport) or WEBSOCKET_FLAG in options:
        return list(options)
    given = sipp_transport(args)
    if given is None or "$" in given:  # UDP by default, or chosen by a variable: as written
        return list(options)
    other = "wss" if transport == "ws" else "ws"
    if given in _WEBSOCKET_SIPP[other]:
        wanted = " or ".join(_WEBSOCKET_SIPP[transport])
        raise ValueError(
            f"-t {given} in a test with transport {transport} ({_KIND[transport]}): use -t {wanted}, "
            f"or transport {other} for {_KIND[other]}"
        )
    if given in _WEBSOCKET_SIPP[transport]:
        return [WEBSOCKET_FLAG, *options]
    return list(options)
