#!/usr/bin/env python3
"""Calls per second through a kept TCP connection versus sipp straight to the same Kamailio.

The figure: for each configuration, the highest call rate at which one sipp run had no failed
call and kept the rate, and the calls/s achieved in that run (successful calls / sipp's elapsed
time). Goal: ratio (b) / (a) >= 0.98, where

    (a) plain sipp -t t1 straight to Kamailio (a new TCP connection per run),
    (b) the same command line through `python3 -m fdkeeper sipp` (the kept connection).

Set-up (all on loopback, in a temp dir, removed at the end):
  * one Kamailio registrar (fdkeeper.testbed.Kamailio, shared memory raised to SHM_MB);
  * a callee "bob": a plain sipp UAS over UDP on port P, registered first from that same
    port, so Kamailio relays the calls to 127.0.0.1:P over UDP;
  * the caller: scenarios/uac-call.xml over TCP (-t t1) to bob through Kamailio.
Each configuration climbs the rate in coarse steps up to its first failure, then in fine steps
from its last coarse pass up to its first fine failure. At every step the two configurations
run one after the other, the first one alternating (a b, b a, a b ...), so the slow drift of a
shared, noisy machine hits both alike. A failed run is retried once before it counts. "Failed"
is a failed call, or a rate not kept: fewer than 95 % of the calls/s an ideal run would reach.

Usage:  python3 bench/cps_tcp.py            (about 4 minutes)
        python3 bench/cps_tcp.py --quick    (about 1 minute)
        python3 bench/cps_tcp.py --steps 500,1000,1500 --duration 3
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

# Run as a script (python3 bench/cps_tcp.py): bench/ is sys.path[0], cpslib is beside us.
from cpslib import BenchBase, bench_parser, cps_main, kept_connections, print_ab_result, print_footer
from cpsruns import Run

from fdkeeper import testbed

GOAL = 0.98
CONFIGS = ("a", "b")
LABELS = {"a": "plain sipp", "b": "through fdkeeper"}


@dataclass
class Bench(BenchBase):
    """(a) plain sipp -t t1 straight to Kamailio, (b) the same through `fdkeeper sipp`."""

    CONFIGS = CONFIGS
    LABELS = LABELS
    PROG = "cps_tcp"

    def start_caller(self, config: str, name: str, options: dict) -> testbed.SippProcess:
        start = self.start_plain if config == "a" else self.start_kept
        return start("uac-call.xml", name, **options)


# --------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------


def kept_connection_line(bench: Bench) -> str:
    """Which connection (b) used: one kept connection, leased once per fdkeeper run."""
    connections = kept_connections(bench)
    if isinstance(connections, str):
        return f"kept connection: {connections}"
    b_runs = 1 + sum(1 for r in bench.runs if r.config == "b")  # + the warm-up
    parts = [f"{c.get('local')}->{c.get('remote')} {c.get('state')}, {c.get('leases')} leases" for c in connections]
    return f"kept connection(s): {'; '.join(parts) or 'none'} ({b_runs} fdkeeper runs)"


def report(bench: Bench, best: dict[str, Run | None], seconds: float) -> None:
    print()
    print(f"result (runs of {bench.duration:g} s, scenario uac-call.xml over TCP, callee over UDP):")
    print_ab_result(bench, best, GOAL)
    print(f"  {kept_connection_line(bench)}")
    print_footer(bench, seconds)


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def banner(bench: Bench) -> list[str]:
    return [f"Kamailio on {bench.kamailio.address}"]


def main(argv: list[str] | None = None) -> int:
    return cps_main(Bench, bench_parser(__doc__, duration=5.0, step=500.0), argv, banner, report)


if __name__ == "__main__":
    sys.exit(main())
