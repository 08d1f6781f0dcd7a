#!/usr/bin/env python3
"""A static sipp at parity with preload: -t tn with many users, side by side in one run.

(a) the anchor, a dynamic sipp through `fdkeeper sipp --mode preload`: the shim in sipp
    leases user k's kept connection at the first send of each per-call socket. --anchor
    dynamic-3.7.7 (the default): the same sipp 3.7.7 as (b), built dynamically (the TLS build,
    ../shared/sipp-3.7.7/sipp-tls), so that only the mode differs; --anchor debian-3.6.1:
    Debian's sipp 3.6.1 (--sipp), the anchor before issue 20 (a different sipp: 3.6.1's and
    3.7.7's own costs per call differ, which moved the verdict between 0.78 and 1.0);
(b) sipp 3.7.7's static build through `fdkeeper sipp --mode ptrace` (what `--mode auto`
    picks for it): sipp runs under a seccomp filter that stops only epoll_ctl(ADD), connect()
    and plain send()s (the stubs' own calls aside); fdkeeper skips that connect, leases user
    k's connection by the From AoR at the first send, puts it in place of the socket and lets
    the send run again, and the call's later messages (ACK, BYE) get the kept connection's
    address from a stub in sipp (fdkeeper/modes/ptrace/sendstub.py), which also, once sipp's
    first call was handed over, answers the call's connect() to the SuT and notes its
    epoll_ctl() registration inside sipp: one ptrace stop per call (the first send), three
    before those two stubs, six before issue 20's second stop (sipp's fcntl, and the ACK's and
    BYE's rewrite), and one lease over the tracer's one control connection.

With 1,000 users and 2 s runs the rates stop at 500 calls/s (see below), where both keep up;
`--duration 1 --steps 600,800,1000 --startup-runs 0` shows where each one's ceiling lies, and
`--runs 9` repeats the whole rate search (on the same registered users) nine times, printing
each repetition's ratio b/a and their min and median: the goal (issue 20) is at least 0.95 in
every repetition. Each repetition also prints the paired ratio at the top step both ran (the
achieved calls/s there, whether or not that run kept the rate), which moves less than the
verdict: the verdict's ratio jumps a whole rate step when one side keeps the top rate and the
other only the step below.

The set-up and the rate search are cps_many_users.py's (bench/cpslib.py): `--users` users
registered once through fdkeeper (one kept connection each), the caller uac-call.xml from
user k over -t tn to bob (a plain UAS over UDP), each configuration climbing its own rates,
(a) and (b) back to back at every step. Figures: calls/s ratio b/a (goal at least 0.9).

Start-up: one REGISTER over -t tn (a user of its own, not a caller), timed around the whole
command, in rounds (--startup-runs; the first round only warms caches and opens the kept
connection), each round running every kind once, the order reversed from round to round:
the anchor's sipp (Debian's with --anchor debian-3.6.1) straight to the SuT, through --mode
preload and through --mode ptrace; the static sipp straight to the SuT and through --mode
ptrace (the kinds are named "debian-*" whichever anchor runs them). Figures, each the median over the
rounds of that round's difference (so drift on a busy machine hits both sides alike), with
its 95 % confidence interval (order statistics: no assumption about the noise) and the
quartiles of those differences; the goal counts as met when the whole interval is under it.
The same for the CPU time of fdkeeper and sipp (less moved by the load), and each kind's
fastest round (interference only ever adds time):
  - the ptrace mode's overhead, same program: Debian ptrace - Debian preload (the filter, the
    tracer, the per-call handoff);
  - the static path's overhead: (static ptrace - static plain) - (Debian preload - Debian
    plain), i.e. what fdkeeper adds to the static sipp beyond what it adds to Debian's sipp
    under preload (the two builds start differently, so each is measured against itself).
Goal for both: under 20 ms.

Rates stop at users / duration: no user calls twice in one run (see parse_args).

Usage:  python3 bench/static_sipp.py                  (1,000 users; a few minutes)
        python3 bench/static_sipp.py --duration 1 --steps 600,800,1000 --startup-runs 0 --runs 9
        python3 bench/static_sipp.py --users 200 --steps 100,200,300 --duration 3
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import resource
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# Run as a script: bench/ is sys.path[0], cpslib and cps_many_users are beside us.
from cps_many_users import Bench as ManyUsersBench
from cpslib import (
    bench_parser,
    byte_compile_package,
    command_version,
    parse_bench_args,
    print_footer,
    rate_search,
    run_bench,
)
from cpsruns import Run, last_runs, ms_column, paired, print_best_rates

from fdkeeper import testbed
from fdkeeper.demo import start_through_fdkeeper

STATIC_SIPP = Path(os.environ.get("FDKEEPER_STATIC_SIPP") or testbed.sipp_build("sipp-static"))
CPS_GOAL, STARTUP_GOAL_MS = 0.95, 20.0  # calls/s b/a: issue 20's fair anchor, in every repetition
CONFIGS = ("a", "b")
# --anchor -> (a)'s label; its sipp is anchor_sipp()
ANCHORS = {"dynamic-3.7.7": "sipp 3.7.7, preload", "debian-3.6.1": "Debian sipp, preload"}
DEFAULT_ANCHOR = "dynamic-3.7.7"
LABELS = {"a": ANCHORS[DEFAULT_ANCHOR], "b": "static sipp, ptrace"}
USERS = 1000


def anchor_sipp(anchor: str, debian: str) -> str:
    """(a)'s sipp: the dynamic build of the static sipp's own release, or Debian's (``debian``)."""
    return str(testbed.sipp_build("sipp-tls")) if anchor == "dynamic-3.7.7" else debian


@dataclass
class Bench(ManyUsersBench):
    CONFIGS = CONFIGS
    LABELS = LABELS
    PROG = "static_sipp"
    WIDTH = 23
    COLUMNS = ManyUsersBench.COLUMNS + f"{'fdkeeper ms/call':>16} {'sipp ms/call':>12}  "

    static_sipp: str = str(STATIC_SIPP)
    anchor: str = DEFAULT_ANCHOR

    def __post_init__(self) -> None:
        super().__post_init__()
        self.LABELS = {**LABELS, "a": ANCHORS[self.anchor]}

    @functools.cached_property
    def anchor_sipp(self) -> str:
        return anchor_sipp(self.anchor, self.sipp)

    def start_caller(self, config: str, name: str, options: dict) -> testbed.SippProcess:
        return self._track(self.through_fdkeeper(config, self.caller_scenario, name, **options))

    def through_keeper(self, config: str) -> bool:
        # The `fdkeeper sipp` process's CPU apart from sipp's: under ptrace it is the tracer
        # (plus the start-up both modes pay), where the ptrace path's cost per call goes.
        return True

    def run_columns(self, run: Run) -> str:
        return super().run_columns(run) + f"{ms_column(run, 'wrapper', 16)} {ms_column(run, 'sipp', 12)}  "

    def through_fdkeeper(self, config: str, scenario: str | Path, name: str, **options) -> testbed.SippProcess:
        sipp, mode = (self.anchor_sipp, "preload") if config == "a" else (self.static_sipp, "ptrace")
        return self.start_mode(sipp, mode, scenario, name, **options)

    def start_mode(self, sipp: str, mode: str, scenario: str | Path, name: str, **options) -> testbed.SippProcess:
        return start_through_fdkeeper(
            sipp,
            scenario,
            self.kamailio.address,
            directory=self.keeper_dir,
            log_dir=self.logs,
            name=name,
            local_ip=self.kamailio.host,
            options=("--mode", mode),
            **options,
        )


# kind -> (which sipp, mode or None for sipp straight to the SuT)
STARTUP_KINDS = {
    "debian-plain": ("sipp", None),
    "debian-preload": ("sipp", "preload"),
    "debian-ptrace": ("sipp", "ptrace"),
    "static-plain": ("static", None),
    "static-ptrace": ("static", "ptrace"),
}
STARTUP_USER = "startup"  # not a caller: the bench's calls never wait on its registrations


Timings = dict[str, dict[str, list[float]]]  # "wall"/"cpu" -> kind -> ms per round


def startup(bench: Bench, runs: int) -> Timings:
    """Wall and CPU ms of one REGISTER over -t tn per kind and round (see the docstring)."""
    one_user = testbed.write_users_csv(bench.workdir / "one-user.csv", [STARTUP_USER], bench.kamailio.domain)
    byte_compile_package()
    times: Timings = {measure: {kind: [] for kind in STARTUP_KINDS} for measure in ("wall", "cpu")}
    kinds = list(STARTUP_KINDS)
    for index in range(runs + 1):
        for kind in kinds if index % 2 == 0 else kinds[::-1]:
            wall, cpu = timed_register(bench, kind, f"startup-{kind}-{index}", one_user)
            if index:  # the first round warms caches and opens the kept connection
                times["wall"][kind].append(wall)
                times["cpu"][kind].append(cpu)
    return times


def children_cpu_ms() -> float:
    """CPU time (user + system) of this process's waited-for descendants: fdkeeper and the
    sipp it runs, so the cost of a run whatever else keeps the machine busy."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (usage.ru_utime + usage.ru_stime) * 1000


def timed_register(bench: Bench, kind: str, name: str, users_csv: Path) -> tuple[float, float]:
    """(wall ms, CPU ms) of one run of ``kind``."""
    which, mode = STARTUP_KINDS[kind]
    sipp = bench.anchor_sipp if which == "sipp" else bench.static_sipp
    options = {
        "transport": "tn",
        "calls": 1,
        "timeout": 10,
        "trace_messages": False,
        "extra": ["-inf", str(users_csv), "-max_socket", "100"],
    }
    cpu = children_cpu_ms()
    began = time.perf_counter()
    if mode is None:
        process = testbed.start_sipp(
            sipp,
            "uac-register.xml",
            bench.kamailio.address,
            log_dir=bench.logs,
            name=name,
            local_ip=bench.kamailio.host,
            **options,
        )
    else:
        process = bench.start_mode(sipp, mode, "uac-register.xml", name, **options)
    elapsed = (exit_time(process) - began) * 1000
    cpu = children_cpu_ms() - cpu
    result = process.wait(30)
    if not result.ok:
        raise RuntimeError(f"the start-up run {kind} failed:\n{result.summary()}")
    return elapsed, cpu


def exit_time(process: testbed.SippProcess, limit: float = 30.0) -> float:
    """perf_counter() at the process's exit. Not Popen.wait(timeout): that polls in sleeps
    growing to 50 ms, which put every start-up figure on a 50 ms grid. A blocking wait,
    bounded by a watchdog that kills the process after ``limit`` seconds."""
    watchdog = threading.Timer(limit, process.proc.kill)
    watchdog.start()
    try:
        process.proc.wait()
    finally:
        watchdog.cancel()
    return time.perf_counter()


def startup_overheads(times: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per round: the ptrace mode's overhead on Debian's sipp, the static path's overhead."""
    t = times
    return {
        "mode": [p - q for p, q in zip(t["debian-ptrace"], t["debian-preload"], strict=False)],
        "static": [
            (sp - s0) - (dp - d0)
            for sp, s0, dp, d0 in zip(
                t["static-ptrace"], t["static-plain"], t["debian-preload"], t["debian-plain"], strict=False
            )
        ],
    }


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the median: the order statistics k and n-k+1
    with P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2 (no assumption about the noise)."""
    ordered, n = sorted(values), len(values)
    k, tail = 0, 0.0
    while k < n // 2 and tail + math.comb(n, k) / 2**n <= (1 - confidence) / 2:
        tail += math.comb(n, k) / 2**n
        k += 1
    return (ordered[k - 1], ordered[n - k]) if k else (ordered[0], ordered[-1])


def spread(values: list[float]) -> str:
    """median, its 95 % confidence interval, and the quartiles of ``values``."""
    low, _, high = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    ci_low, ci_high = median_interval(values)
    return (
        f"median {statistics.median(values):+.1f} ms (95 % CI {ci_low:+.1f} to {ci_high:+.1f}; "
        f"quartiles {low:+.1f}, {high:+.1f})"
    )


def verdict(overheads: list[float]) -> str:
    """Shown only when the whole confidence interval of the median is under the goal."""
    if median_interval(overheads)[1] < STARTUP_GOAL_MS:
        return "met"
    if statistics.median(overheads) >= STARTUP_GOAL_MS:
        return "MISSED"
    return "median under it, but its interval is not: more --startup-runs, or a quieter machine"


def report_startup(times: Timings) -> None:
    """Wall figures carry the goal; CPU figures (fdkeeper + sipp) barely move with the load."""
    rounds = len(times["wall"]["debian-plain"])
    print(
        f"  start-up, one REGISTER over -t tn, {rounds} rounds (load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end):"
    )
    for measure in ("wall", "cpu"):
        medians = ", ".join(f"{kind} {statistics.median(values):.1f}" for kind, values in times[measure].items())
        print(f"    median {measure} ms: {medians}")
        # Interference only ever adds time: each kind's fastest round is its cleanest.
        best = {kind: min(values) for kind, values in times[measure].items()}
        print(
            f"    fastest {measure} ms: "
            + ", ".join(f"{kind} {value:.1f}" for kind, value in best.items())
            + f"; from those: ptrace mode {best['debian-ptrace'] - best['debian-preload']:+.1f}, static path "
            f"{(best['static-ptrace'] - best['static-plain']) - (best['debian-preload'] - best['debian-plain']):+.1f}"
        )
        overheads = startup_overheads(times[measure])
        for key, label in (
            ("mode", "ptrace mode's overhead (Debian sipp: ptrace - preload)"),
            ("static", "static path's overhead ((static ptrace - plain) - (Debian preload - plain))"),
        ):
            goal = f" (goal under {STARTUP_GOAL_MS:g} ms: {verdict(overheads[key])})" if measure == "wall" else ""
            print(f"      {measure} {label}: {spread(overheads[key])}{goal}")


@dataclass
class Repetition:
    """One whole rate search: each configuration's run at its highest passing rate, and its runs."""

    best: dict[str, Run | None]
    runs: list[Run]
    load: tuple[float, float, float]  # the load average when it ended

    @property
    def ratio(self) -> float | None:
        """The verdict's figure: b/a achieved calls/s, each at its own highest passing rate."""
        a, b = self.best["a"], self.best["b"]
        return b.achieved / a.achieved if a and b else None

    def top_pair(self) -> tuple[float, float] | None:
        """(rate, b/a achieved calls/s) at the highest rate both ran, kept or not: the verdict
        without its jump of a whole rate step."""
        last = last_runs(self.runs)
        both = [rate for rate in {r.rate for r in self.runs} if (rate, "a") in last and (rate, "b") in last]
        if not both:
            return None
        rate = max(both)
        a, b = last[(rate, "a")], last[(rate, "b")]
        return rate, (b.achieved / a.achieved if a.achieved else 0.0)

    def line(self, number: int) -> str:
        tops = ", ".join(
            f"({c}) {run.rate:g} -> {run.achieved:.1f}" if run else f"({c}) none" for c, run in self.best.items()
        )
        ratio = f"{self.ratio:.3f}" if self.ratio is not None else "n/a"
        pair = self.top_pair()
        paired_text = f"; at {pair[0]:g} calls/s both: b/a {pair[1]:.3f}" if pair else ""
        load = " ".join(f"{x:.2f}" for x in self.load)
        return f"repetition {number}: highest rate kept {tops} calls/s; b/a {ratio}{paired_text} (load {load})"


def report_repetitions(repetitions: list[Repetition]) -> None:
    """Every repetition's ratio, their min and median, and the goal: at least CPS_GOAL in every one."""
    for number, repetition in enumerate(repetitions, 1):
        print(f"  {repetition.line(number)}")
    ratios = [r.ratio for r in repetitions if r.ratio is not None]
    pairs = [pair[1] for r in repetitions if (pair := r.top_pair())]
    under = sum(ratio < CPS_GOAL for ratio in ratios)
    # A repetition where a side kept no rate at all has no ratio: the machine was too busy for
    # either; it counts against the goal ("in every one") but not as a figure.
    void = len(repetitions) - len(ratios)
    misses = [f"{under} under it"] * bool(under) + [f"{void} with no ratio, a side kept no rate"] * bool(void)
    verdict = f"MISSED ({'; '.join(misses)})" if misses else "met"
    figures = (
        f"min {min(ratios):.3f}, median {statistics.median(ratios):.3f}, max {max(ratios):.3f}" if ratios else "none"
    )
    print(
        f"  ratio b/a over {len(repetitions)} repetitions: {figures} (goal at least {CPS_GOAL} in every one: {verdict})"
    )
    if pairs:
        print(
            f"  b/a at the top step both ran: min {min(pairs):.3f}, median {statistics.median(pairs):.3f}, "
            f"max {max(pairs):.3f}"
        )


def report(bench: Bench, repetitions: list[Repetition], started: Timings, seconds: float) -> None:
    print()
    print(
        f"result ({bench.users} users registered, runs of {bench.duration:g} s, caller uac-call.xml from user k "
        "over -t tn through fdkeeper, callee over UDP):"
    )
    if len(repetitions) == 1:
        ratio = print_best_rates(repetitions[0].best, {config: bench.LABELS[config] for config in CONFIGS}, 27)
        verdict = "met" if ratio is not None and ratio >= CPS_GOAL else "MISSED"
        print(
            f"  ratio b/a (achieved calls/s): {ratio:.3f} (goal at least {CPS_GOAL}: {verdict})"
            if ratio is not None
            else "  ratio b/a: n/a"
        )
    elif repetitions:
        report_repetitions(repetitions)
    if repetitions:
        print(f"  b/a {paired(bench.runs, 'b', 'a')}")
    if started:
        report_startup(started)
    static = command_version([bench.static_sipp, "-v"], r"SIPp v\S+")
    anchor = command_version([bench.anchor_sipp, "-v"], r"SIPp v\S+")
    print_footer(bench, seconds, f"(a) {anchor} ({bench.anchor_sipp}); (b) {static} ({bench.static_sipp})")


def repetitions(bench: Bench, args: argparse.Namespace) -> list[Repetition]:
    """--runs whole rate searches on the same users, each one's line printed as it ends."""
    done: list[Repetition] = []
    for number in range(1, args.runs + 1):
        if args.runs > 1:
            print(f"-- repetition {number} of {args.runs}", flush=True)
        first = len(bench.runs)
        best = rate_search(bench, args)
        done.append(Repetition(best, bench.runs[first:], os.getloadavg()))
        if args.runs > 1:
            print(f"-- {done[-1].line(number)}", flush=True)
    return done


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bench_parser(__doc__, duration=4.0, step=100.0, quick_time="")
    parser.add_argument("--users", type=int, default=USERS, help=f"registered users, callers (default {USERS})")
    parser.add_argument("--register-rate", type=float, default=500.0, help="REGISTERs per second (default 500)")
    parser.add_argument("--startup-runs", type=int, default=30, help="start-up rounds (default 30; 0: none)")
    parser.add_argument("--startup-only", action="store_true", help="only the start-up rounds (with --users 20: quick)")
    parser.add_argument("--static-sipp", default=str(STATIC_SIPP), help=f"the static sipp (default {STATIC_SIPP})")
    parser.add_argument(
        "--anchor",
        choices=list(ANCHORS),
        default=DEFAULT_ANCHOR,
        help="(a)'s sipp under preload: the dynamic build of the same sipp 3.7.7 (default; "
        "../shared/sipp-3.7.7/sipp-tls) or Debian's 3.6.1 (--sipp)",
    )
    parser.add_argument(
        "--runs", type=int, default=1, help="whole rate searches, one after the other on the same users (default 1)"
    )
    args = parse_bench_args(parser, argv)
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
    if args.anchor == "dynamic-3.7.7" and not testbed.sipp_build("sipp-tls").is_file():
        print(f"static_sipp: no dynamic sipp 3.7.7 at {testbed.sipp_build('sipp-tls')}; give --anchor", file=sys.stderr)
        return 1

    def body(bench: Bench, began: float) -> None:
        bench.setup()
        started = startup(bench, args.startup_runs) if args.startup_runs else {}
        if args.startup_only:
            report_startup(started)
            return
        print(bench.table_header(), flush=True)
        report(bench, repetitions(bench, args), started, time.monotonic() - began)

    return run_bench(
        "static_sipp",
        args,
        lambda workdir, sipp: Bench(
            workdir,
            sipp,
            args.duration,
            args.retries,
            users=args.users,
            register_rate=args.register_rate,
            static_sipp=args.static_sipp,
            anchor=args.anchor,
        ),
        body,
    )


if __name__ == "__main__":
    sys.exit(main())
