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
"""

from __future__ import annotations

import os
import sys

# Run as a script (python3 bench/cps_ws.py): bench/ is sys.path[0], cpslib is beside us.
import cpslib
from cpsruns import Run, common_rates, last_runs, ms_column, paired, per_call_ms, ratio_line

from fdkeeper import testbed

GOAL_RATE = 0.9  # (wss)/(tls) achieved calls/s, at least
GOAL_CPU = 1.2  # (wss)/(tls) sipp + keeper CPU per call, at most
CONFIGS = ("tls", "wss")
LABELS = {"tls": "fdkeeper -t l1", "wss": "fdkeeper --ws -t l1"}
WIDTH = 25


class Bench(cpslib.KeeperCpuBench):
    CONFIGS = CONFIGS
    LABELS = LABELS
    PROG = "cps_ws"
    WIDTH = WIDTH
    COLUMNS = f"{'sipp ms/c':>9} {'keeper ms/c':>11} {'sum ms/c':>8} {'SuT ms/c':>8}  "

    def sut_options(self) -> dict:
        return {**self.tls_sut(), "websocket": True}

    def options_for(self, config: str) -> tuple[str, ...]:
        return ("--ws", *self.tls_options) if config == "wss" else self.tls_options

    # -- the callers ------------------------------------------------------

    def caller_options(self, config: str, rate: float, duration: float) -> dict:
        return cpslib.caller_options(self, rate, duration, transport="l1")

    def start_caller(self, config: str, name: str, options: dict) -> testbed.SippProcess:
        remote = self.kamailio.wss_address if config == "wss" else self.kamailio.tls_address
        return self.start_kept("uac-call.xml", name, remote=remote, options=self.options_for(config), **options)

    # -- CPU around every run: sipp + keeper is the figure ----------------

    def end_run(self, config: str, token: dict, run: Run) -> dict:
        spent = super().end_run(config, token, run)
        return {**spent, "sum": spent["keeper"] + spent["sipp"]}

    def run_columns(self, run: Run) -> str:
        return (
            " ".join(ms_column(run, key, width) for key, width in (("sipp", 9), ("keeper", 11), ("sum", 8), ("sut", 8)))
            + "  "
        )


# --------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------


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
    connections = cpslib.kept_connections(bench)
    if isinstance(connections, str):
        return [f"kept connections: {connections}"]
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


def report(bench: Bench, best: dict[str, Run | None], seconds: float) -> None:
    cpslib.print_top_rates(bench, best, f"{'sipp+keeper ms/call':>19}", lambda _config, run: ms_column(run, "sum", 19))
    line, _ = ratio_line(best, "wss", "tls", GOAL_RATE)
    print(f"  1. {line}")
    print(f"     (wss)/(tls) {paired(bench.runs, 'wss', 'tls')}")
    cpu_lines, _ = cpu_comparison(bench)
    print(f"  2. {cpu_lines[0]}")
    for extra in cpu_lines[1:]:
        print(f"     {extra}")
    for kept in kept_lines(bench):
        print(f"  {kept}")
    pump = os.environ.get("FDKEEPER_TLS_PUMP", "")
    cpslib.print_footer(bench, seconds, *([f"FDKEEPER_TLS_PUMP={pump}"] if pump else []))


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def banner(bench: Bench) -> list[str]:
    return [
        f"SuT Kamailio on {bench.kamailio.address} (TLS {bench.kamailio.tls_address}, WSS {bench.kamailio.wss_address})"
    ]


def main(argv: list[str] | None = None) -> int:
    return cpslib.cps_main(Bench, cpslib.bench_parser(__doc__, duration=4.0, step=500.0), argv, banner, report)


if __name__ == "__main__":
    sys.exit(main())
