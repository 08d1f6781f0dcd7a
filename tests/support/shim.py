"""Building the shim and running the C test program (tests/shim/shimprog.c) under it: the
compile exactly as the package build does it, the environment a run's shim reads, and a TCP
listener standing in for the SuT. Environment knobs (SHIM_TEST_*) are described below."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Protocol

from fdkeeper.testbed import bind_fresh_port, wait_until
from tests.support.paths import HELPERS, TESTS

sys.path.insert(0, str(HELPERS))  # helpers/shimbuild.py: the package build's compile flags
from shimbuild import SANITIZE_CFLAGS, asan_runtime, compile_program, compile_shim
from shimbuild import SENDSTUB_CFLAGS as SENDSTUB_CFLAGS  # re-exported: the ptrace stub's test builds it too
from shimbuild import WERROR as WERROR
from shimbuild import sendstub_source as sendstub_source

SHIMPROG_SRC = TESTS / "shim" / "shimprog.c"
# e.g. SHIM_TEST_WRAPPER="valgrind -q --error-exitcode=99" runs the C test programs under it.
WRAPPER = os.environ.get("SHIM_TEST_WRAPPER", "").split()
# SHIM_TEST_SANITIZE=1: the shim built with AddressSanitizer + UBSan, the ASan runtime
# preloaded first (a program built without it cannot load an ASan shim otherwise).
# By hand: SHIM_TEST_CFLAGS="-fsanitize=..." with SHIM_TEST_PRELOAD_FIRST=/path/libasan.so.
SANITIZE = os.environ.get("SHIM_TEST_SANITIZE", "") == "1"
EXTRA_CFLAGS = [*os.environ.get("SHIM_TEST_CFLAGS", "").split(), *(SANITIZE_CFLAGS if SANITIZE else [])]
PRELOAD_FIRST = asan_runtime() if SANITIZE else os.environ.get("SHIM_TEST_PRELOAD_FIRST", "")
# SHIM_TEST_BUILT=DIR: the shim and shimprog that build_shim_and_program already built in DIR
# (with the flags this run would use): the workers of a pytest -n N share one build.
BUILT = os.environ.get("SHIM_TEST_BUILT", "")


def build_shim_and_program(out: Path, cflags: list[str] | None = None) -> dict[str, str]:
    """The shim exactly as the package build compiles it (plus `cflags`, by default
    EXTRA_CFLAGS), and shimprog; those in SHIM_TEST_BUILT instead when it is set."""
    if BUILT:
        return {"lib": str(Path(BUILT) / "libfdkeeper_shim.so"), "prog": str(Path(BUILT) / "shimprog")}
    lib, prog = out / "libfdkeeper_shim.so", out / "shimprog"
    warnings = compile_shim(lib, EXTRA_CFLAGS if cflags is None else cflags)
    assert warnings == "", "the shim must compile without warnings:\n" + warnings
    compile_program(SHIMPROG_SRC, prog)
    return {"lib": str(lib), "prog": str(prog)}


class Sut:
    """A TCP listener on 127.0.0.1 standing in for the SIP server."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        bind_fresh_port(self.sock)
        self.sock.listen(1024)
        self.sock.settimeout(10)
        self.port: int = self.sock.getsockname()[1]
        self.addr = f"127.0.0.1:{self.port}"
        self.peers: list[socket.socket] = []

    def accept(self) -> socket.socket:
        conn, _ = self.sock.accept()
        conn.settimeout(10)
        self.peers.append(conn)
        return conn

    def close(self) -> None:
        for p in self.peers:
            p.close()
        self.sock.close()


def shim_env(
    build: dict[str, str],
    keeper_path: str | Path | None,
    role: str = "client",
    remote: str | None = None,
    debug: bool = False,
    **extra: str,
) -> dict[str, str]:
    """The environment of a program run under the shim: preloaded, pointed at the keeper's socket
    (none: the shim stays inert), with the run's role and SuT; any FDKEEPER_* of ours left out."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FDKEEPER_")}
    env["LD_PRELOAD"] = (PRELOAD_FIRST + " " + build["lib"]).strip()
    if keeper_path is not None:
        env["FDKEEPER_SOCKET"] = str(keeper_path)
        env["FDKEEPER_ROLE"] = role
        env["FDKEEPER_TRANSPORT"] = "tcp"
        if remote is not None:
            env["FDKEEPER_REMOTE"] = remote
    if debug:
        env["FDKEEPER_DEBUG"] = "1"
    env.update(extra)
    return env


def run(
    build: dict[str, str], args: list[str], env: dict[str, str], timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    """Run shimprog (under SHIM_TEST_WRAPPER, if set) with ``args`` in ``env``; its output as text."""
    return subprocess.run([*WRAPPER, build["prog"], *args], env=env, capture_output=True, text=True, timeout=timeout)


def parse(out: str) -> dict[str, str]:
    """Every key=value word shimprog printed, the last one of each key winning."""
    kv = {}
    for line in out.splitlines():
        for tok in line.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                kv[k] = v
    return kv


def recv_until(sock: socket.socket, needle: bytes, timeout: float = 10) -> bytes:
    """Read until ``needle`` arrives or the peer ends; everything read."""
    sock.settimeout(timeout)
    buf = b""
    while needle not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


def start_client(build: dict[str, str], env: dict[str, str], *address: str) -> subprocess.Popen[str]:
    """shimprog's client role under the shim: it connects to ``address`` (HOST PORT [BIND_IP]),
    says hello, reads one line and prints what it saw as key=value lines."""
    return subprocess.Popen(
        [*WRAPPER, build["prog"], "client", *address],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


class LeasingKeeper(Protocol):
    sut_side: list[socket.socket]  # the SuT's end of each connection the keeper leased


def exchange_over_lease(
    keeper: LeasingKeeper, program: subprocess.Popen[str], reply: bytes = b"pong\n"
) -> tuple[str, str]:
    """The client's hello read at the SuT's end of the leased connection and ``reply`` sent
    back; the program's output once it ended (killed if it did not)."""
    try:
        assert wait_until(lambda: keeper.sut_side, timeout=10), "the keeper got no lease"
        peer = keeper.sut_side[0]
        assert recv_until(peer, b"hello\n") == b"hello\n"
        peer.sendall(reply)
        return program.communicate(timeout=10)
    finally:
        if program.poll() is None:
            program.kill()
