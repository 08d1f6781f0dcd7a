"""The options replayed onto a kept connection: the ptrace mode's replays_option (NOT_REPLAYED,
fdkeeper/modes/ptrace/services.py) against the shim's handoff_replays_option (helpers/shim/replay.c),
on the same options."""

from __future__ import annotations

import ctypes
import socket
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fdkeeper.modes.ptrace.services import replays_option as ptrace_replays

LEVELS = [socket.SOL_SOCKET, socket.IPPROTO_TCP, socket.IPPROTO_IP, socket.IPPROTO_IPV6, socket.IPPROTO_UDP]

Replays = Callable[[int, int, bool], bool]


@pytest.fixture(scope="module")
def replays(twin_library: Callable[[str, list[str]], ctypes.CDLL]) -> Replays:
    function = twin_library("replay", ["shim/replay.c"]).handoff_replays_option
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    function.restype = ctypes.c_int
    return lambda level, name, pair: bool(function(level, name, int(pair)))


@pytest.mark.parametrize("pair", [False, True])
@pytest.mark.parametrize("level", LEVELS)
def test_every_option_of_the_usual_levels(replays: Replays, level: int, pair: bool) -> None:
    for name in range(128):
        assert replays(level, name, pair) == ptrace_replays(level, name, pair), (level, name, pair)


def test_the_ones_that_matter_to_sipp(replays: Replays) -> None:
    """sipp's own: SO_REUSEADDR and SO_LINGER stay with its socket, TCP_NODELAY goes to a TCP
    connection only, SO_SNDBUF/SO_RCVBUF always."""
    assert not replays(socket.SOL_SOCKET, socket.SO_REUSEADDR, False)
    assert not replays(socket.SOL_SOCKET, socket.SO_LINGER, False)
    assert replays(socket.IPPROTO_TCP, socket.TCP_NODELAY, False)
    assert not replays(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    assert replays(socket.SOL_SOCKET, socket.SO_SNDBUF, True) and replays(socket.SOL_SOCKET, socket.SO_RCVBUF, True)


@given(st.integers(-(2**31), 2**31 - 1), st.integers(-(2**31), 2**31 - 1), st.booleans())
def test_any_level_and_name(replays: Replays, level: int, name: int, pair: bool) -> None:
    assert replays(level, name, pair) == ptrace_replays(level, name, pair)
