#!/usr/bin/env python3
"""fdkeeper's UDP <-> TCP/TLS converter versus a Kamailio stateless converter, same load, same run.

The figures (issue 5), for every load (OPTIONS transactions; full calls) and transport (UDP->TCP,
UDP->TLS), and for each converter:
  * the highest rate at which one sipp run had no failed transaction and kept the rate, and the
    transactions/s achieved in that run (successful / sipp's elapsed time);
  * CPU-seconds per transaction of the converter: psutil user+system over the run, of the
    `fdkeeper convert` process, or summed over the Kamailio converter's whole process tree.
Goal: fdkeeper >= 1.0x Kamailio's rate at no more CPU per transaction (compared at the highest
rate both passed: CPU per transaction falls as the rate rises, more messages per wake-up).

Set-up (loopback, a temp dir removed at the end): a test PKI; one Kamailio SuT with UDP, TCP and
TLS listeners (1 GB shm); four converters started once and kept for the whole bench, all facing
that one live SuT (never a refused port: Kamailio's TLS converter aborts then):
  (fdk) `fdkeeper convert` UDP->TCP and UDP->TLS;
  (kam) fdkeeper.testbed.KamailioConverter UDP->TCP and UDP->TLS (2 UDP + 2 TCP/TLS workers).
Loads, sipp over UDP to the converter's UDP address:
  options: an OPTIONS to the SuT answered 200 by the SuT itself (2 messages through the converter);
  calls:   scenarios/uac-call.xml to "bob", a plain sipp UAS registered at the SuT over UDP (the SuT
           relays to bob directly; INVITE/100/200/ACK/BYE/200 go through the converter).
Every rate of a ladder runs both converters back to back, the first one alternating; a failed
run is retried once; a converter's first failure ends its climb. "Failed" is a failed
transaction, a non-zero exit, or a rate not kept (< 95 % of the ideal transactions/s).

Usage:  python3 bench/converter.py             (about 6 minutes)
        python3 bench/converter.py --quick     (about 2 minutes)
        python3 bench/converter.py --loads options --transports tcp --options-rates 8000,10000
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from cpslib import RECV_TIMEOUT_MS, SHM_MB, command_version, cpu_model, elapsed_seconds, write_uas_scenario
from cpsruns import CALL_PAUSE_S, KEEP_FRACTION

from fdkeeper import testbed
from fdkeeper.convert import control_request
from fdkeeper.testbed.pki import make_test_pki

CALLEE = "bob"
OPTIONS_SCENARIO = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="OPTIONS to the SuT">
  <send retrans="500"><![CDATA[

      OPTIONS sip:[sut] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      Max-Forwards: 70
      From: <sip:bench@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[sut]>
      Call-ID: [call_id]
      CSeq: 1 OPTIONS
      Content-Length: 0

  ]]></send>
  <recv response="200"/>
</scenario>
"""
LADDERS = {
    "options": [4000, 6000, 8000, 9000, 10000, 11000, 12000, 14000],
    "calls": [200, 400, 600, 800, 1000, 1200, 1400],
}
QUICK_LADDERS = {"options": [6000, 9000, 10000, 12000], "calls": [400, 800, 1200]}
CONFIGS = ("fdk", "kam")
LABELS = {"fdk": "fdkeeper convert", "kam": "Kamailio converter"}


@dataclass
class Run:
    load: str
    transport: str
    config: str
    rate: float
    count: int
    successful: int
    failed: int
    elapsed: float
    returncode: int | None
    cpu: float
    retry: bool = False

    @property
    def achieved(self) -> float:
        return self.successful / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def ideal(self) -> float:
        pause = CALL_PAUSE_S if self.load == "calls" else 0.0
        return self.count / (self.count / self.rate + pause)

    @property
    def passed(self) -> bool:
        return (
            self.returncode == 0
            and self.failed == 0
            and self.successful == self.count
            and self.achieved >= KEEP_FRACTION * self.ideal
        )

    @property
    def cpu_per_tx_us(self) -> float:
        return self.cpu / self.successful * 1e6 if self.successful else float("nan")

    def line(self) -> str:
        verdict = ("retry: " if self.retry else "") + (
            "ok"
            if self.passed
            else f"FAILED ({self.failed} failed, {self.successful}/{self.count}, exit {self.returncode}, "
            f"{self.achieved:.0f}/s of ideal {self.ideal:.0f}/s)"
        )
        return (
            f"{self.load:<8}{self.transport:<5}{self.rate:>7g}  {LABELS[self.config]:<20}{self.successful:>7}"
            f"{self.failed:>7}{self.elapsed:>9.3f}{self.achieved:>9.0f}{self.cpu:>8.2f}{self.cpu_per_tx_us:>9.1f}  {verdict}"
        )


HEADER = (
    f"{'load':<8}{'tr':<5}{'rate':>7}  {'converter':<20}{'ok':>7}{'failed':>7}{'elapsed':>9}{'tx/s':>9}"
    f"{'cpu s':>8}{'us/tx':>9}  verdict"
)


class Bench:
    def __init__(self, workdir: Path, sipp: str, duration: float) -> None:
        self.workdir, self.sipp, self.duration = workdir, sipp, duration
        self.logs = workdir / "logs"
        self.pki = make_test_pki(workdir / "pki")
        self.kamailio = testbed.Kamailio(workdir / "sut", tls=testbed.KamailioTls.server(self.pki), shm_mb=SHM_MB)
        self.kams: dict[str, testbed.KamailioConverter] = {}
        self.fdks: dict[str, subprocess.Popen] = {}
        self.listen: dict[tuple[str, str], str] = {}
        self.uas: testbed.SippProcess | None = None
        self.runs: list[Run] = []

    # -- set-up and clean-up

    def setup(self, transports: list[str], loads: list[str]) -> None:
        self.kamailio.start()
        for transport in transports:
            kam = testbed.KamailioConverter.for_sut(
                self.workdir / f"kam-{transport}",
                self.kamailio,
                transport,
                tls=testbed.KamailioTls.client(self.pki) if transport == "tls" else None,
            )
            kam.start()
            self.kams[transport] = kam
            self.listen[("kam", transport)] = kam.address
            control = self.workdir / f"fdk-{transport}.sock"
            target = self.kamailio.tls_address if transport == "tls" else self.kamailio.address
            self.fdks[transport] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fdkeeper",
                    "convert",
                    "--listen",
                    "127.0.0.1:0",
                    "--sut",
                    target,
                    "--transport",
                    transport,
                    "--control",
                    str(control),
                    "--log-level",
                    "warning",
                    "--tls-ca",
                    str(self.pki.ca_cert),
                ],
                stderr=open(self.workdir / f"fdk-{transport}.log", "wb"),  # noqa: SIM115 - the child writes it
                start_new_session=True,
            )
            self.listen[("fdk", transport)] = testbed.wait_until(
                lambda control=control: self._status(control), 10, what=f"fdkeeper convert ({transport})"
            )["listen"]
        if "calls" in loads:
            port = testbed.free_port()
            users = testbed.write_users_csv(self.workdir / "bob.csv", [CALLEE], self.kamailio.domain)
            registered = testbed.run_sipp(
                self.sipp,
                "uac-register.xml",
                self.kamailio.address,
                log_dir=self.logs,
                name="register-bob",
                transport="u1",
                local_port=port,
                calls=1,
                timeout=10,
                extra=["-inf", str(users)],
            )
            if not registered.ok:
                raise RuntimeError(f"registering {CALLEE} failed:\n{registered.summary()}")
            self.uas = testbed.start_sipp(
                self.sipp,
                write_uas_scenario(self.workdir),
                self.kamailio.address,
                log_dir=self.logs,
                name="uas",
                transport="u1",
                local_port=port,
                calls=None,
                trace_messages=False,
            )
        (self.workdir / "options.xml").write_text(OPTIONS_SCENARIO)

    @staticmethod
    def _status(control: Path) -> dict | None:
        try:
            return control_request(control, "STATUS", timeout=1)
        except OSError:
            return None

    def close(self) -> None:
        if self.uas is not None:
            self.uas.terminate(grace=3)
        for process in self.fdks.values():
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
        for kam in self.kams.values():
            kam.stop()
        self.kamailio.stop()

    # -- one run

    def processes(self, config: str, transport: str) -> list[psutil.Process]:
        if config == "fdk":
            return [psutil.Process(self.fdks[transport].pid)]
        main = psutil.Process(self.kams[transport].pid)
        return [main, *main.children(recursive=True)]

    @staticmethod
    def cpu(processes: list[psutil.Process]) -> float:
        total = 0.0
        for process in processes:
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
        return total

    def run(self, load: str, transport: str, config: str, rate: float, duration: float | None = None) -> Run:
        count = max(1, round(rate * (duration or self.duration)))
        if load == "options":
            scenario, extra = self.workdir / "options.xml", ["-key", "sut", self.kamailio.address]
        else:
            scenario, extra = "uac-call.xml", ["-s", CALLEE, "-key", "domain", self.kamailio.domain]
        extra += ["-l", str(max(100, round(rate))), "-recv_timeout", str(RECV_TIMEOUT_MS)]
        processes = self.processes(config, transport)
        before = self.cpu(processes)
        result = testbed.run_sipp(
            self.sipp,
            scenario,
            self.listen[(config, transport)],
            log_dir=self.logs,
            name=f"{load}-{transport}-{config}-{rate:g}-{time.monotonic_ns()}",
            wait=count / rate * 3 + 40,
            transport="u1",
            calls=count,
            rate=rate,
            timeout=count / rate * 3 + 10,
            trace_messages=False,
            extra=extra,
        )
        cpu = self.cpu(processes) - before
        time.sleep(0.5)
        return Run(
            load,
            transport,
            config,
            rate,
            count,
            result.successful,
            result.failed,
            elapsed_seconds(result.stats),
            result.returncode,
            cpu,
        )

    def measure(self, load: str, transport: str, config: str, rate: float) -> Run:
        for attempt in range(2):
            run = self.run(load, transport, config, rate)
            run.retry = attempt > 0
            self.runs.append(run)
            print(run.line(), flush=True)
            if run.passed:
                break
        return run

    def climb(self, load: str, transport: str, ladder: list[float]) -> dict[str, Run | None]:
        for config in CONFIGS:  # warm-up: both converters and the SuT see traffic before measuring
            self.run(load, transport, config, ladder[0] / 2, duration=1)
        best: dict[str, Run | None] = dict.fromkeys(CONFIGS)
        climbing = list(CONFIGS)
        for step, rate in enumerate(ladder):
            if not climbing:
                break
            order = climbing if step % 2 == 0 else climbing[::-1]
            for config in list(order):
                run = self.measure(load, transport, config, rate)
                if run.passed:
                    best[config] = run
                else:
                    climbing.remove(config)
        return best


def summary(bench: Bench, load: str, transport: str, best: dict[str, Run | None]) -> list[str]:
    unit = "OPTIONS/s" if load == "options" else "calls/s"
    lines = [f"{load} UDP->{transport.upper()}:"]
    for config in CONFIGS:
        run = best[config]
        lines.append(
            f"  {LABELS[config]:<20} "
            + (
                f"highest rate passed {run.rate:g}, achieved {run.achieved:.0f} {unit}, "
                f"{run.cpu_per_tx_us:.1f} CPU-us per transaction"
                if run
                else "no rate passed"
            )
        )
    if best["fdk"] and best["kam"]:
        ratio = best["fdk"].achieved / best["kam"].achieved
        common = [r for r in bench.runs if r.load == load and r.transport == transport and r.passed]
        rates = {r.rate for r in common if r.config == "fdk"} & {r.rate for r in common if r.config == "kam"}
        if rates:
            top = max(rates)
            cpu = {c: [r for r in common if r.rate == top and r.config == c][-1].cpu_per_tx_us for c in CONFIGS}
            cpu_text = (
                f"at {top:g}/s (highest both passed) CPU per transaction fdk {cpu['fdk']:.1f} us, "
                f"kam {cpu['kam']:.1f} us, ratio {cpu['fdk'] / cpu['kam']:.2f}"
            )
        else:
            cpu, cpu_text = None, "no rate both passed"
        # Both capped by the ladder at the same step: the rates are equal (the ratio is then noise).
        rate_ok = best["fdk"].rate >= best["kam"].rate
        verdict = "goal met" if rate_ok and cpu and cpu["fdk"] <= cpu["kam"] else "goal missed"
        lines.append(
            f"  highest rate fdk {best['fdk'].rate:g} vs kam {best['kam'].rate:g}, achieved ratio {ratio:.3f}; "
            f"{cpu_text}; {verdict}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 s runs and a short ladder")
    parser.add_argument("--duration", type=float, help="seconds per run (default 4; --quick 2)")
    parser.add_argument("--loads", default="options,calls")
    parser.add_argument("--transports", default="tcp,tls")
    parser.add_argument("--options-rates", help="comma-separated OPTIONS/s ladder")
    parser.add_argument("--calls-rates", help="comma-separated calls/s ladder")
    parser.add_argument("--sipp")
    parser.add_argument("--keep-files", action="store_true")
    args = parser.parse_args(argv)
    loads, transports = args.loads.split(","), args.transports.split(",")
    ladders = dict(QUICK_LADDERS if args.quick else LADDERS)
    for load, given in (("options", args.options_rates), ("calls", args.calls_rates)):
        if given:
            ladders[load] = [float(r) for r in given.split(",")]
    try:
        sipp = testbed.find_sipp(args.sipp)
    except RuntimeError as error:
        print(f"converter bench: {error}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    workdir = Path(tempfile.mkdtemp(prefix="fdkeeper-conv-"))
    bench = Bench(workdir, sipp, args.duration or (2.0 if args.quick else 4.0))
    began = time.monotonic()
    results = []
    try:
        bench.setup(transports, loads)
        print(HEADER, flush=True)
        for load in loads:
            for transport in transports:
                results.append((load, transport, bench.climb(load, transport, ladders[load])))
        print()
        for load, transport, best in results:
            print("\n".join(summary(bench, load, transport, best)))
        load_avg = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"nproc {len(os.sched_getaffinity(0))} ({cpu_model()}); load average now {load_avg}")
        print(
            f"sipp: {command_version([sipp, '-v'], r'SIPp v[^ ]+')}; "
            f"kamailio: {command_version([bench.kamailio.command()[0], '-v'], r'kamailio [^ ]+ [^ ]+')}; "
            f"python {sys.version.split()[0]}; bench time {time.monotonic() - began:.0f} s"
        )
        return 0
    except RuntimeError as error:
        print(f"converter bench: set-up failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("converter bench: interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        bench.close()
        if args.keep_files:
            print(f"files kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
