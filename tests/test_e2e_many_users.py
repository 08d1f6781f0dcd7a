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
from fdkeeper.demo import start_through_fdkeeper
from fdkeeper.testbed import wait_until
from fdkeeper.testbed.pki import make_test_pki

TCP_USERS = 200
TLS_USERS = 50


def user_names(count: int) -> list[str]:
    return [f"user{index:04d}" for index in range(1, count + 1)]


def kept(keeper_dir) -> list[dict]:
    return KeeperClient(keeper_dir).status()["connections"]


def source_port_by_aor(kamailio, names: list[str]) -> dict[str, int]:
    """Kamailio's view: the source port each user registered from."""
    return {c["aor"]: int(c["source"]["port"]) for c in kamailio.location(names)}


def local_port_by_aor(keeper_dir) -> dict[str, int]:
    """The keeper's view: the local port of each user's kept connection."""
    return {
        c["aor"].removeprefix("sip:").split("@")[0]: int(c["local"].rsplit(":", 1)[1])
        for c in kept(keeper_dir)
        if c["aor"] and c["state"] != "closed"
    }


def register_all(sipp_path, remote, keeper_dir, tmp_path, users_csv, count, *, transport, options=(), name="register"):
    result = start_through_fdkeeper(
        sipp_path, "uac-register.xml", remote, directory=keeper_dir, log_dir=tmp_path / "logs", name=name,
        options=tuple(options), transport=transport, calls=count, rate=200, timeout=30,
        # sipp -t tn refuses to start while its -max_socket (50000) exceeds the open-file limit.
        extra=["-inf", str(users_csv), "-l", str(count), "-max_socket", "4000"],
    ).wait(60)
    assert result.ok and result.successful == count, result.summary()
    return result


def start_answering(sipp_path, remote, keeper_dir, tmp_path, count, *, transport, options=(), name="answer"):
    return start_through_fdkeeper(
        sipp_path, "uas-answer.xml", remote, directory=keeper_dir, log_dir=tmp_path / "logs", name=name,
        options=tuple(options), transport=transport, calls=count, timeout=60, local_port=testbed.free_port(),
        extra=["-max_socket", "4000"],
    )


def call_each(sipp_path, kamailio, tmp_path, users_csv, count, name="calls"):
    return testbed.run_sipp(
        sipp_path, "uac-call-users.xml", kamailio.address, log_dir=tmp_path / "logs", name=name, wait=90,
        transport="u1", local_ip=kamailio.host, calls=count, rate=50, timeout=60, extra=["-inf", str(users_csv)],
    )


def user_of(aor: str) -> str:
    return aor.removeprefix("sip:").split("@")[0]


def test_two_hundred_tcp_users_each_on_its_own_connection(sipp_path, kamailio, keeper_dir, tmp_path):
    names = user_names(TCP_USERS)
    users_csv = testbed.write_users_csv(tmp_path / "users.csv", names, kamailio.domain)
    register_all(sipp_path, kamailio.address, keeper_dir, tmp_path, users_csv, TCP_USERS, transport="tn")

    connections = kept(keeper_dir)
    assert len(connections) == TCP_USERS and all(c["state"] == "idle" for c in connections)
    assert sorted(user_of(c["aor"]) for c in connections) == names
    registered = {user_of(aor): port for aor, port in source_port_by_aor(kamailio, names).items()}
    assert registered == local_port_by_aor(keeper_dir)  # each user registered over its own connection
    assert len(set(registered.values())) == TCP_USERS

    answer = start_answering(sipp_path, kamailio.address, keeper_dir, tmp_path, TCP_USERS, transport="tn")
    calls = call_each(sipp_path, kamailio, tmp_path, users_csv, TCP_USERS)
    answered = answer.wait(60)
    assert calls.ok and calls.successful == TCP_USERS, calls.summary()
    assert answered.ok and answered.successful == TCP_USERS, answered.summary()
    assert len(kamailio.tcp_connections()) == TCP_USERS  # no connection was added or lost

    # A later client run re-registers everyone in shuffled order: each REGISTER leaves on
    # that user's own connection (the SuT sees the same source port per AoR).
    shuffled = names[:]
    random.Random(7).shuffle(shuffled)
    shuffled_csv = testbed.write_users_csv(tmp_path / "shuffled.csv", shuffled, kamailio.domain)
    register_all(sipp_path, kamailio.address, keeper_dir, tmp_path, shuffled_csv, TCP_USERS, transport="tn", name="reregister")
    assert {user_of(aor): port for aor, port in source_port_by_aor(kamailio, names).items()} == registered
    assert len(kept(keeper_dir)) == TCP_USERS

    counted = subprocess.run(
        [sys.executable, "-m", "fdkeeper", "status", "--dir", str(keeper_dir), "--aor", "sip:user00*", "--count"],
        capture_output=True, text=True,
    )
    assert counted.stdout.strip() == "99"  # user0001 .. user0099


def test_fifty_tls_users_each_on_its_own_connection(sipp_path, keeper_dir, tmp_path):
    pki = make_test_pki(tmp_path / "pki")
    kamailio = testbed.Kamailio(tmp_path / "kamailio-tls", tls=testbed.KamailioTls.server(pki))
    kamailio.start()
    try:
        names = user_names(TLS_USERS)
        users_csv = testbed.write_users_csv(tmp_path / "users.csv", names, kamailio.domain)
        tls = ("--tls-ca", str(pki.ca_cert), "--tls-sni", pki.server_name)
        register_all(sipp_path, kamailio.tls_address, keeper_dir, tmp_path, users_csv, TLS_USERS, transport="ln", options=tls)
        connections = kept(keeper_dir)
        assert len(connections) == TLS_USERS and all(c["transport"] == "tls" for c in connections)
        registered = {user_of(aor): port for aor, port in source_port_by_aor(kamailio, names).items()}
        assert registered == local_port_by_aor(keeper_dir)

        answer = start_answering(sipp_path, kamailio.tls_address, keeper_dir, tmp_path, TLS_USERS, transport="ln")
        calls = call_each(sipp_path, kamailio, tmp_path, users_csv, TLS_USERS)
        answered = answer.wait(60)
        assert calls.ok and calls.successful == TLS_USERS, calls.summary()
        assert answered.ok and answered.successful == TLS_USERS, answered.summary()
        assert len([c for c in kamailio.tcp_connections() if str(c["type"]).lower() == "tls"]) == TLS_USERS
    finally:
        kamailio.stop()


def test_a_third_dropped_by_the_sut(sipp_path, kamailio, keeper_dir, tmp_path):
    count = 30
    names = user_names(count)
    users_csv = testbed.write_users_csv(tmp_path / "users.csv", names, kamailio.domain)
    register_all(sipp_path, kamailio.address, keeper_dir, tmp_path, users_csv, count, transport="tn")
    by_port = {c["remote_port"]: c["id"] for c in kamailio.tcp_connections()}
    ports = local_port_by_aor(keeper_dir)
    dropped = names[::3]
    kamailio.close_connections([by_port[ports[name]] for name in dropped])
    wait_until(lambda: sum(c["state"] == "closed" for c in kept(keeper_dir)) == len(dropped), timeout=15)
    closed = {user_of(c["aor"]) for c in kept(keeper_dir) if c["state"] == "closed"}
    assert closed == set(dropped)  # status shows exactly those

    kept_names = [name for name in names if name not in dropped]
    answer = start_answering(sipp_path, kamailio.address, keeper_dir, tmp_path, len(kept_names), transport="tn")
    calls = call_each(sipp_path, kamailio, tmp_path, testbed.write_users_csv(tmp_path / "kept.csv", kept_names, kamailio.domain), len(kept_names))
    answered = answer.wait(60)
    assert calls.ok, calls.summary()
    assert answered.ok and answered.successful == len(kept_names), answered.summary()
    assert f"{len(dropped)} kept connection(s) were closed by the SuT and are left out" in answered.text("stderr")

    # The dropped users fail clearly in a client run, and --reconnect gives them fresh connections.
    dropped_csv = testbed.write_users_csv(tmp_path / "dropped.csv", dropped, kamailio.domain)
    failed = start_through_fdkeeper(
        sipp_path, "uac-register.xml", kamailio.address, directory=keeper_dir, log_dir=tmp_path / "logs", name="failed",
        transport="tn", calls=len(dropped), timeout=10, extra=["-inf", str(dropped_csv), "-max_socket", "4000"],
    ).wait(30)
    assert failed.successful == 0 and "was closed at" in failed.text("stderr")
    register_all(
        sipp_path, kamailio.address, keeper_dir, tmp_path, dropped_csv, len(dropped), transport="tn",
        options=("--reconnect",), name="reconnected",
    )
    assert sum(c["state"] != "closed" for c in kept(keeper_dir)) == count


def test_too_many_users_for_the_open_file_limit_is_said_before_the_run(sipp_path, kamailio, tmp_path):
    """A keeper started with a small open-file limit refuses a run whose users would not fit."""
    import resource

    directory = tmp_path / "small"
    users_csv = testbed.write_users_csv(tmp_path / "users.csv", user_names(500), kamailio.domain)

    def small_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    keeper = subprocess.Popen(
        [sys.executable, "-m", "fdkeeper", "keeper", "--dir", str(directory)],
        preexec_fn=small_limit, stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: KeeperClient(directory).alive() is not None, timeout=15)
        result = subprocess.run(
            [sys.executable, "-m", "fdkeeper", "sipp", "--dir", str(directory), "--sipp", sipp_path,
             "-sf", str(testbed.SCENARIOS_DIR / "uac-register.xml"), "-inf", str(users_csv), "-t", "tn",
             "-i", "127.0.0.1", "-m", "500", "-max_socket", "4000", kamailio.address],
            capture_output=True, text=True, timeout=30,
        )
        assert result.returncode == 2, result.stderr
        assert "open-file limit 256" in result.stderr and "raise the limit" in result.stderr
    finally:
        KeeperClient(directory).stop()
        keeper.wait(10)
