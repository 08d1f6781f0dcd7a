#!/usr/bin/env python3
"""A static sipp at parity with preload: -t tn with many users, side by side in one run.

(a) Debian's sipp 3.6.1 (dynamic) through `fdkeeper sipp --mode preload`: the shim in sipp
    leases user k's kept connection at the first send of each per-call socket;
(b) sipp 3.7.7's static build through `fdkeeper sipp --mode ptrace` (what `--mode auto`
    picks for it): sipp runs under a seccomp filter that stops only connect(); fdkeeper skips
    that connect, follows the one thread to its first send, leases user k's connection by
    the From AoR, puts it in place of the socket and lets the send run again.

The set-up and the rate search are cps_many_users.py's (bench/cpslib.py): `--users` users
registered once through fdkeeper (one kept connection each), the caller uac-call.xml from
user k over -t tn to bob (a plain UAS over UDP), each configuration climbing its own rates,
(a) and (b) back to back at every step. Figures: calls/s ratio b/a (goal at least 0.9).

Start-up: one REGISTER over -t tn through fdkeeper, timed around the whole command, RUNS
times each, alternating: Debian's sipp under --mode preload and under --mode ptrace (the same
program, so the difference is the mode's own cost: the filter, the tracer, the per-call
handoff; goal under 20 ms), and the static sipp under --mode ptrace (for reference: another
sipp build starts differently).

Rates stop at users / duration: no user calls twice in one run (see parse_args).

Usage:  python3 bench/static_sipp.py                  (1,000 users; a few minutes)
        python3 bench/static_sipp.py --users 200 --steps 100,200,300 --duration 3
Exit status: 0 when the bench ran (goals met or missed: the output says which), 1 when the
set-up did not work. Everything started is stopped, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Run as a script: bench/ is sys.path[0], cpslib and cps_many_users are beside us.
from cps_many_users import Bench as ManyUsersBench
from cps_many_users import run_columns, user_names
from cpslib import (print_best_rates, Run, ascents, climb, command_version, common_arguments, format_run, paired_ratios, print_footer,
                    resolve_defaults, run_bench, table_header)

from fdkeeper import testbed
from fdkeeper.demo import start_through_fdkeeper

STATIC_SIPP = Path(os.environ.get("FDKEEPER_STATIC_SIPP") or testbed.sipp_build("sipp-static"))
CPS_GOAL, STARTUP_GOAL_MS = 0.9, 20.0
CONFIGS = ("a", "b")
LABELS = {"a": "Debian sipp, preload", "b": "static sipp, ptrace"}
WIDTH = 22
USERS = 1000
EXTRA_HEADER = f"{'keeper %core':>12} {'SuT %core':>9} {'sipp %core':>10} {'new conns':>9}  "


@dataclass
class Bench(ManyUsersBench):
    CONFIGS = CONFIGS
    LABELS = LABELS
    PROG = "static_sipp"

    static_sipp: str = str(STATIC_SIPP)

    def start_caller(self, config: str, name: str, options: dict) -> testbed.SippProcess:
        return self._track(self.through_fdkeeper(config, self.caller_scenario, name, **options))

    def through_fdkeeper(self, config: str, scenario: str | Path, name: str, **options) -> testbed.SippProcess:
        sipp, mode = (self.sipp, "preload") if config == "a" else (self.static_sipp, "ptrace")
        return self.start_mode(sipp, mode, scenario, name, **options)

    def start_mode(self, sipp: str, mode: str, scenario: str | Path, name: str, **options) -> testbed.SippProcess:
        return start_through_fdkeeper(sipp, scenario, self.kamailio.address, directory=self.keeper_dir,
                                      log_dir=self.logs, name=name, local_ip=self.kamailio.host,
                                      options=("--mode", mode), **options)

    def format_run(self, run: Run) -> str:
        return format_run(run, self.LABELS[run.config], WIDTH, run_columns(run))


STARTUP_KINDS = {"debian-preload": ("sipp", "preload"), "debian-ptrace": ("sipp", "ptrace"),
                 "static-ptrace": ("static", "ptrace")}


def startup(bench: Bench, runs: int) -> dict[str, float]:
    """Median wall ms of one REGISTER over -t tn through fdkeeper, per kind (see the docstring)."""
    one_user = testbed.write_users_csv(bench.workdir / "one-user.csv", user_names(bench.users)[:1],
                                       bench.kamailio.domain)
    times: dict[str, list[float]] = {kind: [] for kind in STARTUP_KINDS}
    kinds = list(STARTUP_KINDS)
    for index in range(runs + 1):
        order = kinds if index % 2 == 0 else kinds[::-1]
        for kind in order:
            which, mode = STARTUP_KINDS[kind]
            sipp = bench.sipp if which == "sipp" else bench.static_sipp
            began = time.perf_counter()
            result = bench.start_mode(sipp, mode, "uac-register.xml", f"startup-{kind}-{index}", transport="tn",
                                      calls=1, timeout=10, trace_messages=False,
                                      extra=["-inf", str(one_user), "-max_socket", "100"]).wait(30)
            elapsed = (time.perf_counter() - began) * 1000
            if not result.ok:
                raise RuntimeError(f"the start-up run {kind} failed:\n{result.summary()}")
            if index:  # the first round warms caches
                times[kind].append(elapsed)
    return {kind: statistics.median(values) for kind, values in times.items()}


def report(bench: Bench, best: dict[str, Run | None], started: dict[str, float], seconds: float) -> None:
    print()
    print(f"result ({bench.users} users registered, runs of {bench.duration:g} s, caller uac-call.xml from user k "
          "over -t tn through fdkeeper, callee over UDP):")
    ratio = print_best_rates(best, {config: LABELS[config] for config in CONFIGS}, 21)
    verdict = "met" if ratio is not None and ratio >= CPS_GOAL else "MISSED"
    print(f"  ratio b/a (achieved calls/s): {ratio:.3f} (goal at least {CPS_GOAL}: {verdict})" if ratio is not None
          else "  ratio b/a: n/a")
    pairs = sorted(paired_ratios(bench.runs))
    if pairs:
        print(f"  b/a at the {len(pairs)} rates both passed: median {pairs[len(pairs) // 2]:.3f}, "
              f"min {pairs[0]:.3f}, max {pairs[-1]:.3f}")
    if started:
        extra = started["debian-ptrace"] - started["debian-preload"]
        print(f"  start-up, one REGISTER over -t tn, median wall: Debian sipp preload {started['debian-preload']:.1f} ms, "
              f"Debian sipp ptrace {started['debian-ptrace']:.1f} ms (the mode's overhead {extra:+.1f} ms; goal under "
              f"{STARTUP_GOAL_MS:g} ms: {'met' if extra < STARTUP_GOAL_MS else 'MISSED'}); static sipp ptrace "
              f"{started['static-ptrace']:.1f} ms")
    static = command_version([bench.static_sipp, "-v"], r"SIPp v\S+")
    debian = command_version([bench.sipp, "-v"], r"SIPp v\S+")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print_footer(bench, [f"(a) {debian} ({bench.sipp}); (b) {static} ({bench.static_sipp})",
                         f"nproc {len(os.sched_getaffinity(0))}; load average now {load}"], seconds)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(parser, quick="2 s runs, coarse steps of 200", duration=4.0, quick_duration=2.0,
                     step=100.0, quick_step=200.0)
    parser.add_argument("--users", type=int, default=USERS, help=f"registered users, callers (default {USERS})")
    parser.add_argument("--register-rate", type=float, default=500.0, help="REGISTERs per second (default 500)")
    parser.add_argument("--startup-runs", type=int, default=15, help="start-up runs of each kind (default 15; 0: none)")
    parser.add_argument("--static-sipp", default=str(STATIC_SIPP), help=f"the static sipp (default {STATIC_SIPP})")
    args = resolve_defaults(parser.parse_args(argv))
    # No user calls twice in one run: sipp 3.7.7 -t tn keeps a finished call's socket open a
    # while, so a user's second call would put its one connection on two of sipp's fds, and
    # sipp then blocks reading the one whose data the other took (either mode; see the README).
    args.max_rate = min(args.max_rate, args.users / args.duration)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path(args.static_sipp).is_file():
        print(f"static_sipp: no static sipp at {args.static_sipp}; give --static-sipp", file=sys.stderr)
        return 1

    def body(bench: Bench, began: float) -> None:
        bench.setup()
        started = startup(bench, args.startup_runs) if args.startup_runs else {}
        print(table_header(WIDTH, EXTRA_HEADER), flush=True)
        steps = [float(r) for r in args.steps.split(",") if r.strip()] if args.steps else None
        best = climb(bench, ascents(bench, args.step, args.fine, args.max_rate, steps))
        report(bench, best, started, time.monotonic() - began)

    return run_bench("static_sipp", args,
                     lambda workdir, sipp: Bench(workdir, sipp, args.duration, args.retries, users=args.users,
                                                 register_rate=args.register_rate, static_sipp=args.static_sipp), body)


if __name__ == "__main__":
    sys.exit(main())
