"""Sizes of the keeper's structures, logged on demand: how a soak tells growth from load.

With ``FDKEEPER_DEBUG_SIZES=SECONDS`` in the keeper's environment, the keeper logs every
SECONDS one line of the sizes of everything that could grow with use (connections, leases,
control clients and their reply queues, the Reactor's timers and descriptors, health
bookkeeping), how long it spent on each control verb, and, with tracemalloc started at launch,
the allocation sites that grew most since the first line (a baseline taken after the keeper
warmed up). Off by default: tracemalloc slows the keeper down. bench/soak.py is its user.
"""

from __future__ import annotations

import gc
import logging
import os
import time
import tracemalloc
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fdkeeper.keeper.control import ControlClient
    from fdkeeper.keeper.server import Keeper, VerbHandler
    from fdkeeper.protocol import Request

log = logging.getLogger("fdkeeper.keeper")

ENV = "FDKEEPER_DEBUG_SIZES"
TOP_SITES = 8


def structure_sizes(keeper: Keeper) -> dict[str, int]:
    """Every collection in the keeper that a long run could make grow, by name."""
    reactor, pool, clients = keeper.reactor, keeper.pool, keeper.clients
    return {
        "connections": len(keeper.connections),
        "closed": sum(1 for c in keeper.connections.values() if c.sock is None),
        "by_key": len(pool.by_key),
        "tls_profiles": len(pool.tls_profiles),
        "opening": len(pool.opener.in_progress),
        "holders": len(keeper.leases.holders),
        "waiters": len(keeper.waiters.waiting),
        "clients": len(clients.clients),
        "queued_replies": sum(len(c._queue) for c in clients.clients.values()),
        "timers": reactor.pending_timers(),
        "timers_cancelled": reactor._cancelled_in_heap,
        "watched_fds": len(reactor._handlers),
        "settling": len(keeper.health._settling),
        "gave_up": len(keeper.health._gave_up),
        "tls_to_sut_bytes": sum(c.io.buffered()[0] for c in keeper.connections.values()),
        "tls_to_sipp_bytes": sum(c.io.buffered()[1] for c in keeper.connections.values()),
        "log_handlers": len(logging.getLogger().handlers) + len(log.handlers),
        "gc_objects": len(gc.get_objects()),
    }


def install(keeper: Keeper, every: Callable[[float, Callable[[], None]], None]) -> None:
    """Start logging sizes every ``FDKEEPER_DEBUG_SIZES`` seconds, if it is set."""
    try:
        interval = float(os.environ.get(ENV, ""))
    except ValueError:
        return
    if not interval > 0:
        return
    if not tracemalloc.is_tracing():
        tracemalloc.start(3)
    baseline: list[tracemalloc.Snapshot] = []
    verb_times = _time_verbs(keeper)

    def report() -> None:
        sizes = " ".join(f"{k}={v}" for k, v in structure_sizes(keeper).items())
        snapshot = tracemalloc.take_snapshot()
        traced, _peak = tracemalloc.get_traced_memory()
        log.warning("sizes: %s traced=%d rss=%d", sizes, traced, _rss())
        for verb, times in verb_times.items():
            if times:
                times.sort()
                log.warning(
                    "  %s: %d served, median %.3f ms, p90 %.3f ms in the keeper",
                    verb,
                    len(times),
                    times[len(times) // 2] * 1000,
                    times[int(0.9 * (len(times) - 1))] * 1000,
                )
                times.clear()
        if not baseline:
            baseline.append(snapshot)
            return
        for stat in snapshot.compare_to(baseline[0], "traceback")[:TOP_SITES]:
            frames = " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in stat.traceback)
            log.warning("  grew %+d B (%+d blocks) at %s", stat.size_diff, stat.count_diff, frames)

    every(interval, report)


def _time_verbs(keeper: Keeper) -> dict[str, list[float]]:
    """Wrap each verb handler to record how long the keeper spends on it (Pending included)."""
    times: dict[str, list[float]] = {}
    for verb, handler in keeper._verbs.items():
        times[verb] = []

        def timed(
            client: ControlClient,
            pid: int,
            request: Request,
            handler: VerbHandler = handler,
            record: Callable[[float], None] = times[verb].append,
        ) -> None:
            started = time.perf_counter()
            try:
                handler(client, pid, request)
            finally:
                record(time.perf_counter() - started)

        keeper._verbs[verb] = timed
    return times


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
