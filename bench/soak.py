#!/usr/bin/env python3
"""Soak: the keeper under everything at once for a bounded time (issue 10).

One keeper, for ``--seconds`` (default 120), all at once:
- leases: worker processes fork one short-lived "run" per lease (``--leases``, default
  10,000, spread evenly over the run), each leasing its user's kept TCP connection (`-t tn`
  style, one per AoR, with reconnect) and reading the requests the SuT queued on it; a share of
  runs is SIGKILLed right after the lease (nothing read);
- a SuT that sends a numbered request on every connection every 50 ms and restarts (closes
  every connection, listens again) every ``--restart-every`` seconds;
- a TLS SuT that never reads, and runs writing as fast as they can to it (the keeper must push
  back, not buffer);
- idle control clients (connected, silent; reopened when the keeper closes them) and abusive
  ones (garbage, oversized packets, STATUS requests whose replies are never read).

Measured, goal flat within 10 % from start to end:
- the keeper's RSS and descriptor count, sampled every second under the load: "start" is the
  median of the second 10 % of the run (the first 10 % is warm-up: connections opening, the
  non-reading SuT's socket buffers filling), "end" the median of the last 10 %;
- lease latency (the LEASE exchange as a run sees it), median. Under the load it is printed for
  the same two windows, but it follows whatever else runs on the machine (on 2 shared cores it
  moved from -60 % to +200 % between runs while the keeper's CPU, PING round trip and own time
  per LEASE stayed flat), so it is also measured with no load, one run at a time over every
  user, before and after the soak, and after it side by side: the soaked keeper and a fresh
  one taking turns, seeing the same machine. The side-by-side figure is the one judged.
Lost requests: when the load stops, every user's connection is leased once more and drained;
every request the SuT wrote (to a connection a keeper held) must have reached a run. Goal: zero.

``--series 10`` prints every figure per 10 s, to see a trend; FDKEEPER_DEBUG_SIZES=5 in the
environment makes the keeper log its structures' sizes every 5 s (fdkeeper/keeper/diagnostics.py).

    python3 bench/soak.py [--seconds 120] [--leases 10000] [--users 40] [--restart-every 20] [--series S]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import pickle
import random
import re
import signal
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import itertools

from fdkeeper.client import KeeperClient, ensure_keeper
from fdkeeper.statedir import connect_control_socket
from fdkeeper.testbed.pki import make_test_pki

REQUEST = (
    b"OPTIONS sip:soak@bench.test SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1;branch=z9hG4bK%010d\r\n"
    b"Max-Forwards: 70\r\nFrom: <sip:sut@bench.test>;tag=1\r\nTo: <sip:soak@bench.test>\r\n"
    b"Call-ID: soak-%010d\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
)
REQUEST_SIZE = len(REQUEST % (0, 0))
SEQ = re.compile(rb"Call-ID: soak-(\d{10})")
KILLED_SHARE = 0.05
IDLE_CLIENTS, WORKERS = 60, 4
PROBE_ROUNDS = 6  # quiet probe: 1 warm-up round + 5 measured rounds over every user


# --------------------------------------------------------------------------- the SuTs (a child process)


def listener(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    return sock


def run_suts(
    numbered_listener: socket.socket,
    tls_listener: socket.socket,
    cert: str,
    key: str,
    restart_every: float,
    stop,
    sent_out,
) -> None:
    """The numbering SuT and the non-reading TLS SuT, on listeners the bench opened."""
    sent: list[int] = []

    async def main() -> None:
        counter = iter(range(10**9))
        writers: set[asyncio.StreamWriter] = set()

        async def numbered(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.add(writer)
            try:
                while await reader.read(65536):
                    pass
            except OSError:
                pass
            writers.discard(writer)

        async def silent(_reader, writer) -> None:
            await asyncio.sleep(10**6)  # never reads: asyncio stops reading once its buffer is full

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        await asyncio.start_server(silent, sock=tls_listener, ssl=context)
        port = numbered_listener.getsockname()[1]
        sock = numbered_listener
        next_restart = time.monotonic() + restart_every
        while not stop.is_set():
            server = await asyncio.start_server(numbered, sock=sock)
            while not stop.is_set() and time.monotonic() < next_restart:
                for writer in list(writers):
                    if writer.transport.get_write_buffer_size() == 0 and not writer.is_closing():
                        seq = next(counter)
                        writer.write(REQUEST % (seq, seq))
                        sent.append(seq)
                await asyncio.sleep(0.05)
            server.close()
            if stop.is_set():
                break
            for writer in list(writers):  # the restart: every connection closed (FIN)
                writer.close()
            writers.clear()
            await asyncio.sleep(0.5)
            sock = listener(port)
            next_restart = time.monotonic() + restart_every

    loop = asyncio.new_event_loop()
    task = loop.create_task(main())
    loop.run_until_complete(task)
    sent_out.send(sent)


# --------------------------------------------------------------------------- runs


def drain(fd: int, idle: float) -> list[int]:
    """Whole requests readable on ``fd`` until it stays quiet ``idle`` seconds."""
    sock = socket.socket(fileno=fd)
    sock.settimeout(idle)
    data = b""
    try:
        while chunk := sock.recv(1 << 20):
            data += chunk
    except (TimeoutError, OSError):
        pass
    finally:
        sock.detach()
    return [int(n) for n in SEQ.findall(data)]


def one_run(keeper: KeeperClient, port: int, user: str, report, kill: bool, idle: float, kind: str = "lease") -> None:
    """A forked run: lease, maybe die at once, else read what is queued, report, exit."""
    started = time.monotonic()
    try:
        [(_, fd)] = keeper.lease(
            role="client", transport="tcp", remote=("127.0.0.1", port), local="-", aor=user, reconnect=True
        )
    except Exception as error:
        report.send(("error", str(error)[:200]))
        os._exit(0)
    latency = time.monotonic() - started
    if kill:
        report.send((kind, latency, [], "killed"))
        os.kill(os.getpid(), signal.SIGKILL)
    report.send((kind, latency, drain(fd, idle)))
    os._exit(0)


def quiet_probe(
    keepers: list[tuple[KeeperClient, str]], port: int, users: list[str], report, rounds: int = PROBE_ROUNDS
) -> None:
    """No load: rounds of one run per user and keeper, one at a time, keepers taking turns (so
    that all see the same machine); the first round (it may open connections) is "warm"."""
    for round_ in range(rounds):
        for user in users:
            for keeper, name in keepers:
                pid = os.fork()
                if pid == 0:
                    one_run(keeper, port, user, report, False, 0.002, name if round_ else "warm")
                os.waitpid(pid, 0)


def lease_worker(directory: Path, port: int, users: list[str], deadline: float, budget: int, report) -> None:
    keeper = KeeperClient(directory)
    rng = random.Random(os.getpid())
    begin = time.monotonic()
    spacing = (deadline - begin) / max(budget, 1)  # the budget spread over the whole run
    for index in range(budget):
        if time.monotonic() > deadline:
            break
        time.sleep(max(0.0, begin + index * spacing - time.monotonic()))
        # Drawn here, not in the child: a child's draw never advances this generator, and every
        # run of a worker whose first draw was a kill would be killed.
        kill = rng.random() < KILLED_SHARE
        pid = os.fork()
        if pid == 0:
            one_run(keeper, port, users[index % len(users)], report, kill, 0.005)
        os.waitpid(pid, 0)


def flood_worker(directory: Path, tls_port: int, deadline: float, leases_done, report) -> None:
    """Runs that write as fast as they can to the TLS SuT that never reads (until the leases end)."""
    keeper = KeeperClient(directory)
    body = b"x" * 4000
    message = (
        b"MESSAGE sip:sut@bench.test SIP/2.0\r\nVia: SIP/2.0/TLS 127.0.0.1;branch=z9hG4bKflood\r\n"
        b"Max-Forwards: 70\r\nFrom: <sip:flood@bench.test>;tag=1\r\nTo: <sip:sut@bench.test>\r\n"
        b"Call-ID: flood\r\nCSeq: 1 MESSAGE\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    chunk = message * 16  # whole SIP messages: the keeper relays them (it drops what is not SIP)
    while time.monotonic() < deadline and not leases_done.is_set():
        pid = os.fork()
        if pid == 0:
            try:
                [(_, fd)] = keeper.lease(
                    role="client",
                    transport="tls",
                    remote=("127.0.0.1", tls_port),
                    local="-",
                    aor="sip:flood@bench.test",
                    tls_insecure=True,
                    reconnect=True,
                )
                os.set_blocking(fd, False)
                written, until = 0, time.monotonic() + 0.5
                while time.monotonic() < until and written < 64 << 20:
                    try:
                        written += os.write(fd, chunk)
                    except BlockingIOError:
                        time.sleep(0.01)
                report.send(("flood", written))
            except Exception as error:
                report.send(("error", "flood: " + str(error)[:200]))
            os._exit(0)
        os.waitpid(pid, 0)
        time.sleep(0.5)


# --------------------------------------------------------------------------- control clients


def idle_clients(keeper: KeeperClient, stop: threading.Event, closed: list[int]) -> None:
    """Silent control clients; count the ones the keeper closes, open new ones in their place."""
    held: list[socket.socket] = []
    while not stop.is_set():
        for sock in list(held):
            try:
                if sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b"":
                    raise ConnectionResetError
            except BlockingIOError:
                continue
            except OSError:
                pass
            held.remove(sock)
            sock.close()
            closed[0] += 1
        while len(held) < IDLE_CLIENTS and not stop.is_set():
            try:
                held.append(connect_control_socket(keeper.path, 2.0))
            except OSError:
                break
        stop.wait(0.5)
    for sock in held:
        sock.close()


def abusive_clients(keeper: KeeperClient, stop: threading.Event, sent: list[int]) -> None:
    """Garbage, oversized packets, and STATUS requests whose replies are never read."""
    rng = random.Random(7)
    payloads = [
        b"LEASE role=client transport=tcp remote=" + b"9" * 5000,
        bytes(rng.randrange(256) for _ in range(300)),
        b"STATUS",
        b"PREPARE role=client",
        b"\n\n\n",
        b"LEASE " + b"x=" * 2000,
        b"STATUS",
    ]
    unread: list[socket.socket] = []
    while not stop.is_set():
        try:
            sock = connect_control_socket(keeper.path, 2.0)
            sock.send(rng.choice(payloads))
            sent[0] += 1
            unread.append(sock)  # never read; closed a second later
        except OSError:
            pass
        if len(unread) > 20:
            unread.pop(0).close()
        stop.wait(0.02)
    for sock in unread:
        sock.close()


# --------------------------------------------------------------------------- measuring


def sample_keeper(pid: int, keeper: KeeperClient, stop: threading.Event, samples: list[tuple]) -> None:
    """Every second: RSS, descriptors, CPU seconds used, and a PING's round trip."""
    process = psutil.Process(pid)
    while not stop.wait(1.0):
        started = time.monotonic()
        try:
            keeper.alive()
        except Exception:
            continue
        ping = time.monotonic() - started
        cpu = process.cpu_times()
        samples.append((time.monotonic(), process.memory_info().rss, process.num_fds(), cpu.user + cpu.system, ping))


def window(values: list[tuple[float, float]], start: float, end: float) -> list[float]:
    return [v for t, v in values if start <= t <= end]


def change(before: float, after: float) -> str:
    return f"{(after - before) / before * 100:+.1f} %" if before else "n/a"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--leases", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--restart-every", type=float, default=20.0)
    parser.add_argument(
        "--series",
        type=float,
        default=0,
        metavar="SECONDS",
        help="also print the figures per SECONDS-long slice of the run (to see a trend)",
    )
    options = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="fdk-soak-"))
    directory = workdir / "state"
    pki = make_test_pki(workdir / "pki")
    numbered_listener, tls_listener = listener(), listener()
    port, tls_port = numbered_listener.getsockname()[1], tls_listener.getsockname()[1]
    stop_sut = multiprocessing.Event()
    sent_in, sent_out = multiprocessing.Pipe(duplex=False)
    sut = multiprocessing.Process(
        target=run_suts,
        args=(
            numbered_listener,
            tls_listener,
            str(pki.server_cert),
            str(pki.server_key),
            options.restart_every,
            stop_sut,
            sent_out,
        ),
        daemon=True,
    )
    sut.start()
    numbered_listener.close()
    tls_listener.close()
    time.sleep(0.5)
    keeper = ensure_keeper(directory)
    keeper_pid = int(keeper.alive().fields["pid"])
    users = [f"sip:soak{i}@bench.test" for i in range(options.users)]
    report_in, report_out = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    reporter = _Reporter(report_out)
    leases: list[tuple[float, float]] = []
    probes: dict[str, list[tuple[float, float]]] = {"before": [], "after": [], "fresh": []}
    received: list[int] = []
    errors: dict[str, int] = {}
    tally = {"flooded": 0, "killed": 0}
    collector = threading.Thread(
        target=_collect, args=(report_in, leases, probes, received, errors, tally), daemon=True
    )
    collector.start()
    quiet_probe([(keeper, "before")], port, users, reporter)  # the keeper before the soak, nothing else running
    load_before = os.getloadavg()[0]
    psutil.cpu_percent()  # starts the machine's busy-time count

    begin = time.monotonic()
    deadline = begin + options.seconds
    stop = threading.Event()
    samples: list[tuple] = []
    idle_closed, abusive_sent = [0], [0]
    threads = [
        threading.Thread(target=sample_keeper, args=(keeper_pid, keeper, stop, samples), daemon=True),
        threading.Thread(target=idle_clients, args=(keeper, stop, idle_closed), daemon=True),
        threading.Thread(target=abusive_clients, args=(keeper, stop, abusive_sent), daemon=True),
    ]
    for thread in threads:
        thread.start()
    workers = []
    for index in range(WORKERS):
        mine = users[index::WORKERS]
        workers.append(
            multiprocessing.Process(
                target=lease_worker, args=(directory, port, mine, deadline, options.leases // WORKERS, reporter)
            )
        )
    leases_done = multiprocessing.Event()
    flooder = multiprocessing.Process(target=flood_worker, args=(directory, tls_port, deadline, leases_done, reporter))
    workers.append(flooder)
    for worker in workers:
        worker.start()

    for worker in workers[:-1]:
        worker.join()
    leases_done.set()
    flooder.join()
    lease_count = len(leases)
    load_end = time.monotonic()  # the deadline, or earlier when the lease budget ran out
    stop.set()  # the control clients and the sampling end with the load
    for thread in threads:
        thread.join(5)
    time.sleep(0.5)  # the last runs' lease ends reach the keeper
    # After the soak, nothing else running: the soaked keeper side by side with a fresh one.
    fresh = ensure_keeper(workdir / "fresh")
    quiet_probe([(keeper, "after"), (fresh, "fresh")], port, users, reporter)

    # The SuT stops writing; every user's connection (of both keepers) is leased once more and drained.
    stop_sut.set()
    time.sleep(0.5)
    for user in users:
        for each in (keeper, fresh):
            pid = os.fork()
            if pid == 0:
                one_run(each, port, user, reporter, False, 0.15)
            os.waitpid(pid, 0)
    time.sleep(0.3)
    sent = sent_in.recv()
    end = time.monotonic()
    status = keeper.status()
    keeper.stop()
    fresh.stop()
    report_out.close()
    collector.join(5)

    duration = load_end - begin
    start_window, end_window = (begin + 0.1 * duration, begin + 0.2 * duration), (load_end - 0.1 * duration, load_end)
    rss = [(s[0], s[1]) for s in samples]
    fds = [(s[0], s[2]) for s in samples]
    pings = [(s[0], s[4]) for s in samples]
    cpu = [(b[0], (b[3] - a[3]) / (b[0] - a[0])) for a, b in itertools.pairwise(samples)]
    lease_lat = leases[:lease_count]  # not the drain's
    results = {
        "rss_start": median(window(rss, *start_window)),
        "rss_end": median(window(rss, *end_window)),
        "fds_start": median(window(fds, *start_window)),
        "fds_end": median(window(fds, *end_window)),
        "lat_start": median(window(lease_lat, *start_window)),
        "lat_end": median(window(lease_lat, *end_window)),
        "probe_before": median([v for _, v in probes["before"]]),
        "probe_after": median([v for _, v in probes["after"]]),
        "probe_fresh": median([v for _, v in probes["fresh"]]),
        "ping_start": median(window(pings, *start_window)),
        "ping_end": median(window(pings, *end_window)),
        "cpu_start": median(window(cpu, *start_window)),
        "cpu_end": median(window(cpu, *end_window)),
        "rate_start": len(window(lease_lat, *start_window)) / (start_window[1] - start_window[0]),
        "rate_end": len(window(lease_lat, *end_window)) / (end_window[1] - end_window[0]),
    }
    lost = sorted(set(sent) - set(received))
    if options.series:
        _print_series(options.series, begin, load_end, rss, fds, lease_lat, pings, cpu)
    print(
        f"soak: {duration:.0f} s of load ({end - begin:.0f} s with the drain), {lease_count} leases ({tally['killed']} "
        f"SIGKILLed, {errors.get('lease', 0)} refused or failed), SuT restarts every {options.restart_every:g} s, "
        f"{IDLE_CLIENTS} idle control clients ({idle_closed[0]} closed by the keeper), "
        f"{abusive_sent[0]} abusive control requests, {tally['flooded'] / 1e6:.1f} MB written towards a non-reading TLS SuT"
    )
    print(
        f"  keeper RSS   start {results['rss_start'] / 1e6:7.1f} MB   end {results['rss_end'] / 1e6:7.1f} MB   "
        f"{change(results['rss_start'], results['rss_end'])}"
    )
    print(
        f"  keeper fds   start {results['fds_start']:7.0f}      end {results['fds_end']:7.0f}      "
        f"{change(results['fds_start'], results['fds_end'])}"
    )
    print(
        f"  lease, loaded start {results['lat_start'] * 1000:6.2f} ms   end {results['lat_end'] * 1000:7.2f} ms   "
        f"{change(results['lat_start'], results['lat_end'])}   (median under the load: follows the machine's load)"
    )
    print(
        f"  lease, quiet  start {results['probe_before'] * 1000:6.2f} ms   end {results['probe_after'] * 1000:7.2f} ms   "
        f"{change(results['probe_before'], results['probe_after'])}   (median, no load, one run at a time)"
    )
    print(
        f"  lease, side by side: fresh keeper {results['probe_fresh'] * 1000:.2f} ms, soaked keeper {results['probe_after'] * 1000:.2f} ms "
        f"  {change(results['probe_fresh'], results['probe_after'])}   (the same, after the soak, taking turns: judged)"
    )
    print(
        f"  (context) PING round trip start {results['ping_start'] * 1000:.2f} ms end {results['ping_end'] * 1000:.2f} ms; "
        f"keeper CPU start {results['cpu_start'] * 100:.0f} % end {results['cpu_end'] * 100:.0f} %; "
        f"leases/s start {results['rate_start']:.0f} end {results['rate_end']:.0f}; machine: {os.cpu_count()} CPUs, "
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, {psutil.cpu_percent():.0f} % busy during the run"
    )
    print(
        f"  requests: {len(sent)} written by the SuT, {len(set(received))} reached a run, {len(lost)} lost"
        + (f" (first: {lost[:5]})" if lost else "")
        + f"; duplicates {len(received) - len(set(received))}"
    )
    log_size = (directory / "keeper.log").stat().st_size
    print(
        f"  keeper.log: {log_size / 1e6:.1f} MB; keeper status at the end: {len(status['connections'])} connections; errors seen by runs: "
        + (", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) or "none")
    )
    results["side_by_side_start"], results["side_by_side_end"] = results["probe_fresh"], results["probe_after"]
    flat = all(
        abs(results[f"{k}_end"] - results[f"{k}_start"]) <= 0.1 * results[f"{k}_start"]
        for k in ("rss", "fds", "side_by_side")
    )
    print(
        f"  goals: flat within 10 %: {'met' if flat else 'MISSED'}; zero lost requests: {'met' if not lost else 'MISSED'}"
    )
    sut.terminate()
    return 0


def _print_series(step: float, begin: float, end: float, rss, fds, leases, pings, cpu) -> None:
    print(
        f"  {'from s':>6} {'RSS MB':>7} {'fds':>5} {'leases':>6} {'lease ms':>8} {'p90 ms':>7} {'PING ms':>7} {'CPU %':>5}"
    )
    at = begin
    while at < end:
        lat = sorted(window(leases, at, at + step))
        p90 = lat[int(0.9 * (len(lat) - 1))] if lat else float("nan")
        print(
            f"  {at - begin:6.0f} {median(window(rss, at, at + step)) / 1e6:7.1f} {median(window(fds, at, at + step)):5.0f} "
            f"{len(lat):6d} {median(lat) * 1000:8.2f} {p90 * 1000:7.2f} {median(window(pings, at, at + step)) * 1000:7.2f} "
            f"{median(window(cpu, at, at + step)) * 100:5.0f}"
        )
        at += step


class _Reporter:
    """What runs send to the bench, over a socket the forked workers and runs inherit."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, item: tuple) -> None:
        try:
            self.sock.send(pickle.dumps((time.monotonic(), item)))
        except OSError:
            pass


def _collect(sock: socket.socket, leases, probes, received, errors, tally) -> None:
    while True:
        try:
            data = sock.recv(1 << 22)
        except OSError:
            return
        if not data:
            return
        when, item = pickle.loads(data)
        if item[0] == "lease":
            leases.append((when, item[1]))
            received.extend(item[2])
            tally["killed"] += item[3:] == ("killed",)
        elif item[0] in probes or item[0] == "warm":
            probes.get(item[0], []).append((when, item[1]))
            received.extend(item[2])
        elif item[0] == "flood":
            tally["flooded"] += item[1]
        else:
            kind = "lease" if "flood" not in item[1] else "flood"
            errors[kind] = errors.get(kind, 0) + 1
            errors[item[1][:60]] = errors.get(item[1][:60], 0) + 1


if __name__ == "__main__":
    multiprocessing.set_start_method("fork")
    sys.exit(main())
