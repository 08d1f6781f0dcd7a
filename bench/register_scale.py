#!/usr/bin/env python3
"""Registering many users over `-t tn` or `-t ln`: plain sipp straight to the SuT against the same run through fdkeeper.

Issue 20's figure: with N users (default 19,000, what fits under a 20,000 open-file limit), (a)
plain sipp registers every user over a new connection of its own (sipp's -t tn) and closes it;
(b) the same command line through `fdkeeper sipp`: the keeper opens one connection per user and
keeps all N. Goal: (b)'s registrations/s (successful REGISTERs / sipp's elapsed time) at least
(a)'s. Then, with the N connections kept:
  * `fdkeeper status --count` (the CLI, its Python start-up included): goal under 1 s;
  * the N connections handed to one server-mode sipp (preload shim), from sipp's start to every
    descriptor in its table (bench/keeper_scale.py's handoff_seconds): goal under 0.2 s;
  * a call to any of them answered by a later run: one server run through fdkeeper (-t tn, handed
    every kept connection) answers calls to 20 random users, placed by plain sipp over UDP
    through Kamailio (scenarios/uac-call-users.xml).

Set-up (loopback, a temp dir, removed at the end):
  * the soft open-file limit of this process raised to its hard limit (inherited by Kamailio, the
    keeper and sipp: N connections on both ends need N descriptors in each);
  * one Kamailio registrar (fdkeeper.testbed.Kamailio): tcp_max_connections N + 600 (capped at
    the open-file limit less 400), open_files_limit tcp_max_connections + 1024 (capped at the
    hard limit), 1 GB of shared memory;
  * scenarios/uac-register.xml over an -inf CSV of N users (SEQUENTIAL), -r RATE -l LIMIT
    -max_socket 4*LIMIT, -recv_timeout 10000 ((a)'s users named usrA..., the same length, so that
    their stale contacts do not fork the sample calls); (a) first, then, once the sockets (a) left in
    TIME_WAIT are gone (they hold local ports of the range the keeper's N take), (b).

--transport ln (TLS, issue 20's 10,000 users; default --users 10000 then): Kamailio listens on TLS
too (a test PKI; tls_max_connections and tcp_max_connections N + 600, 2 GB of shared memory);
(a) is sipp 3.7.7's own TLS (--anchor-sipp, default ../shared/sipp-3.7.7/sipp-tls) registering
--anchor-users users (default 500: its blocking handshake per call keeps it near 5/s, so all N
would take half an hour) over -t ln straight to Kamailio's TLS port, with the PKI's client
certificate; (b) `fdkeeper sipp -t ln` registering all N: the keeper opens (handshakes) and keeps
one TLS connection per user. The figure is handshakes/s (= registrations/s) side by side. A
per-user run holds its users' socketpairs in the keeper until it exits (keeper/pool.py
descriptors_per_connection: 3 a tls user while a run holds it, 1 once idle), so (b) registers in
as many runs (CSV ranges) as the open-file limit needs, said as it goes. No server-mode hand-over
timing over TLS; the calls to 20 users need a server run handed every kept TLS user, 2 more
descriptors each in the keeper while it holds them: where that does not fit, the keeper's own
refusal is printed (and a smaller --users shows the calls).

--keeper-profile FILE runs the keeper under cProfile (its figures are then not the keeper's
own speed); the profile is written when the keeper stops.

    python3 bench/register_scale.py [--users 19000] [--rate 2000] [--limit 1000] [--handoffs 3]
    python3 bench/register_scale.py --transport ln [--users 10000] [--anchor-users 500]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as a script (python3 bench/register_scale.py): bench/ is sys.path[0].
from cps_many_users import time_wait_sockets, user_names
from cpslib import SHM_MB, elapsed_seconds
from keeper_scale import handoff_seconds

from fdkeeper import testbed
from fdkeeper.client import KeeperClient, ensure_keeper
from fdkeeper.demo import start_through_fdkeeper
from fdkeeper.errors import FdkeeperError
from fdkeeper.keeper.pool import IDLE_DESCRIPTORS, RESERVED_DESCRIPTORS, descriptors_per_connection

USERS, RATE, LIMIT = 19000, 2000.0, 1000
TLS_USERS, ANCHOR_USERS, TLS_SHM_MB = 10000, 500, 2048
KEEPER_SLACK = 200  # the keeper's descriptors beyond RESERVED_DESCRIPTORS a chunk leaves free (pidfds, clients)
GOAL_STATUS_S, GOAL_HANDOFF_S = 1.0, 0.2
CALL_SAMPLE = 20  # users called once the registration is kept
CALLER = Path(__file__).resolve().parent.parent / "scenarios" / "uac-call-users.xml"  # To: [field0]@[field1]
SUT_HEADROOM = 600  # Kamailio's connections beyond the users' (the callee, kamcmd, a run's overlap)
SUT_OWN_FILES = 400  # Kamailio's own descriptors (processes' pipes, sockets, logs) under its limit
TIME_WAIT_LEFT = 2000  # at most this many sockets in TIME_WAIT when a registration starts


def raise_soft_limit() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class TlsScaleKamailio(testbed.Kamailio):
    """The registrar with room for N TLS connections: Kamailio's tls_max_connections (default
    2048) beside tcp_max_connections."""

    def __init__(self, workdir: Path, *, tls_max_connections: int, **options: object) -> None:
        super().__init__(workdir, **options)  # type: ignore[arg-type]
        self.tls_max_connections = tls_max_connections

    def config_text(self) -> str:
        return super().config_text() + f"\ntls_max_connections={self.tls_max_connections}\n"


def register(
    start, args: argparse.Namespace, csv: Path, kamailio: testbed.Kamailio, name: str, users: int, extra: list[str]
) -> dict:
    """One registration run of ``users`` users (``csv``); its exit status, successes and registrations/s."""
    wait_for_time_wait()
    began = time.monotonic()
    remote = kamailio.tls_address if args.transport == "ln" else kamailio.address
    # Bounds of the run: sipp 3.7.7's own TLS registers about 5 users a second (a 200 ms sleep in
    # each connect); over tcp 50 a second is far below any rate seen.
    per_user = 0.5 if args.transport == "ln" else 0.02
    process = start(
        "uac-register.xml",
        remote,
        name=name,
        transport=args.transport,
        calls=users,
        rate=args.rate,
        local_ip=kamailio.host,
        timeout=users * per_user + 60,
        trace_messages=False,
        extra=[
            *("-inf", str(csv), "-l", str(args.limit), "-max_socket", str(4 * args.limit), "-recv_timeout", "10000"),
            *extra,
        ],
    )
    result = process.wait(users * per_user + 120)
    wall = time.monotonic() - began
    elapsed = elapsed_seconds(result.stats) if result.stats else wall
    rate = result.successful / elapsed if elapsed else 0.0
    print(
        f"  {name}: exit {result.returncode}, {result.successful} of {users} registered in {elapsed:.1f} s "
        f"sipp elapsed ({wall:.1f} s wall): {rate:.0f} registrations/s",
        flush=True,
    )
    return {"exit": result.returncode, "ok": result.successful, "elapsed": elapsed, "wall": wall, "rate": rate}


def register_in_runs(
    start, args: argparse.Namespace, names: list[str], kamailio: testbed.Kamailio, workdir: Path
) -> dict:
    """(b) over -t ln: every user registered through fdkeeper, in as many runs (CSV ranges) as the
    keeper's open-file limit needs (a run's users hold descriptors_per_connection each until it
    exits, the users kept before it IDLE_DESCRIPTORS each); the runs' figures added up."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    leased = descriptors_per_connection("tls")
    runs, kept, index = [], 0, 0
    while kept < len(names):
        fits = (soft - RESERVED_DESCRIPTORS - KEEPER_SLACK - kept * IDLE_DESCRIPTORS) // leased
        chunk = names[kept : kept + max(fits, 1)]
        csv = testbed.write_users_csv(workdir / f"users-{index}.csv", chunk, kamailio.domain)
        if index == 0 and len(chunk) < len(names):
            print(
                f"  (b) registers in runs of at most {fits} users: {leased} descriptors each in the keeper while a run holds them",
                flush=True,
            )
        runs.append(register(start, args, csv, kamailio, f"b-fdkeeper-{index}", len(chunk), []))
        kept += len(chunk)
        index += 1
    ok, elapsed, wall = (sum(run[key] for run in runs) for key in ("ok", "elapsed", "wall"))
    worst = max((run["exit"] for run in runs), key=abs)
    rate = ok / elapsed if elapsed else 0.0
    if len(runs) > 1:
        print(
            f"  b-fdkeeper: {ok} of {len(names)} registered in {len(runs)} runs, {elapsed:.1f} s sipp elapsed: {rate:.0f} registrations/s",
            flush=True,
        )
    return {"exit": worst, "ok": ok, "elapsed": elapsed, "wall": wall, "rate": rate, "runs": len(runs)}


def wait_for_time_wait() -> None:
    began = time.monotonic()
    while time_wait_sockets() > TIME_WAIT_LEFT and time.monotonic() - began < 65:
        time.sleep(1)


def status_count_seconds(directory: Path) -> tuple[float, str]:
    """`fdkeeper status --count` as a user types it: the CLI's start-up included."""
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "fdkeeper", "status", "--count", "--dir", os.fspath(directory)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return time.monotonic() - began, (done.stdout.strip() or done.stderr.strip())


def start_keeper(directory: Path, profile: str | None, logs: Path) -> subprocess.Popen | None:
    """The keeper, under cProfile when asked (else `fdkeeper sipp` starts it as users do)."""
    if not profile:
        ensure_keeper(directory)
        return None
    log = open(logs / "keeper.log", "wb")  # noqa: SIM115 - the keeper's lifetime
    keeper = subprocess.Popen(
        [sys.executable, "-m", "cProfile", "-o", profile, "-m", "fdkeeper", "keeper", "--dir", os.fspath(directory)],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
    )
    client = KeeperClient(directory)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            client.alive()
            return keeper
        except Exception:  # not listening yet
            time.sleep(0.1)
    raise RuntimeError("the profiled keeper did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=("tn", "ln"), default="tn", help="-t tn (TCP) or -t ln (TLS)")
    parser.add_argument("--users", type=int, help=f"users to register (default {USERS}; {TLS_USERS} over ln)")
    parser.add_argument(
        "--anchor-users",
        type=int,
        default=ANCHOR_USERS,
        help=f"-t ln: users sipp's own TLS registers (default {ANCHOR_USERS})",
    )
    parser.add_argument("--anchor-sipp", help="-t ln: sipp's own TLS (default ../shared/sipp-3.7.7/sipp-tls)")
    parser.add_argument("--rate", type=float, default=RATE, help=f"REGISTERs per second, -r (default {RATE:g})")
    parser.add_argument("--limit", type=int, default=LIMIT, help=f"open REGISTER calls, -l (default {LIMIT})")
    parser.add_argument("--handoffs", type=int, default=3, help="server-mode hand-overs to time (default 3)")
    parser.add_argument("--sipp", default="sipp", help="the sipp binary (default: sipp on PATH)")
    parser.add_argument("--only", choices=("a", "b"), help="run one configuration only")
    parser.add_argument("--keeper-profile", metavar="FILE", help="run the keeper under cProfile, writing FILE")
    args = parser.parse_args()
    tls = args.transport == "ln"
    if args.users is None:
        args.users = TLS_USERS if tls else USERS
    soft, hard = raise_soft_limit()
    workdir = Path(tempfile.mkdtemp(prefix="fdkeeper-register-"))
    logs, keeper_dir = workdir / "logs", workdir / "keeper"
    logs.mkdir()
    tcp_max = min(args.users + SUT_HEADROOM, soft - SUT_OWN_FILES)
    kamailio: testbed.Kamailio
    fdkeeper_options: tuple[str, ...] = ()
    anchor_extra: list[str] = []
    if tls:
        pki = testbed.make_test_pki(workdir / "pki")
        kamailio = TlsScaleKamailio(
            workdir / "kamailio",
            shm_mb=TLS_SHM_MB,
            tcp_max_connections=tcp_max,
            tls_max_connections=tcp_max,
            tls=testbed.KamailioTls.server(pki),
        )
        fdkeeper_options = ("--tls-ca", str(pki.ca_cert), "--tls-sni", pki.server_name)
        anchor_extra = ["-tls_cert", str(pki.client_cert), "-tls_key", str(pki.client_key)]
        anchor_sipp = args.anchor_sipp or str(testbed.sipp_build("sipp-tls"))
    else:
        kamailio = testbed.Kamailio(workdir / "kamailio", shm_mb=SHM_MB, tcp_max_connections=tcp_max)
        anchor_sipp = args.sipp
    keeper = None
    results: dict[str, dict] = {}
    try:
        kamailio.start()
        csv = testbed.write_users_csv(workdir / "users.csv", user_names(args.users), kamailio.domain)
        # (a)'s users are others of the same length: their contacts (ports of connections sipp
        # closed) would otherwise stay registered beside (b)'s and fork the sample calls to them.
        plain_names = [name.replace("user", "usrA", 1) for name in user_names(args.users)]
        plain_csv = testbed.write_users_csv(workdir / "plain-users.csv", plain_names, kamailio.domain)
        tls_said = f", tls_max_connections {tcp_max}, {TLS_SHM_MB} MB shm" if tls else f", {SHM_MB} MB shm"
        print(
            f"register_scale: {args.users} users over -t {args.transport}, -r {args.rate:g} -l {args.limit}; open "
            f"files {soft} (hard {hard}); Kamailio tcp_max_connections {tcp_max}{tls_said}; "
            f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; sipp {shutil.which(args.sipp)}"
            + (f", (a) {anchor_sipp}" if tls else ""),
            flush=True,
        )
        if args.only != "b":

            def plain(scenario: str, remote: str, **options: object) -> testbed.SippProcess:
                return testbed.start_sipp(anchor_sipp, scenario, remote, log_dir=logs, **options)

            anchor_users = min(args.anchor_users, args.users) if tls else args.users
            anchor_csv = (
                plain_csv
                if anchor_users == args.users
                else testbed.write_users_csv(workdir / "anchor-users.csv", plain_names[:anchor_users], kamailio.domain)
            )
            results["a"] = register(plain, args, anchor_csv, kamailio, "a-plain", anchor_users, anchor_extra)
        if args.only != "a":
            keeper = start_keeper(keeper_dir, args.keeper_profile, logs)

            def kept(scenario: str, remote: str, **options: object) -> testbed.SippProcess:
                return start_through_fdkeeper(
                    args.sipp, scenario, remote, directory=keeper_dir, log_dir=logs, options=fdkeeper_options, **options
                )

            if tls:
                results["b"] = register_in_runs(kept, args, user_names(args.users), kamailio, workdir)
            else:
                results["b"] = register(kept, args, csv, kamailio, "b-fdkeeper", args.users, [])
            time.sleep(0.5)
            measure_kept(args, keeper_dir, kamailio, workdir, fdkeeper_options)
        report(results)
    finally:
        if keeper_dir.exists():
            try:
                KeeperClient(keeper_dir).stop()
            except Exception:  # none running
                pass
        if keeper is not None:
            keeper.wait(30)
        kamailio.stop()
        if os.environ.get("KEEP_BENCH_DIR"):
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def measure_kept(
    args: argparse.Namespace, keeper_dir: Path, kamailio: testbed.Kamailio, workdir: Path, options: tuple[str, ...]
) -> None:
    seconds, said = status_count_seconds(keeper_dir)
    verdict = "goal met" if seconds < GOAL_STATUS_S else "goal missed"
    print(f"  fdkeeper status --count: {said} in {seconds:.2f} s (goal under {GOAL_STATUS_S:g} s): {verdict}")
    kept = int(said) if said.isdigit() else args.users
    if args.transport == "ln":
        print(f"  keeper: {keeper_descriptors(keeper_dir)} descriptors open with {kept} TLS users kept", flush=True)
        if server_run_refused(keeper_dir, kamailio):
            return
        call_a_sample(args, keeper_dir, kamailio, workdir, kept, options)
        return
    _host, port = kamailio.address.rsplit(":", 1)
    keeper = KeeperClient(keeper_dir)
    handoffs = [handoff_seconds(keeper, int(port), kept, workdir) for _ in range(args.handoffs)]
    median = statistics.median(handoffs) if handoffs else 0.0
    verdict = "goal met" if median < GOAL_HANDOFF_S else "goal missed"
    print(
        f"  {kept} connections into one server-mode sipp, from its start: median {median * 1000:.0f} ms (runs "
        f"{', '.join(f'{s * 1000:.0f}' for s in handoffs)} ms; goal under {GOAL_HANDOFF_S * 1000:.0f} ms): {verdict}",
        flush=True,
    )
    call_a_sample(args, keeper_dir, kamailio, workdir, kept)


def keeper_descriptors(keeper_dir: Path) -> int:
    pid = int(KeeperClient(keeper_dir).alive().fields["pid"])
    return len(os.listdir(f"/proc/{pid}/fd"))


def server_run_refused(keeper_dir: Path, kamailio: testbed.Kamailio) -> bool:
    """Whether the keeper refuses a server run handed every kept TLS user (their socketpairs would
    not fit under its open-file limit): its line is printed, as the run would show it."""
    host, port = kamailio.tls_address.rsplit(":", 1)
    try:
        KeeperClient(keeper_dir).prepare(role="server", transport="tls", remote=(host, int(port)), local="-")
    except FdkeeperError as refused:
        print(f"  a server run handed every kept user is refused before it starts: {refused}", flush=True)
        return True
    return False


def call_a_sample(
    args: argparse.Namespace,
    keeper_dir: Path,
    kamailio: testbed.Kamailio,
    workdir: Path,
    kept: int,
    options: tuple[str, ...] = (),
):
    """A later run answers any of them: a server run through fdkeeper, handed every kept
    connection, answers calls to a random sample of the users, placed by plain sipp over UDP
    through Kamailio (which reaches each user over that user's kept connection)."""
    names = random.Random(20).sample(user_names(args.users), min(CALL_SAMPLE, args.users))
    csv = testbed.write_users_csv(workdir / "sample.csv", names, kamailio.domain)
    logs = workdir / "logs"
    answer = start_through_fdkeeper(
        args.sipp,
        "uas-answer.xml",
        kamailio.tls_address if args.transport == "ln" else kamailio.address,
        directory=keeper_dir,
        log_dir=logs,
        name="answer",
        options=options,
        transport=args.transport,
        local_ip=kamailio.host,
        local_port=testbed.free_port(),
        calls=len(names),
        timeout=90,
        extra=["-max_socket", str(kept + 500)],
    )
    keeper = KeeperClient(keeper_dir)
    deadline = time.monotonic() + 30
    while keeper.status(state="leased", count=True)["count"] < kept and time.monotonic() < deadline:
        time.sleep(0.1)
    calls = testbed.run_sipp(
        args.sipp,
        CALLER,
        kamailio.address,
        log_dir=logs,
        name="calls",
        wait=90,
        transport="u1",
        local_ip=kamailio.host,
        calls=len(names),
        rate=10,
        timeout=60,
        extra=["-inf", str(csv)],
    )
    answered = answer.wait(90)
    verdict = "ok" if calls.ok and answered.ok and answered.successful == len(names) else "FAILED"
    print(
        f"  calls to {len(names)} random users answered by one later server run: {answered.successful} "
        f"answered, caller {calls.successful} successful, {calls.failed} failed: {verdict}",
        flush=True,
    )


def report(results: dict[str, dict]) -> None:
    if "a" in results and "b" in results and results["a"]["rate"]:
        ratio = results["b"]["rate"] / results["a"]["rate"]
        verdict = "goal met" if ratio >= 1.0 else "goal missed"
        print(
            f"registrations/s: plain sipp {results['a']['rate']:.0f}, through fdkeeper {results['b']['rate']:.0f}: "
            f"b/a {ratio:.2f} (goal at least 1.0): {verdict}"
        )


if __name__ == "__main__":
    sys.exit(main())
