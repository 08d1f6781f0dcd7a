#!/usr/bin/env python3
"""Calls per second and CPU per call over a kept WSS connection, side by side with kept TLS.

The figures (issue 19), for each configuration the highest call rate at which one sipp run had
no failed call and kept the rate, the calls/s achieved there, and the CPU it cost per call:

    (tls) Debian's sipp -t l1 through `fdkeeper sipp` to the SuT's TLS port: the keeper
          terminates TLS and relays plain SIP between sipp's socketpair and the TLS link;
    (wss) the same command with --ws, to the SuT's WSS port: the keeper also makes the HTTP
          Upgrade and frames each SIP message as one masked WebSocket message (RFC 7118).

  1. (wss)/(tls) achieved calls/s at each one's top rate; goal >= 0.9.
  2. CPU per call, sipp (the reaped run minus the `fdkeeper sipp` wrapper's own) plus the
     keeper (psutil user+system over the run), at the highest rate both passed (per-call CPU
     falls as the rate rises); goal (wss)/(tls) <= 1.2. The SuT's CPU is shown for context
     (Kamailio's websocket module costs the SuT too).
The status line says which relay moved the messages of each kept link (relay=pump: the C pump;
python: the keeper's Python relay).

Set-up (all on loopback, in a temp dir, removed at the end): a test PKI; one Kamailio
registrar with UDP, TCP, TLS and WSS listeners (testbed.Kamailio(websocket=True), 1 GB shm);
the callee "bob", a plain sipp UAS over UDP registered from its own port; the caller
scenarios/uac-call.xml (a 200 ms call) in both. The rate search and the pass rule are
bench/cpslib.py's (cps_tcp.py's method), the two configurations interleaved step by step,
their order rotating; a failed run is retried once.

Usage:  python3 bench/cps_ws.py            (about 3 minutes)
        python3 bench/cps_ws.py --quick    (about 1 minute)
        FDKEEPER_TLS_PUMP=0 python3 bench/cps_ws.py --quick   (the keeper's Python relay)
Exit status: 0 when the bench ran (goals met or missed: the output says which), 1 when the
set-up did not work, 130 on Ctrl-C. Everything started is stopped, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

import psutil

# Run as a script (python3 bench/cps_ws.py): bench/ is sys.path[0], the other benches are beside us.
from cps_tls import children_cpu, common_rates, last_runs, paired, per_call_ms, ratio_line, sample_wrapper_cpu
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

GOAL_RATE = 0.9  # (wss)/(tls) achieved calls/s, at least
GOAL_CPU = 1.2  # (wss)/(tls) sipp + keeper CPU per call, at most
CONFIGS = ("tls", "wss")
LABELS = {"tls": "fdkeeper -t l1", "wss": "fdkeeper --ws -t l1"}
WIDTH = 25
CPU_HEADER = f"{'sipp ms/c':>9} {'keeper ms/c':>11} {'sum ms/c':>8} {'SuT ms/c':>8}  "


@dataclass
class Bench(BenchBase):
    CONFIGS = CONFIGS
    LABELS = LABELS
    PROG = "cps_ws"

    keeper: list[psutil.Process] = field(default_factory=list)
    sut_tree: list[psutil.Process] = field(default_factory=list)
    wrapper_cpu: float = 0.0

    def make_sut(self) -> testbed.Kamailio:
        self.pki = make_test_pki(self.workdir / "pki")
        return testbed.Kamailio(
            self.workdir / "kamailio", shm_mb=SHM_MB, tls=testbed.KamailioTls.server(self.pki), websocket=True
        )

    def setup(self) -> None:
        super().setup()  # the SuT, the callee, and a warm-up run of each configuration
        self.sut_tree = process_tree(self.kamailio.pid)
        self.keeper = process_tree(KeeperClient(self.keeper_dir).status()["keeper"]["pid"])[:1]

    def options_for(self, config: str) -> tuple[str, ...]:
        tls = ("--tls-ca", str(self.pki.ca_cert), "--tls-sni", self.pki.server_name)
        return ("--ws", *tls) if config == "wss" else tls

    # -- the callers ------------------------------------------------------

    def caller_options(self, config: str, rate: float, duration: float) -> dict:
        return caller_options(self, rate, duration, transport="l1")

    def start_caller(self, config: str, name: str, options: dict) -> testbed.SippProcess:
        remote = self.kamailio.wss_address if config == "wss" else self.kamailio.tls_address
        return self.start_kept("uac-call.xml", name, remote=remote, options=self.options_for(config), **options)

    # -- CPU around every run ---------------------------------------------

    def begin_run(self, config: str) -> dict:
        return {"keeper": cpu_seconds(self.keeper), "sut": cpu_seconds(self.sut_tree), "children": children_cpu()}

    def wait_caller(self, config: str, process: testbed.SippProcess, timeout: float) -> testbed.SippResult:
        deadline = time.monotonic() + timeout
        self.wrapper_cpu = sample_wrapper_cpu(process, deadline)
        return self.wait(process, max(0.1, deadline - time.monotonic()))

    def end_run(self, config: str, token: dict, run: Run) -> dict:
        keeper = cpu_seconds(self.keeper) - token["keeper"]
        sipp = max(0.0, children_cpu() - token["children"] - self.wrapper_cpu)
        return {
            "keeper": keeper,
            "sipp": sipp,
            "sum": keeper + sipp,
            "sut": cpu_seconds(self.sut_tree) - token["sut"],
            "wrapper": self.wrapper_cpu,
        }

    def format_run(self, run: Run) -> str:
        return format_run(run, self.LABELS[run.config], WIDTH, cpu_columns(run))


# --------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------


def cpu_columns(run: Run) -> str:
    def ms(key: str, width: int) -> str:
        value = per_call_ms(run, key)
        return f"{value:>{width}.3f}" if value is not None else f"{'-':>{width}}"

    return f"{ms('sipp', 9)} {ms('keeper', 11)} {ms('sum', 8)} {ms('sut', 8)}  "


def cpu_comparison(bench: Bench) -> tuple[list[str], bool]:
    """sipp + keeper CPU per call, (wss) over (tls), at the highest rate both passed."""
    rates = common_rates(bench.runs, CONFIGS)
    if not rates:
        return ["CPU per call: no rate where (tls) and (wss) both passed"], False
    rate = rates[-1]
    last = last_runs(bench.runs)
    tls, wss = last[(rate, "tls")], last[(rate, "wss")]
    ratio = per_call_ms(wss, "sum") / per_call_ms(tls, "sum")
    met = ratio <= GOAL_CPU
    lines = [
        f"sipp + keeper CPU per call at {rate:g} calls/s (highest rate both passed): (wss) "
        f"{per_call_ms(wss, 'sum'):.3f} ms, (tls) {per_call_ms(tls, 'sum'):.3f} ms, (wss)/(tls) {ratio:.3f}  "
        f"goal {'met' if met else 'missed'} (<= {GOAL_CPU:g})",
        f"  of it the keeper: (wss) {per_call_ms(wss, 'keeper'):.3f} ms, (tls) {per_call_ms(tls, 'keeper'):.3f} ms; "
        f"sipp: (wss) {per_call_ms(wss, 'sipp'):.3f} ms, (tls) {per_call_ms(tls, 'sipp'):.3f} ms; "
        f"SuT (context): (wss) {per_call_ms(wss, 'sut'):.3f} ms, (tls) {per_call_ms(tls, 'sut'):.3f} ms",
    ]
    sums = sorted(
        per_call_ms(last[(r, "wss")], "sum") / per_call_ms(last[(r, "tls")], "sum")
        for r in rates
        if per_call_ms(last[(r, "tls")], "sum")
    )
    if sums:
        lines.append(
            f"  (wss)/(tls) CPU per call at the {len(sums)} rates both passed: median {sums[len(sums) // 2]:.3f}, "
            f"min {sums[0]:.3f}, max {sums[-1]:.3f}"
        )
    wrapper = [r.measured["wrapper"] for r in bench.runs if "wrapper" in r.measured]
    if wrapper:
        lines.append(
            f"  (`fdkeeper sipp` wrapper, outside sipp's figure: {sum(wrapper) / len(wrapper):.3f} CPU-s per run)"
        )
    return lines, met


def kept_lines(bench: Bench) -> list[str]:
    """Each kept connection: transport, relay (pump or python), leases, the WebSocket's handshake."""
    try:
        connections = KeeperClient(bench.keeper_dir).status()["connections"]
    except (FdkeeperError, OSError, KeyError) as exc:
        return [f"kept connections: keeper status unavailable ({exc})"]
    lines = []
    for connection in connections:
        tls, websocket = connection.get("tls") or {}, connection.get("websocket") or {}
        line = (
            f"kept: {connection.get('transport')} {connection.get('local')}->{connection.get('remote')} "
            f"{connection.get('state')}, {connection.get('leases')} leases, "
            f"relay={websocket.get('relay') or tls.get('relay', '?')}"
        )
        if websocket:
            line += f", path {websocket.get('path')}, protocol {websocket.get('protocol')}"
            line += f", {websocket.get('pings_answered')} pings answered"
        lines.append(line)
    return lines or ["kept connections: none"]


def machine_facts(bench: Bench) -> list[str]:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    sipp = command_version([bench.sipp, "-v"], r"SIPp v\S+")
    kamailio = command_version([bench.kamailio.command()[0], "-v"], r"kamailio \S+ \S+")
    pump = os.environ.get("FDKEEPER_TLS_PUMP", "")
    return [
        f"nproc {len(os.sched_getaffinity(0))} ({cpu_model()}); load average now {load}",
        f"sipp: {sipp}; kamailio: {kamailio}; python {sys.version.split()[0]}"
        + (f"; FDKEEPER_TLS_PUMP={pump}" if pump else ""),
        f"SuT: {bench.kamailio.children} UDP + {bench.kamailio.children} TCP/TLS/WS workers, {SHM_MB} MB shm",
    ]


def report(bench: Bench, best: dict[str, Run | None], seconds: float) -> None:
    print()
    print(f"result (runs of {bench.duration:g} s, caller scenarios/uac-call.xml, callee {CALLEE} over UDP):")
    print(f"  {'configuration':<{WIDTH}} {'top rate':>8} {'calls/s':>8} {'sipp+keeper ms/call':>19}")
    for config in CONFIGS:
        run = best[config]
        label = f"({config}) {LABELS[config]}"
        if run is None:
            print(f"  {label:<{WIDTH}} no rate passed")
            continue
        print(f"  {label:<{WIDTH}} {run.rate:>8g} {run.achieved:>8.1f} {per_call_ms(run, 'sum'):>19.3f}")
    line, _ = ratio_line(best, "wss", "tls", GOAL_RATE)
    print(f"  1. {line}")
    print(f"     (wss)/(tls) {paired(bench.runs, 'wss', 'tls')}")
    cpu_lines, _ = cpu_comparison(bench)
    print(f"  2. {cpu_lines[0]}")
    for extra in cpu_lines[1:]:
        print(f"     {extra}")
    for kept in kept_lines(bench):
        print(f"  {kept}")
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
            f"SuT Kamailio on {bench.kamailio.address} (TLS {bench.kamailio.tls_address}, WSS "
            f"{bench.kamailio.wss_address}); callee {CALLEE} (sipp UAS over UDP) registered; warm-up ok"
        )
        print(table_header(WIDTH, CPU_HEADER), flush=True)
        steps = [float(r) for r in args.steps.split(",") if r.strip()] if args.steps else None
        print(f"-- steps {args.steps}" if steps else f"-- coarse steps of {args.step:g} calls/s", flush=True)
        best = climb(bench, ascents(bench, args.step, args.fine, args.max_rate, steps))
        report(bench, best, time.monotonic() - began)

    return run_bench("cps_ws", args, lambda workdir, sipp: Bench(workdir, sipp, args.duration, args.retries), body)


if __name__ == "__main__":
    sys.exit(main())
