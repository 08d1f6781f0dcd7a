"""Shared machinery of the calls-per-second benches (cps_tcp, cps_tls, cps_ws, cps_many_users,
tls_anchor, static_sipp).

What is here: the callee (a sipp UAS over UDP registered at the SuT), one caller run and its
verdict (`Run`), the rate search (`Ascent`, `climb`, `rate_search`: every configuration climbs its
own rate ladder, the configurations interleaved step by step, the first one rotating), CPU around
every run (`KeeperCpuBench`: the keeper's, the SuT's, sipp's without the `fdkeeper sipp` wrapper's),
the table lines and the figures every report shares (ratios, paired ratios, machine facts, the
keeper's connections), the command line (`bench_parser`, `parse_bench_args`), and the process
bookkeeping that stops everything on any exit (`BenchBase`, `run_bench`, `cps_main`).
A bench subclasses BenchBase (or KeeperCpuBench): it names its configurations and says how each
one's caller is started (`start_caller`); it may measure around every run (`begin_run`/`end_run`)
and add table columns (`COLUMNS`, `run_columns`). What is left in a bench is what it alone does.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import psutil
from cpsruns import Run, paired, print_best_rates

from fdkeeper import testbed
from fdkeeper.client import KeeperClient
from fdkeeper.demo import start_through_fdkeeper
from fdkeeper.errors import FdkeeperError
from fdkeeper.testbed.pki import make_test_pki

CALLEE = "bob"
# Kamailio keeps every finished transaction 5 s (tm wait timer). testbed.Kamailio's 64 MB of shared
# memory runs out at about 300 calls/s ("out of mem" in tm, then 480s and lost replies), so the
# SuT would be the limit, equally for both configurations, and the comparison would say little.
SHM_MB = 1024
# A pause between runs: the previous sipp (or keeper hand-back) is fully gone and the UAS's
# calls in timewait have ended before the next run starts.
SETTLE_S = 0.5
# A call that waits this long for a message fails on its own (sipp -recv_timeout) instead of
# holding the run until the global -timeout.
RECV_TIMEOUT_MS = 5000
# How often the `fdkeeper sipp` wrapper's own CPU is sampled while its sipp runs.
SAMPLE_S = 0.1


# --------------------------------------------------------------------------
# the callee
# --------------------------------------------------------------------------


def byte_compile_package() -> None:
    """Byte-compile the fdkeeper package, as `pip install` leaves it: a development checkout
    run with PYTHONDONTWRITEBYTECODE would otherwise compile every changed module on every
    run, a start-up cost an installed fdkeeper never pays."""
    import fdkeeper

    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.dirname(fdkeeper.__file__)], check=True)


def write_uas_scenario(directory: Path) -> Path:
    """scenarios/uas-answer.xml adapted: the callee answers 100 then 200 (no 180), ACK optional.

    Why: Kamailio's two UDP workers relay the callee's 180 and 200 concurrently, and now and then
    the 180 reaches the caller after the 200; uac-call.xml then aborts the call ("unexpected
    message while pausing"), about 0.5 % of calls at 300 calls/s, at random in both
    configurations. Without a 180 there is nothing to reorder, and the caller's scenario (the
    one measured through fdkeeper) stays exactly the shipped one. (optional="global" on the
    caller's 180 does not work: sipp 3.6.1 then rewinds the call to before the 200.)
    Likewise the callee's ACK and BYE can swap places; its ACK becomes optional anywhere
    (optional="global" advance_state="false"), so a BYE that overtook the ACK is no callee error.
    """
    text = (testbed.SCENARIOS_DIR / "uas-answer.xml").read_text()
    text, dropped = re.subn(r"\n  <send>\s*<!\[CDATA\[\s*SIP/2.0 180 Ringing.*?</send>\n", "\n", text, flags=re.S)
    text, relaxed = re.subn(
        r'<recv request="ACK"[^>]*/>', '<recv request="ACK" optional="global" advance_state="false" crlf="true"/>', text
    )
    if (dropped, relaxed) != (1, 1):
        raise RuntimeError("scenarios/uas-answer.xml changed: cannot find its 180 <send> and ACK <recv> to adapt")
    path = directory / "uas-answer-bench.xml"
    path.write_text(text)
    return path


def register_callee(bench: BenchBase, port: int) -> None:
    """REGISTER bob over UDP from the UAS's own port, so Kamailio relays calls to that port."""
    users = testbed.write_users_csv(bench.workdir / "users.csv", [CALLEE], bench.kamailio.domain)
    result = bench.wait(
        bench.start_plain(
            "uac-register.xml",
            "register-bob",
            transport="u1",
            local_port=port,
            calls=1,
            timeout=10,
            extra=["-inf", str(users)],
        ),
        20,
    )
    if not result.ok:
        raise RuntimeError(f"registering {CALLEE} failed:\n{result.summary()}")
    sources = [c["source"] for c in bench.kamailio.location() if (c["aor"] or "").split("@")[0].endswith(CALLEE)]
    if {(s["host"], s["port"], s["transport"]) for s in sources} != {("127.0.0.1", port, "udp")}:
        raise RuntimeError(f"Kamailio's location for {CALLEE} is {sources}, expected 127.0.0.1:{port} over UDP")


# --------------------------------------------------------------------------
# one sipp run
# --------------------------------------------------------------------------


def elapsed_seconds(stats: dict[str, str]) -> float:
    """Elapsed time of a run from its last stat row, to the microsecond.

    ElapsedTime(C) has a 1 s resolution; StartTime/CurrentTime end with epoch.usec.
    """
    try:
        return float(stats["CurrentTime"].split()[-1]) - float(stats["StartTime"].split()[-1])
    except (KeyError, IndexError, ValueError):
        return 0.0


def caller_options(bench: BenchBase, rate: float, duration: float, transport: str = "t1") -> dict:
    """sut.sipp_command options for a caller run of `duration` seconds at `rate` calls/s."""
    calls = max(1, round(rate * duration))
    return {
        "transport": transport,
        "calls": calls,
        "rate": rate,
        "timeout": duration * 3 + 10,
        "trace_messages": False,
        # -l: at most one second's worth of calls open (five times what the 200 ms calls need),
        # so an overloaded run slows down (and fails "rate not kept") instead of piling up.
        "extra": [
            "-s",
            CALLEE,
            "-key",
            "domain",
            bench.kamailio.domain,
            "-l",
            str(max(100, round(rate))),
            "-recv_timeout",
            str(RECV_TIMEOUT_MS),
        ],
    }


# --------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------


def table_header(width: int = 20, extra: str = "") -> str:
    return (
        f"{'rate':>6}  {'configuration':<{width}} {'calls':>6} {'ok':>6} {'failed':>6} "
        f"{'elapsed s':>9} {'calls/s':>8} {'ideal':>7} {'wall s':>7}  {extra}verdict"
    )


def format_run(run: Run, label: str, width: int = 20, extra: str = "") -> str:
    """One table line; `label` is the configuration's name, `extra` goes before the verdict."""
    label = f"({run.config}) {label}"
    verdict = ("retry: " if run.retry else "") + run.verdict
    return (
        f"{run.rate:>6g}  {label:<{width}} {run.calls:>6} {run.successful:>6} {run.failed:>6} "
        f"{run.elapsed:>9.3f} {run.achieved:>8.1f} {run.ideal:>7.1f} {run.wall:>7.2f}  {extra}{verdict}"
    )


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


def uas_counts(bench: BenchBase) -> str:
    stats = testbed.read_sipp_stats(bench.logs / "uas.stat.csv")
    return f"{stats.get('SuccessfulCall(C)', '?')} calls answered, {stats.get('FailedCall(C)', '?')} failed"


# --------------------------------------------------------------------------
# the bench: processes, runs, clean-up
# --------------------------------------------------------------------------


@dataclass
class BenchBase:
    """The SuT, the callee and the caller runs of one bench. Subclasses set CONFIGS and
    LABELS, and implement start_caller(); make_sut() may give the SuT options."""

    CONFIGS: ClassVar[tuple[str, ...]] = ()  # configuration keys, in the order of the first step
    LABELS: ClassVar[dict[str, str]] = {}  # key -> name in the tables
    PROG = "cps"  # prefix of our messages on stderr
    WIDTH: ClassVar[int] = 20  # the tables' configuration column
    COLUMNS: ClassVar[str] = ""  # the header of the bench's own columns (run_columns), before the verdict

    workdir: Path
    sipp: str
    duration: float
    retries: int
    kamailio: testbed.Kamailio = field(init=False)
    runs: list[Run] = field(default_factory=list)
    live: list[testbed.SippProcess] = field(default_factory=list)  # stopped by close()
    uas: testbed.SippProcess | None = None

    @classmethod
    def from_args(cls, workdir: Path, sipp: str, args: argparse.Namespace) -> BenchBase:
        """The bench of this command line (bench_parser's options; a bench with options of its own adds them)."""
        return cls(workdir, sipp, args.duration, args.retries)

    def __post_init__(self) -> None:
        self.logs = self.workdir / "logs"
        self.keeper_dir = self.workdir / "keeper"
        self.kamailio = self.make_sut()

    def make_sut(self) -> testbed.Kamailio:
        return testbed.Kamailio(self.workdir / "kamailio", shm_mb=SHM_MB, **self.sut_options())

    def sut_options(self) -> dict[str, Any]:
        """testbed.Kamailio options of this bench's SuT (beyond SHM_MB)."""
        return {}

    def tls_sut(self) -> dict[str, Any]:
        """sut_options for a SuT with TLS: a test PKI (self.pki) and its server certificate."""
        self.pki = make_test_pki(self.workdir / "pki")
        return {"tls": testbed.KamailioTls.server(self.pki)}

    @property
    def tls_options(self) -> tuple[str, ...]:
        """`fdkeeper sipp` options that trust the test PKI's SuT."""
        return ("--tls-ca", str(self.pki.ca_cert), "--tls-sni", self.pki.server_name)

    # -- what a bench says ------------------------------------------------

    def start_caller(self, config: str, name: str, options: dict) -> testbed.SippProcess:
        raise NotImplementedError

    def caller_options(self, config: str, rate: float, duration: float) -> dict:
        return caller_options(self, rate, duration)

    def begin_run(self, config: str) -> object:
        """Called right before a caller starts; what it returns goes to end_run()."""
        return None

    def wait_caller(self, config: str, process: testbed.SippProcess, timeout: float) -> testbed.SippResult:
        return self.wait(process, timeout)

    def end_run(self, config: str, token: object, run: Run) -> dict:
        """Called right after a caller ended (before the settle pause): run.measured."""
        return {}

    def run_columns(self, run: Run) -> str:
        """The bench's own columns of a run's table line (under COLUMNS)."""
        return ""

    def format_run(self, run: Run) -> str:
        return format_run(run, self.LABELS[run.config], self.WIDTH, self.run_columns(run))

    def table_header(self) -> str:
        return table_header(self.WIDTH, self.COLUMNS)

    # -- processes --------------------------------------------------------

    def start_plain(
        self, scenario: str | Path, name: str, remote: str | None = None, sipp: str | None = None, **options
    ) -> testbed.SippProcess:
        """sipp (the bench's, or ``sipp``) straight to the SuT, no fdkeeper; stopped by close()."""
        return self._track(
            testbed.start_sipp(
                sipp or self.sipp,
                scenario,
                remote or self.kamailio.address,
                log_dir=self.logs,
                name=name,
                local_ip=self.kamailio.host,
                **options,
            )
        )

    def start_kept(
        self, scenario: str | Path, name: str, remote: str | None = None, sipp: str | None = None, **options
    ) -> testbed.SippProcess:
        """sipp (the bench's, or ``sipp``) through `fdkeeper sipp`; stopped by close()."""
        return self._track(
            start_through_fdkeeper(
                sipp or self.sipp,
                scenario,
                remote or self.kamailio.address,
                directory=self.keeper_dir,
                log_dir=self.logs,
                name=name,
                local_ip=self.kamailio.host,
                **options,
            )
        )

    def _track(self, process: testbed.SippProcess) -> testbed.SippProcess:
        self.live.append(process)
        return process

    def wait(self, process: testbed.SippProcess, timeout: float) -> testbed.SippResult:
        result = process.wait(timeout)
        self.live.remove(process)
        return result

    def setup(self) -> None:
        self.kamailio.start()
        self.start_callee()
        self.warm_up()

    def start_callee(self) -> None:
        """The callee: registered over UDP from its own port, then a sipp UAS on that port."""
        port = testbed.free_port()
        register_callee(self, port)
        self.uas = self.start_plain(
            write_uas_scenario(self.workdir), "uas", transport="u1", local_port=port, calls=None, trace_messages=False
        )

    def warm_up(self) -> None:
        """A short run of each configuration: proves the set-up works, and the first run through
        fdkeeper opens the kept connection, so no measured run includes a connect."""
        for config in self.CONFIGS:
            run, result = self.call(config, 50, name=f"warmup-{config}", duration=1)
            if not run.all_answered:
                raise RuntimeError(f"the warm-up run of ({config}) {self.LABELS[config]} failed:\n{result.summary()}")

    def stop_others(self) -> None:
        """Stop what a subclass started besides the SuT (before the SuT stops)."""

    def close(self) -> None:
        """Stop everything we started: sipp runs, the keeper, Kamailio. Safe after any failure."""
        try:
            for process in self.live:
                process.terminate(grace=3)
            self.live.clear()
            subprocess.run(
                [sys.executable, "-m", "fdkeeper", "stop", "--dir", os.fspath(self.keeper_dir)],
                capture_output=True,
                timeout=30,
            )
        except subprocess.TimeoutExpired:
            print(f"{self.PROG}: `fdkeeper stop --dir {self.keeper_dir}` did not answer in 30 s", file=sys.stderr)
        finally:
            try:
                self.stop_others()
            finally:
                self.kamailio.stop()

    # -- runs -------------------------------------------------------------

    def call(
        self, config: str, rate: float, *, name: str, duration: float | None = None
    ) -> tuple[Run, testbed.SippResult]:
        """One caller run of `config` at `rate` calls/s."""
        options = self.caller_options(config, rate, duration or self.duration)
        token = self.begin_run(config)
        began = time.monotonic()
        result = self.wait_caller(config, self.start_caller(config, name, options), options["timeout"] + 20)
        wall = time.monotonic() - began
        run = Run(
            config,
            rate,
            options["calls"],
            result.successful,
            result.failed,
            elapsed_seconds(result.stats),
            wall,
            result.returncode,
        )
        run.measured = self.end_run(config, token, run)
        time.sleep(SETTLE_S)
        return run, result

    def measure(self, config: str, rate: float) -> Run:
        """A measured run, retried (self.retries times) when it fails; every run is shown."""
        for attempt in range(self.retries + 1):
            run, _ = self.call(config, rate, name=f"{config}-{rate:g}-{attempt}")
            run.retry = attempt > 0
            self.runs.append(run)
            print(self.format_run(run), flush=True)
            if run.passed:
                break
        return run


@dataclass
class KeeperCpuBench(BenchBase):
    """A bench that measures CPU around every run: the keeper's and the SuT's (psutil user+system,
    plus whatever ``watched()`` adds), and sipp's: the reaped run minus the `fdkeeper sipp`
    wrapper's own, sampled while its sipp runs. run.measured gets each as CPU-seconds, and
    "wrapper". A bench with a set-up of its own calls watch_processes() once the keeper runs."""

    keeper: list[psutil.Process] = field(default_factory=list)
    sut_tree: list[psutil.Process] = field(default_factory=list)
    wrapper_cpu: float = 0.0

    def through_keeper(self, config: str) -> bool:
        """Whether a run of ``config`` is a `fdkeeper sipp` wrapper around sipp."""
        return True

    def setup(self) -> None:
        super().setup()
        self.watch_processes()

    def watch_processes(self) -> None:
        """The processes whose CPU is measured (the keeper runs once the warm-up is done)."""
        self.sut_tree = process_tree(self.kamailio.pid)
        self.keeper = keeper_processes(self)

    def watched(self) -> dict[str, list[psutil.Process]]:
        return {"keeper": self.keeper, "sut": self.sut_tree}

    def cpu_now(self) -> dict[str, float]:
        return {**{name: cpu_seconds(tree) for name, tree in self.watched().items()}, "children": children_cpu()}

    def begin_run(self, config: str) -> dict[str, float]:
        return self.cpu_now()

    def wait_caller(self, config: str, process: testbed.SippProcess, timeout: float) -> testbed.SippResult:
        deadline = time.monotonic() + timeout
        self.wrapper_cpu = sample_wrapper_cpu(process, deadline) if self.through_keeper(config) else 0.0
        return self.wait(process, max(0.1, deadline - time.monotonic()))

    def end_run(self, config: str, token: dict, run: Run) -> dict:
        spent = {key: value - token[key] for key, value in self.cpu_now().items()}
        spent["sipp"] = max(0.0, spent.pop("children") - self.wrapper_cpu)
        spent["wrapper"] = self.wrapper_cpu
        return spent


def children_cpu() -> float:
    """CPU of our reaped children (and theirs): a sipp run, with its `fdkeeper sipp` wrapper."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def sample_wrapper_cpu(process: testbed.SippProcess, deadline: float) -> float:
    """Until the run ends, sample the `fdkeeper sipp` wrapper's own CPU (its sipp's is not in it),
    so that sipp's CPU is what the reaped run cost minus the wrapper's part."""
    wrapper, spent = [psutil.Process(process.pid)], 0.0
    while process.running() and time.monotonic() < deadline:
        spent = cpu_seconds(wrapper) or spent
        time.sleep(SAMPLE_S)
    return spent


def keeper_processes(bench: BenchBase) -> list[psutil.Process]:
    """The bench's keeper (for its CPU), from its status."""
    return process_tree(KeeperClient(bench.keeper_dir).status()["keeper"]["pid"])[:1]


def kept_connections(bench: BenchBase) -> list[dict] | str:
    """The keeper's connections as its status lists them, or why they could not be read."""
    try:
        return KeeperClient(bench.keeper_dir).status()["connections"]
    except (FdkeeperError, OSError, KeyError) as exc:
        return f"keeper status unavailable ({exc})"


# --------------------------------------------------------------------------
# the rate search
# --------------------------------------------------------------------------


@dataclass
class Ascent:
    """One configuration's climb: coarse steps up to its first failure, then fine steps between
    its last coarse pass and that failure, up to its first fine failure. `best` is then the
    highest rate with no failed call, to the fine step."""

    config: str
    rates: list[float]  # the rates still to try in the current phase
    fine: float | None  # None: no fine phase (--steps)
    label: str = ""
    passes: list[Run] = field(default_factory=list)
    refining: bool = False

    @property
    def best(self) -> Run | None:
        return self.passes[-1] if self.passes else None

    def next_rate(self) -> float | None:
        return self.rates[0] if self.rates else None

    def record(self, run: Run) -> None:
        self.rates.pop(0)
        if run.passed:
            self.passes.append(run)
            if not self.rates and self.fine is not None and not self.refining:
                print(
                    f"-- ({self.config}) {self.label}: no failure up to {run.rate:g} calls/s (--max-rate)", flush=True
                )
        elif self.fine is None or self.refining:
            self.rates = []  # its first failure (after retries) ends the climb
        else:
            low = self.best.rate if self.best else 0.0
            self.rates = list(rates_from(low + self.fine, self.fine, run.rate - self.fine / 2))
            self.refining = True
            print(
                f"-- ({self.config}) {self.label}: fine steps of {self.fine:g} calls/s "
                f"between {low:g} and {run.rate:g}",
                flush=True,
            )


def process_tree(pid: int | None) -> list[psutil.Process]:
    """A process and all its descendants (for CPU accounting of Kamailio, sipp, converters)."""
    if pid is None:
        return []
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def cpu_seconds(processes: list[psutil.Process]) -> float:
    """user+system of these processes (their own, not their reaped children's)."""
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def print_footer(bench: BenchBase, seconds: float, *more: str) -> None:
    """The closing lines every calls/s bench prints: the callee's counts, the machine facts
    (machine_lines) and the bench's own ``more``, the bench's time."""
    if bench.uas is not None and bench.uas.running():
        print(f"  callee (UAS) so far: {uas_counts(bench)}")
    for fact in machine_lines(bench, *more):
        print(f"  {fact}")
    print(f"  bench time {seconds:.0f} s")


def print_top_rates(
    bench: BenchBase, best: dict[str, Run | None], header: str, columns: Callable[[str, Run], str]
) -> None:
    """The result's title and table: each configuration's top rate and calls/s there, then the
    bench's own ``columns(config, run)`` (headed ``header``)."""
    print()
    print(f"result (runs of {bench.duration:g} s, caller scenarios/uac-call.xml, callee {CALLEE} over UDP):")
    print(f"  {'configuration':<{bench.WIDTH}} {'top rate':>8} {'calls/s':>8} {header}")
    for config in bench.CONFIGS:
        run, label = best[config], f"({config}) {bench.LABELS[config]}"
        if run is None:
            print(f"  {label:<{bench.WIDTH}} no rate passed")
        else:
            print(f"  {label:<{bench.WIDTH}} {run.rate:>8g} {run.achieved:>8.1f} {columns(config, run)}")


def print_ab_result(bench: BenchBase, best: dict[str, Run | None], goal: float, width: int = 17) -> None:
    """The result of an (a)-versus-(b) bench: each one's top rate, b/a against ``goal`` (at least),
    how far apart the top rates are, and b/a at every rate both passed."""
    ratio = print_best_rates(best, {config: bench.LABELS[config] for config in bench.CONFIGS}, width)
    print(f"  ratio b/a (achieved calls/s): {ratio:.3f}" if ratio is not None else "  ratio b/a: n/a")
    print(f"  {'goal met' if ratio is not None and ratio >= goal else 'goal missed'} (goal: ratio >= {goal})")
    a, b = best["a"], best["b"]
    if a and b and a.rate != b.rate:
        low, gap = min(a.rate, b.rate), abs(a.rate - b.rate)
        print(f"  the highest rates differ by {gap:g} calls/s ({gap / low:.1%}): the ratio moves in whole rate steps")
    print(f"  b/a {paired(bench.runs, 'b', 'a')}")


def machine_lines(bench: BenchBase, *more: str) -> list[str]:
    """The facts every report ends with: cores, load, sipp's and Kamailio's versions, the SuT; then ``more``."""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    sipp = command_version([bench.sipp, "-v"], r"SIPp v[^ ,]+")
    kamailio = command_version([bench.kamailio.command()[0], "-v"], r"kamailio \S+ \S+")
    workers = bench.kamailio.children  # TLS and WebSocket connections are served by the TCP workers
    return [
        f"nproc {len(os.sched_getaffinity(0))} ({cpu_model()}); load average now {load}",
        f"sipp: {sipp}; kamailio: {kamailio}; python {sys.version.split()[0]}",
        f"SuT: {workers} UDP + {workers} TCP workers, {bench.kamailio.shm_mb} MB shm",
        *more,
    ]


def rates_from(start: float, step: float, limit: float) -> Iterator[float]:
    rate = start
    while rate <= limit + 1e-9:
        yield rate
        rate += step


def climb(bench: BenchBase, ascents: list[Ascent]) -> dict[str, Run | None]:
    """Step every configuration up its own ascent. The configurations still climbing run one
    after the other at every step (interleaved in time, so drift hits all alike), the order
    rotating from step to step (a b, b a ...; a b c, b c a, c a b ...); returns each one's run
    at its highest passing rate."""
    for step in itertools.count():
        active = [a for a in ascents if a.next_rate() is not None]
        if not active:
            return {a.config: a.best for a in ascents}
        shift = step % len(active)
        for ascent in active[shift:] + active[:shift]:
            ascent.record(bench.measure(ascent.config, ascent.next_rate()))
    raise AssertionError("unreachable")


def ascents(
    bench: BenchBase,
    step: float,
    fine: float,
    limit: float,
    steps: list[float] | None,
    start: dict[str, float] | None = None,
) -> list[Ascent]:
    """--steps: exactly those rates; otherwise coarse steps from `step` (or the config's
    `start`, a multiple of step) up to `limit`."""

    def ladder(config: str) -> list[float]:
        if steps:
            return sorted(steps)
        return list(rates_from((start or {}).get(config, step), step, limit))

    return [Ascent(config, ladder(config), None if steps else fine, bench.LABELS[config]) for config in bench.CONFIGS]


def parse_steps(text: str | None) -> list[float] | None:
    """--steps: comma-separated rates (None: the coarse/fine search)."""
    return [float(rate) for rate in text.split(",") if rate.strip()] if text else None


def rate_search(
    bench: BenchBase, args: argparse.Namespace, ladders: list[Ascent] | None = None
) -> dict[str, Run | None]:
    """Climb every configuration's ladder (cpslib's coarse/fine search, --steps, or ``ladders``),
    said on a line first; each one's run at its highest passing rate."""
    steps = parse_steps(args.steps)
    print(f"-- steps {args.steps}" if steps else f"-- coarse steps of {args.step:g} calls/s", flush=True)
    return climb(bench, ladders or ascents(bench, args.step, args.fine, args.max_rate, steps))


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


EXIT_STATUS = (
    "Exit status: 0 when the bench ran (goals met or missed: the output says which), 1 when the set-up "
    "did not work, 130 on Ctrl-C. Everything started is stopped, also on Ctrl-C."
)


def bench_parser(
    doc: str,
    *,
    duration: float,
    step: float,
    quick_duration: float = 2.0,
    quick_step: float | None = None,
    quick_time: str = "about 1 minute",
    max_rate: float = 10000,
    fine_divisor: int = 10,
) -> argparse.ArgumentParser:
    """The command line every calls/s bench shares (its description the first paragraph of ``doc``):
    runs of ``duration`` s, coarse steps of ``step``, fine steps of step/fine_divisor; --quick takes
    ``quick_duration``, ``quick_step`` (default 2 x step) and quick_step/5 ("``quick_time``" in --help)."""
    quick_step = quick_step or 2 * step
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    quick = f"{quick_duration:g} s runs, coarse steps of {quick_step:g}, fine steps of {quick_step / 5:g}"
    quick = f"{quick_time}: {quick}" if quick_time else quick
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument(
        "--duration", type=float, help=f"seconds of calls per run (default {duration:g}; --quick {quick_duration:g})"
    )
    parser.add_argument("--steps", help="comma-separated rates to climb instead of the coarse/fine search")
    parser.add_argument(
        "--step", type=float, help=f"coarse rate step, calls/s (default {step:g}; --quick {quick_step:g})"
    )
    parser.add_argument(
        "--fine",
        type=float,
        help=f"fine rate step, calls/s (default step/{fine_divisor}, i.e. {step / fine_divisor:g}; "
        f"--quick {quick_step / 5:g})",
    )
    parser.add_argument("--max-rate", type=float, default=max_rate, help=f"never go above this (default {max_rate:g})")
    parser.add_argument("--retries", type=int, default=1, help="reruns of a failed run before it counts (default 1)")
    parser.add_argument("--sipp", help="sipp binary (default: $FDKEEPER_SIPP or sipp on PATH)")
    parser.add_argument("--keep-files", action="store_true", help="keep the temp dir (logs, stat files)")
    parser.set_defaults(_defaults=(duration, quick_duration, step, quick_step, fine_divisor))
    return parser


def parse_bench_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, then fill the defaults that depend on --quick."""
    args = parser.parse_args(argv)
    duration, quick_duration, step, quick_step, fine_divisor = args._defaults
    args.duration = args.duration or (quick_duration if args.quick else duration)
    args.step = args.step or (quick_step if args.quick else step)
    args.fine = args.fine or (args.step / 5 if args.quick else args.step / fine_divisor)
    return args


def raise_keyboard_interrupt(signum: int, _frame) -> None:
    """SIGTERM/SIGHUP clean up like Ctrl-C does."""
    raise KeyboardInterrupt(f"signal {signum}")


def run_bench(
    prog: str,
    args: argparse.Namespace,
    make_bench: Callable[[Path, str], BenchBase],
    body: Callable[[BenchBase, float], None],
) -> int:
    """Find sipp, make the temp dir and the bench, run `body(bench, began)`, and stop everything
    whatever happens (Ctrl-C, SIGTERM, SIGHUP, a failed set-up). Returns the exit status."""
    try:
        sipp = testbed.find_sipp(args.sipp)
    except RuntimeError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, raise_keyboard_interrupt)
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="fdkeeper-cps-"))
    bench = None
    try:
        bench = make_bench(workdir, sipp)
        body(bench, began)
        return 0
    except RuntimeError as exc:
        print(f"{prog}: set-up failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        if bench is not None:
            bench.close()
        if args.keep_files:
            print(f"files kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def cps_main(
    bench: type[BenchBase],
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    banner: Callable[[Any], list[str]],
    report: Callable[[Any, dict[str, Run | None], float], None],
) -> int:
    """A calls/s bench from start to end: its command line, set-up, a word on it (``banner``: the SuT,
    what its columns mean), the table of the rate search's runs, ``report(bench, best, seconds)``; everything stopped on any exit."""
    args = parse_bench_args(parser, argv)

    def body(made: BenchBase, began: float) -> None:
        made.setup()
        print(f"callee {CALLEE} (sipp UAS over UDP) registered; warm-up ok")
        for line in banner(made):
            print(line)
        print(made.table_header(), flush=True)
        report(made, rate_search(made, args), time.monotonic() - began)

    return run_bench(bench.PROG, args, lambda workdir, sipp: bench.from_args(workdir, sipp, args), body)
