#!/usr/bin/env python3
"""The keeper's CPU per call in a per-call run (`-t tn`), against sipp's own CPU per call.

The figure (issue 20): in bench/cps_many_users.py's set-up (users registered through fdkeeper,
each call from user k over user k's own kept connection), at one rate (default 300 calls/s,
1,000 users, 10 s runs: 3,000 calls, three a user), the keeper's CPU-seconds per call in the
run through fdkeeper (b), over sipp's own CPU-seconds per call in the same run (sipp without
the `fdkeeper sipp` wrapper, whose CPU is sampled and taken out) and in plain sipp's run (a).
Goal: keeper / sipp(b) <= 0.1.

Per call the keeper answers one LEASE (the shim's, at the call's first send: the user's
connection, which the run already holds from its first call to that user after the first
one); for a user's first call in a run the lease is new (a pidfd watched for the run's end).
What is left of a lease's cost: docs in bench/README.md ("percall_cpu").

Method: cps_many_users.py's (Kamailio sized for the users, open-file limits raised, the
registration run, (a) and (b) back to back at each step, the first one alternating); only the
columns differ: CPU in milliseconds per call (user+system, psutil, around each run) of the
keeper, of sipp and of the SuT, and the ratio keeper / sipp.

--transport ln: the same over TLS (`-t ln`; Kamailio's TLS port, the test PKI): users registered
and called through fdkeeper over `-t ln` (b); (a) stays plain sipp `-t tn` (a TCP reference: the
distribution's sipp speaks no TLS), and Kamailio's location sample is not checked.

Usage:  python3 bench/percall_cpu.py                            (about 1 minute)
        python3 bench/percall_cpu.py --users 1000 --steps 10 --duration 30   (10 calls/s)
        python3 bench/percall_cpu.py --transport ln             (-t ln)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Run as a script (python3 bench/percall_cpu.py): bench/ is sys.path[0], cpslib is beside us.
import cps_many_users
from cpslib import cps_main
from cpsruns import Run

from fdkeeper import testbed

GOAL = 0.1  # keeper CPU per call at most this share of sipp's own
USERS = 1000
RATE = 300.0
DURATION = 10.0


@dataclass
class Bench(cps_many_users.Bench):
    """cps_many_users's bench, CPU per call in its columns; sipp's CPU without the wrapper's."""

    PROG = "percall_cpu"
    COLUMNS = f"{'keeper ms/call':>14} {'sipp ms/call':>12} {'SuT ms/call':>11} {'keeper/sipp':>11}  "

    def through_keeper(self, config: str) -> bool:
        return config == "b"  # sample the `fdkeeper sipp` wrapper: sipp's own CPU is what is left

    def run_columns(self, run: Run) -> str:
        m = run.measured
        if run.successful <= 0 or "keeper" not in m:
            return f"{'-':>14} {'-':>12} {'-':>11} {'-':>11}  "
        keeper, sipp, sut = (per_call_ms(m[key], run) for key in ("keeper", "sipp", "sut"))
        ratio = f"{keeper / sipp:.3f}" if sipp > 0 and run.config == "b" else "-"
        return f"{keeper:>14.3f} {sipp:>12.3f} {sut:>11.3f} {ratio:>11}  "

    @classmethod
    def from_args(cls, workdir: Path, sipp: str, args: argparse.Namespace) -> cps_many_users.Bench:
        if args.transport == "ln" and cls is Bench:
            return LnBench.from_args(workdir, sipp, args)
        return super().from_args(workdir, sipp, args)


@dataclass
class LnBench(Bench):
    """--transport ln: the runs through fdkeeper (registration, warm-up, (b)) over `-t ln` to
    Kamailio's TLS port; the keeper terminates TLS and each user's calls go over its kept link."""

    def sut_options(self) -> dict:
        return {**super().sut_options(), **self.tls_sut()}

    def start_kept(  # type: ignore[override]
        self, scenario: str | Path, name: str, remote: str | None = None, sipp: str | None = None, **options: Any
    ) -> testbed.SippProcess:
        options.update(transport="ln", options=self.tls_options)
        return super().start_kept(scenario, name, self.kamailio.tls_address, sipp, **options)

    def check_location_sample(self, kept: dict[str, dict]) -> None:
        pass  # cps_many_users checks a sample's transport is tcp; over ln it is tls


def per_call_ms(cpu_seconds: float, run: Run) -> float:
    return 1000 * cpu_seconds / max(1, run.successful)


def report(bench: Bench, best: dict[str, Run | None], seconds: float) -> None:
    cps_many_users.report(bench, best, seconds)
    b_runs = [r for r in bench.runs if r.config == "b" and r.successful and "keeper" in r.measured]
    a_runs = [r for r in bench.runs if r.config == "a" and r.successful and "sipp" in r.measured]
    if not b_runs:
        print("  no run through fdkeeper to measure")
        return
    keeper = sum(r.measured["keeper"] for r in b_runs) / sum(r.successful for r in b_runs) * 1000
    sipp_b = sum(r.measured["sipp"] for r in b_runs) / sum(r.successful for r in b_runs) * 1000
    line = f"  keeper CPU per call {keeper:.3f} ms; sipp's own through fdkeeper {sipp_b:.3f} ms"
    if a_runs:
        sipp_a = sum(r.measured["sipp"] for r in a_runs) / sum(r.successful for r in a_runs) * 1000
        line += f", plain sipp -t tn {sipp_a:.3f} ms (keeper / plain sipp {keeper / sipp_a:.3f})"
    print(line)
    ratio = keeper / sipp_b if sipp_b > 0 else float("inf")
    verdict = "goal met" if ratio <= GOAL else f"goal missed by {ratio / GOAL:.1f}x"
    print(f"  keeper / sipp CPU per call: {ratio:.3f} ({verdict}; goal <= {GOAL})")


def command_line() -> argparse.ArgumentParser:
    parser = cps_many_users.command_line()
    parser.description = __doc__
    parser.set_defaults(users=USERS, steps=str(int(RATE)), duration=DURATION)
    parser.add_argument("--transport", choices=("tn", "ln"), default="tn", help="per call over TCP (tn) or TLS (ln)")
    return parser


def main(argv: list[str] | None = None) -> int:
    return cps_main(Bench, command_line(), argv, cps_many_users.banner, report)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
