"""Many users, each on its own kept connection (`-t tn`, `-t ln`), against a real Kamailio.

The register run opens one connection per user (sipp's per-call sockets); the keeper
learns each connection's address of record (AoR) from the first message sent on it and
keeps them all. An answering run is handed all of them; a later client run's call for
user k leaves on user k's own connection.
"""

from __future__ import annotations

import random
import subprocess
import sys

from fdkeeper import testbed
from fdkeeper.client import KeeperClient
from fdkeeper.testbed import wait_until

TCP_USERS = 200
TLS_USERS = 50


def user_names(count: int) -> list[str]:
    return [f"user{index:04d}" for index in range(1, count + 1)]


def source_port_by_aor(kamailio, names: list[str]) -> dict[str, int]:
    """Kamailio's view: the source port each user registered from."""
    return {c["aor"]: int(c["source"]["port"]) for c in kamailio.location(names)}


def local_port_by_aor(keeper) -> dict[str, int]:
    """The keeper's view: the local port of each user's kept connection."""
    return {
        c["aor"].removeprefix("sip:").split("@")[0]: int(c["local"].rsplit(":", 1)[1])
        for c in keeper.connections()
        if c["aor"] and c["state"] != "closed"
    }


# sipp -t tn refuses to start while its -max_socket (50000) exceeds the open-file limit.
MAX_SOCKET = ("-max_socket", 4000)


def register_all(sipp, remote, users_csv, count, *, transport, options=(), name="register"):
    result = sipp.run(
        "-sf",
        "uac-register.xml",
        "-inf",
        users_csv,
        "-t",
        transport,
        "-i",
        "127.0.0.1",
        "-p",
        testbed.free_port(),
        "-m",
        count,
        "-r",
        200,
        "-l",
        count,
        "-timeout",
        30,
        "-timeout_error",
        *MAX_SOCKET,
        remote,
        options=tuple(options),
        name=name,
        timeout=60,
    )
    assert result.ok and result.successful == count, result.tail()
    return result


def start_answering(sipp, remote, count, *, transport, name="answer"):
    return sipp.start(
        "-sf",
        "uas-answer.xml",
        "-t",
        transport,
        "-i",
        "127.0.0.1",
        "-p",
        testbed.free_port(),
        "-m",
        count,
        *MAX_SOCKET,
        remote,
        name=name,
        timeout=60,
    )


def call_each(kamailio_sut, tmp_path, users_csv, count, name="calls"):
    kamailio = kamailio_sut.kamailio
    return testbed.run_sipp(
        kamailio_sut.sipp_path,
        "uac-call-users.xml",
        kamailio.address,
        log_dir=tmp_path / "logs",
        name=name,
        wait=90,
        transport="u1",
        local_ip=kamailio.host,
        calls=count,
        rate=50,
        timeout=60,
        extra=["-inf", str(users_csv)],
    )


def user_of(aor: str) -> str:
    return aor.removeprefix("sip:").split("@")[0]


def test_two_hundred_tcp_users_each_on_its_own_connection(sipp, kamailio_sut, fdkeeper_keeper, tmp_path):
    kamailio, keeper = kamailio_sut.kamailio, fdkeeper_keeper
    names = user_names(TCP_USERS)
    users_csv = kamailio_sut.users_csv(tmp_path / "users.csv", names)
    register_all(sipp, kamailio.address, users_csv, TCP_USERS, transport="tn")

    connections = keeper.connections()
    assert len(connections) == TCP_USERS and all(c["state"] == "idle" for c in connections)
    assert sorted(user_of(c["aor"]) for c in connections) == names
    registered = {user_of(aor): port for aor, port in source_port_by_aor(kamailio, names).items()}
    assert registered == local_port_by_aor(keeper)  # each user registered over its own connection
    assert len(set(registered.values())) == TCP_USERS

    answer = start_answering(sipp, kamailio.address, TCP_USERS, transport="tn")
    calls = call_each(kamailio_sut, tmp_path, users_csv, TCP_USERS)
    answered = answer.wait(60)
    assert calls.ok and calls.successful == TCP_USERS, calls.summary()
    assert answered.ok and answered.successful == TCP_USERS, answered.tail()
    assert len(kamailio.tcp_connections()) == TCP_USERS  # no connection was added or lost

    # A later client run re-registers everyone in shuffled order: each REGISTER leaves on
    # that user's own connection (the SuT sees the same source port per AoR).
    shuffled = names[:]
    random.Random(7).shuffle(shuffled)
    shuffled_csv = kamailio_sut.users_csv(tmp_path / "shuffled.csv", shuffled)
    register_all(sipp, kamailio.address, shuffled_csv, TCP_USERS, transport="tn", name="reregister")
    assert {user_of(aor): port for aor, port in source_port_by_aor(kamailio, names).items()} == registered
    assert len(keeper.connections()) == TCP_USERS

    counted = subprocess.run(
        [sys.executable, "-m", "fdkeeper", "status", "--dir", str(keeper.directory), "--aor", "sip:user00*", "--count"],
        capture_output=True,
        text=True,
    )
    assert counted.stdout.strip() == "99"  # user0001 .. user0099


def test_fifty_tls_users_each_on_its_own_connection(sipp, kamailio_sut, fdkeeper_keeper, tmp_path):
    kamailio, keeper = kamailio_sut.kamailio, fdkeeper_keeper
    names = user_names(TLS_USERS)
    users_csv = kamailio_sut.users_csv(tmp_path / "users.csv", names)
    register_all(sipp, kamailio.tls_address, users_csv, TLS_USERS, transport="ln", options=kamailio_sut.tls_options)
    connections = keeper.connections()
    assert len(connections) == TLS_USERS and all(c["transport"] == "tls" for c in connections)
    registered = {user_of(aor): port for aor, port in source_port_by_aor(kamailio, names).items()}
    assert registered == local_port_by_aor(keeper)

    answer = start_answering(sipp, kamailio.tls_address, TLS_USERS, transport="ln")
    calls = call_each(kamailio_sut, tmp_path, users_csv, TLS_USERS)
    answered = answer.wait(60)
    assert calls.ok and calls.successful == TLS_USERS, calls.summary()
    assert answered.ok and answered.successful == TLS_USERS, answered.tail()
    assert len([c for c in kamailio.tcp_connections() if str(c["type"]).lower() == "tls"]) == TLS_USERS


def test_a_third_dropped_by_the_sut(sipp, kamailio_sut, fdkeeper_keeper, tmp_path):
    kamailio, keeper = kamailio_sut.kamailio, fdkeeper_keeper
    count = 30
    names = user_names(count)
    users_csv = kamailio_sut.users_csv(tmp_path / "users.csv", names)
    register_all(sipp, kamailio.address, users_csv, count, transport="tn")
    by_port = {c["remote_port"]: c["id"] for c in kamailio.tcp_connections()}
    ports = local_port_by_aor(keeper)
    dropped = names[::3]
    kamailio.close_connections([by_port[ports[name]] for name in dropped])
    wait_until(lambda: sum(c["state"] == "closed" for c in keeper.connections()) == len(dropped), timeout=15)
    closed = {user_of(c["aor"]) for c in keeper.connections() if c["state"] == "closed"}
    assert closed == set(dropped)  # status shows exactly those

    kept_names = [name for name in names if name not in dropped]
    answer = start_answering(sipp, kamailio.address, len(kept_names), transport="tn")
    calls = call_each(
        kamailio_sut, tmp_path, kamailio_sut.users_csv(tmp_path / "kept.csv", kept_names), len(kept_names)
    )
    answered = answer.wait(60)
    assert calls.ok, calls.summary()
    assert answered.ok and answered.successful == len(kept_names), answered.tail()
    assert f"{len(dropped)} kept connection(s) were closed by the SuT and are left out" in answered.err.read_text()

    # The dropped users fail clearly in a client run, and --reconnect gives them fresh connections.
    dropped_csv = kamailio_sut.users_csv(tmp_path / "dropped.csv", dropped)
    failed = sipp.run(
        "-sf",
        "uac-register.xml",
        "-inf",
        dropped_csv,
        "-t",
        "tn",
        "-i",
        "127.0.0.1",
        "-p",
        testbed.free_port(),
        "-m",
        len(dropped),
        "-timeout",
        10,
        "-timeout_error",
        *MAX_SOCKET,
        kamailio.address,
        name="failed",
        timeout=30,
    )
    assert failed.successful == 0 and "was closed at" in failed.err.read_text()
    register_all(
        sipp,
        kamailio.address,
        dropped_csv,
        len(dropped),
        transport="tn",
        options=("--reconnect",),
        name="reconnected",
    )
    assert sum(c["state"] != "closed" for c in keeper.connections()) == count


def test_too_many_users_for_the_open_file_limit_is_said_before_the_run(sipp_path, kamailio, tmp_path):
    """A keeper started with a small open-file limit refuses a run whose users would not fit."""
    import resource

    directory = tmp_path / "small"
    users_csv = testbed.write_users_csv(tmp_path / "users.csv", user_names(500), kamailio.domain)

    def small_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    keeper = subprocess.Popen(
        [sys.executable, "-m", "fdkeeper", "keeper", "--dir", str(directory)],
        preexec_fn=small_limit,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: KeeperClient(directory).alive() is not None, timeout=15)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "fdkeeper",
                "sipp",
                "--dir",
                str(directory),
                "--sipp",
                sipp_path,
                "-sf",
                str(testbed.SCENARIOS_DIR / "uac-register.xml"),
                "-inf",
                str(users_csv),
                "-t",
                "tn",
                "-i",
                "127.0.0.1",
                "-m",
                "500",
                "-max_socket",
                "4000",
                kamailio.address,
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 2, result.stderr
        assert "open-file limit 256" in result.stderr and "raise the limit" in result.stderr
    finally:
        KeeperClient(directory).stop()
        keeper.wait(10)
