#!/usr/bin/env python3
"""Memory per idle kept WSS connection, side by side with an idle kept TLS one.

One keeper, one Kamailio SuT with TLS and WSS listeners (testbed.Kamailio(websocket=True)).
The keeper opens per-user connections (one AoR each, as `-t ln` register runs leave them) in
batches that alternate between TLS and WSS (TLS first in even rounds, WSS first in odd ones),
and its resident memory is read after each batch, once the batch has settled; each batch's
growth is put to its transport's account. The figure per transport is its total growth over
the connections it added; goal (issue 19): a WSS connection within 5 kB of a TLS one.

A WSS connection holds what a TLS one does (the TCP socket, the SSL object, the socketpair runs
are leased one end of, the link's buffers) plus the WebSocket's: the handshake kept for
`fdkeeper status` (path, protocol, server headers) and the frame decoder.

Usage:  python3 bench/ws_memory.py                 (1,000 of each, about 1 minute)
        python3 bench/ws_memory.py --users 500 --batch 50
Exit status 0 when the bench ran (the goal met or missed: the output says which), 1 when the
set-up did not work.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import psutil

# Run as a script (python3 bench/ws_memory.py): bench/ is sys.path[0], cpslib is beside us.
from cpslib import run_bench

from fdkeeper import testbed
from fdkeeper.client import KeeperClient, ensure_keeper
from fdkeeper.errors import FdkeeperError
from fdkeeper.testbed.pki import TestPki, make_test_pki

GOAL_KB = 5.0  # a WSS connection's memory over a TLS one's, at most
SETTLE_S = 0.3  # after a batch: the keeper's allocations for it are done
TRANSPORTS = ("tls", "wss")
DESCRIPTORS_PER_CONNECTION = 3  # the TCP socket and the socketpair (keeper/pool.py's count)


def raise_open_file_limit(users: int) -> None:
    """Room for the keeper (inherits it) and Kamailio: 3 descriptors per connection and transport."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = len(TRANSPORTS) * DESCRIPTORS_PER_CONNECTION * users + 1024
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            raise RuntimeError(f"{users} users need {wanted} open files; the hard limit is {hard}: use fewer --users")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def open_batch(
    keeper: KeeperClient, sut: testbed.Kamailio, pki: TestPki, transport: str, first: int, count: int
) -> None:
    """One kept connection per user, users first..first+count-1 of this transport."""
    remote = sut.wss_address if transport == "wss" else sut.tls_address
    host, port = remote.rsplit(":", 1)
    for index in range(first, first + count):
        keeper.prepare(
            role="client",
            transport=transport,
            remote=(host, int(port)),
            local="-",
            aor=f"sip:{transport}{index}@{sut.domain}",
            tls_ca=str(pki.ca_cert),
            tls_sni=pki.server_name,
        )


def rss(process: psutil.Process) -> int:
    time.sleep(SETTLE_S)
    return int(process.memory_info().rss)


def measure(
    keeper: KeeperClient, sut: testbed.Kamailio, pki: TestPki, users: int, batch: int
) -> dict[str, list[tuple[int, int]]]:
    """Each batch's RSS growth and size, per transport, the batches alternating."""
    process = psutil.Process(keeper.status()["keeper"]["pid"])
    for transport in TRANSPORTS:  # warm-up: imports, the allocator's first arenas, the SSL context
        open_batch(keeper, sut, pki, transport, 0, 10)
    growth: dict[str, list[tuple[int, int]]] = {transport: [] for transport in TRANSPORTS}
    opened = dict.fromkeys(TRANSPORTS, 10)
    for round_number in range(-(-(users - 10) // batch)):
        order = TRANSPORTS if round_number % 2 == 0 else TRANSPORTS[::-1]
        for transport in order:
            count = min(batch, users - opened[transport])
            before = rss(process)
            open_batch(keeper, sut, pki, transport, opened[transport], count)
            growth[transport].append((rss(process) - before, count))
            opened[transport] += count
    return growth


def check_kept(keeper: KeeperClient, users: int) -> str:
    """Every connection still kept and idle at the end (none closed by the SuT meanwhile)."""
    counts = []
    for transport in TRANSPORTS:
        idle = keeper.status(transport=transport, state="idle", count=True).get("count")
        counts.append(f"{transport} {idle}/{users} idle")
    return ", ".join(counts)


def report(growth: dict[str, list[tuple[int, int]]], users: int, batch: int, kept: str) -> None:
    per_kb = {
        transport: sum(grown for grown, _ in batches) / sum(count for _, count in batches) / 1024
        for transport, batches in growth.items()
    }
    difference = per_kb["wss"] - per_kb["tls"]
    print(f"idle kept connections: {users} TLS and {users} WSS, batches of {batch} alternating ({kept})")
    for transport in TRANSPORTS:
        batches = sorted(grown / count / 1024 for grown, count in growth[transport] if count)
        print(
            f"  memory per idle {transport.upper()} connection: {per_kb[transport]:6.1f} kB "
            f"(per batch: median {batches[len(batches) // 2]:.1f}, min {batches[0]:.1f}, max {batches[-1]:.1f} kB)"
        )
    met = difference <= GOAL_KB
    print(
        f"  WSS - TLS: {difference:+.1f} kB per connection (WSS/TLS {per_kb['wss'] / per_kb['tls']:.3f})  "
        f"goal {'met' if met else 'missed'} (within {GOAL_KB:g} kB)"
    )
    print(f"  nproc {len(os.sched_getaffinity(0))}; python {sys.version.split()[0]}")


class MemoryBench:
    """The SuT and the keeper of one run; close() stops both (cpslib.run_bench calls it on any exit)."""

    def __init__(self, workdir: Path, users: int) -> None:
        raise_open_file_limit(users)  # before Kamailio and the keeper inherit it
        self.pki = make_test_pki(workdir / "pki")
        self.sut = testbed.Kamailio(
            workdir / "kamailio",
            shm_mb=1024,
            tls=testbed.KamailioTls.server(self.pki),
            websocket=True,
            tcp_max_connections=len(TRANSPORTS) * users + 1000,
        )
        self.keeper_dir = workdir / "keeper"
        self.keeper: KeeperClient | None = None

    def close(self) -> None:
        try:
            if self.keeper is not None:
                self.keeper.stop()
        finally:
            self.sut.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1000, help="idle connections of each transport (default 1000)")
    parser.add_argument("--batch", type=int, default=100, help="connections per batch (default 100)")
    parser.add_argument("--keep-files", action="store_true", help="keep the temp dir (logs)")
    parser.add_argument("--sipp", help=argparse.SUPPRESS)  # cpslib.run_bench looks for one; none runs here
    args = parser.parse_args(argv)

    def body(bench: MemoryBench, began: float) -> None:
        bench.sut.start()
        bench.keeper = ensure_keeper(bench.keeper_dir)
        try:
            growth = measure(bench.keeper, bench.sut, bench.pki, args.users, args.batch)
        except FdkeeperError as error:
            raise RuntimeError(str(error)) from error
        report(growth, args.users, args.batch, check_kept(bench.keeper, args.users))
        print(f"  bench time {time.monotonic() - began:.0f} s")

    return run_bench("ws_memory", args, lambda workdir, _sipp: MemoryBench(workdir, args.users), body)


if __name__ == "__main__":
    sys.exit(main())
