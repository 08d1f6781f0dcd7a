#!/usr/bin/env python3
"""Calls per second through a kept TCP connection versus sipp straight to the same Kamailio.

The figure: for each configuration, the highest call rate at which one sipp run had no failed
call and kept the rate, and the calls/s achieved in that run (successful calls / sipp's elapsed
time). Goal: ratio (b) / (a) >= 0.98, where

    (a) plain sipp -t t1 straight to Kamailio (a new TCP connection per run),
    (b) the same command line through `python3 -m fdkeeper sipp` (the kept connection).

Set-up (all on loopback, in a temp dir, removed at the end):
  * one Kamailio registrar (fdkeeper.sut.Kamailio, shared memory raised, see BenchKamailio);
  * a callee "bob": a plain sipp UAS over UDP on port P, registered first from that same
    port, so Kamailio relays the calls to 127.0.0.1:P over UDP;
  * the caller: scenarios/uac-call.xml over TCP (-t t1) to bob through Kamailio.
The rate climbs in coarse steps until a configuration fails, then again from the last rate both
passed in fine steps until both have failed. At every rate the two configurations run one after
the other, the first one alternating from step to step (a b, b a, a b ...), so slow drift of a
shared, noisy machine hits both alike. A failed run is retried once before it counts.

Usage:  python3 bench/cps_tcp.py            (about 4 minutes)
        python3 bench/cps_tcp.py --quick    (about 1 minute)
        python3 bench/cps_tcp.py --steps 500,1000,1500 --duration 3
Exit status: 0 when the bench ran (goal met or missed: the output says which), 1 when the
set-up did not work, 130 on Ctrl-C. Everything started is stopped, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from fdkeeper import sut
from fdkeeper.client import KeeperClient
from fdkeeper.demo import start_through_fdkeeper
from fdkeeper.errors import FdkeeperError

GOAL = 0.98
CALLEE = "bob"
CONFIGS = ("a", "b")
LABELS = {"a": "plain sipp", "b": "through fdkeeper"}
# uac-call.xml holds every call 200 ms between ACK and BYE: a run of N calls at rate R cannot
# end before N/R + 0.2 s, which is what "ideal" calls/s below is measured against.
CALL_PAUSE_S = 0.2
# A run "keeps the rate" when it reaches this share of the ideal calls/s; below it sipp (or
# the SuT) is queueing calls, the call rate is no longer what was asked for.
KEEP_FRACTION = 0.95
# Kamailio keeps every finished transaction 5 s (tm wait timer). sut.Kamailio's 64 MB of shared
# memory runs out at about 300 calls/s ("out of mem" in tm, then 480s and lost replies), so the
# SuT would be the limit, equally for both configurations, and the comparison would say little.
SHM_MB = 1024
# A pause between runs: the previous sipp (or keeper hand-back) is fully gone and the UAS's
# calls in timewait have ended before the next run starts.
SETTLE_S = 0.5
# A call that waits this long for a message fails on its own (sipp -recv_timeout) instead of
# holding the run until the global -timeout.
RECV_TIMEOUT_MS = 5000


# --------------------------------------------------------------------------
# the SuT and the callee
# --------------------------------------------------------------------------

class BenchKamailio(sut.Kamailio):
    """sut.Kamailio with more shared memory (see SHM_MB); everything else unchanged."""

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index("-m") + 1] = str(SHM_MB)
        return cmd


def write_uas_scenario(directory: Path) -> Path:
    """scenarios/uas-answer.xml without its 180 Ringing: the callee answers 100, then 200.

    Why: Kamailio's two UDP workers relay the callee's 180 and 200 concurrently, and now and then
    the 180 reaches the caller after the 200; uac-call.xml then aborts the call ("unexpected
    message while pausing"), about 0.5 % of calls at 300 calls/s, at random in both
    configurations. Without a 180 there is nothing to reorder, and the caller's scenario (the
    one measured through fdkeeper) stays exactly the shipped one. (optional="global" on the
    caller's 180 does not work: sipp 3.6.1 then rewinds the call to before the 200.)
    """
    text = (sut.SCENARIOS_DIR / "uas-answer.xml").read_text()
    text, count = re.subn(r"\n  <send>\s*<!\[CDATA\[\s*SIP/2.0 180 Ringing.*?</send>\n", "\n", text, flags=re.S)
    if count != 1:
        raise RuntimeError("scenarios/uas-answer.xml changed: cannot find its 180 Ringing <send> to drop")
    path = directory / "uas-answer-no-180.xml"
    path.write_text(text)
    return path


def register_callee(bench: "Bench", port: int) -> None:
    """REGISTER bob over UDP from the UAS's own port, so Kamailio relays calls to that port."""
    users = sut.write_users_csv(bench.workdir / "users.csv", [CALLEE], bench.kamailio.domain)
    result = bench.wait(bench.start_plain("uac-register.xml", "register-bob", transport="u1", local_port=port,
                                          calls=1, timeout=10, extra=["-inf", str(users)]), 20)
    if not result.ok:
        raise RuntimeError(f"registering {CALLEE} failed:\n{result.summary()}")
    sources = [c["source"] for c in bench.kamailio.location() if (c["aor"] or "").split("@")[0].endswith(CALLEE)]
    if {(s["host"], s["port"], s["transport"]) for s in sources} != {("127.0.0.1", port, "udp")}:
        raise RuntimeError(f"Kamailio's location for {CALLEE} is {sources}, expected 127.0.0.1:{port} over UDP")


# --------------------------------------------------------------------------
# one sipp run
# --------------------------------------------------------------------------

@dataclass
class Run:
    """One caller run: its counts and times (from sipp's -trace_stat file) and verdict."""
    config: str
    rate: float
    calls: int
    successful: int
    failed: int
    elapsed: float          # sipp's own StartTime -> last CurrentTime, seconds
    wall: float             # our wall clock, including `fdkeeper sipp`'s start-up for (b)
    returncode: int | None
    retry: bool = False

    @property
    def achieved(self) -> float:
        """The figure: successful calls per second of the run."""
        return self.successful / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def ideal(self) -> float:
        """Calls/s of a run that creates every call on time and answers at once."""
        return self.calls / (self.calls / self.rate + CALL_PAUSE_S)

    @property
    def all_answered(self) -> bool:
        return self.returncode == 0 and self.failed == 0 and self.successful == self.calls

    @property
    def passed(self) -> bool:
        return self.all_answered and self.achieved >= KEEP_FRACTION * self.ideal

    @property
    def verdict(self) -> str:
        if self.failed:
            return f"FAILED ({self.failed} failed calls)"
        if not self.all_answered:
            return f"FAILED (exit {self.returncode}, {self.successful}/{self.calls} calls)"
        if not self.passed:
            return f"rate not kept (< {KEEP_FRACTION:.0%} of ideal)"
        return "ok"


def elapsed_seconds(stats: dict[str, str]) -> float:
    """Elapsed time of a run from its last stat row, to the microsecond.

    ElapsedTime(C) has a 1 s resolution; StartTime/CurrentTime end with epoch.usec.
    """
    try:
        return float(stats["CurrentTime"].split()[-1]) - float(stats["StartTime"].split()[-1])
    except (KeyError, IndexError, ValueError):
        return 0.0


def caller_options(bench: "Bench", rate: float, duration: float) -> dict:
    """sut.sipp_command options for a caller run of `duration` seconds at `rate` calls/s."""
    calls = max(1, round(rate * duration))
    return dict(
        transport="t1", calls=calls, rate=rate, timeout=duration * 3 + 10, trace_messages=False,
        # -l: at most one second's worth of calls open (five times what the 200 ms calls need),
        # so an overloaded run slows down (and fails "rate not kept") instead of piling up.
        extra=["-s", CALLEE, "-key", "domain", bench.kamailio.domain,
               "-l", str(max(100, round(rate))), "-recv_timeout", str(RECV_TIMEOUT_MS)],
    )


# --------------------------------------------------------------------------
# the bench: processes, runs, clean-up
# --------------------------------------------------------------------------

@dataclass
class Bench:
    workdir: Path
    sipp: str
    duration: float
    retries: int
    kamailio: sut.Kamailio = field(init=False)
    runs: list[Run] = field(default_factory=list)
    live: list[sut.SippProcess] = field(default_factory=list)   # stopped by close()
    uas: sut.SippProcess | None = None
    step_count: int = 0

    def __post_init__(self) -> None:
        self.logs = self.workdir / "logs"
        self.keeper_dir = self.workdir / "keeper"
        self.kamailio = BenchKamailio(self.workdir / "kamailio")

    # -- processes --------------------------------------------------------

    def start_plain(self, scenario: str | Path, name: str, **options) -> sut.SippProcess:
        return self._track(sut.start_sipp(self.sipp, scenario, self.kamailio.address, log_dir=self.logs,
                                          name=name, local_ip=self.kamailio.host, **options))

    def start_kept(self, scenario: str | Path, name: str, **options) -> sut.SippProcess:
        return self._track(start_through_fdkeeper(self.sipp, scenario, self.kamailio.address, directory=self.keeper_dir,
                                                  log_dir=self.logs, name=name, local_ip=self.kamailio.host, **options))

    def _track(self, process: sut.SippProcess) -> sut.SippProcess:
        self.live.append(process)
        return process

    def wait(self, process: sut.SippProcess, timeout: float) -> sut.SippResult:
        result = process.wait(timeout)
        self.live.remove(process)
        return result

    def setup(self) -> None:
        self.kamailio.start()
        port = sut.free_port()
        register_callee(self, port)
        self.uas = self.start_plain(write_uas_scenario(self.workdir), "uas", transport="u1", local_port=port,
                                    calls=None, trace_messages=False)
        self.warm_up()

    def warm_up(self) -> None:
        """A short run of each configuration: proves the set-up works, and (b)'s first run opens
        the kept connection, so no measured run includes a TCP connect in (b)."""
        for config in CONFIGS:
            run, result = self.call(config, 50, name=f"warmup-{config}", duration=1)
            if not run.all_answered:
                raise RuntimeError(f"the warm-up run of ({config}) {LABELS[config]} failed:\n{result.summary()}")

    def close(self) -> None:
        """Stop everything we started: sipp runs, the keeper, Kamailio. Safe after any failure."""
        for process in self.live:
            process.terminate(grace=3)
        self.live.clear()
        subprocess.run([sys.executable, "-m", "fdkeeper", "stop", "--dir", os.fspath(self.keeper_dir)],
                       capture_output=True, timeout=30)
        self.kamailio.stop()

    # -- runs -------------------------------------------------------------

    def call(self, config: str, rate: float, *, name: str, duration: float | None = None) -> tuple[Run, sut.SippResult]:
        """One caller run of `config` at `rate` calls/s."""
        options = caller_options(self, rate, duration or self.duration)
        start = self.start_plain if config == "a" else self.start_kept
        began = time.monotonic()
        result = self.wait(start("uac-call.xml", name, **options), options["timeout"] + 20)
        wall = time.monotonic() - began
        run = Run(config, rate, options["calls"], result.successful, result.failed, elapsed_seconds(result.stats),
                  wall, result.returncode)
        time.sleep(SETTLE_S)
        return run, result

    def measure(self, config: str, rate: float) -> Run:
        """A measured run, retried (self.retries times) when it fails; every run is shown."""
        for attempt in range(self.retries + 1):
            run, _ = self.call(config, rate, name=f"{config}-{rate:g}-{attempt}")
            run.retry = attempt > 0
            self.runs.append(run)
            print(format_run(run), flush=True)
            if run.passed:
                break
        return run

    def step(self, rate: float, configs: list[str]) -> dict[str, Run]:
        """Run `configs` at `rate`, the first one alternating from step to step."""
        order = configs if self.step_count % 2 == 0 else configs[::-1]
        self.step_count += 1
        return {config: self.measure(config, rate) for config in order}


# --------------------------------------------------------------------------
# the rate search
# --------------------------------------------------------------------------

@dataclass
class Ascent:
    """One climb through rising rates: per configuration, its passing runs in order, and the
    rate it first failed at (after retries)."""
    passes: dict[str, list[Run]] = field(default_factory=lambda: {c: [] for c in CONFIGS})
    failed_at: dict[str, float] = field(default_factory=dict)

    def best(self, config: str) -> Run | None:
        return self.passes[config][-1] if self.passes[config] else None


def climb(bench: Bench, rates: Iterable[float], *, stop_on_first_failure: bool,
          caps: dict[str, float] | None = None) -> Ascent:
    """Step the rate up; a configuration leaves the climb at its first failure, or below its cap.
    Ends when none is left (or, with stop_on_first_failure, as soon as one has failed)."""
    ascent, caps = Ascent(), caps or {}
    for rate in rates:
        active = [c for c in CONFIGS if c not in ascent.failed_at and rate < caps.get(c, float("inf"))]
        if not active:
            break
        for config, run in bench.step(rate, active).items():
            if run.passed:
                ascent.passes[config].append(run)
            else:
                ascent.failed_at[config] = rate
        if stop_on_first_failure and ascent.failed_at:
            break
    return ascent


def rates_from(start: float, step: float, limit: float) -> Iterator[float]:
    rate = start
    while rate <= limit + 1e-9:
        yield rate
        rate += step


def search(bench: Bench, step: float, fine: float, limit: float) -> dict[str, Run | None]:
    """Coarse steps until a configuration fails, then fine steps from the last rate both passed
    (a configuration that failed a coarse rate after its retry is not tried there again).
    Returns each configuration's run at its highest passing rate."""
    print(f"-- coarse steps of {step:g} calls/s:", flush=True)
    coarse = climb(bench, rates_from(step, step, limit), stop_on_first_failure=True)
    common = min((coarse.best(c).rate if coarse.best(c) else 0.0) for c in CONFIGS)
    if not coarse.failed_at:
        print(f"-- no failure up to --max-rate {limit:g} calls/s", flush=True)
        return {c: coarse.best(c) for c in CONFIGS}
    print(f"-- fine steps of {fine:g} calls/s from {common:g} calls/s, the last rate both passed:", flush=True)
    refined = climb(bench, rates_from(common + fine, fine, limit), stop_on_first_failure=False,
                    caps=coarse.failed_at)
    return {c: refined.best(c) or _run_at(coarse, c, common) for c in CONFIGS}


def _run_at(ascent: Ascent, config: str, rate: float) -> Run | None:
    return next((run for run in ascent.passes[config] if run.rate == rate), None)


def explicit_search(bench: Bench, rates: list[float]) -> dict[str, Run | None]:
    """--steps: climb the given rates only; each configuration stops at its first failure."""
    print(f"-- steps {', '.join(f'{r:g}' for r in rates)} calls/s:", flush=True)
    ascent = climb(bench, sorted(rates), stop_on_first_failure=False)
    return {c: ascent.best(c) for c in CONFIGS}


# --------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------

TABLE_HEADER = (f"{'rate':>6}  {'configuration':<20} {'calls':>6} {'ok':>6} {'failed':>6} "
                f"{'elapsed s':>9} {'calls/s':>8} {'ideal':>7} {'wall s':>7}  verdict")


def format_run(run: Run) -> str:
    label = f"({run.config}) {LABELS[run.config]}"
    verdict = ("retry: " if run.retry else "") + run.verdict
    return (f"{run.rate:>6g}  {label:<20} {run.calls:>6} {run.successful:>6} {run.failed:>6} "
            f"{run.elapsed:>9.3f} {run.achieved:>8.1f} {run.ideal:>7.1f} {run.wall:>7.2f}  {verdict}")


def command_version(cmd: list[str], pattern: str) -> str:
    """The first line of a program's version output matching `pattern` (or 'unknown')."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    match = re.search(pattern, out.stdout + out.stderr)
    return match.group(0).strip().rstrip(".") if match else "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


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


def paired_ratios(runs: list[Run]) -> list[float]:
    """b/a achieved calls/s at every rate where the last run of both passed: a noise gauge."""
    last: dict[tuple[float, str], Run] = {(r.rate, r.config): r for r in runs}
    return [last[(rate, "b")].achieved / last[(rate, "a")].achieved
            for rate in sorted({r.rate for r in runs})
            if all((rate, c) in last and last[(rate, c)].passed for c in CONFIGS)]


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
    for config in CONFIGS:
        run = best[config]
        figure = (f"highest rate with no failed call {run.rate:g} calls/s, achieved {run.achieved:.1f} calls/s"
                  if run else "no rate passed")
        print(f"  ({config}) {LABELS[config]:<17} {figure}")
    ratio = best["b"].achieved / best["a"].achieved if best["a"] and best["b"] else None
    verdict = "goal met" if ratio is not None and ratio >= GOAL else "goal missed"
    print(f"  ratio b/a (achieved calls/s): {ratio:.3f}" if ratio is not None else "  ratio b/a: n/a")
    print(f"  {verdict} (goal: ratio >= {GOAL})")
    pairs = paired_ratios(bench.runs)
    if pairs:
        pairs.sort()
        print(f"  b/a at the {len(pairs)} rates both passed: median {pairs[len(pairs) // 2]:.3f}, "
              f"min {pairs[0]:.3f}, max {pairs[-1]:.3f}")
    print(f"  {kept_connection_line(bench)}")
    if bench.uas is not None and bench.uas.running():
        print(f"  callee (UAS) so far: {_uas_counts(bench)}")
    for fact in machine_facts(bench):
        print(f"  {fact}")
    print(f"  bench time {seconds:.0f} s")


def _uas_counts(bench: Bench) -> str:
    stats = sut.read_sipp_stats(bench.logs / "uas.stat.csv")
    return f"{stats.get('SuccessfulCall(C)', '?')} calls answered, {stats.get('FailedCall(C)', '?')} failed"


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="about 1 minute: 2 s runs, coarse steps of 1000, fine steps of 250")
    parser.add_argument("--duration", type=float, help="seconds of calls per run (default 5; --quick 2)")
    parser.add_argument("--steps", help="comma-separated rates to climb instead of the coarse/fine search")
    parser.add_argument("--step", type=float, help="coarse rate step, calls/s (default 500; --quick 1000)")
    parser.add_argument("--fine", type=float, help="fine rate step, calls/s (default step/5; --quick 250)")
    parser.add_argument("--max-rate", type=float, default=10000, help="never go above this (default 10000)")
    parser.add_argument("--retries", type=int, default=1, help="reruns of a failed run before it counts (default 1)")
    parser.add_argument("--sipp", help="sipp binary (default: $SIPP or sipp on PATH)")
    parser.add_argument("--keep-files", action="store_true", help="keep the temp dir (logs, stat files)")
    args = parser.parse_args(argv)
    args.duration = args.duration or (2.0 if args.quick else 5.0)
    args.step = args.step or (1000.0 if args.quick else 500.0)
    args.fine = args.fine or (250.0 if args.quick else args.step / 5)
    return args


def raise_keyboard_interrupt(signum: int, _frame) -> None:
    """SIGTERM/SIGHUP clean up like Ctrl-C does."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sipp = sut.find_sipp(args.sipp)
    except RuntimeError as exc:
        print(f"cps_tcp: {exc}", file=sys.stderr)
        return 1
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, raise_keyboard_interrupt)
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="fdkeeper-cps-"))
    bench = Bench(workdir, sipp, args.duration, args.retries)
    try:
        bench.setup()
        print(f"Kamailio on {bench.kamailio.address}; callee {CALLEE} (sipp UAS over UDP) registered; warm-up ok")
        print(TABLE_HEADER, flush=True)
        if args.steps:
            best = explicit_search(bench, [float(r) for r in args.steps.split(",") if r.strip()])
        else:
            best = search(bench, args.step, args.fine, args.max_rate)
        report(bench, best, time.monotonic() - began)
        return 0
    except RuntimeError as exc:
        print(f"cps_tcp: set-up failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cps_tcp: interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        bench.close()
        if args.keep_files:
            print(f"files kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
