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
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import psutil

# Run as a script (python3 bench/cps_tls.py): bench/ is sys.path[0], cpslib is beside us.
from cpslib import (
    KeeperCpuBench,
    bench_parser,
    caller_options,
    cps_main,
    kept_connections,
    print_footer,
    print_top_rates,
    process_tree,
)
from cpsruns import Run, common_rates, last_runs, ms_column, paired, per_call_ms, ratio_line

from fdkeeper import testbed

GOAL_TLS_TCP = 0.9
GOAL_TLS_KAM = 1.0
CONFIGS = ("tcp", "tls", "kam")
LABELS = {"tcp": "fdkeeper -t t1", "tls": "fdkeeper -t l1", "kam": "UDP->Kamailio->TLS"}
WIDTH = 25
# The keeper counts as the bottleneck when it uses this share of one core during a run.
PUMP_BOUND = 0.85


@dataclass
class Bench(KeeperCpuBench):
    CONFIGS = CONFIGS
    LABELS = LABELS
    PROG = "cps_tls"
    WIDTH = WIDTH
    COLUMNS = f"{'side ms/c':>9} {'side %core':>10} {'sipp ms/c':>9} {'SuT ms/c':>8}  "

    converter: testbed.KamailioConverter | None = None
    converter_tree: list[psutil.Process] = field(default_factory=list)

    def sut_options(self) -> dict:
        return self.tls_sut()

    def setup(self) -> None:
        self.kamailio.start()
        self.converter = testbed.KamailioConverter.for_sut(
            self.workdir / "converter", self.kamailio, "tls", tls=testbed.KamailioTls.client(self.pki)
        )
        self.converter.start()
        self.start_callee()
        self.warm_up()
        self.converter_tree = process_tree(self.converter.pid)
        self.watch_processes()

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

    def through_keeper(self, config: str) -> bool:
        return config != "kam"

    def watched(self) -> dict[str, list[psutil.Process]]:
        return {**super().watched(), "converter": self.converter_tree}

    def end_run(self, config: str, token: dict, run: Run) -> dict:
        spent = super().end_run(config, token, run)
        # the converter side of this configuration
        return {**spent, "side": spent["converter"] if config == "kam" else spent["keeper"]}

    def run_columns(self, run: Run) -> str:
        share = f"{core_share(run):.0%}" if core_share(run) is not None else "-"
        return f"{ms_column(run, 'side', 9)} {share:>10} {ms_column(run, 'sipp', 9)} {ms_column(run, 'sut', 8)}  "


# --------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------


def core_share(run: Run) -> float | None:
    if "side" not in run.measured or run.elapsed <= 0:
        return None
    return run.measured["side"] / run.elapsed


def side_name(config: str) -> str:
    return "Kamailio converter" if config == "kam" else "keeper"


def top_rate_columns(config: str, run: Run) -> str:
    return (
        f"{side_name(config):<18} {ms_column(run, 'side', 12)} {core_share(run):>6.0%} "
        f"{ms_column(run, 'sipp', 12)} {ms_column(run, 'sut', 11)}"
    )


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


def kept_line(bench: Bench) -> str:
    connections = kept_connections(bench)
    if isinstance(connections, str):
        return f"kept connections: {connections}"
    parts = [
        f"{c.get('transport')} {c.get('local')}->{c.get('remote')} {c.get('state')}, {c.get('leases')} leases"
        for c in connections
    ]
    return f"kept connections: {'; '.join(parts) or 'none'}"


def report(bench: Bench, best: dict[str, Run | None], seconds: float) -> None:
    header = f"{'side':<18} {'side ms/call':>12} {'%core':>6} {'sipp ms/call':>12} {'SuT ms/call':>11}"
    print_top_rates(bench, best, header, top_rate_columns)
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
    workers = bench.converter.children
    print_footer(bench, seconds, f"converter: {workers} UDP + {workers} TCP/TLS workers")


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def banner(bench: Bench) -> list[str]:
    return [
        f"SuT Kamailio on {bench.kamailio.address} (TLS {bench.kamailio.tls_address}); converter on "
        f"{bench.converter.address}",
        "side = the converter side: the keeper's CPU for (tcp)/(tls), the converter Kamailio's for (kam)",
    ]


def main(argv: list[str] | None = None) -> int:
    return cps_main(Bench, bench_parser(__doc__, duration=4.0, step=500.0), argv, banner, report)


if __name__ == "__main__":
    sys.exit(main())
