#!/usr/bin/env python3
"""Calls per second over a kept TLS connection: versus kept TCP, and versus a Kamailio converter.

The figures (issue 3), for each configuration the highest call rate at which one sipp run had
no failed call and kept the rate, and the calls/s achieved in that run (successful calls /
sipp's elapsed time), plus CPU-seconds per call of the converter side:

    (tcp) sipp -t t1 through `fdkeeper sipp` to the SuT's TCP port (the kept TCP connection);
    (tls) sipp -t l1 through `fdkeeper sipp` to the SuT's TLS port: the keeper terminates TLS
          and pumps plain SIP between sipp's unix socketpair and the TLS connection;
    (kam) the seed's way: plain sipp -t u1 to a Kamailio configured as a stateless UDP->TLS
          converter (fdkeeper.testbed.KamailioConverter) pointed at the same SuT's TLS port.

  1. (tls)/(tcp) achieved calls/s; goal >= 0.9.
  2. (tls)/(kam) achieved calls/s; goal >= 1.0, and fewer CPU-seconds per call on the
     converter side: the keeper process's CPU time for (tls) (psutil, user+system, delta over
     the run), the sum over the converter Kamailio's process tree for (kam). Compared at the
     highest rate both passed (per-call CPU falls as the rate rises: more messages per wake-up).
     sipp's own CPU and the SuT's are shown for context.

Set-up (all on loopback, in a temp dir, removed at the end):
  * a test PKI (fdkeeper.testbed.make_test_pki: CA, server cert for sut.test);
  * one Kamailio registrar with UDP, TCP and TLS listeners (1 GB shm, like cps_tcp.py);
  * the converter Kamailio (2 UDP + 2 TCP/TLS workers, its defaults), one TLS connection to
    the SuT;
  * the callee "bob": a plain sipp UAS over UDP, registered from its own port, so the SuT
    relays every call to it over UDP, in all three configurations;
  * the caller: scenarios/uac-call.xml (a 200 ms call) in all three.
The rate search is cps_tcp.py's (bench/cpslib.py): each configuration climbs in coarse steps up
to its first failure, then in fine steps; at every step the configurations still climbing run
one after the other, the order rotating, so drift hits all alike; a failed run is retried once.

Usage:  python3 bench/cps_tls.py            (about 4 minutes)
        python3 bench/cps_tls.py --quick    (about 1 minute)
        python3 bench/cps_tls.py --steps 500,1000 --duration 2
Exit status: 0 when the bench ran (goals met or missed: the output says which), 1 when the
set-up did not work, 130 on Ctrl-C. Everything started is stopped, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from dataclasses import dataclass, field

import psutil

# Run as a script (python3 bench/cps_tls.py): bench/ is sys.path[0], cpslib is beside us.
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
    cpu_seconds,
    format_run,
    print_footer,
    process_tree,
    resolve_defaults,
    run_bench,
    table_header,
)

from fdkeeper import testbed
from fdkeeper.client import KeeperClient
from fdkeeper.errors import FdkeeperError
from fdkeeper.testbed.pki import make_test_pki

GOAL_TLS_TCP = 0.9
GOAL_TLS_KAM = 1.0
CONFIGS = ("tcp", "tls", "kam")
LABELS = {"tcp": "fdkeeper -t t1", "tls": "fdkeeper -t l1", "kam": "UDP->Kamailio->TLS"}
WIDTH = 25
# The keeper counts as the bottleneck when it uses this share of one core during a run.
PUMP_BOUND = 0.85
# How often the `fdkeeper sipp` wrapper's own CPU is sampled while its sipp runs.
SAMPLE_S = 0.1


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


@dataclass
class Bench(BenchBase):
    CONFIGS = CONFIGS
    LABELS = LABELS
    PROG = "cps_tls"

    converter: testbed.KamailioConverter | None = None
    keeper: list[psutil.Process] = field(default_factory=list)
    converter_tree: list[psutil.Process] = field(default_factory=list)
    sut_tree: list[psutil.Process] = field(default_factory=list)
    wrapper_cpu: float = 0.0

    def make_sut(self) -> testbed.Kamailio:
        self.pki = make_test_pki(self.workdir / "pki")
        return testbed.Kamailio(self.workdir / "kamailio", shm_mb=SHM_MB, tls=testbed.KamailioTls.server(self.pki))

    @property
    def tls_options(self) -> tuple[str, ...]:
        return ("--tls-ca", str(self.pki.ca_cert), "--tls-sni", self.pki.server_name)

    def setup(self) -> None:
        self.kamailio.start()
        self.converter = testbed.KamailioConverter.for_sut(
            self.workdir / "converter", self.kamailio, "tls", tls=testbed.KamailioTls.client(self.pki)
        )
        self.converter.start()
        super().setup()  # the callee, and a warm-up run of each configuration
        self.sut_tree = process_tree(self.kamailio.pid)
        self.converter_tree = process_tree(self.converter.pid)
        self.keeper = process_tree(KeeperClient(self.keeper_dir).status()["keeper"]["pid"])[:1]

    def stop_others(self) -> None:
        if self.converter is not None:
            self.converter.stop()

    # -- the callers ------------------------------------------------------

    def caller_options(self, config: str, rate: float, duration: float) -> dict:
        return caller_options(self, rate, duration, transport={"tcp": "t1", "tls": "l1", "kam": "u1"}[config])

    def start_caller(self, config: str, name: str, options: dict) -> testbed.SippProcess:
        if config == "tcp":
            return self.start_kept("uac-call.xml", name, **options)
        if config == "tls":
            return self.start_kept(
                "uac-call.xml", name, remote=self.kamailio.tls_address, options=self.tls_options, **options
            )
        return self.start_plain("uac-call.xml", name, remote=self.converter.address, **options)

    # -- CPU around every run ---------------------------------------------

    def begin_run(self, config: str) -> dict:
        return self._cpu_now()

    def _cpu_now(self) -> dict:
        return {
            "keeper": cpu_seconds(self.keeper),
            "converter": cpu_seconds(self.converter_tree),
            "sut": cpu_seconds(self.sut_tree),
            "children": children_cpu(),
        }

    def wait_caller(self, config: str, process: testbed.SippProcess, timeout: float) -> testbed.SippResult:
        deadline = time.monotonic() + timeout
        self.wrapper_cpu = sample_wrapper_cpu(process, deadline) if config != "kam" else 0.0
        return self.wait(process, max(0.1, deadline - time.monotonic()))

    def end_run(self, config: str, token: dict, run: Run) -> dict:
        now = self._cpu_now()
        spent = {key: now[key] - token[key] for key in now}
        return {
            "keeper": spent["keeper"],
            "converter": spent["converter"],
            "sut": spent["sut"],
            "wrapper": self.wrapper_cpu,
            "sipp": max(0.0, spent["children"] - self.wrapper_cpu),
            # the converter side of this configuration
            "side": spent["converter"] if config == "kam" else spent["keeper"],
        }

    def format_run(self, run: Run) -> str:
        return format_run(run, self.LABELS[run.config], WIDTH, cpu_columns(run))


# --------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------

CPU_HEADER = f"{'side ms/c':>9} {'side %core':>10} {'sipp ms/c':>9} {'SuT ms/c':>8}  "


def per_call_ms(run: Run, key: str) -> float | None:
    if key not in run.measured or run.successful == 0:
        return None
    return 1000.0 * run.measured[key] / run.successful


def core_share(run: Run) -> float | None:
    if "side" not in run.measured or run.elapsed <= 0:
        return None
    return run.measured["side"] / run.elapsed


def cpu_columns(run: Run) -> str:
    def ms(key: str, width: int) -> str:
        value = per_call_ms(run, key)
        return f"{value:>{width}.3f}" if value is not None else f"{'-':>{width}}"

    share = core_share(run)
    return f"{ms('side', 9)} {(f'{share:.0%}' if share is not None else '-'):>10} {ms('sipp', 9)} {ms('sut', 8)}  "


def side_name(config: str) -> str:
    return "Kamailio converter" if config == "kam" else "keeper"


def last_runs(runs: list[Run]) -> dict[tuple[float, str], Run]:
    return {(r.rate, r.config): r for r in runs}


def common_rates(runs: list[Run], configs: tuple[str, ...]) -> list[float]:
    last = last_runs(runs)
    return [
        rate
        for rate in sorted({r.rate for r in runs})
        if all((rate, c) in last and last[(rate, c)].passed for c in configs)
    ]


def paired(runs: list[Run], top: str, bottom: str) -> str:
    last = last_runs(runs)
    ratios = sorted(
        last[(rate, top)].achieved / last[(rate, bottom)].achieved for rate in common_rates(runs, (top, bottom))
    )
    if not ratios:
        return "no rate where both passed"
    return (
        f"at the {len(ratios)} rates both passed: median {ratios[len(ratios) // 2]:.3f}, "
        f"min {ratios[0]:.3f}, max {ratios[-1]:.3f}"
    )


def ratio_line(best: dict[str, Run | None], top: str, bottom: str, goal: float) -> tuple[str, bool]:
    if not (best[top] and best[bottom]):
        return f"({top})/({bottom}): n/a, a configuration passed no rate", False
    ratio = best[top].achieved / best[bottom].achieved
    met = ratio >= goal
    return (
        f"({top})/({bottom}) achieved calls/s: {best[top].achieved:.1f} / {best[bottom].achieved:.1f} = "
        f"{ratio:.3f}  goal {'met' if met else 'missed'} (>= {goal:g})"
    ), met


def cpu_comparison(bench: Bench) -> tuple[list[str], bool]:
    """Keeper vs converter CPU per call at the highest rate where (tls) and (kam) both passed."""
    rates = common_rates(bench.runs, ("tls", "kam"))
    if not rates:
        return ["CPU per call: no rate where (tls) and (kam) both passed"], False
    rate = rates[-1]
    last = last_runs(bench.runs)
    tls, kam = last[(rate, "tls")], last[(rate, "kam")]
    keeper, converter = per_call_ms(tls, "side"), per_call_ms(kam, "side")
    met = keeper < converter
    lines = [
        f"converter side CPU per call at {rate:g} calls/s (highest rate both passed): keeper "
        f"{keeper:.3f} ms, Kamailio converter {converter:.3f} ms (keeper/converter {keeper / converter:.2f})  "
        f"goal {'met' if met else 'missed'} (fewer for the keeper)"
    ]
    lines.append(
        f"  at that rate: sipp {per_call_ms(tls, 'sipp'):.3f} ms/call via the keeper (TLS, unix socket), "
        f"{per_call_ms(kam, 'sipp'):.3f} ms/call via the converter (UDP); SuT "
        f"{per_call_ms(tls, 'sut'):.3f} vs {per_call_ms(kam, 'sut'):.3f} ms/call"
    )
    wrapper = [r.measured["wrapper"] for r in bench.runs if r.config != "kam" and "wrapper" in r.measured]
    if wrapper:
        lines.append(
            f"  (`fdkeeper sipp` wrapper, outside sipp's figure: {sum(wrapper) / len(wrapper):.3f} CPU-s per run)"
        )
    return lines, met


def machine_facts(bench: Bench) -> list[str]:
    import os

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    sipp = command_version([bench.sipp, "-v"], r"SIPp v\S+")
    kamailio = command_version([bench.kamailio.command()[0], "-v"], r"kamailio \S+ \S+")
    return [
        f"nproc {len(os.sched_getaffinity(0))} ({cpu_model()}); load average now {load}",
        f"sipp: {sipp}; kamailio: {kamailio}; python {sys.version.split()[0]}",
        f"SuT: {bench.kamailio.children} UDP + {bench.kamailio.children} TCP/TLS workers, {SHM_MB} MB shm; "
        f"converter: {bench.converter.children} UDP + {bench.converter.children} TCP/TLS workers",
    ]


def kept_line(bench: Bench) -> str:
    try:
        connections = KeeperClient(bench.keeper_dir).status()["connections"]
    except (FdkeeperError, OSError, KeyError) as exc:
        return f"kept connections: keeper status unavailable ({exc})"
    parts = [
        f"{c.get('transport')} {c.get('local')}->{c.get('remote')} {c.get('state')}, {c.get('leases')} leases"
        for c in connections
    ]
    return f"kept connections: {'; '.join(parts) or 'none'}"


def report(bench: Bench, best: dict[str, Run | None], seconds: float) -> None:
    print()
    print(f"result (runs of {bench.duration:g} s, caller scenarios/uac-call.xml, callee {CALLEE} over UDP):")
    print(
        f"  {'configuration':<{WIDTH}} {'top rate':>8} {'calls/s':>8} {'side':<18} {'side ms/call':>12} "
        f"{'%core':>6} {'sipp ms/call':>12} {'SuT ms/call':>11}"
    )
    for config in CONFIGS:
        run = best[config]
        label = f"({config}) {LABELS[config]}"
        if run is None:
            print(f"  {label:<{WIDTH}} no rate passed")
            continue
        print(
            f"  {label:<{WIDTH}} {run.rate:>8g} {run.achieved:>8.1f} {side_name(config):<18} "
            f"{per_call_ms(run, 'side'):>12.3f} {core_share(run):>6.0%} {per_call_ms(run, 'sipp'):>12.3f} "
            f"{per_call_ms(run, 'sut'):>11.3f}"
        )
    line1, _met1 = ratio_line(best, "tls", "tcp", GOAL_TLS_TCP)
    line2, met2 = ratio_line(best, "tls", "kam", GOAL_TLS_KAM)
    cpu_lines, met_cpu = cpu_comparison(bench)
    print(f"  1. {line1}")
    print(f"     (tls)/(tcp) {paired(bench.runs, 'tls', 'tcp')}")
    print(f"  2. {line2}")
    print(f"     (tls)/(kam) {paired(bench.runs, 'tls', 'kam')}")
    for line in cpu_lines:
        print(f"     {line}")
    print(f"     goal 2 {'met' if met2 and met_cpu else 'missed'} (rate >= {GOAL_TLS_KAM:g}x and fewer CPU-s per call)")
    if best["tls"] is not None:
        share = core_share(best["tls"])
        bound = share is not None and share >= PUMP_BOUND
        print(
            f"  keeper at (tls)'s top rate: {share:.0%} of a core"
            f" ({'the TLS pump is the bottleneck' if bound else 'not the bottleneck'})"
        )
    print(f"  {kept_line(bench)}")
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
        duration=4.0,
        quick_duration=2.0,
        step=500.0,
        quick_step=1000.0,
    )
    return resolve_defaults(parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body(bench: Bench, began: float) -> None:
        bench.setup()
        print(
            f"SuT Kamailio on {bench.kamailio.address} (TLS {bench.kamailio.tls_address}); converter on "
            f"{bench.converter.address}; callee {CALLEE} (sipp UAS over UDP) registered; warm-up ok"
        )
        print("side = the converter side: the keeper's CPU for (tcp)/(tls), the converter Kamailio's for (kam)")
        print(table_header(WIDTH, CPU_HEADER), flush=True)
        steps = [float(r) for r in args.steps.split(",") if r.strip()] if args.steps else None
        print(f"-- steps {args.steps}" if steps else f"-- coarse steps of {args.step:g} calls/s", flush=True)
        best = climb(bench, ascents(bench, args.step, args.fine, args.max_rate, steps))
        report(bench, best, time.monotonic() - began)

    return run_bench("cps_tls", args, lambda workdir, sipp: Bench(workdir, sipp, args.duration, args.retries), body)


if __name__ == "__main__":
    sys.exit(main())
