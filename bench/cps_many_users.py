#!/usr/bin/env python3
"""Calls per second with 10,000 registered users: through fdkeeper versus sipp straight to the SuT.

The figure (issue 4): for each configuration, the highest call rate at which one sipp run had no
failed call and kept the rate, and the calls/s achieved in that run (successful calls / sipp's
elapsed time). Goal: ratio (b) / (a) >= 0.95, where the caller is the users themselves, over
TCP one connection per call (`-t tn`), each call's From being user k of the -inf CSV:

    (a) plain sipp -t tn straight to Kamailio: a new TCP connection per call (sipp's own way);
    (b) the same command line through `python3 -m fdkeeper sipp`: each call leaves on user k's
        own kept connection, the one user k registered over.

Set-up (all on loopback, in a temp dir, removed at the end):
  * the open-file limit of this process (inherited by Kamailio, the keeper and sipp) raised to
    what 10,000 connections on both ends need (root may raise the hard limit too);
  * one Kamailio registrar (fdkeeper.testbed.Kamailio) sized for the users' connections plus (a)'s
    short-lived ones: tcp_max_connections, open_files_limit, 1 GB of shared memory;
  * registration: one `fdkeeper sipp -t tn` run of scenarios/uac-register.xml over the users'
    CSV at a high rate (--register-rate, -l): the keeper opens one connection per user and
    keeps all of them; the time it takes and the keeper's resident memory before and after are
    reported, and a sample of users is checked at the registrar (each registered from its own
    kept connection);
  * the callee "bob": a plain sipp UAS over UDP, registered first from its own port (as in
    cps_tcp.py, via bench/cpslib.py);
  * the caller: scenarios/uac-call.xml with its From (and Contact) made sip:[field0]@[field1]
    (written into the temp dir), -inf callers.csv (SEQUENTIAL: a run of N calls is users
    1..N), -t tn, to bob through Kamailio.
The rate search is cps_tcp.py's (bench/cpslib.py): each configuration climbs in coarse steps up
to its first failure, then in fine steps; at every step (a) and (b) run back to back, the first
one alternating; a failed run is retried once. Around every run the bench reads the CPU time of
the keeper, of Kamailio and of the sipp run, and how many TCP connections Kamailio accepted, so
the table shows what was busy and that (b) stayed on the kept connections (no new connection).

Local ports: the users' 10,000 connections and (a)'s per-call ones (60 s in TIME_WAIT after
sipp closes them) share the loopback's ephemeral range (ip_local_port_range). Before a run the
bench waits (up to 60 s) until a free port per call remains; before the registration, until an
earlier run's TIME_WAIT sockets are gone (the keeper's `stop` leaves 10,000 of them).

--alias: Kamailio calls force_tcp_alias() on every request (as SBCs do; testbed option
alias_every_request), and each run's "alias fails" column counts the requests it dropped
because a connection had no room for one more alias (a client naming a new Via port per call).
Issue 16's figure: --users 1000 --steps 300 --duration 10 --alias (3,000 calls, 3 per user).

Usage:  python3 bench/cps_many_users.py               (about 2-3 minutes, + up to 1 after a run)
        python3 bench/cps_many_users.py --quick       (about 1-1.5 minutes)
        python3 bench/cps_many_users.py --users 2000 --steps 200,400 --duration 3
"""

from __future__ import annotations

import argparse
import random
import re
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

# Run as a script (python3 bench/cps_many_users.py): bench/ is sys.path[0], cpslib is beside us.
from cpslib import (
    CALLEE,
    SHM_MB,
    KeeperCpuBench,
    bench_parser,
    caller_options,
    cps_main,
    elapsed_seconds,
    kept_connections,
    print_ab_result,
    print_footer,
)
from cpsruns import Run

from fdkeeper import testbed
from fdkeeper.client import KeeperClient, ensure_keeper

GOAL = 0.95
CONFIGS = ("a", "b")
LABELS = {"a": "plain sipp -t tn", "b": "through fdkeeper"}
WIDTH = 22
USERS = 10000
# Kamailio's room for (a)'s per-call connections on top of the users' kept ones (less when the
# open-file limit is lower): a run keeps at most -l calls (one second's worth) open, and a
# connection sipp closed is gone from Kamailio at once (the TIME_WAIT is on sipp's side).
TCP_HEADROOM = 20000
REGISTER_RATE = 2000  # REGISTERs per second of the registration run (-r)
REGISTER_LIMIT = 1000  # open REGISTER calls at once (-l)
LOCATION_SAMPLE = 20  # users checked at the registrar after the registration
PORT_MARGIN = 2000  # free local ports kept beyond one per call of the next run
PORT_WAIT_S = 60  # TIME_WAIT lasts 60 s: waiting longer would not help
REGISTER_TIME_WAIT = 2000  # at most this many sockets in TIME_WAIT when the registration starts


# --------------------------------------------------------------------------
# the users and the caller's scenario
# --------------------------------------------------------------------------


def user_names(count: int) -> list[str]:
    width = max(4, len(str(count)))
    return [f"user{index:0{width}d}" for index in range(1, count + 1)]


def write_caller_scenario(directory: Path) -> Path:
    """scenarios/uac-call.xml with the caller being user k: From (and Contact) sip:[field0]@[field1].

    The shim leases user k's kept connection by the From URI of the first message on a per-call
    socket (docs/protocol.md "One connection per user"); the R-URI and To stay sip:bob@[domain].
    """
    text = (testbed.SCENARIOS_DIR / "uac-call.xml").read_text()
    text, froms = re.subn(r"From: <sip:caller@\[domain\]>", "From: <sip:[field0]@[field1]>", text)
    text, contacts = re.subn(r"Contact: <sip:caller@\[local_ip\]", "Contact: <sip:[field0]@[local_ip]", text)
    # Every From and Contact (those of the 407's second INVITE too) is user k's, none is left as caller.
    if not (froms and contacts) or re.search(r"(From|Contact): <sip:caller@", text):
        raise RuntimeError(
            "scenarios/uac-call.xml changed: cannot make every From and Contact header the caller user k "
            f"(made {froms} and {contacts}, some left as sip:caller@)"
        )
    text = text.replace('<scenario name="fdkeeper uac call">', '<scenario name="fdkeeper uac call from users">')
    path = directory / "uac-call-from-users.xml"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------
# processes: open files, CPU, memory
# --------------------------------------------------------------------------


def open_files_wanted(users: int) -> int:
    """Kamailio holds the users' connections and (a)'s per-call ones; the keeper the users'."""
    return users + TCP_HEADROOM + 1024


def users_connections(users: int) -> int:
    """Kamailio's tcp_max_connections for ``users`` kept connections and room for per-call ones,
    within the open-file limit (raise_open_file_limit first)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return min(users + TCP_HEADROOM, soft - 1024)


def raise_open_file_limit(users: int) -> tuple[int, int]:
    """Raise this process's RLIMIT_NOFILE (inherited by Kamailio, the keeper and sipp) towards
    open_files_wanted(): the soft limit to the hard one, and the hard one too where that is
    allowed (CAP_SYS_RESOURCE). Each process needs room for the users' connections at least."""
    wanted = open_files_wanted(users)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, nr_open), min(wanted, nr_open)))
        except (ValueError, OSError):
            pass  # not allowed: the hard limit stays
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < min(wanted, hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < users + 2048:
        raise RuntimeError(
            f"the open-file limit is {soft} (hard {hard}): too low for {users} connections "
            f"(Kamailio and the keeper each need {users + 2048} or more); raise the hard "
            "limit (ulimit -Hn, LimitNOFILE=) or pass fewer --users"
        )
    return soft, hard


def process_open_files_limit(pid: int | None) -> int | None:
    """The soft 'Max open files' of a running process."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_bytes(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


def time_wait_sockets() -> int:
    """TCP sockets in TIME_WAIT on this host: (a)'s per-call connections hold a local port for
    60 s after sipp closed them (loopback: only ip_local_port_range's ports minus the users')."""
    count = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as handle:
                next(handle, None)
                count += sum(1 for line in handle if line.split(None, 4)[3] == "06")
        except OSError:
            pass
    return count


def free_local_ports(users: int) -> int:
    """Local ports left for new connections: the ephemeral range minus the users' connections
    and the sockets in TIME_WAIT."""
    low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    return high - low + 1 - users - time_wait_sockets()


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


# --------------------------------------------------------------------------
# the bench
# --------------------------------------------------------------------------


@dataclass
class Bench(KeeperCpuBench):
    """(a) plain sipp -t tn straight to Kamailio, (b) the same through `fdkeeper sipp`, the
    calls coming from the `users` registered (through fdkeeper) before. CPU around every run
    as a share of a core: sipp's is the whole reaped run, the `fdkeeper sipp` wrapper included."""

    CONFIGS = CONFIGS
    LABELS = LABELS
    PROG = "cps_many_users"
    WIDTH = WIDTH
    COLUMNS = f"{'keeper %core':>12} {'SuT %core':>9} {'sipp %core':>10} {'new conns':>9} {'alias fails':>11}  "

    users: int = USERS
    register_rate: float = REGISTER_RATE
    alias: bool = False  # Kamailio aliases every request's Via port to its connection
    facts: dict = field(default_factory=dict)  # what the set-up measured, for the report
    keeper_pid: int | None = None
    pending_calls: int = 0  # calls of the run about to start
    port_waits: list[float] = field(default_factory=list)

    @classmethod
    def from_args(cls, workdir: Path, sipp: str, args: argparse.Namespace) -> Bench:
        options = {"users": args.users, "register_rate": args.register_rate, "alias": args.alias}
        return cls(workdir, sipp, args.duration, args.retries, **options)

    def sut_options(self) -> dict:
        # Before Kamailio exists: its open_files_limit comes from this process's limit.
        self.facts["open_files"] = raise_open_file_limit(self.users)
        return {"tcp_max_connections": users_connections(self.users), "alias_every_request": self.alias}

    # -- set-up -------------------------------------------------------------

    def setup(self) -> None:
        # Not users.csv: cpslib.register_callee writes bob into that one.
        self.users_csv = testbed.write_users_csv(
            self.workdir / "callers.csv", user_names(self.users), self.kamailio.domain
        )
        self.caller_scenario = write_caller_scenario(self.workdir)
        self.kamailio.start()
        limit = process_open_files_limit(self.kamailio.pid)
        self.facts["sut_open_files"] = limit
        if limit is not None and limit < self.users + 1024:
            raise RuntimeError(f"Kamailio's open-file limit is {limit}, too low for {self.users} connections")
        print(
            f"Kamailio on {self.kamailio.address}: tcp_max_connections {self.kamailio.tcp_max_connections}, "
            f"open files {limit}, {SHM_MB} MB shm, {self.kamailio.children} UDP + "
            f"{self.kamailio.children} TCP workers",
            flush=True,
        )
        # The callee first: cpslib's check of its registration dumps the whole location table,
        # which kamcmd cannot return with 10,000 users in it.
        self.start_callee()
        self.register_users()
        self.warm_up()

    def register_users(self) -> None:
        """One `fdkeeper sipp -t tn` run registers every user over a connection of its own."""
        keeper = ensure_keeper(self.keeper_dir)
        self.keeper_pid = int(keeper.status()["keeper"]["pid"])
        self.watch_processes()
        self.facts["keeper_open_files"] = process_open_files_limit(self.keeper_pid)
        time.sleep(0.2)
        rss_before = rss_bytes(self.keeper_pid)
        sut_before = self.sut_connections()
        self.facts["register_time_wait"] = self.wait_for_time_wait()
        print(
            f"registering {self.users} users over -t tn through fdkeeper (-r {self.register_rate:g}, "
            f"-l {REGISTER_LIMIT}) ...",
            flush=True,
        )
        cpu_before = self.cpu_now()
        began = time.monotonic()
        process = self.start_kept(
            "uac-register.xml",
            "register",
            transport="tn",
            calls=self.users,
            rate=self.register_rate,
            timeout=self.users / 50 + 30,
            trace_messages=False,
            extra=[
                "-inf",
                str(self.users_csv),
                "-l",
                str(REGISTER_LIMIT),
                "-max_socket",
                str(4 * REGISTER_LIMIT),
                "-recv_timeout",
                "10000",
            ],
        )
        result = self.wait(process, self.users / 50 + 60)
        wall = time.monotonic() - began
        cpu = {key: value - cpu_before[key] for key, value in self.cpu_now().items()}
        cpu["sipp"] = cpu.pop("children")  # the registration run, its wrapper included
        if not result.ok or result.successful != self.users:
            raise RuntimeError(f"registering {self.users} users failed:\n{result.summary()}")
        elapsed = elapsed_seconds(result.stats)
        time.sleep(0.5)  # the lease ends with the run: the keeper takes every connection back
        status = KeeperClient(self.keeper_dir).status()
        kept = {c["aor"]: c for c in status["connections"] if c.get("aor") and c["state"] != "closed"}
        rss_after = rss_bytes(self.keeper_pid)
        sut_after = self.sut_connections()
        self.facts.update(
            register_wall=wall,
            register_elapsed=elapsed,
            rss_before=rss_before,
            rss_after=rss_after,
            kept=len(kept),
            sut_connections=sut_after,
            register_cpu=cpu,
        )
        print(
            f"  registered {result.successful} users in {wall:.1f} s wall ({elapsed:.1f} s sipp elapsed, "
            f"{result.successful / elapsed:.0f} registrations/s); keeper holds {len(kept)} idle connections, "
            f"Kamailio {sut_before} -> {sut_after} TCP connections; keeper RSS {mib(rss_before)} -> "
            f"{mib(rss_after)}; CPU-s {cpu_text(cpu)}",
            flush=True,
        )
        if len(kept) != self.users:
            raise RuntimeError(f"the keeper holds {len(kept)} user connections, expected {self.users}")
        self.check_location_sample(kept)

    @staticmethod
    def wait_for_time_wait() -> int:
        """A bench that just ended leaves its users' connections in TIME_WAIT (the keeper closed
        them), holding local ports for 60 s: every bind() and connect() then searches longer for
        a free port. Let them go before registering, so the registration time is comparable."""
        waiting = time_wait_sockets()
        if waiting <= REGISTER_TIME_WAIT:
            return waiting
        print(f"waiting for {waiting} TCP sockets in TIME_WAIT (from an earlier run) to end ...", flush=True)
        began = time.monotonic()
        while time_wait_sockets() > REGISTER_TIME_WAIT and time.monotonic() - began < PORT_WAIT_S + 5:
            time.sleep(1)
        return time_wait_sockets()

    def check_location_sample(self, kept: dict[str, dict]) -> None:
        """A random sample of users: each registered from the local port of its own kept connection."""
        names = random.Random(4).sample(user_names(self.users), min(LOCATION_SAMPLE, self.users))
        for name in names:
            aor = f"sip:{name}@{self.kamailio.domain}"
            sources = [c["source"] for c in self.kamailio.location([name])]
            local_port = int(kept[aor]["local"].rsplit(":", 1)[1]) if aor in kept else None
            if [s["port"] for s in sources] != [local_port] or sources[0]["transport"] != "tcp":
                raise RuntimeError(
                    f"{name}: Kamailio's location {sources}, the keeper's connection from port {local_port}"
                )

    def sut_connections(self) -> int | None:
        """Open TCP connections at Kamailio (core.tcp_info 'opened_connections')."""
        return self._rpc_number(("core.tcp_info",), r"opened_connections:\s*(\d+)")

    def sut_accepted(self) -> int | None:
        """TCP connections Kamailio accepted since it started (statistic tcp:passive_open)."""
        return self._rpc_number(("stats.get_statistics", "tcp:"), r"tcp:passive_open\s*=\s*(\d+)")

    def _rpc_number(self, command: tuple[str, ...], pattern: str) -> int | None:
        try:
            match = re.search(pattern, self.kamailio.rpc(*command))
        except RuntimeError:
            return None
        return int(match.group(1)) if match else None

    # -- the callers ---------------------------------------------------------

    def caller_options(self, config: str, rate: float, duration: float) -> dict:
        options = caller_options(self, rate, duration, transport="tn")
        self.pending_calls = options["calls"]
        open_calls = max(100, round(rate))  # cpslib's -l
        options["extra"] += ["-inf", str(self.users_csv), "-max_socket", str(4 * open_calls + 1000)]
        return options

    def start_caller(self, config: str, name: str, options: dict) -> testbed.SippProcess:
        start = self.start_plain if config == "a" else self.start_kept
        return start(self.caller_scenario, name, **options)

    # -- around every run ------------------------------------------------------

    def through_keeper(self, config: str) -> bool:
        return False  # sipp's CPU here is the whole reaped run, the wrapper's start-up included

    def begin_run(self, config: str) -> dict:
        self.wait_for_ports(config)
        return {**self.cpu_now(), "accepted": self.sut_accepted(), "alias_fails": self.alias_failures()}

    def alias_failures(self) -> int | None:
        return self.kamailio.alias_failures() if self.alias else None

    def wait_for_ports(self, config: str) -> None:
        """Every call of (a) takes a local port that stays in TIME_WAIT 60 s, in the same range as
        the users' 10,000: wait until a run of (a) at this rate would find a free port per call,
        so that neither configuration fails for want of ports (an artefact of the loopback set-up)."""
        calls = self.pending_calls
        began = time.monotonic()
        while free_local_ports(self.users) < calls + PORT_MARGIN and time.monotonic() - began < PORT_WAIT_S:
            time.sleep(1)
        waited = time.monotonic() - began
        if waited >= 1:
            self.port_waits.append(waited)

    def end_run(self, config: str, token: dict, run: Run) -> dict:
        return {
            **super().end_run(config, token, run),
            "new_conns": diff(self.sut_accepted(), token["accepted"]),
            "time_wait": time_wait_sockets(),
            "alias_fails": diff(self.alias_failures(), token["alias_fails"]),
        }

    def run_columns(self, run: Run) -> str:
        return run_columns(run)


# --------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------


def cpu_text(cpu: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.1f}" for key, value in cpu.items())


def diff(after: int | None, before: int | None) -> int | None:
    return after - before if after is not None and before is not None else None


def run_columns(run: Run) -> str:
    m = run.measured
    if run.elapsed <= 0 or "keeper" not in m:
        return f"{'-':>12} {'-':>9} {'-':>10} {'-':>9} {'-':>11}  "
    new, fails = m.get("new_conns"), m.get("alias_fails")
    return (
        f"{m['keeper'] / run.elapsed:>12.0%} {m['sut'] / run.elapsed:>9.0%} {m['sipp'] / run.elapsed:>10.0%} "
        f"{(new if new is not None else '?'):>9} {(fails if fails is not None else '-'):>11}  "
    )


def kept_summary(bench: Bench) -> str:
    connections = kept_connections(bench)
    if isinstance(connections, str):
        return connections
    states: dict[str, int] = {}
    for c in connections:
        states[c["state"]] = states.get(c["state"], 0) + 1
    leases = sum(int(c.get("leases") or 0) for c in connections)
    b_runs = [r for r in bench.runs if r.config == "b"]
    calls = sum(r.calls for r in b_runs)
    return (
        f"{len(connections)} kept connections ({', '.join(f'{n} {s}' for s, n in sorted(states.items()))}), "
        f"{leases} leases in all (registration {bench.users}, then {len(b_runs)} measured runs of (b) "
        f"with {calls} calls, plus the warm-up)"
    )


def report(bench: Bench, best: dict[str, Run | None], seconds: float) -> None:
    facts = bench.facts
    print()
    print(
        f"result ({bench.users} users registered, runs of {bench.duration:g} s, caller uac-call.xml from "
        f"user k over -t tn, callee {CALLEE} over UDP):"
    )
    print_ab_result(bench, best, GOAL)
    print(
        f"  registration of {bench.users} users (one `fdkeeper sipp -t tn` run, -r {bench.register_rate:g}): "
        f"{facts['register_wall']:.1f} s wall, {facts['register_elapsed']:.1f} s sipp elapsed "
        f"({bench.users / facts['register_elapsed']:.0f}/s; {facts['register_time_wait']} sockets in TIME_WAIT "
        "at its start)"
    )
    per_conn = (facts["rss_after"] - facts["rss_before"]) / max(1, facts["kept"])
    print(
        f"  keeper RSS with {facts['kept']} kept connections: {mib(facts['rss_after'])} "
        f"({mib(facts['rss_before'])} before registering, {per_conn / 1024:.1f} kB per connection); "
        f"now {mib(rss_bytes(bench.keeper_pid))}"
        if bench.keeper_pid
        else "  keeper RSS: n/a"
    )
    print(f"  {kept_summary(bench)}")
    print(
        f"  Kamailio: {bench.sut_connections()} TCP connections open now; shm "
        f"{shm_used(bench)}; open-file limit {facts.get('sut_open_files')}"
    )
    waits = [r.measured["time_wait"] for r in bench.runs if "time_wait" in r.measured]
    if waits:
        ports = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        print(
            f"  TCP sockets in TIME_WAIT after a run: at most {max(waits)} (local ports {ports[0]}-{ports[1]}, "
            f"{bench.users} of them held by the users' connections); waits for free ports before a run: "
            f"{len(bench.port_waits)} ({sum(bench.port_waits):.0f} s)"
        )
    print_footer(bench, seconds, f"open-file limit of the bench {facts['open_files'][0]}")


def shm_used(bench: Bench) -> str:
    try:
        text = bench.kamailio.rpc("core.shmmem")
    except RuntimeError:
        return "n/a"
    used = re.search(r"real_used:\s*(\d+)", text)
    total = re.search(r"total:\s*(\d+)", text)
    return f"{mib(int(used.group(1)))} of {mib(int(total.group(1)))} used" if used and total else "n/a"


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def command_line() -> argparse.ArgumentParser:
    # Fine steps of step/5 (50 calls/s, --quick 100): fewer fine steps, the run stays short.
    parser = bench_parser(__doc__, duration=4.0, step=250.0, quick_time="about 1-1.5 minutes", fine_divisor=5)
    parser.add_argument("--users", type=int, default=USERS, help=f"registered users, callers (default {USERS})")
    parser.add_argument(
        "--register-rate",
        type=float,
        default=REGISTER_RATE,
        help=f"REGISTERs per second of the registration run (default {REGISTER_RATE})",
    )
    parser.add_argument(
        "--alias",
        action="store_true",
        help="Kamailio aliases every request's Via port to its connection (force_tcp_alias)",
    )
    return parser


def banner(bench: Bench) -> list[str]:
    return [
        "keeper %core: the keeper's CPU over sipp's elapsed time; SuT %core: Kamailio's (all its "
        "processes); new conns: TCP connections Kamailio accepted during the run",
    ]


def main(argv: list[str] | None = None) -> int:
    return cps_main(Bench, command_line(), argv, banner, report)


if __name__ == "__main__":
    sys.exit(main())
