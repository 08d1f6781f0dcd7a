"""The keeper under fault and abuse: out of descriptors, flooded or stalled control sockets,
a SIGKILLed keeper. Real keeper processes over their real control socket; plain TCP peers.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from fdkeeper.client import KeeperClient, ensure_keeper
from fdkeeper.errors import FdkeeperError
from fdkeeper.keeper.control import MAX_CLIENTS
from fdkeeper.statedir import DIED_NAME, RECORD_NAME
from fdkeeper.testbed import free_port, wait_until
from tests.support.keeper import keeper_process, limit_with_free_slots


def idle_clients(client: KeeperClient, count: int) -> list[socket.socket]:
    """Connections that send nothing, as an attacker (or a stuck script) would leave them."""
    sockets = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.setblocking(False)
        try:
            sock.connect(str(client.path))
        except BlockingIOError:
            pass  # backlog full: counts all the same
        sockets.append(sock)
    return sockets


def fdkeeper(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fdkeeper", *args], capture_output=True, text=True, timeout=30)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fdkeeper: "), result.stderr
    return lines[0]


# ---------------------------------------------------------------- item 2: EMFILE


def refusal_for_lack_of_descriptors(keeper: KeeperClient, hogs: list[socket.socket]) -> FdkeeperError | None:
    """PING once: the ERR limit refusal, or None (served in a slot still free, or slow to answer
    on a loaded machine) after adding idle clients to fill the slots for the next try."""
    try:
        keeper.request(b"PING", timeout=5)
    except FdkeeperError as error:
        if error.code == "limit":
            return error
    except OSError:
        pass  # reset by a keeper that could not take us either: ask again
    hogs += idle_clients(keeper, 5)
    return None


def served_again(keeper: KeeperClient) -> bool:
    """alive(), with a refusal for lack of descriptors meaning "not yet" (alive() raises it)."""
    try:
        return bool(keeper.alive())
    except FdkeeperError as error:
        if error.code == "limit":
            return False
        raise


def test_out_of_descriptors_refuses_politely_and_the_keeper_lives(keeper, peer):
    keeper.prepare(role="client", transport="tcp", remote=peer.getsockname(), local="-")
    process = keeper_process(keeper)
    limit = process.num_fds() + 3
    subprocess.run(["prlimit", f"--pid={process.pid}", f"--nofile={limit}:"], check=True)
    hogs = idle_clients(keeper, 20)  # more than the keeper can accept
    try:
        # Retried, not asked once: on a loaded machine the keeper may not have taken the hogs yet.
        refused = wait_until(lambda: refusal_for_lack_of_descriptors(keeper, hogs), timeout=30, what="ERR limit")
        assert "open files" in str(refused) and " -1 " not in str(refused)
        assert f"all {limit} descriptors" in str(refused) or "descriptors, its RLIMIT_NOFILE is" in str(refused)
        assert process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    finally:
        for sock in hogs:
            sock.close()
    wait_until(lambda: served_again(keeper), timeout=30)  # idle clients gone: served again
    assert len(keeper.status()["connections"]) == 1  # the kept connection survived
    assert "refusing" in (keeper.directory / "keeper.log").read_text()


def test_the_emfile_line_counts_descriptors_even_with_none_left_to_count_them():
    # The listing of /proc/self/fd needs a descriptor: with none left it said "holds -1".
    script = """
import errno, os, resource
from fdkeeper.keeper.control import limit_error
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
held = []
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError as error:
    print(limit_error("accept a control client", error))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True)
    line = result.stdout.strip()
    assert "(it holds all 64 descriptors its RLIMIT_NOFILE allows)" in line and "-1" not in line, line


def test_a_lease_that_needs_a_descriptor_the_keeper_lacks_is_refused_in_one_line(keeper, peer):
    remote = peer.getsockname()
    keeper.prepare(role="client", transport="tcp", remote=remote, local="-")
    process = keeper_process(keeper)
    time.sleep(0.3)  # the keeper closes the PREPARE's control connection: count without it
    limit = limit_with_free_slots(process, 1)  # room for the control client, none for the holder's pidfd
    subprocess.run(["prlimit", f"--pid={process.pid}", f"--nofile={limit}:"], check=True)
    with pytest.raises(FdkeeperError) as refused:
        keeper.lease(role="client", transport="tcp", remote=remote, local="-")
    assert refused.value.code == "limit" and "open files" in str(refused.value)
    subprocess.run(["prlimit", f"--pid={process.pid}", f"--nofile={limit + 50}:"], check=True)
    [(_, fd)] = keeper.lease(role="client", transport="tcp", remote=remote, local="-")
    os.close(fd)


def test_a_connection_the_keeper_lacks_a_descriptor_for_is_refused_and_can_be_asked_again(keeper, peer):
    remote = peer.getsockname()
    process = keeper_process(keeper)
    time.sleep(0.3)  # the keeper closes its starter's PING connection: count without it
    limit = limit_with_free_slots(process, 1)  # room for the control client, none for the new socket
    subprocess.run(["prlimit", f"--pid={process.pid}", f"--nofile={limit}:"], check=True)
    with pytest.raises(FdkeeperError) as refused:
        keeper.prepare(role="client", transport="tcp", remote=remote, local="-")
    assert refused.value.code == "limit" and "open files" in str(refused.value)
    subprocess.run(["prlimit", f"--pid={process.pid}", f"--nofile={limit + 50}:"], check=True)
    assert keeper.prepare(role="client", transport="tcp", remote=remote, local="-").fields["ids"] == "1"


# ---------------------------------------------------------------- item 6: control-socket abuse


def test_idle_clients_beyond_the_cap_do_not_lock_status_stop_or_sipp_out(keeper, peer, tmp_path):
    hogs = idle_clients(keeper, MAX_CLIENTS + 100)
    try:
        time.sleep(1.2)  # idle long enough to make room for real requests
        status = fdkeeper("status", "--dir", str(keeper.directory), "--json")
        assert status.returncode == 0, status.stderr
        ensure_keeper(keeper.directory)  # what 'fdkeeper sipp' does first: no second keeper, no advice to stop
        keeper.prepare(role="client", transport="tcp", remote=peer.getsockname(), local="-")
        stop = fdkeeper("stop", "--dir", str(keeper.directory))
        assert stop.returncode == 0 and "keeper for" in stop.stdout and "no keeper was running" not in stop.stdout
    finally:
        for sock in hogs:
            sock.close()


def test_a_keeper_that_does_not_answer_is_named_not_denied(keeper):
    process = keeper_process(keeper)
    process.suspend()  # the worst a flood could do: nothing is answered at all
    impatient = KeeperClient(keeper.directory, timeout=1)
    try:
        with pytest.raises(FdkeeperError, match=f"pid {process.pid}.* did not answer within 1 s") as status:
            impatient.status()
        assert status.value.code == "timeout"
        with pytest.raises(FdkeeperError, match="did not answer"):  # not "no keeper was running"
            impatient.stop()
        with pytest.raises(FdkeeperError, match="did not answer") as started:
            ensure_keeper(keeper.directory)  # 'fdkeeper sipp': no second keeper, no "run fdkeeper stop"
        assert "fdkeeper stop" not in str(started.value)
    finally:
        process.resume()
    assert keeper.alive()


def test_clients_that_never_read_their_replies_do_not_freeze_the_keeper(keeper, peer):
    remote = peer.getsockname()
    keeper.prepare(role="client", transport="tcp", remote=remote, local="-")
    deaf = []
    for _ in range(4):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(str(keeper.path))
        sock.setblocking(False)
        try:
            for _ in range(5000):  # far more replies than a socket buffer holds; none read
                sock.send(b"STATUS")
        except BlockingIOError:
            pass
        deaf.append(sock)
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            keeper.lease(role="client", transport="tcp", remote=remote, local="-")
            os._exit(0)
        except BaseException:
            os._exit(1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert time.monotonic() - started < 1.0
    control = keeper.status()["keeper"]["control"]
    assert control["clients"] <= len(deaf) + 1
    for sock in deaf:
        sock.close()


# ---------------------------------------------------------------- item 9: a dead keeper speaks


def test_a_sigkilled_keeper_is_reported_once_with_its_connections(tmp_path, peer, capsys):
    directory = tmp_path / "state"
    client = ensure_keeper(directory)
    client.prepare(role="client", transport="tcp", remote=peer.getsockname(), local="-")
    process = keeper_process(client)
    wait_until(lambda: '"connections": 1' in (directory / RECORD_NAME).read_text(), timeout=5)
    process.kill()
    process.wait(5)
    capsys.readouterr()
    status = one_line_error(fdkeeper("status", "--dir", str(directory)))  # status says why there is none...
    assert f"(pid {process.pid}, started" in status and "died" in status and "no keeper runs now" in status
    client = ensure_keeper(directory)  # ...and so does the next run, which starts a fresh one
    notice = capsys.readouterr().err
    try:
        assert f"previous keeper for {directory} (pid {process.pid}, started" in notice
        assert "1 kept connection(s) closed with it" in notice and "registrations" in notice
        assert (directory / DIED_NAME).exists()
        client.report_dead_keeper()
        assert capsys.readouterr().err == ""  # said once
    finally:
        client.stop()
    assert not (directory / RECORD_NAME).exists()  # a clean stop leaves nothing to report


# ---------------------------------------------------------------- keeper --replace


def start_replacement(directory: Path) -> subprocess.Popen:
    log = open(directory / "replace.log", "ab")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        [sys.executable, "-m", "fdkeeper", "keeper", "--dir", str(directory), "--replace"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log,
        start_new_session=True,
    )


def answering_pid(client: KeeperClient) -> int | None:
    reply = client.alive()
    return int(reply.fields["pid"]) if reply else None


def test_replace_hands_the_kept_connection_to_the_successor(keeper, peer):
    remote = peer.getsockname()
    keeper.prepare(role="client", transport="tcp", remote=remote, local="-")
    sut_side, _ = peer.accept()
    before = keeper.status()["connections"][0]
    old_pid = answering_pid(keeper)
    successor = start_replacement(keeper.directory)
    wait_until(lambda: answering_pid(keeper) not in (None, old_pid), timeout=15, what="the successor")
    wait_until(
        lambda: not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE,
        timeout=5,
        what="the old keeper's exit",
    )
    [after] = keeper.status()["connections"]
    assert (after["id"], after["local"], after["state"]) == (before["id"], before["local"], "idle")
    sut_side.settimeout(0.2)
    with pytest.raises(TimeoutError):
        sut_side.recv(10)  # no FIN: the connection never closed
    pid = os.fork()
    if pid == 0:
        try:
            [(_, fd)] = keeper.lease(role="client", transport="tcp", remote=remote, local="-")
            os.write(fd, b"still here")
            os._exit(0)
        except BaseException:
            os._exit(1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    sut_side.settimeout(5)
    assert sut_side.recv(100) == b"still here"
    keeper.stop()
    successor.wait(10)


def test_replace_is_refused_while_a_run_holds_a_lease(keeper, peer):
    remote = peer.getsockname()
    keeper.prepare(role="client", transport="tcp", remote=remote, local="-")
    leased = keeper.lease(role="client", transport="tcp", remote=remote, local="-")  # this process holds it
    successor = start_replacement(keeper.directory)
    assert successor.wait(15) != 0
    assert "leased" in (keeper.directory / "replace.log").read_text()
    assert keeper.alive()
    for _, fd in leased:
        os.close(fd)


def test_replace_keeps_the_registration_a_call_still_reaches_it(sipp_path, kamailio, keeper_dir, tmp_path):
    """Register over a kept TCP connection, replace the keeper, answer a call: Kamailio reaches the
    user only over the REGISTER's connection, so the call proves the same connection moved."""
    from fdkeeper import testbed
    from fdkeeper.demo import start_through_fdkeeper

    users = testbed.write_users_csv(tmp_path / "users.csv", ["alice"], kamailio.domain)

    def start(name, scenario, **options):
        return start_through_fdkeeper(
            sipp_path,
            scenario,
            kamailio.address,
            directory=keeper_dir,
            log_dir=tmp_path / "logs",
            name=name,
            transport="t1",
            **options,
        )

    registered = start("register", "uac-register.xml", calls=1, timeout=15, extra=["-inf", str(users)]).wait(30)
    assert registered.ok, registered.summary()
    [before] = kamailio.tcp_connections()
    client = KeeperClient(keeper_dir)
    old_pid = answering_pid(client)
    start_replacement(keeper_dir)
    wait_until(lambda: answering_pid(client) not in (None, old_pid), timeout=15, what="the successor")
    assert [c["remote_port"] for c in kamailio.tcp_connections()] == [before["remote_port"]]
    answer = start("answer", "uas-answer.xml", calls=1, timeout=30, local_port=testbed.free_port())
    caller = testbed.place_calls(kamailio, "alice", 1, sipp=sipp_path, timeout=15, log_dir=tmp_path / "logs")
    answered = answer.wait(30)
    assert caller.ok, caller.summary()
    assert answered.ok, answered.summary()
    assert [c["remote_port"] for c in kamailio.tcp_connections()] == [before["remote_port"]]


def test_replace_names_the_tls_connections_it_cannot_move(kamailio_tls, test_pki, keeper_dir, peer):
    client = ensure_keeper(keeper_dir)
    client.prepare(role="client", transport="tcp", remote=peer.getsockname(), local="-")
    client.prepare(
        role="client",
        transport="tls",
        remote=kamailio_tls.tls_address,
        local="-",
        tls_ca=str(test_pki.ca_cert),
        tls_sni=test_pki.server_name,
    )
    tls_label = next(c for c in client.status()["connections"] if c["transport"] == "tls")["local"]
    old_pid = answering_pid(client)
    start_replacement(keeper_dir)
    wait_until(lambda: answering_pid(client) not in (None, old_pid), timeout=15, what="the successor")
    assert [c["transport"] for c in client.status()["connections"]] == ["tcp"]
    log = (keeper_dir / "replace.log").read_text()
    assert "lost 1 TLS connection(s)" in log and tls_label in log
    wait_until(lambda: not kamailio_tls.tls_connections(), timeout=5, what="Kamailio to see the TLS one closed")


# ---------------------------------------------------------------- issue 16: fault isolation


@pytest.fixture
def keeper_in_thread(tmp_path):
    """A real Keeper serving its real control socket from a thread of the test, so that a
    test can put a defect into one of its handlers."""
    from fdkeeper.keeper.server import Keeper

    keeper = Keeper(tmp_path / "state")
    thread = threading.Thread(target=keeper.serve_forever, daemon=True)
    thread.start()
    client = KeeperClient(tmp_path / "state", timeout=5)
    wait_until(lambda: client.alive(), timeout=5)
    yield keeper, client
    client.stop()
    thread.join(timeout=5)


INTERNAL = b"ERR internal fdkeeper: internal error; see the keeper log"


def replies_until_closed(client: KeeperClient, request: bytes) -> list[bytes]:
    """Every packet the keeper sends for ``request`` until it closes the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(5)
        sock.connect(str(client.path))
        sock.send(request)
        packets = []
        while packet := sock.recv(4097):
            packets.append(packet)
        return packets


def test_a_handler_that_raises_costs_one_err_line_and_that_client_only(keeper_in_thread, peer, caplog):
    keeper, client = keeper_in_thread
    client.prepare(role="client", transport="tcp", remote=peer.getsockname(), local="-")

    def defect(*_args):
        raise RuntimeError("a defect in a verb handler")

    keeper._verbs["PING"] = defect
    with caplog.at_level("ERROR", logger="fdkeeper.loop"):
        assert replies_until_closed(client, b"PING") == [INTERNAL]
    assert any("a defect in a verb handler" in (r.exc_text or "") for r in caplog.records)
    status = client.status()
    assert status["keeper"]["internal_errors"] == 1
    assert len(status["connections"]) == 1  # what the keeper holds is untouched
    shown = fdkeeper("status", "--dir", str(client.directory))
    assert shown.returncode == 0 and "keeper: 1 internal error caught" in shown.stdout, shown


def test_a_resumed_request_that_raises_is_answered_once_by_its_own_client(keeper_in_thread):
    from fdkeeper.keeper.opening import Pending

    keeper, client = keeper_in_thread
    pending = Pending("a test open")
    calls: list[int] = []

    def pending_then_defect(*_args):
        calls.append(1)
        if len(calls) == 1:
            keeper.reactor.call_later(0.05, pending.settle)  # the open settles: the request runs again
            raise pending
        raise RuntimeError("a defect on the second try")

    keeper._verbs["PING"] = pending_then_defect
    assert replies_until_closed(client, b"PING") == [INTERNAL]
    assert len(calls) == 2
    assert client.status()["keeper"]["internal_errors"] == 1


def test_a_status_stream_that_faults_midway_ends_with_the_err_line(keeper_in_thread, monkeypatch):
    from fdkeeper.keeper import server

    _keeper, client = keeper_in_thread

    def batches_then_defect(_connections):
        yield [{"id": n, "padding": "x" * 100} for n in range(200)]  # several packets' worth
        raise RuntimeError("a defect while serialising the status")

    monkeypatch.setattr(server, "_as_dicts", batches_then_defect)
    packets = replies_until_closed(client, b"STATUS")
    assert packets[-1] == INTERNAL and all(p.startswith(b"JSON ") for p in packets[:-1])
    monkeypatch.undo()
    assert client.status()["keeper"]["internal_errors"] == 1


def test_a_defect_answering_one_waiting_prepare_costs_that_client_not_the_waiters_after_it():
    """PREPARE wait=: the waiters are answered when a lease ends; a defect met answering one
    is that client's one ERR internal (the loop logs and counts it), and the rest are answered."""
    from types import SimpleNamespace

    from fdkeeper.keeper.leases import Waiters
    from fdkeeper.loop import Reactor

    def answer(request):
        if request["user"] == "broken":
            raise RuntimeError("a defect met by one request")
        return b"OK " + request["user"].encode()

    class Request(dict):
        def get(self, key, default=None):
            return super().get(key, default)

    clients = [SimpleNamespace(waiting=True, sent=[]) for _ in range(3)]
    for c in clients:
        c.send = c.sent.append
    faulted = []
    reactor = Reactor()
    waiters = Waiters(answer, reactor, on_fault_of=lambda client: lambda _error: faulted.append(client))
    for c, user in zip(clients, ["first", "broken", "last"], strict=False):
        waiters.add(c, Request(user=user, wait=5.0))
    waiters.retry()
    for _ in range(3):
        reactor.run_once(0)
    assert clients[0].sent == [b"OK first"] and clients[2].sent == [b"OK last"]
    assert faulted == [clients[1]] and reactor.internal_errors == 1
    assert waiters.waiting == []
    reactor.close()


def test_a_refusal_from_a_sut_the_keeper_reached_before_says_it_is_news(keeper):
    """The first refusal asks whether the SuT runs; one after the keeper connected there names a
    SuT gone or a limit in front of it (tcp.connect_error reached=, from the Opener's memory)."""
    listener = socket.create_server(("127.0.0.1", 0))
    remote = listener.getsockname()
    keeper.prepare(role="client", transport="tcp", remote=remote, local="-", aor="sip:first@example.com")
    listener.close()  # the SuT stops listening
    with pytest.raises(FdkeeperError) as refused:
        keeper.prepare(role="client", transport="tcp", remote=remote, local="-", aor="sip:second@example.com")
    assert refused.value.code == "refused" and "after accepting earlier ones" in str(refused.value)
    with pytest.raises(FdkeeperError) as first:
        keeper.prepare(role="client", transport="tcp", remote=("127.0.0.1", free_port()), local="-")
    assert "is it running and listening on TCP there?" in str(first.value)
