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
Exit status: 0 when the bench ran (goal met or missed: the output says which), 1 when the
set-up did not work, 130 on Ctrl-C. Everything started is stopped, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

# Run as a script (python3 bench/cps_tcp.py): bench/ is sys.path[0], cpslib is beside us.
from cpslib import (
    CALLEE,
    SHM_MB,
    BenchBase,
    Run,
    ascents,
    caller_options,
    climb,
    command_version,
    common_arguments,
    cpu_model,
    paired_ratios,
    print_best_rates,
    print_footer,
    resolve_defaults,
    run_bench,
    table_header,
)

from fdkeeper import testbed
from fdkeeper.client import KeeperClient
from fdkeeper.errors import FdkeeperError

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

    def caller_options(self, config: str, rate: float, duration: float) -> dict:
        return caller_options(self, rate, duration)


# --------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------

TABLE_HEADER = table_header()


def machine_facts(bench: Bench) -> list[str]:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    sipp = command_version([bench.sipp, "-v"], r"SIPp v\S+")
    kamailio = command_version([bench.kamailio.command()[0], "-v"], r"kamailio \S+ \S+")
    workers = bench.kamailio.children
    return [
        f"nproc {len(os.sched_getaffinity(0))} ({cpu_model()}); load average now {load}",
        f"sipp: {sipp}",
        f"kamailio: {kamailio} ({workers} UDP + {workers} TCP workers, {SHM_MB} MB shm)",
    ]


def kept_connection_line(bench: Bench) -> str:
    """Which connection (b) used: one kept connection, leased once per fdkeeper run."""
    try:
        connections = KeeperClient(bench.keeper_dir).status()["connections"]
    except (FdkeeperError, OSError, KeyError) as exc:
        return f"kept connection: keeper status unavailable ({exc})"
    b_runs = 1 + sum(1 for r in bench.runs if r.config == "b")  # + the warm-up
    parts = [f"{c.get('local')}->{c.get('remote')} {c.get('state')}, {c.get('leases')} leases" for c in connections]
    return f"kept connection(s): {'; '.join(parts) or 'none'} ({b_runs} fdkeeper runs)"


def report(bench: Bench, best: dict[str, Run | None], seconds: float) -> None:
    print()
    print(f"result (runs of {bench.duration:g} s, scenario uac-call.xml over TCP, callee over UDP):")
    ratio = print_best_rates(best, {config: LABELS[config] for config in CONFIGS}, 17)
    verdict = "goal met" if ratio is not None and ratio >= GOAL else "goal missed"
    print(f"  ratio b/a (achieved calls/s): {ratio:.3f}" if ratio is not None else "  ratio b/a: n/a")
    print(f"  {verdict} (goal: ratio >= {GOAL})")
    if best["a"] and best["b"] and best["a"].rate != best["b"].rate:
        low, gap = min(best["a"].rate, best["b"].rate), abs(best["a"].rate - best["b"].rate)
        print(f"  the highest rates differ by {gap:g} calls/s ({gap / low:.1%}): the ratio moves in whole rate steps")
    pairs = paired_ratios(bench.runs)
    if pairs:
        pairs.sort()
        print(
            f"  b/a at the {len(pairs)} rates both passed: median {pairs[len(pairs) // 2]:.3f}, "
            f"min {pairs[0]:.3f}, max {pairs[-1]:.3f}"
        )
    print(f"  {kept_connection_line(bench)}")
    print_footer(bench, machine_facts(bench), seconds)


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common_arguments(
        parser,
        quick="about 1 minute: 2 s runs, coarse steps of 1000, fine steps of 200",
        duration=5.0,
        quick_duration=2.0,
        step=500.0,
        quick_step=1000.0,
    )
    return resolve_defaults(parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body(bench: Bench, began: float) -> None:
        bench.setup()
        print(f"Kamailio on {bench.kamailio.address}; callee {CALLEE} (sipp UAS over UDP) registered; warm-up ok")
        print(TABLE_HEADER, flush=True)
        steps = [float(r) for r in args.steps.split(",") if r.strip()] if args.steps else None
        print(f"-- steps {args.steps}" if steps else f"-- coarse steps of {args.step:g} calls/s", flush=True)
        best = climb(bench, ascents(bench, args.step, args.fine, args.max_rate, steps))
        report(bench, best, time.monotonic() - began)

    return run_bench("cps_tcp", args, lambda workdir, sipp: Bench(workdir, sipp, args.duration, args.retries), body)


if __name__ == "__main__":
    sys.exit(main())
