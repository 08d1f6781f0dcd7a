#!/usr/bin/env python3
"""The ptrace handoff mode: what it costs at start-up, and that it costs nothing afterwards.

1. Start-up: one run of a small SIP client (tests/ptrace/sipagent.c, linked dynamically so
   both modes can run it) that connects to the SuT through the kept connection, sends one
   REGISTER, reads the 200 and exits; timed around `fdkeeper exec` in a child Python
   (agent.run_exec: PREPARE, start, handoff, exit), preload and ptrace alternating,
   RUNS each. Figure: median(ptrace) - median(preload). Goal: under 20 ms.
2. Detached: sipp (uac-call.xml, -t t1) through `fdkeeper sipp --mode preload` and
   `--mode ptrace` at the same fixed rates, alternating, each run's calls/s from sipp's own
   stats (bench/cpslib machinery); the ptrace run's sipp is checked to have TracerPid 0 while
   it runs. Figure: median of the paired ratios ptrace/preload. Goal: at least 0.98.

Usage: python3 bench/ptrace_startup.py [--runs 50] [--rates 100,200] [--duration 5] [--pairs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpslib import BenchBase, byte_compile_package, caller_options

from fdkeeper import testbed
from fdkeeper.client import KeeperClient

ROOT = Path(__file__).resolve().parent.parent
STARTUP_GOAL_MS, CPS_GOAL = 20.0, 0.98
# `fdkeeper exec` as a command runs it (a child process: a lease ends with its holder).
# fdkeeper.cli is imported first, as `python3 -m fdkeeper exec` does, so that modules both
# modes need (click, logging, subprocess) are not charged to one of them.
RUN_EXEC = (
    "import sys\nimport fdkeeper.cli\nfrom fdkeeper.agent import ExecOptions, run_exec\n"
    "sys.exit(run_exec({command!r}, ExecOptions(sut={sut!r}, mode={mode!r}, directory={directory!r})))"
)


def startup(workdir: Path, runs: int) -> tuple[float, float]:
    byte_compile_package()
    agent = workdir / "sipagent-dynamic"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(agent), str(ROOT / "tests/ptrace/sipagent.c")], check=True)
    kamailio = testbed.Kamailio(workdir / "kamailio-startup")
    kamailio.start()
    keeper_dir = workdir / "keeper-startup"
    times: dict[str, list[float]] = {"preload": [], "ptrace": []}
    try:
        command = [str(agent), "register", kamailio.host, str(kamailio.port), "alice", kamailio.domain]
        for index in range(runs * 2 + 2):
            mode = ("preload", "ptrace")[index % 2] if (index // 2) % 2 == 0 else ("ptrace", "preload")[index % 2]
            code = RUN_EXEC.format(command=command, sut=kamailio.address, mode=mode, directory=str(keeper_dir))
            began = time.perf_counter()
            status = subprocess.run([sys.executable, "-c", code]).returncode
            elapsed = (time.perf_counter() - began) * 1000
            if status != 0:
                raise RuntimeError(f"the {mode} run exited {status}")
            if index >= 2:  # the first pair opens the connection and warms caches
                times[mode].append(elapsed)
    finally:
        KeeperClient(keeper_dir).stop()
        kamailio.stop()
    return statistics.median(times["preload"]), statistics.median(times["ptrace"])


class Bench(BenchBase):
    CONFIGS = ("preload", "ptrace")
    LABELS: ClassVar[dict[str, str]] = {"preload": "--mode preload", "ptrace": "--mode ptrace"}
    PROG = "ptrace_startup"

    def start_caller(self, config: str, name: str, options: dict) -> testbed.SippProcess:
        process = self.start_kept("uac-call.xml", name, options=("--mode", config), **options)
        if config == "ptrace":
            threading.Thread(target=self._check_detached, args=(process,), daemon=True).start()
        return process

    def caller_options(self, config: str, rate: float, duration: float) -> dict:
        return caller_options(self, rate, duration)

    tracer_pids: ClassVar[list[int]] = []

    def _check_detached(self, process: testbed.SippProcess) -> None:
        """One second in, the traced sipp (the runner's child) must have no tracer."""
        time.sleep(1.0)
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
        for child in children.read_text().split() if children.exists() else ():
            status = Path(f"/proc/{child}/status").read_text()
            Bench.tracer_pids.append(
                int(next(line for line in status.splitlines() if line.startswith("TracerPid:")).split()[1])
            )


def cps(workdir: Path, rates: list[float], duration: float, pairs: int) -> list[float]:
    bench = Bench(workdir=workdir, sipp=testbed.find_sipp(), duration=duration, retries=0)
    ratios = []
    try:
        bench.setup()
        for rate in rates:
            for pair in range(pairs):
                order = bench.CONFIGS if pair % 2 == 0 else bench.CONFIGS[::-1]
                runs = {config: bench.call(config, rate, name=f"{config}-{rate:g}-{pair}")[0] for config in order}
                for config in bench.CONFIGS:
                    run = runs[config]
                    print(f"  rate {rate:g}/s {config:8} {run.achieved:8.1f} calls/s  {run.verdict}", flush=True)
                if all(r.all_answered for r in runs.values()):
                    ratios.append(runs["ptrace"].achieved / runs["preload"].achieved)
    finally:
        bench.close()
    return ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--rates", default="100,300")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fdkeeper-ptrace-bench-") as tmp:
        workdir = Path(tmp)
        preload, ptrace = startup(workdir, args.runs)
        extra = ptrace - preload
        print(
            f"start-up, median of {args.runs}: preload {preload:.1f} ms, ptrace {ptrace:.1f} ms, "
            f"extra {extra:.1f} ms (goal under {STARTUP_GOAL_MS:g} ms: {'met' if extra < STARTUP_GOAL_MS else 'MISSED'})"
        )
        if not args.pairs:
            return 0
        ratios = cps(workdir, [float(r) for r in args.rates.split(",")], args.duration, args.pairs)
        if ratios:
            ratio = statistics.median(ratios)
            print(
                f"calls/s ptrace/preload, median of {len(ratios)} paired runs: {ratio:.3f} "
                f"(goal at least {CPS_GOAL}: {'met' if ratio >= CPS_GOAL else 'MISSED'})"
            )
        print(f"TracerPid of ptrace-mode sipp one second into its run: {sorted(set(Bench.tracer_pids))} (0: detached)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
