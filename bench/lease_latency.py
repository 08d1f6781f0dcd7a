#!/usr/bin/env python3
"""Lease latency: from the shim's request to the descriptor installed on sipp's socket.

Compiles bench/lease_latency.c, which times connect() calls. With the shim preloaded each
connect() is a lease from a running keeper (request, SCM_RIGHTS reply, dup3, epoll
re-registration); without it, a plain TCP connect over loopback, measured in the same run
for scale. Goal (issue 2): median under 1 ms over 1,000 leases.

    python3 bench/lease_latency.py [--count 1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from fdkeeper.client import ensure_keeper
from fdkeeper.modes.preload import shim_path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "helpers"))
from shimbuild import compile_program  # noqa: E402 - the shim's build flags, written once

GOAL_MEDIAN_MS = 1.0


def compile_probe(workdir: Path) -> Path:
    binary = workdir / "lease_latency"
    compile_program(HERE / "lease_latency.c", binary)
    return binary


def accept_forever(listener: socket.socket, accepted: list[socket.socket]) -> None:
    """The stand-in SuT: accept and hold every connection (the plain-connect runs make many)."""
    while True:
        try:
            connection, _ = listener.accept()
        except OSError:
            return
        accepted.append(connection)


def run_probe(binary: Path, address: tuple[str, int], count: int, env: dict[str, str]) -> list[float]:
    output = subprocess.run(
        [str(binary), address[0], str(address[1]), str(count)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [int(line) / 1e6 for line in output.split()]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="connects per round (default 1000)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of each kind (default 5)")
    options = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="fdkeeper-bench-"))
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    accepted: list[socket.socket] = []
    threading.Thread(target=accept_forever, args=(listener, accepted), daemon=True).start()
    address = listener.getsockname()[:2]
    keeper = ensure_keeper(workdir / "keeper")
    try:
        binary = compile_probe(workdir)
        keeper.prepare(role="client", transport="tcp", remote=address, local="-")
        leased_env = {
            "LD_PRELOAD": str(shim_path()),
            "FDKEEPER_SOCKET": str(keeper.path),
            "FDKEEPER_ROLE": "client",
            "FDKEEPER_REMOTE": f"{address[0]}:{address[1]}",
            "FDKEEPER_TRANSPORT": "tcp",
        }
        leases: list[float] = []
        plain: list[float] = []
        for _ in range(options.rounds):  # alternate, so machine noise hits both alike
            leases += run_probe(binary, address, options.count, leased_env)
            plain += run_probe(binary, address, options.count, {})
            for connection in accepted[1:]:
                connection.close()
            del accepted[1:]
        report(leases, plain, options)
    finally:
        keeper.stop()
        listener.close()
        shutil.rmtree(workdir, ignore_errors=True)


def report(leases: list[float], plain: list[float], options: argparse.Namespace) -> None:
    print(f"lease latency, {options.rounds} rounds x {options.count} connects each, {os.cpu_count()} CPUs")
    print(f"{'':28}{'median ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for name, values in (("lease from the keeper", leases), ("plain loopback TCP connect", plain)):
        print(
            f"{name:28}{statistics.median(values):10.3f}{percentile(values, 0.99):10.3f}{statistics.mean(values):10.3f}"
        )
    ratio = statistics.median(leases) / statistics.median(plain)
    print(f"ratio lease/plain connect (median): {ratio:.2f}")
    median = statistics.median(leases)
    verdict = "goal met" if median < GOAL_MEDIAN_MS else "goal missed"
    print(f"lease median {median:.3f} ms (goal: under {GOAL_MEDIAN_MS:g} ms): {verdict}")


if __name__ == "__main__":
    main()
