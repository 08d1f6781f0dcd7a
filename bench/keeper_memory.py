#!/usr/bin/env python3
"""Keeper memory per idle kept connection, TLS and plain TCP, measured in one run.

A helper process holds N TLS and N TCP server connections on loopback addresses
127.0.1.x (one address per connection, since the keeper keeps one client connection per
SuT address); one keeper opens them all, and its resident memory is read before and after
each batch. Goal (issue 3): under 100 kB per idle TLS connection.

    python3 bench/keeper_memory.py [--connections 300]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import ssl
import sys
import tempfile
import time
from pathlib import Path

import psutil

from fdkeeper.client import KeeperClient, ensure_keeper
from fdkeeper.testpki import make_test_pki

GOAL_TLS_KB = 100
PORT_TLS, PORT_TCP = 25061, 25060


def addresses(count: int) -> list[str]:
    return [f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(count)]


def serve(count: int, cert: str, key: str, ready) -> None:
    """The peers: accept and hold every connection (run in a child process)."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(4096):  # until the keeper closes
            if data == b"\r\n\r\n":  # answer RFC 5626 pings, as a SIP server does
                writer.write(b"\r\n")

    async def main() -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        hosts = addresses(count)
        await asyncio.start_server(hold, hosts, PORT_TLS, ssl=context, backlog=1024)
        await asyncio.start_server(hold, hosts, PORT_TCP, backlog=1024)
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def open_all(keeper: KeeperClient, hosts: list[str], port: int, transport: str) -> None:
    extra = {"tls_insecure": True} if transport == "tls" else {}
    for host in hosts:
        keeper.prepare(role="client", transport=transport, remote=(host, port), local="-", **extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=300, help="connections of each kind (default 300)")
    options = parser.parse_args()
    count = options.connections

    workdir = Path(tempfile.mkdtemp(prefix="fdkeeper-membench-"))
    pki = make_test_pki(workdir / "pki")
    ready = multiprocessing.Event()
    server = multiprocessing.Process(target=serve, args=(count, str(pki.server_cert), str(pki.server_key), ready), daemon=True)
    server.start()
    ready.wait(30)
    keeper = ensure_keeper(workdir / "keeper")
    pid = int(keeper.alive().fields["pid"])
    try:
        hosts = addresses(count)
        open_all(keeper, hosts[:5], PORT_TCP, "tcp")  # warm up imports and allocator
        open_all(keeper, hosts[:5], PORT_TLS, "tls")
        time.sleep(0.5)
        base = rss(pid)
        started = time.monotonic()
        open_all(keeper, hosts[5:], PORT_TCP, "tcp")
        tcp_seconds = time.monotonic() - started
        time.sleep(0.5)
        after_tcp = rss(pid)
        started = time.monotonic()
        open_all(keeper, hosts[5:], PORT_TLS, "tls")
        tls_seconds = time.monotonic() - started
        time.sleep(0.5)
        after_tls = rss(pid)
        report(count - 5, base, after_tcp, after_tls, tcp_seconds, tls_seconds)
    finally:
        keeper.stop()
        server.terminate()


def report(count: int, base: int, after_tcp: int, after_tls: int, tcp_seconds: float, tls_seconds: float) -> None:
    tcp_kb = (after_tcp - base) / count / 1024
    tls_kb = (after_tls - after_tcp) / count / 1024
    print(f"keeper memory per idle connection, {count} of each kind, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    print(f"  TCP: {tcp_kb:6.1f} kB per connection (opened {count / tcp_seconds:,.0f}/s)")
    print(f"  TLS: {tls_kb:6.1f} kB per connection (opened {count / tls_seconds:,.0f}/s, handshake included)")
    print(f"  ratio TLS/TCP memory per connection: {tls_kb / max(tcp_kb, 0.1):.1f}")
    verdict = "goal met" if tls_kb < GOAL_TLS_KB else "goal missed"
    print(f"TLS {tls_kb:.1f} kB per idle connection (goal: under {GOAL_TLS_KB} kB): {verdict}")


if __name__ == "__main__":
    main()
