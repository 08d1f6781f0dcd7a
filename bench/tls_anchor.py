#!/usr/bin/env python3
"""TLS through fdkeeper versus the anchor a user would pick instead: sipp 3.7.7 doing its own TLS.

The figures (issue 11, second benchmark), side by side in one run, the configurations
alternating step by step so that the machine's load hits all alike:

    (n1) sipp 3.7.7 (the dynamic TLS build, ../shared/sipp-3.7.7/sipp-tls) -t l1 straight to
         Kamailio's TLS port: sipp's own TLS, no fdkeeper;
    (k1) Debian's sipp 3.6.1 -t l1 through `fdkeeper sipp` (preload mode) to the same port: the
         keeper terminates TLS (its C pump moves the messages while the run holds the link);
    (nn) sipp 3.7.7 -t ln with USERS callers (-inf, user k places call k): a TLS connection
         and handshake per call, sipp's own way;
    (kn) Debian's sipp -t ln through `fdkeeper sipp`: each call on user k's kept TLS connection
         (the users register through fdkeeper first);
    (kv) the same sipp 3.7.7 binary as (nn), -t ln through `fdkeeper sipp`: (nn) and (kv) differ
         only in who does TLS (issue 20's fair anchor: sipp's own poll loop, its 1 ms wake-ups
         that Debian's 3.6.1 pays at another rate, is in both sides).

  1. calls/s: the highest rate with no failed call that kept the rate (cpslib's search), and
     the calls/s achieved there; goal (k1)/(n1) >= 1.0 and (kn)/(nn) >= 1.0.
  2. CPU per call at a fixed rate (--cpu-rate calls/s for --cpu-duration s, --cpu-rounds
     times, alternating): sipp's own (its process's run time in /proc/PID/task/*/schedstat, in
     nanoseconds, sampled every 20 ms until it exits, start-up included: the same way whether
     it runs alone or under `fdkeeper sipp`) plus the keeper's (the same counters, its threads),
     in clock ticks per 3,000 calls and ms per call; the wrapper is the reaped run minus sipp's
     (earlier: the reaped run minus the wrapper's 0.1 s samples, which left the wrapper's exit
     work, tens of ms a run, in sipp's figure of the fdkeeper configurations only); goal:
     (k) sipp + keeper <= (n) sipp, for (k1)/(n1), (kn)/(nn) and (kv)/(nn) at the same rate
     (for -t ln, --cpu-rate-ln: rates sipp 3.7.7's own -t ln keeps). The wrapper's start-up and
     Kamailio's are shown apart, and each configuration's CPU per second of run beside it.
  3. The idle floor: each sipp (a UAS nobody calls) and the keeper holding the users' links,
     watched for --idle-seconds, and how much of (kn)'s CPU at the -t ln rate that floor is over
     the run's length (sipp polls every 1 ms; sipp 3.7.7's own -t ln sleeps in its connect).

Why sipp 3.7.7's own -t ln keeps at most about 5 calls/s, whatever the SuT or the key (the test
PKI is ECDSA P-256; the handshake is about 2 ms): SIPpSocket::connect (src/socket.cpp) calls
SSL_connect on its non-blocking socket, which answers WANT_READ right after the ClientHello,
and sipp, single-threaded, then sleeps SIPP_SSL_RETRY_TIMEOUT (200 ms, include/socket.hpp)
before trying again: one 200 ms sleep per call (its errors log says "SSL_connect failed ...
Retrying"; seen with strace -T as clock_nanosleep 0.200 s between the ClientHello and the
server's reply). So (nn)'s CPU per second of run is about its 1 ms poll loop's floor at every
rate it keeps (each call buys 200 ms in which the loop does not run), and no rate has calls
dominate it; (kv)'s sipp, on kept links, never sleeps and polls through those 200 ms. The bench
counts (nn)'s sleeps in its errors log and shows, beside the measured ratio (the verdict), what
those seconds of polling come to at the idle floor: side by side, never subtracted.
--cpu-rate-ln 0.2,4 adds a near-idle rate: the floors of (nn) and of (kv)'s sipp under the shim.
The machine's load average and how busy its cores were (all processes, /proc/stat) are printed:
other work on the machine slows every configuration, but not alike.

Usage:  python3 bench/tls_anchor.py             (about 9 minutes)
        python3 bench/tls_anchor.py --quick     (about 6 minutes)
        python3 bench/tls_anchor.py --only nn,kv --cpu-rounds 5 --ln-steps 10   (the fair -t ln anchor)
        FDKEEPER_TLS_PUMP=0 python3 bench/tls_anchor.py --quick   (the keeper's Python relay)
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

# Run as a script (python3 bench/tls_anchor.py): bench/ is sys.path[0], the other benches are beside us.
from cps_many_users import raise_open_file_limit, user_names, users_connections, write_caller_scenario
from cpslib import (
    CALLEE,
    Ascent,
    KeeperCpuBench,
    ascents,
    bench_parser,
    caller_options,
    climb,
    command_version,
    parse_bench_args,
    parse_steps,
    print_footer,
    process_tree,
    run_bench,
    write_uas_scenario,
)
from cpsruns import Run

from fdkeeper import testbed

CONFIGS = ("n1", "k1", "nn", "kn", "kv")
LABELS = {
    "n1": "sipp 3.7.7 TLS -t l1",
    "k1": "fdkeeper -t l1",
    "nn": "sipp 3.7.7 TLS -t ln",
    "kn": "fdkeeper -t ln",
    "kv": "fdkeeper 3.7.7 -t ln",
}
PAIRS = (("k1", "n1"), ("kn", "nn"), ("kv", "nn"))
TRANSPORTS = {"n1": "l1", "k1": "l1", "nn": "ln", "kn": "ln", "kv": "ln"}
NATIVE_SIPP = ("n1", "nn", "kv")  # the configurations whose sipp is sipp 3.7.7 (else Debian's)
GOAL_RATE = 1.0
GOAL_CPU = 1.0
USERS = 1000
WIDTH = 26
TICKS = os.sysconf("SC_CLK_TCK")
PER_CALLS = 3000  # CPU is shown in clock ticks per this many calls
REGISTER_RATE = 200
# sipp 3.7.7's own -t ln sleeps 200 ms in every TLS connect (the docstring): at most about 5
# calls/s, so its fixed-rate CPU runs go at 4 calls/s, the highest round rate it keeps (both
# -t ln alike; 10 calls/s asked, it achieved 4.9-5.3), and the -t ln rate search climbs these
# steps instead of cpslib's coarse/fine ladder.
CPU_RATE_LN = "4"
LN_STEPS = "10,25,50,100,200,400,600,800,1000,1200"
SSL_RETRY_SLEEP_S = 0.2  # sipp 3.7.7's SIPP_SSL_RETRY_TIMEOUT (include/socket.hpp), microseconds / 1e6
SSL_RETRY_LINE = "SSL_connect failed"  # its errors-log line for each such sleep
SIPP_SAMPLE_S = 0.02  # how often sipp's own CPU is sampled while it runs


@dataclass
class Bench(KeeperCpuBench):
    CONFIGS = CONFIGS
    LABELS = LABELS
    PROG = "tls_anchor"
    WIDTH = WIDTH
    COLUMNS = f"{'sipp t/3k':>9} {'keeper t/3k':>11} {'sum t/3k':>8}  "

    users: int = USERS
    native: str = ""

    @staticmethod
    def per_call(config: str) -> bool:
        """-t ln: a connection per call, from the users' CSV."""
        return TRANSPORTS[config] == "ln"

    def sut_options(self) -> dict:
        raise_open_file_limit(self.users)  # before Kamailio and the keeper inherit it
        return {**self.tls_sut(), "tcp_max_connections": users_connections(self.users)}

    def setup(self) -> None:
        self.users_csv = testbed.write_users_csv(
            self.workdir / "callers.csv", user_names(self.users), self.kamailio.domain
        )
        self.caller_scenario = write_caller_scenario(self.workdir)
        self.kamailio.start()
        self.start_callee()
        if any(self.per_call(config) for config in self.CONFIGS):
            self.register_users()
        self.warm_up()
        self.watch_processes()

    def register_users(self) -> None:
        """One `fdkeeper sipp -t ln` run: the keeper opens and keeps one TLS connection per user."""
        began = time.monotonic()
        process = self.start_kept(
            "uac-register.xml",
            "register",
            remote=self.kamailio.tls_address,
            options=self.tls_options,
            transport="ln",
            calls=self.users,
            rate=REGISTER_RATE,
            timeout=self.users / 20 + 30,
            trace_messages=False,
            extra=["-inf", str(self.users_csv), "-l", "200", "-max_socket", "1000", "-recv_timeout", "10000"],
        )
        result = self.wait(process, self.users / 20 + 60)
        if not result.ok or result.successful != self.users:
            raise RuntimeError(f"registering {self.users} users over TLS failed:\n{result.summary()}")
        print(
            f"registered {self.users} users over -t ln through fdkeeper in {time.monotonic() - began:.1f} s", flush=True
        )

    # -- the callers ---------------------------------------------------------

    def caller_options(self, config: str, rate: float, duration: float) -> dict:
        options = caller_options(self, rate, duration, transport=TRANSPORTS[config])
        if self.per_call(config):
            options["extra"] += ["-inf", str(self.users_csv), "-max_socket", str(4 * max(100, round(rate)) + 1000)]
        if config.startswith("n"):  # sipp's own TLS wants a certificate of its own to offer
            options["extra"] += ["-tls_cert", str(self.pki.client_cert), "-tls_key", str(self.pki.client_key)]
        return options

    def start_caller(self, config: str, name: str, options: dict) -> testbed.SippProcess:
        scenario = self.caller_scenario if self.per_call(config) else "uac-call.xml"
        sipp = self.native if config in NATIVE_SIPP else self.sipp
        if config.startswith("k"):
            return self.start_kept(
                scenario, name, remote=self.kamailio.tls_address, sipp=sipp, options=self.tls_options, **options
            )
        return self.start_plain(scenario, name, remote=self.kamailio.tls_address, sipp=sipp, **options)

    # -- CPU around every run ------------------------------------------------

    def through_keeper(self, config: str) -> bool:
        return config.startswith("k")

    def cpu_now(self) -> dict[str, float]:
        """As cpslib's, the keeper's to the nanosecond (its schedstat; a call is about a millisecond)."""
        return {**super().cpu_now(), "keeper": sum(run_seconds(process.pid) or 0.0 for process in self.keeper)}

    def wait_caller(self, config: str, process: testbed.SippProcess, timeout: float) -> testbed.SippResult:
        deadline = time.monotonic() + timeout
        binary = self.native if config in NATIVE_SIPP else self.sipp
        self.sipp_cpu = sample_sipp_cpu(process, binary, deadline)
        return self.wait(process, max(0.1, deadline - time.monotonic()))

    def end_run(self, config: str, token: dict, run: Run) -> dict:
        spent = {key: value - token[key] for key, value in self.cpu_now().items()}
        reaped = spent.pop("children")  # sipp and, for (k), its `fdkeeper sipp` wrapper
        kept = self.through_keeper(config)
        return {
            **spent,
            "sipp": self.sipp_cpu,
            "wrapper": max(0.0, reaped - self.sipp_cpu) if kept else 0.0,
            # The keeper serves only the fdkeeper configurations: idle during (n) runs (a few pings).
            "keeper": spent["keeper"] if kept else 0.0,
        }

    def run_columns(self, run: Run) -> str:
        values = [ticks_per(run, "sipp"), ticks_per(run, "keeper")]
        total = None if None in values else sum(values)
        return (
            " ".join(
                f"{v:>{w}.0f}" if v is not None else f"{'-':>{w}}"
                for v, w in zip([*values, total], (9, 11, 8), strict=False)
            )
            + "  "
        )


def run_seconds(pid: int) -> float | None:
    """CPU time of process ``pid``'s threads so far, in seconds to the nanosecond (the first field
    of /proc/PID/task/TID/schedstat); None once it is gone."""
    total, found = 0, False
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for task in tasks:
        try:
            total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
            found = True
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9 if found else None


def sipp_process(process: testbed.SippProcess, binary: str) -> int | None:
    """The pid of the run's sipp: the started process itself, or under `fdkeeper sipp` its child."""
    wanted = os.path.realpath(binary)
    try:
        return next((candidate.pid for candidate in process_tree(process.pid) if candidate.exe() == wanted), None)
    except psutil.Error:
        return None


def sample_sipp_cpu(process: testbed.SippProcess, binary: str, deadline: float) -> float:
    """sipp's own CPU over its life, start-up included: its run time sampled every SIPP_SAMPLE_S
    until it exits (what it spends after the last sample, at most that long, is missed alike
    with and without fdkeeper)."""
    pid, spent = None, 0.0
    while process.running() and time.monotonic() < deadline:
        pid = pid or sipp_process(process, binary)
        if pid is not None:
            now = run_seconds(pid)
            if now is None:  # exited (the wrapper reaped it)
                break
            spent = now
        time.sleep(SIPP_SAMPLE_S)
    return spent


# --------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------


def ticks_per(run: Run, key: str) -> float | None:
    if run.successful == 0 or key not in run.measured:
        return None
    return run.measured[key] * TICKS * PER_CALLS / run.successful


class MachineLoad:
    """How busy all cores were between two moments (/proc/stat), whoever used them."""

    def __init__(self) -> None:
        self.began = self._sample()

    @staticmethod
    def _sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)

    def busy_share(self) -> float:
        busy, total = self._sample()
        return (busy - self.began[0]) / max(1, total - self.began[1])


def answered_runs(rounds: list[Run], config: str, rate: float) -> list[Run]:
    """``config``'s fixed-rate runs at ``rate`` that answered every call: those a figure is a median of."""
    return [r for r in rounds if (r.config, r.rate) == (config, rate) and r.all_answered]


def cpu_report(rounds: list[Run]) -> list[str]:
    """Median ticks per 3,000 calls of each configuration's fixed-rate runs, rate by rate; the goal
    compares the configurations of a pair at the same rate."""
    lines, medians = [], {}
    for config, rate in sorted({(r.config, r.rate) for r in rounds}, key=lambda key: (CONFIGS.index(key[0]), key[1])):
        runs = answered_runs(rounds, config, rate)
        if not runs:
            lines.append(f"({config}) {LABELS[config]} at {rate:g} calls/s: no fixed-rate run answered every call")
            continue
        sipp, keeper = (statistics.median(ticks_per(r, key) or 0.0 for r in runs) for key in ("sipp", "keeper"))
        per_second = statistics.median(1000 * (r.measured["sipp"] + r.measured["keeper"]) / r.wall for r in runs)
        medians[(config, rate)] = sipp + keeper
        kept = config.startswith("k")
        extra = f" + keeper {keeper:.0f} = {sipp + keeper:.0f}" if kept else ""
        wrapper = statistics.median(r.measured["wrapper"] for r in runs)
        wrapper_text = f"; `fdkeeper sipp` wrapper {wrapper:.2f} CPU-s per run, apart" if kept else ""
        lines.append(
            f"({config}) {LABELS[config]:<{WIDTH - 5}} at {rate:g} calls/s: sipp {sipp:.0f}{extra} ticks "
            f"per {PER_CALLS} calls ({(sipp + keeper) / TICKS * 1000 / PER_CALLS:.3f} ms/call, "
            f"{per_second:.1f} ms CPU per s of run, {len(runs)} runs){wrapper_text}"
        )
    for (config, rate), total in medians.items():
        for kept, native in PAIRS:
            if config == kept and (native, rate) in medians:
                ratio = total / medians[(native, rate)]
                verdict = "met" if ratio <= GOAL_CPU else "missed"
                lines.append(
                    f"({kept})/({native}) CPU per call at {rate:g} calls/s, sipp + keeper vs sipp: "
                    f"{ratio:.2f}  goal {verdict} (<= {GOAL_CPU:g})"
                )
    return lines


def answered_best(runs: list[Run], config: str) -> Run | None:
    """The run of ``config`` with the most calls/s among those that answered every call."""
    answered = [r for r in runs if r.config == config and r.all_answered]
    return max(answered, key=lambda r: r.achieved, default=None)


def rate_report(best: dict[str, Run | None], runs: list[Run]) -> list[str]:
    lines = []
    for config in best:
        run = best[config]
        figure = f"{run.rate:g} calls/s, achieved {run.achieved:.1f}" if run else "no rate passed"
        lines.append(f"({config}) {LABELS[config]:<{WIDTH - 5}} highest rate with no failed call {figure}")
    for kept, native in PAIRS:
        anchor = best.get(native) or answered_best(runs, native)
        if best.get(kept) and anchor is not None and best.get(native) is None:
            lines.append(
                f"({native}) kept no rate it was run at; its best run that answered every call: "
                f"{anchor.rate:g} calls/s asked, {anchor.achieved:.1f} achieved"
            )
            best = {**best, native: anchor}
        if best.get(kept) and best.get(native):
            ratio = best[kept].achieved / best[native].achieved
            lines.append(
                f"({kept})/({native}) achieved calls/s: {best[kept].achieved:.1f} / "
                f"{best[native].achieved:.1f} = {ratio:.3f}  goal {'met' if ratio >= GOAL_RATE else 'missed'} "
                f"(>= {GOAL_RATE:g})"
            )
        else:
            lines.append(f"({kept})/({native}): n/a, a configuration passed no rate")
    return lines


def machine_facts(bench: Bench, load: MachineLoad) -> list[str]:
    """What this bench adds to cpslib's machine facts."""
    relay = os.environ.get("FDKEEPER_TLS_PUMP", "1") != "0"
    return [
        f"all cores {load.busy_share():.0%} busy over the bench (every process on the machine)",
        f"sipp 3.7.7 (n): {command_version([bench.native, '-v'], r'SIPp v[^ ,]+')}",
        f"keeper TLS relay: {'the C pump' if relay else 'Python (FDKEEPER_TLS_PUMP=0)'}; {bench.users} users for -t ln",
    ]


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bench_parser(
        __doc__, duration=5.0, step=200.0, quick_duration=3.0, quick_time="about 5 minutes", max_rate=3000
    )
    parser.add_argument("--users", type=int, default=USERS, help=f"callers for -t ln (default {USERS})")
    parser.add_argument("--cpu-rate", type=float, default=300, help="calls/s of the fixed-rate -t l1 runs (300)")
    parser.add_argument(
        "--cpu-rate-ln",
        type=parse_rates,
        default=parse_rates(CPU_RATE_LN),
        help=f"calls/s of the fixed-rate -t ln runs, comma-separated ({CPU_RATE_LN}: what sipp's own -t ln keeps)",
    )
    parser.add_argument("--ln-steps", default=LN_STEPS, help=f"the -t ln rates to climb ({LN_STEPS})")
    parser.add_argument("--only", help=f"comma-separated configurations to run (default all: {','.join(CONFIGS)})")
    parser.add_argument("--cpu-duration", type=float, default=10, help="seconds of each fixed-rate run (10)")
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=5,
        help="seconds each sipp (and the keeper) is watched doing nothing: the -t ln idle floor (5)",
    )
    parser.add_argument("--cpu-rounds", type=int, default=2, help="fixed-rate runs of each configuration (2)")
    parser.add_argument("--native-sipp", help="the TLS sipp 3.7.7 (default: testbed.sipp_build('sipp-tls'))")
    return parse_bench_args(parser, argv)


def parse_rates(text: str) -> list[float]:
    """'0.2,4' -> [0.2, 4.0]: the fixed-rate -t ln rates."""
    try:
        rates = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of calls/s: {text!r}") from None
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError(f"calls/s must be above 0: {text!r}")
    return rates


def connect_sleeps(result: testbed.SippResult) -> int:
    """How many times sipp 3.7.7 slept SSL_RETRY_SLEEP_S in a TLS connect during this run (its errors log)."""
    try:
        text = result.file("errors").read_text(errors="replace")
    except FileNotFoundError:
        return 0
    return sum(1 for line in text.splitlines() if SSL_RETRY_LINE in line)


@dataclass
class IdleFloor:
    """CPU per second of merely running, nothing to do: what a fixed-rate run pays for its length
    whatever its rate (sipp polls with a 1 ms timeout; the keeper holds the users' links)."""

    debian_sipp: float
    native_sipp: float
    keeper: float
    links: int

    def ticks_per_calls(self, run: Run, key: str) -> float:
        """The floor of ``key`` over ``run``'s wall time, in ticks per PER_CALLS of its calls."""
        return getattr(self, key) * run.wall * TICKS * PER_CALLS / max(1, run.successful)


def idle_cpu_per_second(bench: Bench, sipp: str, seconds: float) -> tuple[float, float]:
    """CPU-s per s of an idle sipp (a UAS nobody calls) and, alongside, of the idle keeper."""
    process = bench.start_plain(
        write_uas_scenario(bench.workdir),
        f"idle-{Path(sipp).name}",
        sipp=sipp,
        transport="u1",
        local_port=testbed.free_port(),
        calls=None,
        trace_messages=False,
    )
    try:
        time.sleep(0.5)  # past sipp's start-up
        began, keeper_began = run_seconds(process.pid) or 0.0, bench.cpu_now()["keeper"]
        time.sleep(seconds)
        sipp_spent = (run_seconds(process.pid) or began) - began
        return sipp_spent / seconds, (bench.cpu_now()["keeper"] - keeper_began) / seconds
    finally:
        process.terminate()


def measure_idle_floor(bench: Bench, seconds: float) -> IdleFloor:
    debian, keeper = idle_cpu_per_second(bench, bench.sipp, seconds)
    native, keeper_again = idle_cpu_per_second(bench, bench.native, seconds)
    return IdleFloor(debian, native, (keeper + keeper_again) / 2, bench.users)


def idle_floor_report(floor: IdleFloor, rounds: list[Run], rates: list[float]) -> list[str]:
    """How much of (kn)'s and (kv)'s CPU at each -t ln rate is the cost of running for the run's length."""
    lines = [
        f"idle floors (nothing to do, {TICKS} ticks/s): Debian sipp {floor.debian_sipp * TICKS:.2f}, sipp 3.7.7 "
        f"{floor.native_sipp * TICKS:.2f}, the keeper holding {floor.links} links {floor.keeper * TICKS:.2f} ticks/s"
    ]
    for rate, (config, sipp_floor) in itertools.product(rates, (("kn", "debian_sipp"), ("kv", "native_sipp"))):
        runs = answered_runs(rounds, config, rate)
        if not runs:
            continue
        sipp = statistics.median(floor.ticks_per_calls(r, sipp_floor) for r in runs)
        keeper = statistics.median(floor.ticks_per_calls(r, "keeper") for r in runs)
        lines.append(
            f"  over ({config})'s runs at {rate:g} calls/s: sipp {sipp:.0f} + keeper {keeper:.0f} = "
            f"{sipp + keeper:.0f} of its ticks per {PER_CALLS} calls are the floor "
            "((nn)'s sipp sleeps 200 ms a call in SSL_connect's retry instead)"
        )
    return lines if len(lines) > 1 else []


def median_total(runs: list[Run]) -> float:
    """Median sipp + keeper ticks per PER_CALLS calls of ``runs`` (answered_runs())."""
    return sum(statistics.median(ticks_per(r, key) or 0.0 for r in runs) for key in ("sipp", "keeper"))


def connect_sleep_report(floor: IdleFloor, rounds: list[Run], rate: float) -> list[str]:
    """(nn)'s sleeps in SSL_connect beside (kv)'s polling through the same seconds: sipp 3.7.7's
    own -t ln sleeps 200 ms a call, where its 1 ms poll loop would cost the idle floor; (kv)'s
    sipp polls on. Shown beside the measured ratio (the verdict), never subtracted from it."""
    native, kept_runs = answered_runs(rounds, "nn", rate), answered_runs(rounds, "kv", rate)
    if not native or not kept_runs:
        return []
    measured, kept = median_total(native), median_total(kept_runs)
    slept = statistics.median(r.measured["connect_sleeps"] * SSL_RETRY_SLEEP_S / r.successful for r in native)
    polled = floor.native_sipp * slept * TICKS * PER_CALLS  # ticks per PER_CALLS calls
    return [
        f"(nn) at {rate:g} calls/s slept {slept * 1000:.0f} ms per call in SSL_connect's retry "
        f"({SSL_RETRY_SLEEP_S * 1000:.0f} ms each, its errors log): its poll loop stood still there, (kv)'s ran; at "
        f"sipp 3.7.7's idle floor that is {polled:.0f} ticks per {PER_CALLS} calls",
        f"  (kv)/(nn) at {rate:g} calls/s as measured {kept / measured:.2f}; beside it, (nn) charged those "
        f"seconds at the floor: {kept / (measured + polled):.2f} (information, not the verdict)",
    ]


def fixed_rate_rounds(bench: Bench, args: argparse.Namespace) -> list[Run]:
    runs, configs = [], bench.CONFIGS
    for number in range(args.cpu_rounds):
        shift = number % len(configs)
        for config in configs[shift:] + configs[:shift]:
            # fdkeeper's -t ln also at the -t l1 rate: its cost per call once the run's fixed
            # part (leasing every user's connection) is spread over as many calls.
            rates = (
                [*args.cpu_rate_ln, args.cpu_rate]
                if config in ("kn", "kv")
                else list(args.cpu_rate_ln)
                if config == "nn"
                else [args.cpu_rate]
            )
            for rate in unrepeated(config, rates, args.cpu_duration, bench.users):
                run, result = bench.call(
                    config, rate, name=f"cpu-{config}-{rate:g}-{number}", duration=args.cpu_duration
                )
                run.measured["connect_sleeps"] = connect_sleeps(result) if config in NATIVE_SIPP else 0
                runs.append(run)
                print(bench.format_run(run), flush=True)
    return runs


def unrepeated(config: str, rates: list[float], duration: float, users: int) -> list[float]:
    """The rates at which a run of ``config`` calls no user twice: sipp 3.7.7 through fdkeeper
    on -t ln (kv) keeps a finished call's socket open a while, so a user's second call in the
    same run puts its one kept connection on two of sipp's fds and sipp blocks reading the one
    whose data the other took (README, Limits; static_sipp.py caps its rates the same way)."""
    return [rate for rate in rates if config != "kv" or rate * duration <= users]


def search_ladders(bench: Bench, args: argparse.Namespace) -> list[Ascent]:
    """cpslib's coarse/fine climb for -t l1 (or --steps); the --ln-steps rates for -t ln."""
    climbs = ascents(bench, args.step, args.fine, args.max_rate, parse_steps(args.steps))
    ln_rates = sorted(float(x) for x in args.ln_steps.split(","))
    return [
        Ascent(a.config, unrepeated(a.config, ln_rates, bench.duration, bench.users), None, a.label)
        if Bench.per_call(a.config)
        else a
        for a in climbs
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    native = args.native_sipp or str(testbed.sipp_build("sipp-tls"))

    def make_bench(workdir: Path, sipp: str) -> Bench:
        bench = Bench(workdir, sipp, args.duration, args.retries, users=args.users, native=native)
        if args.only:
            bench.CONFIGS = tuple(config for config in CONFIGS if config in args.only.split(","))
        return bench

    def body(bench: Bench, began: float) -> None:
        load = MachineLoad()
        bench.setup()
        print(f"SuT Kamailio TLS on {bench.kamailio.tls_address}; callee {CALLEE} (sipp UAS over UDP); warm-up ok")
        print("t/3k = CPU clock ticks per 3,000 calls (sipp: the run minus the `fdkeeper sipp` wrapper)")
        print(bench.table_header(), flush=True)
        print(
            f"-- fixed rate: {args.cpu_rate:g} calls/s (-t l1), {','.join(f'{r:g}' for r in args.cpu_rate_ln)} "
            "calls/s (-t ln) for "
            f"{args.cpu_duration:g} s, {args.cpu_rounds} rounds"
        )
        rounds = fixed_rate_rounds(bench, args)
        floor = measure_idle_floor(bench, args.idle_seconds) if {"kn", "kv"} & set(bench.CONFIGS) else None
        print("-- rate search")
        best = climb(bench, search_ladders(bench, args))
        print()
        print(f"result (runs of {bench.duration:g} s; uac-call.xml to {CALLEE} through Kamailio's TLS port):")
        floor_lines = (
            [
                *idle_floor_report(floor, rounds, args.cpu_rate_ln),
                *(line for rate in args.cpu_rate_ln for line in connect_sleep_report(floor, rounds, rate)),
            ]
            if floor
            else []
        )
        for line in [*rate_report(best, bench.runs + rounds), *cpu_report(rounds), *floor_lines]:
            print(f"  {line}")
        print_footer(bench, time.monotonic() - began, *machine_facts(bench, load))

    return run_bench("tls_anchor", args, make_bench, body)


if __name__ == "__main__":
    sys.exit(main())
